"""Every seeded random stream of segfactory, named in one place.

Each stream is a NumPy ``SeedSequence`` (or a ``torch.Generator`` seeded from one) over the run's base seed, the
position in the work (scene, step, epoch, ...) and a tag that keeps the streams apart. The tags' values and
positions are part of what makes datasets and runs reproducible: changing one changes every rendered dataset
or trained model that uses it, so they only ever get added, never edited.

=========================  ==========================================  ================================================
stream                     entropy (``SeedSequence`` of ...)           draws
=========================  ==========================================  ================================================
scene                      ``[seed, scene]``                           a rendered scene's sampling (``scenes``)
post-processing            ``[seed, scene, POSTPROCESS, view]``        one view's exposure/blur/noise (``synth.worker``)
pretrain order             ``[seed, PRETRAIN_ORDER, epoch]``           the permutation of one epoch's images
pretrain crop              ``[seed, PRETRAIN_CROP, position]``         a stream position's square crop
pretrain augmentation      ``[seed, PRETRAIN_AUGMENT, step, micro]``   a micro-batch's view parameters (63-bit seed)
stream unit order          ``[seed, STREAM_ORDER, epoch]``             ``data.order=stream``: one epoch's shard units
stream buffer              ``[seed, STREAM_ORDER, epoch, slot, win]``  the shuffle of one reader's window of samples
probe frames               ``[seed, PROBE_FRAMES]``                    which frames a linear probe keeps
probe batches              ``[seed, PROBE_BATCHES]``                   the probe's training batches
probe split                ``[seed, PROBE_SPLIT]``                     the probe's train/validation split
fine-tune batch counts     ``[seed, step, FINETUNE_COUNTS]``           a batch's per-source remainder slots
fine-tune epoch order      ``[seed, source, epoch, FINETUNE_ORDER]``   the permutation of a source's epoch
fine-tune window           ``[seed, step, slot, FINETUNE_WINDOW]``     a batch slot's random window
fine-tune dropout          ``[seed, step, FINETUNE_DROPOUT]``          the global torch RNG during a step's forward pass
unlabeled stream           ``[seed, FINETUNE_STREAM, epoch, ...]``     streamed real crops' unit and window order
label-efficiency frames    ``[seed, LABEL_FRAMES, set]``               which real frames ``bench transfer`` labels
=========================  ==========================================  ================================================

Streams seeded with the base seed alone: model initialisation in pretraining, fine-tuning and the probe
(``torch.manual_seed(seed)`` in a forked RNG scope), the fine-tuning augmentation generator (seeded once with
``seed``, advanced batch by batch and saved in checkpoints) and the probe head's initialisation. MoCo's
shuffled-BN permutation is seeded with :func:`moco_shuffle_seed` of the step alone (no base seed). A scene
family's extra classes get colours from ``default_rng(class id)`` (``scenes.registry``); the benchmarks and
``synth.alignment``'s check use fixed seeds of their own.
"""

from __future__ import annotations

import numpy as np

# Tags, by stream (see the table above). Pretraining and the probe put a small tag second; fine-tuning's hex
# tags come last.
POSTPROCESS = 1
PRETRAIN_ORDER = 0
PRETRAIN_CROP = 1
PRETRAIN_AUGMENT = 2
PROBE_FRAMES = 3
PROBE_BATCHES = 4
PROBE_SPLIT = 5
STREAM_ORDER = 6
FINETUNE_COUNTS = 0x5EED
FINETUNE_ORDER = 0xE90C
FINETUNE_WINDOW = 0xC209
FINETUNE_DROPOUT = 0xD209
FINETUNE_STREAM = 0x57E4
LABEL_FRAMES = 0x1ABE
# MoCo's shuffled-BN permutation: a linear function of the step.
MOCO_SHUFFLE_MULT, MOCO_SHUFFLE_ADD = 1_000_003, 17


def seed_int(*entropy: int) -> int:
    """A 64-bit integer (for ``torch.Generator.manual_seed``) from ``SeedSequence(entropy)``."""
    return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0])


def scene_rng(seed: int, scene: int) -> np.random.Generator:
    """Scene ``scene`` of a dataset with base ``seed``: independent per scene."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(scene)]))


def postprocess_rng(seed: int, scene: int, view: int) -> np.random.Generator:
    """One rendered view's post-processing noise: a frame's noise is reproducible from its record alone."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(scene), POSTPROCESS, int(view)]))


def pretrain_augment_seed(seed: int, step: int, micro: int) -> int:
    """Seed of one pretraining micro-batch's augmentation generator (63 bits)."""
    return seed_int(seed, PRETRAIN_AUGMENT, step, micro) >> 1


def dropout_seed(seed: int, step: int, salt: int = 0, rank: int = 0) -> int:
    """Seed of the global torch RNG during the forward pass of fine-tuning ``step``; ``salt`` tells apart several
    forward passes of one step (the self-training pass uses 1, MIC's masked pass 2; 0 keeps the original stream);
    ``rank`` the ranks of a data-parallel run (rank 0 keeps the single-process stream; the others draw their own
    masks)."""
    return seed_int(seed, step, FINETUNE_DROPOUT, *([salt] if salt or rank else []), *([rank] if rank else []))


def moco_shuffle_seed(step: int) -> int:
    """Seed of MoCo's shuffled-BN permutation at ``step``."""
    return MOCO_SHUFFLE_MULT * step + MOCO_SHUFFLE_ADD


def label_frames_rng(seed: int, set_key: int) -> np.random.Generator:
    """Which real frames of one set (``set_key``: a stable integer of the set's name) get labels in
    ``bench transfer``'s label-efficiency rows."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), LABEL_FRAMES, int(set_key)]))
