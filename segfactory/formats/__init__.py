"""On-disk formats: one module per format, used by its writer and by every reader.

- :mod:`segfactory.formats.dataset`: rendered datasets (``dataset.json``, shards, manifests, frames, COCO).
- :mod:`segfactory.formats.images`: the ingest store of unlabeled images (``segfactory ingest``'s output).
- :mod:`segfactory.formats.labeled`: real labeled folders (``images/`` + ``masks/`` [+ ``instances/``]).
- :mod:`segfactory.formats.encoder`: exported encoders (``encoder.safetensors`` + ``encoder.json``).
- :mod:`segfactory.formats.model`: fine-tuned model directories (``model.safetensors`` + ``model.json``).

Stage packages never read each other's outputs except through these modules.
"""

from __future__ import annotations

from pathlib import Path


def output_kind(path: Path) -> str | None:
    """Which segfactory data set ``path`` holds, for refusing to write another kind of output into it:
    ``"a rendered dataset"`` (``dataset.json``), ``"an ingest store"`` (``index.json`` or packed shards), else
    ``None`` (nothing, a run directory, anything else)."""
    from segfactory.formats.dataset import DATASET_FILE
    from segfactory.formats.images import INDEX_FILE, PACK_FILE, SHARDS_DIR

    if (path / DATASET_FILE).is_file():
        return "a rendered dataset"
    if (path / INDEX_FILE).is_file() or any((path / SHARDS_DIR).glob(f"*/{PACK_FILE}")):
        return "an ingest store"
    return None
