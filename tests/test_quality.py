"""The quality scorer end to end on a synthetic copy of the datasets: the label (known answers), the
quality-set builder (bytes, resume, refusals), the pretext and score trainers (bit-exact resume), the
``fundus score`` command (pairing by key, per-item errors) and ``fundus evaluate score`` on its output."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fundus_pipeline.classical import CLASSICAL, HARMFUL
from fundus_pipeline.cli import main as cli_main
from fundus_pipeline.quality.label import quality_label, vessel_f1
from fundus_pipeline.train.score import PRETEXT_TARGETS, applied_ops
from tests.conftest import synthetic_fundus

torch.set_num_threads(1)


def _disc(n: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n]
    return (yy - n / 2 + 0.5) ** 2 + (xx - n / 2 + 0.5) ** 2 <= (n / 2 - 2) ** 2


def test_label_known_answers():
    rng = np.random.default_rng(0)
    fov = _disc()
    clean = rng.random((64, 64, 3)).astype(np.float32) * fov[..., None]
    ves = (rng.random((64, 64)) < 0.2) & fov
    same = quality_label(clean, clean, fov, ves, ves)
    assert same == {"ssim": pytest.approx(1.0), "f1": 1.0, "label": pytest.approx(1.0)}
    black = quality_label(np.zeros_like(clean), clean, fov, np.zeros_like(ves), ves)
    assert black["f1"] == 0.0 and black["ssim"] < 0.05 and black["label"] < 0.03
    # F1 counts only FOV pixels and is 1 when both maps are empty there
    outside = ~fov
    assert vessel_f1(outside, np.zeros_like(fov), fov) == 1.0
    half = ves.copy()
    half[:32] = False
    f = vessel_f1(half, ves, fov)
    assert f == pytest.approx(2 * half.sum() / (half.sum() + ves.sum()))


def test_model_enhancers_of_the_set_apply_the_weights_correction_low_pass():
    """A model enhancer of the quality set runs as `fundus enhance` runs it in the canonical frame: the
    shipped cofe_add_seg with its manifest's correction low-pass (sigma 32), cofe without one."""
    from fundus_pipeline.quality.build import SetEnhancer
    from fundus_pipeline.stages.base import Fov
    from fundus_pipeline.stages.enhance import smooth_correction

    rgb = synthetic_fundus(128, 128, 3).astype(np.float32) / 255
    fov = Fov.estimate(rgb).mask
    rgb *= fov[..., None]
    enh = SetEnhancer("cofe_add_seg")
    assert enh.sigma == 32.0 and enh.record()["correction_sigma"] == 32.0
    assert SetEnhancer("cofe").sigma == 0.0 and "correction_sigma" not in SetEnhancer("cofe").record()
    with torch.inference_mode():
        raw = enh.model(torch.from_numpy(rgb.transpose(2, 0, 1).copy())[None])[0].numpy().transpose(1, 2, 0)
    out = enh(rgb, fov)
    np.testing.assert_allclose(out, np.clip(smooth_correction(rgb, raw, fov, 32.0), 0, 1) * fov[..., None], atol=1e-6)
    assert np.abs(out - np.clip(raw, 0, 1) * fov[..., None]).max() > 1e-3  # the low-pass changed something


def test_classical_enhancers_stay_in_range_and_inside_the_fov():
    rgb = synthetic_fundus(96, 96, 3).astype(np.float32) / 255
    fov = _disc(96)
    for name, fn in CLASSICAL.items():
        out = fn(rgb, fov)
        assert out.shape == rgb.shape and out.dtype == np.float32, name
        assert out.min() >= 0 and out.max() <= 1 and not out[~fov].any(), name
    from fundus_pipeline.evaluation.image_metrics import ssim

    # the harmful ones do damage: each is further from the input than the helpful unsharp mask is
    helpful = ssim(CLASSICAL["unsharp"](rgb, fov), rgb, fov)
    for name in HARMFUL:
        assert ssim(CLASSICAL[name](rgb, fov), rgb, fov) < helpful, name


def test_pretext_targets_from_parameter_records():
    from degradation import cofe_degrader, load_recipe

    from fundus_pipeline.canonical import canonical_fov_geometry

    geom = canonical_fov_geometry(512)
    t = applied_ops(cofe_degrader("released", "111").sample(seed=0, key="a", fov=geom))
    names = list(PRETEXT_TARGETS)
    on = {names[i] for i in np.flatnonzero(t)}
    assert on == {"cofe_color", "cofe_halo", "cofe_hole", "cofe_spot", "cofe_blur"}
    assert set(np.flatnonzero(applied_ops(None))) == {names.index("clean")}
    rec = load_recipe("severe").sample(seed=3, key="b", fov=geom)
    applied = {s["type"] for s in rec["steps"] if s["applied"]}
    on = {names[i] for i in np.flatnonzero(applied_ops(rec))}
    assert {a for a in applied if not a.startswith("cofe_")} <= on and "clean" not in on


def _build(data: Path, out: Path, *extra: str) -> int:
    return cli_main([
        "build", "quality-set", str(out), "--data", str(data), "--parts", "train", "--limit", "1", "--draws", "1",
        "--size", "128", "--enhancers", "identity,blur", "--threads", "1", *extra,
    ])  # fmt: skip


@pytest.fixture(scope="module")
def quality_set(fake_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qs") / "set"
    assert _build(fake_data, out) == 0
    return out


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_quality_set_layout_labels_and_rebuild(quality_set, fake_data, tmp_path):
    rows = list(csv.DictReader(open(quality_set / "pairs.csv")))
    # one source per dataset (limit 1), one draw, two enhancers
    assert len(rows) == 6 and {r["dataset"] for r in rows} == {"drive", "hrf", "heimed"}
    assert {r["split"] for r in rows} == {"train", "val"}  # the first HEI-MED photograph is a validation source
    for r in rows:
        assert 0 <= float(r["label"]) <= 1
        assert float(r["label"]) == pytest.approx((float(r["ssim"]) + float(r["f1"])) / 2, abs=2e-6)
        enh = quality_set / "train" / "enhanced" / f"{r['key']}.png"
        ref = quality_set / "train" / "reference" / f"{r['key']}.png"
        deg = quality_set / "train" / "degraded" / f"{r['degraded_key']}.png"
        assert enh.is_file() and ref.read_bytes() == deg.read_bytes()
        if r["enhancer"] == "identity":  # the identity pair is labelled as the degraded image itself
            assert r["label"] == r["deg_label"]
    manifest = json.loads((quality_set / "manifest.json").read_text())
    assert manifest["counts"]["train"]["pairs"] == 6 and manifest["segmenter"]["weights"] == "imff"
    assert len((quality_set / "degradations.jsonl").read_text().splitlines()) == 3

    again = tmp_path / "again"
    assert _build(fake_data, again) == 0
    a, b = _tree(quality_set), _tree(again)
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "manifest.json")

    # resume: a finished source is not rebuilt (its rows file is reused as is)
    marker = again / "rows" / "train" / "drive-21.json"
    stamp = marker.stat().st_mtime_ns
    assert _build(fake_data, again) == 0 and marker.stat().st_mtime_ns == stamp
    # other options on an existing set are refused; an unknown enhancer is a usage error
    assert _build(fake_data, again, "--seed", "7") == 2
    assert _build(fake_data, tmp_path / "x", "--enhancers", "identity,nope") == 2


def _pretext(data: Path, out: Path, *extra: str) -> int:
    return cli_main([
        "train", "pretext", "--arch", "vit_fundus_tiny", "--data", str(data), "--out", str(out), "--steps", "4",
        "--batch-size", "2", "--size", "224", "--pool-draws", "1", "--val-every", "2", "--ckpt-every", "1",
        "--threads", "1", *extra,
    ])  # fmt: skip


def _score_train(qs: Path, out: Path, vit: Path, *extra: str) -> int:
    return cli_main([
        "train", "score", "--arch", "sdmp_tiny", "--quality-set", str(qs), "--out", str(out), "--steps", "4",
        "--batch-size", "2", "--size", "224", "--val-every", "2", "--ckpt-every", "1", "--threads", "1",
        "--cnn-init", "none", "--vit-init", str(vit), *extra,
    ])  # fmt: skip


def _same_last(a: Path, b: Path) -> None:
    x = torch.load(a / "last.pt", map_location="cpu", weights_only=True)
    y = torch.load(b / "last.pt", map_location="cpu", weights_only=True)
    assert x["step"] == y["step"] == 4 and x["best"] == y["best"]
    for k in x["model"]:
        assert torch.equal(x["model"][k], y["model"][k]), k


def test_pretext_and_score_training_resume_bit_exactly_and_score_runs(quality_set, fake_data, tmp_path, monkeypatch):
    from fundus_pipeline.train import score as trainer

    vit = tmp_path / "vit"
    assert _pretext(fake_data, vit) == 0
    best = json.loads((vit / "summary.json").read_text())["best"]
    assert {"neg_loss", "bit_accuracy", "psnr_mae_db", "ssim_mae"} <= set(best) and np.isfinite(best["neg_loss"])
    # the frozen ViT stream of SDMP is the pretext network: its weights load into the score model
    straight = tmp_path / "sdmp"
    assert _score_train(quality_set, straight, vit / "best.pt") == 0
    model_sd = torch.load(straight / "best.pt", map_location="cpu", weights_only=True)
    vit_sd = torch.load(vit / "best.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(model_sd[f"vit.{k}"], v) for k, v in vit_sd.items())
    summary = json.loads((straight / "summary.json").read_text())
    assert {"srocc", "plcc", "krocc", "rmse"} <= set(summary["best"])

    broken = tmp_path / "broken"
    real = trainer.ScoreSampler.batch

    def interrupt(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(trainer.ScoreSampler, "batch", interrupt)
    assert _score_train(quality_set, broken, vit / "best.pt") == 130
    monkeypatch.setattr(trainer.ScoreSampler, "batch", real)
    assert _score_train(quality_set, broken, vit / "best.pt", "--resume") == 0
    _same_last(straight, broken)

    # both runs export to a weights folder with typed manifest entries (an early checkpoint too)
    from fundus_pipeline.models.spec import WeightsManifest
    from fundus_pipeline.train.export import export_weights

    wdir = tmp_path / "weights"
    cfg = lambda run: json.loads((run / "summary.json").read_text())["config"]  # noqa: E731
    vspec = export_weights(vit, name="vit_t", model_name="vit_fundus_tiny", describe=trainer.pretext_description(cfg(vit)), directory=wdir)
    sspec = export_weights(straight, name="sdmp_t", model_name="sdmp_tiny", describe=trainer.score_description(cfg(straight)), directory=wdir)
    early = export_weights(straight, name="sdmp_t2", model_name="sdmp_tiny", describe=trainer.score_description(cfg(straight)),
                           directory=wdir, checkpoint=straight / "last.pt")  # fmt: skip
    assert vspec.output.kind == "pretext" and list(vspec.output.targets) == list(PRETEXT_TARGETS)
    assert sspec.output.kind == "score" and sspec.output.crop == 224 and sspec.input.scale_policy.size == 224
    assert early.training.steps == 4 and early.training.best_checkpoint["step"] == 4
    manifest = WeightsManifest.model_validate_json((wdir / "manifest.json").read_text())
    assert manifest.names() == ["sdmp_t", "sdmp_t2", "vit_t"]

    # fundus score on the set's train part, one reference missing: per-item error, exit 3
    enh, ref = quality_set / "train" / "enhanced", tmp_path / "ref"
    ref.mkdir()
    keys = sorted(p.stem for p in enh.glob("*.png"))
    for k in keys[1:]:
        (ref / f"{k}.png").write_bytes((quality_set / "train" / "reference" / f"{k}.png").read_bytes())
    out = tmp_path / "scores"
    code = cli_main(["score", str(enh), str(out), "--reference", str(ref), "--weights", str(straight / "best.pt"), "--arch", "sdmp_tiny",
                     "--threads", "1", "--quiet"])  # fmt: skip
    assert code == 3
    res = {r["key"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert res[keys[0]]["status"] == "error" and "no reference image" in res[keys[0]]["error"]
    for k in keys[1:]:
        assert res[k]["status"] == "ok" and 0 < float(res[k]["score"]) < 1 and float(res[k]["score_spread"]) >= 0
    # the scores are the test-time protocol's: the same pair scored again gives the same value
    out2 = tmp_path / "scores2"
    assert cli_main(["score", str(enh), str(out2), "--reference", str(quality_set / "train" / "reference"), "--weights",
                     str(straight / "best.pt"), "--arch", "sdmp_tiny", "--threads", "1", "--quiet"]) == 0  # fmt: skip
    res2 = {r["key"]: r for r in csv.DictReader(open(out2 / "results.csv"))}
    assert all(res2[k]["score"] == res[k]["score"] for k in keys[1:])
    # a segmentation model is refused as a scorer
    assert cli_main(["score", str(enh), str(tmp_path / "s3"), "--reference", str(ref), "--weights", "imff", "--quiet"]) == 1
    # and the evaluator reads the command's output against the set's labels
    assert cli_main(["evaluate", "score", str(out2 / "results.csv"), str(quality_set / "pairs.csv"), "--part", "train",
                     "--bootstrap", "20", "--out", str(tmp_path / "ev"), "--format", "json"]) == 0  # fmt: skip
    ev = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert ev["overall"]["n"] == 6


def test_pretext_validation_crops_do_not_depend_on_the_training_seed(fake_data, tmp_path):
    """Runs with different --seed (a continuation uses a new one) are validated on the same crops."""
    from fundus_pipeline.train.config import PretextConfig
    from fundus_pipeline.train.score import PretextTask

    tasks = []
    for seed in (0, 3):
        task = PretextTask(PretextConfig(out=tmp_path / f"r{seed}", data=fake_data, arch="vit_fundus_tiny", seed=seed, pool_draws=1, cache=tmp_path / "c.npz"))
        task.setup(lambda m: None)
        tasks.append(task)
    assert torch.equal(tasks[0].val_x, tasks[1].val_x) and torch.equal(tasks[0].val_t, tasks[1].val_t)
    assert float(tasks[0].val_t[:, :-3].sum()) > 0  # some operations were applied: not clean crops only


def test_score_validation_per_camera_and_the_camera_mean_selection(tmp_path, monkeypatch):
    """Validation reports each camera's SROCC and their mean; --select srocc_camera_mean makes that mean choose
    best.pt (a camera with most of the pairs no longer dominates), and a camera with too few pairs is refused."""
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.train import score as trainer
    from fundus_pipeline.train.config import ScoreConfig

    qs = tmp_path / "qs"
    qs.mkdir()
    (qs / "pairs.csv").write_text("key\n")
    with pytest.raises(ValueError, match="srocc, srocc_camera_mean or gate"):
        ScoreConfig(out=tmp_path / "o", quality_set=qs, select="plcc")
    # 10 HEI-MED pairs ranked right, 4 DRIVE pairs and 4 HRF pairs ranked backwards, 2 "other" pairs
    cams = ["heimed"] * 10 + ["drive"] * 4 + ["hrf"] * 4 + ["other"] * 2
    label = np.array([*range(10), *range(4), *range(4), 0, 1], float)
    pred = np.array([*range(10), *range(4)[::-1], *range(4)[::-1], 0, 1], float)
    rows = [{"dataset": c, "label": str(v), "deg_label": "0", "enhancer": "x"} for c, v in zip(cams, label)]
    monkeypatch.setattr(trainer, "predict_frames", lambda model, frames, device, size, identity: (list(frames), (pred, 0 * pred))[1])
    task = trainer.ScoreTask(ScoreConfig(out=tmp_path / "o", quality_set=qs, select="srocc_camera_mean"))
    assert task.score_key == "srocc_camera_mean" and trainer.ScoreTask(ScoreConfig(out=tmp_path / "o", quality_set=qs)).score_key == "srocc"
    task.val, task.reader = rows, lambda row: None
    v = task.validate(None, torch.device("cpu"))
    assert v["srocc_heimed"] == 1.0 and v["srocc_drive"] == v["srocc_hrf"] == -1.0 and v["srocc_other"] is None
    assert v["srocc_camera_mean"] == pytest.approx(-1 / 3, abs=1e-4) and v["srocc"] > 0.3  # pooled: HEI-MED dominates
    monkeypatch.setattr(trainer, "read_pairs", lambda qs, split: rows)
    monkeypatch.setattr(trainer, "ScoreSampler", lambda *a: None)
    with pytest.raises(UsageError, match="at least 3 validation pairs of each camera"):
        task.setup(lambda m: None)


def test_gate_figures_and_the_gain_term(quality_set, tmp_path):
    """The trust gate's figures on known labels, and a scorer trained with --gain-weight and --select gate."""
    from fundus_pipeline.train.score import gate_figures

    gain = np.array([0.02, -0.01, 0.005, -0.03])
    label, deg = np.array([0.9, 0.8, 0.7, 0.95]), np.array([0.85, 0.82, 0.75, 0.9])
    # trusted: pairs 0 and 2 (gain >= 0) deliver 0.9 and 0.7; the others their inputs' 0.82 and 0.9
    g = gate_figures(gain, label, deg)
    assert g["gate"] == pytest.approx((0.9 + 0.82 + 0.7 + 0.9) / 4) and g["gate_trusted"] == 0.5
    assert g["gate_right"] == 0.5  # right on 0 (better, trusted) and 1 (worse, kept); wrong on 2 and 3
    assert gate_figures(gain, label, deg, np.array([True, False, False, False]))["gate"] == pytest.approx(0.9)
    assert gate_figures(gain, label, deg, t=1.0)["gate"] == pytest.approx(deg.mean())

    out = tmp_path / "gain"
    vit_args = ("--vit-init", "none")
    code = cli_main([
        "train", "score", "--arch", "sdmp_tiny", "--quality-set", str(quality_set), "--out", str(out), "--steps", "2",
        "--batch-size", "2", "--size", "224", "--val-every", "2", "--ckpt-every", "1", "--threads", "1",
        "--cnn-init", "none", *vit_args, "--gain-weight", "2", "--select", "gate",
    ])  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"gate", "gate_trusted", "gate_right", "gain_srocc", "srocc"} <= set(summary["best"])
    assert 0 <= summary["best"]["gate"] <= 1 and summary["config"]["gain_weight"] == 2 and summary["config"]["select"] == "gate"
