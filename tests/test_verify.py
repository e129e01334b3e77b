"""``segfactory verify``: real files damaged on disk inside committed units are found by re-hashing, ``--repair``
moves exactly those units aside, and re-running the command that made them rebuilds them byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CELLS_TINY, CONFIGS, render_cli
from PIL import Image
from procedural import write_cells_dataset

from pipelines.stages import STAGE_FILE, commit_stage, stage_done
from segfactory.cli import main
from segfactory.errors import EXIT_PARTIAL
from segfactory.formats.dataset import committed_shards, open_dataset
from segfactory.io import new_attempt_dir, read_json, sha256_file


def verify(capsys: pytest.CaptureFixture[str], path: Path, *flags: str) -> tuple[int, dict, str]:
    capsys.readouterr()
    rc = main(["verify", str(path), *flags])
    cap = capsys.readouterr()
    return rc, json.loads(cap.out.strip().splitlines()[-1]), cap.err


def truncate(path: Path) -> None:
    """Cut a real file to half its bytes, as a crash between write and flush or a bad disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_png_in_a_written_dataset_is_found_and_moved_aside(tmp_path: Path, capsys) -> None:
    ds = write_cells_dataset(tmp_path / "ds", scenes=4, views=2, size=32, scenes_per_shard=2)
    rc, rep, _ = verify(capsys, ds)
    assert rc == 0 and rep["kind"] == "dataset" and rep["units_checked"] == 2 and rep["bad_units"] == 0

    ids = open_dataset(ds).shard_ids
    bad = next(f for f in open_dataset(ds).frames() if f.shard_id == ids[1]).semantic
    truncate(bad)
    rc, rep, err = verify(capsys, ds)
    assert rc == EXIT_PARTIAL and rep["bad_units"] == 1
    [(unit, problems)] = rep["problems"].items()
    assert unit == f"shards/{ids[1]}" and len(problems) == 1
    assert problems[0].startswith(f"semantic/{bad.name}: sha256") and "corrupt" in problems[0]
    assert f"shards/{ids[1]}" in err and "--repair" in err
    assert open_dataset(ds).shard_ids == ids  # verify alone changes nothing

    rc, rep, _ = verify(capsys, ds, "--repair")
    assert rc == EXIT_PARTIAL and rep["repaired"][f"shards/{ids[1]}"].startswith(f"shards/.bad-{ids[1]}-")
    assert (ds / rep["repaired"][f"shards/{ids[1]}"] / "semantic" / bad.name).is_file()  # kept for inspection
    reopened = open_dataset(ds)
    assert reopened.shard_ids == ids[:1] and reopened.meta["num_frames"] == 4 == len(reopened)
    assert committed_shards(ds) == ids[:1]
    rc, rep, _ = verify(capsys, ds)
    assert rc == 0 and rep["units_checked"] == 1


def test_a_listed_shard_that_is_gone_is_reported_missing(tmp_path: Path, capsys) -> None:
    ds = write_cells_dataset(tmp_path / "ds", scenes=4, views=1, size=32, scenes_per_shard=2)
    ids = open_dataset(ds).shard_ids
    (ds / "shards" / ids[0] / "manifest.json").unlink()  # its commit mark is gone: not a shard any more
    rc, rep, _ = verify(capsys, ds)
    assert rc == EXIT_PARTIAL and rep["problems"] == {
        f"shards/{ids[0]}": ["listed in dataset.json but not committed (missing)"]}


def test_truncated_ingest_shard_repair_and_reingest_rebuilds_it(tmp_path: Path, capsys) -> None:
    from skimage import data

    src = tmp_path / "raw"
    src.mkdir()
    for name in ("camera", "coins", "moon", "page"):
        Image.fromarray(np.asarray(getattr(data, name)())).save(src / f"{name}.png")
    out = tmp_path / "images"
    flags = ["--workers", "1", "cluster.dashboard=false", "files_per_shard=2"]
    assert main(["ingest", str(src), "--out", str(out), *flags]) == 0
    before = read_json(out / "index.json")
    rc, rep, _ = verify(capsys, out)
    assert rc == 0 and rep["kind"] == "images" and rep["units_checked"] == 2

    sid = before["shards"][0]["id"]
    truncate(out / "shards" / sid / "images.bin")
    rc, rep, _ = verify(capsys, out, "--repair")
    assert rc == EXIT_PARTIAL and list(rep["problems"]) == [f"shards/{sid}"]
    assert "images.bin: sha256" in rep["problems"][f"shards/{sid}"][0]
    assert read_json(out / "index.json")["num_images"] == before["num_images"] - 2

    capsys.readouterr()
    assert main(["ingest", str(src), "--out", str(out), *flags]) == 0
    after = read_json(out / "index.json")
    assert after["num_images"] == before["num_images"]
    rc, rep, _ = verify(capsys, out)
    assert rc == 0 and rep["units_checked"] == 2


def test_a_changed_file_in_a_committed_stage_is_found_and_moved_aside(tmp_path: Path, capsys) -> None:
    stages = tmp_path / "run" / "stages"
    final = stages / "evaluate-0123456789ab"
    attempt = new_attempt_dir(stages, final.name)
    (attempt / "metrics.json").write_text('{"overall": {"miou": 0.5}}\n')
    (attempt / "sub").mkdir()
    (attempt / "sub" / "confusion.png").write_bytes(b"\x89PNG not really, but bytes")
    assert commit_stage(attempt, final, {"argv": ["evaluate"]})
    assert stage_done(final) and not attempt.exists()
    files = read_json(final / STAGE_FILE)["files"]
    assert files == {"metrics.json": sha256_file(final / "metrics.json"),
                     "sub/confusion.png": sha256_file(final / "sub" / "confusion.png")}
    rc, rep, _ = verify(capsys, tmp_path / "run")
    assert rc == 0 and rep["kind"] == "run" and rep["units_checked"] == 1

    (final / "metrics.json").write_text('{"overall": {"miou": 0.9}}\n')  # same size class, other bytes
    (final / "sub" / "confusion.png").unlink()
    rc, rep, _ = verify(capsys, tmp_path / "run", "--repair")
    assert rc == EXIT_PARTIAL
    problems = rep["problems"][f"stages/{final.name}"]
    assert problems[0].startswith("metrics.json: sha256") and problems[1] == "sub/confusion.png: missing"
    assert not final.exists() and not stage_done(final)  # the next run redoes the stage
    assert list(stages.glob(f".bad-{final.name}-*/metrics.json"))


def test_verify_waits_for_no_writer_a_running_render_makes_it_exit_4(tmp_path: Path, capsys) -> None:
    """A writer of the directory running (here a real process holding the dataset's render lock, as ``render`` and
    a refresh's prune do) makes ``verify`` and ``verify --repair`` exit 4 in one line, reading nothing; once the
    writer is gone it verifies."""
    import subprocess
    import sys

    from segfactory.errors import EXIT_BUSY

    ds = write_cells_dataset(tmp_path / "ds", scenes=2, views=1, size=32, scenes_per_shard=1)
    truncate(next(iter(open_dataset(ds).frames())).semantic)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom pipelines.render import dataset_lock\n"
         "with dataset_lock(Path(sys.argv[1]), 'render into'):\n    print('held', flush=True)\n    time.sleep(600)",
         str(ds)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for flags in ((), ("--repair",)):
            capsys.readouterr()
            assert main(["verify", str(ds), *flags]) == EXIT_BUSY
            err = capsys.readouterr().err
            assert f"is running (pid {holder.pid} on" in err and "run verify when it has finished" in err, err
            assert "Traceback" not in err
        assert not list((ds / "shards").glob(".bad-*"))  # --repair moved nothing
    finally:
        holder.kill()
        holder.wait()
    rc, rep, _ = verify(capsys, ds)
    assert rc == EXIT_PARTIAL and rep["bad_units"] == 1


def test_not_an_output_directory_is_a_user_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "x").mkdir()
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "holds no segfactory output" in err and "fix:" in err
    assert main(["verify", str(tmp_path / "nope")]) == 2


@pytest.mark.render
@pytest.mark.slow  # two real renders (Blender start-up twice)
def test_truncated_png_in_a_rendered_shard_repair_and_rerender_restores_it(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ds"
    args = [str(CONFIGS / "cells.yaml"), "--out", str(out), "--scenes", "2", "--views", "1", "--resolution", "48",
            "--workers", "1", "dataset.scenes_per_shard=1", "render.samples=2", "render.denoise=false",
            "cluster.dashboard=false", *CELLS_TINY]
    assert render_cli(*args) == 0
    ds = open_dataset(out)
    ids = ds.shard_ids
    labels = {f.name: sha256_file(f.semantic) for f in ds.frames()}
    victim = next(f for f in ds.frames() if f.shard_id == ids[0])
    truncate(victim.rgb)
    other = sha256_file(out / "shards" / ids[1] / "manifest.json")

    rc, rep, _ = verify(capsys, out, "--repair")
    assert rc == EXIT_PARTIAL and list(rep["problems"]) == [f"shards/{ids[0]}"]
    assert rep["problems"][f"shards/{ids[0]}"][0].startswith(f"rgb/{victim.rgb.name}: sha256")
    assert open_dataset(out).shard_ids == ids[1:]

    assert render_cli(*args) == 0  # the same command renders exactly the shard that was moved aside
    ds = open_dataset(out)
    assert ds.shard_ids == ids and sha256_file(out / "shards" / ids[1] / "manifest.json") == other
    assert {f.name: sha256_file(f.semantic) for f in ds.frames()} == labels  # same scenes, same labels
    rc, rep, _ = verify(capsys, out)
    assert rc == 0 and rep["units_checked"] == 2
    shutil.rmtree(out)
