"""Clinical ops: identity at neutral parameters, expected direction, scaling, exact noise replay."""

from __future__ import annotations

import json

import numpy as np
import pytest

from degradation import Degrader
from degradation.clinical import OPS, OpCtx
from degradation.functional import Frame, disc_psf, line_psf

NEUTRAL = {
    "noise": {"a": 0.0, "b": 0.0, "seed": 1},
    "defocus": {"radius": 0.0},
    "motion": {"length": 0.0, "angle": 30.0},
    "vignetting": {"strength": 0.0, "power": 2.0, "offset": 0.0, "direction": 0.0},
    "haze": {"t": 1.0, "airlight": 0.7, "glare_sigma": 20.0, "glare_mix": 0.5, "tint": [1.0, 0.9, 0.7]},
    "overexposure": {"gain": 1.0, "gamma": 1.0},
    "underexposure": {"gain": 1.0, "gamma": 1.0},
}


def _ctx(fov, soft, levels=255):
    return OpCtx(Frame(fov), soft > 0, levels)


def _hf(img, region):
    g = img.mean(axis=2)
    lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
    return float(lap[region[1:-1, 1:-1]].mean())


@pytest.mark.parametrize("op", sorted(NEUTRAL))
def test_identity_at_neutral(fundus128, op):
    img, fov, soft = fundus128
    out = OPS[op][1](img, NEUTRAL[op], _ctx(fov, soft))
    assert np.array_equal(out, img) and out is not img


def test_jpeg_high_quality_close_and_low_quality_blocky(fundus128):
    img, fov, soft = fundus128
    hi = OPS["jpeg"][1](img, {"quality": 100}, _ctx(fov, soft))
    lo = OPS["jpeg"][1](img, {"quality": 10}, _ctx(fov, soft))
    e_hi, e_lo = np.abs(hi - img).mean(), np.abs(lo - img).mean()
    assert e_hi < 0.01 < e_lo or e_hi < e_lo / 3


@pytest.mark.parametrize("op,rec", [("defocus", {"radius": 3.0}), ("motion", {"length": 8.0, "angle": 45.0})])
def test_blurs_lower_high_frequency_energy(fundus256, op, rec):
    img, fov, soft = fundus256
    out = OPS[op][1](img, rec, _ctx(fov, soft))
    region = soft > 0.99
    assert _hf(out, region) < 0.7 * _hf(img, region)
    assert abs(float(out[region].mean()) - float(img[region].mean())) < 0.01  # PSFs preserve energy


def test_psfs_normalised_and_shaped():
    k = disc_psf(4.0)
    assert k.shape == (9, 9) and k.sum() == pytest.approx(1.0, abs=1e-6) and k[4, 4] == k.max()
    m = line_psf(10.0, 0.0)
    assert m.sum() == pytest.approx(1.0, abs=1e-6)
    rows = np.nonzero(m.sum(axis=1) > 1e-6)[0]
    assert len(rows) <= 2  # horizontal line
    v = line_psf(10.0, 90.0)
    assert len(np.nonzero(v.sum(axis=0) > 1e-6)[0]) <= 2  # vertical line


def test_defocus_scales_with_fov(fundus128):
    """Radius is in canonical pixels: a 128-px image (s = 0.25) gets a 4× smaller PSF than s = 1."""
    from degradation.fov import FovGeometry

    small = Frame(FovGeometry(64.0, 64.0, 64.0, 128, 128))
    big = Frame(FovGeometry(256.0, 256.0, 256.0, 512, 512))
    assert disc_psf(small.length(8.0)).shape == (5, 5)
    assert disc_psf(big.length(8.0)).shape == (17, 17)


def test_haze_lowers_contrast_and_brightens_dark(fundus128):
    img, fov, soft = fundus128
    rec = {"t": 0.6, "airlight": 0.6, "glare_sigma": 20.0, "glare_mix": 0.5, "tint": [1.0, 0.92, 0.72]}
    out = OPS["haze"][1](img, rec, _ctx(fov, soft))
    region = soft > 0.99
    assert np.all(out[region].std(axis=0) < 0.8 * img[region].std(axis=0))  # per-channel contrast
    assert out[region][:, 2].mean() > img[region][:, 2].mean()  # dark blue channel lifted by the veil


def test_vignetting_darkens_rim_not_centre(fundus128):
    img, fov, soft = fundus128
    out = OPS["vignetting"][1](img, {"strength": 0.6, "power": 2.0, "offset": 0.0, "direction": 0.0}, _ctx(fov, soft))
    c = int(fov.cy), int(fov.cx)
    assert np.allclose(out[c], img[c], atol=1e-3)
    rim = (slice(int(fov.cy) - 2, int(fov.cy) + 2), slice(4, 10))
    assert out[rim].mean() < 0.7 * img[rim].mean()
    assert np.all(out <= img + 1e-7)


def test_exposure_directions(fundus128):
    img, fov, soft = fundus128
    over = OPS["overexposure"][1](img, {"gain": 1.6, "gamma": 0.8}, _ctx(fov, soft))
    under = OPS["underexposure"][1](img, {"gain": 0.5, "gamma": 1.4}, _ctx(fov, soft))
    region = soft > 0.99
    assert over[region].mean() > img[region].mean() + 0.1
    assert (over == 1.0).sum() > (img == 1.0).sum()  # highlight clipping
    assert under[region].mean() < img[region].mean() - 0.1
    assert np.all(under <= img + 1e-7)


def test_noise_variance_is_signal_dependent_and_replays(fundus128):
    _, fov, soft = fundus128
    flat_lo = np.full((128, 128, 3), 0.2, np.float32)
    flat_hi = np.full((128, 128, 3), 0.7, np.float32)
    rec = {"a": 0.004, "b": 1e-5, "seed": 123}
    ctx = _ctx(fov, np.ones((128, 128), np.float32))
    lo, hi = OPS["noise"][1](flat_lo, rec, ctx), OPS["noise"][1](flat_hi, rec, ctx)
    assert lo.var() == pytest.approx(0.004 * 0.2 + 1e-5, rel=0.1)
    assert hi.var() == pytest.approx(0.004 * 0.7 + 1e-5, rel=0.1)
    rec2 = json.loads(json.dumps(rec))
    assert OPS["noise"][1](flat_lo, rec2, ctx).tobytes() == lo.tobytes()


def test_clinical_recipe_replay_bytes(fundus128):
    img, fov, soft = fundus128
    d = Degrader(
        {
            "schema_version": 1,
            "name": "all-clinical",
            "steps": [
                {"name": "haze", "type": "haze"},
                {"name": "defocus", "type": "defocus"},
                {"name": "motion", "type": "motion"},
                {"name": "vig", "type": "vignetting"},
                {"name": "over", "type": "overexposure", "p": 0.5},
                {"name": "under", "type": "underexposure", "p": 0.5},
                {"name": "noise", "type": "noise"},
                {"name": "jpeg", "type": "jpeg"},
            ],
        }
    )
    p = d.sample(3, "img", fov)
    out = d.apply(img, p, soft)
    rt = json.loads(json.dumps(p))
    assert Degrader.from_params(rt).apply(img, rt, soft).tobytes() == out.tobytes()
    assert np.all(out[soft == 0] == 0) and out.min() >= 0 and out.max() <= 1
    for st in p["steps"]:
        cfg = next(s for s in d.config()["steps"] if s["name"] == st["name"])
        for k, v in (st["params"] or {}).items():
            if f"{k}_range" in cfg:
                lo, hi = cfg[f"{k}_range"]
                assert lo <= v <= hi


@pytest.mark.parametrize("sigma", [20.0, 60.0, 150.0])
def test_reduced_resolution_glare_blur_within_one_level(sigma):
    """The haze glare (wide Gaussian, dark surroundings) computed at reduced resolution matches the
    direct full-resolution blur to < 1/255 everywhere, also on odd sizes."""
    import cv2

    from _deg_synth import make_fundus
    from degradation.functional import _gauss_ksize, smooth_blur

    img, _, _ = make_fundus(300, height=300, width=337)
    k = _gauss_ksize(sigma)
    ref = cv2.GaussianBlur(img, (k, k), sigma, sigma, borderType=cv2.BORDER_CONSTANT)
    assert np.abs(smooth_blur(img, sigma) - ref).max() < 1 / 255
