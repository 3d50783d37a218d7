"""`fundus train segment` on a synthetic copy of the DRIVE/HRF layout: outputs, resume, bad arguments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fundus_pipeline.cli import main as cli_main
from fundus_pipeline.datasets import DRIVE_TRAIN, HRF_TRAIN
from fundus_pipeline.train import segment as trainer
from tests.conftest import synthetic_fundus


def _fov_and_vessels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fov = rgb.max(axis=2) > 20
    vessels = fov & (rgb[..., 1] < 0.6 * rgb[..., 1][fov].mean())  # the synthetic vessels are dark
    return fov, vessels


def _palette_gif(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 255, 255, 255])
    im.save(path, optimize=False)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory) -> Path:
    """DRIVE training (21-40) and HRF (01-05 of each class) in the datasets' own file layout, tiny."""
    root = tmp_path_factory.mktemp("data")
    d = root / "DRIVE" / "training"
    for sub in ("images", "1st_manual", "mask"):
        (d / sub).mkdir(parents=True)
    for k, ident in enumerate(DRIVE_TRAIN):
        rgb = synthetic_fundus(64, 64, k)
        fov, ves = _fov_and_vessels(rgb)
        Image.fromarray(rgb).save(d / "images" / f"{ident}_training.tif")
        _palette_gif(d / "1st_manual" / f"{ident}_manual1.gif", ves)
        _palette_gif(d / "mask" / f"{ident}_training_mask.gif", fov)
    h = root / "HRF"
    for sub in ("images", "manual1", "mask"):
        (h / sub).mkdir(parents=True)
    for k, ident in enumerate(HRF_TRAIN):
        rgb = synthetic_fundus(128, 128, 100 + k)
        fov, ves = _fov_and_vessels(rgb)
        ext = "JPG" if ident.endswith("_dr") else "jpg"
        Image.fromarray(rgb).save(h / "images" / f"{ident}.{ext}", quality=95)
        Image.fromarray(ves.astype(np.uint8) * 255).save(h / "manual1" / f"{ident}.tif")
        Image.fromarray(fov.astype(np.uint8) * 255).save(h / "mask" / f"{ident}_mask.tif")
    return root


def _args(data: Path, out: Path, *extra) -> list[str]:
    return [
        "--arch", "imff_tiny", "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "2",
        "--patch", "32", "--val-every", "2", "--ckpt-every", "1", "--threads", "1", "--seed", "3", *extra,
    ]  # fmt: skip


def test_train_writes_checkpoints_and_summary(fake_data, tmp_path):
    out = tmp_path / "run"
    assert trainer.main(_args(fake_data, out, "--degrade-p", "0.5", "--degrade-copies", "2")) == 0
    for f in ("best.pt", "last.pt", "summary.json", "train.log"):
        assert (out / f).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["seed"] == 3 and summary["best"]["step"] in (2, 4)
    assert 0.0 <= summary["best"]["f1"] <= 1.0 and set(summary["best"]["per_dataset"]) == {"drive", "hrf"}
    log = (out / "train.log").read_text()
    assert "val step 2" in log and "val step 4" in log
    best = torch.load(out / "best.pt", map_location="cpu", weights_only=True)
    assert isinstance(best, dict) and all(isinstance(v, torch.Tensor) for v in best.values())


def test_resume_reproduces_an_uninterrupted_run(fake_data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert trainer.main(_args(fake_data, straight)) == 0

    broken = tmp_path / "broken"
    real_batch = trainer.PatchSampler.batch

    def interrupt_at_step_2(self, step, batch):
        if step == 2:
            raise KeyboardInterrupt
        return real_batch(self, step, batch)

    monkeypatch.setattr(trainer.PatchSampler, "batch", interrupt_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.main(_args(fake_data, broken))
    assert torch.load(broken / "last.pt", map_location="cpu", weights_only=True)["step"] == 2
    monkeypatch.setattr(trainer.PatchSampler, "batch", real_batch)
    assert trainer.main(_args(fake_data, broken, "--resume")) == 0

    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(broken / "last.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--arch", "nope"], "unknown model"),
        (["--steps", "0"], "--steps"),
        (["--degrade-p", "1.5"], "--degrade-p"),
        (["--patch", "8"], "--patch"),
        (["--init", "missing.pt"], "--init"),
        (["--resume"], "does not exist"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "bogus"], "device"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(fake_data, tmp_path, capsys, extra, message):
    code = cli_main(["train", "segment", *_args(fake_data, tmp_path / "run"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "last.pt").exists()


def test_refuses_to_overwrite_a_run_and_a_missing_dataset(fake_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_bytes(b"precious")
    assert cli_main(["train", "segment", *_args(fake_data, out)]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (out / "best.pt").read_bytes() == b"precious"
    assert cli_main(["train", "segment", *_args(tmp_path / "nowhere", tmp_path / "run2")]) == 2
    assert "lacks DRIVE/ and HRF/" in capsys.readouterr().err
