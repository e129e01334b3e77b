"""Find the model or encoder dir inside a run directory, so ``--model RUN``, ``--encoder RUN`` and
``backbone.init=RUN`` work (the one home of these layouts for the CLI and the stages).

Accepted: the dir itself; ``RUN/model`` (``RUN/encoder``), i.e. a ``segfactory finetune`` (``pretrain``) run;
``RUN/stages/finetune-*/model`` (``RUN/stages/pretrain-*/encoder``), i.e. a ``segfactory run`` output, where
the most recently written one is taken when there are several. The caller says which one was used.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL_META = "model.json"
ENCODER_META = "encoder.json"


def _find(path: Path, inner: str, meta: str, stage: str) -> tuple[Path, str | None]:
    if not path.is_dir() or (path / meta).is_file():
        return path, None
    if (path / inner / meta).is_file():
        return path / inner, f"using {inner} dir '{path / inner}' of the run '{path}'"
    found = sorted((p / inner for p in (path / "stages").glob(f"{stage}-*") if (p / inner / meta).is_file()),
                   key=lambda p: (p / meta).stat().st_mtime)
    if not found:
        return path, None
    note = f"using {inner} dir '{found[-1]}' of the pipeline run '{path}'"
    if len(found) > 1:
        note += f" (the newest of {len(found)} {stage} stages)"
    return found[-1], note


def resolve_model_dir(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``(model dir, note)``: the note names the inner dir used, ``None`` when ``path`` was taken as it is
    (also when nothing was found: loading it then gives the usual error)."""
    return _find(Path(path), "model", MODEL_META, "finetune")


def resolve_encoder_dir(path: str | os.PathLike[str]) -> tuple[Path, str | None]:
    """``(encoder dir, note)`` like :func:`resolve_model_dir` for ``encoder/`` of pretraining runs."""
    return _find(Path(path), "encoder", ENCODER_META, "pretrain")
