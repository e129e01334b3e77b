"""Self-supervised pretraining on raw image dumps.

``ingest`` turns a folder of unlabeled images into validated, deduplicated, normalized shards; ``train``
pretrains a timm encoder on them with a lightly method and kornia augmentation on the training device;
``export`` writes the encoder for the fine-tuning stage; ``probe`` measures what pretraining bought.
"""
