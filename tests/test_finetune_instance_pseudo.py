"""Self-training of the instance head (``adapt.instance_pseudo``): the distance targets of a hand-made mixed batch
are exact (pasted synthetic pixels keep the synthetic target, real pixels take the teacher's map, unconfident
pixels weigh 0), the loss reaches the head, resume stays bit-identical, and the field stays out of default dumps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune_adapt import adapt_cfg, target  # noqa: F401  (target: a module fixture used below)

from finetune.adapt import pseudo_label
from finetune.config import AdaptConfig, FinetuneConfig
from finetune.selftrain import SelfTraining
from segfactory.config import hash_config, load_config
from segfactory.errors import UserError


def test_instance_pseudo_targets_of_a_hand_made_mixed_batch_are_exact() -> None:
    # Two real crops of 2 x 3 pixels, two classes; p = the teacher's probability of class 1, chosen by hand.
    p1 = torch.tensor([[[0.99, 0.50, 0.01], [0.97, 0.60, 0.999]],
                       [[0.02, 0.98, 0.55], [0.99, 0.99, 0.30]]])
    logits = torch.stack([torch.log(1 - p1), torch.log(p1)], 1)
    valid = torch.ones(2, 2, 3, dtype=torch.bool)
    valid[1, 1, 1] = False  # padding of the second crop: no content, never a target
    pl = pseudo_label(logits, 0.968, valid)
    # confident (max prob >= 0.968 and valid): crop 0 -> 0.99, 0.01, 0.97, 0.999; crop 1 -> 0.02, 0.98, 0.99
    confident = torch.tensor([[[1, 0, 1], [1, 0, 1]], [[1, 1, 0], [1, 0, 0]]], dtype=torch.bool)
    assert torch.equal(pl.confident, confident)
    quality = torch.tensor([4 / 6, 3 / 5])
    t_dist = torch.tensor([[[[2.0, -1.0, 0.5], [-3.0, 0.0, 1.5]]], [[[0.25, -0.5, 4.0], [-2.0, 3.0, 1.0]]]])
    src_target = torch.tensor([[[[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]], [[[0.7, 0.8, 0.9], [1.0, 0.0, 0.35]]]])
    src_known = torch.ones(2, 1, 2, 3, dtype=torch.bool)
    src_known[1, 0, 0, 2] = False  # a pasted pixel whose synthetic instance is unknown
    pasted = torch.tensor([[[0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0]]], dtype=torch.bool)

    target_, weight = SelfTraining.instance_pseudo_targets(t_dist, pl, (src_target, src_known), pasted)
    assert target_.shape == weight.shape == (2, 1, 2, 3)
    p, t, w, s = pasted.unsqueeze(1), target_, weight, src_target
    assert torch.equal(t[p], s[p])  # pasted: the synthetic target, bit for bit
    assert torch.equal(w[p], src_known[p].float())  # weight 1 where known, 0 where not
    assert torch.equal(t[~p], torch.sigmoid(t_dist)[~p])  # real: the teacher's distance map
    q = quality.view(2, 1, 1, 1).expand_as(w)
    real_conf = ~p & confident.unsqueeze(1)
    assert torch.allclose(w[real_conf], q[real_conf]) and w[real_conf].min() > 0
    assert torch.equal(w[~p & ~confident.unsqueeze(1)], torch.zeros(int((~p & ~confident.unsqueeze(1)).sum())))
    assert w[1, 0, 1, 1] == 1 and w[1, 0, 0, 2] == 0  # pasted over padding: a true label; unknown: none
    # Without mixing (adapt.mix=none) every pixel is the teacher's, gated by confidence.
    t0, w0 = SelfTraining.instance_pseudo_targets(t_dist, pl, (src_target, src_known), None)
    assert torch.equal(t0, torch.sigmoid(t_dist)) and torch.equal(w0 > 0, confident.unsqueeze(1))


def test_instance_pseudo_stays_out_of_default_dumps_and_needs_the_head() -> None:
    default = FinetuneConfig()
    assert "instance_pseudo" not in default.model_dump(mode="json")["adapt"]
    assert "instance_pseudo" not in AdaptConfig().model_dump()
    on = load_config(FinetuneConfig, None, ["adapt.instance_pseudo=true", "instances.enabled=true"])
    assert on.model_dump(mode="json")["adapt"]["instance_pseudo"] is True
    assert FinetuneConfig.model_validate(on.model_dump(mode="json")).adapt.instance_pseudo is True
    assert hash_config(on) != hash_config(default)
    off = load_config(FinetuneConfig, None, ["adapt.instance_pseudo=false"])
    assert hash_config(off) == hash_config(default)
    from finetune.config import check_adapt_config

    with pytest.raises(UserError, match=r"instances\.enabled=false"):
        check_adapt_config(load_config(FinetuneConfig, None, ["adapt.instance_pseudo=true"]))


def test_resume_with_instance_pseudo_labels_is_exact_and_the_head_learns_from_them(tiny_dataset: Path,
                                                                                   target: dict,  # noqa: F811
                                                                                   tmp_path: Path) -> None:
    from finetune.instances import HEAD_ATTR
    from finetune.train import CHECKPOINT_FILE, run_finetune

    base = ("train.steps=8", "train.checkpoint_every=3", "adapt.warmup_steps=2", "adapt.mix_classes=things",
            "adapt.threshold=0.6", "train.log_every=2", "instances.enabled=true")
    on = (*base, "adapt.instance_pseudo=true")
    straight, split, off = tmp_path / "straight", tmp_path / "split", tmp_path / "off"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        run_finetune(adapt_cfg(tiny_dataset, target["unlabeled"], *on), straight, show_progress=False)
        torch.manual_seed(2)
        first = run_finetune(adapt_cfg(tiny_dataset, target["unlabeled"], *on, "train.stop_at=5"), split,
                             show_progress=False)
        assert first["finished"] is False
        torch.manual_seed(3)
        run_finetune(adapt_cfg(tiny_dataset, target["unlabeled"], *on, "data.num_workers=1"), split, resume=True,
                     show_progress=False)
        run_finetune(adapt_cfg(tiny_dataset, target["unlabeled"], *base), off, show_progress=False)
    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(split / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta = torch.load(straight / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["adapt"]["teacher"]
    tb = torch.load(split / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["adapt"]["teacher"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta) and any(k.startswith(HEAD_ATTR) for k in ta)
    la = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    strip = [{k: v for k, v in r.items() if k != "images_per_s"} for r in la]
    assert strip == [{k: v for k, v in r.items() if k != "images_per_s"} for r in lb]
    inst = [r["instance_pseudo_loss"] for r in la if "instance_pseudo_loss" in r]
    assert inst and all(v > 0 for v in inst)
    # The same run without the pseudo-labels: the class stream is the same (no extra random draw), the head is not.
    c = load_file(off / "model" / "model.safetensors")
    head = [k for k in a if k.startswith(HEAD_ATTR)]
    assert head and not all(torch.equal(a[k], c[k]) for k in head)
    lc = [json.loads(x) for x in (off / "metrics.jsonl").read_text().splitlines()]
    assert not any("instance_pseudo_loss" in r for r in lc)
    meta = json.loads((straight / "model" / "model.json").read_text())
    assert meta["lineage"]["training"]["adapt"]["settings"]["instance_pseudo"] is True
