"""Recipe validation and the built-in presets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from degradation import Degrader, RecipeError, cofe_degrader, load_recipe
from degradation.recipe import BUILTIN_RECIPES, MAX_NAME_LENGTH, MAX_STEPS, loads_recipe

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


# --------------------------------------------------------------------------------------- size limits
def test_deeply_nested_json_is_a_recipe_error(tmp_path):
    bomb = "[" * 200000 + "]" * 200000
    for load in (lambda: load_recipe(_write(tmp_path, bomb)), lambda: loads_recipe(bomb)):
        with pytest.raises(RecipeError, match="nested too deeply") as ei:
            load()
        assert "\n" not in str(ei.value) and len(str(ei.value)) < 300
    shallow_but_too_deep = {**BASE, "description": "x", "steps": [{**BASE["steps"][0], "radius_range": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}]}
    with pytest.raises(RecipeError, match="nested too deeply"):
        Degrader(shallow_but_too_deep)


def test_recipe_text_and_file_size_bounded(tmp_path):
    big = {**BASE, "name": "n" * (5 * 2**20)}  # a 5 MB name would be copied into every manifest record
    with pytest.raises(RecipeError, match="too large") as ei:
        load_recipe(_write(tmp_path, big))
    assert len(str(ei.value)) < 300
    with pytest.raises(RecipeError, match="too large"):
        loads_recipe(json.dumps(big))
    with pytest.raises(RecipeError, match="name") as ei:
        Degrader(big)  # a dict is bounded by the schema
    assert len(str(ei.value)) < 500


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda r: r.update(name="n" * (MAX_NAME_LENGTH + 1)), "name"),
        (lambda r: r.update(description="d" * 2001), "description"),
        (lambda r: r.update(steps=[{"name": f"s{i}", "type": "defocus"} for i in range(MAX_STEPS + 1)]), "steps"),
        (lambda r: r["steps"][0].update(name="s" * 65), "name"),
        (lambda r: r["steps"].__setitem__(0, {"name": "c", "type": "cofe_released", "types": ["111"] * 65}), "types"),
    ],
)
def test_string_and_list_fields_bounded(tmp_path, mutate, field):
    data = json.loads(json.dumps(BASE))
    mutate(data)
    with pytest.raises(RecipeError) as ei:
        load_recipe(_write(tmp_path, data))
    assert field in str(ei.value) and "\n" not in str(ei.value)
    ok = json.loads(json.dumps(BASE))
    ok["name"] = "n" * MAX_NAME_LENGTH
    assert load_recipe(_write(tmp_path, ok)).name == ok["name"]


def test_long_unknown_name_gives_short_message():
    with pytest.raises(RecipeError, match="unknown recipe") as ei:
        load_recipe("x" * 400000)
    assert len(str(ei.value)) < 300


def test_special_files_refused_before_reading(tmp_path):
    import os
    import time

    t = time.perf_counter()
    if Path("/dev/zero").exists():
        with pytest.raises(RecipeError, match="not a regular file"):
            load_recipe("/dev/zero")
    fifo = tmp_path / "r.json"
    os.mkfifo(fifo)  # opening it for reading would block forever
    with pytest.raises(RecipeError, match="not a regular file"):
        load_recipe(fifo)
    assert time.perf_counter() - t < 5


@pytest.mark.parametrize("name", BUILTIN_RECIPES)
def test_builtin_configs_match_their_files(name):
    from importlib import resources

    raw = json.loads(resources.files("degradation").joinpath("recipes", f"{name}.json").read_text())
    cfg = load_recipe(name).config()
    assert cfg["name"] == raw["name"] and cfg["description"] == raw["description"]
    assert len(cfg["steps"]) == len(raw["steps"])
    for got, want in zip(cfg["steps"], raw["steps"]):
        for k, v in want.items():
            assert got[k] == v, (name, k)


RECORDED = [*BUILTIN_RECIPES, "cofe:released:111", "cofe:training:011"]


def _degrader(spec):
    if spec.startswith("cofe:"):
        _, preset, code = spec.split(":")
        return cofe_degrader(preset, code)
    return load_recipe(spec)


@pytest.mark.parametrize("spec", RECORDED)
def test_from_config_rebuilds_identical_degrader(fundus128, spec):
    img, fov, soft = fundus128
    d = _degrader(spec)
    recorded = json.loads(json.dumps(d.config()))  # as stored in a manifest
    r = Degrader.from_config(recorded)
    assert r.config() == d.config() and r.name == d.name
    for seed in range(4):
        p = d.sample(seed, "k", fov)
        assert r.sample(seed, "k", fov) == p
        assert r.apply(img, p, soft).tobytes() == d.apply(img, p, soft).tobytes()
    with pytest.raises(RecipeError, match="recorded recipe"):
        Degrader.from_config({**recorded, "steps": "nope"})
    with pytest.raises(RecipeError, match="expected an object"):
        Degrader.from_config(["x"])
