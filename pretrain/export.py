"""Loading exported encoders back into timm; the encoder directory format is :mod:`segfactory.formats.encoder`."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from segfactory.formats.encoder import check_state_fits, load_encoder


def create_timm_encoder(enc_dir: str | os.PathLike) -> tuple[dict[str, Any], nn.Module]:
    """A plain ``features_only`` timm model with the exported weights loaded strictly.

    Returns:
        ``(meta, model)``; ``model`` maps (B, in_chans, H, W) to a list of (B, C_i, H / s_i, W / s_i).
    """
    from pretrain.backbones import create_features_model

    meta, state = load_encoder(enc_dir)
    model = create_features_model(meta["timm_name"], meta["in_chans"], meta.get("timm_kwargs"))
    check_state_fits(state, model.state_dict(), meta, enc_dir, what=f"timm '{meta['timm_name']}'")
    model.load_state_dict(state, strict=True)
    return meta, model


