"""Ingest faults reproduced for real: a decoder that hangs and one that SIGKILLs itself on one file (a real Pillow
plugin format, ``faulty_decoders.py``), one that runs past its memory cap, a TIFF stack bomb, a symlink loop and a
link to ``/``, a file that vanishes mid-run, changed limits, a source folder on a dead filesystem (a FUSE mount
whose server never answers) whose listing hangs, a decoder plugin
installed after its files were rejected; and the one reader's orientation and bomb rules."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import faulty_decoders
import numpy as np
import psutil
import pytest
import skimage
import tifffile
from conftest import REPO
from PIL import Image

from pipelines.ingest import IngestJob, run_ingest
from pretrain import ingest as core
from pretrain.config import IngestConfig
from pretrain.decoder import DecoderDied, DecoderProcess
from segfactory.config import load_config
from segfactory.errors import UserError
from segfactory.formats import images as store
from segfactory.formats.imagefile import image_size, read_image, read_mask

SK = Path(skimage.__file__).parent / "data"


def cfg(**over: object) -> IngestJob:
    base = ["cluster.workers=1", "cluster.dashboard=false", "normalize.max_short_side=128", "files_per_shard=64",
            "decode.plugins=[faulty_decoders]", "checks.decode_timeout_s=3", "checks.decode_memory_mb=768"]
    return load_config(IngestJob, None, base + [f"{k}={v}" for k, v in over.items()])


def tiff_stack_bomb(pages: int, side: int) -> bytes:
    """A real deflate-compressed TIFF stack of ``pages`` black ``side`` x ``side`` 8-bit slices whose IFDs all
    share one compressed strip: kilobytes on disk, ``pages * side**2`` pixels decoded."""
    strip = zlib.compress(bytes(side * side), 9)
    ifd_size = 2 + 9 * 12 + 4
    first_ifd = 8 + len(strip) + (len(strip) & 1)
    out = bytearray(b"II*\x00" + struct.pack("<I", first_ifd) + strip + b"\x00" * (len(strip) & 1))
    for i in range(pages):
        nxt = 0 if i == pages - 1 else first_ifd + (i + 1) * ifd_size
        tags = [(256, 4, side), (257, 4, side), (258, 3, 8), (259, 3, 8), (262, 3, 1), (273, 4, 8),
                (277, 3, 1), (278, 4, side), (279, 4, len(strip))]
        out += struct.pack("<H", len(tags))
        for tag, typ, val in tags:
            out += struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", val, 0) if typ == 3
                                                      else struct.pack("<I", val))
        out += struct.pack("<I", nxt)
    return bytes(out)


@pytest.fixture
def faulty_dump(tmp_path: Path) -> Path:
    d = tmp_path / "dump"
    (d / "sub").mkdir(parents=True)
    shutil.copy(SK / "astronaut.png", d / "astronaut.png")
    shutil.copy(SK / "camera.png", d / "sub" / "camera.png")
    for fault in ("fine", "hang", "kill", "hog"):
        (d / f"{fault}.seg").write_bytes(faulty_decoders.make(fault))
    (d / "stack_bomb.tif").write_bytes(tiff_stack_bomb(pages=300, side=4000))
    (d / "sub" / "loop").symlink_to("..")  # a link loop: sub/loop/sub/loop/...
    (d / "self").symlink_to(".")
    (d / "root").symlink_to("/")  # out of the source tree: the whole filesystem
    (d / "camera_again").symlink_to("sub")  # inside the tree, a folder reached twice
    return d


def rejected_by_name(out: Path) -> dict[str, dict]:
    lines = [json.loads(line) for line in (out / store.REJECTED_FILE).read_text().splitlines()]
    return {Path(r["source"]).name + ("#pages" if r["kind"] == "pages_dropped" else ""): r for r in lines}


@pytest.mark.slow  # ~20 s: three ingest runs on a LocalCluster, one of them waits out a 3 s timeout twice
def test_hanging_killed_and_hungry_decoders_cost_one_file_each(faulty_dump: Path, tmp_path: Path) -> None:
    out = tmp_path / "images"
    t0 = time.monotonic()
    summary = run_ingest(str(faulty_dump), out, cfg(**{"checks.max_file_pixels": 64_000_000}))
    assert time.monotonic() - t0 < 90  # the hung decoder was killed at its 3 s timeout
    # everything in one chunk: the good files of the very chunk the faults were in are ingested and published
    assert len(store.committed_shards(out)) == 1
    rej = rejected_by_name(out)
    assert rej["hang.seg"]["kind"] == "timeout" and "checks.decode_timeout_s=3 s" in rej["hang.seg"]["reason"]
    assert rej["kill.seg"]["kind"] == "crashed" and "SIGKILL" in rej["kill.seg"]["reason"]
    assert rej["hog.seg"]["kind"] == "memory" and "checks.decode_memory_mb=768" in rej["hog.seg"]["reason"]
    assert all(r["checks"]["decode_timeout_s"] == 3 for r in rej.values())  # judged under these limits
    # the stack bomb: 300 slices of 16 M pixels; 4 (the whole-file budget) were decoded, one at a time
    pages = rej["stack_bomb.tif#pages"]
    assert pages["dropped_from"] == 4 and "checks.max_file_pixels=64000000" in pages["reason"]
    recs = [r for _, m, _ in store.iter_manifests(out) for r in m["images"]]
    names = sorted(Path(r["source"]).name + (f"/{r['page']}" if r["page"] is not None else "") for r in recs)
    assert names == ["astronaut.png", "camera.png", "fine.seg", "stack_bomb.tif/0", "stack_bomb.tif/1",
                     "stack_bomb.tif/2", "stack_bomb.tif/3"]
    assert summary["total_images"] == 7 and summary["total_rejected"] == 3
    # the walk: every file once, the loop and the link out of the tree skipped and reported
    assert next(r for r in recs if r["source"].endswith("camera.png"))["source"] == str(faulty_dump / "sub" /
                                                                                           "camera.png")
    skipped = {Path(s["path"]).name: s["why"] for s in summary["skipped_links"]}
    assert set(skipped) == {"root", "self", "loop", "camera_again"}
    assert "outside the source folder" in skipped["root"]
    assert "loop" in skipped["self"] and "loop" in skipped["loop"]

    # a re-run under the same limits looks at nothing again; a longer timeout re-examines only the timed-out
    # file (and the decoder that crashed is not retried: its memory cap did not change)
    again = run_ingest(str(faulty_dump), out, cfg(**{"checks.max_file_pixels": 64_000_000}))
    assert again["new_files"] == 0
    longer = run_ingest(str(faulty_dump), out, cfg(**{"checks.max_file_pixels": 64_000_000,
                                                      "checks.decode_timeout_s": 4}))
    assert longer["new_files"] == 1 and longer["rejected_kinds"] == {"timeout": 1}
    rej = rejected_by_name(out)
    assert rej["hang.seg"]["checks"]["decode_timeout_s"] == 4 and "=4 s" in rej["hang.seg"]["reason"]
    assert len(rej) == 4  # one line per file as last judged, plus the stack's dropped slices


def test_a_hung_decoder_is_killed_and_the_next_file_gets_a_fresh_one(tmp_path: Path) -> None:
    c = IngestConfig.model_validate({"decode": {"plugins": ["faulty_decoders"]},
                                     "checks": {"decode_timeout_s": 1.5}}).model_dump(mode="json")
    files = {}
    for fault in ("fine", "hang", "kill"):
        files[fault] = tmp_path / f"{fault}.seg"
        files[fault].write_bytes(faulty_decoders.make(fault))

    def request(fault: str) -> dict:
        return {"path": str(files[fault]), "sha256": core.sha256_bytes(files[fault].read_bytes())}

    with DecoderProcess(c) as dec:
        assert dec.call(request("fine"))[0] == "ok"
        assert dec.proc is not None
        hung = psutil.Process(dec.proc.pid)
        t0 = time.monotonic()
        with pytest.raises(DecoderDied) as e:
            dec.call(request("hang"))
        assert e.value.kind == "timeout" and 1.5 <= time.monotonic() - t0 < 15
        assert not hung.is_running() or hung.status() == psutil.STATUS_ZOMBIE
        with pytest.raises(DecoderDied) as e:
            dec.call(request("kill"))
        assert e.value.kind == "crashed" and "SIGKILL" in e.value.reason
        answer = dec.call(request("fine"))
        assert answer[0] == "ok" and answer[1][0][2]["format"] == "segfaulttest"
        assert dec.started == 3  # one start, a fresh decoder after each death


def test_tiff_stacks_are_planned_from_headers_and_decoded_one_slice_at_a_time() -> None:
    checks = IngestConfig().model_dump()["checks"]
    # a chain far longer than max_pages: only max_pages + 1 IFDs are read, the rest is recorded as dropped
    long_chain = tiff_stack_bomb(pages=5000, side=16)
    t0 = time.perf_counter()
    fmt, images = core.decode(long_chain, {**checks, "max_pages": 3}, None)
    first = next(images)
    assert fmt == "tiff" and first.dropped_pages == {"from": 3, "why": "checks.max_pages=3"}
    assert [d.page for d in images] == [1, 2]
    assert time.perf_counter() - t0 < 2
    # a budget for the whole file, from the page headers: no slice of a bomb is decoded past it
    c = IngestConfig(checks={"max_file_pixels": 40_000_000}, normalize={"max_short_side": 64}).model_dump()
    stored = core.process_bytes(tiff_stack_bomb(pages=300, side=4000), c)
    assert [s.record["page"] for s in stored] == [0, 1]
    assert stored[0].record["dropped_pages"]["from"] == 2 and "dropped_pages" not in stored[1].record
    # a single slice above the budget is a bomb
    with pytest.raises(core.Rejected) as e:
        core.process_bytes(tiff_stack_bomb(pages=1, side=8000), c)
    assert e.value.kind == "bomb" and "checks.max_file_pixels=40000000" in e.value.reason
    # an ordinary stack is unchanged: every slice, no note
    stack = core.process_bytes((SK / "multipage.tif").read_bytes(), IngestConfig().model_dump())
    assert [s.record["page"] for s in stack] == [0, 1] and all("dropped_pages" not in s.record for s in stack)


def test_walk_is_bounded_and_follows_links_by_policy(faulty_dump: Path, tmp_path: Path) -> None:
    inside = core.discover(str(faulty_dump))
    names = sorted(os.path.relpath(f.path, faulty_dump) for f in inside.files)
    assert names == ["astronaut.png", "fine.seg", "hang.seg", "hog.seg", "kill.seg", "stack_bomb.tif",
                     "sub/camera.png"]
    never = core.discover(str(faulty_dump), follow_symlinks="never")
    assert [f.path for f in never.files] == [f.path for f in inside.files] and len(never.skipped_links) == 4
    # always: the link out of the tree is followed, but never a folder twice (here: a small tree outside)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(SK / "coins.png", outside / "coins.png")
    (outside / "back").symlink_to(faulty_dump)  # a loop through the outside tree
    (faulty_dump / "root").unlink()
    (faulty_dump / "elsewhere").symlink_to(outside)
    always = core.discover(str(faulty_dump), follow_symlinks="always")
    assert sorted(os.path.relpath(f.path, faulty_dump) for f in always.files) == sorted(
        [*names, "elsewhere/coins.png"])
    assert core.discover(str(faulty_dump), follow_symlinks="inside").files == inside.files
    # globs are walked the same way (a ** over the loop lists each file once)
    globbed = core.discover(str(faulty_dump / "**" / "*.png"))
    assert sorted(os.path.relpath(f.path, faulty_dump) for f in globbed.files) == ["astronaut.png",
                                                                                  "sub/camera.png"]
    with pytest.raises(UserError, match="more than max_files=3 files"):
        core.discover(str(faulty_dump), max_files=3)
    # the config still takes the old booleans
    assert IngestConfig(follow_symlinks=True).follow_symlinks == "always"


def test_a_transient_read_error_is_retried_by_the_next_run(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SK / "astronaut.png", src / "astronaut.png")
    coins = src / "coins.png"
    shutil.copy(SK / "coins.png", coins)
    out = tmp_path / "images"
    c = cfg().stage_config().model_dump(mode="json")
    st = coins.stat()
    hashed = core.hash_files(core.discover(str(src)).files, 100)
    # the file vanishes between hashing and decoding (a real ENOENT in the decoder), then comes back unchanged
    saved = coins.read_bytes()
    coins.unlink()
    summary = core.ingest_shard(core.plan_shards(hashed, {}, 1, 16)[0], str(out), c)
    assert summary["rejected_kinds"] == {"unreadable": 1}
    coins.write_bytes(saved)
    os.utime(coins, ns=(st.st_atime_ns, st.st_mtime_ns))
    store.build_index(out)
    rec = rejected_by_name(out)["coins.png"]
    assert rec["transient"] is True and "ENOENT" in rec["reason"] and "next run" in rec["reason"]
    rerun = run_ingest(str(src), out, cfg())
    assert rerun["new_files"] == 1 and rerun["new_images"] == 1
    assert rerun["total_images"] == 2 and rerun["total_rejected"] == 0
    assert (out / store.REJECTED_FILE).read_text() == ""
    # a missing file in the hash phase is transient too; a non-image is judged for good
    gone = core.hash_files([core.SourceFile(str(tmp_path / "nope.png"), -1, -1)], 100)[0]
    assert gone["kind"] == "unreadable" and gone["transient"] is True
    assert not core.needs_reexamination({"kind": "not_image", "checks": {}}, {"max_pixels": 1})
    assert core.needs_reexamination({"kind": "bomb", "checks": {"max_pixels": 1}}, {"max_pixels": 2})


# ---------------------------------------------------------------------------------- the one reader's rules


def exif_jpeg(path: Path, img: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(img).save(path, "JPEG", quality=95, exif=exif.tobytes())


def test_labeled_jpeg_is_read_upright_like_ingest_stores_it(tmp_path: Path) -> None:
    rocket = cv2.cvtColor(cv2.imread(str(SK / "rocket.jpg")), cv2.COLOR_BGR2RGB)  # (427, 640, 3)
    p = tmp_path / "rotated.jpg"
    exif_jpeg(p, rocket, 6)  # phones: stored landscape, shown rotated 90 degrees clockwise
    img = read_image(p)
    assert img.shape == (640, 427, 3) and image_size(p) == (427, 640)
    assert np.abs(img.astype(int) - cv2.rotate(rocket, cv2.ROTATE_90_CLOCKWISE)).mean() < 4
    (ingested,) = core.process_bytes(p.read_bytes(), IngestConfig(normalize={"max_short_side": None}).model_dump())
    stored = cv2.cvtColor(cv2.imdecode(np.frombuffer(ingested.data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert stored.shape == img.shape and np.abs(stored.astype(int) - img).mean() < 4  # the same pixels
    # a PNG's orientation is stored as is (no format but JPEG is rotated, here or in ingest)
    png = tmp_path / "plain.png"
    cv2.imwrite(str(png), cv2.cvtColor(rocket, cv2.COLOR_RGB2BGR))
    assert read_image(png).shape == (427, 640, 3) and image_size(png) == (640, 427)


def test_bombs_in_labeled_data_fail_with_one_line_before_decoding(tmp_path: Path) -> None:
    from test_ingest import png_with_header_size

    big = png_with_header_size(SK / "camera.png", 20_000, 10_000)  # 200 M pixels > Pillow's error limit
    (tmp_path / "image.png").write_bytes(big)
    (tmp_path / "mask.png").write_bytes(big)
    for reader, name in ((read_image, "image.png"), (read_mask, "mask.png"), (image_size, "image.png")):
        with pytest.raises(UserError) as e:
            reader(tmp_path / name)
        assert f"'{tmp_path / name}' is above the decompression-bomb limit of 178956970 pixels" in e.value.message
        assert "200000000 pixels" in e.value.message and "\n" not in str(e.value)
    tif = tmp_path / "image.tif"
    tif.write_bytes(tiff_stack_bomb(pages=1, side=14_000))  # 196 M pixels, 190 kB
    with pytest.raises(UserError, match="14000x14000 = 196000000 pixels, above the decompression-bomb limit"):
        read_image(tif)
    # below the limit, the same readers read the same files
    tifffile.imwrite(tmp_path / "ok.tif", np.zeros((40, 50), np.uint16))
    assert read_image(tmp_path / "ok.tif").shape == (40, 50) and image_size(tmp_path / "ok.tif") == (50, 40)
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 20), 3, np.uint8)).save(buf, "PNG")
    (tmp_path / "m.png").write_bytes(buf.getvalue())
    assert read_mask(tmp_path / "m.png").shape == (30, 20)


def labeled_folder(root: Path, image: np.ndarray, mask: np.ndarray, orientation: int) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    exif_jpeg(root / "images" / "frame.jpg", image, orientation)
    Image.fromarray(mask).save(root / "masks" / "frame.png")
    (root / "classes.json").write_text(json.dumps({"classes": [{"id": 0, "name": "background"},
                                                               {"id": 1, "name": "rocket"}]}))
    return root


def test_an_exif_rotated_labeled_jpeg_meets_its_upright_mask(tmp_path: Path) -> None:
    from finetune.config import SourceSpec
    from finetune.data.remap import make_targets
    from finetune.data.sources import open_source

    targets = make_targets([{"id": 0, "name": "background"}, {"id": 1, "name": "rocket"}])
    rocket = cv2.cvtColor(cv2.imread(str(SK / "rocket.jpg")), cv2.COLOR_BGR2RGB)  # stored landscape (427, 640)
    upright = cv2.rotate(rocket, cv2.ROTATE_90_CLOCKWISE)  # what viewers and labeling tools show (640, 427)
    mask = (cv2.cvtColor(upright, cv2.COLOR_RGB2GRAY) > 128).astype(np.uint8)  # labels drawn on the upright view
    d = labeled_folder(tmp_path / "ok", rocket, mask, orientation=6)
    src = open_source(SourceSpec(path=d), "real", targets, "eval")
    img, target = src.load(src.val[0])
    assert img.shape == (640, 427, 3) and target.shape == (640, 427)
    # aligned: the mask's foreground is where the loaded image is bright (up to JPEG noise at the threshold)
    agree = np.mean((cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) > 128) == (target == 1))
    assert agree > 0.97
    # a mask drawn on the stored (sideways) pixels is refused before training, naming the rule
    sideways = (cv2.cvtColor(rocket, cv2.COLOR_RGB2GRAY) > 128).astype(np.uint8)
    bad = labeled_folder(tmp_path / "bad", rocket, sideways, orientation=6)
    with pytest.raises(UserError) as e:
        open_source(SourceSpec(path=bad), "real", targets, "eval")
    assert "is 427x640 but its mask" in e.value.message and "EXIF orientation" in (e.value.fix or "")
    # the probe reads labeled folders the same way: upright, and the same line for a sideways mask
    from pretrain.config import ProbeConfig
    from pretrain.probe import _load_labeled_folder

    for folder in (d, bad):  # the probe needs two frames
        shutil.copy(folder / "images" / "frame.jpg", folder / "images" / "frame2.jpg")
        shutil.copy(folder / "masks" / "frame.png", folder / "masks" / "frame2.png")
    images, labels, k, _, names = _load_labeled_folder(d, ProbeConfig(image_size=64), 3)
    assert images.shape[0] == labels.shape[0] == 2 and k == 2 and names == ["background", "rocket"]
    with pytest.raises(UserError) as e:
        _load_labeled_folder(bad, ProbeConfig(image_size=64), 3)
    assert "is 427x640 but its mask" in e.value.message and "EXIF orientation" in (e.value.fix or "")


@pytest.mark.parametrize(("table", "says"), [
    ({"labels": []}, "'classes' is missing, not a list"),
    ({"classes": {"0": "background"}}, "'classes' is dict, not a list"),
    ({"classes": [{"id": "zero", "name": "background"}]}, "classes[0].id='zero' is not a mask value"),
    ({"classes": [{"id": 0, "label": "background"}]}, "classes[0]={'id': 0, 'label': 'background'} is not"),
    ({"classes": [{"id": 0, "name": "background"}], "ignore_index": "none"}, "ignore_index='none' is not"),
])
def test_a_classes_json_of_the_wrong_shape_is_one_line(tmp_path: Path, table: dict, says: str) -> None:
    from finetune.config import SourceSpec
    from finetune.data.sources import real_class_table

    (tmp_path / "classes.json").write_text(json.dumps(table))
    with pytest.raises(UserError) as e:
        real_class_table(SourceSpec(path=tmp_path), tmp_path, None)
    assert says in e.value.message and f"'{tmp_path / 'classes.json'}' must hold" in e.value.message


def test_a_read_that_hangs_costs_its_file_and_is_tried_again_next_run(tmp_path: Path) -> None:
    """A FIFO named like an image: opening and reading it blocks forever, as a read on a dead NFS server does."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SK / "astronaut.png", src / "astronaut.png")
    shutil.copy(SK / "coins.png", src / "coins.png")
    os.mkfifo(src / "stuck.png")
    # listed with the size the dead server last reported: the walk's stat of it worked, its read hangs
    files = [*core.discover(str(src)).files, core.SourceFile(str(src / "stuck.png"), 4096, 1)]
    files.sort(key=lambda f: f.path)
    c = IngestConfig.model_validate({"checks": {"decode_timeout_s": 1.5}}).model_dump(mode="json")
    t0 = time.monotonic()
    hashed = {Path(r["path"]).name: r for r in core.hash_files(files, 100, c)}
    assert time.monotonic() - t0 < 30  # one 1.5 s timeout, two decoder starts, not forever
    stuck = hashed["stuck.png"]
    assert stuck["kind"] == "timeout" and stuck["transient"] is True
    assert "reading took longer than checks.decode_timeout_s=1.5 s" in stuck["reason"] and "next run" in stuck["reason"]
    assert all(len(hashed[n].get("sha256", "")) == 64 for n in ("astronaut.png", "coins.png"))
    # recorded as a rejection the next run re-examines
    out = tmp_path / "images"
    core.ingest_shard(core.plan_shards(list(hashed.values()), {}, 1, 16)[0], str(out), c)
    store.build_index(out)
    rec = rejected_by_name(out)["stuck.png"]
    assert rec["kind"] == "timeout" and rec["checks"]["decode_timeout_s"] == 1.5
    assert core.needs_reexamination(rec, c["checks"])
    known, _, _ = store.known_files(out, lambda r: core.needs_reexamination(r, c["checks"]))
    assert (str(src / "stuck.png"), 4096, 1) not in known and len(known) == 2


def test_a_cut_stack_gets_its_dropped_slices_when_the_limits_are_raised(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SK / "coins.png", src / "coins.png")
    (src / "stack.tif").write_bytes(tiff_stack_bomb(pages=6, side=64))
    out = tmp_path / "images"

    def stored_pages() -> list[int]:
        recs = [r for _, m, _ in store.iter_manifests(out) for r in m["images"] if r["source"].endswith(".tif")]
        return sorted(r["page"] for r in recs)

    def note() -> dict | None:
        return rejected_by_name(out).get("stack.tif#pages")

    first = run_ingest(str(src), out, cfg(**{"checks.max_pages": 2}))
    assert first["new_images"] == 3 and stored_pages() == [0, 1] and note()["dropped_from"] == 2
    # raised: only the slices not stored yet are decoded, up to the new limits (here the pixel budget)
    raised = run_ingest(str(src), out, cfg(**{"checks.max_pages": 5, "checks.max_file_pixels": 4 * 64 * 64}))
    assert raised["new_files"] == 1 and raised["new_images"] == 2 and stored_pages() == [0, 1, 2, 3]
    n = note()
    assert n is not None and n["dropped_from"] == 4 and "checks.max_file_pixels=16384" in n["reason"]
    assert [line for line in (out / store.REJECTED_FILE).read_text().splitlines()] == [json.dumps(n)]  # one note
    # lowered: nothing is looked at again, nothing stored is removed
    lowered = run_ingest(str(src), out, cfg(**{"checks.max_pages": 3, "checks.max_file_pixels": 4 * 64 * 64}))
    assert lowered["new_files"] == 0 and stored_pages() == [0, 1, 2, 3]
    # the defaults take the rest: every slice once, and no note left
    rest = run_ingest(str(src), out, cfg())
    assert rest["new_files"] == 1 and stored_pages() == [0, 1, 2, 3, 4, 5] and note() is None
    assert rest["total_images"] == 7 and rest["total_rejected"] == 0
    assert run_ingest(str(src), out, cfg(**{"checks.max_pages": 4096}))["new_files"] == 0
    # a re-examined stack whose new look takes nothing more is told apart from a rejection of the file
    with pytest.raises(core.Rejected) as e:
        core.process_bytes((src / "stack.tif").read_bytes(), IngestConfig(checks={"max_pages": 3}).model_dump(), 4)
    assert e.value.kind == "pages_dropped" and "checks.max_pages=3" in e.value.reason
    # a re-examined stack that cannot be read now keeps a note (retried next run), never a rejection of itself
    key = (str(src / "stack.tif"), 10, 1)
    hashed = [{"path": key[0], "size": 10, "mtime_ns": 1, "kind": "unreadable", "reason": "EIO", "transient": True}]
    spec = core.plan_shards(hashed, {}, 9, 16, resume={key: 4})[-1]
    assert [(r["kind"], r["dropped_from"], r["transient"]) for r in spec["rejected"]] == [("pages_dropped", 4, True)]


DEAD_MOUNT = Path(__file__).resolve().parent / "dead_mount.py"
NAMESPACES = (["unshare", "--mount", "--propagation", "private"],
              ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"])


def dead_mount_prefix(tmp_path: Path) -> list[str]:
    """The command prefix that runs a command with a dead filesystem mounted (``dead_mount.py``) in a private
    mount namespace; skips the test where neither a root nor a user namespace can mount FUSE."""
    if shutil.which("unshare") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("needs unshare and /dev/fuse")
    probe = tmp_path / "probe"
    probe.mkdir()
    for ns in NAMESPACES:
        r = subprocess.run([*ns, sys.executable, str(DEAD_MOUNT), str(probe), "--", "true"], capture_output=True,
                           timeout=60)
        if r.returncode == 0:
            return [*ns, sys.executable, str(DEAD_MOUNT)]
    pytest.skip("cannot mount FUSE in a mount namespace here (needs root or unprivileged user namespaces)")


IN_PROCESS = """
import sys, threading
from pathlib import Path
from pipelines.ingest import LOCK_FILE, IngestJob, run_ingest
from pipelines.lock import exclusive_lock
from segfactory.config import load_config
from segfactory.errors import UserError

src, out = sys.argv[1], Path(sys.argv[2])
cfg = load_config(IngestJob, None, ["cluster.workers=1", "cluster.dashboard=false", "walk_timeout_s=1.5"])
try:
    run_ingest(src, out, cfg)
except UserError as e:
    print("error:", e.message, flush=True)
walkers = [t for t in threading.enumerate() if t.name == f"walk {src}"]
print("walker stuck:", bool(walkers) and walkers[0].is_alive(), flush=True)
with exclusive_lock(out / LOCK_FILE, "a test", fix="-"):  # exit 4 here if the run had kept its lock
    print("lock free", flush=True)
"""


def test_a_source_listing_that_hangs_stops_the_run_with_one_line_and_frees_the_lock(tmp_path: Path) -> None:
    """A folder of the source is a dead network filesystem: a FUSE mount whose server never answers
    (``dead_mount.py``), so the walk's ``stat`` of it blocks in the kernel, as on a hard NFS mount whose server
    is gone. The watchdog must outlast that system call."""
    prefix = dead_mount_prefix(tmp_path)
    src = tmp_path / "src"
    (src / "nfs").mkdir(parents=True)
    shutil.copy(SK / "coins.png", src / "coins.png")
    shutil.copy(SK / "camera.png", src / "nfs" / "camera.png")  # hidden under the mount until it is gone
    out = tmp_path / "images"
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

    # the real CLI: exit 2 with one line naming the folder, soon after the deadline
    t0 = time.monotonic()
    r = subprocess.run([*prefix, str(src / "nfs"), "--", sys.executable, "-m", "segfactory.cli", "ingest", str(src),
                        "--out", str(out), "--workers", "1", "cluster.dashboard=false", "walk_timeout_s=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    took = time.monotonic() - t0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(errors) == 1 and f"'{src / 'nfs'}' did not answer for walk_timeout_s=2 s" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert 2 <= took < 60

    # in one process: the run fails while the walking thread is still stuck in the kernel, and the lock is free
    r = subprocess.run([*prefix, str(src / "nfs"), "--", sys.executable, "-c", IN_PROCESS, str(src), str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("error:") and f"'{src / 'nfs'}' did not answer for walk_timeout_s=1.5 s" in lines[0]
    assert lines[1:] == ["walker stuck: True", "lock free"], r.stdout

    # the mount is gone: the next run lists and ingests everything
    summary = run_ingest(str(src), out, cfg(walk_timeout_s=1.5))
    assert summary["total_images"] == 2 and summary["total_rejected"] == 0


GONE_READ = """
import json, sys
from pretrain import ingest as core
from segfactory.formats import images as store

files = [core.SourceFile(p, int(size), int(mtime)) for p, size, mtime in json.loads(sys.argv[1])]
c, out = json.loads(sys.argv[2]), sys.argv[3]
hashed = core.hash_files(files, 100, c)  # read in a decoder process, under this mount namespace
core.ingest_shard(core.plan_shards(hashed, {}, 1, 16)[0], out, c)
store.build_index(out)
"""


def test_a_read_on_a_mount_whose_daemon_died_is_retried_by_the_next_run(tmp_path: Path) -> None:
    """A folder of the source is a FUSE mount (sshfs, s3fs, gcsfuse, rclone) whose daemon died after the walk
    listed it: every read there fails with ENOTCONN ("Transport endpoint is not connected"), a real error from
    the kernel (``dead_mount.py --gone``). Rejected for good, the file would never be ingested once the mount
    is back, since its size and mtime do not change; it must be retried like EIO."""
    prefix = dead_mount_prefix(tmp_path)
    src = tmp_path / "src"
    (src / "bucket").mkdir(parents=True)
    shutil.copy(SK / "coins.png", src / "coins.png")
    shutil.copy(SK / "camera.png", src / "bucket" / "camera.png")
    listed = [(f.path, f.size, f.mtime_ns) for f in core.discover(str(src)).files]  # the walk, mount still up
    out = tmp_path / "images"
    plain = {"decode.plugins": "[]"}
    c = cfg(**plain).stage_config().model_dump(mode="json")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([*prefix, "--gone", str(src / "bucket"), "--", sys.executable, "-c", GONE_READ,
                        json.dumps(listed), json.dumps(c), str(out)], cwd=REPO, capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    rec = rejected_by_name(out)["camera.png"]
    assert rec["kind"] == "unreadable" and "ENOTCONN" in rec["reason"], rec
    assert rec["transient"] is True and "next run" in rec["reason"]
    # the mount is back, the file unchanged: the next run reads it
    rerun = run_ingest(str(src), out, cfg(**plain))
    assert rerun["new_files"] == 1 and rerun["new_images"] == 1
    assert rerun["total_images"] == 2 and rerun["total_rejected"] == 0


@pytest.mark.slow  # ~35 s: four ingest runs on a LocalCluster
def test_files_rejected_as_not_images_are_re_examined_when_the_decoders_change(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(SK / "coins.png", src / "coins.png")
    (src / "scan.seg").write_bytes(faulty_decoders.make("fine"))  # a format only the plugin reads
    (src / "notes.md").write_text("not an image under any decoder\n")
    out = tmp_path / "images"
    no_plugin = {"decode.plugins": "[]"}
    first = run_ingest(str(src), out, cfg(**no_plugin))
    assert first["new_images"] == 1 and first["rejected_kinds"] == {"not_image": 2}
    rej = rejected_by_name(out)
    assert rej["scan.seg"]["decoders"] == core.decoder_set([])
    # the same decoders: nothing is looked at again
    assert run_ingest(str(src), out, cfg(**no_plugin))["new_files"] == 0
    # a decoder plugin for the format is registered: both non-images are looked at again, the plugin's file is in
    added = run_ingest(str(src), out, cfg())
    assert added["new_files"] == 2 and added["new_images"] == 1 and added["rejected_kinds"] == {"not_image": 1}
    recs = {Path(r["source"]).name: r for _, m, _ in store.iter_manifests(out) for r in m["images"]}
    assert recs["scan.seg"]["format"] == "segfaulttest" and added["total_images"] == 2
    rej = rejected_by_name(out)
    assert set(rej) == {"notes.md"} and rej["notes.md"]["decoders"] == core.decoder_set(["faulty_decoders"])
    assert run_ingest(str(src), out, cfg())["new_files"] == 0
    # the plugin removed again: the non-image is judged once more, nothing stored goes
    removed = run_ingest(str(src), out, cfg(**no_plugin))
    assert removed["new_files"] == 1 and removed["total_images"] == 2 and removed["total_rejected"] == 1
