"""Domain-adaptation building blocks as pure torch functions on batched tensors.

Mean teacher (:func:`ema_update`), pseudo-labels with a confidence threshold and a per-image quality weight
(:func:`pseudo_label`, :func:`pixel_weights`; for the instance head's distance map
:func:`distance_pseudo_targets`), ClassMix/DACS mixing (:func:`classmix_masks`, :func:`classmix`,
:func:`classmix_distance`), strong photometric augmentation of mixed images (:func:`strong_photometric`), MIC's
random block mask (:func:`block_mask`), Fourier domain adaptation (:func:`fda`), histogram matching
(:func:`match_histograms`) and test-time augmentation (:func:`tta_probs`). They run on whatever device their inputs
are on; every random choice comes from an explicit ``torch.Generator`` (resume must be exact).

Images here are in [0, 1] (before :func:`~finetune.data.normalize.standardize`) unless said otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# ------------------------------------------------------------------------------------------ mean teacher


def ema_alpha(alpha: float, k: int) -> float:
    """Teacher momentum at the ``k``-th update (0-based): ``min(1 - 1 / (k + 1), alpha)``.

    The ramp (DAFormer's) makes update 0 a plain copy and early teachers the uniform average of the students
    so far, so the teacher is not dominated by its random or source-only start when ``alpha`` is close to 1.
    """
    return min(1.0 - 1.0 / (k + 1), alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """``teacher = alpha * teacher + (1 - alpha) * student`` for every floating-point parameter and buffer.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are copied. Both modules must have the same
    architecture; they may live on the same device only.
    """
    s_state = student.state_dict()
    for name, t in teacher.state_dict().items():
        s = s_state[name].detach()
        if t.dtype.is_floating_point:
            t.mul_(alpha).add_(s.to(t.dtype), alpha=1.0 - alpha)
        else:
            t.copy_(s)


def teacher_mode(teacher: nn.Module, norm: str) -> None:
    """Put the teacher into inference mode for labelling: dropout (and drop-path) always off.

    Args:
        norm: ``batch``: BatchNorm layers normalise with the statistics of the batch being labelled (as
            DAFormer's teacher, which stays in training mode); ``running``: with their running statistics.
    """
    teacher.eval()
    if norm == "batch":
        for m in teacher.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


@contextmanager
def frozen_bn_stats(model: nn.Module, frozen: bool = True) -> Iterator[None]:
    """Within the block, BatchNorm layers still normalise with batch statistics in training mode but do not
    update their running statistics (momentum 0) nor count the batches (``num_batches_tracked``, which a layer
    with ``momentum=None`` averages by, is restored on leaving)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if frozen else []
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    try:
        for m in bns:
            m.momentum = 0.0
        yield
    finally:
        for m, (mom, tracked) in zip(bns, saved, strict=True):
            m.momentum = mom
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace the BatchNorm running statistics by the plain average over some batches (AdaBN).

    The statistics a model normalises with at inference come from its training batches (synthetic and mixed
    crops); re-estimating them on real crops alone makes them those of the images it will be applied to. The
    weights are untouched; dropout is off during the passes.

    Args:
        model: Any module; only its ``_BatchNorm`` layers change.
        batches: Standardised (B, C, H, W) input batches on the model's device.

    Returns:
        The number of batches used (0: nothing changed).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was = model.training
    saved = [(m, m.momentum) for m in bns]
    n = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average: every batch counts equally
            m.train()
        for x in batches:
            model(x)
            n += 1
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was)
    return n


# ------------------------------------------------------------------------------------------ pseudo-labels


@dataclass
class PseudoLabels:
    """Teacher output on a batch.

    Attributes:
        labels: (B, H, W) int64 argmax class, ``ignore_index`` where not valid.
        confidence: (B, H, W) float max softmax probability.
        confident: (B, H, W) bool, confidence >= threshold (and valid).
        quality: (B,) float, share of an image's valid pixels that are confident.
        valid: (B, H, W) bool, pixels with image content.
    """

    labels: torch.Tensor
    confidence: torch.Tensor
    confident: torch.Tensor
    quality: torch.Tensor
    valid: torch.Tensor


@torch.no_grad()
def pseudo_label(logits: torch.Tensor, threshold: float, valid: torch.Tensor | None = None,
                 ignore_index: int = 255) -> PseudoLabels:
    """Hard pseudo-labels, their confidence, the confidence mask and the per-image quality.

    Args:
        logits: (B, K, H, W) teacher logits.
        threshold: tau; a pixel is confident when its max softmax probability is >= tau.
        valid: (B, H, W) bool, pixels that hold image content (padding is not labelled); default all.
        ignore_index: Label of invalid pixels.

    Returns:
        :class:`PseudoLabels`.
    """
    conf, labels = logits.float().softmax(1).max(1)
    confident = conf >= threshold
    if valid is None:
        valid = torch.ones_like(confident)
    confident &= valid
    labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    quality = confident.flatten(1).sum(1).float() / valid.flatten(1).sum(1).clamp(min=1).float()
    return PseudoLabels(labels, conf, confident, quality, valid)


def pixel_weights(pl: PseudoLabels, mode: str = "quality") -> torch.Tensor:
    """(B, H, W) float loss weights of pseudo-labelled pixels.

    Args:
        pl: From :func:`pseudo_label`.
        mode: ``quality``: every valid pixel gets its image's quality (DAFormer); ``confident``: only confident
            pixels do, the others 0.
    """
    q = pl.quality.view(-1, 1, 1).expand_as(pl.confidence)
    keep = pl.confident if mode == "confident" else pl.valid
    return torch.where(keep, q, torch.zeros_like(q))


# ------------------------------------------------------------------------------------------ ClassMix


def present_classes(labels: torch.Tensor, num_classes: int, ignore_index: int = 255,
                    candidates: list[int] | None = None) -> torch.Tensor:
    """Per image, which classes its labels hold (the ClassMix candidates).

    Args:
        labels: (B, H, W) int class ids below ``num_classes`` or ``ignore_index`` (never a candidate).
        candidates: Only these classes count (e.g. the thing classes); default all.

    Returns:
        (B, K) bool, ``K = num_classes``.
    """
    b = labels.shape[0]
    flat = labels.reshape(b, -1).long()
    keep = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    counts = torch.zeros(b, num_classes, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, torch.where(keep, flat, 0), keep.long())
    present = counts > 0
    if candidates is not None:
        allowed = torch.zeros(num_classes, dtype=torch.bool, device=labels.device)
        ids = [c for c in candidates if 0 <= c < num_classes]
        allowed[torch.as_tensor(ids, dtype=torch.long, device=labels.device)] = True
        present &= allowed
    return present


def choose_half(present: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per row, ``ceil(n / 2)`` of its ``n`` present classes at random (DACS), drawn row by row from
    ``generator``: one ``randperm(n)`` per row with ``n > 0``, indexing the present classes in ascending order.

    Data-parallel ranks call this on the global batch's rows (:func:`present_classes` gathered over ranks), so
    the generator advances as in a single process and each rank keeps its rows.

    Args:
        present: (B, K) bool, from :func:`present_classes`.

    Returns:
        (B, K) bool, the chosen classes.
    """
    chosen = torch.zeros_like(present)
    for i, row in enumerate(present):
        classes = row.nonzero().squeeze(1)
        n = int(classes.numel())
        if n == 0:
            continue
        pick = torch.randperm(n, generator=generator, device=generator.device)[: (n + n % 2) // 2]
        chosen[i, classes[pick.to(classes.device)]] = True
    return chosen


def chosen_mask(labels: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool, True where ``labels`` (B, H, W) holds a class of its row of ``chosen`` (B, K)."""
    k = chosen.shape[1]
    inside = (labels >= 0) & (labels < k)
    picked = chosen.gather(1, torch.where(inside, labels, 0).reshape(labels.shape[0], -1).long())
    return picked.reshape(labels.shape) & inside


def classmix_masks(labels: torch.Tensor, generator: torch.Generator, ignore_index: int = 255,
                   candidates: list[int] | None = None, num_classes: int | None = None) -> torch.Tensor:
    """Per image, a mask of half of the classes present in its labels (DACS: ``ceil(n / 2)`` of ``n``).

    Args:
        labels: (B, H, W) int class ids of the images to paste from; ``ignore_index`` is never chosen.
        generator: On ``labels``' device.
        candidates: Only these classes may be chosen (e.g. the thing classes); default all.
        num_classes: K (ids ``0..K-1``); default the largest id present other than ``ignore_index``, plus one.

    Returns:
        (B, H, W) bool, True where the pixel is pasted.
    """
    if num_classes is None:
        ids = labels[labels != ignore_index]
        num_classes = int(ids.max()) + 1 if ids.numel() else 0
    present = present_classes(labels, num_classes, ignore_index, candidates)
    return chosen_mask(labels, choose_half(present, generator))


def classmix(src_image: torch.Tensor, src_labels: torch.Tensor, tgt_image: torch.Tensor, tgt_labels: torch.Tensor,
             tgt_weights: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste the masked pixels of source images (with their labels) into target images.

    Args:
        src_image: (B, C, H, W) images to paste from (synthetic).
        src_labels: (B, H, W) their labels.
        tgt_image: (B, C, H, W) images to paste into (real).
        tgt_labels: (B, H, W) their pseudo-labels.
        tgt_weights: (B, H, W) loss weights of the pseudo-labels.
        mask: (B, H, W) bool, from :func:`classmix_masks` on ``src_labels``.

    Returns:
        image (B, C, H, W), labels (B, H, W), weights (B, H, W): pasted pixels take the source's image value and
        label exactly and weight 1 (their labels are true labels).
    """
    m = mask.unsqueeze(1)
    image = torch.where(m, src_image, tgt_image)
    labels = torch.where(mask, src_labels.to(tgt_labels.dtype), tgt_labels)
    weights = torch.where(mask, torch.ones_like(tgt_weights), tgt_weights)
    return image, labels, weights


@torch.no_grad()
def distance_pseudo_targets(dist_logits: torch.Tensor, pl: PseudoLabels) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's distance map as soft targets for the instance head, and their loss weights.

    A distance map has no confidence of its own, so the class pseudo-labels' confidence gates it: only pixels
    whose class pseudo-label is confident (max softmax >= tau, with content) count, with their image's quality
    as weight (:func:`pixel_weights` ``confident``); the others weigh 0.

    Args:
        dist_logits: (B, 1, H, W) teacher distance logits (:func:`finetune.instances.forward_both`).
        pl: The teacher's class pseudo-labels of the same batch (:func:`pseudo_label`).

    Returns:
        target (B, 1, H, W) float in [0, 1] (the sigmoid of the logits) and weight (B, 1, H, W) float.
    """
    return dist_logits.float().sigmoid(), pixel_weights(pl, "confident").unsqueeze(1)


def classmix_distance(src_target: torch.Tensor, src_known: torch.Tensor, tgt_target: torch.Tensor,
                      tgt_weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Carry distance targets through :func:`classmix`: pasted pixels take the source's exact target.

    ClassMix pastes whole classes, so every pasted object arrives with all its pixels and its distance to its
    own boundary (computed on the source crop) stays exact.

    Args:
        src_target: (B, 1, H, W) distance targets of the source (synthetic) crops
            (:func:`finetune.instances.batch_targets`).
        src_known: (B, 1, H, W) bool, where those targets are known.
        tgt_target: (B, 1, H, W) the teacher's targets on the real crops (:func:`distance_pseudo_targets`).
        tgt_weight: (B, 1, H, W) their weights.
        mask: (B, H, W) bool, the ClassMix mask (:func:`classmix_masks`).

    Returns:
        target (B, 1, H, W) and weight (B, 1, H, W): pasted pixels weigh 1 where the source target is known, 0
        where not; the other pixels keep the teacher's target and weight.
    """
    m = mask.unsqueeze(1)
    target = torch.where(m, src_target.to(tgt_target.dtype), tgt_target)
    weight = torch.where(m, src_known.to(tgt_weight.dtype), tgt_weight)
    return target, weight


def strong_photometric(image: torch.Tensor, generator: torch.Generator, jitter_p: float, jitter: float,
                       blur_p: float, blur_sigma: tuple[float, float],
                       rows: tuple[int, int] | None = None) -> torch.Tensor:
    """DACS's strong augmentation of mixed images: colour jitter and Gaussian blur, per image.

    Args:
        image: (B, C, H, W) in [0, 1], C = 1 or 3 (saturation and hue only act on 3 channels).
        generator: On ``image``'s device.
        jitter_p: Probability of jitter; brightness, contrast, saturation, hue factors are drawn in
            ``±jitter`` (hue in ``±jitter`` half-turns, as torchvision's ColorJitter).
        blur_p: Probability of blur; sigma uniform in ``blur_sigma``, kernel of about 10 % of the side.
        rows: ``(lo, total)``: ``image`` is rows ``lo:lo + B`` of a global batch of ``total`` (a data-parallel
            rank's share): the parameters are drawn for all ``total`` and these rows kept.

    Returns:
        (B, C, H, W) in [0, 1].
    """
    from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
    from kornia.filters import gaussian_blur2d

    b, c, h, w = image.shape
    lo, total = rows or (0, b)
    u = torch.rand(total, 7, generator=generator, device=image.device)[lo:lo + b]
    on = (u[:, 0] < jitter_p).float()
    if jitter and jitter_p:
        image = adjust_brightness(image, (2 * u[:, 1] - 1) * jitter * on)
        image = adjust_contrast(image, 1 + (2 * u[:, 2] - 1) * jitter * on)
        if c == 3:
            image = adjust_saturation(image, 1 + (2 * u[:, 3] - 1) * jitter * on)
            image = adjust_hue(image, (2 * u[:, 4] - 1) * jitter * math.pi * on)
    if blur_p:
        lo, hi = blur_sigma
        k = max(3, math.ceil(0.1 * min(h, w)) // 2 * 2 + 1)
        sigma = (lo + (hi - lo) * u[:, 5]).unsqueeze(1).expand(b, 2).contiguous()
        blurred = gaussian_blur2d(image, (k, k), sigma)
        image = torch.where((u[:, 6] < blur_p).view(b, 1, 1, 1), blurred, image)
    return image.clamp(0, 1)


# ------------------------------------------------------------------------------------ masked image consistency


def block_mask(n: int, height: int, width: int, ratio: float, block: int, generator: torch.Generator,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
    """MIC's random block mask (``BlockMaskGenerator`` of Hoyer et al. 2023): the image is tiled into ``block`` x
    ``block`` blocks from its top-left corner (the last row and column of blocks cut at the border) and each
    block is dropped with probability ``ratio``.

    MIC draws a grid of ``round(side / block)`` cells and resizes it to the image (nearest), which makes blocks
    of uneven size when ``block`` does not divide the side; here every block is exactly ``block`` pixels except
    the cut ones at the right and bottom border.

    Args:
        n: Images in the batch (this rank's rows, see ``rows``).
        height: Image height H (pixels).
        width: Image width W (pixels).
        ratio: Probability that a block is dropped, 0 <= ratio < 1 (MIC: 0.7).
        block: Block side (pixels), >= 1.
        generator: The draws' generator; the mask is on its device.
        rows: ``(lo, total)``: the mask is rows ``lo:lo + n`` of a global batch of ``total`` (a data-parallel
            rank's share): the blocks are drawn for all ``total`` images and these rows kept.

    Returns:
        (n, 1, H, W) float32, 1 where kept, 0 where dropped (multiply the standardised image by it).
    """
    lo, total = rows or (0, n)
    gh, gw = -(-height // block), -(-width // block)
    u = torch.rand(total, 1, gh, gw, generator=generator, device=generator.device)[lo:lo + n]
    keep = (u > ratio).float()  # MIC's comparison: ratio 0 keeps every block
    return keep.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :height, :width]


# ------------------------------------------------------------------------------------ appearance alignment


def fda(src: torch.Tensor, ref: torch.Tensor, beta: float, clamp: bool = True) -> torch.Tensor:
    """Fourier domain adaptation (Yang & Soatto, 2020): give ``src`` the low-frequency amplitude of ``ref``.

    The amplitude spectrum of every channel inside the square ``|fy| <= b, |fx| <= b`` (integer frequencies,
    ``b = floor(beta * min(H, W))``; ``b = 0`` is the mean alone) is replaced by the reference's; the phase
    (where the content is) stays, so labels of ``src`` remain valid.

    Args:
        src: (B, C, H, W) images to restyle.
        ref: (B, C, H, W) reference images (same shape).
        beta: Size of the swapped band; ``beta <= 0`` returns ``src`` unchanged.
        clamp: Clip the result to [0, 1].

    Returns:
        (B, C, H, W) float.
    """
    if beta <= 0:
        return src
    h, w = src.shape[-2:]
    b = math.floor(beta * min(h, w))
    fs = torch.fft.fft2(src.float())
    fr = torch.fft.fft2(ref.float())
    fy = torch.fft.fftfreq(h, 1.0 / h, device=src.device).abs() <= b
    fx = torch.fft.fftfreq(w, 1.0 / w, device=src.device).abs() <= b
    band = fy[:, None] & fx[None, :]
    amp = torch.where(band, fr.abs(), fs.abs())
    out = torch.fft.ifft2(torch.polar(amp, fs.angle())).real
    return out.clamp(0, 1) if clamp else out


def match_histograms(src: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per image and channel, map ``src``'s values onto ``ref``'s quantiles (rank-preserving).

    A pixel whose value covers the ranks ``[a, b)`` of its image (ties share one value) gets the reference's
    quantile at ``(a + b) / 2n``, linearly interpolated between the sorted reference values (sample ``j`` of
    ``m`` sits at quantile ``(j + 0.5) / m``). Without ties and with equal sizes the sorted output *is* the
    sorted reference. Pixel order, and so the labels, are untouched.

    Args:
        src: (B, C, H, W) images to restyle.
        ref: (B, C, h, w) references (any size).

    Returns:
        (B, C, H, W) with ``src``'s dtype.
    """
    b, c, h, w = src.shape
    s = src.reshape(b, c, -1).float()
    r = ref.reshape(b, c, -1).float().sort(-1).values
    n, m = s.shape[-1], r.shape[-1]
    s_sorted, order = s.sort(dim=-1, stable=True)
    lo = torch.searchsorted(s_sorted.contiguous(), s_sorted.contiguous(), right=False)
    hi = torch.searchsorted(s_sorted.contiguous(), s_sorted.contiguous(), right=True)
    pos = ((lo + hi).float() / (2 * n) * m - 0.5).clamp(0, m - 1)
    j0 = pos.floor().long()
    j1 = (j0 + 1).clamp(max=m - 1)
    t = pos - j0.float()
    mapped = r.gather(-1, j0) * (1 - t) + r.gather(-1, j1) * t
    out = torch.empty_like(s).scatter_(-1, order, mapped)
    return out.reshape(b, c, h, w).to(src.dtype)


def align_batch(src: torch.Tensor, ref: torch.Tensor, generator: torch.Generator, fda_beta: float, fda_p: float,
                hist_p: float, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Move synthetic crops toward random real crops: FDA and/or histogram matching, each with a probability.

    Args:
        src: (B, C, S, S) synthetic crops in [0, 1].
        ref: (R, C, S, S) real crops in [0, 1] (R >= 1); each synthetic crop gets a random one.
        generator: On ``src``'s device.
        rows: ``(lo, total)``: ``src`` is rows ``lo:lo + B`` of a global batch of ``total`` (a data-parallel
            rank's share; ``ref`` is then the global batch's real crops): the draws are made for all ``total``
            and these rows kept.

    Returns:
        (B, C, S, S) in [0, 1].
    """
    b = src.shape[0]
    lo, total = rows or (0, b)
    u = torch.rand(total, 2, generator=generator, device=src.device)[lo:lo + b]
    pick = torch.randint(0, ref.shape[0], (total,), generator=generator, device=src.device)[lo:lo + b]
    r = ref[pick.to(ref.device)].to(src.device)
    if fda_beta > 0 and fda_p > 0:
        src = torch.where((u[:, 0] < fda_p).view(b, 1, 1, 1), fda(src, r, fda_beta), src)
    if hist_p > 0:
        src = torch.where((u[:, 1] < hist_p).view(b, 1, 1, 1), match_histograms(src, r), src)
    return src


# ------------------------------------------------------------------------------------ test-time augmentation

# (k quarter turns, horizontal flip first) of each dihedral transform used by a TTA mode.
TTA_MODES: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flip": ((0, False), (0, True), (2, True), (2, False)),  # identity, h-flip, v-flip, both
    "d4": tuple((k, f) for k in range(4) for f in (False, True)),  # + the quarter turns: all 8
    "hflip": ((0, False), (0, True)),  # identity and the mirror image: ms_flip's, per scale
}
# Multi-scale modes (:func:`finetune.predict.predict_image_probs`): the whole image is predicted at each ratio of
# its input scale and the class probabilities, resized back, are averaged; mmsegmentation's default test-time
# ratios (its ``img_ratios``). ``ms_flip`` also averages the horizontal flip at every ratio (mmseg's ``flip``).
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
MS_MODES: dict[str, tuple[tuple[float, ...], str]] = {"ms": (MS_RATIOS, "none"),
                                                      "ms_flip": (MS_RATIOS, "hflip")}


def tta_apply(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Transform (..., H, W): horizontal flip (if ``flip``), then ``k`` counter-clockwise quarter turns."""
    if flip:
        x = x.flip(-1)
    return torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x


def tta_invert(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Exact inverse of :func:`tta_apply` on (..., H', W')."""
    if k % 4:
        y = torch.rot90(y, -k, dims=(-2, -1))
    return y.flip(-1) if flip else y


def tta_probs(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, mode: str = "none") -> torch.Tensor:
    """Average class probabilities over dihedral transforms of the input, each mapped back exactly.

    Args:
        predict: Maps (B, C, h, w) to probabilities (B, K, h, w) (any h, w the transforms produce: quarter
            turns swap height and width).
        x: (B, C, H, W).
        mode: ``none``, ``flip`` (identity, horizontal, vertical, both) or ``d4`` (also the quarter turns).

    Returns:
        (B, K, H, W) mean probabilities.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}")
    acc: torch.Tensor | None = None
    for k, flip in TTA_MODES[mode]:
        p = tta_invert(predict(tta_apply(x, k, flip)), k, flip)
        acc = p if acc is None else acc + p
    assert acc is not None
    return acc / len(TTA_MODES[mode])
