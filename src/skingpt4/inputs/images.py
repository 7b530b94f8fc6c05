"""The one place where untrusted image bytes are decoded.

Every entry point (demo, REST API, CLI, batch evaluation) must turn uploads into pixels through
:func:`load_image`, so that the same limits and normalisation apply everywhere
(docs/reliability.md §1.1, §1.2):

* a byte-size cap before Pillow sees anything, and a format allowlist (``Image.open`` picks the
  parser from magic bytes, never from the file name);
* width/height checked from the header *before* pixels are decoded (a 10 KiB PNG can declare
  81 Mpx and cost 400 MiB of RAM);
* truncated files are rejected, never grey-filled, and no process-wide Pillow flag is changed;
* EXIF orientation is applied, then every byte of metadata (EXIF/GPS, XMP, ICC, text chunks) is
  dropped by rebuilding the image from raw pixels;
* modes that ``convert("RGB")`` silently mangles (alpha, 16-bit, float) are converted on purpose.

What this module does not do: colour-manage ICC profiles (they are dropped, pixels are taken as sRGB), or reject
alpha channels hiding content (they are composited away). Running it in a child process with rlimits and a
timeout is `sandbox.py`'s job; the web app and the HTTP API decode uploads there.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from skingpt4.text import readable

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_LIMITS",
    "ImageLimits",
    "ImageRejected",
    "load_image",
    "png_bytes",
    "png_data_uri",
    "read_source",
    "sha256_bytes",
    "thumbnail",
]

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

# Pillow format names accepted by Image.open. MPO (multi-picture JPEG from phones/cameras) is opened by the
# JPEG plugin itself, so it is accepted as JPEG and its first picture is used.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
_DISPLAY_NAMES = {"JPEG": "JPEG", "PNG": "PNG", "WEBP": "WebP", "BMP": "BMP", "TIFF": "TIFF"}
_ALLOWED_TEXT = "allowed: " + ", ".join(_DISPLAY_NAMES[f] for f in ALLOWED_FORMATS)
_WHITE = (255, 255, 255)
_NO_MEMORY = "image needs too much memory to decode"
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class ImageRejected(ValueError):
    """The input is not an acceptable image. ``str(exc)`` is one human-readable line, safe to show
    the uploader and to log: it never contains file contents."""


@dataclass(frozen=True)
class ImageLimits:
    """Caps applied to every image. The model sees 224x224, so these only need to admit real photos.

    Defaults, and why:
    * ``max_bytes`` 50 MiB: above any camera JPEG or 16-bit dermatoscope TIFF, and bounds the in-memory copy.
    * ``max_pixels`` 40 Mpx: admits 12 Mpx phone photos and 8000x5000 DSLR frames, stays well below Pillow's
      bomb warning (89.5 Mpx) and bounds the RGB buffer to ~120 MiB. Full-resolution 48 Mpx phone shots
      (8064x6048) are rejected; a deployment that needs them raises the cap.
    * ``max_side`` 16,384 px: stops 40,000x1,000 strips that pass the pixel cap but are not photos.
    * ``min_side`` 8 px: a 1x1 upload upsampled to 224x224 yields a confident answer about nothing.
    """

    max_bytes: int = 50 * 2**20
    max_pixels: int = 40_000_000
    max_side: int = 16_384
    min_side: int = 8

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels, self.max_side, self.min_side) < 1:
            raise ValueError("ImageLimits values must be positive")
        if self.min_side > self.max_side:
            raise ValueError("ImageLimits.min_side must not exceed max_side")


DEFAULT_LIMITS = ImageLimits()


def load_image(source: ImageSource, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode ``source`` (path, bytes or binary file object) into a fresh 8-bit RGB image without metadata.

    Raises :class:`ImageRejected` with a one-line reason for anything that is not an acceptable image.
    The returned image shares nothing with the input: ``img.info == {}`` and ``img.getexif()`` is empty.
    """
    data = read_source(source, limits.max_bytes)
    with warnings.catch_warnings():
        # Turn Pillow's bomb *warning* (the image would still be decoded) into an error, locally.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(data, limits)
        with img:
            _check_geometry(img.size, limits)
            rgb = _decode_to_rgb(img, limits)
            # Rebuild from raw pixels: nothing of the file (EXIF, GPS, XMP, ICC, text chunks) can survive.
            try:
                return Image.frombytes("RGB", rgb.size, rgb.tobytes())
            except MemoryError:
                raise ImageRejected(_NO_MEMORY) from None


def read_source(source: ImageSource, max_bytes: int) -> bytes:
    """Read the whole input, at most ``max_bytes`` of it, so Pillow never touches the caller's file or path."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = memoryview(source).nbytes
        if size > max_bytes:
            raise ImageRejected(f"file too large: {size:,} bytes (limit {max_bytes:,})")
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        data = _read_path(Path(source), max_bytes)
    elif hasattr(source, "read"):
        data = source.read(max_bytes + 1)
        if not isinstance(data, bytes):
            raise TypeError("file object must be opened in binary mode")
    else:
        raise TypeError(f"unsupported image source type {type(source).__name__}")
    if len(data) > max_bytes:
        raise ImageRejected(f"file too large: over the {max_bytes:,}-byte limit")
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    return data


def _read_path(path: Path, max_bytes: int) -> bytes:
    """Open without blocking (a FIFO would hang a plain open), then check it is a regular file via fstat."""
    name = readable(path.name or str(path))  # one line for a person: a name that is not UTF-8, written out
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ImageRejected(f"no such file: {name}") from None
    except IsADirectoryError:
        raise ImageRejected(f"is a directory, not an image file: {name}") from None
    except PermissionError:
        raise ImageRejected(f"permission denied: {name}") from None
    except OSError as exc:
        raise ImageRejected(f"cannot open file: {name} ({exc.strerror or 'OS error'})") from None
    try:
        _check_regular_file(os.fstat(fd), name, max_bytes)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        return fh.read(max_bytes + 1)


def _check_regular_file(info: os.stat_result, name: str, max_bytes: int) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise ImageRejected(f"is a directory, not an image file: {name}")
    if not stat.S_ISREG(info.st_mode):
        raise ImageRejected(f"not a regular file: {name}")
    if info.st_size > max_bytes:
        raise ImageRejected(f"file too large: {info.st_size:,} bytes (limit {max_bytes:,})")


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    """Parse the header only (Pillow is lazy), restricted to the allowlist."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageRejected(_describe_unsupported(data[:1024])) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(_bomb_message(limits)) from None
    except Exception:  # any parser failure on untrusted bytes is a rejection, not a crash
        raise ImageRejected("image is truncated or corrupt (header could not be parsed)") from None


def _check_geometry(size: tuple[int, int], limits: ImageLimits) -> None:
    """Reject from the header size, before any pixel buffer is allocated."""
    width, height = size
    if max(width, height) > limits.max_side:
        raise ImageRejected(f"image too large: {width}x{height} pixels (longest side limit {limits.max_side:,} px)")
    if width * height > limits.max_pixels:
        raise ImageRejected(f"image too large: {width}x{height} pixels (limit {limits.max_pixels:,})")
    if min(width, height) < limits.min_side:
        raise ImageRejected(f"image too small: {width}x{height} (minimum side {limits.min_side} px)")


def _decode_to_rgb(img: Image.Image, limits: ImageLimits) -> Image.Image:
    """Decode the first frame (``open`` leaves multi-frame files on frame 0), orient it, convert to RGB."""
    try:
        img.load()  # truncated data raises here; LOAD_TRUNCATED_IMAGES is never turned on
        oriented = ImageOps.exif_transpose(img)
        return _to_rgb(oriented)
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(_bomb_message(limits)) from None
    except MemoryError:
        raise ImageRejected(_NO_MEMORY) from None
    except Exception:
        raise ImageRejected("image is truncated or corrupt") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB without the silent losses of a bare ``convert("RGB")``.

    * alpha (RGBA, LA, PA, P/L/RGB with a tRNS colour): composited over white, so hidden pixels stay hidden;
    * 16-bit greyscale (I;16*, and I which Pillow uses for 16-bit data): value / 257, rounded, clipped to 0..255;
    * float F: assumed to be in [0, 1] (the usual convention for float TIFFs), x 255, rounded, clipped;
    * 1, L, P, CMYK, YCbCr, LAB, HSV, RGBX: Pillow's own conversion (ICC profiles are not applied).
    """
    try:
        if img.mode in _SIXTEEN_BIT_MODES:
            values = np.asarray(img)
            grey = _grey_array_to_rgb(values.astype(np.float64) / 257.0)
            if "transparency" in img.info:  # a tRNS grey value: those pixels are hidden, so they become white
                flat = Image.new("RGB", grey.size, _WHITE)
                flat.paste(grey, mask=Image.fromarray((values != img.info["transparency"]).astype(np.uint8) * 255))
                return flat
            return grey
        if img.mode == "F":
            return _grey_array_to_rgb(np.asarray(img).astype(np.float64) * 255.0)
        if img.mode in _ALPHA_MODES or "transparency" in img.info:
            rgba = img.convert("RGBA")
            flat = Image.new("RGB", rgba.size, _WHITE)
            flat.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
            return flat
        return img if img.mode == "RGB" else img.convert("RGB")
    except ValueError:  # Pillow: "conversion from X to Y not supported"
        raise ImageRejected(f"unsupported colour mode {img.mode!r}") from None


def _grey_array_to_rgb(values: np.ndarray) -> Image.Image:
    """Round and clip a 2-D float array of 0..255 grey levels into an RGB image (NaN becomes 0)."""
    grey = np.clip(np.nan_to_num(np.rint(values), nan=0.0), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _bomb_message(limits: ImageLimits) -> str:
    """Pillow's bomb check fires inside ``open`` before the size is known to us; it only fires above its own cap."""
    return f"image too large: over {Image.MAX_IMAGE_PIXELS:,} pixels (limit {limits.max_pixels:,})"


# Magic bytes of the allowed formats and of common things people upload that are not, for the message only:
# sniffing here avoids running any further Pillow parser on bytes that were already refused.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG", True),
    (b"\xff\xd8\xff", "JPEG", True),
    (b"BM", "BMP", True),
    (b"II*\x00", "TIFF", True),
    (b"MM\x00*", "TIFF", True),
    (b"GIF87a", "GIF", True),
    (b"GIF89a", "GIF", True),
    (b"\x00\x00\x01\x00", "ICO", True),
    (b"8BPS", "PSD", True),
    (b"%!PS", "EPS", True),
    (b"\xc5\xd0\xd3\xc6", "EPS", True),
    (b"\xff\x4f\xff\x51", "JPEG 2000", True),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000", True),
    (b"qoif", "QOI", True),
    (b"DDS ", "DDS", True),
    (b"DICM", "DICOM", True),
    (b"%PDF", "PDF", False),
    (b"PK\x03\x04", "ZIP", False),
    (b"PK\x05\x06", "ZIP", False),
    (b"\x1f\x8b", "GZIP", False),
)
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"heif": "HEIF", b"avif": "AVIF"}


def _describe_unsupported(head: bytes) -> str:
    """One line saying what the bytes look like; never echoes the bytes themselves."""
    kind, is_image = _sniff(head)
    if kind in _DISPLAY_NAMES.values():  # allowed magic, but Pillow's parser refused the header
        return f"image is truncated or corrupt ({kind} header could not be parsed)"
    if kind is not None and is_image:
        return f"unsupported image format {kind!r}; {_ALLOWED_TEXT}"
    if kind is not None:
        return f"not an image file (looks like {kind}); {_ALLOWED_TEXT}"
    return f"not an image file, or an unsupported image format; {_ALLOWED_TEXT}"


def _sniff(head: bytes) -> tuple[str | None, bool]:
    for magic, kind, is_image in _MAGIC:
        if head.startswith(magic) or (kind == "DICOM" and head[128:132] == magic):
            return kind, is_image
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP", True
    if head[4:8] == b"ftyp" and head[8:12] in _ISO_BRANDS:
        return _ISO_BRANDS[head[8:12]], True
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text:
        return "SVG", True
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML", False
    if text.startswith(b"<?xml"):
        return "XML", False
    return None, False


# ---------------------------------------------------------------------------------------------------------------
# Decoded pixels out: re-encoded, never the uploaded bytes


def thumbnail(image: Image.Image, side: int = 256) -> Image.Image:
    """A copy at most `side` pixels on its longer side."""
    small = image.copy()
    small.thumbnail((side, side))
    return small


def png_bytes(image: Image.Image) -> bytes:
    """PNG of the pixels alone (`load_image` left no metadata to carry over)."""
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def png_data_uri(image: Image.Image) -> str:
    """An inline `data:` URI, so that a page shows the image without a file or a URL."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
