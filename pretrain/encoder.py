"""The encoder SSL trains: a registered backbone's ``features_only`` timm model plus global average pooling.

Its ``body`` is exactly the module that is exported (:mod:`segfactory.formats.encoder` writes its state dict).
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.backbones import BACKBONES, BackboneSpec, create_features_model, feature_info


def build_encoder(name: str, in_chans: int) -> PooledEncoder:
    """Build a registered backbone as a pooled encoder for SSL.

    Raises:
        UserError: for an unknown backbone name (listing the valid ones).
    """
    spec = BACKBONES.get(name)
    return PooledEncoder(spec, in_chans)


class PooledEncoder(nn.Module):
    """``features_only`` timm model + global average pool of its last feature map (:meth:`feature_map` gives the
    map itself).

    Args:
        spec: The backbone.
        in_chans: Input channels (1 for single-channel domains, 3 for RGB).

    Attributes:
        body: The exported module (its state dict is ``encoder.safetensors``).
        dim: Embedding size D.
    """

    def __init__(self, spec: BackboneSpec, in_chans: int):
        super().__init__()
        self.spec = spec
        self.in_chans = in_chans
        self.body = create_features_model(spec.timm_name, in_chans, spec.timm_kwargs)
        channels, strides = feature_info(self.body)
        self.feature_channels = channels
        self.feature_strides = strides
        self.dim = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D)."""
        return self.feature_map(x).float().mean(dim=(2, 3))

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's spatial features, for dense objectives: (B, C, H, W) -> (B, D, H / s, W / s), s the
        last stride (``feature_strides[-1]``), in the autocast dtype."""
        return self.body(x)[-1]
