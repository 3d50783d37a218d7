"""Row-band processing of very large photographs (``fundus_pipeline.bands``): the banded primitives agree
with OpenCV, and the banded paths of the FOV estimate, ``segment``, ``enhance`` and the JPEG reader give the
exact paths' results (within one code value) when the size threshold is lowered to reach them on small
images."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import fundus_pipeline.bands as bands
from degradation.fov import FovGeometry
from fundus_pipeline.canonical import CanonicalFrame
from fundus_pipeline.io import read_image
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.stages.base import Fov, Image, ItemInput
from tests.conftest import synthetic_fundus

torch.set_num_threads(1)


@pytest.mark.parametrize("shape, size", [((37, 51), (357, 260)), ((100, 120, 3), (840, 703)), ((30, 40), (280, 210))])
def test_band_upsampler_is_opencvs_bilinear_resize(shape, size):
    src = np.random.default_rng(0).random(shape).astype(np.float32)
    ref = cv2.resize(src, size, interpolation=cv2.INTER_LINEAR)
    up = bands.BandUpsampler(src, *size)
    got = np.concatenate([up.rows(sl) for sl in bands.row_bands(size[1], size[0], pixels=5000)])
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-6


@pytest.fixture()
def small_bands(monkeypatch):
    """Bands of about 2,000 destination pixels (a few rows), so that small test images span many bands."""
    monkeypatch.setattr(bands, "BAND_PIXELS", 2000)


def test_row_bands_reads_the_band_size_when_called(small_bands):
    assert [(s.start, s.stop) for s in bands.row_bands(45, 100)] == [(0, 20), (20, 40), (40, 45)]
    assert len(list(bands.row_bands(45, 100, pixels=10**6))) == 1


def test_area_downscale_is_opencvs_area_resize_with_box_and_mask(small_bands):
    assert len(list(bands.row_bands(300, 400))) > 1  # source rows in bands
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    ref = cv2.resize(a.astype(np.float32) / 255, (97, 71), interpolation=cv2.INTER_AREA)
    assert np.abs(bands.area_downscale_float(a, 97, 71, 255.0) - ref).max() < 1e-6
    # the canonical frame of a masked, partly outside FOV square, as CanonicalFrame.to_canonical computes it
    m = rng.random((300, 400)) < 0.8
    frame = CanonicalFrame.from_fov(FovGeometry(cx=233.3, cy=127.2, radius=173.0, height=300, width=400), 64)
    ref = frame.to_canonical(a.astype(np.float32) / 255 * m[..., None])
    got = bands.area_downscale_float(a, 64, 64, 255.0, box=(frame.x0, frame.y0, frame.side, frame.side), mask=m)
    assert np.abs(got - ref).max() < 1e-6
    g16 = rng.integers(0, 65536, (120, 90), dtype=np.uint16)  # gray, 16-bit
    ref = cv2.resize(g16.astype(np.float32) / 65535, (30, 40), interpolation=cv2.INTER_AREA)
    assert np.abs(bands.area_downscale_float(g16, 30, 40, 65535.0) - ref).max() < 1e-6


def test_circle_mask_in_bands_is_the_formula(monkeypatch):
    import degradation.fov as fovmod

    monkeypatch.setattr(fovmod, "CIRCLE_BAND_PIXELS", 640 * 7)  # bands of 7 rows, one ending partway
    g = FovGeometry(cx=300.7, cy=211.2, radius=250.3, height=2480, width=640)
    yy, xx = np.ogrid[: g.height, : g.width]
    assert np.array_equal(g.circle_mask(), (xx - g.cx) ** 2 + (yy - g.cy) ** 2 <= g.radius**2)


@pytest.fixture()
def large(monkeypatch):
    """Every image counts as very large (the banded paths run)."""
    monkeypatch.setattr(bands, "LARGE_PIXELS", 1)


def _image(arr: np.ndarray, tmp_path, name: str = "p.png") -> Image:
    path = tmp_path / name
    if arr.dtype == np.uint16:
        cv2.imwrite(str(path), arr[..., ::-1] if arr.ndim == 3 else arr)
    else:
        PILImage.fromarray(arr).save(path)
    return Image(*read_image(path))


@pytest.mark.parametrize("kind", ["rgb8", "rgb16", "gray"])
def test_fov_segment_and_enhance_banded_paths_match_the_exact_ones(kind, tmp_path, monkeypatch, small_bands):
    from fundus_pipeline.config import EnhanceConfig, SegmentConfig
    from fundus_pipeline.stages.enhance import EnhanceStage
    from fundus_pipeline.stages.segment import SegmentStage

    rgb = synthetic_fundus(180, 220, 5)
    assert len(list(bands.row_bands(180, 220))) > 1  # the banded loops run over several bands
    arr = {"rgb8": rgb, "rgb16": rgb.astype(np.uint16) * 257, "gray": rgb[..., 1]}[kind]
    img = _image(arr, tmp_path)
    torch.manual_seed(0)
    tiny = tmp_path / "cofe_tiny.pt"
    torch.save(build_model("cofe_tiny").state_dict(), tiny)
    stages = [
        SegmentStage(SegmentConfig(device="cpu", overlay=True)),
        EnhanceStage(EnhanceConfig(weights=str(tiny), arch="cofe_tiny", device="cpu", vessel_stats=True)),
    ]
    results = {}
    for is_large in (False, True):
        monkeypatch.setattr(bands, "LARGE_PIXELS", 1 if is_large else 10**12)
        img = _image(arr, tmp_path)  # fresh: nothing cached from the other path
        assert img.large is is_large
        fov = Fov.estimate_image(img)
        results[is_large] = [fov] + [st.compute(ItemInput("p", {"image": img}, fov)) for st in stages]
    f0, f1 = results[False][0], results[True][0]
    assert np.array_equal(f0.mask, f1.mask) and f0.geometry.radius == pytest.approx(f1.geometry.radius, abs=1e-3)
    for exact, banded in zip(results[False][1:], results[True][1:]):
        a, b = exact.images_now(), banded.images_now()
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            d = np.abs(a[k].astype(np.int64) - b[k].astype(np.int64))
            assert d.max() <= 1 and (d > 0).mean() < 0.01, (k, d.max(), (d > 0).mean())
        for col, v in exact.fields.items():
            if isinstance(v, float):
                assert banded.fields[col] == pytest.approx(v, abs=2e-3), col
            else:
                assert banded.fields[col] == v, col


def test_large_jpeg_reader_matches_pillow_and_refuses_truncation(tmp_path, large):
    from fundus_pipeline.errors import InputError

    arr = synthetic_fundus(160, 200, 2)
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, "JPEG", quality=90)
    p = tmp_path / "a.jpg"
    p.write_bytes(buf.getvalue())
    got, meta = read_image(p)
    assert meta.mode == "rgb" and np.array_equal(got, np.asarray(PILImage.open(p)))
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_image(p)


@pytest.mark.parametrize("options", [{"types": ["001", "010", "100", "111"]}, {"recipe": "severe", "seed": 3}, {"types": ["111"], "preset": "training"}])
@pytest.mark.parametrize("kind", ["rgb8", "rgb16", "gray", "rgba"])
def test_degrade_banded_path_matches_the_exact_one(options, kind, tmp_path, monkeypatch):
    """Very large photographs are degraded a band of rows at a time (``degradation.banded``; bands of 16
    rows here): the same images as the exact path within one code value (a few after JPEG), alpha kept."""
    import degradation.banded as banded
    from fundus_pipeline.config import DegradeConfig
    from fundus_pipeline.stages.degrade import DegradeStage

    rgb = synthetic_fundus(150, 170, 7)
    alpha = np.arange(150 * 170, dtype=np.uint8).reshape(150, 170)
    arr = {"rgb8": rgb, "rgb16": rgb.astype(np.uint16) * 257, "gray": rgb[..., 1], "rgba": np.dstack([rgb, alpha])}[kind]
    monkeypatch.setattr(banded, "BAND_PIXELS", 170 * 16)
    outs = {}
    for is_large in (False, True):
        monkeypatch.setattr(bands, "LARGE_PIXELS", 1 if is_large else 10**12)
        img = _image(arr, tmp_path)
        stage = DegradeStage(DegradeConfig(**options))
        outs[is_large] = stage.compute(ItemInput("p", {"image": img}, Fov.estimate_image(img))).images_now()
        assert ("_float" in img.__dict__) is not is_large  # the large path never makes a float copy
    assert outs[False].keys() == outs[True].keys()
    for k in outs[False]:
        a, b = outs[False][k], outs[True][k]
        assert a.shape == b.shape and a.dtype == b.dtype, k
        d = np.abs(a.astype(np.int64) - b.astype(np.int64))
        step = 257 if kind == "rgb16" else 1
        assert d.max() <= (4 if "recipe" in options else 1) * step, k
        assert (d > 0).mean() < 0.01, k
        if kind == "rgba":
            assert np.array_equal(b[..., 3], alpha)


def test_degrade_banded_path_holds_no_full_size_float_copy(tmp_path, monkeypatch):
    """The banded degrade's working memory is bands of rows: its traced peak (numpy allocations, output
    included) stays far below one float32 copy of the photograph, which the exact path needs several of."""
    import tracemalloc

    from fundus_pipeline.config import DegradeConfig
    from fundus_pipeline.stages.degrade import DegradeStage

    import degradation.banded as banded

    rgb = synthetic_fundus(1200, 1600, 5)
    float_copy = rgb.size * 4
    monkeypatch.setattr(banded, "BAND_PIXELS", 1600 * 32)  # bands of 32 rows (about 170 at 12000 columns)
    peaks = {}
    for is_large in (False, True):
        monkeypatch.setattr(bands, "LARGE_PIXELS", 1 if is_large else 10**12)
        img = _image(rgb, tmp_path)
        fov = Fov.estimate_image(img)
        stage = DegradeStage(DegradeConfig(recipe="severe", seed=1))
        tracemalloc.start()
        out = stage.compute(ItemInput("p", {"image": img}, fov)).images_now()
        peaks[is_large] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert out[""].shape == rgb.shape
    # the output (one byte a value) and bands of rows, against several float copies
    assert peaks[True] < float_copy and peaks[True] < 0.25 * peaks[False], peaks
    assert peaks[False] > 2 * float_copy, peaks


def test_grade_frame_banded_matches_the_exact_one(tmp_path, monkeypatch, small_bands):
    from fundus_pipeline.stages.grade import grade_frame, grade_frame_large

    for arr in (synthetic_fundus(300, 360, 9), np.random.default_rng(0).integers(0, 256, (200, 260, 3), dtype=np.uint8)):
        img = _image(arr, tmp_path)
        fov = Fov.estimate_image(img)
        assert np.abs(grade_frame_large(img, fov, 64) - grade_frame(img.rgb, fov, 64)).max() < 1e-5


@pytest.mark.parametrize("kind", ["rgb8", "rgb16"])
def test_score_frames_banded_match_the_exact_ones(kind, tmp_path, monkeypatch, small_bands):
    """``fundus score``'s two frames of a very large pair come from the integer arrays in row bands, no float copy."""
    from fundus_pipeline.stages.score import score_frames

    enh_arr, ref_arr = synthetic_fundus(300, 360, 9), synthetic_fundus(300, 360, 4)
    if kind == "rgb16":
        enh_arr, ref_arr = enh_arr.astype(np.uint16) * 257, ref_arr.astype(np.uint16) * 257
    frames = {}
    for is_large in (False, True):
        monkeypatch.setattr(bands, "LARGE_PIXELS", 1 if is_large else 10**12)
        enh, ref = _image(enh_arr, tmp_path, "e.png"), _image(ref_arr, tmp_path, "r.png")
        fov = Fov.estimate_image(enh)
        frames[is_large] = score_frames(enh, ref, fov, 64)
        assert ("_float" in enh.__dict__ or "_float" in ref.__dict__) is not is_large
    for a, b in zip(frames[False], frames[True]):
        assert a.shape == b.shape == (64, 64, 3) and np.abs(a - b).max() < 1e-5
