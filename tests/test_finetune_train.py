"""End to end on CPU: fine-tune a tiny model on ``tiny_dataset`` (cells-like frames written from NumPy in the real
dataset format), then predict, evaluate, export to ONNX, resume exactly, and every bad input the issue lists,
through the real CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune.config import FinetuneConfig, SourceSpec
from finetune.metrics import confusion_matrix, metrics_from_confusion
from finetune.samples import coins_image_and_mask, make_coins_folder, skimage_data_path
from segfactory.cli import main
from segfactory.config import load_config
from segfactory.errors import UserError
from segfactory.formats.dataset import open_dataset
from segfactory.formats.imagefile import read_image, read_mask

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / "configs" / "finetune_tiny.yaml")


def cli(capsys: pytest.CaptureFixture | None, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    if capsys is None:
        return rc, "", ""
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def trained(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny U-Net fine-tuned for 40 steps on the cells-like dataset (3 classes, 64 px)."""
    out = tmp_path_factory.mktemp("ft") / "run"
    rc = main(["finetune", TINY, "--out", str(out), "--synthetic", str(tiny_dataset), "--steps", "40",
               "train.val_every=20", "train.log_every=5"])
    assert rc == 0
    return out


def test_finetune_lifts_validation_miou_clearly_above_chance(trained: Path, tiny_dataset: Path) -> None:
    for f in ("config.yaml", "data.json", "checkpoint.pt", "metrics.jsonl", "curves.png", "summary.json",
              "model/model.safetensors", "model/model.json"):
        assert (trained / f).is_file(), f
    summary = json.loads((trained / "summary.json").read_text())
    data = json.loads((trained / "data.json").read_text())
    val_keys = {v for s in data["val"] for v in [s["name"]]}
    assert summary["finished"] and summary["steps"] == 40 and val_keys
    # Chance: the best constant prediction on the same validation frames.
    ds = open_dataset(tiny_dataset)
    from finetune.data.remap import make_targets
    from finetune.data.sources import open_source

    src = open_source(SourceSpec(path=tiny_dataset), "synthetic", make_targets(ds.classes), "train",
                      val_fraction=0.2, val_max=16)
    masks = [src.load(it)[1] for it in src.val]
    chance = max(metrics_from_confusion(sum(confusion_matrix(np.full_like(m, k), m, 3) for m in masks),
                                        ds.class_names)["miou"] for k in range(3))
    final = summary["final_val"]["overall"]
    assert final["miou"] > chance + 0.15, (final["miou"], chance)
    assert final["per_class_iou"]["nucleus"] > 0.5
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert [r["step"] for r in records if "val" in r] == [20, 40]
    meta = json.loads((trained / "model" / "model.json").read_text())
    assert meta["num_classes"] == 3 and [c["name"] for c in meta["classes"]] == ds.class_names
    assert meta["lineage"]["encoder"]["init"] == "random"
    assert meta["architecture"] == {"arch": "unet", "encoder": "test_resnet", "in_chans": 3, "num_classes": 3,
                                    "decoder_channels": 8}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8/16-bit gray and RGB inputs in PNG, TIFF and JPEG, from real photographs."""
    d = tmp_path_factory.mktemp("inputs")
    img, _ = coins_image_and_mask()  # 303 x 384: larger than a 128 px tile, so it is tiled
    cv2.imwrite(str(d / "gray8.png"), img)
    cv2.imwrite(str(d / "gray16.png"), img.astype(np.uint16) * 257)
    tifffile.imwrite(d / "rgb16.tif", np.repeat(img[..., None], 3, 2).astype(np.uint16) * 257)
    tifffile.imwrite(d / "crop8.tiff", img[:77, :91])
    astro = cv2.imread(str(skimage_data_path("astronaut.png")))
    cv2.imwrite(str(d / "rgb8.jpg"), astro[100:190, 200:333])
    cv2.imwrite(str(d / "small.png"), img[:21, :45])  # smaller than one encoder stride
    return d


def test_predict_writes_uint8_masks_of_input_size_and_overlays(trained: Path, inputs: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "pred"
    rc, stdout, err = cli(capsys, "predict", "--model", trained / "model", "--input", inputs, "--out", out,
                          "--device", "cpu")
    assert rc == 0, err
    assert json.loads(stdout)["images"] == 6
    for p in sorted(inputs.iterdir()):
        mask = np.array(Image.open(out / f"{p.stem}.png"))
        src = read_image(p)
        assert mask.dtype == np.uint8 and mask.shape == src.shape[:2], p.name
        assert mask.max() < 3
        ov = Image.open(out / "overlays" / f"{p.stem}.jpg")
        assert ov.size == (src.shape[1], src.shape[0]) and ov.mode == "RGB"
    # input.scaling=auto: the 16-bit gray and 16-bit RGB files of one photo get the same percentile stretch and
    # so the same mask; that is the 8-bit photo's mask under input.scaling=percentile (the stretch is linear),
    # and the 8-bit file itself is divided by 255.
    from finetune.models import load_model_dir
    from finetune.predict import inference_settings, predict_mask

    model, meta = load_model_dir(trained / "model")
    assert meta["input"]["scaling"] == "auto"
    tile, overlap, bs = inference_settings(meta, None, None, None)
    gray16 = np.array(Image.open(out / "gray16.png"))
    np.testing.assert_array_equal(np.array(Image.open(out / "rgb16.png")), gray16)
    img8 = read_image(inputs / "gray8.png")
    as_percentile = predict_mask(model, {**meta, "input": {**meta["input"], "scaling": "percentile"}}, img8,
                                 torch.device("cpu"), tile, overlap, bs)
    assert (as_percentile != gray16).mean() < 1e-3  # float rounding of the two stretches may flip a tie
    as_dtype = predict_mask(model, {**meta, "input": {**meta["input"], "scaling": "dtype"}}, img8,
                            torch.device("cpu"), tile, overlap, bs)
    np.testing.assert_array_equal(np.array(Image.open(out / "gray8.png")), as_dtype)


def test_model_json_records_object_sizes_and_predict_drops_only_specks(trained: Path, tiny_dataset: Path,
                                                                         inputs: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """Training measures the nuclei's size on the rendered labels (model.json ``cleanup``); ``predict
    --min-object`` relabels exactly the nucleus components under that share of it and nothing else."""
    from skimage.measure import label, regionprops

    meta = json.loads((trained / "model" / "model.json").read_text())
    spec = meta["cleanup"]
    assert spec["min_object"] == 0.25 and "min_object" not in meta["predict"] and set(spec["object_px"]) == {"1"}
    # the size over the training zoom (64 px crops of 50-100 % of a 64 px window) lies within the nuclei's own
    # range of equivalent diameters in the labels
    from finetune.scale import training_zoom

    diam = [r.equivalent_diameter_area for m in _label_masks(tiny_dataset)
            for r in regionprops(label(m == 1, connectivity=2))]
    assert min(diam) < spec["object_px"]["1"] / training_zoom(64, 64, (0.5, 1.0), None) <= max(diam)
    outs = {}
    for share in ("0", "0.9"):
        out = outs[share] = tmp_path / share
        rc, stdout, err = cli(capsys, "predict", "--model", trained / "model", "--input", inputs, "--out", out,
                              "--device", "cpu", "--no-overlays", "--min-object", share)
        assert rc == 0, err
        assert json.loads(stdout)["min_object"] == float(share)
    min_d = 0.9 * spec["object_px"]["1"] / float(meta["input"]["scale"])
    changed = 0
    for p in sorted(inputs.iterdir()):
        raw = np.array(Image.open(outs["0"] / f"{p.stem}.png"))
        clean = np.array(Image.open(outs["0.9"] / f"{p.stem}.png"))
        diff = raw != clean
        changed += int(diff.sum())
        cc = label(raw == 1, connectivity=2)
        small = [r.label for r in regionprops(cc) if 2 * np.sqrt(r.area / np.pi) < min_d]
        assert (np.isin(cc, small) == diff).all(), p.name  # exactly the small nucleus components changed
        assert (clean[diff] != 1).all()
        left = [2 * np.sqrt(r.area / np.pi) for r in regionprops(label(clean == 1, connectivity=2))]
        assert all(d >= min_d for d in left), p.name
    assert changed > 0
    rc, _, err = cli(capsys, "predict", "--model", trained / "model", "--input", inputs, "--out", tmp_path / "x",
                     "--device", "cpu", "--min-object", "1.5")
    assert rc == 2 and "--min-object 1.5 is outside 0..1" in err


def _label_masks(dataset: Path) -> list[np.ndarray]:
    return [read_mask(p) for p in sorted(dataset.glob("shards/*/semantic/*.png"))]


def test_tiling_matches_whole_image_prediction_away_from_seams(trained: Path, tiny_dataset: Path) -> None:
    from finetune.models import load_model_dir
    from finetune.predict import predict_mask

    model, meta = load_model_dir(trained / "model")
    # An in-domain image (cells-like frames, 3 x 3 of them: 192 px) the tiny model is sure about; on an
    # out-of-domain photo its unsure pixels flip with the context a tile sees, by however it happened to train.
    ds = open_dataset(tiny_dataset)
    frames = [read_image(ref.rgb) for ref in list(ds.frames())[:9]]
    img = np.vstack([np.hstack(frames[r * 3:r * 3 + 3]) for r in range(3)])
    whole = predict_mask(model, meta, img, torch.device("cpu"), 512, 0, 1)
    tiled = predict_mask(model, meta, img, torch.device("cpu"), 96, 32, 3)
    assert tiled.shape == whole.shape == img.shape[:2]
    assert (tiled == whole).mean() > 0.98, (tiled == whole).mean()


@pytest.mark.gpu
def test_tiled_prediction_keeps_the_image_and_accumulator_off_the_gpu(trained: Path) -> None:
    from finetune.models import load_model_dir
    from finetune.predict import predict_mask

    cuda = torch.device("cuda")
    model, meta = load_model_dir(trained / "model", cuda)
    img, _ = coins_image_and_mask()
    cpu_model, _ = load_model_dir(trained / "model", "cpu")
    same = predict_mask(model, meta, img, cuda, 128, 16, 4) == predict_mask(cpu_model, meta, img,
                                                                           torch.device("cpu"), 128, 16, 4)
    assert same.mean() > 0.99
    big = np.tile(img, (16, 16))  # 4848 x 6144: the (3, H, W) float32 accumulator alone is 357 MB
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    mask = predict_mask(model, meta, big, cuda, 128, 16, 4)
    assert mask.shape == big.shape
    assert torch.cuda.max_memory_allocated() - base < 100 * 2 ** 20  # tile batches only


def test_bad_tiling_is_one_clear_line_in_evaluate_and_predict(trained: Path, tiny_dataset: Path, inputs: Path,
                                                              tmp_path: Path, capsys) -> None:
    for cmd, flag, data in (("evaluate", "--data", tiny_dataset), ("predict", "--input", inputs)):
        for bad, says in ((["--tile", "100"], "--tile 100, --overlap 16"),
                          (["--overlap", "64"], "--tile 128, --overlap 64"),
                          (["--overlap", "-8"], "--overlap -8"), (["--batch-size", "-1"], "--batch-size -1")):
            rc, _, err = cli(capsys, cmd, "--model", trained / "model", flag, data, "--out", tmp_path / cmd,
                             "--device", "cpu", *bad)
            assert rc == 2 and says in err and "fix:" in err and "Traceback" not in err, (cmd, bad, err)
        assert not (tmp_path / cmd).exists()  # refused before anything is written


def test_evaluate_matches_predicted_masks_and_reports_per_source(trained: Path, tiny_dataset: Path,
                                                                 tmp_path: Path, capsys) -> None:
    coins = make_coins_folder(tmp_path / "coins", n=3, size=64, seed=9)
    out = tmp_path / "eval"
    rc, stdout, err = cli(capsys, "evaluate", "--model", trained / "model", "--data", tiny_dataset, "--data", coins,
                          "--remap", "coin=nucleus", "--out", out, "--device", "cpu")
    assert rc == 0, err
    rep = json.loads((out / "metrics.json").read_text())
    assert set(rep["sources"]) == {"cells", "coins"} and set(rep["by_kind"]) == {"synthetic", "real"}
    for f in ("confusion_cells.png", "confusion_coins.png", "confusion_overall.png", "evaluate.yaml"):
        assert (out / f).is_file()
    # Recompute the real source's confusion from `predict` outputs and the masks by hand.
    pred_dir = tmp_path / "pred"
    assert cli(capsys, "predict", "--model", trained / "model", "--input", coins / "images", "--out", pred_dir,
               "--device", "cpu")[0] == 0
    cm = np.zeros((3, 3), np.int64)
    for m in sorted((coins / "masks").iterdir()):
        gt = read_mask(m).astype(np.uint8)  # coin (1) -> nucleus (1): same id; 255 stays ignore
        cm += confusion_matrix(np.array(Image.open(pred_dir / m.name)), gt, 3)
    np.testing.assert_array_equal(np.asarray(rep["sources"]["coins"]["confusion"]), cm)
    assert rep["sources"]["coins"]["miou"] == metrics_from_confusion(cm, rep["classes"])["miou"]
    assert json.loads(stdout)["by_kind"]["synthetic"] == rep["by_kind"]["synthetic"]["miou"]


def test_onnx_export_matches_pytorch_under_onnxruntime(trained: Path, tmp_path: Path, capsys) -> None:
    import onnxruntime as ort

    from finetune.models import load_model_dir
    from finetune.predict import prepare_input

    out = tmp_path / "exported"
    rc, stdout, err = cli(capsys, "export", "--model", trained / "model", "--out", out, "--onnx")
    assert rc == 0, err
    info = json.loads(stdout)["onnx"]
    assert info["max_abs_diff"] < 1e-3 and (out / "model.onnx").is_file() and (out / "model.safetensors").is_file()
    # Independent check on another real photo and a shape the export never saw.
    model, meta = load_model_dir(out)
    img = read_image(skimage_data_path("chelsea.png"))[:160, :224]
    x = prepare_input(img, meta["input"], torch.device("cpu"))[None].numpy()
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert got.shape == ref.shape == (1, 3, 160, 224)
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=0)
    assert json.loads(sess.get_modelmeta().custom_metadata_map["segfactory.model"])["num_classes"] == 3


def test_failed_onnx_parity_is_a_user_error_and_writes_nothing(trained: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "exported"
    rc, _, err = cli(capsys, "export", "--model", trained / "model", "--out", out, "--onnx", "--atol", "1e-12")
    assert rc == 2 and "differs from PyTorch by" in err and "--atol" in err and "--opset" in err, err
    assert "Traceback" not in err and not out.exists()  # not the model dir copy either
    rc, _, err = cli(capsys, "export", "--model", trained / "model", "--onnx", "--atol", "-1")
    assert rc == 2 and "--atol -1.0 is not a number >= 0" in err


def tiny_cfg(dataset: Path, *overrides: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, TINY, [f"data.synthetic=[{{path: '{dataset}'}}]", "train.log_every=2",
                                              "train.val_every=1000", *overrides])


@pytest.mark.parametrize("arch", ["unet", "fpn", "deeplabv3plus"])
def test_resume_is_exact(arch: str, tiny_dataset: Path, tmp_path: Path) -> None:
    """FPN and DeepLabV3+ train with dropout: their masks must depend on (seed, step) only, not on the caller's
    global RNG, or an interrupted run and a resumed one part ways."""
    from finetune.train import run_finetune

    base = ("train.steps=8", "train.checkpoint_every=3", f"model.arch={arch}")
    straight = tmp_path / "straight"
    split = tmp_path / "split"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # whatever the process's global RNG holds must not matter
        run_finetune(tiny_cfg(tiny_dataset, *base), straight, show_progress=False)
        # Interrupted after step 5 (checkpoint at 3 and 5), resumed with a loader worker: same batches, same RNG.
        torch.manual_seed(2)
        first = run_finetune(tiny_cfg(tiny_dataset, *base, "train.stop_at=5"), split, show_progress=False)
        assert first == {"finished": False, "step": 5, "steps": 8, "out": str(split)}
        if arch == "unet":
            with pytest.raises(UserError, match="already holds a training run"):
                run_finetune(tiny_cfg(tiny_dataset, *base), split, show_progress=False)
            with pytest.raises(UserError, match=r"different config: train\.lr"):
                run_finetune(tiny_cfg(tiny_dataset, *base, "train.lr=0.1"), split, resume=True, show_progress=False)
        torch.manual_seed(3)
        run_finetune(tiny_cfg(tiny_dataset, *base, "data.num_workers=1"), split, resume=True, show_progress=False)
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(split / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("loss")) for r in la] == [(r["step"], r.get("loss")) for r in lb]


def test_resume_from_a_checkpoint_without_scheduler_state(tiny_dataset: Path, tmp_path: Path) -> None:
    """Checkpoints written before the learning-rate scheduler was saved resume on the same schedule."""
    from finetune.train import CHECKPOINT_FILE, run_finetune
    from segfactory.torchutil import lr_factor

    base = ("train.steps=6", "train.warmup_steps=2", "train.schedule=poly", "train.min_lr_ratio=0.1",
            "train.log_every=1")
    run_finetune(tiny_cfg(tiny_dataset, *base), tmp_path / "straight", show_progress=False)
    split = tmp_path / "split"
    run_finetune(tiny_cfg(tiny_dataset, *base, "train.stop_at=3"), split, show_progress=False)
    state = torch.load(split / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    del state["scheduler"]
    torch.save(state, split / CHECKPOINT_FILE)
    run_finetune(tiny_cfg(tiny_dataset, *base), split, resume=True, show_progress=False)
    rows = [[r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
            for d in (tmp_path / "straight", split)]
    assert [(r["step"], r["lr"], r["loss"]) for r in rows[0]] == [(r["step"], r["lr"], r["loss"]) for r in rows[1]]
    lr = tiny_cfg(tiny_dataset).train.lr
    assert [r["lr"] for r in rows[0]] == pytest.approx([lr * lr_factor(s, 6, 2, "poly", 0.9, 0.1) for s in range(6)])


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Encoder dirs in the pretraining stage's export format (weights: seeded random init)."""
    from pretrain.backbones import create_features_model
    from segfactory.formats.encoder import save_encoder

    base = tmp_path_factory.mktemp("encoders")
    out = {}
    for i, (key, name, c) in enumerate((("test_resnet", "test_resnet", 3), ("test_convnext", "test_convnext", 3),
                                         ("gray", "test_resnet", 1))):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + i)
            body = create_features_model(name, c)
        out[key] = save_encoder(base / key, body, timm_name=name, in_chans=c,
                                normalization={"mean": [0.4] * c, "std": [0.2] * c},
                                method="simclr", steps=0, data_manifest_hash=None)
    return out


def test_pretrained_encoder_is_loaded_recorded_and_kept_frozen(tiny_dataset: Path, encoders, tmp_path: Path) -> None:
    from finetune.train import run_finetune

    enc = encoders["test_resnet"]
    cfg = tiny_cfg(tiny_dataset, "model.encoder=null", f"model.encoder_dir={enc}", "train.steps=3",
                   "model.freeze_encoder_steps=3")
    run_finetune(cfg, tmp_path / "run", show_progress=False)
    meta = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert meta["lineage"]["encoder"]["init"] == "ssl" and meta["lineage"]["encoder"]["method"] == "simclr"
    assert meta["architecture"]["encoder"] == "test_resnet"
    assert meta["input"]["mean"] == [0.4, 0.4, 0.4]  # the encoder's normalisation is used
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    saved = load_file(enc / "encoder.safetensors")
    for k, v in saved.items():  # frozen for all 3 steps: weights and BatchNorm statistics untouched
        assert torch.equal(trained[f"encoder.model.{k}"], v), k
    from finetune.models import build_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the run's own init recipe: same seed, same initial decoder
        init = build_model(meta["architecture"]).state_dict()
    decoder = [k for k in trained if k.startswith("decoder.") and k.endswith("weight")]
    assert decoder and all(not torch.equal(trained[k], init[k]) for k in decoder)


def test_encoder_is_unfrozen_after_the_warm_up(tiny_dataset: Path, encoders, tmp_path: Path) -> None:
    from finetune.train import CHECKPOINT_FILE, run_finetune

    enc = encoders["test_resnet"]
    saved = load_file(enc / "encoder.safetensors")
    convs = [k for k, v in saved.items() if v.ndim == 4]
    base = ("model.encoder=null", f"model.encoder_dir={enc}", "train.steps=4", "model.freeze_encoder_steps=2")
    run_finetune(tiny_cfg(tiny_dataset, *base), tmp_path / "straight", show_progress=False)
    final = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    assert convs and all(not torch.equal(final[f"encoder.model.{k}"], saved[k]) for k in convs)
    # Stopped at the end of the warm-up the encoder is untouched; resumed, it trains exactly as without the stop.
    split = tmp_path / "split"
    run_finetune(tiny_cfg(tiny_dataset, *base, "train.stop_at=2"), split, show_progress=False)
    warm = torch.load(split / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(warm[f"encoder.model.{k}"], v) for k, v in saved.items())
    run_finetune(tiny_cfg(tiny_dataset, *base), split, resume=True, show_progress=False)
    resumed = load_file(split / "model" / "model.safetensors")
    assert all(torch.equal(resumed[k], final[k]) for k in final)


@pytest.mark.parametrize("arch", ["unet", "unetplusplus", "fpn", "deeplabv3plus", "linknet"])
def test_every_architecture_takes_a_pretrained_encoder(arch: str, encoders) -> None:
    from finetune.models import build_model, load_pretrained_encoder

    model = build_model({"arch": arch, "encoder": "test_resnet", "in_chans": 3, "num_classes": 4,
                         "decoder_channels": None if arch == "linknet" else 8})
    lineage = load_pretrained_encoder(model, encoders["test_resnet"])
    assert lineage["init"] == "ssl" and lineage["timm_name"] == "test_resnet"
    saved = load_file(encoders["test_resnet"] / "encoder.safetensors")
    state = model.encoder.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 64, 96)).shape == (1, 4, 64, 96)


# (number of state-dict entries, sha256 of the (key, shape) list) per architecture with test_resnet, 3 channels,
# 4 classes, decoder_channels 8 (linknet: None): model dirs written earlier record these architectures, and their
# weights must keep loading.
ARCH_STATE = {"unet": (152, "1924d6379b455c67"), "unetplusplus": (224, "d0128bd6311dd2e5"),
              "fpn": (121, "234cc5df2cebf2d0"), "deeplabv3plus": (151, "849d1e9028201ae3"),
              "linknet": (187, "3c4891bc3034b5c2")}


def test_architecture_records_build_the_same_state_dict_keys() -> None:
    import hashlib

    from finetune.archs import ARCHS
    from finetune.models import build_model

    assert ARCHS.names() == sorted(ARCH_STATE)
    for arch, (n, digest) in ARCH_STATE.items():
        state = build_model({"arch": arch, "encoder": "test_resnet", "in_chans": 3, "num_classes": 4,
                             "decoder_channels": None if arch == "linknet" else 8}).state_dict()
        keys = repr([(k, tuple(v.shape)) for k, v in state.items()])
        assert (len(state), hashlib.sha256(keys.encode()).hexdigest()[:16]) == (n, digest), arch
    with pytest.raises(UserError, match="linknet has no configurable decoder width"):
        build_model({"arch": "linknet", "encoder": "test_resnet", "in_chans": 3, "num_classes": 4,
                     "decoder_channels": 8})
    with pytest.raises(UserError, match="needs 5 values"):
        build_model({"arch": "unet", "encoder": "test_resnet", "in_chans": 3, "num_classes": 4,
                     "decoder_channels": [8, 8]})


@pytest.mark.parametrize("arch", ["fpn", "deeplabv3plus"])
def test_a_one_width_decoder_refuses_a_list_but_a_record_written_with_one_still_loads(arch: str,
                                                                                       tmp_path: Path) -> None:
    """``fpn`` and ``deeplabv3plus`` take one width: a longer list is refused (it used to build with its first value,
    silently). A model dir written before that check, whose ``model.json`` records such a list, loads as it was
    built: the first width (the state of ``decoder_channels: 8``)."""
    import hashlib

    from finetune.models import build_model, load_model_dir, model_meta, save_model_dir

    record = {"arch": arch, "encoder": "test_resnet", "in_chans": 3, "num_classes": 4, "decoder_channels": [8, 16]}
    with pytest.raises(UserError, match=f"model.arch={arch} takes one width, not a list of 2") as e:
        build_model(record)
    assert e.value.fix == "give one int (e.g. 8)"
    assert build_model({**record, "decoder_channels": [8]}).state_dict().keys() == \
        build_model({**record, "decoder_channels": 8}).state_dict().keys()
    old = build_model(record, strict=False)
    classes = [{"id": i, "name": f"c{i}"} for i in range(4)]
    inp = {"in_chans": 3, "scaling": "auto", "mean": [0.5] * 3, "std": [0.25] * 3, "scale": 1.0}
    save_model_dir(tmp_path / "old", old, model_meta(record, classes, 255, inp, {}, {}))
    model, meta = load_model_dir(tmp_path / "old")
    assert meta["architecture"]["decoder_channels"] == [8, 16]
    state = model.state_dict()
    keys = repr([(k, tuple(v.shape)) for k, v in state.items()])
    assert (len(state), hashlib.sha256(keys.encode()).hexdigest()[:16]) == ARCH_STATE[arch]


def test_input_channels_follow_a_gray_encoder(tiny_dataset: Path, encoders, tmp_path: Path) -> None:
    from finetune.train import Trainer

    cfg = tiny_cfg(tiny_dataset, "model.encoder=null", f"model.encoder_dir={encoders['gray']}")
    trainer = Trainer(cfg, tmp_path, show_progress=False)
    trainer.prepare(resume=False)
    assert trainer.arch["in_chans"] == 1 and trainer.input_spec["mean"] == [0.4]
    x = torch.zeros(2, 1, 64, 64)
    assert trainer.model(x).shape == (2, 3, 64, 64)
    with pytest.raises(UserError, match="takes 1 input channel"):
        Trainer(tiny_cfg(tiny_dataset, "model.in_chans=3", f"model.encoder_dir={encoders['gray']}"), tmp_path,
                show_progress=False).prepare(resume=False)


def test_encoder_of_another_architecture_is_one_clear_line(tiny_dataset: Path, encoders, tmp_path: Path,
                                                           capsys) -> None:
    rc, _, err = cli(capsys, "finetune", TINY, "--out", tmp_path / "r", "--synthetic", tiny_dataset,
                     "--encoder", encoders["test_convnext"], "--steps", "2")
    assert rc == 2
    assert "is a test_convnext but model.encoder=test_resnet" in err and "fix:" in err
    assert "Traceback" not in err


def test_bad_model_dirs_and_class_mismatches(trained: Path, tiny_dataset: Path, inputs: Path, tmp_path: Path,
                                             capsys) -> None:
    missing = tmp_path / "missing"
    shutil.copytree(trained / "model", missing)
    (missing / "model.safetensors").unlink()
    rc, _, err = cli(capsys, "predict", "--model", missing, "--input", inputs, "--out", tmp_path / "o")
    assert rc == 2 and "is missing model.safetensors" in err
    # A run dir is accepted: its model/ is used, and said.
    rc, _, err = cli(capsys, "predict", "--model", trained, "--input", inputs, "--out", tmp_path / "o")
    assert rc == 0 and f"usingmodeldir'{trained / 'model'}'" in "".join(err.split()), err

    # model.json claiming 4 classes next to 3-class weights.
    other = tmp_path / "other"
    shutil.copytree(trained / "model", other)
    meta = json.loads((other / "model.json").read_text())
    meta["num_classes"] = meta["architecture"]["num_classes"] = 4
    meta["classes"].append({"id": 3, "name": "extra", "color": [1, 2, 3]})
    (other / "model.json").write_text(json.dumps(meta))
    rc, _, err = cli(capsys, "evaluate", "--model", other, "--data", tiny_dataset, "--out", tmp_path / "e")
    assert rc == 2 and "holds weights for 3 classes but 4 are expected" in err

    # Evaluation masks whose ids the model does not know (coins folder without a class table: ids 0/1 are fine,
    # an id 7 is not): error naming the file and value.
    coins = make_coins_folder(tmp_path / "coins", n=2, size=64, seed=1)
    (coins / "classes.json").unlink()
    m = coins / "masks" / "coins_001.png"
    arr = read_mask(m)
    arr[0, 0] = 7
    cv2.imwrite(str(m), arr)
    rc, _, err = cli(capsys, "evaluate", "--model", trained / "model", "--data", coins, "--out", tmp_path / "e2")
    assert rc == 2 and "coins_001.png' holds class id(s) 7 outside its class map" in err


def test_cli_user_errors_are_one_line_with_a_fix(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    rc, _, err = cli(capsys, "finetune", TINY, "--out", tmp_path / "r", "--synthetic", tiny_dataset, "--arch", "unte")
    assert rc == 2 and "unknown architecture 'unte'; did you mean 'unet'?" in err
    rc, _, err = cli(capsys, "finetune", TINY, "--out", tmp_path / "r", "--synthetic", tiny_dataset,
                     "train.lr=-1")
    assert rc == 2 and "train.lr=-1 is invalid" in err
    rc, _, err = cli(capsys, "finetune", TINY, "--out", tmp_path / "r")
    assert rc == 2 and "no training data" in err
    rc, _, err = cli(capsys, "finetune", TINY, "--out", tmp_path / "r", "--real", tiny_dataset)
    assert rc == 2 and "pass it with --synthetic" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, "predict", "--model", tmp_path, "--input", tmp_path / "empty", "--out", tmp_path / "o")
    assert rc == 2 and "is missing model.json and model.safetensors" in err


def test_unreadable_input_image_is_a_partial_failure(trained: Path, tmp_path: Path, capsys) -> None:
    d = tmp_path / "in"
    d.mkdir()
    img, _ = coins_image_and_mask()
    cv2.imwrite(str(d / "good.png"), img[:64, :64])
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    rc, _, err = cli(capsys, "predict", "--model", trained / "model", "--input", d, "--out", tmp_path / "o")
    assert rc == 3 and "broken.jpg" in err
    assert np.array(Image.open(tmp_path / "o" / "good.png")).shape == (64, 64)


@pytest.mark.gpu
def test_training_step_on_gpu_uses_amp_and_channels_last(tiny_dataset: Path, tmp_path: Path) -> None:
    from finetune.train import run_finetune

    cfg = tiny_cfg(tiny_dataset, "train.steps=4", "train.device=cuda")
    summary = run_finetune(cfg, tmp_path / "gpu", show_progress=False)
    assert summary["amp"] in ("bfloat16", "float16") and summary["channels_last"] is True
    assert summary["device"].startswith("cuda")


def test_class_weights_auto_and_wrong_length(tiny_dataset: Path, tmp_path: Path) -> None:
    from finetune.data.remap import make_targets
    from finetune.data.sources import open_source
    from finetune.train import auto_class_weights, run_finetune

    src = open_source(SourceSpec(path=tiny_dataset), "synthetic",
                      make_targets(open_dataset(tiny_dataset).classes), "train")
    w = auto_class_weights([src], 3)
    counts = np.zeros(3)
    for it in src.train:
        m = src.load(it)[1]
        counts += np.bincount(m[m < 3], minlength=3)
    assert w.mean() == pytest.approx(1.0) and np.argmax(w) == np.argmin(counts) and np.argmin(w) == np.argmax(counts)
    with pytest.raises(UserError, match="class_weights has 2 values for 3 classes"):
        run_finetune(tiny_cfg(tiny_dataset, "train.steps=1", "train.loss.class_weights=[1, 2]"), tmp_path / "w",
                     show_progress=False)
