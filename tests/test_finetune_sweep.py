"""Label-efficiency sweep and the training benchmark, at CPU smoke scale through the real CLI.

Data: ``tiny_dataset`` (cells-like frames: background / nucleus / debris) as synthetic data; real labeled
folders cut from scikit-image's coins photograph with Otsu-derived masks, whose ``coin`` class is remapped
onto ``nucleus`` (a real source with its own class names).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from finetune.sweep import baseline_fraction, compute_savings
from segfactory.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # 6 fine-tuning runs, then 3 re-runs
def test_sweep_table_plot_savings_and_resume(tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    from finetune.samples import make_coins_folder
    from pretrain.backbones import create_features_model
    from segfactory.formats.encoder import save_encoder

    real = make_coins_folder(tmp_path / "real", n=8, size=64, seed=11)
    test = make_coins_folder(tmp_path / "test", n=3, size=96, seed=12)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        body = create_features_model("test_resnet", 3)
    enc = save_encoder(tmp_path / "enc", body, timm_name="test_resnet", in_chans=3,
                       normalization={"mean": [0.45] * 3, "std": [0.2] * 3}, method="simclr", steps=0,
                       data_manifest_hash=None)
    out = tmp_path / "sweep"
    args = ["sweep", str(REPO / "configs" / "finetune_sweep.yaml"), "--out", str(out), "--synthetic",
            str(tiny_dataset), "--real", str(real), "--test", str(test), "--encoder", str(enc), "--steps", "6",
            "finetune.data.real=[{path: '" + str(real) + "', remap: {coin: nucleus}}]",
            "test=[{path: '" + str(test) + "', remap: {coin: nucleus}}]",
            "sweep.real_fractions=[0, 1]", "sweep.synthetic_fractions=[0, 1]", "finetune.train.batch_size=4",
            "finetune.train.log_every=3"]
    assert main(args) == 0
    cap = capsys.readouterr()
    result = json.loads(cap.out)
    assert result["runs"] == 6  # 2 inits x (syn0+real100, syn100+real0, syn100+real100)
    assert "label efficiency" in cap.err
    assert "holds no checkpoint.pt yet" not in cap.err  # fresh runs: nobody passed --resume (audit 2 #21)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["run"] for r in rows} == {f"{i}_{s}" for i in ("random", "ssl")
                                        for s in ("syn0_real100_seed0", "syn100_real0_seed0", "syn100_real100_seed0")}
    for r in rows:
        assert r["steps"] == "6" and r["batch_size"] == "4"  # matched compute
        assert 0.0 <= float(r["test_miou"]) <= 1.0
        assert int(r["real_labels"]) == (0 if r["real_fraction"] == "0.0" else 6)  # 8 minus 2 held out for val
        # 16 rendered frames = 8 scenes of 2 views; val_fraction 0.2 asks for 3 frames: 1 whole scene fits
        assert int(r["synthetic_frames"]) == (0 if r["synthetic_fraction"] == "0.0" else 14)
    assert (out / "label_efficiency.png").stat().st_size > 10_000
    ssl_meta = json.loads((out / "runs" / "ssl_syn100_real0_seed0" / "model" / "model.json").read_text())
    rnd_meta = json.loads((out / "runs" / "random_syn100_real0_seed0" / "model" / "model.json").read_text())
    assert ssl_meta["lineage"]["encoder"]["init"] == "ssl" and rnd_meta["lineage"]["encoder"]["init"] == "random"
    assert ssl_meta["architecture"] == rnd_meta["architecture"]
    # Random init differs from SSL in the weights only: both standardise inputs with the encoder's statistics.
    assert ssl_meta["input"] == rnd_meta["input"]
    assert rnd_meta["input"]["mean"] == [0.45] * 3 and rnd_meta["input"]["std"] == [0.2] * 3
    saved = json.loads((out / "results.json").read_text())["savings"]
    assert {s["run"] for s in saved} == {r["run"] for r in rows} - {"random_syn0_real100_seed0"}
    # Re-running reuses finished runs and their test scores instead of training and evaluating again.
    run = out / "runs" / "ssl_syn100_real100_seed0"
    stamp = (run / "summary.json").stat().st_mtime_ns
    test_stamp = (run / "test" / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0
    capsys.readouterr()
    assert (run / "summary.json").stat().st_mtime_ns == stamp
    assert (run / "test" / "metrics.json").stat().st_mtime_ns == test_stamp
    before = json.loads((run / "test" / "metrics.json").read_text())
    assert before["overall"]["per_class"]["nucleus"]["gt_pixels"] > 0

    # Another test spec (coins now count as debris): the runs are reused, their test scores are not.
    test_arg = next(a for a in args if a.startswith("test="))
    changed = [a.replace("coin: nucleus", "coin: debris") if a == test_arg else a for a in args]
    assert main(changed) == 0
    rows2 = json.loads(capsys.readouterr().out)
    after = json.loads((run / "test" / "metrics.json").read_text())
    assert (run / "summary.json").stat().st_mtime_ns == stamp
    assert after["key"] != before["key"] and after["overall"]["per_class"]["nucleus"]["gt_pixels"] == 0
    assert after["overall"]["per_class"]["debris"]["gt_pixels"] > before["overall"]["per_class"]["debris"]["gt_pixels"]
    assert rows2["runs"] == 6

    # Other steps into the same --out: the old runs are not passed off as runs of the new config.
    sweep_yaml = (out / "sweep.yaml").read_text()
    assert main([a.replace("6", "8") if a == "6" else a for a in args]) == 2
    err = capsys.readouterr().err
    assert "was trained with another config: train.steps was 6, now 8" in err and "new --out" in err
    assert "Traceback" not in err
    assert (run / "summary.json").stat().st_mtime_ns == stamp and (out / "sweep.yaml").read_text() == sweep_yaml


def _encoder_state(cfg_path: Path, out: Path) -> dict[str, torch.Tensor]:
    """The encoder weights a sweep run's config starts training with (step 0, built by the real trainer)."""
    import yaml

    from finetune.config import FinetuneConfig
    from finetune.train import Trainer

    cfg = FinetuneConfig.model_validate(yaml.safe_load(cfg_path.read_text()))
    trainer = Trainer(cfg, out, show_progress=False)
    trainer.prepare(resume=False)
    return {k: v.clone() for k, v in trainer.model.encoder.model.state_dict().items()}  # type: ignore[union-attr]


def test_sweep_synthetic_init_baseline_trains_once_and_fine_tunes_from_its_encoder(
        tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    from finetune.samples import make_coins_folder

    real = make_coins_folder(tmp_path / "real", n=6, size=64, seed=11)
    test = make_coins_folder(tmp_path / "test", n=2, size=64, seed=12)
    out = tmp_path / "sweep"
    args = ["sweep", str(REPO / "configs" / "finetune_sweep.yaml"), "--out", str(out), "--synthetic",
            str(tiny_dataset), "--real", str(real), "--test", str(test), "--steps", "3",
            "finetune.data.real=[{path: '" + str(real) + "', remap: {coin: nucleus}}]",
            "test=[{path: '" + str(test) + "', remap: {coin: nucleus}}]", "sweep.encoder_inits=[random, synthetic]",
            "sweep.real_fractions=[1]", "sweep.synthetic_fractions=[0]", "sweep.synthetic_init_steps=4",
            "finetune.train.batch_size=2", "finetune.train.log_every=2"]
    assert main(args) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["runs"] == 2
    rows = {r["run"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"random_syn0_real100_seed0", "synthetic_syn0_real100_seed0"}
    syn = rows["synthetic_syn0_real100_seed0"]
    assert syn["encoder_init"] == "synthetic" and syn["steps"] == "3" and syn["pretrain_steps"] == "4"
    assert syn["synthetic_frames"] == "0" and 0.0 <= float(syn["test_miou"]) <= 1.0  # real-only fine-tune
    assert rows["random_syn0_real100_seed0"]["pretrain_steps"] == "0"
    assert (out / "label_efficiency.png").stat().st_size > 10_000

    # The synthetic stage: a fine-tune on the synthetic data only, its encoder exported for the grid.
    stage = out / "synthetic_init"
    stage_data = json.loads((stage / "run" / "data.json").read_text())
    assert {s["kind"] for s in stage_data["train"] + stage_data["val"]} == {"synthetic"}
    assert json.loads((stage / "run" / "summary.json").read_text())["model_step"] == 4
    enc_meta = json.loads((stage / "encoder" / "encoder.json").read_text())
    assert enc_meta["method"] == "supervised" and enc_meta["steps"] == 4 and enc_meta["timm_name"] == "test_resnet"
    assert not list(stage.glob(".encoder.tmp-*"))
    result = json.loads((out / "results.json").read_text())
    assert result["synthetic_init"]["weights_sha256"] == enc_meta["weights_sha256"]
    lineage = json.loads((out / "runs" / "synthetic_syn0_real100_seed0" / "model" / "model.json").read_text())
    assert lineage["lineage"]["encoder"]["init"] == "supervised"
    assert lineage["lineage"]["encoder"]["weights_sha256"] == enc_meta["weights_sha256"]

    # Its first step starts from the exported weights, which differ from the random init of the same seed.
    exported = load_file(stage / "encoder" / "encoder.safetensors")
    first = _encoder_state(out / "runs" / "synthetic_syn0_real100_seed0" / "config.yaml", tmp_path / "p1")
    rand = _encoder_state(out / "runs" / "random_syn0_real100_seed0" / "config.yaml", tmp_path / "p2")
    assert set(first) == set(exported) == set(rand)
    assert all(torch.equal(first[k], exported[k]) for k in exported)
    assert not all(torch.equal(rand[k], exported[k]) for k in exported if exported[k].is_floating_point())

    # Re-running reuses the synthetic stage, its encoder and the runs.
    stamps = {p: p.stat().st_mtime_ns for p in (stage / "run" / "summary.json", stage / "encoder" / "encoder.json",
                                                out / "runs" / "synthetic_syn0_real100_seed0" / "summary.json")}
    assert main(args) == 0
    assert "already finished 4 steps" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # Other synthetic-stage steps into the same --out: refused before anything trains.
    assert main([a.replace("=4", "=5") if a.startswith("sweep.synthetic_init_steps") else a for a in args]) == 2
    err = capsys.readouterr().err
    assert "sweep run 'synthetic_init'" in err and "train.steps was 4, now 5" in err and "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # A synthetic run that started from another encoder than the stage's current export is not reused silently.
    meta_path = out / "runs" / "synthetic_syn0_real100_seed0" / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["lineage"]["encoder"]["weights_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "started from another synthetic-init encoder" in err and "Traceback" not in err


def test_sweep_refuses_axes_without_data(tmp_path: Path, capsys) -> None:
    cfg = str(REPO / "configs" / "finetune_sweep.yaml")
    assert main(["sweep", cfg, "--out", str(tmp_path / "s"), "test=[]"]) == 2
    assert "needs held-out real test data" in capsys.readouterr().err
    assert main(["sweep", cfg, "--out", str(tmp_path / "s"), "--test", str(tmp_path)]) == 2
    assert "includes 'ssl' but no pretrained encoder" in capsys.readouterr().err
    assert main(["sweep", cfg, "--out", str(tmp_path / "s"), "--test", str(tmp_path), "finetune.data.synthetic=[]",
                 "sweep.encoder_inits=[random, synthetic]", "sweep.synthetic_fractions=[0]"]) == 2
    err = capsys.readouterr().err
    assert "sweep.encoder_inits includes 'synthetic' but there is no synthetic dataset" in err
    assert "--synthetic DATASET" in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_label_equivalent_interpolates_on_the_baseline_curve() -> None:
    curve = [(0.1, 0.40), (0.3, 0.60), (1.0, 0.80)]
    assert baseline_fraction(curve, 0.50) == pytest.approx(0.2)
    assert baseline_fraction(curve, 0.70) == pytest.approx(0.3 + 0.7 / 2)
    assert baseline_fraction(curve, 0.30) == pytest.approx(0.1)
    assert baseline_fraction(curve, 0.90) is None
    rows = [{"run": f"b{f}", "synthetic_fraction": 0.0, "encoder_init": "random", "real_fraction": f, "test_miou": m}
            for f, m in curve]
    rows.append({"run": "syn", "synthetic_fraction": 1.0, "encoder_init": "random", "real_fraction": 0.1,
                 "test_miou": 0.60})
    rows.append({"run": "low", "synthetic_fraction": 1.0, "encoder_init": "ssl", "real_fraction": 0.0,
                 "test_miou": 0.35})
    s, low = compute_savings(rows)
    assert s["real_only_equivalent_fraction"] == pytest.approx(0.3) and s["labels_saved_fraction"] == pytest.approx(0.2)
    assert not s["upper_bound"]
    assert low["real_only_equivalent_fraction"] == pytest.approx(0.1) and low["upper_bound"]


def test_bench_train_prints_one_json_object_and_a_table(capsys) -> None:
    assert main(["bench", "train", "--size", "64", "--batch-sizes", "2", "--steps", "2", "--warmup", "1",
                 "--encoder", "test_resnet", "--workers", "0", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    report = json.loads(cap.out)
    assert [r["pipeline"] for r in report["results"]] == ["smp+cpu-aug", "segfactory"]
    assert all(r["images_per_s"] > 0 and r["batch_size"] == 2 for r in report["results"])
    assert report["speedup"]["2"] > 0 and report["size"] == 64
    assert "bench train" in cap.err
