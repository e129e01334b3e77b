"""Data for fine-tuning: sources, class remapping, per-batch mixing and the shared input normalisation."""

from finetune.data.normalize import standardize, to_unit
from finetune.data.remap import Remap, TargetClasses, build_remap, make_targets
from finetune.data.sources import Item, Source, detect_kind, open_source, open_training_sources, resolve_targets

__all__ = [
    "Item", "Remap", "Source", "TargetClasses", "build_remap", "detect_kind", "make_targets", "open_source",
    "open_training_sources", "resolve_targets", "standardize", "to_unit",
]
