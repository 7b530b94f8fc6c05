"""Tests for skingpt4.inputs.images.load_image: every input is generated here, nothing is read from fixtures."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from malformed import encode, png_chunk
from PIL import Image, ImageCms, PngImagePlugin

from skingpt4.inputs.images import ALLOWED_FORMATS, DEFAULT_LIMITS, ImageLimits, ImageRejected, load_image

ALLOWED_TEXT = "allowed: JPEG, PNG, WebP, BMP, TIFF"
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def png_with_header(width: int, height: int) -> bytes:
    """A tiny 8-bit greyscale PNG whose IHDR claims width x height but whose IDAT holds a few bytes only:
    decoding it would fail as truncated, so a size rejection proves the check ran before decoding."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def noise(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def assert_clean_rgb(img: Image.Image) -> None:
    assert img.mode == "RGB"
    assert img.info == {}
    assert len(img.getexif()) == 0


def rejected(source, limits: ImageLimits = DEFAULT_LIMITS) -> str:
    with pytest.raises(ImageRejected) as info:
        load_image(source, limits)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- allowed formats --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kwargs", "tolerance"),
    [("JPEG", {"quality": 95}, 4), ("PNG", {}, 0), ("WEBP", {"lossless": True}, 0), ("BMP", {}, 0), ("TIFF", {}, 0)],
)
def test_each_allowed_format_round_trips_to_rgb(fmt, kwargs, tolerance):
    original = Image.new("RGB", (20, 16), (200, 10, 30))
    img = load_image(encode(original, fmt, **kwargs))
    assert_clean_rgb(img)
    assert img.size == (20, 16)
    assert np.abs(np.asarray(img, dtype=int) - (200, 10, 30)).max() <= tolerance


def test_allowlist_is_the_documented_one():
    assert ALLOWED_FORMATS == ("JPEG", "PNG", "WEBP", "BMP", "TIFF")


def test_noise_png_is_pixel_exact():
    original = noise()
    img = load_image(encode(original, "PNG"))
    assert np.array_equal(np.asarray(img), np.asarray(original))


def test_result_is_independent_of_pillow_file_object():
    img = load_image(encode(noise(), "PNG"))
    assert not hasattr(img, "fp") or img.fp is None
    assert img.format is None  # a fresh image, not an ImageFile


# --- rejected formats and non-images ----------------------------------------------------------------------


def test_gif_rejected_with_format_name():
    gif = encode(Image.new("RGB", (20, 20), RED), "GIF")
    assert rejected(gif) == f"unsupported image format 'GIF'; {ALLOWED_TEXT}"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10"/>',
            "unsupported image format 'SVG'",
        ),
        (b"  <svg width='10' height='10'><rect/></svg>", "unsupported image format 'SVG'"),
        (b"<!DOCTYPE html><html><body>hello</body></html>", "not an image file (looks like HTML)"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "not an image file (looks like PDF)"),
        (b"x", "not an image file, or an unsupported image format"),
        (b"hello, this is plain text and not a picture", "not an image file, or an unsupported image format"),
    ],
)
def test_non_images_rejected_with_reason(data, expected):
    message = rejected(data)
    assert message == f"{expected}; {ALLOWED_TEXT}"


def test_zip_rejected():
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("photo.jpg", encode(noise(), "JPEG"))
    assert rejected(buf.getvalue()) == f"not an image file (looks like ZIP); {ALLOWED_TEXT}"


def test_empty_input_rejected():
    assert rejected(b"") == "empty file (0 bytes)"
    assert rejected(io.BytesIO()) == "empty file (0 bytes)"


def test_message_never_contains_file_contents():
    secret = b"PATIENT-NAME-Jane-Doe-MRN-123456"
    for data in (secret, b"GIF89a" + secret, b"\x89PNG\r\n\x1a\n" + secret, b"<svg>" + secret):
        message = rejected(data)
        assert "Jane" not in message and "123456" not in message


def test_tiff_bytes_named_png_are_decoded_by_content(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(encode(Image.new("RGB", (12, 10), BLUE), "TIFF"))
    img = load_image(path)
    assert_clean_rgb(img)
    assert img.getpixel((3, 3)) == BLUE


def test_png_bytes_named_gif_are_accepted(tmp_path):
    path = tmp_path / "photo.gif"
    path.write_bytes(encode(Image.new("RGB", (12, 10), GREEN), "PNG"))
    assert load_image(str(path)).getpixel((0, 0)) == GREEN


# --- truncated / corrupt ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_rejected_not_grey_filled(fmt):
    data = encode(noise((128, 128)), fmt)
    assert rejected(data[: len(data) // 2]) == "image is truncated or corrupt"


def test_png_signature_followed_by_garbage_rejected():
    message = rejected(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    assert message == "image is truncated or corrupt (PNG header could not be parsed)"
    assert rejected(b"\xff\xd8\xff") == "image is truncated or corrupt (JPEG header could not be parsed)"
    assert rejected(png_with_header(0, 0)) == "image is truncated or corrupt (PNG header could not be parsed)"


def test_corrupt_png_crc_rejected():
    data = bytearray(encode(noise((32, 32)), "PNG"))
    data[40] ^= 0xFF  # inside IDAT: breaks the chunk CRC / zlib stream
    assert rejected(bytes(data)).startswith("image is truncated or corrupt")


# --- size limits ------------------------------------------------------------------------------------------


def test_pixel_cap_rejects_from_header_before_decoding():
    data = png_with_header(9000, 9000)
    assert len(data) < 200
    limits = ImageLimits(max_pixels=1_000_000)
    assert rejected(data, limits) == "image too large: 9000x9000 pixels (limit 1,000,000)"
    # the same file under a generous cap reaches the decoder, which finds it truncated: so the cap ran first
    assert rejected(data, ImageLimits(max_pixels=100_000_000)) == "image is truncated or corrupt"


def test_pillow_bomb_guard_still_applies_when_limits_are_raised_above_it():
    limits = ImageLimits(max_pixels=200_000_000, max_side=20_000)
    message = rejected(png_with_header(10_000, 10_000), limits)  # 100 Mpx: only a warning in plain Pillow
    assert message == "image too large: over 89,478,485 pixels (limit 200,000,000)"


def test_default_pixel_cap_is_40_megapixels():
    assert rejected(png_with_header(8000, 5001)) == "image too large: 8000x5001 pixels (limit 40,000,000)"
    assert rejected(png_with_header(8000, 5000)) == "image is truncated or corrupt"  # at the cap: decoded


@pytest.mark.parametrize("side", [12_000, 30_000])
def test_pillow_decompression_bomb_becomes_rejection(side, recwarn):
    assert rejected(png_with_header(side, side)) == "image too large: over 89,478,485 pixels (limit 40,000,000)"
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_decompression_bomb_filter_does_not_leak():
    import warnings

    before = list(warnings.filters)
    rejected(png_with_header(12_000, 12_000))
    assert warnings.filters == before
    assert Image.MAX_IMAGE_PIXELS == 89_478_485


def test_longest_side_cap():
    assert rejected(png_with_header(20_000, 100)) == "image too large: 20000x100 pixels (longest side limit 16,384 px)"


def test_min_side():
    assert rejected(encode(Image.new("RGB", (1, 1)), "PNG")) == "image too small: 1x1 (minimum side 8 px)"
    assert rejected(encode(Image.new("RGB", (400, 7)), "PNG")) == "image too small: 400x7 (minimum side 8 px)"
    assert load_image(encode(Image.new("RGB", (8, 8)), "PNG")).size == (8, 8)
    assert rejected(encode(Image.new("RGB", (40, 40)), "PNG"), ImageLimits(min_side=64)) == (
        "image too small: 40x40 (minimum side 64 px)"
    )


def test_byte_cap_before_pillow(tmp_path):
    data = encode(noise(), "PNG")
    limits = ImageLimits(max_bytes=len(data) - 1)
    assert rejected(data, limits) == f"file too large: {len(data):,} bytes (limit {len(data) - 1:,})"
    assert rejected(memoryview(data), limits) == f"file too large: {len(data):,} bytes (limit {len(data) - 1:,})"
    assert rejected(io.BytesIO(data), limits) == f"file too large: over the {len(data) - 1:,}-byte limit"
    path = tmp_path / "big.png"
    path.write_bytes(data)
    assert rejected(path, limits) == f"file too large: {len(data):,} bytes (limit {len(data) - 1:,})"
    assert load_image(data, ImageLimits(max_bytes=len(data))).size == (64, 48)


def test_limits_validation():
    with pytest.raises(ValueError):
        ImageLimits(max_pixels=0)
    with pytest.raises(ValueError):
        ImageLimits(min_side=100, max_side=50)


# --- metadata and orientation -----------------------------------------------------------------------------


def make_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    exif[0x010F] = "PhoneMaker"  # Make
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (51.0, 30.0, 0.0)  # GPSLatitudeRef, GPSLatitude
    return exif


def test_exif_orientation_applied_then_all_metadata_dropped():
    original = Image.new("RGB", (40, 30), (0, 0, 0))
    original.paste(RED, (0, 0, 10, 10))  # red block at the top-left of the stored pixels
    data = encode(original, "JPEG", exif=make_exif(6), quality=95)
    raw = Image.open(io.BytesIO(data))
    assert raw.size == (40, 30) and raw.getexif().get_ifd(0x8825)  # GPS really is in the file
    img = load_image(data)
    assert img.size == (30, 40)
    assert_clean_rgb(img)
    # orientation 6 = rotate 90 degrees clockwise for display: the top-left block moves to the top-right
    r, g, b = img.getpixel((25, 4))
    assert r > 200 and g < 40 and b < 40
    assert max(img.getpixel((4, 4))) < 40
    assert b"PhoneMaker" not in encode(img, "PNG")


def test_png_text_chunk_and_icc_profile_dropped():
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "patient Jane Doe")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(Image.new("RGB", (16, 16), GREEN), "PNG", pnginfo=info, icc_profile=icc)
    assert set(Image.open(io.BytesIO(data)).info) >= {"Comment", "icc_profile"}
    img = load_image(data)
    assert_clean_rgb(img)
    assert img.getpixel((0, 0)) == GREEN
    assert b"Jane" not in encode(img, "PNG")


def test_bytes_appended_after_image_are_ignored():
    img = load_image(encode(Image.new("RGB", (16, 16), BLUE), "JPEG") + b"hidden zip payload" * 10)
    assert_clean_rgb(img)


# --- mode conversions -------------------------------------------------------------------------------------


def test_rgba_fully_transparent_red_becomes_white():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 128))
    img = load_image(encode(rgba, "PNG"))
    assert img.getpixel((5, 5)) == WHITE
    assert img.getpixel((0, 0)) == BLUE
    assert img.getpixel((1, 0)) == (127, 127, 127)  # 50 % black over white


def test_rgba_webp_transparent_becomes_white():
    img = load_image(encode(Image.new("RGBA", (10, 10), (255, 0, 0, 0)), "WEBP", lossless=True))
    assert img.getpixel((5, 5)) == WHITE


def test_la_transparent_grey_becomes_white():
    la = Image.new("LA", (10, 10), (128, 0))
    la.putpixel((0, 0), (0, 255))
    img = load_image(encode(la, "PNG"))
    assert img.getpixel((5, 5)) == WHITE
    assert img.getpixel((0, 0)) == (0, 0, 0)


def test_palette_with_transparency_becomes_white():
    pal = Image.new("P", (10, 10), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    data = encode(pal, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).info["transparency"] == 0
    img = load_image(data)
    assert img.getpixel((5, 5)) == WHITE  # palette index 0 is red but transparent
    assert img.getpixel((0, 0)) == GREEN


def test_palette_without_transparency_keeps_colours():
    pal = Image.new("P", (10, 10), 1)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    assert load_image(encode(pal, "PNG")).getpixel((5, 5)) == GREEN


def test_grey_with_trns_colour_becomes_white():
    data = encode(Image.new("L", (10, 10), 77), "PNG", transparency=77)
    assert load_image(data).getpixel((1, 1)) == WHITE


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(fmt):
    values = np.full((10, 12), 30000, dtype=np.uint16)
    values[0, 0], values[0, 1] = 65535, 0
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    img = load_image(encode(source, fmt))
    assert img.getpixel((5, 5)) == (117, 117, 117)  # round(30000 / 257) = 117, not 255
    assert abs(img.getpixel((5, 5))[0] - 30000 // 257) <= 1
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == (0, 0, 0)


def test_float_tiff_is_scaled_from_unit_range_and_clipped():
    values = np.full((10, 10), 0.5, dtype=np.float32)
    values[0, 0], values[0, 1] = 2.0, -1.0
    img = load_image(encode(Image.fromarray(values, "F"), "TIFF"))
    assert img.getpixel((5, 5)) == (128, 128, 128)  # round(0.5 * 255), not black
    assert img.getpixel((0, 0)) == WHITE
    assert img.getpixel((1, 0)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_converted(fmt):
    img = load_image(encode(Image.new("CMYK", (10, 10), (0, 255, 255, 0)), fmt))
    r, g, b = img.getpixel((5, 5))
    assert r >= 250 and g <= 5 and b <= 5


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF"])
def test_one_bit_and_grey_converted(fmt):
    one = Image.new("1", (10, 10), 0)
    one.putpixel((0, 0), 1)
    img = load_image(encode(one, fmt))
    assert img.getpixel((0, 0)) == WHITE and img.getpixel((5, 5)) == (0, 0, 0)
    assert load_image(encode(Image.new("L", (10, 10), 77), fmt)).getpixel((3, 3)) == (77, 77, 77)


def test_ycbcr_tiff_converted():
    data = encode(Image.new("YCbCr", (10, 10), (128, 128, 128)), "TIFF")
    if int(PIL.__version__.split(".")[0]) < 13:  # Pillow 12 writes this TIFF short and cannot read it back itself
        with pytest.raises(ImageRejected, match="truncated or corrupt"):
            load_image(data)
        return
    assert load_image(data).getpixel((2, 2)) == (128, 128, 128)


# --- multi-frame ------------------------------------------------------------------------------------------


def two_frames():
    return Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)


@pytest.mark.parametrize(
    ("fmt", "kwargs"),
    [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {}), ("MPO", {"quality": 95})],
)
def test_animation_takes_first_frame(fmt, kwargs):
    first, second = two_frames()
    data = encode(first, fmt, save_all=True, append_images=[second], **kwargs)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    r, g, b = load_image(data).getpixel((8, 8))
    assert r >= 250 and g <= 5 and b <= 5


# --- sources ----------------------------------------------------------------------------------------------


def test_path_str_pathlib_bytes_bytearray_memoryview_and_file_object(tmp_path):
    data = encode(Image.new("RGB", (12, 10), GREEN), "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        sources = [path, str(path), data, bytearray(data), memoryview(data), io.BytesIO(data), fh]
        for source in sources:
            img = load_image(source)
            assert_clean_rgb(img)
            assert img.getpixel((0, 0)) == GREEN


def test_unseekable_file_object():
    class Stream(io.RawIOBase):
        def __init__(self, data):
            self._inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buffer):
            return self._inner.readinto(buffer)

    data = encode(Image.new("RGB", (12, 10), GREEN), "PNG")
    assert load_image(io.BufferedReader(Stream(data))).getpixel((0, 0)) == GREEN


def test_text_file_object_is_a_programming_error():
    with pytest.raises(TypeError, match="binary mode"):
        load_image(io.StringIO("abc"))
    with pytest.raises(TypeError, match="int"):
        load_image(42)


def test_directory_path_rejected(tmp_path):
    folder = tmp_path / "Smith_John_scans"
    folder.mkdir()
    assert rejected(folder) == "is a directory, not an image file: Smith_John_scans"


def test_missing_path_message_uses_only_the_name(tmp_path):
    path = tmp_path / "private-dir" / "lesion.jpg"
    message = rejected(path)
    assert message == "no such file: lesion.jpg"
    assert "private-dir" not in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_rejected_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert rejected(fifo) == "not a regular file: pipe.png"


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() == 0, reason="root can read anything")
def test_unreadable_file_rejected(tmp_path):
    path = tmp_path / "locked.png"
    path.write_bytes(encode(noise(), "PNG"))
    path.chmod(0)
    try:
        assert rejected(path) == "permission denied: locked.png"
    finally:
        path.chmod(0o600)


def test_symlink_to_image_is_followed(tmp_path):
    target = tmp_path / "real.png"
    target.write_bytes(encode(Image.new("RGB", (10, 10), RED), "PNG"))
    link = tmp_path / "link.png"
    link.symlink_to(target)
    assert load_image(Path(link)).getpixel((0, 0)) == RED


# --- property: random and mutated bytes never crash -------------------------------------------------------

_SAMPLES = [
    encode(noise((24, 20), seed=1), "JPEG"),
    encode(noise((24, 20), seed=2), "PNG"),
    encode(noise((24, 20), seed=3), "BMP"),
    encode(noise((24, 20), seed=4), "TIFF"),
    encode(noise((24, 20), seed=5), "WEBP"),
]
_PROPERTY_LIMITS = ImageLimits(max_pixels=2_000_000, max_side=4096)


@st.composite
def hostile_bytes(draw):
    if draw(st.booleans()):
        return draw(st.binary(max_size=600))
    data = bytearray(draw(st.sampled_from(_SAMPLES)))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Corrupt EXIF data" / "Truncated File Read"
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_bytes())
def test_random_bytes_either_rejected_or_rgb(data):
    try:
        img = load_image(data, _PROPERTY_LIMITS)
    except ImageRejected as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert_clean_rgb(img)
        assert min(img.size) >= _PROPERTY_LIMITS.min_side
