"""The refresh's and the pipelines' commit protocol under real faults, without Blender: a refresh process SIGKILLed
in the middle of pruning, releases named in the future (a clock stepped back), a render refused by its lock
changing nothing, the promotion guard on real model files, and training stages that count as done only when they
really finished: stopped early by ``train.stop_at``, or a driver and its worker killed mid-fine-tune on a loopback
cluster; the next run resumes from the checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from loopback import LoopbackCluster, kill_tree
from procedural import write_cells_dataset
from safetensors.torch import save_file

from pipelines.cluster import ClusterConfig
from pipelines.refresh import PromotionSettings, _next_sequence, list_releases, promote, prune
from pipelines.render import LOCK_FILE, RenderStep, run_render
from pipelines.stages import STAGE_FILE, StageIncomplete, run_stage_tasks, stage_done
from segfactory.errors import EXIT_BUSY, UserError
from segfactory.formats.dataset import committed_shards, open_dataset, verify_shard
from segfactory.io import atomic_write_json, read_json, sha256_file

TINY = str(REPO / "configs" / "finetune_tiny.yaml")


# ------------------------------------------------------------------------------------------ refresh roots


def refresh_root(tmp_path: Path, scenes: int = 4) -> tuple[Path, str, list[str]]:
    """A refresh root laid out as refreshes leave it: one dataset (1 scene per shard) and no releases yet."""
    root = tmp_path / "root"
    ds = write_cells_dataset(root / "datasets" / "cfg0", scenes=scenes, views=2, size=32, scenes_per_shard=1)
    return root, "datasets/cfg0", open_dataset(ds).shard_ids


def publish(root: Path, name: str, dataset: str, shards: list[str], sequence: int | None,
            model: dict | None = None, promoted: dict | None = None) -> Path:
    """Write a release manifest the way ``run_refresh`` does (read-only file; ``sequence`` None: a release from
    before sequence numbers)."""
    ds = root / dataset
    release = {"format": "segfactory-release", "release": name, "render": {"dataset": dataset},
               "shards": [{"id": s, "manifest_sha256": "", "frames": 2} for s in shards]}
    if sequence is not None:
        release["sequence"] = sequence
    if model is not None:
        release["model"] = model
    if promoted is not None:
        release["promoted_model"] = promoted
    assert all((ds / "shards" / s / "manifest.json").is_file() for s in shards)
    path = root / "releases" / f"{name}.json"
    atomic_write_json(path, release)
    path.chmod(0o444)
    return path


def test_kill_mid_prune_leaves_no_half_shard_and_the_rerun_finishes(tmp_path: Path) -> None:
    root, dataset, ids = refresh_root(tmp_path)
    publish(root, "000001-20250101T000000.000000Z", dataset, ids[:2], 1)
    publish(root, "000002-20250102T000000.000000Z", dataset, ids[2:], 2)
    ds = root / dataset
    script = f"from pathlib import Path\nfrom pipelines.refresh import prune\nprune(Path({str(root)!r}), 1)\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "SEGFACTORY_FAULT": "kill-mid-prune"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Killed with one of the first pruned shard's files deleted: that shard is gone as a whole (in the trash), the
    # dataset lists only what the kept release needs, and every shard that still looks committed is intact.
    trash = list((ds / "shards").glob(".trash-*"))
    assert len(trash) == 1 and trash[0].name.startswith(f".trash-{ids[0]}-")
    assert (trash[0] / "manifest.json").is_file() or sum(1 for _ in trash[0].rglob("*")) > 0
    assert open_dataset(ds).shard_ids == ids[2:]
    assert ids[0] not in committed_shards(ds)
    assert all(verify_shard(ds, sid) == [] for sid in committed_shards(ds))
    assert [p.stem for p in list_releases(root)] == ["000002-20250102T000000.000000Z"]

    # The re-run (the next refresh's prune) empties the trash and finishes the deletion.
    assert prune(root, 1) == {"releases": 0, "shards": 1, "datasets": 0, "models": 0}
    assert sorted(p.name for p in (ds / "shards").iterdir()) == ids[2:]
    assert open_dataset(ds).shard_ids == ids[2:] and open_dataset(ds).meta["num_frames"] == 4


@pytest.mark.slow  # a real fine-tune of 80 steps runs through the prune (~40 s on 2 cores)
def test_prune_never_deletes_shards_under_a_running_fine_tune(tmp_path: Path) -> None:
    """A fine-tune reading a refresh's dataset (started from the listing of an older release) while a refresh
    retires some of its shards: the prune rewrites ``dataset.json`` but leaves the shards the running fine-tune
    may still read (it would otherwise fail on a missing frame mid-training); the next prune, with no reader
    left, deletes them."""
    root, dataset, ids = refresh_root(tmp_path, scenes=4)
    ds = root / dataset
    publish(root, "000001-20250101T000000.000000Z", dataset, ids, 1)  # every shard
    run = tmp_path / "ft"
    log = tmp_path / "ft.log"
    out = open(log, "ab")  # noqa: SIM115 - closed below
    ft = subprocess.Popen([sys.executable, "-m", "segfactory.cli", "finetune", TINY, "--synthetic", str(ds), "--out",
                           str(run), "train.steps=80", "train.log_every=1", "train.val_every=1000",
                           "train.checkpoint_every=1000", "augment.crop_size=32", "train.batch_size=4"],
                          cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                          env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 240
        while not ((run / "metrics.jsonl").is_file() and len(metrics_steps(run)) >= 3):
            assert ft.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        # the next release holds only the last two shards; its refresh prunes the first release
        now = publish(root, "000002-20250102T000000.000000Z", dataset, ids[2:], 2)
        r = subprocess.run([sys.executable, "-c", "from pathlib import Path\nfrom pipelines.refresh import prune\n"
                            f"print(prune(Path({str(root)!r}), 1, protect=Path({str(now)!r})))"],
                           cwd=REPO, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
        assert r.returncode == 0, r.stderr
        assert open_dataset(ds).shard_ids == ids[2:]  # new readers see the new release's shards only
        assert committed_shards(ds) == ids  # ... but the retired ones stay while the fine-tune runs
        assert "in use" in r.stdout + r.stderr
        assert ft.poll() is None  # still training, on every shard it started with
        assert ft.wait(timeout=600) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if ft.poll() is None:
            kill_tree(ft)
        out.close()
    assert read_json(run / "summary.json")["finished"]
    # no reader left: the next prune deletes them
    prune(root, 1, protect=now)
    assert committed_shards(ds) == ids[2:] and sorted(p.name for p in (ds / "shards").iterdir()) == ids[2:]


def prune_in_process(root: Path, now: Path) -> str:
    """A refresh's prune in a process of its own (keep 1, ``now`` protected); its output."""
    r = subprocess.run([sys.executable, "-c", "from pathlib import Path\nfrom pipelines.refresh import prune\n"
                        f"print(prune(Path({str(root)!r}), 1, protect=Path({str(now)!r})))"],
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def test_prune_during_stats_keeps_the_shards_it_counts(tmp_path: Path) -> None:
    """``segfactory stats`` reads every frame of the listing it started from, then each shard's ``coco.json``: a
    prune that retires shards meanwhile must leave them to it (it crashed on a missing ``coco.json`` before it held
    the readers' lock). The real stats process is held at the second shard's ``coco.json``, a FIFO here, with the
    frames of all four shards counted and the ``coco.json`` of the two the prune retires still to read."""
    root, dataset, ids = refresh_root(tmp_path, scenes=4)
    ds = root / dataset
    publish(root, "000001-20250101T000000.000000Z", dataset, ids, 1)  # every shard
    stats = [sys.executable, "-m", "segfactory.cli", "stats", str(ds), "--json"]
    whole = subprocess.run(stats, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert whole.returncode == 0, whole.stderr
    expected = json.loads(whole.stdout)
    assert expected["shards"] == 4 and expected["frames"] == 8
    coco = ds / "shards" / ids[1] / "coco.json"
    content = coco.read_bytes()
    coco.unlink()
    os.mkfifo(coco)
    proc = subprocess.Popen(stats, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fd = None
    try:
        deadline = time.monotonic() + 120
        while fd is None:  # opening a FIFO to write without blocking works once a reader has it open
            try:
                fd = os.open(coco, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "stats never opened the second shard's coco.json"
                time.sleep(0.05)
        now = publish(root, "000002-20250102T000000.000000Z", dataset, ids[:2], 2)  # retires the last two
        said = prune_in_process(root, now)
        assert open_dataset(ds).shard_ids == ids[:2]  # new readers see the new release's shards only
        assert committed_shards(ds) == ids and "in use" in said  # ... the retired ones wait for stats
    finally:
        if fd is not None:
            os.set_blocking(fd, True)
            os.write(fd, content)
            os.close(fd)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out) == expected  # the numbers of the listing it started from
    coco.unlink()
    coco.write_bytes(content)
    prune_in_process(root, now)  # stats is gone: the next prune deletes them
    assert committed_shards(ds) == ids[:2]


def test_prune_during_show_keeps_the_frames_it_draws(tmp_path: Path) -> None:
    """``segfactory show`` lists the frames of every shard, then loads the ones it draws: a prune that retires
    shards in between must leave them to it (before it held the readers' lock the sheet failed on a frame that had
    gone, as if the file were corrupt). The real show command runs in a process of its own that pauses before it
    loads its first frame (a wrapper around ``synth.viz.load_frame`` that waits for a line, then calls it)."""
    root, dataset, ids = refresh_root(tmp_path, scenes=4)
    ds = root / dataset
    publish(root, "000001-20250101T000000.000000Z", dataset, ids, 1)
    sheet = tmp_path / "sheet.png"
    code = textwrap.dedent(f"""
        import sys
        import synth.viz as viz
        load = viz.load_frame
        paused = []
        def load_after_a_pause(ref):
            if not paused:
                paused.append(ref)
                print("listed", flush=True)
                sys.stdin.readline()
            return load(ref)
        viz.load_frame = load_after_a_pause
        from segfactory.cli import main
        sys.exit(main(["show", {str(ds)!r}, "--out", {str(sheet)!r}, "--frames", "8"]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "listed", proc.communicate(timeout=60)
        now = publish(root, "000002-20250102T000000.000000Z", dataset, ids[:2], 2)
        said = prune_in_process(root, now)
        assert open_dataset(ds).shard_ids == ids[:2]
        assert committed_shards(ds) == ids and "in use" in said
    finally:
        out, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, err
    assert sheet.is_file() and str(sheet) in out
    prune_in_process(root, now)
    assert committed_shards(ds) == ids[:2]


def test_release_named_in_the_future_never_displaces_the_new_one(tmp_path: Path) -> None:
    root, dataset, ids = refresh_root(tmp_path, scenes=3)
    # A release from before sequence numbers, written while the clock was years ahead, and a numbered one
    # published under the same wrong clock.
    legacy = publish(root, "29991231T235959.000000Z", dataset, ids[:1], None)
    ahead = publish(root, "000001-29991231T235959.500000Z", dataset, ids[1:2], 1)
    # The clock stepped back: the next release's time sorts before both, its sequence after them.
    seq = _next_sequence(root)
    assert seq == 2
    now = publish(root, f"{seq:06d}-20250101T000000.000000Z", dataset, ids[2:], seq)
    assert list_releases(root) == [legacy, ahead, now]
    assert prune(root, 1, protect=now)["releases"] == 2
    assert list_releases(root) == [now]
    assert open_dataset(root / dataset).shard_ids == ids[2:] and committed_shards(root / dataset) == ids[2:]
    # The just-published release survives even a keep that would otherwise drop it.
    later = publish(root, "000003-20240101T000000.000000Z", dataset, ids[2:], 3)
    assert prune(root, 1, protect=now)["releases"] == 0 and list_releases(root) == [now, later]


def test_render_refused_by_its_lock_does_not_touch_the_dataset(tmp_path: Path) -> None:
    from pipelines.lock import exclusive_lock

    out = tmp_path / "ds"
    cfg = RenderStep.model_validate({"scene": {"family": "cells"}, "dataset": {"scenes": 2}})
    with exclusive_lock(out / LOCK_FILE, "a render", fix="-"):  # a render that is running right now
        with pytest.raises(UserError) as e:
            run_render(cfg, out, ClusterConfig(workers=1, dashboard=False))
        assert e.value.exit_code == EXIT_BUSY
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no dataset.json, no config.yaml


# ------------------------------------------------------------------------------------------ promotion


def model_dir(root: Path, stage: str, finite: bool) -> str:
    d = root / "stages" / stage / "model"
    d.mkdir(parents=True)
    w = torch.ones(4, 3)
    if not finite:
        w[1, 2] = float("nan")
    save_file({"decoder.weight": w, "steps": torch.tensor([3])}, str(d / "model.safetensors"))
    return f"stages/{stage}/model"


def candidate(root: Path, stage: str, miou: float, finite: bool = True) -> dict:
    return {"model": model_dir(root, stage, finite), "miou": miou, "stages": [f"stages/{stage}"]}


def test_promotion_guard_refuses_a_drop_beyond_the_margin_and_nan_models(tmp_path: Path) -> None:
    s = PromotionSettings(max_drop=0.05)
    first, promoted = promote(tmp_path, candidate(tmp_path, "ft-a", 0.60), None, s, "r1")
    assert first["promotion"]["promoted"] and promoted["release"] == "r1" and promoted["miou"] == 0.60
    r1 = {"release": "r1", "model": first, "promoted_model": promoted}

    ok, p2 = promote(tmp_path, candidate(tmp_path, "ft-b", 0.56), r1, s, "r2")  # within the margin
    assert ok["promotion"] == {"promoted": True, "previous": "r1", "reason": ok["promotion"]["reason"]}
    assert p2["model"] == "stages/ft-b/model" and p2["release"] == "r2"
    r2 = {"release": "r2", "model": ok, "promoted_model": p2}

    worse, p3 = promote(tmp_path, candidate(tmp_path, "ft-c", 0.40), r2, s, "r3")
    assert not worse["promotion"]["promoted"] and p3 == p2  # the release keeps serving r2's model
    assert "dropped by 0.1600 from 0.5600 (release r2)" in worse["promotion"]["reason"]
    assert "train.promotion.max_drop=0.05" in worse["promotion"]["reason"]
    r3 = {"release": "r3", "model": worse, "promoted_model": p3}

    nan, p4 = promote(tmp_path, candidate(tmp_path, "ft-d", 0.99, finite=False), r3, s, "r4")
    assert not nan["promotion"]["promoted"] and p4 == p2 and "NaN" in nan["promotion"]["reason"]
    nan_score, p5 = promote(tmp_path, candidate(tmp_path, "ft-e", float("nan")), r3, s, "r5")
    assert not nan_score["promotion"]["promoted"] and p5 == p2 and "not finite" in nan_score["promotion"]["reason"]


def test_prune_keeps_the_model_a_kept_release_still_serves(tmp_path: Path) -> None:
    root, dataset, ids = refresh_root(tmp_path, scenes=1)
    good = candidate(root, "finetune-good", 0.7)
    bad = candidate(root, "finetune-bad", 0.1)
    for d in ("finetune-good", "finetune-bad"):
        (root / "stages" / d / STAGE_FILE).write_text("{}")
    publish(root, "000001-a", dataset, ids, 1, model=good, promoted={**good, "release": "000001-a"})
    publish(root, "000002-b", dataset, ids, 2, model=bad, promoted={**good, "release": "000001-a"})
    assert prune(root, 1)["models"] == 0  # release 1 is gone, the model it promoted is still served
    assert (root / "stages" / "finetune-good" / "model" / "model.safetensors").is_file()
    publish(root, "000003-c", dataset, ids, 3, model=good, promoted={**good, "release": "000003-c"})
    assert prune(root, 1)["models"] == 1 and not (root / "stages" / "finetune-bad").exists()


# ------------------------------------------------------------------------------------------ training stages


def finetune_argv(dataset: Path, steps: int, *extra: str) -> list[str]:
    return ["finetune", TINY, "--synthetic", str(dataset), "--out", "{OUT}", f"train.steps={steps}",
            "train.checkpoint_every=2", "train.val_every=1000", "train.log_every=1", "train.warmup_steps=1", *extra]


def metrics_steps(d: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def test_stage_stopped_by_stop_at_is_not_done_and_the_rerun_resumes(tiny_dataset: Path, tmp_path: Path) -> None:
    final = tmp_path / "run" / "stages" / "finetune-0123456789ab"
    cluster = ClusterConfig(workers=1, dashboard=False)
    report = tmp_path / "report.html"
    with pytest.raises(StageIncomplete, match=r"stage finetune ended without finishing: no summary\.json"):
        run_stage_tasks(cluster, 600, 0, {"finetune": (final, finetune_argv(tiny_dataset, 6, "train.stop_at=4"))},
                        report)
    assert not final.exists() and not stage_done(final)
    [attempt] = final.parent.glob(f".tmp-{final.name}-*")
    assert (attempt / "checkpoint.pt").is_file() and metrics_steps(attempt) == [1, 2, 3, 4]

    results = run_stage_tasks(cluster, 600, 0, {"finetune": (final, finetune_argv(tiny_dataset, 6))}, report)
    assert results["finetune"]["finished"] and results["finetune"]["resumed"]
    assert stage_done(final) and not list(final.parent.glob(".tmp-*"))
    assert "resuming" in (final.parent / f"{final.name}.log").read_text()
    assert metrics_steps(final) == [1, 2, 3, 4, 5, 6]  # steps 1-4 once, then 5-6: resumed, not restarted
    summary = read_json(final / "summary.json")
    assert summary["finished"] and summary["model_dir"] == str(final / "model")  # paths name the committed stage
    assert read_json(final / "model" / "model.json")["lineage"]["training"]["run"] == str(final)
    assert read_json(final / STAGE_FILE)["resumed"] and "model/model.safetensors" in read_json(final / STAGE_FILE)[
        "files"]


DRIVER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from pipelines.cluster import ClusterConfig
    from pipelines.stages import run_stage_tasks
    address, final, argv = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    cluster = ClusterConfig(backend="address", address=address, dashboard=False)
    print(json.dumps(run_stage_tasks(cluster, 600, 0, {"finetune": (final, argv)}, final.parent / "report.html")))
""")


@pytest.mark.slow  # a loopback cluster, a fine-tune killed after a few steps, then resumed to the end
def test_driver_and_worker_killed_mid_finetune_on_a_cluster_resume(tiny_dataset: Path, tmp_path: Path) -> None:
    cluster = LoopbackCluster(tmp_path / "dask", n_workers=1)
    final = tmp_path / "run" / "stages" / "finetune-0123456789ab"
    final.parent.mkdir(parents=True)
    argv = json.dumps(finetune_argv(tiny_dataset, 40))
    log = open(tmp_path / "driver.log", "ab")  # noqa: SIM115 - closed below

    def driver() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", DRIVER, cluster.address, str(final), argv], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})

    try:
        first = driver()
        deadline = time.monotonic() + 240
        while True:
            attempts = list(final.parent.glob(f".tmp-{final.name}-*"))
            if attempts and (attempts[0] / "checkpoint.pt").is_file() and (attempts[0] / "metrics.jsonl").is_file() \
                    and len(metrics_steps(attempts[0])) >= 4:
                break
            assert first.poll() is None, (tmp_path / "driver.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "driver.log").read_text()
            time.sleep(0.1)
        # The whole allocation goes: the driver, and the worker with the training process it runs.
        kill_tree(first)
        for w in cluster.workers:
            kill_tree(w)
        time.sleep(1)
        assert not stage_done(final) and not final.exists()  # never counted as done early
        [attempt] = final.parent.glob(f".tmp-{final.name}-*")
        reached = max(metrics_steps(attempt))
        assert 4 <= reached < 40

        cluster.add_worker("w-again")
        cluster.wait_for_workers(1)
        second = driver()
        assert second.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()
    finally:
        log.close()
        cluster.close()
    assert stage_done(final) and not list(final.parent.glob(".tmp-*"))
    stage_log = (final.parent / f"{final.name}.log").read_text()
    assert "segfactory: resuming" in stage_log and "resuming" in stage_log.split("segfactory: resuming", 1)[1]
    steps = metrics_steps(final)
    assert steps == list(range(1, 41))  # truncated to the checkpoint on resume: every step exactly once
    assert read_json(final / "summary.json")["finished"] and read_json(final / STAGE_FILE)["resumed"]


# ------------------------------------------------------------------------------------------ promotion on real eval


def labeled_folder_from(dataset: Path, out: Path) -> Path:
    """A real labeled folder (images/, masks/, classes.json) holding a rendered dataset's frames as PNG files."""
    from PIL import Image

    from segfactory.formats.dataset import load_frame

    ds = open_dataset(dataset)
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    for i, ref in enumerate(ds.frames()):
        frame = load_frame(ref)
        Image.fromarray(frame["rgb"]).save(out / "images" / f"f{i:02d}.png")
        Image.fromarray(frame["semantic"]).save(out / "masks" / f"f{i:02d}.png")
    (out / "classes.json").write_text(json.dumps({"classes": [{"id": c["id"], "name": c["name"]}
                                                              for c in ds.classes]}))
    return out


@pytest.mark.slow  # trains a tiny model, then four real evaluate stages on a LocalCluster
def test_a_model_that_drops_on_the_real_eval_images_is_not_promoted(tiny_dataset: Path, tmp_path: Path) -> None:
    """The held-out (rendered) score says promote, the labeled real images say the model got worse: both models
    are evaluated for real on the same images (``segfactory evaluate`` stages), and the release keeps serving the
    previous model, saying why."""
    from safetensors.torch import load_file

    from pipelines.refresh import RefreshConfig, score_real_eval
    from segfactory.config import load_config

    root = tmp_path / "root"
    real = labeled_folder_from(tiny_dataset, tmp_path / "labeled")
    cluster = ClusterConfig(workers=1, dashboard=False)
    good = root / "stages" / "finetune-good"
    run_stage_tasks(cluster, 600, 0, {"finetune": (good, finetune_argv(tiny_dataset, 24))}, tmp_path / "r.html")
    # A regressed model: the trained one with every weight scaled to nothing (a real model dir that loads and
    # predicts one class everywhere)
    bad = root / "stages" / "finetune-bad"
    shutil.copytree(good / "model", bad / "model")
    weights = load_file(str(bad / "model" / "model.safetensors"))
    save_file({k: v * 0 if v.is_floating_point() else v for k, v in weights.items()},
              str(bad / "model" / "model.safetensors"))
    meta = read_json(bad / "model" / "model.json")
    atomic_write_json(bad / "model" / "model.json",
                      {**meta, "weights_sha256": sha256_file(bad / "model" / "model.safetensors")})
    cfg = load_config(RefreshConfig, None, ["cluster.workers=1", "cluster.dashboard=false",
                                            f"train.promotion.real_eval={real}", "train.promotion.max_drop=0.02"])
    served = {"model": "stages/finetune-good/model", "miou": 0.50, "stages": ["stages/finetune-good"]}
    r1 = {"release": "r1", "model": served, "promoted_model": {**served, "release": "r1"}}
    candidate = {"model": "stages/finetune-bad/model", "miou": 0.90, "stages": ["stages/finetune-bad"]}

    scored = score_real_eval(cfg, root, candidate, r1["promoted_model"], "r2")
    rec = scored["real_eval"]
    assert rec["on"] == str(real) and rec["stage"] in scored["stages"]
    assert 0 <= rec["miou"] < rec["previous_miou"] - 0.02, rec  # scored for real: the zeroed model is worse
    for stage in (rec["stage"], rec["previous_stage"]):
        metrics = read_json(root / stage / "metrics.json")
        assert metrics["overall"]["miou"] in (rec["miou"], rec["previous_miou"]) and stage_done(root / stage)
    model, promoted = promote(root, scored, r1, cfg.train.promotion, "r2")
    assert not model["promotion"]["promoted"] and promoted == r1["promoted_model"]
    reason = model["promotion"]["reason"]
    assert f"mIoU on the real_eval images {real}" in reason and "dropped by" in reason and "max_drop=0.02" in reason

    # the same pair again: both scores reused (no stage runs again), the same decision
    before = {p.name for p in (root / "stages").iterdir()}
    again = score_real_eval(cfg, root, candidate, r1["promoted_model"], "r3")
    assert again["real_eval"] == rec and {p.name for p in (root / "stages").iterdir()} == before
    # the previous model against itself (nothing retrained): one score, promoted
    same = score_real_eval(cfg, root, served, r1["promoted_model"], "r3")["real_eval"]
    assert same["miou"] == same["previous_miou"] == rec["previous_miou"]
    # the labels changed: a new score for both
    (real / "images" / "f00.png").unlink()
    (real / "masks" / "f00.png").unlink()
    changed = score_real_eval(cfg, root, candidate, r1["promoted_model"], "r4")["real_eval"]
    assert changed["stage"] != rec["stage"] and changed["previous_stage"] != rec["previous_stage"]
    # train.promotion.remap reaches both evaluations as --remap and is part of their keys
    remapped = load_config(RefreshConfig, None, ["cluster.workers=1", "cluster.dashboard=false",
                                                 f"train.promotion.real_eval={real}",
                                                 "train.promotion.remap={debris: ignore}"])
    mapped = score_real_eval(remapped, root, candidate, r1["promoted_model"], "r4")["real_eval"]
    assert mapped["stage"] != changed["stage"] and mapped["previous_stage"] != changed["previous_stage"]
    for stage in (mapped["stage"], mapped["previous_stage"]):
        argv = read_json(root / stage / "stage.json")["argv"]
        assert argv[argv.index("--remap") + 1] == "debris=ignore", argv

    # a release that keeps serving the previous model keeps its score on these images through a prune
    ds_root, dataset, ids = refresh_root(tmp_path / "p", scenes=1)
    shutil.move(str(root / "stages"), str(ds_root / "stages"))
    path = publish(ds_root, "000001-20250101T000000.000000Z", dataset, ids, 1, model=model, promoted=promoted)
    prune(ds_root, 1, protect=path)
    kept = {p.name for p in (ds_root / "stages").iterdir() if not p.name.startswith(".") and p.is_dir()}
    assert {rec["stage"].split("/")[1], rec["previous_stage"].split("/")[1], "finetune-good", "finetune-bad"} <= kept
    # a folder that is not there is one line, before the refresh renders or trains anything
    with pytest.raises(UserError, match=r"train\.promotion\.real_eval='/nonexistent' is not a folder"):
        score_real_eval(load_config(RefreshConfig, None, ["train.promotion.real_eval=/nonexistent"]), root,
                        candidate, None, "r5")
    r = subprocess.run([sys.executable, "-m", "segfactory.cli", "refresh", str(REPO / "configs" / "refresh.yaml"),
                        "--root", str(tmp_path / "r"), "train.enabled=true", f"real.src={real / 'images'}",
                        "train.promotion.real_eval=/nonexistent"], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 2 and "real_eval='/nonexistent' is not a folder" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ growth


def test_growth_adds_fresh_scenes_each_run_up_to_the_cap() -> None:
    from pipelines.refresh import RefreshConfig, grown_scenes, shard_changes
    from pipelines.render import resolve_render_config

    cfg = RefreshConfig.model_validate({"render": {"scene": {"family": "cells"}, "dataset": {"scenes": 4}},
                                        "growth": {"scenes_per_run": 3, "max_scenes": 9}})
    render_cfg, h = resolve_render_config(cfg.render)

    def release(scenes: int, seed: int = 0, config_hash: str = h) -> dict:
        return {"render": {"config_hash": config_hash, "seed": seed, "scenes": scenes}, "shards": []}

    assert grown_scenes(cfg, render_cfg, h, None) == (0, 4)  # the first refresh renders the configured scenes
    assert grown_scenes(cfg, render_cfg, h, release(4)) == (4, 7)  # then 3 new scene indices (fresh seeds) a run
    assert grown_scenes(cfg, render_cfg, h, release(7)) == (7, 9)  # up to the cap
    assert grown_scenes(cfg, render_cfg, h, release(9)) == (9, 9)
    # Another look (config hash) or seed starts a new dataset: the configured size again.
    assert grown_scenes(cfg, render_cfg, h, release(9, seed=1)) == (0, 4)
    assert grown_scenes(cfg, render_cfg, h, release(9, config_hash="other")) == (0, 4)
    off = cfg.model_copy(update={"growth": cfg.growth.model_copy(update={"scenes_per_run": 0})})
    assert grown_scenes(off, render_cfg, h, release(4)) == (4, 4)  # no growth: unchanged config, same dataset

    prev = {"shards": [{"id": "a"}, {"id": "b"}]}
    assert shard_changes(prev, [{"id": "b"}, {"id": "c"}]) == {"shards_added": ["c"], "shards_retired": ["a"]}
    assert shard_changes(None, [{"id": "a"}]) == {"shards_added": ["a"], "shards_retired": []}
