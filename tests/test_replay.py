"""fundus_pipeline.stages.replay: strict, bounded loading of a `fundus degrade` manifest for --replay.

The manifests are built here from the degradation library exactly as DegradeStage records them
(config: seed/preset/types/recipe/replay_sha256/degraders; items: key/status/params), so these tests do
not depend on the CLI.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from degradation import Degrader, cofe_degrader, load_recipe, soft_fov_mask
from degradation.fov import estimate_fov_geometry
from fundus_pipeline.errors import UsageError
from fundus_pipeline.stages.replay import Replay, load_replay
from tests.conftest import synthetic_fundus

SEED = 7
KEYS = ("img0", "sub/deep")


def _image(seed: int = 0):
    rgb = synthetic_fundus(96, 96, seed=seed).astype(np.float32) / 255.0
    mask, geom = estimate_fov_geometry(rgb)
    return rgb, mask, geom


def _stage_degraders(recipe: str | None, preset: str, types: list[str]) -> dict[str, Degrader]:
    """What DegradeStage.setup() builds (variant "" for one, else the code)."""
    if recipe:
        return {"": load_recipe(recipe)}
    multi = len(types) > 1
    return {(c if multi else ""): cofe_degrader(preset=preset, code=c) for c in types}


def build_manifest(recipe: str | None = None, preset: str = "released", types=("111",), keys=KEYS, seed: int = SEED) -> dict:
    types = list(types)
    degraders = _stage_degraders(recipe, preset, types)
    rows = []
    for i, key in enumerate(keys):
        _, _, geom = _image(i)
        params = {(v or "default"): d.sample(seed=seed, key=key, fov=geom) for v, d in degraders.items()}
        rows.append(
            {
                "key": key,
                "input": f"/in/{key}.png",
                "outputs": [f"{key}_{v}.png" if v else f"{key}.png" for v in degraders],
                "status": "ok",
                "error": "",
                "seconds": 0.01,
                "variants": list(params),
                "bit_depth": 8,
                "mode": "rgb",
                "fov": geom.to_dict(),
                "params": params,
            }
        )
    rows.append({"key": "zz_broken", "input": "/in/zz_broken.png", "outputs": [], "status": "error", "error": "truncated", "seconds": 0.0})
    config = {
        "seed": seed,
        "preset": None if recipe else preset,
        "types": None if recipe else types,
        "recipe": recipe,
        "replay_sha256": None,
        "degraders": {(k or "default"): d.config() for k, d in degraders.items()},
    }
    return {
        "schema_version": 1,
        "tool": {"name": "fundus-pipeline", "version": "0"},
        "stage": "degrade",
        "command": ["fundus", "degrade"],
        "config": config,
        "config_sha256": "0" * 64,
        "environment": {"python": "3", "nested": {"deep": [1, 2, {"x": None}]}},
        "counts": {"total": len(rows)},
        "replay": None,
        "items": rows,
    }


def write(tmp_path: Path, manifest, name: str = "manifest.json") -> Path:
    p = tmp_path / name
    p.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest, indent=2, default=str) + "\n")
    return p


def refused(path: Path, *fragments: str) -> str:
    with pytest.raises(UsageError) as ei:
        load_replay(path)
    msg = ei.value.message
    assert "\n" not in msg and len(msg) < 1000, msg
    assert "replay manifest" in msg and "--recipe" not in msg, msg
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


# ------------------------------------------------------------------------------------------ round trip
@pytest.mark.parametrize(
    "recipe,preset,types",
    [
        ("mild", "released", None),
        ("moderate", "released", None),
        ("severe", "released", None),
        (None, "released", ["111"]),
        (None, "training", ["001", "110", "111"]),
    ],
)
def test_round_trip_reproduces_pixels(tmp_path, recipe, preset, types):
    m = build_manifest(recipe=recipe, preset=preset, types=types or ["111"])
    p = write(tmp_path, m)
    r = load_replay(p)
    assert isinstance(r, Replay)
    assert r.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert r.seed == SEED and r.recipe == recipe
    assert r.preset == (None if recipe else preset) and r.types == (None if recipe else types)
    original = _stage_degraders(recipe, preset, types or ["111"])
    assert list(r.degraders) == list(original)
    assert sorted(r.params) == sorted(KEYS)  # the failed row is not replayed
    for variant, d in original.items():
        rebuilt = r.degraders[variant]
        assert rebuilt.config() == d.config() and rebuilt.name == d.name
        for i, key in enumerate(KEYS):
            rgb, mask, geom = _image(i)
            rec = r.params_for(key, variant)
            assert rec is r.params[key][variant or "default"]
            assert rec == json.loads(json.dumps(d.sample(seed=SEED, key=key, fov=geom)))
            soft = soft_fov_mask(mask, geom)
            want = d.apply(rgb, d.sample(seed=SEED, key=key, fov=geom), soft, levels=255)
            got = rebuilt.apply(rgb, rec, soft, levels=255)
            assert got.tobytes() == want.tobytes()
            assert Degrader.from_params(rec).apply(rgb, rec, soft).tobytes() == want.tobytes()
    r2 = pickle.loads(pickle.dumps(r))  # the stage is pickled to spawned workers
    assert r2.params == r.params and {k: d.config() for k, d in r2.degraders.items()} == {k: d.config() for k, d in r.degraders.items()}


def test_recorded_recipe_path_is_never_read(tmp_path):
    """D3: config.recipe is informational; /dev/zero or a FIFO there is never opened (no hang, no memory)."""
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    for recorded in ["/dev/zero", str(fifo), str(tmp_path / "missing.json")]:
        m = build_manifest(recipe="moderate")
        m["config"]["recipe"] = recorded
        t = time.perf_counter()
        r = load_replay(write(tmp_path, m))
        assert time.perf_counter() - t < 10
        assert r.recipe == recorded
        assert r.degraders[""].config() == load_recipe("moderate").config()


# ------------------------------------------------------------------------------------------ the file
def test_manifest_must_be_a_regular_file(tmp_path):
    t = time.perf_counter()
    if Path("/dev/zero").exists():
        refused(Path("/dev/zero"), "not a regular file")
    fifo = tmp_path / "manifest.json"
    os.mkfifo(fifo)  # opening it for reading would block until a writer appears
    refused(fifo, "not a regular file")
    refused(tmp_path, "not a regular file")  # the folder: its manifest.json, here the FIFO (campaign 17a F4)
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "is a folder without a manifest.json")
    refused(tmp_path / "nope.json", "not found")
    assert time.perf_counter() - t < 10


def test_manifest_size_is_capped(tmp_path, monkeypatch):
    import fundus_pipeline.stages.replay as rp

    p = write(tmp_path, build_manifest())
    monkeypatch.setattr(rp, "MAX_MANIFEST_BYTES", p.stat().st_size - 1)
    refused(p, "too large")
    monkeypatch.setattr(rp, "MAX_MANIFEST_BYTES", p.stat().st_size)
    assert load_replay(p).seed == SEED


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("{nope", "not valid JSON"),
        ("", "empty"),
        ("[" * 200000 + "]" * 200000, "nested too deeply"),
        ('{"stage": "degrade", "config": ' + "[" * 5000 + "]" * 5000 + "}", "nested too deeply"),
        (b"\xff\xfe{}".decode("latin-1"), "not valid"),
        ("[]", "not a manifest of a `fundus degrade` run"),
        ('{"stage": "segment", "config": {}}', "not a manifest of a `fundus degrade` run"),
    ],
)
def test_undecodable_manifests(tmp_path, text, fragment):
    p = tmp_path / "manifest.json"
    p.write_bytes(text.encode("latin-1"))
    refused(p, fragment)


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "mutate,fragments",
    [
        (lambda m: m["config"].update(types=["999"]), ["config.types.0"]),  # D2: was ValueError -> "internal error"
        (lambda m: m["config"].update(seed="abc"), ["config.seed", "integer"]),  # D2
        (lambda m: m["config"].update(seed=-1), ["config.seed"]),
        (lambda m: m["config"].update(seed=1.5), ["config.seed"]),
        (lambda m: m["config"].update(seed=True), ["config.seed"]),
        (lambda m: m["config"].pop("seed"), ["config.seed", "required"]),
        (lambda m: m["config"].update(preset="paper"), ["config.preset"]),
        (lambda m: m["config"].update(types="111"), ["config.types"]),
        (lambda m: m["config"].update(types=[]), ["config.types"]),
        (lambda m: m["config"].update(types=["111", "111"]), ["distinct"]),
        (lambda m: m["config"].update(types=["001", "111"]), ["degraders must be keyed"]),
        (lambda m: m["config"].update(recipe="moderate"), ["preset and types must be null"]),
        (lambda m: m["config"].update(recipe=["moderate"]), ["config.recipe"]),
        (lambda m: m["config"].update(degraders="cofe"), ["config.degraders"]),
        (lambda m: m["config"]["degraders"]["default"].update(name="n" * 300), ["config.degraders.default", "name"]),
        (lambda m: m["config"]["degraders"]["default"]["steps"][0].update(p=2), ["config.degraders.default", "p"]),
        (lambda m: m["config"]["degraders"]["default"]["steps"][0].update(type="cofe_training"), ["config.degraders.default", "not the Cofe-Net released degrader"]),
        (lambda m: m["config"]["degraders"]["default"]["steps"][0].update(types=["001"]), ["not the Cofe-Net released degrader of type 111"]),
        (lambda m: m.pop("config"), ["config", "required"]),
        (lambda m: m.update(config=[]), ["config"]),
    ],
)
def test_bad_config(tmp_path, mutate, fragments):
    m = build_manifest()
    mutate(m)
    refused(write(tmp_path, m), *fragments)


def test_bad_recipe_config(tmp_path):
    m = build_manifest(recipe="moderate")
    m["config"]["degraders"]["default"]["steps"][1]["t_range"] = [0.9, 0.1]
    refused(write(tmp_path, m), "config.degraders.default", "t_range")
    m = build_manifest(recipe="moderate")
    m["config"]["degraders"]["default"]["steps"].append({"name": "x", "type": "sharpen"})
    refused(write(tmp_path, m), "config.degraders.default")


# ------------------------------------------------------------------------------------------ items
def _first_params(m, label="default"):
    return m["items"][0]["params"][label]


def _step(m, label="default"):
    return _first_params(m, label)["steps"][0]["params"]


@pytest.mark.parametrize(
    "mutate,fragments",
    [
        (lambda m: m.update(items="notalist"), ["items", "valid list"]),  # D4
        (lambda m: m.pop("items"), ["items", "required"]),
        (lambda m: m["items"].__setitem__(0, "row"), ["items.0"]),
        (lambda m: m["items"][0].update(key=["a", "b"]), ["items.0.key", "string"]),  # D2: was TypeError
        (lambda m: m["items"][0].update(key=""), ["items.0.key"]),
        (lambda m: m["items"][0].update(key=12), ["items.0.key"]),
        (lambda m: m["items"][0].pop("key"), ["items.0.key", "required"]),
        (lambda m: m["items"][0].update(status=None), ["items.0.status"]),
        (lambda m: m["items"][1].update(key="img0"), ["items.1", "appears twice"]),
        (lambda m: m["items"][0].update(params=None), ["items.0", "needs its recorded parameters"]),
        (lambda m: m["items"][0].update(params="x"), ["items.0", "needs its recorded parameters"]),
        (lambda m: m["items"][0].update(params={}), ["items.0", "expected the variants ['default']"]),
        (lambda m: m["items"][0]["params"].update(extra=_first_params(m)), ["items.0", "expected the variants"]),
        # wrong parameter types / out-of-range numbers (D4: KeyError and raw OpenCV assertion text before)
        (lambda m: _first_params(m).update(fov="x"), ["items.0", "params.default.fov"]),
        (lambda m: _first_params(m)["fov"].update(radius=-5.0), ["params.default.fov.radius", "greater than 0"]),
        (lambda m: _first_params(m)["fov"].update(radius=0), ["params.default.fov.radius"]),
        (lambda m: _first_params(m)["fov"].update(height=0), ["params.default.fov.height"]),
        (lambda m: _first_params(m)["fov"].update(width=96.5), ["params.default.fov.width", "integer"]),
        (lambda m: _first_params(m)["fov"].update(cx=float("nan")), ["params.default.fov.cx", "finite"]),
        (lambda m: _first_params(m)["fov"].update(cy=1e9), ["params.default.fov", "too far outside"]),
        (lambda m: _first_params(m)["fov"].update(radius=1e7), ["params.default.fov", "implausible"]),
        (lambda m: _first_params(m)["fov"].pop("cx"), ["params.default.fov.cx", "required"]),
        (lambda m: _first_params(m).pop("steps"), ["params.default.steps", "required"]),
        (lambda m: _first_params(m).update(steps="x"), ["params.default.steps"]),
        (lambda m: _first_params(m).update(schema_version=2), ["params.default.schema_version"]),
        (lambda m: _first_params(m).update(seed="7"), ["params.default.seed"]),
        (lambda m: _step(m)["blur"].update(rad_w="3"), ["params.default.steps.0", "blur.rad_w"]),
        (lambda m: _step(m)["blur"].update(rad_w=4), ["blur.rad_w", "odd"]),
        (lambda m: _step(m)["blur"].update(rad_w=-3), ["blur.rad_w"]),
        (lambda m: _step(m)["blur"].update(rad_w=100001), ["blur.rad_w"]),
        (lambda m: _step(m)["blur"].update(sigma=float("inf")), ["blur.sigma"]),
        (lambda m: _step(m)["blur"].pop("sigma"), ["blur.sigma", "required"]),
        (lambda m: _step(m).pop("blur"), ["needs 'blur'"]),
        (lambda m: _step(m).update(type="100"), ["has no 'color'"]),
        (lambda m: _step(m).update(variant="training"), ["does not match step type"]),
        (lambda m: _step(m)["halo"].update(weights=[1, 2]), ["halo.weights"]),
        (lambda m: _step(m)["halo"].update(center_a=[1e12, 3]), ["halo.center_a.0"]),
        (lambda m: _step(m)["hole"].update(rad_h=2), ["hole.rad_h", "odd"]),
        (lambda m: _step(m)["hole"].pop("beta0"), ["needs beta0 and u"]),
        (lambda m: _step(m)["spot"][0].update(center="x"), ["spot.0.center"]),
        (lambda m: _step(m)["spot"].extend([_step(m)["spot"][0]] * 200), ["spot"]),
        (lambda m: _step(m)["color"].update(brightness_factor=None), ["color.brightness_factor"]),
        (lambda m: _step(m)["color"].update(extra=1), ["color.extra"]),
        (lambda m: _first_params(m)["steps"][0].update(applied="yes"), ["steps.0.applied"]),
        (lambda m: _first_params(m)["steps"][0].update(params=None), ["applied step needs params"]),
        (lambda m: _first_params(m)["steps"][0].update(name="other"), ["does not match recipe step"]),
        (lambda m: _first_params(m)["steps"].append(_first_params(m)["steps"][0]), ["2 step records for a recipe of 1"]),
        (lambda m: _step(m).update(type="011"), ["type 011 has no 'blur'"]),
        (lambda m: _first_params(m)["config"].update(name="other"), ["params.default.config", "not the recorded"]),
    ],
)
def test_bad_items(tmp_path, mutate, fragments):
    m = build_manifest()
    mutate(m)
    msg = refused(write(tmp_path, m), *fragments)
    assert "Traceback" not in msg


def test_bad_clinical_params_and_type_code(tmp_path):
    m = build_manifest(recipe="severe", seed=3)
    steps = _first_params(m)["steps"]
    jpeg = next(s for s in steps if s["type"] == "jpeg")
    jpeg.update(applied=True, params={"quality": 500})
    refused(write(tmp_path, m), "jpeg", "quality")
    m = build_manifest(recipe="severe", seed=3)
    noise = next(s for s in _first_params(m)["steps"] if s["type"] == "noise")
    noise.update(applied=True, params={"a": 0.1, "b": 0.0, "seed": -1})
    refused(write(tmp_path, m), "noise", "seed")
    m = build_manifest(recipe="mild", seed=0)
    cofe = _first_params(m)["steps"][0]
    cofe.update(applied=True, params=copy.deepcopy(_step(build_manifest())))
    refused(write(tmp_path, m), "steps.0.params.type", "not among the step's types")


def test_first_error_and_count(tmp_path):
    m = build_manifest()
    _step(m)["blur"].update(rad_w=4, rad_h=6)
    m["items"][1]["params"]["default"]["fov"]["radius"] = -1.0
    msg = refused(write(tmp_path, m), "items.0 (key 'img0')", "blur.rad_", "(and 1 more)")
    m = build_manifest()
    m["config"].update(seed="x", preset="x")
    refused(write(tmp_path, m), "config.seed", "(and 1 more)")
    assert msg.count("items.") == 1


def test_unknown_top_level_fields_and_error_rows_are_ignored(tmp_path):
    m = build_manifest()
    m["environment"] = {"anything": [1, {"x": "y"}]}
    m["new_field"] = 1
    m["items"][-1]["params"] = "garbage of a failed row"
    r = load_replay(write(tmp_path, m))
    assert sorted(r.params) == sorted(KEYS)
    assert r.params_for("zz_broken", "") is None and r.params_for("img0", "") is not None
