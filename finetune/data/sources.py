"""Data sources: rendered segfactory datasets and real labeled folders, split into train/val.

Real labeled folder layout (read by :mod:`segfactory.formats.labeled`, shared with ``segfactory probe``)::

    DIR/images/<stem>.png|.jpg|.jpeg|.tif|.tiff   gray or RGB, 8 or 16 bit
    DIR/masks/<stem>.png                          class ids (8-bit, 16-bit or palette PNG), same size
    DIR/classes.json                              optional: {"classes": [{"id", "name", "color"?}],
                                                  "ignore_index": 255}
    DIR/instances/<stem>.png                      optional: uint16 instance ids, 0 = none (instance head)

Splits are chosen by a stable hash of each frame's name (a real frame's stem; a rendered frame's scene: family,
dataset seed and scene index, so all views of a scene fall on one side and a re-render under a new render key
keeps the split), never by the training seed, so runs with different seeds validate on the same frames and a
10 % label subset is contained in the 30 % one. The validation share is exact for real folders
(``round(val_fraction * n)``, at least one frame), which matters for small ones; rendered scenes are added
whole as long as they fit in it (at least one).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from finetune.config import FinetuneConfig, SourceSpec
from finetune.data.remap import Remap, TargetClasses, build_remap, make_targets
from segfactory.errors import UserError
from segfactory.formats.imagefile import image_size, read_image, read_mask
from segfactory.formats.labeled import (
    Item,
    check_not_all_ignored,
    check_one_frame,
    read_class_table,
    scan_labeled_folder,
)

Kind = Literal["synthetic", "real"]
MAX_SHOWN_VALUES = 8
"""Unknown mask values named in the ``on_unknown=ignore`` note of a real source (the rest are counted)."""
Role = Literal["train", "val", "eval"]


def class_pixels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """(K,) int64 pixels of each target class ``0..K-1`` in a class-id mask (ids ``>= K``, ignore, not counted)."""
    return np.bincount(mask[mask < num_classes].ravel(), minlength=num_classes)[:num_classes].astype(np.int64)


@dataclass
class Source:
    """An opened source with its items split and its classes resolved onto the targets."""

    name: str
    kind: Kind
    path: Path
    train: list[Item]
    val: list[Item]
    remap: Remap
    on_unknown: str
    ignore_index: int = 255
    weight: float = 1.0
    unknown_ignored: dict[str, Any] | None = None
    """``on_unknown=ignore``: the mask values outside the class map that training ignores (``values``: pixels per
    value, ``pixels``, ``masks``: masks holding any, ``of``: masks checked); ``None`` when there were none."""

    def load(self, item: Item) -> tuple[np.ndarray, np.ndarray]:
        """Load one frame.

        Returns:
            image (H, W) or (H, W, 3) uint8/uint16, mask (H, W) uint8 target ids (255 = ignore).

        Raises:
            UserError: image and mask sizes differ, or the mask holds unknown ids (``on_unknown=error``).
        """
        img = read_image(item.image)
        raw = read_mask(item.mask)
        if img.shape[:2] != raw.shape[:2]:
            raise UserError(
                f"image '{item.image}' is {img.shape[1]}x{img.shape[0]} but its mask '{item.mask}' is "
                f"{raw.shape[1]}x{raw.shape[0]}",
                fix="make the mask the same size as the image (or remove the pair)")
        return img, self.remap.apply(raw, item.mask, self.on_unknown, self.ignore_index)

    def load_mask(self, item: Item) -> np.ndarray:
        """A frame's (H, W) uint8 target ids (255 = ignore), without decoding its image."""
        return self.remap.apply(read_mask(item.mask), item.mask, self.on_unknown, self.ignore_index)

    def class_counts(self, items: list[Item], num_classes: int) -> np.ndarray:
        """(N, K) pixels of each target class ``0..K-1`` in each of ``items``' masks (ignore not counted)."""
        counts = np.zeros((len(items), num_classes), np.int64)
        for j, item in enumerate(items):
            counts[j] = class_pixels(self.load_mask(item), num_classes)
        return counts

    def load_instances(self, item: Item, mask: np.ndarray) -> np.ndarray | None:
        """(H, W) int32 instance ids of a frame (0 = none), ``None`` when the source has no instance labels.

        Args:
            mask: The frame's (H, W) target class map (from :meth:`load`), for the size check.

        Raises:
            UserError: the instance map is unreadable or another size than the mask.
        """
        if item.instances is None:
            return None
        return read_instances(item.instances, mask.shape)

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "path": str(self.path), "train_items": len(self.train),
               "val_items": len(self.val), "classes": self.remap.mapping}
        if self.unknown_ignored is not None:
            out["unknown_ignored"] = self.unknown_ignored
        return out


def read_instances(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) int32 instance ids from a 16- or 8-bit PNG.

    Raises:
        UserError: unreadable, or another size than the image.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.array(im)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read instance mask '{path}': {e}", fix="re-save it as a single-channel PNG") from None
    if arr.ndim != 2 or arr.shape != tuple(shape):
        raise UserError(f"instance mask '{path}' has shape {arr.shape}, its image {tuple(shape)}",
                        fix="make instances/<stem>.png a single-channel image of the image's size")
    return arr.astype(np.int32, copy=False)


def detect_kind(path: Path, field: str | None = None) -> Kind:
    """``synthetic`` for a directory with dataset.json, ``real`` for one with ``images/``.

    Args:
        path: The source folder.
        field: Where it was given (``data.real[0]``, ``--data[1]``), named in the error when it does not exist.
    """
    if (path / "dataset.json").is_file():
        return "synthetic"
    if (path / "images").is_dir():
        return "real"
    if not path.exists():
        where = f" ({field})" if field else ""
        section = field.split("[")[0] if field and (field.startswith("data.") or ".data." in field) else None
        # A config's example path (configs/finetune.yaml lists data/labeled) is the usual way to get here.
        drop = f", or drop it with {section}=[]" if section else ""
        raise UserError(f"data folder '{path}'{where} does not exist", fix=f"check the path{drop}")
    raise UserError(f"'{path}' is neither a segfactory dataset (dataset.json) nor a labeled folder (images/ + masks/)",
                    fix="pass the --out of `segfactory render`, or a folder with images/ and masks/ subfolders")


def check_kind(path: Path, kind: Kind, field: str | None = None) -> None:
    """Raise a UserError with the right flag when a folder is given as the other kind."""
    found = detect_kind(path, field)
    if found != kind:
        flag = "--synthetic" if found == "synthetic" else "--real"
        raise UserError(f"'{path}' is a {found} source but was given as {kind}",
                        fix=f"pass it with {flag} (config: data.{found})")


def _unit_hash(text: str, salt: str) -> float:
    return int(hashlib.sha256(f"{salt}:{text}".encode()).hexdigest()[:13], 16) / 16**13


def real_class_table(spec: SourceSpec, path: Path, targets: TargetClasses | None) -> tuple[list[dict], int]:
    """A real folder's class table: ``spec.classes``, else ``classes.json``, else the target classes."""
    if spec.classes is not None:
        return [{"id": i, "name": n} for i, n in spec.classes.items()], spec.ignore_index
    table = read_class_table(path, spec.ignore_index)
    if table is not None:
        return table
    if targets is None:
        raise UserError(f"real folder '{path}' has no class table and no target classes are set",
                        fix="write DIR/classes.json, set the source's `classes`, or set `classes:` in the config")
    return [{"id": c["id"], "name": c["name"]} for c in targets.classes], spec.ignore_index


def _scan_synthetic(path: Path) -> list[Item]:
    from segfactory.formats.dataset import hold_for_reading, open_dataset

    hold_for_reading(path)  # before the listing: no prune deletes a shard of it while this process runs
    ds = open_dataset(path)
    items = []
    for sid in ds.shard_ids:
        man = ds.manifest(sid)
        family = sid.rsplit("-", 2)[0]  # "<family>-<first scene>-<render key>"
        d = ds.shard_dir(sid)
        for fr in man["frames"]:
            files = fr["files"]
            unit = f"{family}/seed{man.get('seed', 0)}/scene{fr.get('scene_index', fr['name'])}"
            items.append(Item(f"{sid}/{fr['name']}", d / files["rgb"]["path"], d / files["semantic"]["path"],
                              d / files["instance"]["path"], unit))
    if not items:
        raise UserError(f"dataset '{path}' has no committed frames",
                        fix="render it first (or wait until shards finish; a shard counts once its manifest exists)")
    return items


def _scan_real(path: Path) -> list[Item]:
    return scan_labeled_folder(path)


def _check_real_items(items: list[Item], remap: Remap, on_unknown: str, ignore_index: int,
                      implicit_ignore: int | None, folder: Path) -> dict[str, Any] | None:
    """Fail before training, not at step 3000: sizes from headers, mask values from every mask; a labeled image is
    one frame (a multi-page TIFF is refused: which page would its mask label?). ``implicit_ignore``: the folder has
    no class table (mask values are the class ids) and this is its ignore value: masks of only 0 and it are refused
    (:func:`~segfactory.formats.labeled.check_not_all_ignored`). With ``on_unknown=ignore``, the mask values outside
    the class map (made ignore in training, silently) are counted and said in one line: values, pixels, files.

    Returns:
        With ``on_unknown=ignore`` and unknown values found, what was ignored (:attr:`Source.unknown_ignored`, which
        the fine-tune's ``data.json`` records), else ``None``.
    """
    values: set[int] = set()
    dropped: dict[int, int] = {}  # on_unknown=ignore: pixels per unknown mask value, over every mask
    dropped_files = 0
    for it in items:
        check_one_frame(it)
        mask = read_mask(it.mask)
        if implicit_ignore is not None and values <= {0, implicit_ignore}:  # until another value shows up
            found = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)) if mask.dtype == np.uint8 \
                else np.unique(mask)
            values.update(int(v) for v in found)
        size = image_size(it.image)  # upright, as read_image reads it (EXIF orientation), bomb-checked
        if tuple(size) != (mask.shape[1], mask.shape[0]):
            raise UserError(f"image '{it.image}' is {size[0]}x{size[1]} but its mask '{it.mask}' is "
                            f"{mask.shape[1]}x{mask.shape[0]}",
                            fix="make the mask the same size as the image, upright: a JPEG is read with its EXIF "
                                "orientation applied (or remove the pair)")
        if on_unknown == "ignore":
            counts = remap.unknown_counts(mask)
            dropped_files += bool(counts)
            for v, n in counts.items():
                dropped[v] = dropped.get(v, 0) + n
        else:
            remap.apply(mask, it.mask, on_unknown, ignore_index)  # names the file and the value
        if it.instances is not None:
            check_instances_match(it, mask)
    if implicit_ignore is not None and items:
        check_not_all_ignored(values, implicit_ignore, folder)
    if dropped:
        from segfactory.console import console

        shown = ", ".join(f"{v} ({n} px)" for v, n in sorted(dropped.items())[:MAX_SHOWN_VALUES])
        more = f" and {len(dropped) - MAX_SHOWN_VALUES} more" if len(dropped) > MAX_SHOWN_VALUES else ""
        known = ", ".join(str(v) for v in np.flatnonzero(remap.known)[:20])
        console.print(f"note: real source '{folder}': mask value(s) {shown}{more} are outside its class map (known: "
                      f"{known}): {sum(dropped.values())} pixel(s) in {dropped_files} of {len(items)} mask(s) are "
                      "ignored (on_unknown=ignore)", soft_wrap=True, markup=False)
        return {"values": {str(v): n for v, n in sorted(dropped.items())}, "pixels": sum(dropped.values()),
                "masks": dropped_files, "of": len(items)}
    return None


def check_instances_match(it: Item, mask: np.ndarray) -> None:
    """A real folder's instance mask must fit its class mask: same size, and every object pixel on a labeled
    non-background class (value 0 is background; an object on it means the two masks disagree).

    Raises:
        UserError: one line naming both files and what disagrees.
    """
    assert it.instances is not None
    try:
        inst = read_instances(it.instances, mask.shape)
    except UserError as e:
        if e.message.startswith("cannot read"):
            raise
        raise UserError(f"instance mask '{it.instances}' is not the size of its mask '{it.mask}' "
                        f"({mask.shape[1]}x{mask.shape[0]}): it does not match its class mask",
                        fix="make instances/<stem>.png a single-channel PNG of the image's size") from None
    off = int(np.count_nonzero((inst > 0) & (mask == 0)))
    if off:
        raise UserError(f"instance mask '{it.instances}' does not match its class mask '{it.mask}': {off} object "
                        "pixel(s) lie on class 0 (background)",
                        fix="derive both masks from the same labels, or remove instances/<stem>.png")

def split_items(items: list[Item], val_fraction: float, val_max: int) -> tuple[list[Item], list[Item]]:
    """Stable hash split by unit (:attr:`Item.split_unit`: a rendered scene's views stay on one side): whole
    units in hash order go to validation as long as they fit in ``round(val_fraction * n)`` items (and
    ``val_max``); at least one unit, never all."""
    units: dict[str, list[Item]] = {}
    for it in items:
        units.setdefault(it.split_unit, []).append(it)
    if val_fraction <= 0 or len(units) < 2:
        return list(items), []
    want = min(max(round(val_fraction * len(items)), 1), val_max)
    val_units: set[str] = set()
    n = 0
    for u in sorted(units, key=lambda u: _unit_hash(u, "val"))[:len(units) - 1]:
        if val_units and n + len(units[u]) > want:
            break
        val_units.add(u)
        n += len(units[u])
        if n >= want:
            break
    return ([it for it in items if it.split_unit not in val_units],
            [it for it in items if it.split_unit in val_units])


def subset_items(items: list[Item], fraction: float, max_items: int | None) -> list[Item]:
    """Nested subsets: the items of a smaller fraction are always among those of a larger one."""
    if fraction >= 1 and max_items is None:
        return list(items)
    n = math.ceil(fraction * len(items)) if fraction > 0 else 0
    if max_items is not None:
        n = min(n, max_items)
    keep = {it.key for it in sorted(items, key=lambda it: (_unit_hash(it.split_unit, "subset"), it.key))[:n]}
    return [it for it in items if it.key in keep]


def source_remap(spec: SourceSpec, kind: Kind, targets: TargetClasses, field_hint: str, *, lenient: bool = False,
                 flag: str | None = None, classes_field: str = "classes") -> Remap:
    """Map a source's classes (a rendered dataset's ``dataset.json``, a real folder's class table) onto
    ``targets``: what :func:`open_source` does with a source of the right kind, and what ``run`` and ``refresh``
    check before any work. ``field_hint``, ``lenient`` and ``flag`` as :func:`open_source`'s ``field_hint``,
    ``lenient_remap`` and ``remap_flag``; ``classes_field`` where the model's class list lives in the config the
    user wrote (``finetune.classes`` in a run), for the fix of a class with no target.

    Raises:
        UserError: a class with no target class (:func:`~finetune.data.remap.build_remap`).
    """
    path = Path(spec.path)
    if kind == "synthetic":
        from segfactory.formats.dataset import open_dataset

        ds = open_dataset(path)
        classes, ignore = ds.classes, ds.ignore_index
    else:
        classes, ignore = real_class_table(spec, path, targets)
    if lenient:
        names = {str(c["name"]) for c in classes} | {str(c["id"]) for c in classes}
        spec = spec.model_copy(update={"remap": {k: v for k, v in spec.remap.items() if str(k) in names}})
    return build_remap(classes, ignore, targets, spec.remap, f"{kind} source '{path}'", f"{field_hint}.remap", flag,
                       classes_field)


def open_source(spec: SourceSpec, kind: Kind, targets: TargetClasses, role: Role, *, val_fraction: float = 0.0,
                val_max: int = 1 << 30, field_hint: str = "remap", lenient_remap: bool = False,
                remap_flag: str | None = None) -> Source:
    """Open, split and validate one source.

    Args:
        spec: The source's config.
        kind: Expected kind (``--synthetic`` vs ``--real``); a mismatch is a UserError with the fix.
        targets: The model's classes.
        role: ``train`` (split into train/val by ``val_fraction``, subset by ``spec.fraction``), ``val`` (all
            items, up to ``val_max``, for validation) or ``eval`` (all items).
        field_hint: Config path of the source, for error messages.
        lenient_remap: Skip ``remap`` keys that are not classes of this source (one ``--remap`` list shared by
            several evaluation folders).
        remap_flag: The command-line option ``spec.remap`` came from (``--remap ``): remap errors and fixes
            spell mappings as that option (:func:`~finetune.data.remap.build_remap`), not as ``field_hint``.
    """
    path = Path(spec.path)
    check_kind(path, kind, field_hint)
    items = _scan_synthetic(path) if kind == "synthetic" else _scan_real(path)
    remap = source_remap(spec, kind, targets, field_hint, lenient=lenient_remap, flag=remap_flag)
    if role == "train":
        train, val = split_items(items, val_fraction, val_max)
        train = subset_items(train, spec.fraction, spec.max_items)
    elif role == "val":
        train, val = [], sorted(items, key=lambda it: (_unit_hash(it.split_unit, "val"), it.key))[:val_max]
    else:
        train, val = [], list(items)
    unknown = None
    if kind == "real":
        # no class table: the mask values are the class ids, and the source's ignore value is its own
        implicit = spec.classes is None and not (path / "classes.json").is_file()
        unknown = _check_real_items(train + val, remap, spec.on_unknown, targets.ignore_index,
                                    spec.ignore_index if implicit else None, path)
    return Source(spec.name or path.name, kind, path, train, val, remap, spec.on_unknown, targets.ignore_index,
                  spec.weight, unknown)


def resolve_targets(cfg: FinetuneConfig) -> TargetClasses:
    """The model's classes: ``cfg.classes``, else the first synthetic dataset's, else the first real folder's."""
    if cfg.classes is not None:
        return make_targets([c.model_dump() for c in cfg.classes], cfg.ignore_index)
    for i, spec in enumerate(cfg.data.synthetic):
        check_kind(Path(spec.path), "synthetic", f"data.synthetic[{i}]")
    for i, spec in enumerate(cfg.data.real):
        check_kind(Path(spec.path), "real", f"data.real[{i}]")
    if cfg.data.synthetic:
        from segfactory.formats.dataset import open_dataset

        return make_targets(open_dataset(cfg.data.synthetic[0].path).classes, cfg.ignore_index)
    if cfg.data.real:
        spec = cfg.data.real[0]
        classes, _ = real_class_table(spec, Path(spec.path), None)
        return make_targets(classes, cfg.ignore_index)
    raise UserError("no training data: data.synthetic and data.real are both empty",
                    fix="pass --synthetic DATASET and/or --real DIR (or list them in the config)")


def open_training_sources(cfg: FinetuneConfig, targets: TargetClasses) -> tuple[list[Source], list[Source]]:
    """Open every configured source.

    Returns:
        (train sources with at least one training item, sources with validation items).
    """
    train: list[Source] = []
    val: list[Source] = []
    specs = [("synthetic", i, s) for i, s in enumerate(cfg.data.synthetic)] + \
            [("real", i, s) for i, s in enumerate(cfg.data.real)]
    names: set[str] = set()
    for kind, i, spec in specs:
        src = open_source(spec, kind, targets, "train", val_fraction=cfg.data.val_fraction,
                          val_max=cfg.data.val_max_items, field_hint=f"data.{kind}[{i}]")
        src.name = _unique_name(src.name, names)
        if src.train:
            train.append(src)
        if src.val:
            val.append(src)
    for i, spec in enumerate(cfg.data.val):
        kind = detect_kind(Path(spec.path), f"data.val[{i}]")
        src = open_source(spec, kind, targets, "val", val_max=cfg.data.val_max_items, field_hint=f"data.val[{i}]")
        src.name = _unique_name(src.name, names)
        val.append(src)
    if not train:
        raise UserError("no training items: every source is empty or has fraction 0",
                        fix="add data (--synthetic/--real) or raise data.*.fraction")
    return train, val


def _unique_name(name: str, taken: set[str]) -> str:
    out, k = name, 2
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    taken.add(out)
    return out
