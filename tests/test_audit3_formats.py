"""Audit 3 (#3, #4, #6, #12): predict reads what ingest takes, by the same value rule; nothing predicted is exit 2;
a labeled folder's images/; dangling links and truncated JPEGs are one note/line each."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from finetune.data.normalize import image_range, to_unit
from pretrain.config import IngestConfig
from pretrain.ingest import process_bytes
from segfactory.cli import main
from segfactory.formats.imagefile import IMAGE_SUFFIXES, read_image


def _pattern(size: int = 48) -> np.ndarray:
    """A gray blob pattern with values 0..4000 (a 12-bit camera frame)."""
    yy, xx = np.mgrid[:size, :size]
    blobs = np.sin(yy / 3.0) * np.cos(xx / 4.0)
    return np.round((blobs + 1) * 2000).astype(np.uint16)


def _predict(model: Path, inp: Path, out: Path) -> np.ndarray:
    assert main(["predict", "--model", str(model), "--input", str(inp), "--out", str(out), "--no-overlays"]) == 0
    return np.asarray(Image.open(out / "img.png"))


@pytest.mark.parametrize("dtype", ["float32", "int16", "uint32"])
def test_deep_tiffs_predict_like_their_16bit_copy(tiny_model: Path, tmp_path: Path, dtype: str) -> None:
    """A float32/int16/uint32 TIFF ingest takes is predicted, with the percentile stretch (the documented ``auto``
    rule for images deeper than 8 bit): the same masks as a 16-bit copy of the same values (shifted/scaled, which
    the stretch does not see)."""
    v = _pattern()
    ref = tmp_path / "u16"
    ref.mkdir()
    tifffile.imwrite(ref / "img.tif", v)
    deep = {"float32": v.astype(np.float32), "int16": (v.astype(np.int32) - 30000).astype(np.int16),
            "uint32": v.astype(np.uint32) * 65536}[dtype]
    d = tmp_path / dtype
    d.mkdir()
    tifffile.imwrite(d / "img.tif", deep)
    assert read_image(d / "img.tif").dtype == np.float32
    np.testing.assert_array_equal(_predict(tiny_model, d, tmp_path / f"p_{dtype}"),
                                  _predict(tiny_model, ref, tmp_path / "p_ref"))


def test_ingest_and_readers_share_one_stretch(tmp_path: Path) -> None:
    """Ingest's stored range of a float TIFF (with a NaN) is what fine-tuning/predict stretch it by."""
    f = _pattern().astype(np.float32) / 4000 - 0.5
    f[3, 3] = np.nan
    buf = io.BytesIO()
    tifffile.imwrite(buf, f)
    (tmp_path / "f.tif").write_bytes(buf.getvalue())
    [stored] = process_bytes(buf.getvalue(), IngestConfig().model_dump())
    img = read_image(tmp_path / "f.tif")
    assert img[3, 3] == 0  # non-finite values read as 0, as ingest takes them
    assert stored.record["scale"] == pytest.approx(list(image_range(img, "auto")))
    x = to_unit(img, 1, "auto")[0]
    ingested = np.asarray(Image.open(io.BytesIO(stored.data)))
    assert np.abs(np.round(x * 255).astype(int) - ingested).max() <= 1


def test_webp_and_bmp_predict_like_png(tiny_model: Path, tmp_path: Path) -> None:
    assert ".webp" in IMAGE_SUFFIXES and ".bmp" in IMAGE_SUFFIXES
    v = (_pattern() // 16).astype(np.uint8)
    rgb = np.stack([v, v[::-1], v[:, ::-1]], -1)
    outs = {}
    for fmt, kw in (("png", {}), ("webp", {"lossless": True}), ("bmp", {})):
        d = tmp_path / fmt
        d.mkdir()
        Image.fromarray(rgb).save(d / f"img.{fmt}", **kw)
        np.testing.assert_array_equal(read_image(d / f"img.{fmt}"), rgb)
        outs[fmt] = _predict(tiny_model, d, tmp_path / f"p_{fmt}")
    np.testing.assert_array_equal(outs["webp"], outs["png"])
    np.testing.assert_array_equal(outs["bmp"], outs["png"])


def _truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray((_pattern() // 16).astype(np.uint8)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_nothing_predicted_is_a_user_error(tiny_model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
                                           ) -> None:
    """Every image failing is exit 2 (nothing done, as ingest's "every file was rejected"), each file's reason
    listed, no --out left behind; a truncated JPEG is our one line, not libjpeg's "Premature end" on stderr."""
    inp = tmp_path / "in"
    inp.mkdir()
    _truncated_jpeg(inp / "cut.jpg")
    tifffile.imwrite(inp / "cplx.tif", np.ones((40, 40), np.complex64))
    out = tmp_path / "out"
    rc = main(["predict", "--model", str(tiny_model), "--input", str(inp), "--out", str(out)])
    err = capfd.readouterr().err
    assert rc == 2
    assert "none of 2 image(s) could be predicted" in err
    assert "cut.jpg" in err and "truncated or corrupt JPEG" in err and "cplx.tif" in err
    assert "Premature end" not in err
    assert not out.exists()


def test_partial_failure_still_exit_3(tiny_model: Path, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    _truncated_jpeg(inp / "cut.jpg")
    tifffile.imwrite(inp / "ok.tif", _pattern())
    assert main(["predict", "--model", str(tiny_model), "--input", str(inp), "--out", str(tmp_path / "o")]) == 3
    assert (tmp_path / "o" / "ok.png").exists()


def test_labeled_folder_input_takes_images(tiny_model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
                                           ) -> None:
    lab = tmp_path / "lab"
    (lab / "images").mkdir(parents=True)
    (lab / "masks").mkdir()
    tifffile.imwrite(lab / "images" / "img.tif", _pattern())
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(lab / "masks" / "img.png")
    _predict(tiny_model, lab, tmp_path / "p")
    assert "is a labeled folder: predicting its images/" in capfd.readouterr().err


def test_no_images_names_subfolders_and_dangling_links(tiny_model: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    top = tmp_path / "top"
    (top / "day1").mkdir(parents=True)
    tifffile.imwrite(top / "day1" / "img.tif", _pattern())
    rc = main(["predict", "--model", str(tiny_model), "--input", str(top), "--out", str(tmp_path / "p")])
    err = capfd.readouterr().err
    assert rc == 2 and "day1/" in err and "holds no images" in err
    os.symlink(tmp_path / "gone.png", top / "gone.png")
    tifffile.imwrite(top / "img.tif", _pattern())
    assert main(["predict", "--model", str(tiny_model), "--input", str(top), "--out", str(tmp_path / "q")]) == 0
    err = capfd.readouterr().err
    assert "gone.png" in err and "target does not exist" in err
