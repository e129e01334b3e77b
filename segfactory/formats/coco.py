"""COCO instance annotations (RLE masks) from instance and semantic maps; loadable with pycocotools."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from pycocotools import mask as mask_utils

if TYPE_CHECKING:
    from segfactory.formats.dataset import Dataset


def frame_annotations(instance: npt.NDArray[np.uint16], semantic: npt.NDArray[np.uint8], image_id: int,
                      first_ann_id: int) -> list[dict[str, Any]]:
    """One COCO annotation per instance id in the frame.

    Args:
        instance: (H, W) uint16 instance ids, 0 = none.
        semantic: (H, W) uint8 class ids (the instance's class is read from its pixels).
        image_id: COCO image id.
        first_ann_id: Id of the first annotation.
    """
    anns = []
    for k, inst in enumerate(i for i in np.unique(instance) if i != 0):
        mask = instance == inst
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        classes, counts = np.unique(semantic[mask], return_counts=True)
        anns.append({
            "id": first_ann_id + k,
            "image_id": image_id,
            "category_id": int(classes[np.argmax(counts)]),
            "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            "iscrowd": 0,
            "instance_id": int(inst),
        })
    return anns


def coco_document(images: list[dict[str, Any]], annotations: list[dict[str, Any]], classes: list[dict[str, Any]],
                  description: str) -> dict[str, Any]:
    """Assemble a COCO instances file; categories are the thing classes."""
    return {
        "info": {"description": description, "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c["id"], "name": c["name"], "supercategory": "thing"} for c in classes if c["thing"]],
    }


def dataset_coco(ds: Dataset, description: str) -> dict[str, Any]:
    """One COCO instances document for a whole dataset, merged from its committed shards' ``coco.json``.

    Image and annotation ids are numbered afresh over the shards in order (each shard's own file starts at 1);
    ``file_name`` is the image's path relative to the dataset root (``shards/<shard>/rgb/<frame>.png``: pass the
    dataset directory as the image root to a COCO loader); each image also records its ``shard`` and ``frame``.
    The categories are the dataset's thing classes.

    Returns:
        The document, with ``info.shards`` naming the merged shards (a dataset that grew since needs a new file).
    """
    from segfactory.io import read_json

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for sid in ds.shard_ids:
        folder = ds.shard_dir(sid)
        doc = read_json(folder / "coco.json")
        prefix = folder.relative_to(ds.root).as_posix()
        new_id: dict[int, int] = {}
        for im in doc["images"]:
            new_id[int(im["id"])] = len(images) + 1
            images.append({**im, "id": len(images) + 1, "file_name": f"{prefix}/{im['file_name']}", "shard": sid})
        for a in doc["annotations"]:
            annotations.append({**a, "id": len(annotations) + 1, "image_id": new_id[int(a["image_id"])]})
    out = coco_document(images, annotations, ds.classes, description)
    out["info"]["shards"] = list(ds.shard_ids)
    return out
