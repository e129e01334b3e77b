"""Masked Image Consistency (``adapt.mic_ratio``, MIC of Hoyer et al. 2023) in self-training: the block mask
(ratio, block structure, seeds, the rows of a data-parallel rank), MIC's student input drawn for the global batch,
the fields' defaults staying out of dumps and bad values refused, and tiny runs: off is the run it was, on it
logs a finite MIC loss and trains differently while every other random stream stays as it was, and its resume
is bit-identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_finetune_adapt import adapt_cfg, target  # noqa: F401  (target: a module fixture used below)

from finetune.adapt import block_mask, strong_photometric
from finetune.config import AdaptConfig, FinetuneConfig, check_adapt_config
from finetune.data.normalize import standardize
from finetune.selftrain import mic_view
from segfactory.config import hash_config, load_config
from segfactory.errors import UserError

MIC_KEYS = {"mic_ratio", "mic_block", "mic_weight"}


def test_block_mask_drops_whole_blocks_at_the_ratio_and_is_a_function_of_the_seed() -> None:
    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    m = block_mask(64, 96, 100, 0.7, 16, gen(0))
    assert m.shape == (64, 1, 96, 100) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    # every 16 px block (the last column of blocks cut to 4 px) is all kept or all dropped
    for y in range(0, 96, 16):
        for x in range(0, 100, 16):
            b = m[:, :, y:y + 16, x:x + 16]
            assert torch.equal(b.amin((1, 2, 3)), b.amax((1, 2, 3)))
    blocks = m[:, 0, ::16, ::16]  # one pixel per block: 64 x 6 x 7 = 2688 draws
    dropped = 1 - float(blocks.mean())
    assert abs(dropped - 0.7) < 0.03, dropped  # binomial sd 0.009
    assert 0.6 < 1 - float(m[:, :, :, :96].mean()) < 0.8
    assert torch.equal(m, block_mask(64, 96, 100, 0.7, 16, gen(0)))
    assert not torch.equal(m, block_mask(64, 96, 100, 0.7, 16, gen(1)))
    assert torch.equal(block_mask(4, 32, 32, 0.0, 8, gen(0)), torch.ones(4, 1, 32, 32))
    one = block_mask(8, 20, 20, 0.5, 64, gen(3))  # a block larger than the image: whole images kept or dropped
    assert torch.equal(one.amin((1, 2, 3)), one.amax((1, 2, 3)))
    # a data-parallel rank's rows of the global batch's draws: 2 ranks make the single-process mask
    whole = block_mask(8, 40, 40, 0.7, 16, gen(5))
    parts = [block_mask(4, 40, 40, 0.7, 16, gen(5), rows=(4 * r, 8)) for r in (0, 1)]
    assert torch.equal(torch.cat(parts), whole)


def test_mic_view_is_the_standardised_strong_view_masked_and_drawn_for_the_global_batch() -> None:
    a = AdaptConfig(mic_ratio=0.7, mic_block=8, jitter_p=1.0, blur_p=0.5)
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    v = mic_view(x, torch.Generator().manual_seed(9), a, mean, std)
    assert v.shape == x.shape
    # the same draws in the documented order: strong view, then mask
    g = torch.Generator().manual_seed(9)
    strong = standardize(strong_photometric(x, g, a.jitter_p, a.jitter, a.blur_p, a.blur_sigma), mean, std)
    mask = block_mask(8, 32, 32, a.mic_ratio, a.mic_block, g)
    assert torch.equal(v, strong * mask)
    assert bool((v[mask.expand_as(v) == 0] == 0).all()) and 0.5 < float((mask == 0).float().mean()) < 0.9
    parts = [mic_view(x[4 * r:4 * r + 4], torch.Generator().manual_seed(9), a, mean, std, rows=(4 * r, 8))
             for r in (0, 1)]
    assert torch.allclose(torch.cat(parts), v, atol=1e-6)
    # per-rank draws (each rank from the same generator state, for its own rows) would differ
    local = [mic_view(x[4 * r:4 * r + 4], torch.Generator().manual_seed(9), a, mean, std) for r in (0, 1)]
    assert not torch.allclose(torch.cat(local), v)


def test_mic_fields_stay_out_of_default_dumps_and_bad_values_name_the_field() -> None:
    default = FinetuneConfig()
    assert not MIC_KEYS & set(default.model_dump(mode="json")["adapt"])
    off = load_config(FinetuneConfig, None, ["adapt.mic_ratio=0", "adapt.mic_block=16", "adapt.mic_weight=1"])
    assert not MIC_KEYS & set(off.model_dump(mode="json")["adapt"]) and hash_config(off) == hash_config(default)
    on = load_config(FinetuneConfig, None, ["adapt.mic_ratio=0.7", "adapt.mic_block=12"])
    dumped = on.model_dump(mode="json")["adapt"]
    assert dumped["mic_ratio"] == 0.7 and dumped["mic_block"] == 12 and "mic_weight" not in dumped
    assert FinetuneConfig.model_validate(on.model_dump(mode="json")).adapt.mic_block == 12
    assert hash_config(on) != hash_config(default)
    for bad, field in (("adapt.mic_ratio=1", "adapt.mic_ratio"), ("adapt.mic_ratio=-0.1", "adapt.mic_ratio"),
                       ("adapt.mic_block=0", "adapt.mic_block"), ("adapt.mic_weight=-1", "adapt.mic_weight")):
        with pytest.raises(UserError, match=field.replace(".", r"\.")):
            load_config(FinetuneConfig, None, [bad])
    with pytest.raises(UserError, match=r"adapt\.enabled=false"):
        check_adapt_config(load_config(FinetuneConfig, None, ["adapt.mic_ratio=0.7", "adapt.enabled=false"]))
    # Blocks over half the crop mask whole crops or nothing: refused, naming the field, the crop and what fits.
    with pytest.raises(UserError, match=r"adapt\.mic_block=40.*augment\.crop_size=64.*mic_block to 32 or less"):
        check_adapt_config(load_config(FinetuneConfig, None, ["adapt.mic_ratio=0.7", "adapt.mic_block=40",
                                                              "augment.crop_size=64"]))
    check_adapt_config(load_config(FinetuneConfig, None, ["adapt.mic_ratio=0.7", "adapt.mic_block=32",
                                                          "augment.crop_size=64"]))
    check_adapt_config(load_config(FinetuneConfig, None, ["adapt.mic_block=40", "augment.crop_size=64"]))  # MIC off


# Self-training from step 2 of 8 with a threshold the barely trained teacher reaches (so pseudo-labels count).
BASE = ("train.steps=8", "train.checkpoint_every=3", "adapt.warmup_steps=2", "adapt.threshold=0.6",
        "train.log_every=2")
MIC = ("adapt.mic_ratio=0.7",)


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _strip(records: list[dict], drop: tuple[str, ...] = ("images_per_s",)) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in drop} for r in records]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _ckpt(run: Path) -> dict:
    from finetune.train import CHECKPOINT_FILE

    return torch.load(run / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tiny_dataset: Path, target: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # noqa: F811
    """Tiny self-training runs: without MIC, with ``adapt.mic_ratio=0`` said, with MIC at weight 0 and with MIC."""
    from finetune.train import run_finetune

    root = tmp_path_factory.mktemp("mic")
    plan = {"off": (), "zero": ("adapt.mic_ratio=0",), "weight0": (*MIC, "adapt.mic_weight=0"), "on": MIC}
    with torch.random.fork_rng(devices=[]):
        for name, extra in plan.items():
            torch.manual_seed(len(name))  # the runs do not depend on the global RNG
            run_finetune(adapt_cfg(tiny_dataset, target["unlabeled"], *BASE, *extra), root / name,
                         show_progress=False)
    return {name: root / name for name in plan}


def test_mic_off_is_the_run_it_was_and_its_config_says_nothing(runs: dict[str, Path]) -> None:
    a, b = _weights(runs["off"]), _weights(runs["zero"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _strip(_records(runs["off"])) == _strip(_records(runs["zero"]))
    for name in ("off", "zero"):
        saved = yaml.safe_load((runs[name] / "config.yaml").read_text())
        assert not MIC_KEYS & set(saved["adapt"])
        assert not any("mic_loss" in r for r in _records(runs[name]))
        assert "mic_rng" not in _ckpt(runs[name])["adapt"]
        meta = json.loads((runs[name] / "model" / "model.json").read_text())
        assert not MIC_KEYS & set(meta["lineage"]["training"]["adapt"]["settings"])
    hashes = [json.loads((runs[n] / "model" / "model.json").read_text())["lineage"]["training"]["config_hash"]
              for n in ("off", "zero")]
    assert hashes[0] == hashes[1]


def test_mic_trains_on_masked_crops_and_leaves_every_other_stream_alone(runs: dict[str, Path]) -> None:
    off, w0, on = _weights(runs["off"]), _weights(runs["weight0"]), _weights(runs["on"])
    # MIC at weight 0 runs the masked pass (its own generator, dropout salt, frozen BatchNorm statistics) and
    # changes nothing else: the same weights, running statistics, batch counters (frozen_bn_stats restores them),
    # teacher and adaptation generator as without it
    assert any(k.endswith("num_batches_tracked") for k in off)
    assert off.keys() == w0.keys() and all(torch.equal(off[k], w0[k]) for k in off)
    c_off, c_w0, c_on = _ckpt(runs["off"]), _ckpt(runs["weight0"]), _ckpt(runs["on"])
    assert torch.equal(c_off["adapt"]["rng"], c_w0["adapt"]["rng"])
    assert torch.equal(c_off["adapt"]["rng"], c_on["adapt"]["rng"])  # MIC draws nothing from it
    assert all(torch.equal(c_off["adapt"]["teacher"][k], v) for k, v in c_w0["adapt"]["teacher"].items())
    assert _strip(_records(runs["off"])) == _strip(_records(runs["weight0"]), ("images_per_s", "mic_loss"))
    # with its weight MIC trains the student
    assert not all(torch.equal(off[k], on[k]) for k in off)
    logged = [r for r in _records(runs["on"]) if "selftrain_loss" in r]
    assert [r["step"] for r in logged] == [4, 6, 8]  # self-training from step 2
    assert all(math.isfinite(r["mic_loss"]) and r["mic_loss"] > 0 for r in logged)
    assert set(c_on["adapt"]) >= {"mic_rng", "log_mic"}
    saved = yaml.safe_load((runs["on"] / "config.yaml").read_text())
    assert saved["adapt"]["mic_ratio"] == 0.7 and "mic_block" not in saved["adapt"]
    meta = json.loads((runs["on"] / "model" / "model.json").read_text())
    assert meta["lineage"]["training"]["adapt"]["settings"]["mic_ratio"] == 0.7


def test_resume_with_mic_is_exact(runs: dict[str, Path], tiny_dataset: Path, target: dict,  # noqa: F811
                                  tmp_path: Path) -> None:
    from finetune.train import run_finetune

    split = tmp_path / "split"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        first = run_finetune(adapt_cfg(tiny_dataset, target["unlabeled"], *BASE, *MIC, "train.stop_at=5"), split,
                             show_progress=False)
        assert first["finished"] is False
        ck = _ckpt(split)
        assert ck["step"] == 5 and set(ck["adapt"]) >= {"mic_rng", "log_mic"}
        torch.manual_seed(3)
        run_finetune(adapt_cfg(tiny_dataset, target["unlabeled"], *BASE, *MIC, "data.num_workers=1"), split,
                     resume=True, show_progress=False)
    a, b = _weights(runs["on"]), _weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = _ckpt(runs["on"])["adapt"], _ckpt(split)["adapt"]
    assert all(torch.equal(ta["teacher"][k], tb["teacher"][k]) for k in ta["teacher"])
    assert torch.equal(ta["mic_rng"], tb["mic_rng"]) and torch.equal(ta["rng"], tb["rng"])
    assert _strip(_records(runs["on"])) == _strip(_records(split))
    assert any("mic_loss" in r for r in _records(split))


def test_mic_with_the_instance_head_trains_the_class_logits(tiny_dataset: Path, target: dict,  # noqa: F811
                                                            tmp_path: Path) -> None:
    from finetune.train import run_finetune

    run_finetune(adapt_cfg(tiny_dataset, target["unlabeled"], "train.steps=4", "adapt.warmup_steps=2",
                           "adapt.threshold=0.6", "train.log_every=2", "instances.enabled=true",
                           "adapt.instance_pseudo=true", *MIC), tmp_path / "run", show_progress=False)
    logged = [r for r in _records(tmp_path / "run") if "mic_loss" in r]
    assert logged and all(math.isfinite(r["mic_loss"]) and math.isfinite(r["instance_pseudo_loss"]) for r in logged)
