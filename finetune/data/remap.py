"""Class tables and remapping of each source's mask values onto the model's target classes.

A source (a rendered dataset, a real folder) has its own class table ``[{id, name}]`` and its own ignore
value. :func:`build_remap` turns that table, the target classes and the user's ``remap`` into a lookup table
once, so mapping a mask is one array index per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segfactory.errors import UserError
from segfactory.formats.labeled import check_class_table

IGNORE = "ignore"

# Distinct, colour-blind-friendly-ish defaults for classes that come without a colour.
_PALETTE = [
    (0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128),
]


def default_color(class_id: int) -> tuple[int, int, int]:
    if class_id < len(_PALETTE):
        return _PALETTE[class_id]
    # Deterministic spread for many classes: golden-ratio hue steps.
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((class_id * 0.618034) % 1.0, 0.7, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


@dataclass
class TargetClasses:
    """The model's classes: ids ``0..num_classes-1`` (gaps get placeholder names), names, colours."""

    classes: list[dict[str, Any]]
    ignore_index: int = 255

    @property
    def num_classes(self) -> int:
        return max(c["id"] for c in self.classes) + 1

    @property
    def names(self) -> list[str]:
        names = [f"class_{i}" for i in range(self.num_classes)]
        for c in self.classes:
            names[c["id"]] = c["name"]
        return names

    @property
    def colors(self) -> list[tuple[int, int, int]]:
        colors = [default_color(i) for i in range(self.num_classes)]
        for c in self.classes:
            if c.get("color") is not None:
                colors[c["id"]] = tuple(int(v) for v in c["color"])
        return colors

    def id_of(self, key: int | str) -> int | None:
        """Target id for a name or an id (ints and digit strings are ids); ``None`` if unknown."""
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            i = int(key)
            return i if any(c["id"] == i for c in self.classes) else None
        return next((c["id"] for c in self.classes if c["name"] == key), None)

    def to_json(self) -> list[dict[str, Any]]:
        """Every id ``0..num_classes-1`` (gaps as ``class_<id>``) with its colour, as written to model.json."""
        return [{"id": i, "name": n, "color": list(c)} for i, (n, c) in enumerate(zip(self.names, self.colors,
                                                                                      strict=True))]


def make_targets(classes: list[dict[str, Any]], ignore_index: int = 255) -> TargetClasses:
    """Validate a class list (unique ids in 0..254, unique names) into :class:`TargetClasses`."""
    ids = [int(c["id"]) for c in classes]
    if len(classes) == 0:
        raise UserError("the class list is empty", fix="give at least one class in `classes:`")
    if len(set(ids)) != len(ids):
        raise UserError(f"class ids repeat: {sorted(ids)}", fix="give every class its own id")
    if max(ids) >= ignore_index or min(ids) < 0:
        raise UserError(f"class ids must lie in 0..{ignore_index - 1} (got {min(ids)}..{max(ids)})",
                        fix=f"renumber the classes; {ignore_index} means 'ignore'")
    out = [{"id": int(c["id"]), "name": str(c["name"]), "color": c.get("color")} for c in classes]
    return TargetClasses(sorted(out, key=lambda c: c["id"]), ignore_index)


@dataclass
class Remap:
    """Lookup from source mask values to target ids.

    Attributes:
        lut: (V,) uint8 target id (or the target ignore index) per source value.
        known: (V,) bool, whether a source value is in the source's class table (or is its ignore value).
        mapping: Human-readable ``source class -> target class`` record (for manifests).
    """

    lut: np.ndarray
    known: np.ndarray
    mapping: dict[str, str] = field(default_factory=dict)

    def labeled(self, ignore_index: int = 255) -> list[int]:
        """The target ids this source labels: its class table's classes after the mapping (ignored ones left out).

        A model's mIoU on the source averages these classes only (:func:`finetune.metrics.metrics_from_confusion`'s
        ``scored``): a model class the source never labels has no true pixels there to score."""
        return sorted({int(t) for t in self.lut[self.known]} - {ignore_index})

    def _lookup(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) int64 source values -> (the values clipped into the table, (H, W) bool: outside the class map)."""
        inside = (m >= 0) & (m < len(self.lut))
        clipped = np.where(inside, m, 0)
        return clipped, ~inside | ~self.known[clipped]

    def unknown_counts(self, mask: np.ndarray) -> dict[int, int]:
        """``{mask value: pixels}`` of the (H, W) mask's values outside the class map (those ``on_unknown=ignore``
        makes ignore); empty when every value is known."""
        m = mask.astype(np.int64, copy=False)
        _, unknown = self._lookup(m)
        if not unknown.any():
            return {}
        values, counts = np.unique(m[unknown], return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def apply(self, mask: np.ndarray, path: Any, on_unknown: str, ignore_index: int = 255) -> np.ndarray:
        """Map a (H, W) source mask to (H, W) uint8 target ids.

        Raises:
            UserError: a value outside the class table when ``on_unknown == "error"``, naming file and value.
        """
        m = mask.astype(np.int64, copy=False)
        clipped, unknown = self._lookup(m)
        out = self.lut[clipped]
        if unknown.any():
            if on_unknown == "error":
                bad = np.unique(m[unknown])
                shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
                raise UserError(
                    f"mask '{path}' holds class id(s) {shown} outside its class map "
                    f"(known: {', '.join(str(v) for v in np.flatnonzero(self.known)[:20])})",
                    fix="fix the mask, add the class to the source's `classes`, or set on_unknown=ignore")
            out = np.where(unknown, ignore_index, out)
        return out.astype(np.uint8, copy=False)


def build_remap(source_classes: list[dict[str, Any]], source_ignore: int, targets: TargetClasses,
                remap: dict[int | str, int | str], source_label: str, field_hint: str,
                flag: str | None = None, classes_field: str = "classes") -> Remap:
    """Resolve a source's classes onto the targets.

    Args:
        source_classes: ``[{id, name}]`` of the source.
        source_ignore: The source's ignore value (maps to the target ignore index).
        targets: The model's classes.
        remap: User mapping, source class (name or id) -> target class (name or id) or ``"ignore"``.
        source_label: Names the source in errors.
        field_hint: Config path of this source's ``remap`` for the fix line (e.g. ``data.synthetic[0].remap``).
        flag: The command-line option the mapping came from instead (``--remap ``, spelled as a mapping's prefix:
            ``--remap sky=ignore``); errors and fixes then use it, not ``field_hint``.
        classes_field: Config path of the model's class list, the other fix for a class with no target
            (``finetune.classes`` in a run).

    Raises:
        UserError: an unknown remap key/value, a source class with no target, or a class table with a repeated id
            or name or a class on the ignore value (:func:`segfactory.formats.labeled.check_class_table`).
    """
    check_class_table(source_classes, source_ignore, source_label)  # ids and names once, none on the ignore value
    by_id = {int(c["id"]): str(c["name"]) for c in source_classes}
    by_name = {name: i for i, name in by_id.items()}
    size = max([256, source_ignore + 1, *(i + 1 for i in by_id)])
    lut = np.full(size, targets.ignore_index, dtype=np.uint8)
    known = np.zeros(size, dtype=bool)
    resolved: dict[int, int] = {}
    mapping: dict[str, str] = {}
    for key, value in remap.items():
        where = f"{flag}{key}={value}" if flag else field_hint
        sid = int(key) if isinstance(key, int) or str(key).isdigit() else by_name.get(str(key))
        if sid is None or sid not in by_id:
            raise UserError(f"{where}: '{key}' is not a class of {source_label}",
                            fix=f"use one of: {', '.join(f'{n} ({i})' for i, n in sorted(by_id.items()))}")
        if str(value) == IGNORE:
            resolved[sid] = targets.ignore_index
        else:
            tid = targets.id_of(value)
            if tid is None:
                raise UserError(f"{where}: target '{value}' (for '{key}') is not a target class",
                                fix=f"use 'ignore' or one of: {', '.join(targets.names)}")
            resolved[sid] = tid
    for sid, name in sorted(by_id.items()):
        if sid not in resolved:
            tid = targets.id_of(name)
            if tid is None:
                choices = f"<one of {', '.join(targets.names)}>"
                fix = (f"add {flag}{name}={choices} (or {flag}{name}=ignore)" if flag else
                       f"add `{field_hint}: {{{name}: {choices} or ignore}}` or list it in `{classes_field}`")
                raise UserError(f"class '{name}' (id {sid}) of {source_label} has no target class", fix=fix)
            resolved[sid] = tid
        lut[sid] = resolved[sid]
        known[sid] = True
        tname = "ignore" if resolved[sid] == targets.ignore_index else targets.names[resolved[sid]]
        mapping[f"{name} ({sid})"] = tname
    lut[source_ignore] = targets.ignore_index
    known[source_ignore] = True
    return Remap(lut, known, mapping)
