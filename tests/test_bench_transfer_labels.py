"""``segfactory bench transfer``'s label-efficiency rows: k real labeled images per eval set from frames the
eval never scores (nor their neighbours), and the supervised-on-synthetic (``supsyn``) encoder init."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from PIL import Image
from test_bench_transfer import _flat

from pipelines.bench_transfer import (
    LabelEfficiency,
    TransferBenchConfig,
    label_candidates,
    label_row_config,
    label_rows,
    pick_frames,
    row_config,
    supsyn_encoder,
    write_label_folder,
)
from segfactory.config import load_config
from segfactory.errors import UserError
from segfactory.io import sha256_file


@pytest.mark.parametrize("config", ["bench_transfer.yaml", "bench_transfer_gpu.yaml"])
def test_label_rows_differ_from_their_base_row_only_by_the_real_labels(config, tmp_path):
    cfg = load_config(TransferBenchConfig, CONFIGS / config)
    rows = label_rows(cfg)
    assert [r[0] for r in rows] == [f"real{k}-{i}" for k in (1, 5, 20) for i in ("random", "ssl", "supsyn")]
    folders = [tmp_path / "hela-k", tmp_path / "cho-k"]
    for name, k, init in rows:
        base = _flat(row_config(cfg, "ssl" if init == "ssl" else "synthetic").model_dump(mode="json"))
        now = _flat(label_row_config(cfg, k, init, folders, tmp_path / "enc").model_dump(mode="json"))
        diff = {key for key in now if base.get(key) != now[key]}
        expected = {"finetune.data.real", "finetune.data.synthetic", "finetune.data.val_fraction",
                    "finetune.train.keep_best"} | ({"finetune.model.encoder_dir"} if init == "supsyn" else set())
        assert diff == expected, name
        assert now["init"] == ("ssl" if init == "ssl" else "random")
        assert [s["path"] for s in now["finetune.data.real"]] == [str(f) for f in folders]
        assert now["finetune.data.synthetic"] == [{**now["finetune.data.synthetic"][0], "fraction": 0.0}]
        # Same budget and seeds as every other row.
        assert label_row_config(cfg, k, init, folders, tmp_path).finetune.train.model_copy(
            update={"keep_best": True}) == row_config(cfg, "synthetic").finetune.train
    # The zero-label rows do not see the new section: their stage keys stay what they were.
    other = load_config(TransferBenchConfig, CONFIGS / config, ["label_efficiency.k=[2]", "label_efficiency.seed=3"])
    for r in cfg.rows:
        assert row_config(other, r).model_dump() == row_config(cfg, r).model_dump()
    mixed = load_config(TransferBenchConfig, CONFIGS / config, ["label_efficiency.synthetic=true"])
    both = label_row_config(mixed, 1, "random", folders)
    assert both.finetune.data.synthetic == [] and sum(s.weight for s in both.finetune.data.real) == pytest.approx(1)


def test_k_images_are_disjoint_from_the_eval_frames_and_their_neighbours(tmp_path, monkeypatch):
    from segfactory.sampledata import materialize, read_manifest

    monkeypatch.setenv("SEGFACTORY_DATA", str(tmp_path / "data"))
    le = LabelEfficiency()
    for entry, name in (("sample:ctc-hela/eval", "ctc-hela"), ("sample:ctc-cho/eval", "ctc-cho")):
        pool, candidates, eval_t = label_candidates(entry, le)
        assert eval_t == list(range(14, 20))
        assert candidates and max(c["t"] for c in candidates) == 14 - le.gap - 1  # t <= 7
        eval_dir = materialize(name, "eval")["eval"]
        eval_stems = {f["stem"] for f in read_manifest(eval_dir)["frames"]}
        eval_hashes = {sha256_file(p) for p in (eval_dir / "images").iterdir()}
        picks = {k: pick_frames(candidates, k, 0, name) for k in (1, 5, 20)}
        assert picks[1] == picks[5][:1] and picks[5] == picks[20][:5]  # nested
        assert pick_frames(candidates, 5, 0, name) == picks[5]  # deterministic
        assert pick_frames(candidates, 5, 1, name) != picks[5]  # the seed decides
        assert len(picks[20]) == min(20, len(candidates))
        folder = write_label_folder(tmp_path / "out", name, pool, picks[5])
        assert write_label_folder(tmp_path / "out", name, pool, picks[5]) == folder  # reused
        images = sorted((folder / "images").iterdir())
        assert [p.stem for p in images] == sorted(f["stem"] for f in picks[5])
        assert len(list((folder / "masks").iterdir())) == 5 and (folder / "classes.json").is_file()
        assert not {p.stem for p in images} & eval_stems
        assert not {sha256_file(p) for p in images} & eval_hashes
        assert json.loads((folder / "selection.json").read_text())["frames"] == picks[5]
        assert all(np.asarray(Image.open(p)).any() for p in (folder / "masks").iterdir())  # labeled planes
    assert len(label_candidates("sample:ctc-hela/eval", le)[1]) == 8  # HeLa: t = 0..7, one plane each
    with pytest.raises(UserError, match="leaves no training frame"):
        label_candidates("sample:ctc-hela/eval", LabelEfficiency(gap=14))
    # A folder entry needs a pool, and the pool must not hold an eval image.
    eval_dir = materialize("ctc-hela", "eval")["eval"]
    with pytest.raises(UserError, match=r"label_efficiency\.pools"):
        label_candidates(str(eval_dir), le)
    with pytest.raises(UserError, match=r"image\(s\) of the eval folder"):
        label_candidates(str(eval_dir), LabelEfficiency(pools={str(eval_dir): str(eval_dir)}))


def _model_dir(path: Path, seed: int) -> Path:
    from finetune.models import build_model, model_meta, save_model_dir

    torch.manual_seed(seed)
    arch = {"arch": "unet", "encoder": "test_resnet", "in_chans": 1, "num_classes": 2, "decoder_channels": 8}
    classes = [{"id": 0, "name": "background"}, {"id": 1, "name": "nucleus"}]
    inp = {"in_chans": 1, "scaling": "auto", "mean": [0.4], "std": [0.3], "scale": 1.0}
    return save_model_dir(path, build_model(arch), model_meta(arch, classes, 255, inp, {},
                                                              {"training": {"step": 7}}))


def test_supsyn_encoder_is_the_synthetic_models_encoder_and_fine_tuning_loads_it(tmp_path):
    from finetune.models import build_model, load_model_dir, load_pretrained_encoder
    from segfactory.formats.encoder import read_encoder_meta

    src = _model_dir(tmp_path / "stages" / "finetune-abc" / "model", seed=1)
    enc = supsyn_encoder(tmp_path, src)
    assert enc.parent.name.startswith("supsyn-") and (enc.parent / "stage.json").is_file()
    assert supsyn_encoder(tmp_path, src) == enc  # a committed stage is reused
    meta = read_encoder_meta(enc)
    assert meta["method"] == "supervised" and meta["in_chans"] == 1 and meta["steps"] == 7
    assert meta["normalization"] == {"mean": [0.4], "std": [0.3]}  # the source model's own standardisation
    arch = {"arch": "unet", "encoder": "test_resnet", "in_chans": 1, "num_classes": 2, "decoder_channels": 8}
    torch.manual_seed(2)
    fresh = build_model(arch)
    before = {k: v.clone() for k, v in fresh.encoder.state_dict().items()}
    lineage = load_pretrained_encoder(fresh, enc)
    assert lineage["method"] == "supervised" and lineage["init"] == "supervised"  # not recorded as SSL
    source, _ = load_model_dir(src)
    weights = [k for k in before if k.endswith("weight")]
    assert all(torch.equal(fresh.encoder.state_dict()[k], source.encoder.state_dict()[k]) for k in before)
    assert any(not torch.equal(before[k], fresh.encoder.state_dict()[k]) for k in weights)  # not random init
