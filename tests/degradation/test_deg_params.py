"""degradation.params: the schema of Degrader.sample records (validation before replay)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from pydantic import ValidationError

from degradation import RecipeError, cofe_degrader, load_recipe, soft_fov_mask
from degradation.cofe import CODES
from degradation.fov import FovGeometry
from degradation.params import check_steps_match, validate_params
from degradation.recipe import BUILTIN_RECIPES

DEGRADERS = [("cofe", p, c) for p in ("released", "training", "examples") for c in CODES] + [("recipe", n, None) for n in BUILTIN_RECIPES]
FOVS = [FovGeometry(48.0, 48.0, 44.2, 96, 96), FovGeometry(1750.3, 1168.0, 1700.0, 2336, 3504), FovGeometry(256.0, 256.0, 256.0, 512, 512)]


def _make(kind, a, b):
    return cofe_degrader(a, b) if kind == "cofe" else load_recipe(a)


@pytest.mark.parametrize("kind,a,b", DEGRADERS)
def test_every_sampled_record_validates(kind, a, b):
    d = _make(kind, a, b)
    for seed in range(25):
        for fov in FOVS:
            p = json.loads(json.dumps(d.sample(seed, f"k{seed}", fov)))
            validate_params(p)
            check_steps_match(p, d.config())


def _extreme_record(fov: FovGeometry) -> dict:
    """Every Cofe value at the edge of the accepted envelope."""
    p = json.loads(json.dumps(cofe_degrader("released", "111").sample(0, "x", fov)))
    rec = p["steps"][0]["params"]
    rec["color"] = {"brightness_factor": 4.0, "contrast_factor": 0.0, "saturation_factor": 4.0}
    rec["halo"].update(center_a=[-512, 1024], center_b=[1024, -512], dia_a=0.0, dia_b=4096.0, gauss_rad=1025, sigma=1024.0)
    rec["hole"].update(center=[1024, 1024], diameter_circle=2048.0, rad_w=1025, rad_h=1, sigma=1024.0, brightness_factor=-1.0)
    spot = {"radius": 128.0, "center": [-512, 1024], "rad_w": 65, "rad_h": 65, "sigma": 256.0, "value": 1.0}
    rec["spot"] = [dict(spot) for _ in range(100)]
    rec["blur"] = {"sigma": 64.0, "rad_w": 65, "rad_h": 1}
    return p


def test_extreme_but_valid_records_apply():
    h = w = 96
    for fov in (FovGeometry(48.0, 48.0, 2.0 * w, h, w), FovGeometry(-140.0, 240.0, 0.5, h, w)):
        p = _extreme_record(fov)
        validate_params(p)
        img = np.full((h, w, 3), 0.5, np.float32)
        soft = soft_fov_mask(fov.circle_mask(), fov)
        out = cofe_degrader("released", "111").apply(img, p, soft)
        assert out.shape == img.shape and np.isfinite(out).all()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p["steps"][0]["params"]["blur"].update(rad_w=67),
        lambda p: p["steps"][0]["params"]["halo"].update(gauss_rad=1027),
        lambda p: p["steps"][0]["params"]["spot"].extend([p["steps"][0]["params"]["spot"][0]] * 100),
        lambda p: p["fov"].update(radius=2 * 96 + 1.0),
        lambda p: p["fov"].update(height=True),
        lambda p: p["steps"][0].update(applied=False),
        lambda p: p.update(unknown=1),
    ],
)
def test_out_of_envelope_refused(mutate):
    p = json.loads(json.dumps(cofe_degrader("released", "111").sample(0, "x", FOVS[0])))
    validate_params(copy.deepcopy(p))
    mutate(p)
    with pytest.raises(ValidationError):
        validate_params(p)


def test_steps_must_match_the_recipe():
    d = load_recipe("moderate")
    p = d.sample(0, "k", FOVS[0])
    with pytest.raises(RecipeError, match="does not match recipe step"):
        check_steps_match(p, load_recipe("severe").config())
    with pytest.raises(RecipeError, match="step records for a recipe"):
        check_steps_match({**p, "steps": p["steps"][:-1]}, d.config())
