"""More user paths of the CLI, run in-process through :func:`segfactory.cli.main` on the tiny model trained from the
NumPy dataset (no Blender) and the CHO sample set's real frames: ``finetune --real sample:...``, TIFF stacks in
predict and evaluate, ``predict --input FILE``, ``show --beside`` with an unreadable image, PNG colour profiles
without libpng's stderr warnings, and ``input.scale=auto`` on labels without objects."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import CONFIGS
from PIL import Image

from segfactory.cli import main
from segfactory.errors import EXIT_USER

TINY = CONFIGS / "finetune_tiny.yaml"


def error_line(err: str) -> str:
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    return line


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sample cache of this module's own (``SEGFACTORY_DATA``), holding ``sample:ctc-cho/eval``."""
    from segfactory.sampledata import resolve_path

    root = tmp_path_factory.mktemp("data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEGFACTORY_DATA", str(root))
        resolve_path("sample:ctc-cho/eval")
    return root


@pytest.fixture()
def cho_eval(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The CHO eval split (real microscopy: 5 z-slices per time point, ``cho_tTT_zZ.png``)."""
    monkeypatch.setenv("SEGFACTORY_DATA", str(data_root))
    [split] = (data_root / "samples").glob("ctc-cho-*/eval")
    return split


# ------------------------------------------------------------------------------------ finetune --real sample:
def test_finetune_real_takes_a_sample_reference(cho_eval: Path, tmp_path: Path, capsys) -> None:
    """--real sample:NAME/labeled is materialized like evaluate's --data (it was 'data folder ... does not exist')."""
    base = ["finetune", str(TINY), "--steps", "2", "train.val_every=1000"]
    assert main([*base, "--out", str(tmp_path / "a"), "--real", "sample:ctc-cho/labeled"]) == 0
    summary = last_json(capsys.readouterr().out)
    assert list(summary["final_val"]["sources"]) == ["ctc-cho"]  # named after the set, not its folder 'labeled'
    [split] = (cho_eval.parent.parent).glob("ctc-cho-*/labeled")
    assert (split / "images").is_dir() and (split / "masks").is_dir()
    # the unlabeled split has no masks: one line that names the labeled splits, nothing written
    assert main([*base, "--out", str(tmp_path / "b"), "--real", "sample:ctc-cho/unlabeled"]) == EXIT_USER
    err = capsys.readouterr().err
    assert "--real[0] 'sample:ctc-cho/unlabeled' is images without masks" in error_line(err)
    assert "sample:ctc-cho/labeled or sample:ctc-cho/eval" in err
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------- TIFF stacks
def _stack(cho_eval: Path, folder: Path, t: int = 14) -> list[Path]:
    """The 5 z-slices of time point ``t`` as ``folder/cho.tif`` (a 5-page TIFF); the slice PNGs in order."""
    slices = sorted((cho_eval / "images").glob(f"cho_t{t}_z*.png"))
    assert len(slices) == 5
    folder.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(folder / "cho.tif") as tw:
        for p in slices:
            tw.write(np.asarray(Image.open(p)), contiguous=False)
    return slices


def test_predict_reads_every_page_of_a_tiff_stack(tiny_model: Path, cho_eval: Path, tmp_path: Path,
                                                  capsys) -> None:
    """A multi-page TIFF was predicted from its first page only, silently: every page is predicted now, each
    exactly as the same slice saved as its own file."""
    slices = _stack(cho_eval, tmp_path / "stack")
    assert main(["predict", "--model", str(tiny_model), "--input", str(tmp_path / "stack"), "--out",
                 str(tmp_path / "p"), "--no-overlays"]) == 0
    captured = capsys.readouterr()
    summary = last_json(captured.out)
    assert summary["images"] == 5 and summary["stacks"] == {"cho.tif": 5}
    assert "every page predicted" in captured.err
    assert sorted(p.name for p in (tmp_path / "p").glob("*.png")) == [f"cho_p{k}.png" for k in range(5)]
    # the same slices as separate PNGs: the same masks
    (tmp_path / "slices").mkdir()
    for p in slices:
        shutil.copy(p, tmp_path / "slices" / p.name)
    assert main(["predict", "--model", str(tiny_model), "--input", str(tmp_path / "slices"), "--out",
                 str(tmp_path / "q"), "--no-overlays"]) == 0
    for k, p in enumerate(slices):
        page = np.asarray(Image.open(tmp_path / "p" / f"cho_p{k}.png"))
        assert np.array_equal(page, np.asarray(Image.open(tmp_path / "q" / f"{p.stem}.png"))), k
    # a file named like a page's output would be overwritten: refused before anything is written
    shutil.copy(slices[0], tmp_path / "stack" / "cho_p1.png")
    capsys.readouterr()
    assert main(["predict", "--model", str(tiny_model), "--input", str(tmp_path / "stack"), "--out",
                 str(tmp_path / "r")]) == EXIT_USER
    assert "'cho.tif page 1' and 'cho_p1.png' would both write cho_p1.png" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


def test_evaluate_refuses_a_tiff_stack_in_a_labeled_folder(tiny_model: Path, cho_eval: Path, tmp_path: Path,
                                                           capsys) -> None:
    """A stack's first page was scored against its one mask, silently: one line now, with how to split it."""
    folder = tmp_path / "labeled"
    slices = _stack(cho_eval, folder / "images")
    (folder / "masks").mkdir()
    shutil.copy(cho_eval / "masks" / slices[0].name, folder / "masks" / "cho.png")
    shutil.copy(cho_eval / "classes.json", folder / "classes.json")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(folder), "--out", str(out),
                 "--baselines", "none"]) == EXIT_USER
    err = capsys.readouterr().err
    assert "is a TIFF stack of 5 pages, but a labeled image is one frame with one mask" in error_line(err)
    assert "fix: split the stack into one image per page" in err and "Traceback" not in err
    assert not out.exists()


def test_tiff_masks_score_like_their_pngs_and_a_mask_stack_is_refused(tiny_model: Path, cho_eval: Path,
                                                                     tmp_path: Path, capsys) -> None:
    """Masks had to be PNG (a TIFF class mask, as microscopy tools write them, was 'has no mask'): 8- and 16-bit
    single-page TIFF masks now score exactly like the same masks as PNG; a multi-page TIFF mask (only its first page
    would be read) and two masks for one stem are one line each."""
    stems = sorted(p.stem for p in (cho_eval / "images").glob("cho_t14_z*.png"))[:3]

    def folder(name: str, mask_suffix: str, dtype: type = np.uint8) -> Path:
        d = tmp_path / name
        (d / "images").mkdir(parents=True)
        (d / "masks").mkdir()
        shutil.copy(cho_eval / "classes.json", d / "classes.json")
        for stem in stems:
            shutil.copy(cho_eval / "images" / f"{stem}.png", d / "images" / f"{stem}.png")
            mask = np.asarray(Image.open(cho_eval / "masks" / f"{stem}.png")).astype(dtype)
            if mask_suffix == ".png":
                shutil.copy(cho_eval / "masks" / f"{stem}.png", d / "masks" / f"{stem}.png")
            else:
                tifffile.imwrite(d / "masks" / f"{stem}{mask_suffix}", mask)
        return d

    def evaluate(d: Path) -> dict:
        out = tmp_path / f"eval-{d.name}"
        assert main(["evaluate", "--model", str(tiny_model), "--data", str(d), "--out", str(out),
                     "--baselines", "none"]) == 0
        return json.loads((out / "metrics.json").read_text())["overall"]

    png = evaluate(folder("png", ".png"))
    assert evaluate(folder("tif8", ".tif")) == png
    assert evaluate(folder("tif16", ".TIFF", np.uint16)) == png  # 16 bit, upper-case suffix
    # a stack as one image's mask
    d = folder("stack", ".png")
    (d / "masks" / f"{stems[0]}.png").unlink()
    with tifffile.TiffWriter(d / "masks" / f"{stems[0]}.tif") as tw:
        for stem in stems:
            tw.write(np.asarray(Image.open(cho_eval / "masks" / f"{stem}.png")), contiguous=False)
    capsys.readouterr()
    out = tmp_path / "eval-refused"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(d), "--out", str(out),
                 "--baselines", "none"]) == EXIT_USER
    err = capsys.readouterr().err
    assert f"mask '{d / 'masks' / stems[0]}.tif' is a TIFF stack of 3 pages" in error_line(err), err
    assert "fix: save one single-page mask per image" in err and not out.exists()
    # two masks for one stem
    d = folder("two", ".png")
    shutil.copy(d / "masks" / f"{stems[1]}.png", d / "masks" / f"{stems[1]}.tif")
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(d), "--out", str(out),
                 "--baselines", "none"]) == EXIT_USER
    assert f"'{stems[1]}.png' and '{stems[1]}.tif' in '{d / 'masks'}' are two masks for the stem" in error_line(
        capsys.readouterr().err)
    # a JPEG mask (lossy: ids change at every edge) is named as found and why it is not read
    d = folder("jpeg", ".png")
    (d / "masks" / f"{stems[2]}.png").unlink()
    Image.open(cho_eval / "masks" / f"{stems[2]}.png").save(d / "masks" / f"{stems[2]}.jpg")
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(d), "--out", str(out),
                 "--baselines", "none"]) == EXIT_USER
    line = error_line(capsys.readouterr().err)
    assert f"found {stems[2]}.jpg: JPEG masks are not read (lossy" in line, line


# ------------------------------------------------------------------------------- class tables that lose pixels
def _cho_folder(cho_eval: Path, d: Path, scale: int = 1, classes: dict | None = None) -> Path:
    """Three CHO frames with their masks times ``scale`` (255: binary masks saved as 0/255) and ``classes``
    as classes.json (None: no class table)."""
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    for p in sorted((cho_eval / "images").glob("cho_t14_z*.png"))[:3]:
        shutil.copy(p, d / "images" / p.name)
        m = np.asarray(Image.open(cho_eval / "masks" / p.name)).astype(np.uint8) * scale
        Image.fromarray(m).save(d / "masks" / p.name)
    if classes is not None:
        (d / "classes.json").write_text(json.dumps(classes))
    return d


def test_masks_and_class_tables_that_would_ignore_or_misname_pixels_are_one_line(tiny_model: Path, tiny_dataset: Path,
                                                                                cho_eval: Path, tmp_path: Path,
                                                                                capsys) -> None:
    """Binary masks saved as 0/255 (255 = the default ignore_index) scored nucleus IoU 0 and trained on nothing, exit
    0; listing {"id": 255} in classes.json did not help (the ignore value overwrote the class); a repeated id or
    name in classes.json let the last entry win. Each is one line now, in evaluate, fine-tuning and probe alike;
    the documented fix (another ignore_index) scores the 0/255 masks exactly like the 0/1 ones."""
    def evaluate(d: Path) -> int:
        return main(["evaluate", "--model", str(tiny_model), "--data", str(d), "--out", str(tmp_path / f"e-{d.name}"),
                     "--baselines", "none"])

    binary = _cho_folder(cho_eval, tmp_path / "binary", 255)
    for argv in (None, ["finetune", str(TINY), "--steps", "1", "--synthetic", str(tiny_dataset), "--real", str(binary),
                        "--out", str(tmp_path / "f")]):
        capsys.readouterr()
        assert (evaluate(binary) if argv is None else main(argv)) == EXIT_USER
        err = capsys.readouterr().err
        assert f"the masks of '{binary}' hold only the values 0 and 255, and 255 is the ignore_index" in error_line(err)
        assert "fix: save the foreground as its class id" in err and "Traceback" not in err
    from pretrain.config import ProbeConfig
    from pretrain.probe import load_frames
    from segfactory.errors import UserError

    with pytest.raises(UserError, match="hold only the values 0 and 255"):
        load_frames(binary, ProbeConfig(), 1)

    table = {"classes": [{"id": 0, "name": "background"}, {"id": 255, "name": "nucleus"}]}
    on_ignore = _cho_folder(cho_eval, tmp_path / "on-ignore", 255, table)
    assert evaluate(on_ignore) == EXIT_USER
    assert "class 'nucleus' has the id 255, which is also the ignore_index" in error_line(capsys.readouterr().err)
    fixed = _cho_folder(cho_eval, tmp_path / "fixed", 255, {**table, "ignore_index": 254})
    plain = _cho_folder(cho_eval, tmp_path / "plain", 1, {"classes": [{"id": 0, "name": "background"},
                                                                      {"id": 1, "name": "nucleus"}]})
    assert evaluate(fixed) == 0 and evaluate(plain) == 0
    scores = [json.loads((tmp_path / f"e-{n}" / "metrics.json").read_text())["overall"]["per_class"]["nucleus"]
              for n in ("fixed", "plain")]
    assert scores[0] == scores[1] and scores[0]["gt_pixels"] > 0

    repeated_id = {"classes": [{"id": 0, "name": "background"}, {"id": 1, "name": "nucleus"},
                               {"id": 1, "name": "debris"}]}
    assert evaluate(_cho_folder(cho_eval, tmp_path / "rid", 1, repeated_id)) == EXIT_USER
    assert "classes[2] ('debris') repeats the id 1 of classes[1] ('nucleus')" in error_line(capsys.readouterr().err)
    repeated_name = {"classes": [{"id": 0, "name": "background"}, {"id": 1, "name": "nucleus"},
                                 {"id": 2, "name": "nucleus"}]}
    assert evaluate(_cho_folder(cho_eval, tmp_path / "rname", 1, repeated_name)) == EXIT_USER
    assert "classes[2] (id 2) repeats the name 'nucleus' of classes[1] (id 1)" in error_line(capsys.readouterr().err)


def test_export_takes_a_run_directory_like_evaluate_and_predict(tiny_model: Path, tmp_path: Path, capsys) -> None:
    """`export --model RUN` said "'RUN' is a training run, not a model dir"; evaluate and predict accept it."""
    run = tiny_model.parent
    capsys.readouterr()
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "exported")]) == 0
    captured = capsys.readouterr()
    assert f"using model dir '{tiny_model}' of the run '{run}'" in " ".join(captured.err.split())
    assert last_json(captured.out)["model_dir"] == str(tmp_path / "exported")
    assert (tmp_path / "exported" / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_two_remaps_of_one_class_are_refused(tiny_model: Path, cho_eval: Path, tmp_path: Path, capsys) -> None:
    """`--remap nucleus=nucleus --remap nucleus=ignore` was accepted and the last one won, silently."""
    out = tmp_path / "e"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(cho_eval), "--out", str(out), "--baselines",
                 "none", "--remap", "nucleus=nucleus", "--remap", "nucleus=ignore"]) == EXIT_USER
    assert ("--remap maps 'nucleus' twice: --remap nucleus=nucleus and --remap nucleus=ignore"
            in error_line(capsys.readouterr().err)) and not out.exists()


def test_show_writes_the_format_its_out_name_says(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    """`show --out sheet.jpg` wrote PNG bytes into the .jpg; a name that is no picture format is one line."""
    assert main(["show", str(tiny_dataset), "--out", str(tmp_path / "sheet.jpg"), "--frames", "2"]) == 0
    with Image.open(tmp_path / "sheet.jpg") as im:
        assert im.format == "JPEG"
    assert main(["show", str(tiny_dataset), "--out", str(tmp_path / "sheet.PNG"), "--frames", "2"]) == 0
    with Image.open(tmp_path / "sheet.PNG") as im:
        assert im.format == "PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    capsys.readouterr()
    assert main(["show", str(tiny_dataset), "--out", str(tmp_path / "sheet.txt")]) == EXIT_USER
    assert "--out '" in error_line(capsys.readouterr().err) and not (tmp_path / "sheet.txt").exists()


# ------------------------------------------------------------------------------------------ predict --input FILE
def test_predict_input_takes_one_image_file(tiny_model: Path, cho_eval: Path, tmp_path: Path, capsys) -> None:
    """--input FILE said "input folder '...' does not exist"; one image is predicted now."""
    img = tmp_path / "in" / "cho_t14_z2.png"
    img.parent.mkdir()
    shutil.copy(cho_eval / "images" / img.name, img)
    (tmp_path / "in" / "other.png").write_bytes(img.read_bytes())  # not named: not predicted
    assert main(["predict", "--model", str(tiny_model), "--input", str(img), "--out", str(tmp_path / "p")]) == 0
    assert last_json(capsys.readouterr().out)["images"] == 1
    assert sorted(p.name for p in (tmp_path / "p").glob("*.png")) == ["cho_t14_z2.png"]
    assert (tmp_path / "p" / "overlays" / "cho_t14_z2.jpg").is_file()
    # its folder as --out would replace it with its mask: refused as for a folder
    assert main(["predict", "--model", str(tiny_model), "--input", str(img), "--out", str(img.parent)]) == EXIT_USER
    assert "--input" in error_line(capsys.readouterr().err)
    # a path that does not exist, and a file that is not an image: one line naming --input
    for bad, says in ((tmp_path / "nope.png", "does not exist"), (tmp_path / "notes.txt", "is not an image file")):
        if bad.suffix == ".txt":
            bad.write_text("hello\n")
        assert main(["predict", "--model", str(tiny_model), "--input", str(bad), "--out",
                     str(tmp_path / "x")]) == EXIT_USER
        line = error_line(capsys.readouterr().err)
        assert f"--input '{bad}' {says}" in line and "folder" not in line.split(says)[0], line
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ show --beside
def test_show_beside_skips_an_unreadable_image(tiny_dataset: Path, cho_eval: Path, tmp_path: Path, capsys) -> None:
    """One broken file in a --beside folder aborted the sheet; it is left out with a one-line note now."""
    real = tmp_path / "real"
    real.mkdir()
    for name in ("cho_t14_z0.png", "cho_t15_z0.png"):
        shutil.copy(cho_eval / "images" / name, real / name)
    (real / "cho_t14_z9.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    sheet = tmp_path / "sheet.png"
    assert main(["show", str(tiny_dataset), "--beside", str(real), "--frames", "3", "--tile", "32", "--out",
                 str(sheet)]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "skipped" in line]
    assert len(notes) == 1 and "cho_t14_z9.png" in notes[0] and "Traceback" not in err, err
    assert sheet.is_file()
    # nothing readable: one error line naming the folder, no sheet
    for p in real.glob("cho_t1[45]_z0.png"):
        p.unlink()
    sheet.unlink()
    assert main(["show", str(tiny_dataset), "--beside", str(real), "--frames", "3", "--tile", "32", "--out",
                 str(sheet)]) == EXIT_USER
    assert f"none of the 1 image(s) picked from '{real}' could be read" in error_line(capsys.readouterr().err)
    assert not sheet.exists()


# --------------------------------------------------------------------------------------- libpng's iCCP warnings
def test_png_colour_profiles_print_no_libpng_warnings(tmp_path: Path, capfd) -> None:
    """OpenCV's libpng printed 'libpng warning: iCCP: known incorrect sRGB profile' on stderr for PNGs with the
    common faulty sRGB profile (e.g. scikit-image's photos): the profile is dropped before decoding, the pixels
    are the same."""
    import cv2

    from finetune.samples import skimage_data_path
    from segfactory.formats.imagefile import cv2_imread, png_without_iccp, read_image

    with Image.open(skimage_data_path("chelsea.png")) as im:  # only its colour profile, not its pixels
        profile = im.info["icc_profile"]
    rng = np.random.default_rng(0)
    rgb, gray = rng.integers(0, 255, (24, 40, 3), np.uint8), rng.integers(0, 65535, (24, 40), np.uint16)
    Image.fromarray(rgb).save(tmp_path / "rgb.png", icc_profile=profile)
    Image.fromarray(gray).save(tmp_path / "gray16.png", icc_profile=profile)
    capfd.readouterr()
    assert cv2.imread(str(tmp_path / "rgb.png")) is not None
    assert "libpng warning: iCCP" in capfd.readouterr().err  # what the files make OpenCV's libpng say
    assert np.array_equal(read_image(tmp_path / "rgb.png"), rgb)
    assert np.array_equal(read_image(tmp_path / "gray16.png"), gray)
    assert np.array_equal(cv2_imread(tmp_path / "rgb.png", cv2.IMREAD_COLOR), rgb[..., ::-1])
    assert "libpng" not in capfd.readouterr().err
    data = (tmp_path / "rgb.png").read_bytes()
    assert b"iCCP" in data and b"iCCP" not in png_without_iccp(data)
    assert png_without_iccp(data[:20]) == data[:20] and png_without_iccp(b"GIF89a") == b"GIF89a"


# ------------------------------------------------------------------------------------- input.scale=auto
def test_scale_auto_on_labels_without_objects_says_so(data_root: Path, tmp_path: Path, capsys,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A rendered dataset whose thing class never appears: input.scale=auto stops at the estimate with one line
    saying the objects are missing from the synthetic labels (not from the predictions)."""
    from procedural import CELLS_CLASSES

    from segfactory.formats.dataset import FrameArrays, write_dataset

    monkeypatch.setenv("SEGFACTORY_DATA", str(data_root))
    rng = np.random.default_rng(0)
    frames = []
    for _ in range(4):
        sem = np.zeros((64, 64), np.uint8)
        for y, x in rng.integers(4, 50, (6, 2)):
            sem[y:y + 10, x:x + 10] = 2  # debris only (a stuff class): no nucleus anywhere
        frames.append([FrameArrays((rng.random((64, 64)) * 255).astype(np.uint8), sem, np.zeros((64, 64), np.uint16),
                                   np.full((64, 64), 1000, np.uint16), {}, {})])
    dataset = tmp_path / "no-nuclei"
    write_dataset(dataset, frames, CELLS_CLASSES, family="cells")
    out = tmp_path / "run"
    assert main(["finetune", str(TINY), "--out", str(out), "--synthetic", str(dataset), "--steps", "4",
                 "--unlabeled", "sample:ctc-cho/unlabeled", "input.scale=auto", "adapt.warmup_steps=2",
                 "train.val_every=1000"]) == EXIT_USER
    err = capsys.readouterr().err
    assert error_line(err) == ("error: input.scale=auto: no objects of the thing classes (nucleus (1)) were found "
                               "in the synthetic labels"), err
    [fix] = [line.strip() for line in err.splitlines() if line.strip().startswith("fix:")]
    assert fix.endswith("or render scenes that hold objects of those classes") and "Traceback" not in err
    assert not (out / "model").exists()


# ------------------------------------------------------------------------------------ sweep sample references
def test_sweep_real_and_test_take_sample_references(cho_eval: Path, tmp_path: Path, capsys) -> None:
    """``sweep --real sample:NAME/labeled --test sample:NAME/eval`` runs on the materialized sets (it said the
    folders did not exist); the unlabeled split is one line before any work."""
    cfg = str(CONFIGS / "finetune_sweep.yaml")
    base = ["sweep", cfg, "--real", "sample:ctc-cho/labeled", "finetune.data.synthetic=[]",
            "sweep.encoder_inits=[random]", "sweep.synthetic_fractions=[0]", "sweep.real_fractions=[1.0]",
            "finetune.train.steps=2", "finetune.train.val_every=2", "finetune.train.checkpoint_every=2"]
    assert main([*base, "--out", str(tmp_path / "s"), "--test", "sample:ctc-cho/eval"]) == 0, capsys.readouterr().err
    summary = last_json(capsys.readouterr().out)
    assert summary["runs"] == 1
    rows = list(csv.DictReader((tmp_path / "s" / "results.csv").open()))
    assert len(rows) == 1 and 0 <= float(rows[0]["test_miou"]) <= 1
    assert main([*base, "--out", str(tmp_path / "u"), "--test", "sample:ctc-cho/unlabeled"]) == EXIT_USER
    err = capsys.readouterr().err
    assert "--test[0] 'sample:ctc-cho/unlabeled' is images without masks" in error_line(err)
    assert not (tmp_path / "u").exists()
