"""``segfactory run`` and ``refresh`` stop before any work on inputs that cannot work: nothing rendered, nothing
trained, one line naming the field and the fix (exit code 2)."""

from __future__ import annotations

from pathlib import Path

from conftest import CONFIGS

from segfactory.cli import main


def test_run_with_a_missing_real_source_stops_before_rendering(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), f"real.src={tmp_path / 'nope'}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"source '{tmp_path / 'nope'}' does not exist" in err and "fix:" in err
    assert not list(out.glob("stages/*-*"))  # no render, test set or ingest stage


def test_refresh_with_a_missing_real_source_stops_before_rendering(tmp_path: Path, capsys) -> None:
    root = tmp_path / "r"
    assert main(["refresh", str(CONFIGS / "refresh.yaml"), "--root", str(root),
                 f"real.src={tmp_path / 'nope'}"]) == 2
    assert f"source '{tmp_path / 'nope'}' does not exist" in " ".join(capsys.readouterr().err.split())
    assert not (root / "datasets").exists()


def test_run_with_a_vit_pretrain_backbone_stops_before_rendering(tmp_path: Path, capsys) -> None:
    """Fine-tuning cannot start from a plain ViT (smp needs several strides): said before rendering and
    pretraining, not as a fine-tune stage that fails twice afterwards."""
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "init=ssl",
                 "pretrain.backbone.name=test_vit", "finetune.model.encoder=test_vit"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "pretrain.backbone.name=test_vit is a plain ViT" in err and "init=random" in err
    assert not list(out.glob("stages/*-*"))


def test_a_run_config_typo_in_eval_baselines_names_the_config_field(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / "quickstart.yaml"), "--out", str(out), "eval.baselines=otsuu"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "eval.baselines: unknown baseline 'otsuu'; did you mean 'otsu'?" in err and "--baselines" not in err
    assert not list(out.glob("stages/*-*"))


def test_finetune_resume_without_a_checkpoint_says_it_starts_at_step_0(tiny_dataset: Path, tmp_path: Path,
                                                                       capsys) -> None:
    """A pipeline's retry resumes a stage that may have died before its first checkpoint, so this is not an
    error; a user who typed the wrong --out is told."""
    from finetune.train import Trainer
    from tests.test_finetune_train import tiny_cfg

    Trainer(tiny_cfg(tiny_dataset), tmp_path / "fresh", show_progress=False).prepare(resume=True)
    assert "holds no checkpoint.pt yet; starting at step 0" in " ".join(capsys.readouterr().err.split())
