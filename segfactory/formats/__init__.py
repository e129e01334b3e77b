"""On-disk formats: one module per format, used by its writer and by every reader.

- :mod:`segfactory.formats.dataset`: rendered datasets (``dataset.json``, shards, manifests, frames, COCO).
- :mod:`segfactory.formats.images`: the ingest store of unlabeled images (``segfactory ingest``'s output).
- :mod:`segfactory.formats.labeled`: real labeled folders (``images/`` + ``masks/`` [+ ``instances/``]).
- :mod:`segfactory.formats.encoder`: exported encoders (``encoder.safetensors`` + ``encoder.json``).
- :mod:`segfactory.formats.model`: fine-tuned model directories (``model.safetensors`` + ``model.json``).

Stage packages never read each other's outputs except through these modules.
"""
