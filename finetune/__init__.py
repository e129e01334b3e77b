"""Segmentation fine-tuning on the synthetic + real mix: training, evaluation, prediction, export, sweeps.

Submodules (import the one you need; they import torch):

- ``finetune.config``   typed configs (:class:`~finetune.config.FinetuneConfig`, sweep config)
- ``finetune.data``     sources (synthetic shards, real labeled folders), class remapping, per-batch mixing,
                        the one image normalisation shared by training and prediction
- ``finetune.augment``  mask-safe GPU augmentation with kornia and explicit generators
- ``finetune.models``   architecture registry (smp decoders on timm encoders), model dirs, encoder loading
- ``finetune.train``    the training loop (AMP, channels_last, checkpoints, exact resume)
- ``finetune.evaluate`` confusion matrices, mIoU, per-source breakdown
- ``finetune.predict``  tiled, batched prediction writing class-id masks and overlays
- ``finetune.export``   ONNX export with onnxruntime parity check
- ``finetune.sweep``    label-efficiency sweep
- ``finetune.bench``    training-throughput benchmark
- ``finetune.samples``  small real labeled folders from sample photos shipped in installed packages
"""
