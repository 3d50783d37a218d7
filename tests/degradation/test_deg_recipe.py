"""Recipe validation and the built-in presets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from degradation import Degrader, RecipeError, load_recipe
from degradation.recipe import BUILTIN_RECIPES

BASE = {"schema_version": 1, "name": "t", "steps": [{"name": "blur", "type": "defocus", "radius_range": [1, 2]}]}


def _write(tmp_path, data):
    p = tmp_path / "r.json"
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return p


@pytest.mark.parametrize("name", BUILTIN_RECIPES)
def test_builtin_presets_load_and_run(fundus128, name):
    img, fov, soft = fundus128
    d = load_recipe(name)
    assert d.name == name and d.config()["schema_version"] == 1
    out = d.apply(img, d.sample(0, "k", fov), soft)
    assert out.shape == img.shape and np.isfinite(out).all()


def test_severity_ordering(fundus128):
    img, fov, soft = fundus128
    err = {}
    for name in BUILTIN_RECIPES:
        d = load_recipe(name)
        err[name] = np.mean([np.abs(d.apply(img, d.sample(s, "k", fov), soft) - img).mean() for s in range(6)])
    assert err["mild"] < err["moderate"] < err["severe"]


def test_load_from_path(tmp_path):
    d = load_recipe(_write(tmp_path, BASE))
    assert isinstance(d, Degrader) and d.name == "t"
    assert d.config()["steps"][0]["p"] == 1.0  # defaults resolved
    assert load_recipe(str(_write(tmp_path, BASE))).config() == d.config()


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda r: r["steps"][0].update(sigma=3), "sigma"),  # unknown key
        (lambda r: r.update(extra=1), "extra"),  # unknown top-level key
        (lambda r: r["steps"][0].update(radius_range=[3, 1]), "radius_range"),  # decreasing range
        (lambda r: r["steps"][0].update(radius_range=[-1, 1]), "radius_range"),  # out of bounds
        (lambda r: r["steps"][0].update(p=1.5), "p"),  # probability
        (lambda r: r["steps"][0].update(type="sharpen"), "type"),  # bad type
        (lambda r: r.update(schema_version=2), "schema_version"),
        (lambda r: r["steps"].append(dict(r["steps"][0])), "steps"),  # duplicate step name
        (lambda r: r["steps"].__setitem__(0, {"name": "c", "type": "cofe_released", "types": ["000"]}), "types"),
        (lambda r: r["steps"].__setitem__(0, {"name": "j", "type": "jpeg", "quality_range": [0, 50]}), "quality_range"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, mutate, field):
    data = json.loads(json.dumps(BASE))
    mutate(data)
    with pytest.raises(RecipeError) as ei:
        load_recipe(_write(tmp_path, data))
    msg = str(ei.value)
    assert field in msg and "\n" not in msg
    assert isinstance(ei.value, ValueError)


def test_bad_json_and_unknown_name(tmp_path):
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(_write(tmp_path, "{nope"))
    with pytest.raises(RecipeError, match="unknown recipe"):
        load_recipe("ultra")
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "missing.json")


def test_scalar_range_means_fixed_and_single_code_string(tmp_path):
    data = {"schema_version": 1, "name": "s", "steps": [{"name": "c", "type": "cofe_released", "types": "100"}, {"name": "d", "type": "defocus", "radius_range": 2}]}
    d = load_recipe(_write(tmp_path, data))
    cfg = d.config()["steps"]
    assert cfg[0]["types"] == ["100"] and cfg[1]["radius_range"] == [2.0, 2.0]


def test_probability_zero_never_applies_and_step_streams_are_independent(fundus128):
    _, fov, _ = fundus128
    steps = [{"name": "a", "type": "defocus", "p": 0.0}, {"name": "b", "type": "motion"}]
    d1 = Degrader({"schema_version": 1, "name": "x", "steps": steps})
    d2 = Degrader({"schema_version": 1, "name": "x", "steps": steps[1:]})
    for s in range(20):
        p1, p2 = d1.sample(s, "k", fov), d2.sample(s, "k", fov)
        assert p1["steps"][0]["applied"] is False
        assert p1["steps"][1]["params"] == p2["steps"][0]["params"]


def test_types_list_draws_all_codes(fundus128):
    _, fov, _ = fundus128
    d = load_recipe("moderate")
    seen = {d.sample(s, "k", fov)["steps"][0]["params"]["type"] for s in range(200) if d.sample(s, "k", fov)["steps"][0]["applied"]}
    assert seen == {"001", "010", "011", "100", "101", "110", "111"}
