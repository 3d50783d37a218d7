"""`fundus train segment` on a synthetic copy of the DRIVE/HRF layout (outputs, resume, bad arguments,
--init, --help), the shared training loop on a toy task (bit-exact resume with dropout), and the loss
weighting each model declares."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import typer

from fundus_pipeline.cli import app
from fundus_pipeline.cli import main as cli_main
from fundus_pipeline.errors import WeightsError
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.models.weights import load_manifest, sha256_file
from fundus_pipeline.train import segment as trainer
from fundus_pipeline.train.config import SegmentConfig, TrainConfig
from fundus_pipeline.train.export import export_weights
from fundus_pipeline.train.loop import Task, fit


def _args(data: Path, out: Path, *extra) -> list[str]:
    return [
        "--arch", "imff_tiny", "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "2",
        "--patch", "32", "--val-every", "2", "--ckpt-every", "1", "--threads", "1", "--seed", "3", *extra,
    ]  # fmt: skip


def _train(*args: str) -> int:
    return cli_main(["train", "segment", *args])


def test_train_writes_checkpoints_and_summary(fake_data, tmp_path):
    out = tmp_path / "run"
    assert _train(*_args(fake_data, out, "--degrade-p", "0.5", "--degrade-copies", "2")) == 0
    for f in ("best.pt", "last.pt", "summary.json", "train.log"):
        assert (out / f).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["seed"] == 3 and summary["best"]["step"] in (2, 4)
    assert summary["arch"] == "imff_tiny" and summary["argv"][:3] == ["fundus", "train", "segment"]
    assert "--degrade-p" in summary["argv"] and "--device" not in summary["argv"]  # non-default options only
    assert 0.0 <= summary["best"]["f1"] <= 1.0 and set(summary["best"]["per_dataset"]) == {"drive", "hrf"}
    log = (out / "train.log").read_text()
    assert "val step 2" in log and "val step 4" in log
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert isinstance(best, dict) and all(isinstance(v, torch.Tensor) for v in best.values())
    # --init accepts a plain state dict and a training checkpoint ("model" key)
    assert _train(*_args(fake_data, tmp_path / "ft", "--init", str(out / "last.pt"), "--steps", "1")) == 0
    # a fine-tune validates its --init weights first, for the record (they do not compete for best.pt)
    ft_log = (tmp_path / "ft" / "train.log").read_text()
    assert "val step 0 (the --init weights)" in ft_log and "val step 1" in ft_log
    ft = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert ft["init_validation"] == json.loads(ft_log.split("val step 0 (the --init weights): ")[1].splitlines()[0])
    assert ft["best"]["step"] == 1 and set(ft["init_validation"]) == set(ft["best"]) - {"step"}
    # a resumed fine-tune keeps its start's figures (the checkpoint carries them)
    assert _train(*_args(fake_data, tmp_path / "ft", "--steps", "1", "--resume")) == 0
    resumed = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert resumed["steps"] == 1 and resumed["init_validation"] == ft["init_validation"]

    # export: the entry is validated as a WeightsSpec before anything is written
    wdir = tmp_path / "weights"
    with pytest.raises(WeightsError, match="output.threshold"):
        export_weights(out, name="tiny", model_name="imff_tiny", describe=lambda m: _description(m, 1.5), directory=wdir)
    assert not (wdir / "tiny.pt").exists() and not (wdir / "manifest.json").exists()
    spec = export_weights(out, name="tiny", model_name="imff_tiny", describe=lambda m: _description(m, 0.4), directory=wdir)
    assert spec.sha256 == sha256_file(wdir / "tiny.pt") and spec.training.command == " ".join(summary["argv"])
    assert load_manifest(wdir).get("tiny") == spec
    assert torch.equal(torch.load(wdir / "tiny.pt", weights_only=True)["head.weight"], best["head.weight"])


def _description(model, threshold: float) -> dict:
    sel = {"threshold": threshold, "rule": "test", "val_f1": {"drive": 0.5}, "val_auc_roc": {"drive": 0.5}}
    scale = {"type": "fov_max_diameter", "max_fov_diameter": 1800.0, "rule": "test"}
    return {
        "input": {"channels": 3, "color": "rgb", "value_range": [0, 1], "normalisation": "none", "size_divisor": model.size_divisor, "scale_policy": scale},
        "output": {"activation": "sigmoid", "threshold": threshold, "threshold_selection": sel},
        "training": {"data": "synthetic", "validation": "synthetic", "test_never_used": "-"},
    }


def test_resume_reproduces_an_uninterrupted_run(fake_data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert _train(*_args(fake_data, straight)) == 0

    broken = tmp_path / "broken"
    real_batch = trainer.PatchSampler.batch

    def interrupt_at_step_2(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real_batch(self, step)

    monkeypatch.setattr(trainer.PatchSampler, "batch", interrupt_at_step_2)
    assert _train(*_args(fake_data, broken)) == 130  # the CLI maps an interrupt to exit code 130
    assert torch.load(broken / "last.pt", map_location="cpu", weights_only=True)["step"] == 2
    monkeypatch.setattr(trainer.PatchSampler, "batch", real_batch)
    assert _train(*_args(fake_data, broken, "--resume")) == 0

    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(broken / "last.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["best"] == b["best"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    log = (broken / "train.log").read_text()
    assert "resumed at step 2" in log and "options changed" not in log


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--arch", "nope"], "unknown model"),
        (["--steps", "0"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--threads", "-2"], "--threads"),
        (["--degrade-p", "1.5"], "--degrade-p"),
        (["--patch", "8"], "--patch"),
        (["--resume"], "does not exist"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "bogus"], "device"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(fake_data, tmp_path, capsys, extra, message):
    code = _train(*_args(fake_data, tmp_path / "run"), *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "validation error" not in err.lower()  # pydantic's report is turned into one line
    assert not (tmp_path / "run").exists()


def test_refuses_to_overwrite_a_run_and_a_missing_dataset(fake_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_bytes(b"precious")
    assert _train(*_args(fake_data, out)) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (out / "best.pt").read_bytes() == b"precious"
    assert _train(*_args(tmp_path / "nowhere", tmp_path / "run2")) == 2
    assert "lacks DRIVE/ and HRF/" in capsys.readouterr().err


def test_init_refuses_pickles_and_foreign_architectures(fake_data, tmp_path, capsys):
    # weights missing, unreadable or of another architecture: exit 1, as for every command (README, Exit codes)
    assert _train(*_args(fake_data, tmp_path / "m", "--init", str(tmp_path / "missing.pt"))) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: --init:") and "no such weights file" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m").exists()
    pickled = tmp_path / "module.pt"
    torch.save(build_model("imff_tiny"), pickled)  # a whole pickled module, not a state dict
    assert _train(*_args(fake_data, tmp_path / "a", "--init", str(pickled))) == 1
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()  # the error, and the hint that comes with it
    assert lines[0].startswith("Error: --init:") and "pickled" in lines[0] and len(lines) <= 2 and all(x.startswith("Hint:") for x in lines[1:]), err
    assert not (tmp_path / "a").exists()

    foreign = tmp_path / "msrf.pt"
    torch.save(build_model("msrf_tiny").state_dict(), foreign)
    assert _train(*_args(fake_data, tmp_path / "b", "--init", str(foreign))) == 1  # strict key check
    err = capsys.readouterr().err.strip()
    assert "does not fit architecture 'imff_tiny'" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "b").exists()  # refused after OUT was made: nothing left behind, not even train.log
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert _train(*_args(fake_data, kept, "--init", str(foreign))) == 1
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]  # a folder it did not make is kept, as it was


def test_help_lists_every_option_with_help_and_default(capsys):
    cmd = typer.main.get_command(app).commands["train"].commands["segment"]
    names = {p.opts[0] for p in cmd.params if p.name != "help"}
    assert names == {
        "--arch", "--data", "--out", "--steps", "--batch-size", "--patch", "--lr", "--seed", "--val-every", "--ckpt-every",
        "--threads", "--device", "--amp", "--degrade-p", "--degrade-copies", "--init", "--resume",
    }  # fmt: skip  (the option names of weights/README.md and weights/manifest.json)
    assert all(p.help for p in cmd.params), [p.name for p in cmd.params if not p.help]
    assert cli_main(["train", "segment", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in names:
        assert name in text
    for shown in ("[default: 5000]", "[default: imff]", "[default: 0.001]", "[default: auto]"):
        assert shown in text
    assert "--no-amp" not in text and "--no-resume" not in text  # plain flags


def test_recorded_commands_parse():
    """The training commands recorded in weights/manifest.json still validate (up to the run folder)."""
    manifest = json.loads((Path(__file__).resolve().parents[1] / "weights" / "manifest.json").read_text())
    commands = [c.strip() for w in manifest["weights"] for c in w["training"]["command"].split("&&") if "train segment" in c]
    assert commands
    for c in commands:
        words = c.split()[3:]
        opts = {words[i][2:].replace("-", "_"): words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--") and not words[i + 1].startswith("--")}
        flags = {w[2:].replace("-", "_"): True for i, w in enumerate(words) if w.startswith("--") and (i + 1 == len(words) or words[i + 1].startswith("--"))}
        assert set(opts) | set(flags) <= set(SegmentConfig.model_fields), c


# ------------------------------------------------------------------------------------ the shared loop
class _ToyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)  # draws from torch's RNG: resume must restore it
        self.out = nn.Linear(8, 1)

    def forward_train(self, x):
        return self.out(self.drop(torch.relu(self.lin(x))))


class _ToySampler:
    def __init__(self, seed: int, batch_size: int):
        self.seed, self.batch_size = seed, batch_size

    def batch(self, step: int):
        rng = np.random.default_rng([self.seed, step])
        x = rng.normal(size=(self.batch_size, 8)).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(x.sum(axis=1, keepdims=True))


class _ToyTask(Task):
    name = "toy"
    score_key = "neg_mse"

    def build_model(self):
        return _ToyNet()

    def setup(self, log):
        self.sampler = _ToySampler(self.cfg.seed, self.cfg.batch_size)

    def loss(self, out, batch):
        return F.mse_loss(out, batch[1])

    def validate(self, model, device):
        x, y = _ToySampler(99, 16).batch(0)
        return {"neg_mse": -float(F.mse_loss(model.forward_train(x), y))}


def fit_interrupted_then_resumed(cfg, monkeypatch, at: int = 3) -> None:
    """A toy run (``cfg(**kw)`` its TrainConfig) stopped by a Ctrl-C at step ``at``, then resumed to its end from
    another RNG state (the resumed run must not depend on the state it starts with)."""
    real = _ToySampler.batch

    def interrupt(self, step):
        if step == at:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(_ToySampler, "batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit(_ToyTask(cfg()), cfg())
    monkeypatch.setattr(_ToySampler, "batch", real)
    torch.manual_seed(12345)
    fit(_ToyTask(cfg(resume=True)), cfg(resume=True))


def test_loop_resume_is_bit_exact_with_dropout(tmp_path, monkeypatch):
    def cfg(out, **kw):
        return TrainConfig(out=out, steps=7, batch_size=4, lr=1e-2, seed=5, val_every=2, ckpt_every=1, **kw)

    summary = fit(_ToyTask(cfg(tmp_path / "a")), cfg(tmp_path / "a"))
    assert summary["task"] == "toy" and summary["best"]["step"] in (2, 4, 6, 7)

    fit_interrupted_then_resumed(lambda **kw: cfg(tmp_path / "b", **kw), monkeypatch)

    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 7 and a["best"] == b["best"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k, state in a["opt"]["state"].items():
        for name, v in state.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["opt"]["state"][k][name])), (k, name)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert torch.equal(torch.load(tmp_path / "a" / "best.pt", weights_only=True)["lin.weight"], torch.load(tmp_path / "b" / "best.pt", weights_only=True)["lin.weight"])


# ----------------------------------------------------------------------------- declared loss weighting
def _old_total_loss(out, y, m):
    """The trainer's loss before the models declared their weighting (hard-coded: main 2 with aux outputs)."""
    main_w = 2.0 if out.get("aux") else 1.0
    loss = main_w * trainer.seg_loss(out["logits"], y, m)
    for aux, w in out.get("aux") or []:
        loss = loss + w * trainer.seg_loss(aux, y, m)
    if out.get("edge") is not None:
        e = F.binary_cross_entropy_with_logits(out["edge"], trainer.edge_target(y), reduction="none")
        loss = loss + (e * m).sum() / m.sum().clamp_min(1.0)
    return loss


@pytest.mark.parametrize("arch", ["imff_tiny", "msrf_tiny"])
def test_declared_loss_weights_give_the_old_loss(arch):
    torch.manual_seed(0)
    model = build_model(arch).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 32, generator=g)
    y = (torch.rand(2, 1, 32, 32, generator=g) > 0.7).float()
    m = torch.ones_like(y)
    with torch.no_grad():
        out = model.forward_train(x)
    assert "main_weight" in out and (out["edge"] is None or "edge_weight" in out)
    assert torch.equal(trainer.total_loss(out, y, m), _old_total_loss(out, y, m))
    with pytest.raises(TypeError, match="loss weighting"):
        trainer.total_loss({"logits": out["logits"]}, y, m)
