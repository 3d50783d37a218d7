"""The banded degradation (``degradation.banded``): a band of rows at a time, the same result as one piece.

Row-local operations must be bit-exact for any band height (noise chunks, JPEG's MCU grid, the glare's
block grid and the filters' reach are all crossed by odd band heights here); the operations that need an
image statistic or warp a smooth field (colour jitter, halo, hole) may move a value in its last bits, so
an output pixel by at most one code value, rarely."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _deg_synth import make_fundus

from degradation import cofe_degrader, load_recipe, loads_recipe

LOCAL = {  # every row-local operation (no colour/halo/hole statistics)
    "schema_version": 1,
    "name": "local",
    "steps": [
        {"name": "cofe", "type": "cofe_released", "p": 1.0, "types": ["110"]},
        {"name": "haze", "type": "haze", "p": 1, "t_range": [0.5, 0.85], "airlight_range": [0.4, 0.8], "glare_sigma_range": [15, 40], "glare_mix_range": [0.3, 0.8]},
        {"name": "defocus", "type": "defocus", "p": 1, "radius_range": [2.0, 6.0]},
        {"name": "noise", "type": "noise", "p": 1, "a_range": [0.002, 0.01], "b_range": [1e-5, 1e-4]},
        {"name": "motion", "type": "motion", "p": 1, "length_range": [4.0, 15.0], "angle_range": [0, 180]},
        {"name": "vignetting", "type": "vignetting", "p": 1, "strength_range": [0.4, 0.7], "power_range": [1.5, 3.0], "offset_range": [0.0, 0.2]},
        {"name": "underexposure", "type": "underexposure", "p": 1, "gain_range": [0.3, 0.6], "gamma_range": [1.1, 1.6]},
        {"name": "jpeg", "type": "jpeg", "p": 1, "quality_range": [20, 70]},
    ],
}


@pytest.fixture(scope="module")
def photo():
    img, fov, soft = make_fundus(size=860, height=900, width=1000, seed=3)  # s = 1.68: soft rim, binned fields, coarse glare
    return img, fov, soft, fov.circle_mask()


def _both(degrader, photo, seed, levels, band):
    img, fov, soft, binary = photo
    params = degrader.sample(seed, f"k{seed}", fov)
    d1, d2 = {}, {}
    ref = degrader.apply(img, params, soft, levels=levels, details=d1)
    out = np.full_like(ref, np.nan)
    calls = []

    def write(a, x):
        calls.append((a, len(x)))
        out[a : a + len(x)] = x

    degrader.apply_banded(params, lambda a, b: img[a:b].copy(), binary, write, levels, details=d2, band_rows=band)
    assert [a for a, _ in calls] == sorted(a for a, _ in calls) and sum(n for _, n in calls) == len(img)  # each row once, in order
    return ref, out, d1, d2


@pytest.mark.parametrize("band", [37, 100, 2000])
@pytest.mark.parametrize("seed", [0, 1])
def test_row_local_operations_are_bit_exact_in_any_band(photo, band, seed):
    ref, out, _, _ = _both(loads_recipe(json.dumps(LOCAL)), photo, seed, 255, band)
    assert np.array_equal(ref, out)


@pytest.mark.parametrize(
    "name, levels",
    [("released_111", 255), ("training_111", 255), ("examples_111", 255), ("released_111", 65535), ("moderate", 255), ("severe", 255)],
)
def test_statistics_and_fields_move_a_pixel_by_one_code_value_at_most(photo, name, levels):
    deg = cofe_degrader(*name.split("_")) if "_" in name else load_recipe(name)
    ref, out, d1, d2 = _both(deg, photo, 2, levels, 61)
    dq = np.abs(np.floor(out * levels) - np.floor(ref * levels))
    # JPEG re-encodes: a level moved before it can move its 8x8 block by a few levels
    assert dq.max() <= (4 if name == "severe" else 1), name
    assert (dq > 0).mean() < (0.002 if levels == 65535 else 2e-4), (name, (dq > 0).mean())
    # the image-dependent values agree to rounding (OpenCV's masked mean is the less precise of the two)
    for step, vals in d1.items():
        for k, v in (vals or {}).items():
            assert d2[step][k] == pytest.approx(v, rel=1e-7, abs=1e-12), (step, k)


@pytest.mark.parametrize("code", ["101", "111"])
def test_the_canonical_frame_itself_in_bands(code):
    """A 512x512 photograph is the canonical frame (its fields are used as they are, not warped): the hole
    must not scale its stored field in place when rows are asked for twice (a blur follows it)."""
    img, fov, soft = make_fundus(512)
    deg = cofe_degrader("released", code)
    ref, out, _, _ = _both(deg, (img, fov, soft, fov.circle_mask()), 0, 255, 37)
    dq = np.abs(np.floor(out * 255) - np.floor(ref * 255))
    assert dq.max() <= 1 and (dq > 0).mean() < 2e-4


def test_banded_mask_shape_is_checked(photo):
    img, fov, soft, binary = photo
    deg = cofe_degrader("released", "111")
    params = deg.sample(0, "k", fov)
    with pytest.raises(ValueError, match="mask shape"):
        deg.apply_banded(params, lambda a, b: img[a:b].copy(), binary[:-1], lambda a, x: None)
