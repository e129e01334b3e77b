"""Image files: the one reader of image and mask files (every format module and stage reads through it) and the
one writer of label/frame PNGs.

The rules every reader of real images shares (``segfactory ingest`` decodes with the same helpers):

- **Formats**: :data:`IMAGE_SUFFIXES` (PNG, JPEG, TIFF, WebP, BMP), the built-in formats ingest stores (it refuses
  GIF). Every pixel type ingest takes is read: 8- and 16-bit as they are, a boolean TIFF as 0/255, every other
  type (signed or 32-bit integers, floats) as float32 with non-finite values (NaN, inf) as 0.
- **Value rule** (:func:`stretch_range`): 8-bit images are taken as they are; deeper images (every other pixel
  type) get the percentile stretch, their 0.5..99.5 percentiles mapped to 0..1 (ingest: 0..255). Ingest stores
  with it, fine-tuning's ``input.scaling=auto`` and prediction scale with it (``finetune.data.normalize``).

- **Orientation**: a JPEG's EXIF orientation is applied, so an image is read upright, as viewers and labeling tools
  show it (its mask must be drawn on the upright image). Other formats' orientation tags are not applied.
- **Decompression bombs**: the pixel count in the header is checked before any pixel is decoded; above
  ``MAX_PIXELS`` (Pillow's error threshold, ingest's ``checks.max_pixels`` default) the file is refused with one
  line.

A PNG's embedded colour profile (iCCP chunk) is dropped before OpenCV decodes it (:func:`png_without_iccp`):
OpenCV applies no colour management, so the pixels are the same, but its libpng prints a warning on stderr
("libpng warning: iCCP: known incorrect sRGB profile") for the many photos whose profile it finds faulty.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
from PIL import Image

from segfactory.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp")
"""The image files predict, evaluate and labeled folders read: ``segfactory ingest``'s built-in formats but GIF
(which it refuses)."""
PERCENTILES = (0.5, 99.5)
"""The percentile stretch of images deeper than 8 bit: these percentiles map to 0 and 1 (ingest's defaults of
``normalize.low_percentile`` / ``high_percentile``)."""
STRETCH_SAMPLE = 1_000_000
"""The percentiles are those of a strided sample of about this many pixels (exact below 4 M pixels)."""
MAX_PIXELS = 178_956_970
"""Largest image (width x height) read: Pillow's decompression-bomb error threshold (2x ``MAX_IMAGE_PIXELS``)."""
EXIF_ORIENTATION = 0x0112

ImageArray = npt.NDArray[np.unsignedinteger[Any]]
"""An image as written here: (H, W) gray or (H, W, 3) RGB, uint8 or uint16."""
Pixels = npt.NDArray[Any]
"""An image as :func:`read_image` returns it: (H, W) gray or (H, W, 3) RGB, uint8, uint16 or float32."""


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8) applied to an opened image: a JPEG's tag, 1 (as stored) for other formats."""
    if im.format != "JPEG":
        return 1
    try:
        o = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except (OSError, ValueError, TypeError, SyntaxError):  # a damaged EXIF block is not the pixels' problem
        return 1
    return o if 1 <= o <= 8 else 1


def apply_orientation(arr: npt.NDArray[Any], orientation: int) -> npt.NDArray[Any]:
    """Apply an EXIF orientation (2-8) to (H, W) or (H, W, C) pixels so that the image is upright."""
    if orientation in (5, 6, 7, 8):
        arr = np.swapaxes(arr, 0, 1)  # the transposing orientations: transpose, then flip as below
    flips = {2: (False, True), 3: (True, True), 4: (True, False), 5: (False, False), 6: (False, True),
             7: (True, True), 8: (True, False)}
    if orientation not in flips:
        return arr
    flip_rows, flip_cols = flips[orientation]
    if flip_rows:
        arr = arr[::-1]
    if flip_cols:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def check_pixels(path: str | os.PathLike[str], width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    """Refuse an image whose header promises more than ``max_pixels`` pixels, before decoding it.

    Raises:
        UserError: one line naming the file, its size and the limit.
    """
    if width * height > max_pixels:
        raise UserError(f"image '{path}' is {width}x{height} = {width * height} pixels, above the "
                        f"decompression-bomb limit of {max_pixels} pixels",
                        fix="downscale or tile it (a labeled image and its mask must fit the limit)")


def _open_header(path: Path, max_pixels: int) -> tuple[int, int, int]:
    """``(width, height, orientation)`` of a non-TIFF image from its header; no pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_pixels decides
            with Image.open(path) as im:
                w, h = im.size
                orientation = exif_orientation(im)
    except Image.DecompressionBombError as e:
        raise UserError(f"image '{path}' is above the decompression-bomb limit of {max_pixels} pixels ({e})",
                        fix="downscale or tile it (a labeled image and its mask must fit the limit)") from None
    except (OSError, ValueError, SyntaxError):
        return 0, 0, 1  # a format Pillow cannot identify: OpenCV's reader below decides (and reports)
    check_pixels(path, w, h, max_pixels)
    return w, h, orientation


def image_size(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`read_image` returns it (upright), from the header alone.

    Raises:
        UserError: unreadable file, or above ``max_pixels``.
    """
    path = Path(path)
    if is_tiff(path):
        h, w = _tiff_page_hw(path, max_pixels)
        return w, h
    w, h, orientation = _open_header(path, max_pixels)
    if w == 0:
        img = read_image(path, max_pixels)
        return img.shape[1], img.shape[0]
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def is_tiff(path: str | os.PathLike[str]) -> bool:
    """Whether :func:`read_image` reads ``path`` as a TIFF (by its suffix), which may hold several pages."""
    return Path(path).suffix.lower() in (".tif", ".tiff")


def image_pages(path: str | os.PathLike[str]) -> int:
    """How many images a file holds: a TIFF's pages (a stack's slices, as ``segfactory ingest`` takes them, each
    readable with ``read_image(path, page=i)``), 1 for every other format. Only the page headers are read.

    Raises:
        UserError: an unreadable TIFF.
    """
    if not is_tiff(path):
        return 1
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            tf.pages.cache = False  # a long stack must not keep every page object it has passed
            return len(tf.pages)
    except Exception as e:  # tifffile raises many types for corrupt files
        raise UserError(f"cannot read image '{path}': {e}", fix="re-save it as PNG, JPEG or TIFF") from None


def _tiff_page_hw(path: Path, max_pixels: int, page: int = 0) -> tuple[int, int]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            shape = tuple(int(s) for s in tf.pages[page].shape)
    except Exception as e:  # tifffile raises many types for corrupt files
        raise UserError(f"cannot read image '{path}': {e}", fix="re-save it as PNG, JPEG or TIFF") from None
    planar = len(shape) == 3 and shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4)
    h, w = (shape[1], shape[2]) if planar else (shape[0], shape[1] if len(shape) > 1 else 1)
    check_pixels(path, w, h, max_pixels)
    return h, w


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_without_iccp(data: bytes) -> bytes:
    """PNG bytes without their iCCP chunk (an embedded ICC colour profile), else ``data`` unchanged.

    OpenCV ignores colour profiles, so its decode of the result has the same pixels; what is avoided is libpng's
    warning on stderr about a profile it finds faulty (``iCCP: known incorrect sRGB profile``, ``iCCP: profile
    ...: invalid rendering intent``), printed by the C library once per decode. Bytes that are not a PNG, or
    whose chunks end early, are returned as they are (the decoder then reports them).
    """
    if not data.startswith(PNG_SIGNATURE):
        return data
    i = len(PNG_SIGNATURE)
    while i + 8 <= len(data):
        length, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
        end = i + 12 + length  # length, type, data, CRC
        if kind == b"iCCP":
            return data[:i] + data[end:] if end <= len(data) else data
        if kind in (b"IDAT", b"IEND"):  # iCCP comes before the first IDAT, or not at all
            return data
        i = end
    return data


def cv2_imread(path: str | os.PathLike[str], flags: int = cv2.IMREAD_UNCHANGED) -> npt.NDArray[Any] | None:
    """``cv2.imread(path, flags)`` (BGR order, ``None`` when unreadable) without libpng's colour-profile warnings:
    a PNG is decoded without its iCCP chunk (:func:`png_without_iccp`). For code that wants OpenCV's own layout;
    everything else reads with :func:`read_image`."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        return cv2.imread(str(path), flags)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data:
        return None
    return cv2.imdecode(np.frombuffer(png_without_iccp(data), np.uint8), flags)


def _is_jpeg(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(3) == b"\xff\xd8\xff"
    except OSError:
        return False  # the reader below reports it


def _read_jpeg(path: Path, max_pixels: int) -> npt.NDArray[Any]:
    """A JPEG's pixels, upright, decoded by Pillow as ``segfactory ingest`` decodes them (the same libjpeg-turbo
    pixels as OpenCV's): a truncated file is refused with one line, instead of libjpeg's "Premature end of JPEG
    file" on stderr and a grey bottom that OpenCV would return."""
    _, _, orientation = _open_header(path, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked from the header above
            with Image.open(path) as im:
                im.load()
                # CMYK, YCbCr: converted as ingest converts them
                arr: npt.NDArray[Any] = np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read image '{path}': truncated or corrupt JPEG ({e})",
                        fix="re-save or re-copy it, or remove it") from None
    return apply_orientation(arr, orientation)


def read_image(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS, page: int = 0) -> Pixels:
    """Read an image keeping bit depth: (H, W) gray or (H, W, 3) RGB, uint8 or uint16; every other pixel type
    ``segfactory ingest`` takes as float32 (:func:`as_pixels`).

    Alpha channels are dropped; TIFFs are read with tifffile (one page: ``page``, the first by default; see
    :func:`image_pages`), everything else with OpenCV. A JPEG is returned upright (its EXIF orientation applied, as
    ``segfactory ingest`` stores it).

    Args:
        path: The file.
        max_pixels: Larger images are refused from their header, before decoding (decompression bombs).
        page: The TIFF page to read (other formats hold one image: only 0).

    Raises:
        UserError: unreadable file, unsupported pixel type or above ``max_pixels``, naming the file.
    """
    path = Path(path)
    img: npt.NDArray[Any] | None
    if page and not is_tiff(path):
        raise ValueError(f"'{path}' is not a TIFF: it has no page {page}")
    if is_tiff(path):
        import tifffile

        _tiff_page_hw(path, max_pixels, page)
        try:
            img = np.asarray(tifffile.imread(path, key=page))
        except Exception as e:  # tifffile raises many types for corrupt files
            raise UserError(f"cannot read image '{path}': {e}", fix="re-save it as PNG, JPEG or TIFF") from None
        if img.ndim == 3 and img.shape[0] in (1, 3, 4) and img.shape[2] not in (1, 3, 4):
            img = np.moveaxis(img, 0, -1)  # planar TIFF
    elif _is_jpeg(path):
        img = _read_jpeg(path, max_pixels)
    else:
        _, _, orientation = _open_header(path, max_pixels)
        img = cv2_imread(path)  # IMREAD_UNCHANGED ignores EXIF: applied below
        if img is None:
            raise UserError(f"cannot read image '{path}' (missing, corrupt or not an image)",
                            fix="re-save it as PNG, JPEG or TIFF, or remove it")
        if img.ndim == 3 and img.shape[2] >= 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)
        img = apply_orientation(img, orientation)
    if img.ndim == 3:
        if img.shape[2] == 1 or img.shape[2] == 2:  # gray (+ alpha)
            img = img[..., 0]
        elif img.shape[2] == 4:
            img = img[..., :3]
        elif img.shape[2] != 3:
            raise UserError(f"image '{path}' has {img.shape[2]} channels", fix="use gray or RGB images")
    if img.ndim not in (2, 3):
        raise UserError(f"image '{path}' has shape {img.shape}", fix="use 2-D gray or RGB images")
    return as_pixels(img, path)


def as_pixels(img: npt.NDArray[Any], path: str | os.PathLike[str] = "") -> Pixels:
    """Decoded pixels in the types :func:`read_image` returns: uint8 and uint16 as they are, booleans as 0/255
    uint8 (as ingest stores them), every other integer or float type as float32 with non-finite values as 0 (the
    values ingest's percentile stretch sees).

    Raises:
        UserError: a pixel type that is not a number (complex, ...), naming the file.
    """
    if img.dtype in (np.uint8, np.uint16):
        return np.ascontiguousarray(img)
    if img.dtype == np.bool_:
        return img.astype(np.uint8) * np.uint8(255)
    if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise UserError(f"image '{path}' has pixel type {img.dtype}",
                        fix="convert it to integers or real floating-point numbers")
    out = img.astype(np.float32)
    if not np.isfinite(out).all():
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(out)


def stretch_range(img: npt.NDArray[Any], low_pct: float = PERCENTILES[0], high_pct: float = PERCENTILES[1]
                  ) -> tuple[float, float]:
    """The values the percentile stretch maps to 0 and 1: the one rule for images deeper than 8 bit, shared by
    ``segfactory ingest`` (which stores them as 8 bit) and fine-tuning/prediction (``input.scaling=auto`` and
    ``percentile``).

    The ``low_pct`` and ``high_pct`` percentiles over all channels (of a strided sample of about
    :data:`STRETCH_SAMPLE` pixels: exact for smaller images, and O(1 M) for huge scans), non-finite values taken
    as 0; when they coincide (a nearly constant image with a few bright spots) the range is ``lo..lo + 1``, so
    the spots stay visible instead of the whole image turning black.
    """
    step = max(1, int(math.sqrt(img.size / STRETCH_SAMPLE)))
    sample = np.asarray(img[::step, ::step], dtype=np.float32)
    if not np.isfinite(sample).all():
        sample = np.nan_to_num(sample, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(v) for v in np.percentile(sample, [low_pct, high_pct]))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def read_mask(path: str | os.PathLike[str], max_pixels: int = MAX_PIXELS
              ) -> npt.NDArray[np.uint8] | npt.NDArray[np.int32]:
    """Read a class-id mask PNG as (H, W) integers (palette PNGs give their indices, not colours).

    Args:
        path: The file.
        max_pixels: Larger masks are refused from their header, before decoding (decompression bombs).

    Raises:
        UserError: unreadable, multi-channel, floating-point or too large mask, naming the file.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_pixels decides
            with Image.open(path) as im:
                check_pixels(path, im.size[0], im.size[1], max_pixels)
                if im.mode == "F":  # a float32 TIFF
                    _refuse_float_mask(path, "float32")
                if im.mode not in ("L", "P", "I", "I;16", "I;16B", "1"):
                    raise UserError(f"mask '{path}' is a {im.mode} image, not class ids",
                                    fix="save masks as single-channel PNGs whose values are class ids")
                orientation = exif_orientation(im)
                arr: npt.NDArray[Any] = np.array(im)
    except UserError:
        raise
    except Image.DecompressionBombError as e:
        raise UserError(f"mask '{path}' is above the decompression-bomb limit of {max_pixels} pixels ({e})",
                        fix="downscale or tile it (a labeled image and its mask must fit the limit)") from None
    except (OSError, ValueError) as e:
        if is_tiff(path) and (kind := _tiff_float_type(path)) is not None:  # float16/64: Pillow cannot open them
            _refuse_float_mask(path, kind)
        raise UserError(f"cannot read mask '{path}': {e}", fix="re-save it as a single-channel PNG") from None
    arr = apply_orientation(arr, orientation)  # a JPEG mask (lossy, discouraged) is upright like its image
    return arr if arr.dtype == np.uint8 else arr.astype(np.int32, copy=False)


def _tiff_float_type(path: str | os.PathLike[str]) -> str | None:
    """A TIFF's floating-point pixel type from its first page's header (``float32``...), ``None`` for any other
    type or a file tifffile cannot read (the reader then says what is wrong)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            dtype = tf.pages[0].dtype
    except Exception:  # tifffile raises many types for corrupt files; Pillow's read below reports them
        return None
    return str(dtype) if dtype is not None and np.dtype(dtype).kind == "f" else None


def _refuse_float_mask(path: str | os.PathLike[str], dtype: str) -> None:
    raise UserError(f"mask '{path}' has floating-point pixels ({dtype}): a class mask holds whole class ids "
                    "(0, 1, 2, ...), and float values (probabilities, resampled or scaled labels) are not ids",
                    fix="save the mask's integer class ids as uint8 (uint16 above 255 ids), e.g. "
                        "tifffile.imwrite(path, np.rint(mask).astype(np.uint8)), or as a PNG")


def write_image(path: str | os.PathLike[str], img: ImageArray, jpeg_quality: int = 95) -> None:
    """Write PNG/JPEG (RGB in, OpenCV's BGR on disk; 8 or 16 bit), failing loudly instead of silently."""
    path = Path(path)
    on_disk = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    params = ([cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if path.suffix in (".jpg", ".jpeg")
              else [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not cv2.imwrite(str(path), on_disk, params):
        raise OSError(f"could not write {path}")
