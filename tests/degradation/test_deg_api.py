"""Contracts of the public API: determinism, replay, purity, range, FOV, resolution independence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from degradation import Degrader, cofe_degrader, load_recipe, soft_fov_mask
from degradation.cofe import CODES
from degradation.fov import FovGeometry
from degradation.functional import pil_color

from _deg_synth import make_fundus

ALL = [("released", c) for c in CODES] + [("training", "111"), ("examples", "111")]


@pytest.mark.parametrize("preset,code", ALL)
def test_apply_contracts(fundus256, preset, code):
    img, fov, soft = fundus256
    d = cofe_degrader(preset=preset, code=code)
    assert d.name == f"cofe-{preset}-{code}"
    before = img.copy()
    p = d.sample(seed=7, key="01_test", fov=fov)
    out = d.apply(img, p, soft, levels=255)
    assert np.array_equal(img, before)  # input never mutated
    assert out.dtype == np.float32 and out.shape == img.shape
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert np.all(out[soft == 0] == 0)  # zero outside the FOV
    assert np.abs(out - img).max() > 0.02  # it does something


def test_same_seed_key_identical_bytes_and_json_replay(fundus128):
    img, fov, soft = fundus128
    d = cofe_degrader("released", "111")
    p1, p2 = d.sample(7, "a", fov), d.sample(7, "a", fov)
    assert p1 == p2
    o1, o2 = d.apply(img, p1, soft), d.apply(img, p2, soft)
    assert o1.tobytes() == o2.tobytes()
    rt = json.loads(json.dumps(p1))
    d2 = Degrader.from_params(rt)
    assert d2.name == d.name and d2.config() == d.config()
    assert d2.apply(img, rt, soft).tobytes() == o1.tobytes()


def test_different_key_or_seed_changes_params(fundus128):
    _, fov, _ = fundus128
    d = cofe_degrader()
    a = d.sample(7, "a", fov)["steps"]
    assert a != d.sample(7, "b", fov)["steps"]
    assert a != d.sample(8, "a", fov)["steps"]


def test_sample_records_fov_and_is_jsonable(fundus128):
    _, fov, _ = fundus128
    p = cofe_degrader().sample(0, "x", fov)
    assert p["fov"] == json.loads(json.dumps(fov.to_dict()))
    rec = p["steps"][0]["params"]
    assert set(rec) >= {"color", "halo", "hole", "spot", "blur"}
    assert set(rec["color"]) == {"brightness_factor", "contrast_factor", "saturation_factor"}
    assert set(rec["halo"]) >= {"num", "center_a", "dia_a", "center_b", "dia_b"}
    assert set(rec["hole"]) >= {"center", "diameter_circle", "brightness_factor", "rad_w", "rad_h", "sigma"}
    assert set(rec["blur"]) == {"sigma", "rad_w", "rad_h"}
    assert all(set(s) >= {"radius", "center", "rad_w", "rad_h", "sigma"} for s in rec["spot"])
    assert json.loads(json.dumps(p)) == p


def test_cofe_degrader_validates():
    with pytest.raises(ValueError):
        cofe_degrader(code="000")
    with pytest.raises(ValueError):
        cofe_degrader(preset="paper")


def test_details_report_image_dependent_values(fundus128):
    img, fov, soft = fundus128
    d = cofe_degrader()
    det = {}
    d.apply(img, d.sample(1, "k", fov), soft, details=det)
    info = det["released"]
    assert 0 < info["halo_mean"] < 1 and -0.33 < info["hole_brightness_factor"] <= 0


def test_resolution_independence():
    """Same params on a 256 image and on its 2× upscale: the downscaled result matches the small one."""
    small, fov_s, soft_s = make_fundus(256)
    big = cv2.resize(small, (512, 512), interpolation=cv2.INTER_LINEAR)
    fov_b = FovGeometry(256.0, 256.0, 256.0, 512, 512)
    soft_b = soft_fov_mask(fov_b.circle_mask(), fov_b)
    big *= soft_b[..., None] > 0
    for preset in ("released", "training"):
        d = cofe_degrader(preset, "111")
        for seed in range(3):
            p = d.sample(seed, "res", fov_s)
            out_s = d.apply(small, p, soft_s)
            out_b = d.apply(big, {**p, "fov": fov_b.to_dict()}, soft_b)
            down = cv2.resize(out_b, (256, 256), interpolation=cv2.INTER_AREA)
            inside = soft_s > 0.99
            diff = np.abs(down - out_s)[inside].mean()
            assert diff < 0.02, (preset, seed, diff)
            # and far from an unrelated degradation
            other = d.apply(small, d.sample(seed + 50, "res", fov_s), soft_s)
            assert np.abs(other - out_s)[inside].mean() > diff


def test_non_square_native_frame_with_fov_cut():
    """HRF/EyePACS-like: FOV circle cut at the top and bottom of a wide image."""
    h, w = 120, 180
    fov = FovGeometry(90.0, 60.0, 70.0, h, w)
    img = np.full((h, w, 3), 0.5, np.float32)
    soft = soft_fov_mask(fov.circle_mask(), fov)
    for d in (cofe_degrader("released", "111"), cofe_degrader("training", "111"), load_recipe("severe")):
        out = d.apply(img, d.sample(3, "hrf", fov), soft)
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
        assert np.all(out[soft == 0] == 0)


def test_levels_16bit(fundus128):
    img, fov, soft = fundus128
    d = cofe_degrader("released", "001")
    p = d.sample(2, "k", fov)
    o8, o16 = d.apply(img, p, soft, levels=255), d.apply(img, p, soft, levels=65535)
    assert np.abs(o8 - o16).max() < 4 / 255
    q = np.floor(o16 * 65535)
    assert np.any(q % 257 != 0)  # finer than 8-bit levels


def test_apply_rejects_shape_mismatch(fundus128):
    img, fov, soft = fundus128
    d = cofe_degrader()
    p = d.sample(0, "k", fov)
    with pytest.raises(ValueError):
        d.apply(img[:64], p, soft[:64])
    with pytest.raises(ValueError):
        d.apply(img, p, soft[:64])


def test_soft_fov_mask_scales_with_fov():
    fov = FovGeometry(512.0, 512.0, 512.0, 1024, 1024)  # s = 2
    b = fov.circle_mask()
    soft = soft_fov_mask(b, fov)
    assert soft.dtype == np.float32 and np.all(soft[~b] == 0) and soft[512, 512] == 1
    ramp = (soft > 0) & (soft < 1)
    assert 0 < ramp[512].sum() <= 8  # a rim of about s pixels on each side
    f1 = FovGeometry(256.0, 256.0, 256.0, 512, 512)
    assert np.array_equal(soft_fov_mask(f1.circle_mask(), f1), f1.circle_mask().astype(np.float32))


def test_colour_ops_match_pil():
    Image = pytest.importorskip("PIL.Image")
    ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for b, c, s in [(0.8, 1.3, 0.7), (1.15, 0.62, 1.38), (0.5, 1.5, 0.5), (1.0, 1.0, 1.0)]:
        im = Image.fromarray(u8)
        im = ImageEnhance.Brightness(im).enhance(b)
        im = ImageEnhance.Contrast(im).enhance(c)
        im = ImageEnhance.Color(im).enhance(s)
        ours = pil_color(u8.astype(np.float32), b, c, s, 255)
        assert np.abs(ours - np.asarray(im, np.float32)).max() <= 1, (b, c, s)
        assert np.mean(ours == np.asarray(im, np.float32)) > 0.99


_TORCH_FREE_CHECK = r"""
import random, sys
sys.modules["torch"] = None  # any `import torch` (direct or through a dependency) now raises ImportError
import numpy as np
np.random.seed(123)
random.seed(123)
np_state, py_state = np.random.get_state(), random.getstate()

import degradation
from degradation import cofe_degrader, load_recipe, soft_fov_mask
from degradation.fov import estimate_fov_geometry

h = w = 96
yy, xx = np.mgrid[:h, :w]
img = np.zeros((h, w, 3), np.float32)
img[np.hypot(yy - h / 2, xx - w / 2) <= 44] = (0.8, 0.4, 0.2)
mask, fov = estimate_fov_geometry(img)
soft = soft_fov_mask(mask, fov)
for d in (cofe_degrader("released", "111"), cofe_degrader("training", "111"), load_recipe("severe")):
    out = d.apply(img, d.sample(seed=3, key="k", fov=fov), soft, levels=255)
    assert out.shape == img.shape and np.isfinite(out).all(), d.name

assert sys.modules["torch"] is None
assert not [m for m in sys.modules if m.startswith("torch.")], "a torch submodule was imported"
assert not [m for m in sys.modules if m.startswith("fundus_pipeline")], "degradation imported fundus_pipeline"
# no global random state was used (drawn from or re-seeded)
g = np.random.get_state()
assert g[0] == np_state[0] and (g[1] == np_state[1]).all() and g[2:] == np_state[2:], "np.random global state changed"
assert random.getstate() == py_state, "random global state changed"
print("ok")
"""


def test_package_is_torch_free_and_uses_no_global_random():
    """Import and run the package in a fresh interpreter where ``import torch`` fails, and check that
    sampling and applying leave numpy's and Python's global random states untouched."""
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", _TORCH_FREE_CHECK], cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"


def test_numpy_typed_fov_gives_json_params(fundus128):
    _, fov, _ = fundus128
    npfov = FovGeometry(np.float64(fov.cx), np.float32(fov.cy), np.float64(fov.radius), np.int64(fov.height), np.int64(fov.width))
    p = cofe_degrader().sample(1, "np", npfov)
    json.dumps(p)  # would raise on numpy integers
    assert p["fov"] == fov.to_dict()


def test_integer_images_rejected(fundus128):
    img, fov, soft = fundus128
    d = cofe_degrader()
    with pytest.raises(TypeError):
        d.apply((img * 255).astype(np.uint8), d.sample(0, "k", fov), soft)
