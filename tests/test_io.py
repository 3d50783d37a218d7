"""Tests for fundus_pipeline.io: round trips, EXIF, palettes, broken files, discovery, atomic writes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from fundus_pipeline import io as fio
from fundus_pipeline.errors import FundusError, InputError, UsageError
from fundus_pipeline.io import (
    discover_images,
    from_float_rgb,
    read_image,
    to_float_rgb,
    write_bytes_atomic,
    write_image_atomic,
)

DATA = Path(os.environ.get("FUNDUS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# the datasets these tests read, not only the folder (an empty or partial FUNDUS_DATA skips; campaign 25b C25B-4)
needs_data = pytest.mark.skipif(not ((DATA / "DRIVE").is_dir() and (DATA / "HRF").is_dir()), reason=f"datasets not found at {DATA} (set FUNDUS_DATA)")

RNG = np.random.default_rng(1234)
H, W = 24, 32


def rand(shape, dtype):
    return RNG.integers(0, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True)


def cv2_write(path: Path, arr: np.ndarray) -> None:
    a = arr
    if a.ndim == 3 and a.shape[2] == 3:
        a = cv2.cvtColor(a, cv2.COLOR_RGB2BGR)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = cv2.cvtColor(a, cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(path.suffix, a)
    assert ok
    path.write_bytes(buf.tobytes())


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize(
    "name,shape,dtype,mode",
    [
        ("png8_rgb.png", (H, W, 3), np.uint8, "rgb"),
        ("png16_rgb.png", (H, W, 3), np.uint16, "rgb"),
        ("png16_rgba.png", (H, W, 4), np.uint16, "rgba"),
        ("png8_rgba.png", (H, W, 4), np.uint8, "rgba"),
        ("png_gray8.png", (H, W), np.uint8, "gray"),
        ("png_gray16.png", (H, W), np.uint16, "gray"),
        ("png_graya8.png", (H, W, 2), np.uint8, "graya"),
        ("png_graya16.png", (H, W, 2), np.uint16, "graya"),
    ],
)
def test_png_round_trip_through_our_writer(tmp_path, name, shape, dtype, mode):
    arr = rand(shape, dtype)
    p = tmp_path / name
    write_image_atomic(p, arr)
    got, meta = read_image(p)
    assert got.dtype == dtype and got.shape == shape
    # the file holds arr (the independent readers below); a fully transparent pixel is read as black (17b F2)
    np.testing.assert_array_equal(got, fio.clear_transparent(arr) if mode in ("rgba", "graya") else arr)
    assert meta.format == "png" and meta.mode == mode and meta.dtype == np.dtype(dtype).name
    assert meta.bit_depth == 8 * np.dtype(dtype).itemsize
    assert (meta.height, meta.width) == (H, W) and not meta.palette
    # and independent readers agree with what we wrote
    if arr.ndim == 2 or arr.shape[2] != 2:
        ref = cv2.imdecode(np.fromfile(p, np.uint8), cv2.IMREAD_UNCHANGED)
        assert ref.dtype == dtype
        if ref.ndim == 3:  # OpenCV reads BGR(A): the file holds the channels in RGB(A) order
            ref = cv2.cvtColor(ref, cv2.COLOR_BGR2RGB if ref.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
        np.testing.assert_array_equal(ref, arr)
    if dtype == np.uint8 and mode == "graya":
        np.testing.assert_array_equal(np.asarray(Image.open(p)), arr)


def test_png16_rgb_written_by_opencv_reads_16bit(tmp_path):
    arr = rand((H, W, 3), np.uint16)
    p = tmp_path / "a.png"
    cv2_write(p, arr)
    got, meta = read_image(p)
    np.testing.assert_array_equal(got, arr)
    assert meta.bit_depth == 16


@pytest.mark.parametrize(
    "name,shape,dtype",
    [("tif16_rgb.tif", (H, W, 3), np.uint16), ("tif8_rgb.tiff", (H, W, 3), np.uint8), ("tif8_gray.tif", (H, W), np.uint8)],
)
def test_tiff_round_trip(tmp_path, name, shape, dtype):
    arr = rand(shape, dtype)
    p = tmp_path / name
    tifffile.imwrite(p, arr, photometric="rgb" if len(shape) == 3 else "minisblack")
    got, meta = read_image(p)
    np.testing.assert_array_equal(got, arr)
    assert meta.format == "tiff" and meta.dtype == np.dtype(dtype).name


def test_tiff_extra_channels_are_refused_not_dropped(tmp_path):
    # gray + alpha and RGBA are kept as they are
    ga = rand((H, W, 2), np.uint8)
    tifffile.imwrite(tmp_path / "ga.tif", ga, photometric="minisblack", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(read_image(tmp_path / "ga.tif")[0], fio.clear_transparent(ga))  # alpha 0: black
    rgba = rand((H, W, 4), np.uint16)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.tif")[0], fio.clear_transparent(rgba))
    # a 5-channel grey stack was written as RGBA (channel 4 taken for alpha, 5 dropped); RGB + 2 extras lost one
    tifffile.imwrite(tmp_path / "ms.tif", rand((H, W, 5), np.uint8), photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(tmp_path / "rgb2x.tif", rand((H, W, 5), np.uint8), photometric="rgb", extrasamples=["unassalpha", "unspecified"])
    for name in ("ms.tif", "rgb2x.tif"):
        with pytest.raises(InputError, match="TIFF with 5 channels .* not supported"):
            read_image(tmp_path / name)


def test_tiff_planar_and_float(tmp_path):
    arr = rand((3, H, W), np.uint16)
    p = tmp_path / "planar.tif"
    tifffile.imwrite(p, arr, photometric="rgb", planarconfig="separate")
    got, _ = read_image(p)
    np.testing.assert_array_equal(got, np.moveaxis(arr, 0, -1))
    f = tmp_path / "float.tif"
    tifffile.imwrite(f, RNG.random((H, W, 3), dtype=np.float32), photometric="rgb")
    with pytest.raises(InputError, match="floating-point"):
        read_image(f)
    i32 = tmp_path / "int32.tif"
    tifffile.imwrite(i32, np.zeros((H, W), np.int32))
    with pytest.raises(InputError, match="unsupported pixel type"):
        read_image(i32)


@pytest.mark.parametrize("ext,fmt", [(".bmp", "BMP"), (".ppm", "PPM")])
def test_bmp_ppm_round_trip(tmp_path, ext, fmt):
    arr = rand((H, W, 3), np.uint8)
    p = tmp_path / f"a{ext}"
    Image.fromarray(arr).save(p, fmt)
    got, meta = read_image(p)
    np.testing.assert_array_equal(got, arr)
    assert meta.format == fmt.lower() and meta.mode == "rgb"


def test_ppm16(tmp_path):
    arr = rand((H, W, 3), np.uint16)
    p = tmp_path / "a.ppm"
    cv2_write(p, arr)
    got, meta = read_image(p)
    np.testing.assert_array_equal(got, arr)
    assert meta.bit_depth == 16


def _palette_image(transparent: bool = False) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    idx = RNG.integers(0, 4, (H, W), dtype=np.uint8)
    pal = np.array([[3, 3, 3], [253, 253, 253], [255, 0, 0], [0, 0, 255]], np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette(pal.ravel().tolist())
    if transparent:
        im.info["transparency"] = 0
    return im, idx, pal


@pytest.mark.parametrize("ext", [".gif", ".png"])
def test_palette_converted_and_raw_indices(tmp_path, ext):
    im, idx, pal = _palette_image()
    p = tmp_path / f"pal{ext}"
    im.save(p)
    rgb, meta = read_image(p)
    assert meta.palette and meta.mode == "rgb" and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, pal[idx])
    raw, rmeta = read_image(p, raw_palette=True)
    assert rmeta.palette and rmeta.mode == "gray" and raw.shape == (H, W)
    np.testing.assert_array_equal(raw, idx)


def test_palette_png_with_transparency_gives_rgba(tmp_path):
    im, idx, pal = _palette_image()
    p = tmp_path / "t.png"
    im.save(p, transparency=0)
    rgba, meta = read_image(p)
    assert meta.mode == "rgba"
    np.testing.assert_array_equal(rgba[..., 3], np.where(idx == 0, 0, 255))


def test_multiframe_gif_first_frame(tmp_path):
    a = np.full((H, W), 10, np.uint8)
    b = np.full((H, W), 200, np.uint8)
    p = tmp_path / "anim.gif"
    Image.fromarray(a).save(p, save_all=True, append_images=[Image.fromarray(b)])
    got, _ = read_image(p)
    assert int(np.median(got)) == 10


def test_jpeg_round_trip_close(tmp_path):
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = (200, 80, 40)
    p = tmp_path / "x.JPG"
    Image.fromarray(arr).save(p, quality=95)
    got, meta = read_image(p)
    assert meta.format == "jpeg" and got.shape == arr.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - arr).mean() < 3
    assert meta.exif_orientation is None


@pytest.mark.parametrize(
    "orientation,expected",
    [(1, lambda a: a), (3, lambda a: a[::-1, ::-1]), (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))],
)
def test_jpeg_exif_orientation_applied(tmp_path, orientation, expected):
    # an asymmetric image made of flat blocks so JPEG loss stays small
    arr = np.zeros((48, 80, 3), np.uint8)
    arr[:16, :16] = 255  # top-left white block
    arr[32:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(arr).save(p, quality=95, exif=exif.tobytes())
    got, meta = read_image(p)
    want = expected(arr)
    assert got.shape == want.shape
    assert (meta.height, meta.width) == want.shape[:2]
    assert meta.exif_orientation == orientation
    assert np.abs(got.astype(int) - want).mean() < 4
    # Pillow's own transpose agrees
    from PIL import ImageOps

    ref = np.asarray(ImageOps.exif_transpose(Image.open(p)))
    np.testing.assert_array_equal(got, ref)


def test_png_exif_orientation_applied(tmp_path):
    arr = rand((H, W, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "o.png"
    Image.fromarray(arr).save(p, exif=exif.tobytes())
    got, meta = read_image(p)
    assert meta.exif_orientation == 6
    np.testing.assert_array_equal(got, np.rot90(arr, -1))


def test_tiff_orientation_tag_applied(tmp_path):
    arr = rand((H, W, 3), np.uint8)
    p = tmp_path / "o.tif"
    tifffile.imwrite(p, arr, photometric="rgb", extratags=[(274, "H", 1, 8, True)])
    got, meta = read_image(p)
    assert meta.exif_orientation == 8
    np.testing.assert_array_equal(got, np.rot90(arr, 1))


# ------------------------------------------------------------------------------------------ broken inputs
def _assert_one_line(exc: pytest.ExceptionInfo) -> None:
    assert "\n" not in str(exc.value)


def test_truncated_jpeg(tmp_path):
    arr = rand((128, 128, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    p = tmp_path / "t.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="truncated") as exc:
        read_image(p)
    _assert_one_line(exc)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_png(tmp_path, keep):
    p = tmp_path / "t.png"
    write_image_atomic(p, rand((64, 64, 3), np.uint16))
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match="PNG") as exc:
        read_image(p)
    _assert_one_line(exc)


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(InputError, match="not a readable image") as exc:
        read_image(p)
    _assert_one_line(exc)


def test_too_small(tmp_path):
    from fundus_pipeline.io import encode_png

    p = tmp_path / "dot.png"
    p.write_bytes(encode_png(np.zeros((1, 1, 3), np.uint8)))
    with pytest.raises(InputError, match=r"image is too small \(1x1\); at least 16x16 is needed"):
        read_image(p)
    q = tmp_path / "thin.png"
    q.write_bytes(encode_png(np.zeros((200, 15), np.uint8)))
    with pytest.raises(InputError, match=r"too small \(15x200\)"):
        read_image(q)
    # campaign 15b F18: our own writer refuses what read_image would refuse
    with pytest.raises(ValueError, match=r"the image is 15x200; read_image needs at least 16x16"):
        write_image_atomic(tmp_path / "w.png", np.zeros((200, 15), np.uint8))
    assert not (tmp_path / "w.png").exists()


def test_empty_and_missing(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(InputError, match="empty file"):
        read_image(p)
    with pytest.raises(InputError, match="file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="not a regular file"):
        read_image(tmp_path)


def test_content_decides_decoder_not_extension(tmp_path):
    arr = rand((H, W, 3), np.uint16)
    p = tmp_path / "actually_png.jpg"
    p.write_bytes(fio.encode_png(arr))
    got, meta = read_image(p)
    assert meta.format == "png"
    np.testing.assert_array_equal(got, arr)


# ------------------------------------------------------------------------------------------ float conversion
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [0, 2, 3, 4])
def test_float_identity(dtype, channels):
    shape = (H, W) if channels == 0 else (H, W, channels)
    arr = rand(shape, dtype)
    if channels == 2:
        mode = "graya"
    else:
        mode = {0: "gray", 3: "rgb", 4: "rgba"}[channels]
    meta = fio.ImageMeta("png", np.dtype(dtype).name, 8 * np.dtype(dtype).itemsize, mode, H, W, None, False)
    rgb, alpha = to_float_rgb(arr, meta)
    assert rgb.dtype == np.float32 and rgb.shape == (H, W, 3)
    assert 0.0 <= rgb.min() and rgb.max() <= 1.0
    assert (alpha is not None) == (mode in ("graya", "rgba"))
    if alpha is not None:
        assert alpha.dtype == dtype
    back = from_float_rgb(rgb, meta, alpha)
    np.testing.assert_array_equal(back, arr)


def test_truncate_vs_round_and_clip():
    meta = fio.ImageMeta("png", "uint8", 8, "rgb", 1, 3, None, False)
    rgb = np.array([[[0.0, 0.9 / 255, 1.6 / 255], [2.5 / 255, 1.0005, -0.0005], [1.0, 0.5, 254.99 / 255]]], np.float32)
    r = from_float_rgb(rgb, meta, None)
    t = from_float_rgb(rgb, meta, None, truncate=True)
    assert r.tolist() == [[[0, 1, 2], [2, 255, 0], [255, 128, 255]]] or r.tolist() == [[[0, 1, 2], [3, 255, 0], [255, 128, 255]]]
    assert t.tolist() == [[[0, 0, 1], [2, 255, 0], [255, 127, 254]]]
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):  # beyond rounding: not clipped in silence (campaign 27b F4)
        from_float_rgb(np.array([[[0.5, 1.2, -0.3]]], np.float32), meta, None)
    meta16 = fio.ImageMeta("png", "uint16", 16, "gray", 1, 2, None, False)
    g = from_float_rgb(np.full((1, 2, 3), 0.5, np.float32), meta16, None)
    assert g.dtype == np.uint16 and g.shape == (1, 2) and g.tolist() == [[32768, 32768]]


def test_gray_uses_bt601_luminance():
    meta = fio.ImageMeta("png", "uint8", 8, "gray", 1, 3, None, False)
    rgb = np.eye(3, dtype=np.float32)[None]  # pure R, G, B
    assert from_float_rgb(rgb, meta, None).tolist() == [[76, 150, 29]]


# ------------------------------------------------------------------------------------------ discovery
def _touch_png(p: Path) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")


def test_discover_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b.PNG", "a.jpg", "sub/02.TIF", "sub/01.jpeg", "sub/deeper/z.bmp", "c.Gif", "d.ppm", "e.tiff",
                "notes.txt", ".hidden.png", ".cache/x.png", "sub/.git/y.png", "x.tar.png"]:
        _touch_png(tmp_path / rel)
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "missing.png")
    (tmp_path / "loop1.png").symlink_to(tmp_path / "loop2.png")
    (tmp_path / "loop2.png").symlink_to(tmp_path / "loop1.png")
    os.mkfifo(tmp_path / "pipe.txt")  # not an image's name: not an input
    items = discover_images(tmp_path)
    keys = [i.key for i in items]
    # entries with an image's name that are no readable file are items (they fail with a reason), never skipped
    assert keys == ["a", "b", "c", "d", "dangling", "e", "fifo", "loop1", "loop2", "sub/01", "sub/02", "sub/deeper/z", "x.tar"]
    for name, why in (("dangling.png", "symbolic link to a missing file"), ("loop1.png", "loop"), ("fifo.png", "not a regular file")):
        with pytest.raises(fio.InputError, match=why):
            fio.read_image(tmp_path / name)  # the FIFO is not opened (that would block)
    assert items[0].path == tmp_path / "a.jpg"
    assert all(isinstance(i.path, Path) for i in items)


def test_discover_duplicate_keys(tmp_path):
    _touch_png(tmp_path / "s" / "a.png")
    _touch_png(tmp_path / "s" / "a.JPG")
    with pytest.raises(UsageError) as exc:
        discover_images(tmp_path)
    msg = str(exc.value)
    assert "a.png" in msg and "a.JPG" in msg and "'s/a'" in msg and "\n" not in msg


def test_discover_bad_root(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        discover_images(tmp_path / "nope")
    f = tmp_path / "f.png"
    _touch_png(f)
    with pytest.raises(UsageError, match="not a folder"):
        discover_images(f)
    assert discover_images(tmp_path / "") == [fio.ImageItem("f", f)]


# ------------------------------------------------------------------------------------------ atomic writes
def test_write_creates_parents_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "b" / "out.png"
    write_image_atomic(p, rand((H, W, 3), np.uint8))
    assert p.is_file()
    assert sorted(x.name for x in p.parent.iterdir()) == ["out.png"]
    write_bytes_atomic(tmp_path / "r.json", b"{}")
    assert (tmp_path / "r.json").read_bytes() == b"{}"


def test_write_failure_keeps_old_file_and_cleans_temp(tmp_path, monkeypatch):
    p = tmp_path / "out.png"
    old = rand((H, W, 3), np.uint8)
    write_image_atomic(p, old)
    before = p.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fio.os, "replace", boom)
    with pytest.raises(FundusError, match=r"cannot write .*out.png: No space left on device"):
        write_image_atomic(p, rand((H, W, 3), np.uint8))
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["out.png"]


def test_write_failure_during_write_cleans_temp(tmp_path, monkeypatch):
    def bad_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(fio.os, "fsync", bad_fsync)
    with pytest.raises(FundusError, match="Input/output error"):
        write_bytes_atomic(tmp_path / "x.csv", b"a,b\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores permissions")
def test_write_unwritable_dir(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(FundusError, match="cannot write"):
            write_image_atomic(d / "x.png", np.zeros((H, W), np.uint8))
    finally:
        d.chmod(0o700)


def test_write_into_a_folder_that_refuses_the_write_is_a_fundus_error_also_as_root(tmp_path, monkeypatch):
    """The permission test above skips as root (campaign 25b C25B-6): the same refusal, raised by the system call."""
    import errno

    real = os.open

    def refused(path, flags, *a, **k):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", refused)
    with pytest.raises(FundusError, match="cannot write"):
        write_image_atomic(tmp_path / "x.png", np.zeros((H, W), np.uint8))
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_non_png_and_bad_dtype(tmp_path):
    with pytest.raises(UsageError, match="only .png"):
        write_image_atomic(tmp_path / "x.jpg", np.zeros((H, W), np.uint8))
    with pytest.raises(ValueError, match="uint8 or uint16"):
        write_image_atomic(tmp_path / "x.png", np.zeros((H, W), np.float32))
    write_image_atomic(tmp_path / "m.png", np.ones((H, W), bool))
    got, _ = read_image(tmp_path / "m.png")
    assert got.dtype == np.uint8 and int(got.min()) == 255


# ------------------------------------------------------------------------------------------ real datasets
@needs_data
def test_drive_files():
    img, meta = read_image(DATA / "DRIVE" / "test" / "images" / "01_test.tif")
    assert img.shape == (584, 565, 3) and img.dtype == np.uint8 and meta.format == "tiff" and meta.mode == "rgb"
    mask, mmeta = read_image(DATA / "DRIVE" / "test" / "mask" / "01_test_mask.gif")
    assert mask.shape == (584, 565) and set(np.unique(mask)) <= {0, 255} and mmeta.format == "gif"
    raw, rmeta = read_image(DATA / "DRIVE" / "test" / "2nd_manual" / "01_manual2.gif", raw_palette=True)
    assert rmeta.palette and raw.shape == (584, 565)
    assert set(np.unique(raw).tolist()) == {0, 1}
    conv, cmeta = read_image(DATA / "DRIVE" / "test" / "2nd_manual" / "01_manual2.gif")
    assert cmeta.mode == "rgb" and cmeta.palette
    np.testing.assert_array_equal(conv[..., 1] > 127, raw > 0)


@needs_data
def test_hrf_files():
    img, meta = read_image(DATA / "HRF" / "images" / "01_dr.JPG")
    assert img.shape == (2336, 3504, 3) and meta.format == "jpeg" and img.dtype == np.uint8
    mask, mmeta = read_image(DATA / "HRF" / "mask" / "01_dr_mask.tif")
    assert mask.shape == (2336, 3504, 3) and set(np.unique(mask)) <= {0, 255}


# ------------------------------------------------------------------------------------------ hardening
@pytest.mark.parametrize("name", ["L" * 236 + ".png", "L" * 251 + ".png", "é" * 125 + ".png"])
def test_write_long_file_names(tmp_path, name):
    """D1: a legal name (<= 255 bytes) must not fail because of the temp file's decoration."""
    assert len(os.fsencode(name)) <= 255
    p = tmp_path / name
    arr = rand((H, W, 3), np.uint8)
    write_image_atomic(p, arr)
    np.testing.assert_array_equal(read_image(p)[0], arr)
    write_bytes_atomic(p, b"again")  # replacing an existing long name works too
    assert p.read_bytes() == b"again"
    assert [x.name for x in tmp_path.iterdir()] == [name]  # no temp file left


def test_temp_name_fits_and_keeps_pattern():
    for name in ["a.png", "L" * 236 + ".png", "L" * 251 + ".png", "é" * 125 + ".png", "x" * 400]:
        tmp = fio._temp_name(name, "0123456789ab")
        assert len(os.fsencode(tmp)) <= fio.NAME_MAX
        assert tmp.startswith(".") and tmp.endswith(".0123456789ab.tmp")
        assert Path(tmp).match(".*.tmp")
    assert fio._temp_name("a.png", "0123456789ab") == ".a.png.0123456789ab.tmp"  # short names unchanged


def _huge_tiled_tiff(path: Path, side: int = 20000) -> None:
    """A ~1.3 MB tiled, deflate-compressed TIFF that declares side x side x 3 (pre-compressed zero tiles)."""
    import zlib

    tile = 512
    payload = zlib.compress(bytes(tile * tile * 3))
    n = ((side + tile - 1) // tile) ** 2
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            (payload for _ in range(n)),
            shape=(side, side, 3),
            dtype=np.uint8,
            tile=(tile, tile),
            compression="zlib",
            photometric="rgb",
        )


def test_tiff_pixel_limit_refused_before_decoding(tmp_path):
    """D5: a small TIFF declaring 20000x20000x3 is refused from its header (fast, little memory)."""
    import time
    import tracemalloc

    p = tmp_path / "bomb.tif"
    _huge_tiled_tiff(p)
    assert p.stat().st_size < 2_000_000
    tracemalloc.start()
    t = time.perf_counter()
    try:
        with pytest.raises(InputError, match="too large to decode safely") as exc:
            read_image(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t < 5.0
    assert peak < 64 * 2**20, peak  # the decoded image would be 1.2 GB
    _assert_one_line(exc)
    assert fio.MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS
    assert str(fio.MAX_PIXELS) in str(exc.value)


def test_tiff_pixel_limit_also_on_pillow_fallback(tmp_path, monkeypatch):
    """The Pillow fallback (used when tifffile cannot decode a page) applies the same limit."""
    p = tmp_path / "small.tif"
    tifffile.imwrite(p, rand((H, W, 3), np.uint8), photometric="rgb")
    monkeypatch.setattr(fio, "MAX_PIXELS", H * W - 1)
    with pytest.raises(InputError, match="too large to decode safely"):
        fio._read_tiff_with_pillow(p.read_bytes(), p, False)
    with pytest.raises(InputError, match="too large to decode safely"):
        read_image(p)
    monkeypatch.setattr(fio, "MAX_PIXELS", H * W)
    assert read_image(p)[0].shape == (H, W, 3)  # the limit itself is allowed


@pytest.mark.parametrize(
    "kwargs,keep",
    [({}, 200), ({}, 300), ({"compression": "zlib"}, 200), ({"compression": "zlib"}, 300), ({"tile": (16, 16)}, 300), ({}, 0.5)],
)
def test_truncated_tiff_prints_nothing(tmp_path, capfd, caplog, kwargs, keep):
    """D6: a truncated TIFF gives one InputError and no tifffile log line / libtiff / Pillow warning on stderr."""
    import logging

    p = tmp_path / "t.tif"
    tifffile.imwrite(p, rand((64, 64, 3), np.uint8), photometric="rgb", **kwargs)
    data = p.read_bytes()
    p.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    capfd.readouterr()
    with pytest.raises(InputError, match="TIFF") as exc:
        read_image(p)
    _assert_one_line(exc)
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    assert not [r for r in caplog.records if r.name.startswith("tifffile")]  # pytest's handler would catch them
    assert not logging.getLogger("tifffile").filters  # silenced only during the read
