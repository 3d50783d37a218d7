"""`fundus enhance`: outputs at native size and bit depth, the FOV and the surround, the columns, both
transfer rules, weights of the wrong task, bad input; the canonical enhancement path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fundus_pipeline.cli import main
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.stages.base import Fov
from fundus_pipeline.stages.enhance import enhance_native, luminance_stats
from tests.conftest import synthetic_fundus


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_cofe(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("w") / "cofe_tiny.pt"
    torch.save(build_model("cofe_tiny").state_dict(), p)
    return p


@pytest.fixture()
def photos(tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(synthetic_fundus(96, 112, 1)).save(d / "a.png")
    cv2.imwrite(str(d / "c16.png"), (synthetic_fundus(64, 64, 3).astype(np.uint16) * 257)[..., ::-1])
    Image.fromarray(synthetic_fundus(72, 72, 4)[..., 1]).save(d / "grey.png")
    return d


def _args(tiny_cofe, *extra):
    return ("--weights", tiny_cofe, "--arch", "cofe_tiny", "--device", "cpu", *extra)


def test_enhance_writes_native_images_and_columns(photos, tmp_path, tiny_cofe):
    out = tmp_path / "out"
    assert run("enhance", photos, out, *_args(tiny_cofe)) == 0
    for key, shape, dtype in (("a", (96, 112, 3), np.uint8), ("c16", (64, 64, 3), np.uint16), ("grey", (72, 72), np.uint8)):
        img = cv2.imread(str(out / f"{key}.png"), cv2.IMREAD_UNCHANGED)
        assert img.shape == shape and img.dtype == dtype, key
        assert img[0, 0].max() == 0  # outside the FOV
    with open(out / "results.csv") as f:
        rows = {r["key"]: r for r in csv.DictReader(f)}
    a = rows["a"]
    assert a["status"] == "ok" and a["transfer"] == "residual"
    for col in ("luminance_before", "luminance_after", "contrast_before", "contrast_after", "vessel_fraction_before", "vessel_fraction_after"):
        assert 0.0 <= float(a[col]) <= 1.0, col
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["weights"]["model"] == "cofe_tiny" and m["config"]["segmenter"]["name"] == "imff"


def test_keep_outside_and_upsample(photos, tmp_path, tiny_cofe):
    src = cv2.imread(str(photos / "a.png"), cv2.IMREAD_UNCHANGED)
    src[0, 0] = (9, 9, 9)  # a non-black corner outside the FOV
    cv2.imwrite(str(photos / "a.png"), src)
    out = tmp_path / "out"
    assert run("enhance", photos, out, *_args(tiny_cofe, "--keep-outside", "--transfer", "upsample", "--no-vessel-stats")) == 0
    img = cv2.imread(str(out / "a.png"), cv2.IMREAD_UNCHANGED)
    assert tuple(img[0, 0]) == (9, 9, 9)
    with open(out / "results.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["key"] == "a")
    assert row["transfer"] == "upsample" and row["vessel_fraction_before"] == ""


def test_wrong_task_weights_and_bad_options(photos, tmp_path, tiny_cofe, capsys):
    assert run("enhance", photos, tmp_path / "o1", "--weights", "imff") == 1
    assert "segmentation model" in capsys.readouterr().err
    assert run("enhance", photos, tmp_path / "o2", *_args(tiny_cofe, "--transfer", "sideways")) == 2
    assert run("segment", photos, tmp_path / "o3", "--weights", tiny_cofe, "--arch", "cofe_tiny") == 1
    err = capsys.readouterr().err
    assert "enhancement model" in err and "Traceback" not in err


def test_non_fundus_input_fails_as_an_item(tmp_path, tiny_cofe):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(120, 255, (64, 64, 3), dtype=np.uint8)).save(d / "noise.png")
    Image.fromarray(synthetic_fundus(64, 64)).save(d / "ok.png")
    out = tmp_path / "out"
    assert run("enhance", d, out, *_args(tiny_cofe, "--no-vessel-stats")) == 3
    with open(out / "results.csv") as f:
        rows = {r["key"]: r for r in csv.DictReader(f)}
    assert rows["ok"]["status"] == "ok" and rows["noise"]["status"] == "error" and "field of view" in rows["noise"]["error"]


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_identity_network_returns_the_photograph():
    """With a network that returns its input, `residual` gives back the photograph exactly inside the FOV,
    and `upsample` a resampled copy of it."""
    rgb = synthetic_fundus(120, 150, 5).astype(np.float32) / 255
    fov = Fov.estimate(rgb)
    res = enhance_native(_Identity(), rgb, fov.mask, fov.geometry, 64, "residual", "cpu")
    np.testing.assert_allclose(res[fov.mask], rgb[fov.mask], atol=1e-6)
    assert res[~fov.mask].max() == 0
    up = enhance_native(_Identity(), rgb, fov.mask, fov.geometry, 64, "upsample", "cpu")
    assert np.abs(up - res)[fov.mask].mean() < 0.05  # blurred by the 64-px frame, same photograph


def test_luminance_stats():
    rgb = np.zeros((4, 4, 3), np.float32)
    rgb[:2] = 1.0
    mean, std = luminance_stats(rgb, np.ones((4, 4), bool))
    assert mean == pytest.approx(0.5, abs=1e-6) and std == pytest.approx(0.5, abs=1e-6)


def test_batches_write_what_one_at_a_time_writes(photos, tmp_path, tiny_cofe):
    """--batch-size 3: the canonical frames go through one forward pass; the images are within one code value
    of one at a time and the columns equal; a photograph without a field of view still fails alone."""
    Image.fromarray(synthetic_fundus(100, 90, 7)).save(photos / "b.png")
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(photos / "flat.png")  # no dark surround: no FOV
    assert run("enhance", photos, tmp_path / "one", *_args(tiny_cofe, "--no-vessel-stats", "--threads", "1")) == 3
    assert run("enhance", photos, tmp_path / "three", *_args(tiny_cofe, "--no-vessel-stats", "--threads", "1", "--batch-size", "3")) == 3
    names = sorted(p.name for p in (tmp_path / "one").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "three").glob("*.png")) and "flat.png" not in names and len(names) == 4
    for n in names:
        a = cv2.imread(str(tmp_path / "one" / n), cv2.IMREAD_UNCHANGED).astype(np.int64)
        b = cv2.imread(str(tmp_path / "three" / n), cv2.IMREAD_UNCHANGED).astype(np.int64)
        assert np.abs(a - b).max() <= 1, n


class _Shift(torch.nn.Module):
    """A network whose correction is a constant lift plus a fine checkerboard (what the low-pass removes)."""

    def forward(self, x):
        yy, xx = torch.meshgrid(torch.arange(x.shape[-2]), torch.arange(x.shape[-1]), indexing="ij")
        return x + 0.1 + 0.05 * (((yy // 2 + xx // 2) % 2) * 2 - 1).to(x.dtype)  # 2x2-pixel squares


def test_smooth_correction_keeps_a_smooth_lift_and_removes_fine_detail():
    from fundus_pipeline.stages.enhance import canonical_input, smooth_correction

    rgb = synthetic_fundus(120, 150, 5).astype(np.float32) / 255 * 0.8
    fov = Fov.estimate(rgb)
    _, _, c_in, c_fov = canonical_input(rgb, fov.mask, fov.geometry, 64)
    c_out = _Shift()(torch.from_numpy(c_in.transpose(2, 0, 1))[None])[0].numpy().transpose(1, 2, 0)
    assert smooth_correction(c_in, c_out, c_fov, 0.0) is c_out
    smooth = smooth_correction(c_in, c_out, c_fov, 4.0) - c_in
    # the lift survives everywhere in the FOV, rim included (the blur is normalised inside the FOV), the
    # +-0.05 checkerboard does not
    np.testing.assert_allclose(smooth[c_fov], 0.1, atol=0.01)
    raw = enhance_native(_Shift(), rgb, fov.mask, fov.geometry, 64, "residual", "cpu")
    low = enhance_native(_Shift(), rgb, fov.mask, fov.geometry, 64, "residual", "cpu", 4.0)
    inner = fov.mask & (cv2.erode(fov.mask.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0)
    assert np.abs(raw - rgb - 0.1)[inner].mean() > 0.02  # the checkerboard, resampled to native size
    np.testing.assert_allclose((low - rgb)[inner], 0.1, atol=0.01)


def test_correction_sigma_option_is_recorded_and_used(photos, tmp_path, tiny_cofe):
    torch.manual_seed(1)
    model = build_model("cofe_tiny")
    with torch.no_grad():
        for t in model.parameters():
            t.add_(0.3 * torch.randn_like(t))  # away from the identity it starts as: a correction to smooth
    busy = tmp_path / "busy.pt"
    torch.save(model.state_dict(), busy)
    assert run("enhance", photos, tmp_path / "raw", *_args(busy, "--no-vessel-stats")) == 0
    assert run("enhance", photos, tmp_path / "low", *_args(busy, "--no-vessel-stats", "--correction-sigma", "8")) == 0
    raw, low = (json.loads((tmp_path / d / "manifest.json").read_text())["config"] for d in ("raw", "low"))
    assert raw["correction_sigma"] == 0.0 and low["correction_sigma"] == 8.0  # the tiny weights have no manifest choice
    a = cv2.imread(str(tmp_path / "raw" / "a.png")).astype(int)
    b = cv2.imread(str(tmp_path / "low" / "a.png")).astype(int)
    assert np.abs(a - b).max() > 0
    assert run("enhance", photos, tmp_path / "bad", *_args(tiny_cofe, "--correction-sigma", "-1")) == 2
