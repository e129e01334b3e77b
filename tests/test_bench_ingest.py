"""``segfactory bench ingest --files N`` end to end on a small N, and the fast discovery it measures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import pytest

from pretrain import ingest as core
from segfactory.cli import main


def test_bench_ingest_files_plans_then_finds_nothing_new(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    rc = main(["bench", "ingest", "--files", "120", "--per-folder", "50", "--workers", "1", "--out", str(out),
               "--keep"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["files"] == 120 and r["tree"]["files"] == 120 and r["tree"]["folders"] == 3 and r["tree"]["bytes"] > 0
    first, again = r["first"], r["refresh"]
    # the first run plans and ingests every file; real photographs crops decode (duplicates would be rejected)
    assert first["files_seen"] == first["new_files"] == 120
    assert first["new_images"] + first["new_rejected"] == 120 and first["new_images"] >= 110
    assert {"discover", "check", "hash", "plan", "shards", "index"} <= set(first["phases"])
    # the unchanged re-run: everything is known, nothing is hashed, no cluster is started
    assert again["files_seen"] == 120 and again["new_files"] == 0 and again["new_images"] == 0
    assert "hash" not in again["phases"] and again["children_peak_rss_mb"] == 0
    assert again["total_images"] == first["total_images"]
    for run in (first, again):
        assert run["planning_s"] == pytest.approx(sum(run["phases"].get(k, 0) for k in ("discover", "check", "plan")),
                                                  abs=2e-3)
        assert 0 < run["driver_start_rss_mb"] <= run["driver_run_peak_rss_mb"] <= run["driver_peak_rss_mb"] + 1
        assert len(run["load_1m"]) == 2
    # 120 files are far below the targets' 200,000: not judged (audit 2 #20)
    assert r["meets_targets"] is None and "too few to judge" in r["targets"]["note"]
    assert r["kept"] == str(out.resolve())

    # the files are small real images in a nested tree, 50 per folder
    files = sorted((out / "src").rglob("*.*"))
    assert len(files) == 120 and {p.suffix for p in files} == {".jpg", ".png"}
    assert {p.parent.name for p in files} == {"d000", "d001", "d002"}
    img = cv2.imread(str(files[0]), cv2.IMREAD_COLOR)
    assert img is not None and min(img.shape[:2]) >= 48 and max(img.shape[:2]) <= 96 and img.std() > 5

    # discovery's one-stat walk reports what os.stat says, sorted, absolute
    found = core.discover(str(out / "src"))
    assert [f.key for f in found.files] == [
        (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(files, key=str)]
    assert found.skipped_links == []


def test_bench_ingest_files_cleans_up_its_own_folders_only(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    out.mkdir()
    (out / "mine.txt").write_text("not the bench's")
    assert main(["bench", "ingest", "--files", "30", "--workers", "1", "--out", str(out)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["refresh"]["new_files"] == 0 and r["kept"] is None
    assert sorted(os.listdir(out)) == ["mine.txt"]


@pytest.mark.parametrize("name", ["a.JPG", "a.", ".hidden", "a.tar.gz", "noext", "x.d/file", "x.d/f.Png", "..png"])
def test_suffix_matches_pathlib(name: str) -> None:
    assert core._suffix(os.path.join("/data", name)) == Path("/data", name).suffix.lower()


def test_packed_shard_specs_give_back_the_hash_records() -> None:
    recs = [{"path": "/d/a.png", "size": 3, "mtime_ns": 7, "sha256": "ab"},
            {"path": "/d/s.tif", "size": 9, "mtime_ns": 8, "sha256": "cd", "from_page": 4}]
    spec = {"shard_id": "0001-00000", "run": 1, "files": recs, "rejected": [{"source": "/d/x", "kind": "empty"}]}
    packed = core.pack_spec(spec)
    assert all(isinstance(f, tuple) for f in packed["files"]) and packed["rejected"] == spec["rejected"]
    assert [core._file_record(f) for f in packed["files"]] == recs
    assert [core._file_record(f) for f in recs] == recs
