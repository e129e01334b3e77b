"""User-mistake guards of the CLI (predict, evaluate, export, finetune, pretrain, show) and the sample references
predict and finetune accept, run in-process through :func:`segfactory.cli.main` on a tiny model trained from the
NumPy dataset (no Blender): each mistake is one error line naming the option and exit code 2, and nothing is
written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS
from PIL import Image

from segfactory.cli import main
from segfactory.errors import EXIT_USER

TINY = CONFIGS / "finetune_tiny.yaml"


def images(folder: Path, n: int = 2) -> dict[str, bytes]:
    """``n`` random 64 px gray PNGs in ``folder``; their bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / f"img{i}.png")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def error_line(err: str) -> str:
    [line] = [x for x in err.splitlines() if x.startswith("error:")]
    return line


# ---------------------------------------------------------------------------------------- outputs vs inputs
def test_predict_refuses_an_out_that_would_replace_its_inputs(tiny_model: Path, tmp_path: Path, capsys) -> None:
    inp = tmp_path / "inp"
    before = images(inp)
    for out in (inp, inp / ".." / "inp", inp.parent):  # the same folder, spelled differently; its parent is fine
        rc = main(["predict", "--model", str(tiny_model), "--input", str(inp), "--out", str(out)])
        if out == inp.parent:
            assert rc == 0
            break
        assert rc == EXIT_USER
        assert "--input" in error_line(capsys.readouterr().err)
        assert {p.name: p.read_bytes() for p in inp.iterdir()} == before  # nothing replaced, nothing added
    # the overlays/ (or instances/) of an --out is refused as well: predict writes there
    rc = main(["predict", "--model", str(tiny_model), "--input", str(tmp_path / "overlays"), "--out", str(tmp_path)])
    assert rc == EXIT_USER and "overlays/" in error_line(capsys.readouterr().err)
    # predicting again into one's own output still works
    assert main(["predict", "--model", str(tiny_model), "--input", str(inp), "--out", str(tmp_path / "p")]) == 0
    assert main(["predict", "--model", str(tiny_model), "--input", str(inp), "--out", str(tmp_path / "p")]) == 0


def test_run_outputs_refuse_a_dataset_or_an_ingest_store(tiny_model: Path, tmp_path: Path, capsys) -> None:
    dataset, store = tmp_path / "ds", tmp_path / "store"
    dataset.mkdir()
    (dataset / "dataset.json").write_text("{}\n")
    (store / "shards" / "a-0").mkdir(parents=True)
    (store / "shards" / "a-0" / "images.bin").write_bytes(b"")
    (store / "config.yaml").write_text("keep: me\n")
    inp = tmp_path / "inp"
    images(inp, 1)
    commands = [["finetune", str(TINY), "--synthetic", str(tiny_model), "--steps", "1"],
                ["pretrain", str(CONFIGS / "pretrain.yaml"), "--images", str(store)],
                ["evaluate", "--model", str(tiny_model), "--data", str(dataset)],
                ["predict", "--model", str(tiny_model), "--input", str(inp)],
                ["export", "--model", str(tiny_model)]]
    for target, kind in ((dataset, "a rendered dataset"), (store, "an ingest store")):
        for cmd in commands:
            assert main([*cmd, "--out", str(target)]) == EXIT_USER, cmd
            line = error_line(capsys.readouterr().err)
            assert f"--out '{target}' holds {kind}" in line, line
    assert sorted(p.name for p in dataset.iterdir()) == ["dataset.json"]
    assert sorted(p.name for p in store.iterdir()) == ["config.yaml", "shards"]
    assert (store / "config.yaml").read_text() == "keep: me\n"


# ---------------------------------------------------------------------------------------- inference settings
@pytest.mark.parametrize("flags", [["--batch-size", "0"], ["--batch-size", "-2"], ["--tile", "0"],
                                   ["--tile", "0", "--batch-size", "0"]])
def test_zero_or_negative_tile_or_batch_size_is_refused(tiny_model: Path, tiny_dataset: Path, tmp_path: Path,
                                                        capsys, flags: list[str]) -> None:
    """A 0 used to fall back to model.json's value while predict.yaml/evaluate.yaml recorded 0."""
    inp = tmp_path / "inp"
    images(inp, 1)
    flag = flags[0]
    for cmd in (["predict", "--model", str(tiny_model), "--input", str(inp), "--out", str(tmp_path / "p")],
                ["evaluate", "--model", str(tiny_model), "--data", str(tiny_dataset), "--out", str(tmp_path / "e")]):
        assert main([*cmd, *flags]) == EXIT_USER, cmd
        assert f"{flag} {flags[1]}" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "p").exists() and not (tmp_path / "e").exists()


# ---------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("opset", ["9", "30"])
def test_export_refuses_an_opset_out_of_range_and_writes_nothing(tiny_model: Path, tmp_path: Path, capsys,
                                                                 opset: str) -> None:
    from finetune.export import MIN_OPSET, max_opset

    out = tmp_path / "new" / "e"
    assert main(["export", "--model", str(tiny_model), "--onnx", "--opset", opset, "--out", str(out)]) == EXIT_USER
    err = capsys.readouterr().err
    assert f"--opset {opset} is outside {MIN_OPSET}..{max_opset()}" in error_line(err) and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_failed_onnx_export_is_one_line_and_leaves_nothing(tiny_model: Path, tmp_path: Path, capsys,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import finetune.export

    # a parity check beyond --atol: the model dir copy used to stay in --out although the error said otherwise
    out = tmp_path / "new" / "e"
    assert main(["export", "--model", str(tiny_model), "--onnx", "--atol", "0", "--out", str(out)]) == EXIT_USER
    assert "nothing was written" in error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
    # an earlier export in --out stays as it was
    assert main(["export", "--model", str(tiny_model), "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(["export", "--model", str(tiny_model), "--onnx", "--atol", "0", "--out", str(out)]) == EXIT_USER
    assert sorted(p.name for p in out.iterdir()) == before and sorted(p.name for p in out.parent.iterdir()) == ["e"]
    # an exporter failure (opset 9 fails on the encoder's max pooling) is its reason in one line, not a traceback
    monkeypatch.setattr(finetune.export, "MIN_OPSET", 9)
    capsys.readouterr()
    assert main(["export", "--model", str(tiny_model), "--onnx", "--opset", "9", "--out", str(out)]) == EXIT_USER
    err = capsys.readouterr().err
    line = error_line(err)
    assert "the ONNX exporter cannot write" in line and "opset 9" in line and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 4, err
    assert sorted(p.name for p in out.iterdir()) == before


# ------------------------------------------------------------------------------------------------------ show
@pytest.mark.parametrize("frames", ["0", "-1"])
def test_show_refuses_fewer_than_one_frame(tiny_dataset: Path, tmp_path: Path, capsys, frames: str) -> None:
    """--frames 0 was a ValueError traceback from the contact sheet (it was checked only with --beside)."""
    sheet = tmp_path / "sheet.png"
    assert main(["show", str(tiny_dataset), "--frames", frames, "--out", str(sheet)]) == EXIT_USER
    err = capsys.readouterr().err
    assert f"--frames must be at least 1, got {frames}" in error_line(err) and "Traceback" not in err
    assert not sheet.exists()


# -------------------------------------------------------------------------------------------------- evaluate
def test_evaluate_fix_for_an_unmapped_dataset_class_is_cli_syntax(tiny_model: Path, tmp_path: Path, capsys) -> None:
    """A rendered dataset with a class the model lacks: the fix used to be `--data[0].remap: {sky: ...}`."""
    from procedural import CELLS_CLASSES, cells_scene

    from segfactory.formats.dataset import write_dataset

    classes = [{**c, "name": "sky"} if c["name"] == "debris" else c for c in CELLS_CLASSES]
    ds = tmp_path / "ds"
    write_dataset(ds, [cells_scene(np.random.default_rng(i), 1, 64) for i in range(2)], classes, family="cells",
                  seed=0, scenes_per_shard=2, unit_m=1e-6, source={"generator": "tests/test_cli_guards.py"})
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(ds), "--out", str(out)]) == EXIT_USER
    err = capsys.readouterr().err
    assert "class 'sky' (id 2)" in error_line(err) and ".remap" not in err, err
    [fix] = [line.strip() for line in err.splitlines() if line.strip().startswith("fix:")]
    assert fix == "fix: add --remap sky=<one of background, nucleus, debris> (or --remap sky=ignore)", fix
    assert not out.exists()
    # ... and the fix works as written
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(ds), "--out", str(out), "--remap",
                 "sky=debris", "--baselines", "none"]) == 0


# ----------------------------------------------------------------------------------------- sample references
def test_predict_reads_a_sample_reference(tiny_model: Path, tmp_path: Path, capsys,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--input sample:NAME/SPLIT is materialized like evaluate's --data; of an eval split its images/ are read."""
    import json

    monkeypatch.setenv("SEGFACTORY_DATA", str(tmp_path / "data"))
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(tiny_model), "--input", "sample:ctc-cho/eval", "--out", str(out),
                 "--no-overlays"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    [split] = (tmp_path / "data" / "samples").glob("ctc-cho-*/eval")
    stems = sorted(p.stem for p in (split / "images").iterdir() if not p.name.startswith("."))
    assert summary["images"] == len(stems) > 0
    assert sorted(p.stem for p in out.glob("*.png")) == stems


def test_finetune_unlabeled_takes_a_sample_reference(tiny_dataset: Path, tmp_path: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--unlabeled sample:NAME/unlabeled is ingested once into the sample cache (it was 'does not exist')."""
    import json

    monkeypatch.setenv("SEGFACTORY_DATA", str(tmp_path / "data"))
    base = ["finetune", str(TINY), "--synthetic", str(tiny_dataset), "--steps", "2", "train.val_every=1000"]
    assert main([*base, "--out", str(tmp_path / "a"), "--unlabeled", "sample:ctc-cho/unlabeled"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    [store] = (tmp_path / "data" / "samples").glob("ctc-cho-*/unlabeled-ingested-*")
    assert (store / "index.json").is_file() and not list(store.parent.glob(".*"))
    assert str(store) in json.dumps(summary)
    # another split is not unlabeled images: one line, nothing written
    assert main([*base, "--out", str(tmp_path / "b"), "--unlabeled", "sample:ctc-cho/eval"]) == EXIT_USER
    assert "--unlabeled[0] 'sample:ctc-cho/eval' is not the unlabeled split" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "b").exists()
