"""Audit 3 (#7, #14): saved configs re-run from any directory and record the values used; a refused run leaves no
empty --out; an evaluation's --out holds only that evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from finetune.config import FinetuneConfig
from pipelines.stages import training_key
from segfactory.cli import main
from segfactory.config import hash_config, load_config, save_resolved

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_saved_config_has_absolute_paths_and_same_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(FinetuneConfig, str(CONFIGS / "finetune_tiny.yaml"),
                      ["data.synthetic=[{path: cells}]", "data.unlabeled=[sample:cells/unlabeled]"])
    key, h = training_key(cfg), hash_config(cfg)
    save_resolved(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["data"]["synthetic"][0]["path"] == str(tmp_path / "cells")
    assert saved["data"]["unlabeled"] == ["sample:cells/unlabeled"]
    assert training_key(cfg) == key and hash_config(cfg) == h  # stage keys and hashes: the config as given


def test_evaluate_out_is_fresh_and_records_values(tiny_model: Path, tiny_dataset: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_dataset.parent)
    out = tmp_path / "ev"
    assert main(["evaluate", "--model", str(tiny_model), "--data", tiny_dataset.name, "--out", str(out)]) == 0
    rec = yaml.safe_load((out / "evaluate.yaml").read_text())
    assert rec["data"] == [str(tiny_dataset)]
    assert all(isinstance(rec[k], int) for k in ("tile", "overlap", "batch_size"))
    (out / "confusion_oldsource.png").write_bytes(b"stale")
    assert main(["evaluate", "--model", str(tiny_model), "--data", str(tiny_dataset), "--out", str(out)]) == 0
    assert not (out / "confusion_oldsource.png").exists() and (out / "metrics.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refused_inputs_leave_no_out(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("no images here")
    out = tmp_path / "pre"
    assert main(["pretrain", str(CONFIGS / "pretrain_tiny.yaml"), "--images", str(bad), "--out", str(out)]) == 2
    assert not out.exists()
    out = tmp_path / "ft"
    assert main(["finetune", str(CONFIGS / "finetune_tiny.yaml"), "--synthetic", str(bad), "--unlabeled",
                 str(bad), "--out", str(out)]) == 2
    assert not out.exists()
