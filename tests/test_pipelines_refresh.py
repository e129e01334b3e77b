"""``segfactory refresh``: real renders and ingests; only missing shards rendered, only new images ingested,
immutable releases with an atomically moved ``latest``, pruning, drift, and the lock against overlapping runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipelines.refresh import list_releases, refresh_lock
from segfactory.cli import main
from segfactory.errors import EXIT_BUSY
from segfactory.formats.dataset import open_dataset
from segfactory.io import read_json, sha256_file


def write_config(path: Path, real: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "render": {"scene": {"family": "cells"}, "render": {"resolution": 48, "views": 1, "samples": 2,
                                                            "denoise": False},
                   "dataset": {"scenes": 2, "scenes_per_shard": 1, "seed": 0}},
        "real": {"src": str(real)},
        "releases": {"keep": 5},
        "cluster": {"workers": 1, "dashboard": False},
    }))
    return path


def real_images(folder: Path, names: list[str]) -> None:
    from skimage import data

    folder.mkdir(exist_ok=True)
    for n in names:
        Image.fromarray(np.asarray(getattr(data, n)())).convert("RGB").save(folder / f"{n}.png")


def refresh_out(cfg: Path, root: Path, capsys, *extra: str) -> tuple[dict, str]:
    """One ``segfactory refresh``: the latest release's record with what this run did (``last_refresh.json``'s
    ``run``: for a published release the same values) and ``published``; and the summary it printed."""
    capsys.readouterr()
    assert main(["refresh", str(cfg), "--root", str(root), *extra]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    last = read_json(root / "last_refresh.json")
    assert last["latest_release"] == out["release"] and last["published"] == out["published"]
    return {**read_json(root / "releases" / f"{out['release']}.json"), **last["run"],
            "published": out["published"]}, captured.err


def refresh(cfg: Path, root: Path, capsys, *extra: str) -> dict:
    return refresh_out(cfg, root, capsys, *extra)[0]


@pytest.mark.render
def test_a_shard_corrupted_on_disk_is_rendered_again_before_the_next_release(tmp_path: Path, capsys):
    """A committed shard's frame truncated on disk (a bad sector, a copy cut short): the next refresh re-hashes
    every shard of the release against its manifest, moves the corrupt one aside, renders it again and only then
    publishes; the release lists the shard intact."""
    from pipelines.verify import run_verify
    from segfactory.formats.dataset import verify_shard

    root, real = tmp_path / "root", tmp_path / "raw"
    real_images(real, ["astronaut"])
    cfg = write_config(tmp_path / "refresh.yaml", real)
    r1 = refresh(cfg, root, capsys)
    ds = root / r1["render"]["dataset"]
    victim = r1["shards"][1]["id"]
    [png] = sorted((ds / "shards" / victim / "rgb").iterdir())
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])  # truncated mid-stream, the manifest still says committed
    assert verify_shard(ds, victim) != []

    r2 = refresh(cfg, root, capsys)
    assert r2["render"]["shards_repaired"] == 1 and r2["render"]["shards_rendered"] == 1
    assert [s["id"] for s in r2["shards"]] == [s["id"] for s in r1["shards"]]
    assert verify_shard(ds, victim) == [] and png.read_bytes() != data[: len(data) // 2]
    assert [p.name for p in (ds / "shards").glob(f".bad-{victim}-*")]  # the corrupt copy, kept for inspection
    assert run_verify(root).problems == {}


@pytest.mark.render
def test_refresh_releases_incremental_prune_and_drift(tmp_path: Path, capsys):
    root, real = tmp_path / "root", tmp_path / "raw"
    real_images(real, ["astronaut", "coffee"])
    cfg = write_config(tmp_path / "refresh.yaml", real)

    r1 = refresh(cfg, root, capsys)
    assert r1["render"]["shards_rendered"] == 2 and len(r1["shards"]) == 2 and r1["num_frames"] == 2
    assert r1["real"]["images"] == 2 and r1["real"]["new_images"] == 2 and r1["inputs_changed"]
    assert r1["drift"] == {"previous": None}
    ds = root / r1["render"]["dataset"]
    for s in r1["shards"]:
        assert sha256_file(ds / "shards" / s["id"] / "manifest.json") == s["manifest_sha256"]
    assert os.readlink(root / "releases" / "latest") == f"{r1['release']}.json"
    shares = r1["stats"]["class_pixel_share"]
    assert abs(sum(shares) + r1["stats"]["ignore_share"] - 1) < 1e-9 and r1["stats"]["instances"] > 0

    # Grow the dataset and the dump: one new shard rendered, one new image ingested; drift vs release 1.
    real_images(real, ["chelsea"])
    r2 = refresh(cfg, root, capsys, "render.dataset.scenes=3")
    assert r2["render"]["shards_rendered"] == 1 and len(r2["shards"]) == 3
    assert [s["id"] for s in r2["shards"]][:2] == [s["id"] for s in r1["shards"]]
    assert r2["real"]["new_images"] == 1 and r2["real"]["images"] == 3 and r2["inputs_changed"]
    assert r2["drift"]["previous"] == r1["release"]
    changes = r2["drift"]["class_shares"]
    assert len(changes) == len(shares) and abs(sum(c["change"] for c in changes)) < 1e-6 + abs(
        r2["stats"]["ignore_share"] - r1["stats"]["ignore_share"])
    assert [c["previous"] for c in changes] == shares
    assert 0 <= r2["drift"]["instance_hist_total_variation"] <= 1
    # Each refresh saved a Dask performance report (HTML with bokeh, else the task stream as JSON).
    assert list((root / ".logs").glob("dask-report-*.html")) or list((root / ".logs").glob("dask-report-*.json"))
    assert r1["published"] and r2["published"]
    assert read_json(root / "last_refresh.json")["latest_release"] == r2["release"]
    # Nothing new: nothing rendered or ingested, inputs unchanged, and no release published (a quiet night does not
    # push a release that changed something out of releases.keep); last_refresh.json records the run.
    r3, out3 = refresh_out(cfg, root, capsys, "render.dataset.scenes=3")
    assert r3["render"]["shards_rendered"] == 0 and r3["real"]["new_images"] == 0 and not r3["inputs_changed"]
    assert not r3["published"] and r3["release"] == r2["release"]
    assert f"nothing changed since release {r2['release']}" in " ".join(out3.split())
    assert [p.stem for p in list_releases(root)] == [r1["release"], r2["release"]]
    assert os.readlink(root / "releases" / "latest") == f"{r2['release']}.json"
    last = read_json(root / "last_refresh.json")
    assert last["published"] is False and last["latest_release"] == r2["release"] and last["seconds"] >= 0
    # releases.publish_unchanged: the same refresh publishes a release on every run (the earlier behaviour).
    r3b = refresh(cfg, root, capsys, "render.dataset.scenes=3", "releases.publish_unchanged=true")
    assert r3b["published"] and r3b["release"] != r2["release"] and not r3b["inputs_changed"]
    assert [s["id"] for s in r3b["shards"]] == [s["id"] for s in r2["shards"]]
    assert read_json(root / "releases" / f"{r1['release']}.json") == {k: v for k, v in r1.items() if k != "published"}
    assert all(p.stat().st_mode & 0o222 == 0 for p in list_releases(root))  # published read-only
    assert len(list_releases(root)) == 3 and read_json(root / "last_refresh.json")["published"] is True

    # A new seed: the dataset (what fine-tuning reads) is exactly this release's shards, while the shards the
    # kept older releases reference stay on disk.
    r4 = refresh(cfg, root, capsys, "render.dataset.scenes=3", "render.dataset.seed=1")
    dataset = open_dataset(root / r4["render"]["dataset"])
    assert sorted(dataset.shard_ids) == sorted(s["id"] for s in r4["shards"]) and len(dataset) == 3
    assert all((ds / "shards" / s["id"] / "manifest.json").is_file() for s in r2["shards"])
    # keep=1: old releases go, and with them every shard only they referenced.
    r5 = refresh(cfg, root, capsys, "render.dataset.scenes=3", "render.dataset.seed=1", "--keep", "1")
    assert r5["render"]["shards_rendered"] == 0 and [s["id"] for s in r5["shards"]] == [s["id"] for s in r4["shards"]]
    assert not r5["published"] and r5["release"] == r4["release"]  # nothing changed: the prune still runs
    assert [p.stem for p in list_releases(root)] == [r4["release"]]
    assert os.readlink(root / "releases" / "latest") == f"{r5['release']}.json"
    dataset = open_dataset(root / r5["render"]["dataset"])
    assert sorted(dataset.shard_ids) == sorted(s["id"] for s in r5["shards"])
    assert sorted(p.name for p in (ds / "shards").iterdir()) == sorted(dataset.shard_ids)
    assert dataset.meta["num_frames"] == 3


@pytest.mark.render
def test_overlapping_refresh_exits_busy_and_changes_nothing(tmp_path: Path, capsys):
    root = tmp_path / "root"
    cfg = write_config(tmp_path / "refresh.yaml", tmp_path / "none")
    cfg.write_text(cfg.read_text().replace(f"src: {tmp_path / 'none'}", "src: null"))
    with refresh_lock(root):  # a refresh that is running right now
        capsys.readouterr()
        assert main(["refresh", str(cfg), "--root", str(root)]) == EXIT_BUSY
        err = capsys.readouterr().err
        assert "another refresh" in err and f"pid {os.getpid()}" in err and "fix:" in err
    assert not (root / "releases").exists() and not (root / "datasets").exists()
    # Once the lock is free the same command works.
    assert main(["refresh", str(cfg), "--root", str(root)]) == 0
    assert len(list_releases(root)) == 1


def _refresh_args(command: list[str]) -> list[str]:
    return command[command.index("refresh"):]


def test_shipped_schedules_run_a_valid_refresh_command():
    """The crontab line, the scrontab entry and the CronJob run `segfactory refresh` with arguments our CLI
    and config accept; the CronJob forbids overlapping runs."""
    import shlex

    from pipelines.refresh import RefreshConfig
    from segfactory.cli import build_parser
    from segfactory.config import load_config

    sched = Path(__file__).resolve().parent.parent / "configs" / "schedules"
    commands = []
    for name in ("crontab", "scrontab"):
        lines = [ln for ln in (sched / name).read_text().splitlines() if ln and not ln.startswith("#")
                 and "=" not in ln.split()[0]]
        assert len(lines) == 1, name
        fields = lines[0].split(None, 5)
        assert all(f.replace("*", "0").replace("/", "").replace(",", "").isdigit() for f in fields[:5]), fields
        commands.append(_refresh_args(shlex.split(fields[5].split("&&", 1)[1].split(">>")[0])))
    cron = yaml.safe_load((sched / "refresh-cronjob.yaml").read_text())
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    commands.append(_refresh_args(container["command"] + container["args"]))
    backends = []
    for argv in commands:
        args, unknown = build_parser().parse_known_args(argv)
        assert args.func.__name__ == "cmd_refresh" and args.root == "/data/segfactory"
        cfg = load_config(RefreshConfig, Path(__file__).resolve().parent.parent / args.config,
                          [*args.overrides, *unknown])
        backends.append(cfg.cluster.backend)
    assert backends == ["local", "slurm", "kubernetes"]


def test_refresh_stops_before_rendering_when_finetune_names_another_encoder(tmp_path: Path, capsys):
    root, real = tmp_path / "root", tmp_path / "raw"
    real_images(real, ["coffee"])
    cfg = write_config(tmp_path / "refresh.yaml", real)
    data = yaml.safe_load(cfg.read_text())
    data["train"] = {"enabled": True, "pretrain": {"extends": "pretrain_tiny.yaml"},
                     "finetune": {"extends": "finetune_street.yaml"}}
    cfg.write_text(yaml.safe_dump(data))
    assert main(["refresh", str(cfg), "--root", str(root)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "train.finetune.model.encoder=resnet18 but train.pretrain.backbone.name=test_resnet" in err
    assert not (root / "datasets").exists()


@pytest.mark.render
@pytest.mark.slow  # renders, pretrains, fine-tunes and evaluates, then refreshes again
def test_refresh_retrains_only_when_inputs_change(tmp_path: Path, capsys):
    """train.enabled: the first refresh pretrains, fine-tunes and evaluates; an unchanged refresh reuses them;
    a new real image retrains; pruning keeps only the models kept releases use."""
    root, real = tmp_path / "root", tmp_path / "raw"
    real_images(real, ["astronaut", "coffee", "chelsea"])
    cfg = write_config(tmp_path / "refresh.yaml", real)
    data = yaml.safe_load(cfg.read_text())
    quick = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "quickstart_street.yaml").read_text())
    data["render"]["dataset"]["scenes"] = 4
    data["real"]["config"] = quick["real"]["config"]
    # the street demo fine-tunes a resnet18 from random init (no pretrain section): its tiny-config sizes here
    data["train"] = {"enabled": True, "pretrain": {"extends": "pretrain_tiny.yaml"},
                     "finetune": {"extends": "finetune_tiny.yaml", "augment": {"crop_size": 96}},
                     "test": {"scenes": 1}}
    data["train"]["pretrain"]["train"] = {"steps": 6, "batch_size": 4, "checkpoint_every": 6}
    data["train"]["finetune"]["train"] = {"steps": 6, "val_every": 6, "checkpoint_every": 6, "batch_size": 4}
    cfg.write_text(yaml.safe_dump(data))

    r1 = refresh(cfg, root, capsys)
    m1 = r1["model"]
    assert m1["trained"] and 0 <= m1["miou"] <= 1
    assert (root / m1["model"] / "model.safetensors").is_file() and len(m1["stages"]) == 4
    # Evaluation scored the held-out test set, rendered with another seed than the training shards.
    test_set = open_dataset(root / m1["miou_on"])
    assert len(test_set) == 1 and test_set.manifest(test_set.shard_ids[0])["seed"] == 1
    assert m1["miou_on"] in m1["stages"]
    r2 = refresh(cfg, root, capsys)
    assert not r2["inputs_changed"] and not r2["model"]["trained"] and r2["model"]["stages"] == m1["stages"]
    assert not r2["published"]  # the same shards, images and model: no new release
    real_images(real, ["rocket"])
    r3 = refresh(cfg, root, capsys, "--keep", "1")
    assert r3["inputs_changed"] and r3["model"]["trained"]
    def pretrain_stage(m: dict) -> str:
        return next(s for s in m["stages"] if s.startswith("stages/pretrain-"))

    assert pretrain_stage(r3["model"]) != pretrain_stage(m1)  # new images: a new encoder, hence a new model
    kept = {p.name for p in (root / "stages").glob("*-*") if p.is_dir()}
    # The promotion guard decides which model the release serves; pruning keeps both the candidate and it.
    served = r3["promoted_model"]
    assert r3["model"]["promotion"]["promoted"] == (served["model"] == r3["model"]["model"])
    assert kept == {s.split("/")[1] for m in (r3["model"], served) for s in m["stages"]}
