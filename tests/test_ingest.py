"""Ingestion on a real Dask LocalCluster: good real images mixed with every kind of bad file."""

from __future__ import annotations

import io
import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage
import tifffile

from pipelines.ingest import LOCK_FILE, IngestJob, run_ingest
from pretrain import ingest as core
from pretrain.config import IngestConfig
from segfactory.cli import main
from segfactory.config import load_config
from segfactory.errors import EXIT_BUSY, UserError
from segfactory.formats import images as store
from segfactory.formats.images import open_images

SK = Path(skimage.__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]


def cfg(**over: object) -> IngestJob:
    base = ["cluster.workers=2", "cluster.dashboard=false", "normalize.max_short_side=256", "files_per_shard=4"]
    return load_config(IngestJob, None, base + [f"{k}={v}" for k, v in over.items()])


def png_with_header_size(src: Path, w: int, h: int) -> bytes:
    """A real PNG whose IHDR claims w x h (a decompression bomb's signature), with a valid CRC."""
    data = bytearray(src.read_bytes())
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", w, h)
    data[16:24] = ihdr[4:12]
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


# file name -> expected rejection kind
BAD = {"truncated.jpg": "corrupt", "truncated.png": "corrupt", "zero.png": "empty", "notes.jpg": "not_image",
       "script.bin": "not_image", "bomb.png": "bomb", "anim.gif": "unsupported", "broken.tif": "corrupt",
       "dup_of_astronaut.png": "duplicate"}


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dump")
    (d / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(SK / "astronaut.png", d / "astronaut.png")  # RGB PNG
    shutil.copy(SK / "camera.png", d / "nested" / "camera.png")  # gray PNG
    shutil.copy(SK / "rocket.jpg", d / "nested" / "rocket.jpg")  # JPEG, short side 427 > 256: resized
    shutil.copy(SK / "multipage.tif", d / "nested" / "deeper" / "stack.tif")  # 2-slice stack
    moon = cv2.imread(str(SK / "moon.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(d / "moon16.png"), moon.astype(np.uint16) * 200 + 1000)  # 16-bit gray PNG
    cam = cv2.imread(str(SK / "camera.png"), cv2.IMREAD_GRAYSCALE)
    tifffile.imwrite(d / "camera16.tif", cam.astype(np.uint16) * 64)  # 16-bit TIFF
    chelsea = cv2.imread(str(SK / "chelsea.png"))
    cv2.imwrite(str(d / "chelsea.webp"), chelsea)
    cv2.imwrite(str(d / "nested" / "coins.bmp"), cv2.imread(str(SK / "coins.png"), cv2.IMREAD_GRAYSCALE))
    # bad files
    rocket = (SK / "retina.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(rocket[: len(rocket) // 3])
    coffee = (SK / "coffee.png").read_bytes()
    (d / "truncated.png").write_bytes(coffee[: len(coffee) // 2])
    (d / "zero.png").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not a jpeg\n")
    (d / "script.bin").write_bytes(Path(core.__file__).read_bytes())
    (d / "bomb.png").write_bytes(png_with_header_size(SK / "camera.png", 50_000, 50_000))
    shutil.copy(SK / "no_time_for_that_tiny.gif", d / "anim.gif")
    (d / "broken.tif").write_bytes((SK / "multipage.tif").read_bytes()[:200])
    shutil.copy(SK / "astronaut.png", d / "nested" / "dup_of_astronaut.png")
    (d / ".hidden.png").write_bytes(b"ignored: hidden")
    return d


@pytest.fixture(scope="module")
def ingested(dump: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("images")
    summary = run_ingest(str(dump), out, cfg())
    return out, summary


def test_mixed_dump_ingests_good_and_reports_each_bad_file(ingested: tuple[Path, dict]) -> None:
    out, summary = ingested
    # 8 good files, the stack gives 2 slices
    assert summary["new_images"] == 9
    assert summary["total_images"] == 9
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    kinds = {Path(r["source"]).name: r["kind"] for r in rejected}
    assert kinds == BAD
    dup = next(r for r in rejected if r["kind"] == "duplicate")
    assert dup["duplicate_of"].endswith("astronaut.png")
    assert summary["rejected_kinds"] == {k: list(BAD.values()).count(k) for k in set(BAD.values())}


def test_stored_images_are_normalized_and_recorded(ingested: tuple[Path, dict]) -> None:
    out, _ = ingested
    recs = {}
    for sid, man, _ in store.iter_manifests(out):
        assert (out / "shards" / sid / "manifest.json").is_file()
        for r in man["images"]:
            recs[(Path(r["source"]).name, r["page"])] = (sid, r)
            blob = store.read_stored(out / "shards" / sid, r)
            img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
            assert img.dtype == np.uint8
            assert img.shape[:2] == (r["height"], r["width"])
            assert (img.ndim == 2) == (r["channels"] == 1)
            assert min(r["height"], r["width"]) <= 256
    assert set(recs) == {("astronaut.png", None), ("camera.png", None), ("rocket.jpg", None), ("moon16.png", None),
                         ("camera16.tif", None), ("chelsea.webp", None), ("coins.bmp", None), ("stack.tif", 0),
                         ("stack.tif", 1)}
    moon = recs[("moon16.png", None)][1]
    assert moon["orig_dtype"] == "uint16" and moon["channels"] == 1
    lo, hi = moon["scale"]
    assert 1000 <= lo < hi <= 1000 + 255 * 200  # robust range inside the real data range
    assert recs[("camera.png", None)][1]["channels"] == 1  # gray stays one channel
    assert recs[("astronaut.png", None)][1]["channels"] == 3
    rocket = recs[("rocket.jpg", None)][1]
    assert (rocket["orig_height"], rocket["orig_width"]) == (427, 640)
    assert (rocket["height"], rocket["width"]) == (256, 384)
    index = json.loads((out / "index.json").read_text())
    assert index["num_gray"] == 6 and index["num_rgb"] == 3
    assert set(index["stats"]) == {"1", "3"}
    assert all(0 < m < 1 for m in index["stats"]["3"]["mean"])


def test_incremental_reingest_only_takes_new_files(dump: Path, tmp_path: Path) -> None:
    out = tmp_path / "images"
    run_ingest(str(dump), out, cfg())
    before = {sid: digest for sid, _, digest in store.iter_manifests(out)}
    hash_before = open_images(out).data_hash
    # nothing new: no cluster, no new shard
    again = run_ingest(str(dump), out, cfg())
    assert again["new_files"] == 0 and again["total_images"] == 9
    assert {sid: d for sid, _, d in store.iter_manifests(out)} == before
    # the dump grows (one new image, one copy of an ingested one), and a crashed shard write is left over
    grown = tmp_path / "grown"
    shutil.copytree(dump, grown)
    run_ingest(str(grown), out, cfg())  # different paths: the same files are now duplicates by content
    (out / "shards" / "0009-00000").mkdir()
    shutil.copy(SK / "coffee.png", grown / "coffee.png")
    shutil.copy(SK / "coffee.png", grown / "nested" / "coffee_again.png")
    summary = run_ingest(str(grown), out, cfg())
    assert summary["new_files"] == 2
    assert summary["new_images"] == 1
    assert summary["rejected_kinds"] == {"duplicate": 1}
    assert not (out / "shards" / "0009-00000").exists()
    after = {sid: d for sid, _, d in store.iter_manifests(out)}
    assert {k: after[k] for k in before} == before  # committed shards are never rewritten
    assert summary["total_images"] == 10
    assert open_images(out).data_hash != hash_before
    assert len(open_images(out).entries) == 10


def test_an_out_inside_the_source_and_a_labeled_folder_ingest_only_the_images(tmp_path: Path) -> None:
    """An ``--out`` inside the source folder is not ingested back (its packs are recognised as images by their
    content, so every later run added the last one); a labeled folder gives its images/, not its masks."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("astronaut.png", "camera.png"):
        shutil.copy(SK / name, src / name)
    first = run_ingest(str(src), src / "ingested", cfg())
    assert first["new_images"] == 2 and first["files_seen"] == 2
    again = run_ingest(str(src), src / "ingested", cfg())
    assert again["files_seen"] == 2 and again["new_files"] == 0 and again["total_images"] == 2
    labeled = tmp_path / "labeled"
    (labeled / "images").mkdir(parents=True)
    (labeled / "masks").mkdir()
    shutil.copy(SK / "coins.png", labeled / "images" / "coins.png")
    cv2.imwrite(str(labeled / "masks" / "coins.png"), np.zeros((303, 384), np.uint8))
    (labeled / "classes.json").write_text(json.dumps([{"id": 0, "name": "background"}]))
    s = run_ingest(str(labeled), tmp_path / "from_labeled", cfg())
    assert s["files_seen"] == 1 and s["new_images"] == 1 and s["source"] == str(labeled / "images")


def test_an_out_that_is_a_rendered_dataset_is_refused(tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "dataset.json").write_text("{}")
    with pytest.raises(UserError, match="is a rendered dataset"):
        run_ingest(str(SK / "camera.png"), ds, cfg())
    assert sorted(p.name for p in ds.iterdir()) == ["dataset.json"]


def test_changed_normalization_is_refused(ingested: tuple[Path, dict], dump: Path) -> None:
    out, _ = ingested
    with pytest.raises(UserError, match=r"normalize\.max_short_side=256"):
        run_ingest(str(dump), out, cfg(**{"normalize.max_short_side": 128}))


def test_text_list_and_glob_sources(dump: Path, tmp_path: Path) -> None:
    lst = tmp_path / "files.txt"
    lst.write_text(f"# two files\n{dump / 'astronaut.png'}\nnested/camera.png\n{dump / 'missing.png'}\n")
    (tmp_path / "nested").symlink_to(dump / "nested")
    files = core.discover(str(lst)).files
    assert [Path(f.path).name for f in files] == ["astronaut.png", "missing.png", "camera.png"]
    assert next(f for f in files if f.path.endswith("missing.png")).size == -1
    files = core.discover(str(dump / "**" / "*.jpg")).files
    assert {Path(f.path).name for f in files} == {"rocket.jpg", "truncated.jpg", "notes.jpg"}


def test_empty_and_all_bad_dumps_fail_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["ingest", str(empty), "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "no files found in folder" in err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("nope")
    (bad / "b.png").write_bytes(b"")
    rc = main(["ingest", str(bad), "--out", str(tmp_path / "o2"), "--workers", "1", "cluster.dashboard=false"])
    assert rc == 2
    assert "every file was rejected (2 file(s)" in capsys.readouterr().err
    assert len((tmp_path / "o2" / "rejected.jsonl").read_text().splitlines()) == 2


def test_decode_core_rejects_before_decoding_bombs() -> None:
    c = IngestConfig().model_dump()
    with pytest.raises(core.Rejected) as e:
        core.process_bytes(png_with_header_size(SK / "camera.png", 40_000, 40_000), c)
    assert e.value.kind == "bomb" and "1600000000 pixels" in e.value.reason
    # JPEG bigger than the target short side is decoded at reduced DCT scale and resized exactly
    c["normalize"]["max_short_side"] = 100
    (s,) = core.process_bytes((SK / "rocket.jpg").read_bytes(), c)
    assert (s.record["height"], s.record["width"]) == (100, 150) and s.record["stored"] == "encoded"
    # unchanged JPEGs are stored as their original bytes
    c["normalize"]["max_short_side"] = 1000
    (s,) = core.process_bytes((SK / "rocket.jpg").read_bytes(), c)
    assert s.data == (SK / "rocket.jpg").read_bytes() and s.record["stored"] == "copied"


def exif_rotated_jpeg(src: Path, orientation: int) -> bytes:
    """A real photo re-saved with an EXIF orientation tag (as phone cameras write them)."""
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(src) as im:
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def test_re_encoded_jpegs_keep_their_full_size() -> None:
    from PIL import Image

    c = IngestConfig().model_dump()  # max_short_side=512: rocket.jpg (640x427) needs no resize
    rocket = (SK / "rocket.jpg").read_bytes()
    with Image.open(io.BytesIO(rocket)) as im:
        full = np.asarray(im.convert("RGB"))
    # EXIF orientation 6 (rotate 90 degrees clockwise): not copyable, so decoded at full size and rotated
    data = exif_rotated_jpeg(SK / "rocket.jpg", 6)
    (s,) = core.process_bytes(data, c)
    assert s.record["stored"] == "encoded" and s.ext == ".jpg"
    assert (s.record["height"], s.record["width"]) == (640, 427)
    assert (s.record["orig_height"], s.record["orig_width"]) == (640, 427)
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(s.data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert img.shape == (640, 427, 3)
    upright = cv2.rotate(full, cv2.ROTATE_90_CLOCKWISE)
    assert np.abs(img.astype(int) - upright).mean() < 4  # two JPEG generations of the same pixels
    # also when no resize is configured at all
    (s,) = core.process_bytes(data, {**c, "normalize": {**c["normalize"], "max_short_side": None}})
    assert (s.record["height"], s.record["width"]) == (640, 427)
    # store=png: the stored PNG is the full decode, pixel for pixel
    for short in (512, None):
        (s,) = core.process_bytes(rocket, {**c, "normalize": {**c["normalize"], "store": "png",
                                                               "max_short_side": short}})
        assert s.ext == ".png" and s.record["stored"] == "encoded"
        png = cv2.cvtColor(cv2.imdecode(np.frombuffer(s.data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert png.shape == (427, 640, 3) and np.array_equal(png, full)
    # a JPEG that is stored as JPEG is still copied byte for byte
    (s,) = core.process_bytes(rocket, c)
    assert s.record["stored"] == "copied" and s.data == rocket
    assert (s.record["height"], s.record["width"]) == (427, 640)


def test_16bit_rgb_png_keeps_all_bits_and_its_size() -> None:
    c = IngestConfig().model_dump()
    astro = cv2.imread(str(SK / "astronaut.png"))  # (512, 512, 3) BGR uint8
    # a narrow 16-bit range (1000..5080): keeping only the high byte would leave ~16 grey levels
    ok, buf = cv2.imencode(".png", astro.astype(np.uint16) * 16 + 1000)
    assert ok
    data = buf.tobytes()
    assert data[24:26] == b"\x10\x02"  # IHDR: bit depth 16, colour type RGB
    (s,) = core.process_bytes(data, c)
    rec = s.record
    assert rec["orig_dtype"] == "uint16" and rec["channels"] == 3 and s.ext == ".png"
    assert (rec["height"], rec["width"]) == (512, 512)
    lo, hi = rec["scale"]
    assert 1000 <= lo < hi <= 5080
    img = cv2.imdecode(np.frombuffer(s.data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.shape == (512, 512, 3) and img.dtype == np.uint8
    assert len(np.unique(img)) > 200
    # same channel order as the 8-bit original: the linear rescale preserves which channel is brightest
    assert np.corrcoef(img[..., 0].ravel(), astro[..., 0].ravel())[0, 1] > 0.99


def test_jpeg_damaged_in_the_middle_is_rejected() -> None:
    c = IngestConfig().model_dump()
    data = bytearray((SK / "rocket.jpg").read_bytes())
    mid = len(data) // 2
    # a burst of garbage in the entropy-coded data, file length unchanged (not a truncation)
    data[mid:mid + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    for store_as in ("auto", "png"):  # validated at 1/8 scale (copied) and at full size (re-encoded)
        with pytest.raises(core.Rejected) as e:
            core.process_bytes(bytes(data), {**c, "normalize": {**c["normalize"], "store": store_as}})
        assert e.value.kind == "corrupt" and "corrupt JPEG" in e.value.reason


def test_a_second_ingest_into_the_same_out_exits_busy_and_touches_nothing(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SK / "astronaut.png", src / "astronaut.png")
    out = tmp_path / "images"
    writing = out / "shards" / ".tmp-0001-00000-k2j4"  # a shard the running ingest is writing right now
    writing.mkdir(parents=True)
    (writing / store.PACK_FILE).write_bytes(b"partial")
    # the running ingest: another process holding the output's lock
    code = ("import sys\nfrom pathlib import Path\nfrom pipelines.lock import exclusive_lock\n"
            "with exclusive_lock(Path(sys.argv[1]), 'an ingest', 'wait'):\n"
            "    print('locked', flush=True)\n    sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out / LOCK_FILE)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        rc = main(["ingest", str(src), "--out", str(out), "--workers", "1", "cluster.dashboard=false"])
        assert rc == EXIT_BUSY
        err = capsys.readouterr().err
        assert f"another ingest into '{out}' is running (pid {holder.pid} on" in err and "fix:" in err
        assert writing.is_dir() and (writing / store.PACK_FILE).read_bytes() == b"partial"
        assert not (out / "config.yaml").exists() and not (out / store.INDEX_FILE).exists()
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    # the holder is gone (the kernel dropped its lock): its unfinished shard is now a leftover, removed
    summary = run_ingest(str(src), out, cfg(**{"cluster.workers": 1}))
    assert summary["new_images"] == 1 and not writing.exists()
