"""The contract every registered model meets (as timm and pyiqa test theirs), the torch-free catalogue
that ``fundus models`` reads, and the typed weights manifest.

Per model: it builds, matches its catalogue row (metadata, factory path and parameter count), maps
N x 3 x H x W RGB to N x 1 x H x W logits, ``forward_train`` returns the documented dict, and a state
dict round-trips through ``torch.save`` / ``torch.load(weights_only=True)`` with identical outputs
(enhancers map to an image, graders a square input to N x (grades + flags) logits).
Per shipped weights: the manifest entry agrees with the catalogue and the checked loader loads them.
"""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import pytest
import torch

from fundus_pipeline.errors import WeightsError
from fundus_pipeline.quality.grading import FLAGS, GRADES
from fundus_pipeline.models.catalog import CATALOG
from fundus_pipeline.models.registry import build_model, list_models, register_model
from fundus_pipeline.models.spec import DEFAULT_THRESHOLD, LoadedWeights, WeightsManifest, WeightsSpec
from fundus_pipeline.models.weights import load_manifest, load_model, read_manifest, resolve_weights, weights_dir

torch.set_num_threads(1)

MODELS = [e.name for e in list_models()]
SHIPPED = read_manifest()
# What forward_train returns (the trainer weights its losses as the model declares): logits N x 1 x H x W,
# aux [(logits N x 1 x H x W, weight > 0), ...], edge (logits N x 1 x H x W, or None), main_weight > 0,
# edge_weight >= 0 (0 when there is no edge output).
TRAIN_KEYS = {"logits", "aux", "edge", "main_weight", "edge_weight"}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _input(model, n: int = 1, seed: int = 0) -> torch.Tensor:
    side = max(32, model.size_divisor * 2)
    x = torch.rand(n, model.in_channels, side, side, generator=torch.Generator().manual_seed(seed))
    x[..., side // 4 : side // 2, :] *= 0.3  # some structure (MSRF computes Canny edges of its input)
    return x


def test_registry_equals_catalogue():
    assert sorted(MODELS) == sorted(CATALOG), "every registered model needs a row in models/catalog.py and vice versa"
    for e in list_models():
        row = CATALOG[e.name]
        assert (e.task, e.arch, e.width, e.description, e.factory_path) == (row.task, row.arch, row.width, row.description, row.factory)


def test_register_model_refuses_disagreeing_metadata(monkeypatch):
    from fundus_pipeline.models import registry

    entry = registry._REGISTRY["imff_w8"]
    monkeypatch.delitem(registry._REGISTRY, "imff_w8")  # restored after the test
    with pytest.raises(ValueError, match=r"disagrees with fundus_pipeline/models/catalog.py: width=99 \(catalogue: 8\)"):
        register_model("imff_w8", task="segmentation", arch="imff", width=99, description=entry.description)(entry.factory)
    assert "imff_w8" not in registry._REGISTRY
    with pytest.raises(ValueError, match="registered twice"):
        register_model("imff", task="segmentation", arch="imff", width=16)(lambda: None)


SEGMENTERS = [n for n in MODELS if CATALOG[n].task == "segmentation"]
ENHANCERS = [n for n in MODELS if CATALOG[n].task == "enhancement"]


@pytest.mark.parametrize("name", ENHANCERS)
def test_enhancer_contract(name):
    """Enhancers map N x 3 x H x W in [0, 1] to an image of the same shape in [0, 1]; forward_train adds the
    coarse pass (two-scale models, half size), the structure branch's vessel logits and the attention map."""
    torch.manual_seed(0)
    model = build_model(name)
    assert n_params(model) == CATALOG[name].params, f"update models/catalog.py: {name} has {n_params(model):_} parameters"
    assert model.in_channels == 3 and model.size_divisor >= 1
    model.eval()
    side = model.size_divisor * 2
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)  # oneDNN may pick another 5x5 algorithm
    model.train()
    out = model.forward_train(torch.cat([x, x.flip(-1)]))
    assert set(out) <= {"out", "out_half", "vessel_logits", "attention"} and out["out"].shape == (2, 3, side, side)
    assert ("out_half" in out) == bool(getattr(model, "two_scale", False))
    if "out_half" in out:
        assert out["out_half"].shape == (2, 3, side // 2, side // 2)
    if "vessel_logits" in out:
        assert out["vessel_logits"].shape == (2, 1, side, side)
    if "attention" in out:
        assert out["attention"].shape == (2, 1, side // 2, side // 2)
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    fresh = build_model(name)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", SEGMENTERS)
def test_model_contract(name):
    torch.manual_seed(0)
    model = build_model(name)
    assert isinstance(model, torch.nn.Module)
    assert n_params(model) == CATALOG[name].params, f"update models/catalog.py: {name} has {n_params(model):_} parameters"
    assert model.in_channels == 3 and model.size_divisor >= 1

    # inference: N x 3 x H x W in [0, 1] -> N x 1 x H x W logits, deterministic in eval mode
    model.eval()
    x = _input(model)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (1, 1, *x.shape[-2:]) and y.dtype == torch.float32
        assert torch.isfinite(y).all()
        assert torch.equal(model(x), y)

    # training outputs (train mode, batch 2 for batch norm)
    model.train()
    xt = _input(model, n=2, seed=1)
    out = model.forward_train(xt)
    assert isinstance(out, dict) and set(out) == TRAIN_KEYS
    hw = (2, 1, *xt.shape[-2:])
    assert out["logits"].shape == hw and out["logits"].requires_grad
    assert isinstance(out["aux"], list)
    for aux, weight in out["aux"]:
        assert aux.shape == hw and isinstance(weight, float) and weight > 0
    assert isinstance(out["main_weight"], float) and out["main_weight"] > 0
    assert isinstance(out["edge_weight"], float) and out["edge_weight"] >= 0
    if out["edge"] is None:
        assert out["edge_weight"] == 0
    else:
        assert out["edge"].shape == hw and out["edge_weight"] > 0

    # state dict round trip into a fresh, differently initialised model
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    fresh = build_model(name)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))



GRADERS = [n for n in MODELS if CATALOG[n].task == "grading"]


@pytest.mark.parametrize("name", GRADERS)
def test_grader_contract(name):
    """Graders map N x 3 x S x S RGB in [0, 1] (S = the model's ``input_size``, square) to N x (n_grades + n_flags)
    logits: the grade logits (``GRADES`` order) first, then the multi-label flag logits (``FLAGS`` order)."""
    from fundus_pipeline.quality.grading import FLAGS, GRADES

    torch.manual_seed(0)
    model = build_model(name)
    assert isinstance(model, torch.nn.Module)
    assert n_params(model) == CATALOG[name].params, f"update models/catalog.py: {name} has {n_params(model):_} parameters"
    assert model.in_channels == 3 and model.size_divisor >= 1 and model.input_size % model.size_divisor == 0
    assert (model.n_grades, model.n_flags) == (len(GRADES), len(FLAGS))
    side = model.input_size
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    x[..., side // 4 : side // 2, :] *= 0.3

    model.eval()
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, len(GRADES) + len(FLAGS)) and y.dtype == torch.float32
        assert torch.isfinite(y).all()
        torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)  # oneDNN may pick another conv algorithm
    with pytest.raises(ValueError, match="square"):
        model(torch.rand(1, 3, side, side + model.size_divisor))

    # state dict round trip into a fresh, differently initialised model
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    fresh = build_model(name)
    fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=1e-5)

# --- the shipped weights and the typed manifest -----------------------------------------------------


def test_manifest_validates_and_round_trips():
    path = weights_dir() / "manifest.json"
    if not path.exists():
        pytest.skip("no weights/manifest.json")
    manifest = load_manifest()
    assert isinstance(manifest, WeightsManifest) and manifest.weights == SHIPPED
    assert manifest.dumps() == path.read_text()  # writers (export_weights.py) do not churn the file
    assert WeightsManifest.model_validate(manifest.to_json_dict()) == manifest


@pytest.mark.parametrize("spec", SHIPPED, ids=[s.name for s in SHIPPED])
def test_shipped_weights_agree_with_the_catalogue_and_load(spec: WeightsSpec):
    row = CATALOG[spec.model]
    assert (spec.arch, spec.width, spec.params) == (row.arch, row.width, row.params)
    path = weights_dir() / spec.file
    if not path.exists():
        pytest.skip(f"{path} not present")
    assert resolve_weights(spec.name) == path
    model, loaded = load_model(spec.name)
    assert isinstance(loaded, LoadedWeights) and loaded.spec == spec
    assert (loaded.name, loaded.model, loaded.sha256, loaded.path) == (spec.name, spec.model, spec.sha256, path)
    assert n_params(model) == spec.params and not model.training
    if row.task in ("pretext", "quality"):  # fixed 224 crops of a canonical frame; a feature head or a score
        assert loaded.threshold is None and spec.output.kind == {"pretext": "pretext", "quality": "score"}[row.task]
        assert spec.output.crop == model.img_size and spec.input.scale_policy.type == "canonical_frame"
        return
    assert model.size_divisor == spec.input.size_divisor
    if row.task == "grading":  # grade and flag logits of a canonical frame at the model's input size, calibrated
        assert loaded.threshold is None and spec.output.kind == "grade" and spec.input.scale_policy.type == "canonical_frame"
        assert spec.input.scale_policy.size == model.input_size and spec.output.temperature > 0
        assert (spec.output.grades, spec.output.flags) == (list(GRADES), list(FLAGS))
        return
    if row.task == "enhancement":  # image output in a canonical frame
        assert loaded.threshold is None and spec.output.kind == "image" and spec.input.scale_policy.type == "canonical_frame"
        assert spec.output.transfer == spec.output.transfer_selection["choice"]
        return
    assert loaded.threshold == spec.output.threshold and loaded.threshold_source == "manifest"
    assert loaded.max_fov_diameter == spec.input.scale_policy.max_fov_diameter


def test_every_default_weights_name_is_a_shipped_entry_of_its_task():
    """The stages' and the chain's default weights (and the enhancer's segmenter) name manifest entries of the
    task that uses them, so a changed default cannot point at a missing or wrong-task file."""
    from fundus_pipeline import config as C

    def field(model, name):
        return model.model_fields[name].default

    defaults = [
        (field(C.SegmentConfig, "weights"), "segmentation"), (field(C.EnhanceConfig, "weights"), "enhancement"),
        (field(C.EnhanceConfig, "segmenter"), "segmentation"), (field(C.ScoreConfig, "weights"), "quality"),
        (field(C.GradeConfig, "weights"), "grading"), (field(C.RunConfig, "grade_weights"), "grading"),
        (field(C.RunConfig, "enhance_weights"), "enhancement"), (field(C.RunConfig, "score_weights"), "quality"),
        (field(C.RunConfig, "segment_weights"), "segmentation"),
    ]  # fmt: skip
    manifest = load_manifest()
    for name, task in defaults:
        spec = manifest.get(name)
        assert spec is not None, name
        assert CATALOG[spec.model].task == task, (name, task)
    # the chain and the single stage agree
    assert field(C.RunConfig, "enhance_weights") == field(C.EnhanceConfig, "weights")
    assert field(C.RunConfig, "grade_weights") == field(C.GradeConfig, "weights")


def test_user_weights_with_arch(tmp_path):
    p = tmp_path / "mine.pt"
    torch.save(build_model("imff_tiny").state_dict(), p)
    with pytest.raises(WeightsError, match="not listed"):
        load_model(p)
    model, loaded = load_model(p, arch="imff_tiny")
    assert loaded.spec is None and loaded.model == "imff_tiny" and loaded.name == "mine" and loaded.path == p
    assert loaded.threshold == DEFAULT_THRESHOLD and loaded.threshold_source == "default"
    assert loaded.max_fov_diameter > 0


def _shipped_dict() -> dict:
    path = weights_dir() / "manifest.json"
    if not path.exists():
        pytest.skip("no weights/manifest.json")
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda e: e["output"].update(treshold=0.5), "output.treshold: unknown field"),
        (lambda e: e["output"].pop("threshold"), "output.threshold: missing field"),
        (lambda e: e["output"].update(threshold=1.2), "output.threshold: Input should be less than 1"),
        (lambda e: e["input"]["scale_policy"].pop("max_fov_diameter"), "input.scale_policy.max_fov_diameter: missing field"),
        (lambda e: e.update(sha256="abc"), "sha256: String should match pattern"),
        (lambda e: e.update(file="../elsewhere.pt"), "file: must be a file name inside the weights folder"),
    ],
)
def test_manifest_errors_name_file_entry_and_field(tmp_path, mutate, expected):
    data = _shipped_dict()
    entry = next(w for w in data["weights"] if w["name"] == "imff")  # a segmentation entry
    mutate(entry)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError) as ei:
        load_manifest(tmp_path)
    msg = ei.value.message
    assert str(tmp_path / "manifest.json") in msg and f"entry {entry['name']!r}: {expected}" in msg
    assert "\n" not in msg


def test_manifest_error_counts_the_rest(tmp_path):
    data = _shipped_dict()
    entry = next(w for w in data["weights"] if w["name"] == "imff")
    entry["output"].pop("threshold")
    entry.pop("license")
    entry["colour"] = "rgb"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"\(and 2 more\)$"):
        load_manifest(tmp_path)
    data = _shipped_dict()
    data["schema_version"] = 2
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="schema_version"):
        load_manifest(tmp_path)
    data = _shipped_dict()
    data["weights"].append(copy.deepcopy(data["weights"][0]))
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="listed twice"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(WeightsError, match="cannot read"):
        load_manifest(tmp_path)
    assert load_manifest(tmp_path / "absent").weights == []


def test_spec_helpers_for_writers():
    data = _shipped_dict()
    manifest = WeightsManifest.model_validate(data)
    spec = manifest.weights[0]
    renamed = WeightsSpec.model_validate({**spec.to_json_dict(), "name": "copy", "file": "copy.pt", "sha256": "0" * 64})
    grown = manifest.with_entry(renamed)
    assert grown.names() == sorted([*manifest.names(), "copy"]) and grown.get("copy") == renamed
    assert manifest.with_entry(spec) == manifest
    assert grown.by_sha256(spec.sha256) == spec and grown.by_sha256("0" * 64) == renamed

    assert json.loads(grown.dumps())["weights"][grown.names().index("copy")]["file"] == "copy.pt"


@pytest.mark.parametrize("value", ["imff_paper", "msrf"])
def test_architecture_without_shipped_weights(value):
    if any(s.name == value for s in SHIPPED):
        pytest.skip(f"{value} has shipped weights")
    with pytest.raises(WeightsError) as ei:
        resolve_weights(value)
    names = ", ".join(s.name for s in SHIPPED) or "none"
    assert ei.value.message == f"{value} is an architecture without shipped weights; shipped weights: {names}"
    assert f"--arch {value}" in ei.value.hint


def test_unknown_weights_name_suggests_shipped_names():
    if not any(s.name == "imff" for s in SHIPPED):
        pytest.skip("no shipped imff weights")
    with pytest.raises(WeightsError, match=r"^weights not found: imfff \(did you mean imff\?\)$"):
        resolve_weights("imfff")
    with pytest.raises(WeightsError, match=r"^weights not found: zzz$"):
        resolve_weights("zzz")
    with pytest.raises(WeightsError, match="folder"):
        resolve_weights(Path(__file__).parent)


def test_enhancer_output_rules():
    """Both output rules start as the identity. The additive rule (cofe_add) clips to [0, 1] only in eval mode,
    and passes the full L1 gradient to a near-black pixel, where the logit rule passes about s(1 - s) of it
    (the reason for cofe_add: a deep Cofe-Net hole was barely lifted through the logit)."""
    from fundus_pipeline.models.cofe import CofeNet, additive_output, residual_output

    x = torch.tensor([0.005, 0.5, 0.995])
    for rule in (lambda r: residual_output(r, x), lambda r: additive_output(r, x, False)):
        torch.testing.assert_close(rule(torch.zeros(3)), x, rtol=0, atol=1e-6)
    r = torch.tensor([0.3, 0.0, 0.3])
    assert additive_output(r, x, True)[2] > 1 and additive_output(r, x, False)[2] == 1
    grads = {}
    for name, rule in (("logit", residual_output), ("add", lambda r, x: additive_output(r, x, True))):
        r = torch.zeros(3, requires_grad=True)
        rule(r, x).sum().backward()
        grads[name] = r.grad
    torch.testing.assert_close(grads["add"], torch.ones(3))
    assert grads["logit"][0] < 0.01 and grads["logit"][1] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="output must be one of"):
        CofeNet(2, rsa_width=2, output="sigmoid")
    assert build_model("cofe_add").output == "add" and build_model("cofe").output == "logit"
