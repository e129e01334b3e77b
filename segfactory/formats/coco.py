"""COCO instance annotations (RLE masks) from instance and semantic maps; loadable with pycocotools."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from pycocotools import mask as mask_utils


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
