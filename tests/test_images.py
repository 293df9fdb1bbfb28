"""dfsnet.images: formats by content only, size rules before decoding, RGB out, and its callers."""
from __future__ import annotations

import hashlib
import io
import math
import os
import struct
import subprocess
import time
import tracemalloc
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from dfsnet.errors import InputError
from dfsnet.images import (
    DEFAULT_MAX_ASPECT,
    DEFAULT_MAX_SIDE,
    IMAGE_FORMATS,
    ImageGeometryError,
    ImageTooLargeError,
    InvalidImageError,
    open_image,
    open_thumbnail,
)

# Payloads that PIL's EPS plugin accepts (it would run Ghostscript on them) and a PDF.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
PS = b"%!PS-Adobe-3.0\n%%Pages: 1\n%%Page: 1 1\n/Helvetica findfont 12 scalefont setfont\nshowpage\n%%EOF\n"
PDF = (b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n"
       b"2 0 obj << /Type /Pages /Kids [] /Count 0 >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int) -> bytes:
    """A complete, valid 1-bit grey PNG of ``width`` x ``height`` (all black), tiny when compressed."""
    row = b"\0" + b"\0" * ((width + 7) // 8)  # filter byte, then the packed bits
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(row * height, 9))
            + _chunk(b"IEND", b""))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but holds almost no data (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _chunk(b"IEND", b""))


TALL = png_bytes(1, 8000)  # ~100 bytes; resizing its 1 px side to 224 would need ~1.2 GB
WIDE = png_bytes(20_000_000, 1)  # ~2.5 kB; PIL's resize overflows on it


def bad_image_files(folder) -> list[str]:
    """Write files that must never be decoded under image names into ``folder``; return their paths, sorted."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"eps.jpg": EPS, "ps.png": PS, "pdf.jpg": PDF, "tall.png": TALL, "wide.png": WIDE}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(str(folder / name) for name in files)


@pytest.fixture
def no_subprocess(monkeypatch):
    """Fail the test if anything tries to start a program (as PIL's EPS plugin does with Ghostscript)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args!r}")

    for module, attr in [(subprocess, "Popen"), (subprocess, "run"), (subprocess, "call"),
                         (subprocess, "check_call"), (subprocess, "check_output"), (os, "system"),
                         (os, "popen"), (os, "posix_spawn"), (os, "posix_spawnp")]:
        if hasattr(module, attr):
            monkeypatch.setattr(module, attr, refuse)


@pytest.fixture
def only_allowed_plugins(monkeypatch):
    """Make every PIL plugin outside IMAGE_FORMATS fail the test if it is asked about a file."""
    Image.init()

    def refuse(*args, **kwargs):
        raise AssertionError("a PIL plugin outside IMAGE_FORMATS was asked")

    for fmt in list(Image.OPEN):
        if fmt not in IMAGE_FORMATS:
            monkeypatch.setitem(Image.OPEN, fmt, (refuse, refuse))
    calls = []
    real_open = Image.open

    def spy(fp, mode="r", formats=None):
        calls.append(formats)
        return real_open(fp, mode, formats)

    monkeypatch.setattr(Image, "open", spy)
    return calls


def _jpeg(arr: np.ndarray, **kwargs) -> bytes:
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "JPEG", **kwargs)
    return out.getvalue()


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def _old_decode_rgb(fp) -> Image.Image:
    """The decoder datasets used before dfsnet.images (bare Image.open): the reference for bit-identity."""
    with Image.open(fp) as img:
        img.load()
        if img.getexif().get(0x0112, 1) != 1:
            img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def test_open_image_checks_content_not_names(tmp_path):
    png = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (20, 10), "red").save(png, format="PNG")
    img = open_image(png)
    assert img.mode == "RGB" and img.size == (20, 10)
    text = tmp_path / "notes.jpg"
    text.write_text("hello, not an image")
    with pytest.raises(InvalidImageError, match="not an image of a supported type"):
        open_image(text)
    noisy = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noisy, "PNG")
    with pytest.raises(InvalidImageError, match="corrupt or truncated"):
        open_image(noisy.getvalue()[: len(noisy.getvalue()) // 2])
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    with pytest.raises(InvalidImageError, match="not an image of a supported type"):
        open_image(eps)  # EPS would run Ghostscript: never tried
    # PIL only warns between 1x and 2x its limit; open_image refuses.
    with pytest.raises(ImageTooLargeError, match="decompression-bomb guard"), \
            pytest.warns(Image.DecompressionBombWarning):
        open_image(_png_header_only(10_000, 10_000))
    with pytest.raises(ImageTooLargeError):
        open_image(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageTooLargeError, match="more than the limit of 100"):
        open_image(png, max_pixels=100)
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "missing.png")
    with pytest.raises(TypeError):
        open_image(42)


def test_error_classes_are_input_errors():
    assert issubclass(InvalidImageError, InputError) and issubclass(InvalidImageError, ValueError)
    assert issubclass(ImageTooLargeError, InvalidImageError) and issubclass(ImageGeometryError, InvalidImageError)
    # Distinct, so that callers can map them differently (uploads: 413 against 400).
    assert not issubclass(ImageGeometryError, ImageTooLargeError)
    assert not {"EPS", "PDF", "PS"} & set(IMAGE_FORMATS)


@pytest.mark.parametrize(("payload", "filename"), [(EPS, "photo.jpg"), (PS, "scan.png"), (PDF, "doc.jpg"),
                                                   (EPS, "figure.eps")])
def test_postscript_and_pdf_are_refused_without_running_anything(tmp_path, no_subprocess, only_allowed_plugins,
                                                                  payload, filename):
    Image.init()
    if payload is not PDF:  # the payload is real: PIL's EPS plugin, if asked, would take it (and run Ghostscript)
        assert "EPS" in Image.ID and Image.OPEN["EPS"][1] is not None
    path = tmp_path / filename
    path.write_bytes(payload)
    for source in (path, str(path), payload):
        with pytest.raises(InvalidImageError, match="not an image of a supported type"):
            open_image(source)
    assert only_allowed_plugins and all(tuple(f) == IMAGE_FORMATS for f in only_allowed_plugins)


def test_eps_payload_would_reach_the_eps_plugin_without_the_allow_list():
    # Guards the test above: the EPS plugin does accept these payloads by content.
    from PIL import EpsImagePlugin

    assert EpsImagePlugin._accept(EPS[:16]) and EpsImagePlugin._accept(PS[:16])


@pytest.mark.parametrize(("data", "size"), [(TALL, (1, 8000)), (WIDE, (20_000_000, 1))])
def test_extreme_shapes_are_refused_from_the_header(monkeypatch, data, size):
    assert len(data) < 3000
    with Image.open(io.BytesIO(data)) as img:  # a real PNG of that size, not a broken one
        assert img.size == size

    def no_decode(self, *args, **kwargs):
        raise AssertionError("pixels were decoded before the size rules were checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ImageGeometryError, match=f"{size[0]}x{size[1]}"):
            open_image(data)
        with pytest.raises(ImageGeometryError):
            open_thumbnail(data, 64)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 2 * 2**20


def test_shape_limits_pass_ordinary_images_and_can_be_overridden():
    for width, height in [(32, 32), (8, 8), (4000, 3000), (2000, 200), (200, 2000), (int(32 * DEFAULT_MAX_ASPECT), 32)]:
        assert open_image(_encode(Image.new("L", (width, height)), "PNG")).size == (width, height)
    with pytest.raises(ImageGeometryError, match="aspect ratio of 33.0:1"):
        open_image(_encode(Image.new("L", (33, 1)), "PNG"))
    with pytest.raises(ImageGeometryError, match="limit of 10:1"):
        open_image(_encode(Image.new("L", (110, 10)), "PNG"), max_aspect=10)
    with pytest.raises(ImageGeometryError, match="longer than the limit of 100 px"):
        open_image(_encode(Image.new("L", (101, 100)), "PNG"), max_side=100)
    assert open_image(TALL, max_aspect=math.inf).size == (1, 8000)
    wide = _png_header_only(DEFAULT_MAX_SIDE + 1, DEFAULT_MAX_SIDE // 16)  # 16:1, under the pixel cap
    with pytest.raises(ImageGeometryError, match="side longer"):
        open_image(wide)
    # In-memory images get the shape rules too (the resize after them is the danger).
    with pytest.raises(ImageGeometryError):
        open_image(Image.new("RGB", (1, 500)))
    with pytest.raises(ValueError, match="max_aspect"):
        open_image(TALL, max_aspect=0.5)
    with pytest.raises(ValueError, match="max_side"):
        open_image(TALL, max_side=0)
    with pytest.raises(ValueError, match="max_pixels"):
        open_image(TALL, max_pixels=0)


def _transparent_palette() -> Image.Image:
    image = Image.new("P", (6, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(("image", "fmt"), [
    (_transparent_palette(), "PNG"),
    (Image.new("LA", (6, 4), (100, 50)), "PNG"),
    (Image.new("RGBA", (6, 4), (1, 2, 3, 0)), "PNG"),
    (Image.new("RGBA", (6, 4), (1, 2, 3, 4)), "WEBP"),
    (Image.new("CMYK", (6, 4), (0, 255, 0, 0)), "JPEG"),
    (Image.new("CMYK", (6, 4), (0, 255, 0, 0)), "TIFF"),
    (Image.new("1", (6, 4), 1), "PNG"),
    (Image.new("1", (6, 4), 1), "BMP"),
    (Image.new("L", (6, 4), 7), "PPM"),
    (Image.new("I;16", (6, 4), 65535), "PNG"),
    (Image.new("I;16", (6, 4), 65535), "TIFF"),
    (Image.new("I", (6, 4), 65535), "PPM"),
])
def test_every_mode_comes_out_rgb(image, fmt):
    out = open_image(_encode(image, fmt))
    assert out.mode == "RGB" and out.size == (6, 4)
    if image.mode.startswith("I"):  # 16-bit white stays white
        assert np.asarray(out).min() == 255


def test_sixteen_bit_grey_is_scaled_not_clipped():
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    out = np.asarray(open_image(_encode(Image.fromarray(values), "PNG")))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    assert np.all(out[..., 0] == out[..., 2])
    pgm = b"P5 4 1 65535\n" + values.astype(">u2").tobytes()  # PIL opens 16-bit PGM as mode "I"
    np.testing.assert_array_equal(np.asarray(open_image(pgm))[0, :, 1], [0, 1, 128, 255])


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 30, 3), dtype=np.uint8)
    arr[:, :15] = (255, 0, 0)  # left half red, right half blue
    arr[:, 15:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display 90 degrees clockwise
    out = open_image(_jpeg(arr, exif=exif.tobytes(), quality=95))
    assert out.size == (20, 30)
    top, bottom = np.asarray(out)[2, 10], np.asarray(out)[27, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60


def test_truncated_jpeg_is_refused(tmp_path):
    data = _jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match=r"cut\.jpg is corrupt or truncated"):
        open_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "WEBP"])
def test_multi_frame_images_give_their_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP"
                                                                               else {}))
    with Image.open(io.BytesIO(data)) as img:
        assert getattr(img, "n_frames", 1) == 3
    np.testing.assert_array_equal(np.asarray(open_image(data))[0, 0], [255, 0, 0])


def test_non_image_bytes_are_refused_naming_the_image(tmp_path):
    with pytest.raises(InvalidImageError, match="image: holiday.png is not an image"):
        open_image(b"GIF89a but not really", name="holiday.png")
    with pytest.raises(InvalidImageError, match="image: the image is not an image"):
        open_image(b"\x00" * 100)
    path = tmp_path / "x.png"
    path.write_bytes(b"")
    with pytest.raises(InvalidImageError, match=f"image: {path} is not an image"):
        open_image(path)


def test_missing_path_and_wrong_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_image(str(tmp_path / "nope.jpg"))
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path)  # a folder is no image file
    for wrong in (42, None, [b"\x89PNG"], np.zeros((4, 4, 3), dtype=np.uint8)):
        with pytest.raises(TypeError, match="expected a path, bytes or a PIL image"):
            open_image(wrong)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_an_os_error_not_a_corrupt_image(tmp_path):
    path = tmp_path / "locked.png"
    path.write_bytes(_encode(Image.new("RGB", (4, 4)), "PNG"))
    path.chmod(0)
    with pytest.raises(PermissionError):
        open_image(path)


def test_sources_give_the_same_image_fully_decoded(tmp_path):
    arr = np.random.default_rng(3).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    data = path.read_bytes()
    from_path = open_image(path)
    path.unlink()  # decoded inside the call: nothing still reads the file
    for image in (from_path, open_image(data), open_image(bytearray(data)), open_image(memoryview(data))):
        np.testing.assert_array_equal(np.asarray(image), arr)
    grey = Image.fromarray(arr[..., 0])
    assert open_image(grey).mode == "RGB" and grey.mode == "L"
    rgb = Image.fromarray(arr)
    assert open_image(rgb) is rgb


@pytest.mark.parametrize(("mode", "fmt"), [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"),
                                           ("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("L", "PNG"),
                                           ("RGB", "WEBP"), ("P", "GIF"), ("RGB", "BMP"), ("RGB", "TIFF"),
                                           ("RGB", "PPM"), ("L", "PPM")])
def test_valid_images_decode_bit_identically_to_the_old_decoder(mode, fmt):
    arr = np.random.default_rng(7).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    kwargs = {}
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[0x0112] = 8
        kwargs["exif"] = exif.tobytes()
    data = _encode(Image.fromarray(arr).convert(mode), fmt, **kwargs)
    np.testing.assert_array_equal(np.asarray(open_image(data)), np.asarray(_old_decode_rgb(io.BytesIO(data))))


def test_open_thumbnail_fits_the_box_and_keeps_the_callers_image():
    arr = np.random.default_rng(1).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    thumb = open_thumbnail(_jpeg(arr), 64)
    assert thumb.mode == "RGB" and thumb.size == (64, 38)
    assert open_thumbnail(_encode(Image.new("RGB", (20, 10)), "PNG"), 64).size == (20, 10)  # never enlarged
    mine = Image.fromarray(arr)
    assert open_thumbnail(mine, 32).size == (32, 19) and mine.size == (500, 300)
    with pytest.raises(ValueError, match="size"):
        open_thumbnail(_jpeg(arr), 0)


def _old_thumbnail_jpeg(data: bytes, size: int) -> bytes:
    """ThumbnailCache's decoding before dfsnet.images took it over: the reference for its bytes."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (2 * size, 2 * size))
        img.load()
        if img.getexif().get(0x0112, 1) != 1:
            img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=85, optimize=True)
        return out.getvalue()


def test_thumbnail_cache_uses_the_decoder(tmp_path, no_subprocess):
    from dfsnet.web.thumbnails import ThumbnailCache, ThumbnailError

    cache = ThumbnailCache(size=48, capacity=4, max_pixels=10**6)
    arr = np.random.default_rng(2).integers(0, 256, (120, 200, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {"good.jpg": _jpeg(arr, exif=exif.tobytes()), "good.png": _encode(Image.fromarray(arr), "PNG"),
             "eps.jpg": EPS, "tall.png": TALL, "big.png": _png_header_only(2000, 1000)}
    records = {}
    for i, (name, data) in enumerate(files.items()):
        (tmp_path / name).write_bytes(data)
        records[name] = SimpleNamespace(id=i, path=str(tmp_path / name), sha256=hashlib.sha256(data).hexdigest(),
                                        size=len(data))
    for name in ("good.jpg", "good.png"):
        assert cache.get(records[name]) == _old_thumbnail_jpeg(files[name], 48)
    assert Image.open(io.BytesIO(cache.get(records["good.jpg"]))).size == (29, 48)
    for name, message in [("eps.jpg", "cannot be decoded"), ("tall.png", "aspect ratio too large"),
                          ("big.png", "too many pixels")]:
        with pytest.raises(ThumbnailError, match=message) as info:
            cache.get(records[name])
        assert str(tmp_path) not in str(info.value)  # shown to web clients: no server paths


def test_decode_upload_maps_shape_to_400_and_pixels_to_413(no_subprocess):
    from fastapi import HTTPException

    from dfsnet.web.uploads import decode_upload

    assert decode_upload(_encode(Image.new("RGB", (20, 10)), "PNG"), max_pixels=None).size == (20, 10)
    # The pixel cap is checked first: an image too large and too thin is a 413.
    for data, max_pixels, status, words in [
            (TALL, None, 400, "aspect ratio"), (WIDE, None, 400, "side longer"), (EPS, None, 400, "not an image"),
            (PDF, None, 400, "not an image"), (_png_header_only(2000, 1000), 10**6, 413, "more than the limit"),
            (WIDE, 10**6, 413, "more than the limit"), (_png_header_only(20_000, 20_000), None, 413, "too large")]:
        with pytest.raises(HTTPException) as info:
            decode_upload(data, max_pixels=max_pixels)
        assert info.value.status_code == status and words in info.value.detail
        assert "the uploaded file" in info.value.detail
