"""Tests for FOV estimation in degradation.fov (synthetic discs + the datasets' own masks when present)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from degradation.fov import FovGeometry, estimate_fov, estimate_fov_geometry, fov_geometry

DATA = Path(os.environ.get("FUNDUS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# the datasets these tests read, not only the folder (an empty or partial FUNDUS_DATA skips; campaign 25b C25B-4)
needs_data = pytest.mark.skipif(not ((DATA / "DRIVE").is_dir() and (DATA / "HRF").is_dir()), reason=f"datasets not found at {DATA} (set FUNDUS_DATA)")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()))


def synthetic_fundus(h, w, cx, cy, r, *, level=0.6, vignette=0.5, seed=0, dtype=np.float32):
    """A fundus-like disc: reddish, brighter centre, darker rim, noisy black surround, soft edge."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    d = np.hypot(xx - cx, yy - cy) / r
    shade = level * (1.0 - vignette * d**2)
    edge = np.clip((r - np.hypot(xx - cx, yy - cy)) / 1.5 + 0.5, 0, 1)  # ~1.5 px soft edge
    img = np.stack([shade, shade * 0.5, shade * 0.25], axis=-1) * edge[..., None]
    img += rng.normal(0, 0.01, img.shape).astype(np.float32)
    img = np.clip(img, 0, 1).astype(np.float32)
    truth = FovGeometry(cx, cy, r, h, w)
    if dtype == np.uint8:
        img = np.round(img * 255).astype(np.uint8)
    return img, truth


@pytest.mark.parametrize(
    "name,h,w,cx,cy,r,kw",
    [
        ("centred", 400, 420, 210.0, 200.0, 180.0, {}),
        ("offset_uint8", 300, 360, 170.0, 155.0, 130.0, {"dtype": np.uint8}),
        ("cut_top_bottom", 360, 520, 260.0, 180.0, 240.0, {}),
        ("dark_vignetted", 400, 400, 200.0, 200.0, 185.0, {"level": 0.15, "vignette": 0.6}),
    ],
)
def test_synthetic_discs(name, h, w, cx, cy, r, kw):
    img, truth = synthetic_fundus(h, w, cx, cy, r, **kw)
    mask, geom = estimate_fov_geometry(img)
    assert mask.shape == (h, w) and mask.dtype == bool
    assert iou(mask, truth.circle_mask()) > 0.97
    assert abs(geom.cx - cx) < 2 and abs(geom.cy - cy) < 2 and abs(geom.radius - r) < 2
    np.testing.assert_array_equal(estimate_fov(img), mask)


def test_large_3000px_cut_disc():
    h, w = 2000, 3000
    img, truth = synthetic_fundus(h, w, 1510.0, 990.0, 1300.0, dtype=np.uint8)
    mask, geom = estimate_fov_geometry(img)
    assert iou(mask, truth.circle_mask()) > 0.99
    assert abs(geom.cx - 1510) < 4 and abs(geom.cy - 990) < 4 and abs(geom.radius - 1300) < 4
    # the FOV touches the top and bottom border, so the circle extends past the frame
    assert geom.cy - geom.radius < 0 and geom.cy + geom.radius > h


def test_padding_bands_are_cuts():
    """EyePACS-style: a cut disc padded with black rows to a square; the mask stops at the band."""
    img, truth = synthetic_fundus(400, 400, 200.0, 200.0, 190.0)
    img[:50] = 0
    img[350:] = 0
    mask, geom = estimate_fov_geometry(img)
    want = truth.circle_mask()
    want[:50] = False
    want[350:] = False
    assert iou(mask, want) > 0.97
    assert abs(geom.radius - 190) < 3


def test_no_dark_surround_gives_full_frame_and_inscribed_circle():
    rng = np.random.default_rng(0)
    img = rng.uniform(0.3, 0.9, (120, 200, 3)).astype(np.float32)
    mask, geom = estimate_fov_geometry(img)
    assert mask.all()
    assert geom == FovGeometry(99.5, 59.5, 60.0, 120, 200)
    black = np.zeros((64, 64, 3), np.uint8)
    assert estimate_fov(black).all()


def test_fov_geometry_from_masks():
    truth = FovGeometry(300.0, 200.0, 260.0, 400, 640)  # cut top and bottom
    g = fov_geometry(truth.circle_mask())
    assert abs(g.cx - 300) < 1.5 and abs(g.cy - 200) < 1.5 and abs(g.radius - 260) < 1.5
    big = FovGeometry(1750.0, 1160.0, 1640.0, 2336, 3504)
    g = fov_geometry(big.circle_mask().astype(np.uint8) * 255)
    assert abs(g.cx - 1750) < 4 and abs(g.cy - 1160) < 4 and abs(g.radius - 1640) < 4
    assert fov_geometry(np.zeros((50, 60), bool)) == FovGeometry(29.5, 24.5, 25.0, 50, 60)
    assert fov_geometry(np.ones((50, 60), bool)) == FovGeometry(29.5, 24.5, 25.0, 50, 60)


# ------------------------------------------------------------------------------------------ real data
def _mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    from fundus_pipeline.io import read_image

    arr, _ = read_image(path)
    m = arr if arr.ndim == 2 else arr[..., 0]
    if m.shape != shape:
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return m > 127


@needs_data
def test_drive_all_40_masks():
    from fundus_pipeline.io import read_image

    ious = []
    for split in ("training", "test"):
        for img_path in sorted((DATA / "DRIVE" / split / "images").glob("*.tif")):
            num = img_path.name.split("_")[0]
            img, _ = read_image(img_path)
            ref = _mask(DATA / "DRIVE" / split / "mask" / f"{num}_{split}_mask.gif", img.shape[:2])
            ious.append(iou(estimate_fov(img), ref))
    assert len(ious) == 40
    assert np.mean(ious) >= 0.95, ious
    assert min(ious) >= 0.9


@needs_data
def test_hrf_subset_masks():
    from fundus_pipeline.io import read_image

    names = ["01_h.jpg", "07_g.jpg", "04_dr.JPG", "12_dr.JPG", "15_g.jpg"]
    ious = []
    for name in names:
        p = DATA / "HRF" / "images" / name
        if not p.exists():
            continue
        img, _ = read_image(p)
        ref = _mask(DATA / "HRF" / "mask" / f"{p.stem}_mask.tif", img.shape[:2])
        ious.append(iou(estimate_fov(img), ref))
    assert ious, "no HRF images found"
    assert np.mean(ious) >= 0.95, ious
