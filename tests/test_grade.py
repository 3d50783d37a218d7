"""The grader end to end on a synthetic copy of the datasets: grades and flags from parameter records,
the EyePACS-256 patient split, the grade-set builder (layout, labels, resume), the trainer (bit-exact
resume, the temperature), the ``fundus grade`` command (columns, not-fundus inputs, --sort-into) and
``fundus evaluate grade`` on its output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fundus_pipeline.cli import main as cli_main
from fundus_pipeline.quality.grading import FLAGS, GOOD_Q, REJECT_Q, degradation_flags, grade_of_q

torch.set_num_threads(1)


def test_grade_thresholds():
    assert grade_of_q(1.0) == 0 and grade_of_q(GOOD_Q) == 0 and grade_of_q(GOOD_Q - 1e-6) == 1
    assert grade_of_q(REJECT_Q) == 1 and grade_of_q(REJECT_Q - 1e-6) == 2 and grade_of_q(0.0) == 2


def test_flags_from_parameter_records():
    from degradation import cofe_degrader, load_recipe

    from fundus_pipeline.canonical import canonical_fov_geometry

    geom = canonical_fov_geometry(512)
    assert degradation_flags(None) == {f: 0 for f in FLAGS}
    # Cofe-Net type bits: blur, spot, illumination (colour, halo, hole)
    for code, flags in (("100", {"blur"}), ("010", {"spots"}), ("001", {"illumination"}), ("111", {"blur", "spots", "illumination"})):
        rec = cofe_degrader("released", code).sample(seed=0, key="a", fov=geom)
        assert {f for f, v in degradation_flags(rec).items() if v} == flags, code
    rec = load_recipe("severe").sample(seed=3, key="b", fov=geom)
    applied = {s["type"] for s in rec["steps"] if s["applied"]}
    on = {f for f, v in degradation_flags(rec).items() if v}
    expect = {"defocus": "blur", "motion": "blur", "haze": "haze", "noise": "noise", "jpeg": "compression", "vignetting": "illumination",
              "underexposure": "underexposure", "overexposure": "overexposure"}  # fmt: skip
    assert {expect[a] for a in applied if a in expect} <= on
    assert "not_fundus" not in on


def test_eyepacs_split_is_by_patient_and_fixed(fake_data):
    from fundus_pipeline.datasets import eyepacs256_split

    rows = eyepacs256_split(fake_data)
    assert rows == eyepacs256_split(fake_data)
    by_patient: dict[str, set] = {}
    for r in rows:
        by_patient.setdefault(r["patient"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())
    assert [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")] == [8, 2, 0]


def test_eyepacs_split_matches_the_recorded_one(data_root):
    from fundus_pipeline.datasets import eyepacs256_split

    if not (data_root / "EyePACS-256").is_dir():
        pytest.skip("EyePACS-256 not present")
    recorded = list(csv.DictReader(open(Path(__file__).parents[1] / "docs" / "grade" / "eyepacs256_split.csv")))
    now = eyepacs256_split(data_root)
    assert [(r["image"], r["split"]) for r in recorded] == [(r["image"], r["split"]) for r in now]
    assert {r["split"] for r in now} == {"train", "val", "test"}


def _build(data: Path, out: Path, *extra: str) -> int:
    return cli_main(["build", "grade-set", str(out), "--data", str(data), "--limit", "1", "--draws", "2", "--size", "128",
                     "--store-size", "64", "--threads", "1", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def grade_set(fake_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gs") / "set"
    assert _build(fake_data, out, "--parts", "train") == 0
    return out


def test_grade_set_layout_and_resume(grade_set, fake_data):
    from fundus_pipeline.quality.grade_set import NATURAL

    rows = list(csv.DictReader(open(grade_set / "labels.csv")))
    photos = [r for r in rows if r["kind"] != "natural"]
    natural = [r for r in rows if r["kind"] == "natural"]
    assert len(photos) == 3 * 3 and {r["dataset"] for r in photos} == {"drive", "hrf", "heimed"}
    assert len(natural) == 2 * (len(NATURAL["train"]) + len(NATURAL["val"]))
    for r in photos:
        assert (grade_set / "train" / "images" / f"{r['key']}.png").is_file()
        if r["kind"] == "clean":
            assert r["quality"] == "0" and float(r["q"]) == 1.0 and not any(int(r[f"flag_{f}"]) for f in FLAGS)
        else:
            q = float(r["q"])
            assert int(r["quality"]) == grade_of_q(q) and q == pytest.approx((float(r["ssim"]) + float(r["f1"])) / 2, abs=2e-6)
            assert int(r["flag_not_fundus"]) == 0
    assert all(r["quality"] == "2" and r["flag_not_fundus"] == "1" for r in natural)
    assert {r["split"] for r in natural} == {"train", "val"} and "natural/astronaut" not in {r["source"] for r in natural}
    m = json.loads((grade_set / "manifest.json").read_text())
    assert m["flags"] == list(FLAGS) and m["counts"]["train"]["images"] == len(rows)
    marker = grade_set / "rows" / "train" / "drive-21.json"
    stamp = marker.stat().st_mtime_ns
    before = (grade_set / "labels.csv").read_bytes()
    assert _build(fake_data, grade_set, "--parts", "train") == 0
    assert marker.stat().st_mtime_ns == stamp and (grade_set / "labels.csv").read_bytes() == before
    assert _build(fake_data, grade_set, "--parts", "train", "--seed", "9") == 2  # other options: refused


def test_trainer_reads_set_images_at_their_stored_side(grade_set):
    """Training crops come from the finest copy the set holds (``--store-size``), enlarged only below the
    model's input: a 448-input grader trained on a 512 set must not see 256-pixel images blown up."""
    from fundus_pipeline.train.grade import read_u8, set_items

    side = next(iter((grade_set / "train" / "images").glob("*.png")))
    stored = int(read_u8(side).shape[0])
    small = set_items(grade_set, "train", stored // 2)
    big = set_items(grade_set, "train", stored * 2)
    assert {i.image.shape for i in small} == {(stored, stored, 3)}
    assert {i.image.shape for i in big} == {(stored * 2, stored * 2, 3)}


def test_fit_temperature_recovers_a_known_temperature():
    from fundus_pipeline.train.grade import fit_temperature

    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 3, generator=g) * 3
    labels = torch.multinomial(torch.softmax(z / 2.0, 1), 1, generator=g)[:, 0]
    assert fit_temperature(z, labels) == pytest.approx(2.0, rel=0.1)
    assert fit_temperature(z * 0.5, labels) == pytest.approx(1.0, rel=0.1)


def test_decision_offsets_are_chosen_on_the_given_parts_and_zero_when_nothing_beats_them():
    from fundus_pipeline.train.grade import choose_decision_bias, log_probabilities

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 3, 300)
    logits = np.eye(3)[truth] * 2.0 + rng.normal(0, 0.3, (300, 3))
    logits[truth == 1, 0] += 2.3  # usable photographs look good to this grader: about 0.3 too little for usable
    lp = log_probabilities(logits, 1.0)
    sel = choose_decision_bias({"a": (lp, truth)}, step=0.1, span=2.0)
    assert sel["choice"][0] == 0.0 and sel["choice"][1] > 0.2
    assert sel["means"]["after"]["a_macro_f1"] > sel["means"]["before"]["a_macro_f1"] + 0.1
    perfect = log_probabilities(np.eye(3)[truth] * 5.0, 1.0)
    assert choose_decision_bias({"a": (perfect, truth)})["choice"] == [0.0, 0.0, 0.0]


def test_decision_offsets_in_the_manifest_are_validated_and_recorded(tmp_path):
    import shutil

    from fundus_pipeline.errors import WeightsError
    from fundus_pipeline.models.spec import GradeOutputSpec
    from fundus_pipeline.models.weights import load_manifest
    from fundus_pipeline.stages.grade import decide
    from fundus_pipeline.train.export import record_decision_selection

    pg = np.array([0.5, 0.3, 0.2])
    assert decide(pg, None) == 0 and decide(pg, np.array([0.0, 0.6, 0.0])) == 1 and decide(pg, np.array([0.0, 0.0, 0.0])) == 0
    base = {"kind": "grade", "grades": ["good", "usable", "reject"], "flags": list(FLAGS), "temperature": 1.0, "grade_rule": "q"}
    assert "decision_bias" not in GradeOutputSpec.model_validate(base).model_dump()
    sel = {"choice": [0.0, 0.5, -0.2], "rule": "r"}
    assert GradeOutputSpec.model_validate({**base, "decision_bias": [0.0, 0.5, -0.2], "decision_selection": sel}).decision_bias == [0.0, 0.5, -0.2]
    for bad in ({"decision_bias": [0.0, 0.5], "decision_selection": {"choice": [0.0, 0.5]}}, {"decision_bias": [0.0, 0.5, -0.2]},
                {"decision_bias": [0.0, float("nan"), 0.0], "decision_selection": {"choice": [0.0, float("nan"), 0.0]}}):
        with pytest.raises(ValueError):
            GradeOutputSpec.model_validate({**base, **bad})

    wdir = tmp_path / "w"
    wdir.mkdir()
    shutil.copy(Path(__file__).parents[1] / "weights" / "manifest.json", wdir / "manifest.json")
    name = next(e.name for e in load_manifest(wdir).weights if getattr(e.output, "kind", None) == "grade")
    selection = {"choice": [0.0, 0.3, -0.4], "rule": "r", "means": {"before": {}, "after": {}}, "inputs": {"weights": name}}
    spec = record_decision_selection(name, selection, "docs/x.json", directory=wdir)
    assert spec.output.decision_bias == [0.0, 0.3, -0.4] and spec.output.decision_selection["file"] == "docs/x.json"
    assert load_manifest(wdir).get(name).output.decision_bias == [0.0, 0.3, -0.4]
    record_decision_selection(name, {**selection, "choice": [0.0, 0.0, 0.0]}, "docs/x.json", directory=wdir)
    assert load_manifest(wdir).get(name).output.decision_bias is None
    assert "decision_bias" not in (wdir / "manifest.json").read_text()
    with pytest.raises(WeightsError, match="not a grader"):
        record_decision_selection("imff", selection, "docs/x.json", directory=wdir)


def _train(gs: Path, data: Path, out: Path, *extra: str) -> int:
    return cli_main(["train", "grade", "--arch", "hemf_tiny", "--grade-set", str(gs), "--data", str(data), "--out", str(out),
                     "--steps", "4", "--batch-size", "3", "--val-every", "2", "--ckpt-every", "1", "--threads", "1", *extra])  # fmt: skip


def test_training_resumes_bit_exactly_and_the_stage_grades(grade_set, fake_data, tmp_path, monkeypatch):
    from fundus_pipeline.train import grade as trainer

    straight = tmp_path / "straight"
    assert _train(grade_set, fake_data, straight) == 0
    calib = json.loads((straight / "calibration.json").read_text())
    # validation: the val source (the first HEI-MED photograph, clean + 2 draws), 2 not-fundus pictures x 2 views,
    # and the EyePACS-256 val patient's two eyes
    assert calib["temperature"] > 0 and calib["fitted_on"] == {"set": 3 + 4, "real": 2}
    best = json.loads((straight / "summary.json").read_text())["best"]
    assert {"macro_f1", "set_macro_f1", "real_macro_f1", "set_flag_accuracy"} <= set(best)

    broken = tmp_path / "broken"
    real = trainer.GradeSampler.batch

    def interrupt(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(trainer.GradeSampler, "batch", interrupt)
    assert _train(grade_set, fake_data, broken) == 130
    monkeypatch.setattr(trainer.GradeSampler, "batch", real)
    assert _train(grade_set, fake_data, broken, "--resume") == 0
    x = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    y = torch.load(broken / "last.pt", map_location="cpu", weights_only=True)
    assert x["step"] == y["step"] == 4 and all(torch.equal(x["model"][k], y["model"][k]) for k in x["model"])

    # export with the temperature in the typed manifest entry
    from fundus_pipeline.models.spec import WeightsManifest
    from fundus_pipeline.train.export import export_weights

    wdir = tmp_path / "weights"
    cfg = json.loads((straight / "summary.json").read_text())["config"]
    spec = export_weights(straight, name="hemf_t", model_name="hemf_tiny", describe=trainer.grade_description(cfg, calib), directory=wdir)
    assert spec.output.kind == "grade" and spec.output.temperature == calib["temperature"] and spec.output.flags == list(FLAGS)
    WeightsManifest.model_validate_json((wdir / "manifest.json").read_text())

    # fundus grade: a fundus photograph, a picture without a FOV, a broken file; --sort-into copies the bytes
    from fundus_pipeline.models import weights as wmod

    monkeypatch.setattr(wmod, "weights_dir", lambda: wdir)
    src = tmp_path / "in"
    src.mkdir()
    (src / "eye.png").write_bytes((grade_set / "train" / "images" / "drive-21.png").read_bytes())
    (src / "chart.png").write_bytes((grade_set / "train" / "images" / "natural-camera__plain.png").read_bytes())
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    assert cli_main(["grade", str(src), str(out), "--weights", "hemf_t", "--sort-into", "--threads", "1", "--quiet"]) == 3
    rows = {r["key"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert rows["broken"]["status"] == "error" and rows["eye"]["status"] == rows["chart"]["status"] == "ok"
    for key in ("eye", "chart"):
        r = rows[key]
        p = [float(r[f"p_{g}"]) for g in ("good", "usable", "reject")]
        assert sum(p) == pytest.approx(1, abs=1e-5) and r["grade"] == ("good", "usable", "reject")[int(np.argmax(p))]
        assert all(0 <= float(r[f"p_{f}"]) <= 1 for f in FLAGS) and float(r["temperature"]) == calib["temperature"]
        copy = out / r["grade"] / f"{key}.png"
        assert copy.read_bytes() == (src / f"{key}.png").read_bytes()
    assert rows["eye"]["fov_found"] == "True" and float(rows["eye"]["fov_diameter"]) > 0
    assert (src / "eye.png").is_file() and not any((out / "good").glob(".*.tmp"))

    # fundus evaluate grade reads the stage's results against the set's labels
    labels = tmp_path / "labels.csv"
    labels.write_text("key,quality\neye,0\nchart,2\n")
    code = cli_main(["evaluate", "grade", str(out / "results.csv"), str(labels), "--out", str(tmp_path / "ev"), "--bootstrap", "0"])
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    # eye and chart joined with their labels; the error row "broken" has no label: reported, exit 3
    assert code == 3 and summary["n_images"] == 2 and sum(map(sum, summary["overall"]["confusion"])) == 2
    assert [p["key"] for p in summary["problems"]] == ["broken"]

    # decision offsets recorded in the entry move the grade, not the probabilities
    from fundus_pipeline.train.export import record_decision_selection

    choice = [0.0, 0.0, 50.0]
    record_decision_selection("hemf_t", {"choice": choice, "rule": "test", "means": {}, "inputs": {}}, "x.json", directory=wdir)
    biased = tmp_path / "biased"
    assert cli_main(["grade", str(src), str(biased), "--weights", "hemf_t", "--threads", "1", "--quiet"]) == 3
    again = {r["key"]: r for r in csv.DictReader(open(biased / "results.csv"))}
    for key in ("eye", "chart"):
        assert again[key]["grade"] == "reject" and all(again[key][f"p_{g}"] == rows[key][f"p_{g}"] for g in ("good", "usable", "reject"))
    assert json.loads((biased / "manifest.json").read_text())["config"]["decision_bias"] == choice
