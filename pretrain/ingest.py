"""Ingestion core: raw image dump -> validated, deduplicated, normalized image shards.

Pure functions over one unit of work (a list of files, one shard); ``pipelines/ingest.py`` runs them on Dask.
The output layout, its writer and readers are the ingest store format, :mod:`segfactory.formats.images`.
"""

from __future__ import annotations

import glob
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from segfactory.errors import UserError
from segfactory.formats.images import MANIFEST_FILE, ImageShardWriter, shards_dir
from segfactory.io import is_committed, read_json, sha256_bytes

LIST_SUFFIXES = (".txt", ".lst", ".list")


class Rejected(Exception):
    """A file that is skipped (and reported) rather than ingested.

    Args:
        kind: Short category: empty, not_image, unsupported, corrupt, bomb, too_small, too_large, unreadable.
        reason: Human-readable detail.
    """

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# ------------------------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class SourceFile:
    """One input file as seen when listing the source (its identity for incremental runs)."""

    path: str
    size: int
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.path, self.size, self.mtime_ns)


def discover(src: str, extensions: list[str] | None = None, follow_symlinks: bool = True) -> list[SourceFile]:
    """List the files of a source: a folder (recursive), a glob, or a text file with one path per line.

    Hidden files and folders (``.name``) are skipped. Paths are absolute and sorted.

    Raises:
        UserError: if the source does not exist or holds no files.
    """
    p = Path(src).expanduser()
    if p.is_dir():
        paths = _walk(p, follow_symlinks)
        what = f"folder '{p}'"
    elif any(ch in src for ch in "*?["):
        paths = [Path(x) for x in glob.glob(os.path.expanduser(src), recursive=True)]
        paths = [x for x in paths if x.is_file() and not x.name.startswith(".")]
        what = f"glob '{src}'"
    elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        paths = []
        for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                q = Path(line).expanduser()
                paths.append(q if q.is_absolute() else p.parent / q)
        what = f"list '{p}'"
        extensions = None  # an explicit list is taken as given: every entry is read and reported
    elif p.is_file():
        paths, what = [p], f"file '{p}'"
    else:
        raise UserError(f"source '{src}' does not exist", fix="pass a folder, a glob like 'dump/**/*.jpg' "
                        "(quoted), or a .txt file with one path per line")
    if extensions is not None:
        paths = [x for x in paths if x.suffix.lower() in extensions]
    out: dict[str, SourceFile] = {}
    for x in paths:
        ap = os.path.abspath(x)
        try:
            st = os.stat(ap)
        except OSError:
            # listed but missing/unreadable: keep it so the report says so
            out[ap] = SourceFile(ap, -1, -1)
            continue
        out[ap] = SourceFile(ap, st.st_size, st.st_mtime_ns)
    if not out:
        filt = f" with suffix {', '.join(extensions)}" if extensions else ""
        raise UserError(f"no files{filt} found in {what}", fix="check the path (an empty dump has nothing to ingest)")
    return [out[k] for k in sorted(out)]


def _walk(root: Path, follow_symlinks: bool) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
    return found


# --------------------------------------------------------------------------------------------- hashing


def hash_files(files: list[SourceFile], max_file_mb: float) -> list[dict[str, Any]]:
    """Content hashes of a chunk of files (the dedup key).

    Returns:
        One dict per file: ``path, size, mtime_ns`` and either ``sha256`` or ``kind``/``reason``.
    """
    out = []
    for f in files:
        rec: dict[str, Any] = {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns}
        try:
            if f.size < 0:
                raise Rejected("unreadable", "file is missing or cannot be stat'ed")
            if f.size == 0:
                raise Rejected("empty", "empty file (0 bytes)")
            if f.size > max_file_mb * 2**20:
                raise Rejected("too_large", f"file is {f.size / 2**20:.0f} MiB > checks.max_file_mb={max_file_mb}")
            rec["sha256"] = _sha256_path(f.path)
        except Rejected as r:
            rec.update(kind=r.kind, reason=r.reason)
        except OSError as e:
            rec.update(kind="unreadable", reason=f"cannot read: {e.strerror or e}")
        out.append(rec)
    return out


def _sha256_path(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- decoding


def sniff(data: bytes) -> str | None:
    """Image format from the leading bytes (extensions lie), or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"BM":
        return "bmp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    return None


@dataclass
class Decoded:
    """One decoded image (a TIFF stack yields one per slice).

    Attributes:
        array: (H, W) gray or (H, W, 3) RGB; uint8, uint16, other ints or float.
        orig_shape: (H, W) at full resolution (before any reduced-size decode).
        page: Slice index in a stack, else None.
        passthrough: The source bytes are stored as they are (8-bit JPEG stored as JPEG, no resize, no
            rotation); ``array`` is then a reduced-scale (1/8) validation decode, not the stored size.
    """

    array: np.ndarray
    orig_shape: tuple[int, int]
    page: int | None = None
    passthrough: bool = False


def decode(data: bytes, max_pixels: int, min_side: int, max_pages: int,
           max_short_side: int | None, store: str = "auto") -> tuple[str, list[Decoded]]:
    """Decode and validate one file's bytes.

    Args:
        data: The file's content.
        max_pixels: Larger images are rejected (decompression bombs) before any pixel is decoded.
        min_side: Images with a smaller side are rejected.
        max_pages: TIFF stacks: at most this many slices.
        max_short_side: Target short side; JPEGs are decoded at the smallest DCT scale that still covers it.
        store: ``normalize.store`` (auto, png, jpeg): a JPEG is only passed through (and then validated at 1/8
            scale) when it is stored as JPEG; otherwise its pixels are re-encoded and must be decoded in full.

    Returns:
        ``(format, images)``.

    Raises:
        Rejected: with the reason the file cannot be ingested.
    """
    fmt = sniff(data)
    if fmt is None:
        head = data[:8].hex(" ")
        raise Rejected("not_image", f"not an image (unrecognised leading bytes {head})")
    if fmt == "gif":
        raise Rejected("unsupported", "GIF is not supported (convert it to PNG)")
    try:
        if fmt == "tiff":
            return fmt, _decode_tiff(data, max_pixels, min_side, max_pages)
        if fmt == "png" and len(data) >= 26 and data[24] == 16 and data[25] in (2, 6):
            return fmt, [_decode_png16_rgb(data, max_pixels, min_side)]
        return fmt, [_decode_pil(data, fmt, max_pixels, min_side, max_short_side, stored_ext(fmt, store))]
    except Rejected:
        raise
    except Exception as e:
        # decoders signal damage with many exception types (OSError, ValueError, struct.error, TiffFileError,
        # zlib.error, ...); a bad file must be reported, never crash the run
        raise Rejected("corrupt", f"truncated or corrupt {fmt.upper()}: {_short(e)}") from None


def _short(e: BaseException) -> str:
    text = str(e).strip()
    msg = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
    return msg[:200]


def _check_size(w: int, h: int, max_pixels: int, min_side: int) -> None:
    if w * h > max_pixels:
        raise Rejected("bomb", f"decompression bomb: {w}x{h} = {w * h} pixels > checks.max_pixels={max_pixels}")
    if min(w, h) < min_side:
        raise Rejected("too_small", f"{w}x{h} is smaller than checks.min_side={min_side}")


def stored_ext(fmt: str, store: str) -> str:
    """Extension an image of source format ``fmt`` is stored with under ``normalize.store``."""
    if store == "auto":
        return ".jpg" if fmt == "jpeg" else ".png"
    return ".jpg" if store == "jpeg" else ".png"


def _decode_pil(data: bytes, fmt: str, max_pixels: int, min_side: int, max_short_side: int | None,
                ext: str) -> Decoded:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # our own size check below is the authority; Pillow's would only warn up to 2x its limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected("bomb", f"decompression bomb: {_short(e)}") from None
    passthrough = False
    with im:
        w, h = im.size
        _check_size(w, h, max_pixels, min_side)
        orientation = 1
        if fmt == "jpeg":
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            if im.mode in ("L", "RGB", "CMYK", "YCbCr"):  # 8-bit modes: decoded to uint8
                # decided before decoding: only bytes that are copied as they are may be validated at 1/8 scale;
                # a rotated or re-encoded (store=png) JPEG needs its pixels at the stored size
                passthrough = (orientation == 1 and ext == ".jpg"
                               and (max_short_side is None or min(w, h) <= max_short_side))
                target = _draft_target(w, h, max_short_side, passthrough)
                if target is not None:
                    # DCT-domain downscaling: decoding at 1/2..1/8 size skips most of the IDCT work, and still
                    # runs the entropy decoder over the whole file, so truncation/corruption is still detected
                    im.draft("L" if im.mode == "L" else "RGB", target)
        im.load()
        arr = _pil_to_array(im)
    passthrough = passthrough and arr.dtype == np.uint8
    if orientation != 1:
        arr = _apply_orientation(arr, orientation)
        if orientation in (5, 6, 7, 8):
            w, h = h, w
    return Decoded(arr, (h, w), None, passthrough)


def _draft_target(w: int, h: int, max_short_side: int | None, passthrough: bool) -> tuple[int, int] | None:
    """Smallest size a JPEG may be decoded at (Pillow picks the DCT scale covering it); None for full size."""
    if passthrough:
        # stored as the original bytes: validation still decodes every coefficient, but at 1/8 scale (the
        # channel statistics are from it)
        return (max(1, w // 8), max(1, h // 8))
    if max_short_side is None or min(w, h) <= max_short_side:
        return None  # re-encoded at full size
    r = max_short_side / min(w, h)
    return (max(1, math.ceil(w * r)), max(1, math.ceil(h * r)))


def _pil_to_array(im: Any) -> np.ndarray:
    mode = im.mode
    if mode in ("1", "LA", "La"):
        im = im.convert("L")
    elif mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
    elif mode in ("CMYK", "YCbCr", "RGBa", "LAB", "HSV"):
        im = im.convert("RGB")
    elif mode == "F":
        return np.asarray(im, dtype=np.float32)
    elif mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16, copy=False)
    elif mode == "I":
        return np.asarray(im, dtype=np.int32)
    arr = np.asarray(im)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]  # alpha is not image content for pretraining
    if arr.ndim == 3 and arr.shape[2] == 2:
        arr = arr[:, :, 0]
    return np.ascontiguousarray(arr)


def _apply_orientation(arr: np.ndarray, o: int) -> np.ndarray:
    """Apply an EXIF orientation (2-8) so the stored image is upright."""
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
           7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1], 8: lambda a: np.swapaxes(a, 0, 1)[::-1]}
    return np.ascontiguousarray(ops[o](arr)) if o in ops else arr


def _decode_png16_rgb(data: bytes, max_pixels: int, min_side: int) -> Decoded:
    # Pillow reads 16-bit colour PNGs as 8-bit RGB (dropping the low byte); OpenCV keeps all 16 bits
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    _check_size(w, h, max_pixels, min_side)
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.shape[:2] != (h, w):
        raise Rejected("corrupt", "truncated or corrupt PNG (16-bit colour data does not decode)")
    arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return Decoded(arr, (h, w))


def _decode_tiff(data: bytes, max_pixels: int, min_side: int, max_pages: int) -> list[Decoded]:
    import tifffile

    out = []
    with tifffile.TiffFile(io.BytesIO(data)) as tf:
        pages = tf.pages
        if len(pages) == 0:
            raise Rejected("corrupt", "TIFF has no pages")
        for i, page in enumerate(pages):
            if i >= max_pages:
                break
            shape = tuple(int(s) for s in page.shape)
            h, w = _tiff_hw(shape)
            _check_size(w, h, max_pixels, min_side)
            arr = _tiff_layout(page.asarray(), shape)
            out.append(Decoded(arr, (h, w), i if len(pages) > 1 else None))
    return out


def _tiff_hw(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3 and shape[-1] in (1, 2, 3, 4):
        return shape[0], shape[1]
    if len(shape) == 3 and shape[0] in (1, 2, 3, 4):
        return shape[1], shape[2]
    raise Rejected("unsupported", f"TIFF page layout {shape} is not (H, W), (H, W, C) or (C, H, W)")


def _tiff_layout(arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W), (H, W, C) or planar (C, H, W) -> (H, W) or (H, W, 3)."""
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3:
        c = arr.shape[-1]
        arr = arr[:, :, 0] if c in (1, 2) else arr[:, :, :3]
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------------------ normalizing


def to_uint8(arr: np.ndarray, low_pct: float, high_pct: float) -> tuple[np.ndarray, list[float] | None]:
    """Map any bit depth to uint8; 8-bit input is returned unchanged.

    16-bit (and int/float) data is scaled robustly: the ``low_pct`` percentile maps to 0 and ``high_pct`` to
    255 over all channels, so a few hot pixels do not squash the range (microscopy, scientific cameras).

    Returns:
        ``(image, [lo, hi])``; ``None`` instead of the range for 8-bit input.
    """
    if arr.dtype == np.uint8:
        return arr, None
    a = arr.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    # percentiles of a strided sample: exact enough, and O(1 M) instead of O(H * W) for huge scans
    step = max(1, int(math.sqrt(a.size / 1_000_000)))
    sample = a[::step, ::step]
    lo, hi = (float(v) for v in np.percentile(sample, [low_pct, high_pct]))
    if hi <= lo:
        hi = lo + 1.0
    out = np.clip((a - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255).astype(np.uint8)
    return out, [lo, hi]


def resize_short_side(arr: np.ndarray, max_short_side: int | None) -> np.ndarray:
    """Downscale (area interpolation) so that the short side is at most ``max_short_side``."""
    h, w = arr.shape[:2]
    if max_short_side is None or min(h, w) <= max_short_side:
        return arr
    r = max_short_side / min(h, w)
    size = (max(1, round(w * r)), max(1, round(h * r)))
    if min(size) != max_short_side:  # rounding must land exactly on the target short side
        size = (max_short_side, size[1]) if w <= h else (size[0], max_short_side)
    # area averaging is needed against aliasing from 2x down; below that (the usual case after a reduced-scale
    # JPEG decode) bilinear is as good and several times faster than OpenCV's fractional INTER_AREA
    interp = cv2.INTER_AREA if r <= 0.5 else cv2.INTER_LINEAR
    return cv2.resize(arr, size, interpolation=interp)


def channel_stats(arr: np.ndarray) -> dict[str, list[float] | float]:
    """Per-channel mean/std (of values scaled to [0, 1]) plus luma mean/std, for input normalization.

    Args:
        arr: (H, W) or (H, W, 3) uint8.
    """
    m, s = cv2.meanStdDev(arr)  # uint8 in, float64 out: no float copy of the image
    mean, std = (m.ravel() / 255.0).tolist(), (s.ravel() / 255.0).tolist()
    if arr.ndim == 2:
        return {"mean": mean, "std": std, "luma_mean": mean[0], "luma_std": std[0]}
    lm, ls = cv2.meanStdDev(cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY))  # BT.601, as gray loading does
    return {"mean": mean, "std": std, "luma_mean": float(lm[0, 0]) / 255.0, "luma_std": float(ls[0, 0]) / 255.0}


def encode(arr: np.ndarray, ext: str, jpeg_quality: int) -> bytes:
    """(H, W) or (H, W, 3) uint8 RGB -> file bytes."""
    bgr = arr if arr.ndim == 2 else cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext == ".jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    ok, buf = cv2.imencode(ext, bgr, params)
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {arr.shape} image as {ext}")
    return buf.tobytes()


@dataclass
class Stored:
    """One image ready to be written into a shard."""

    data: bytes
    ext: str
    record: dict[str, Any]


def process_bytes(data: bytes, cfg: dict[str, Any]) -> list[Stored]:
    """Decode, validate and normalize one file's bytes (the whole per-file work of ingestion).

    Args:
        data: File content.
        cfg: ``IngestConfig.model_dump()`` (plain dict so it travels to Dask workers cheaply).

    Returns:
        One :class:`Stored` per image (several for TIFF stacks).

    Raises:
        Rejected: if the file is not a usable image.
    """
    norm, checks = cfg["normalize"], cfg["checks"]
    fmt, images = decode(data, checks["max_pixels"], checks["min_side"], checks["max_pages"],
                         norm["max_short_side"], norm["store"])
    ext = stored_ext(fmt, norm["store"])
    out = []
    for img in images:
        arr8, scale = to_uint8(img.array, norm["low_percentile"], norm["high_percentile"])
        if img.passthrough:  # only set for a JPEG stored as .jpg, unrotated and needing no resize
            # validated at reduced size; the original bytes are the best copy of this image
            blob, h, w, how = data, img.orig_shape[0], img.orig_shape[1], "copied"
        else:
            arr8 = resize_short_side(arr8, norm["max_short_side"])
            blob, (h, w), how = encode(arr8, ext, norm["jpeg_quality"]), arr8.shape[:2], "encoded"
        rec = {"format": fmt, "page": img.page, "orig_height": img.orig_shape[0], "orig_width": img.orig_shape[1],
               "orig_dtype": str(img.array.dtype), "height": int(h), "width": int(w),
               "channels": 1 if arr8.ndim == 2 else 3, "scale": scale, "stored": how, **channel_stats(arr8)}
        out.append(Stored(blob, ext, rec))
    return out


def ingest_shard(spec: dict[str, Any], out_root: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Ingest one chunk of files into one committed shard.

    Args:
        spec: ``{"shard_id", "run", "files": [hash records], "rejected": [records decided before decoding
            (duplicates, unreadable)]}``.
        out_root: Output directory.
        cfg: ``IngestConfig.model_dump()``.

    Returns:
        ``{"shard_id", "images", "rejected", "rejected_kinds"}`` counts for the summary.
    """
    final = shards_dir(out_root) / spec["shard_id"]
    if is_committed(final):  # committed by an earlier attempt of this task
        return _shard_summary(read_json(final / MANIFEST_FILE))
    rejected: list[dict[str, Any]] = list(spec.get("rejected", []))
    with ImageShardWriter(out_root, spec["shard_id"]) as writer:
        for f in spec["files"]:
            src = {"source": f["path"], "size": f["size"], "mtime_ns": f["mtime_ns"], "sha256": f["sha256"]}
            try:
                try:
                    data = Path(f["path"]).read_bytes()
                except OSError as e:
                    raise Rejected("unreadable", f"cannot read: {e.strerror or e}") from None
                if sha256_bytes(data) != f["sha256"]:
                    raise Rejected("unreadable", "file changed while being ingested; re-run to pick it up")
                stored = process_bytes(data, cfg)
            except Rejected as r:
                rejected.append({**src, "kind": r.kind, "reason": r.reason})
                continue
            for s in stored:
                writer.add(s.data, s.ext, {**src, **s.record})
        manifest = writer.commit(spec["run"], cfg["normalize"], rejected)
    return _shard_summary(manifest)


def _shard_summary(man: dict[str, Any]) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for r in man["rejected"]:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    return {"shard_id": man["shard_id"], "images": len(man["images"]), "rejected": len(man["rejected"]),
            "rejected_kinds": kinds}


def plan_shards(hashed: list[dict[str, Any]], known_shas: dict[str, str], run: int,
                files_per_shard: int) -> list[dict[str, Any]]:
    """Drop exact duplicates (by content hash) and cut the remaining files into shard specs.

    Duplicates and files that failed hashing are recorded as rejected in the last shard (a shard with no
    images is written if nothing else is new), so that re-runs do not look at them again.
    """
    seen = dict(known_shas)
    unique: list[dict[str, Any]] = []
    pre_rejected: list[dict[str, Any]] = []
    for rec in sorted(hashed, key=lambda r: r["path"]):
        base = {"source": rec["path"], "size": rec["size"], "mtime_ns": rec["mtime_ns"]}
        if "sha256" not in rec:
            pre_rejected.append({**base, "sha256": None, "kind": rec["kind"], "reason": rec["reason"]})
        elif rec["sha256"] in seen:
            pre_rejected.append({**base, "sha256": rec["sha256"], "kind": "duplicate",
                                 "reason": f"exact duplicate of {seen[rec['sha256']]}",
                                 "duplicate_of": seen[rec["sha256"]]})
        else:
            seen[rec["sha256"]] = rec["path"]
            unique.append(rec)
    chunks = [unique[i:i + files_per_shard] for i in range(0, len(unique), files_per_shard)] or [[]]
    specs = [{"shard_id": f"{run:04d}-{i:05d}", "run": run, "files": c, "rejected": []}
             for i, c in enumerate(chunks)]
    specs[-1]["rejected"] = pre_rejected
    if not unique and not pre_rejected:
        return []
    return specs


