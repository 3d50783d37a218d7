"""`fundus evaluate enhance`: image metrics (known answers, skimage agreement, FOV restriction) and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from typer.testing import CliRunner

from fundus_pipeline.cli.evaluate import evaluate_app
from fundus_pipeline.errors import UsageError
from fundus_pipeline.evaluation.image_metrics import MS_SSIM_WEIGHTS, ciede2000, ms_ssim, psnr, score_pair, ssim

H, W = 48, 64


def _photo(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    """A textured float64 RGB 'fundus': smooth colour pattern plus noise inside a disc, 0 around it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.stack(
        [0.55 + 0.25 * np.sin(xx / 6) * np.cos(yy / 9), 0.3 + 0.1 * np.sin((xx + yy) / 5), 0.1 + 0.05 * np.cos(yy / 4)], -1
    )
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.48 * h) ** 2
    return img * disc[..., None]


def _noisy(img: np.ndarray, sigma: float = 0.05, seed: int = 1) -> np.ndarray:
    return np.clip(img + np.random.default_rng(seed).normal(0, sigma, img.shape), 0, 1)


FULL = np.ones((H, W), bool)


# --------------------------------------------------------------------------------------------- metrics
def test_identical_images_known_answers():
    ref = _photo()
    assert psnr(ref, ref, FULL) == 100.0
    assert ssim(ref, ref, FULL) == pytest.approx(1.0, abs=1e-12)
    assert ms_ssim(ref, ref, FULL) == pytest.approx(1.0, abs=1e-12)
    assert ciede2000(ref, ref, FULL) == pytest.approx(0.0, abs=1e-12)


def test_constant_offset_is_20_db():
    ref = _photo() * 0.9
    assert psnr(ref + 0.1, ref, FULL) == pytest.approx(20.0, abs=1e-9)
    assert psnr(ref.astype(np.float32) + np.float32(0.1), ref.astype(np.float32), FULL) == pytest.approx(20.0, abs=1e-5)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_matches_skimage_with_full_mask(dtype, tol):
    ref, pred = _photo(), _noisy(_photo())
    mssim, smap = structural_similarity(
        ref, pred, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=-1, full=True
    )
    score, mine = ssim(pred.astype(dtype), ref.astype(dtype), FULL, full=True)
    expected_map = smap.mean(axis=2)
    assert np.abs(mine - expected_map).max() < 10 * tol  # float32: a few 1e-6 per pixel
    assert score == pytest.approx(expected_map.mean(), abs=tol)  # same averaging: all (FOV) pixels, no crop
    assert mine[5:-5, 5:-5].mean() == pytest.approx(mssim, abs=tol)  # skimage's crop of (win - 1) / 2
    assert psnr(pred.astype(dtype), ref.astype(dtype), FULL) == pytest.approx(
        peak_signal_noise_ratio(ref, pred, data_range=1), abs=tol
    )


def _reference_ms_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Independent full-frame MS-SSIM (scipy filters, reshape pooling), as defined in the docstring."""

    def f(v: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(v, 1.5, truncate=3.5, mode="reflect")

    per_channel = []
    for c in range(3):
        a, b = x[..., c], y[..., c]
        terms = []
        while min(a.shape) >= 11 and len(terms) < 5:
            ua, ub = f(a), f(b)
            va, vb, vab = f(a * a) - ua**2, f(b * b) - ub**2, f(a * b) - ua * ub
            cs = (2 * vab + 0.03**2) / (va + vb + 0.03**2)
            lum = (2 * ua * ub + 0.01**2) / (ua**2 + ub**2 + 0.01**2)
            terms.append((cs.mean(), (lum * cs).mean()))
            h, w = a.shape[0] // 2, a.shape[1] // 2
            a = a[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3))
            b = b[: 2 * h, : 2 * w].reshape(h, 2, w, 2).mean(axis=(1, 3))
        w_ = np.array(MS_SSIM_WEIGHTS[: len(terms)])
        w_ /= w_.sum()
        vals = [t[0] for t in terms[:-1]] + [terms[-1][1]]
        per_channel.append(np.prod(np.maximum(vals, 0) ** w_))
    return float(np.mean(per_channel))


@pytest.mark.parametrize("h, w, n_scales", [(H, W, 3), (180, 200, 5)])
def test_ms_ssim_matches_reference_and_renormalises(h, w, n_scales):
    ref = _photo(h=h, w=w)
    pred = _noisy(ref, 0.08)
    pred[: h // 2] *= 0.8  # a luminance change too
    got = ms_ssim(pred, ref, np.ones((h, w), bool))
    assert got == pytest.approx(_reference_ms_ssim(pred, ref), abs=1e-10)
    assert 0 < got < 1
    assert min(h, w) // 2 ** (n_scales - 1) >= 11 and (n_scales == 5 or min(h, w) // 2**n_scales < 11)


def test_mask_restricts_every_metric():
    ref = _photo()
    pred = _noisy(ref)
    mask = np.zeros((H, W), bool)
    mask[8:40, 10:50] = True
    corrupted_pred, corrupted_ref = pred.copy(), ref.copy()
    corrupted_pred[~mask] = np.random.default_rng(5).random((int((~mask).sum()), 3))
    corrupted_ref[:, :10] = 1.0  # right next to the FOV border
    base = score_pair(pred, ref, mask)
    assert score_pair(corrupted_pred, corrupted_ref, mask) == base
    assert base["fov_fraction"] == pytest.approx(mask.mean())
    # and the mask does matter: the same images scored on the whole frame differ
    assert score_pair(corrupted_pred, ref, FULL)["psnr"] < base["psnr"]


def test_ciede2000_in_bands_of_rows_is_the_same(monkeypatch):
    import fundus_pipeline.evaluation.image_metrics as im

    ref, pred = _photo(), _noisy(_photo())
    mask = np.zeros((H, W), bool)
    mask[10:30, 5:60] = True
    whole = ciede2000(pred, ref, mask)
    monkeypatch.setattr(im, "CIEDE_CHUNK_PIXELS", 3 * W)  # bands of 3 rows, some without FOV pixels
    assert ciede2000(pred, ref, mask) == pytest.approx(whole, rel=1e-12)


def test_score_pair_equals_the_single_metrics_and_checks_shapes():
    ref, pred = _photo(), _noisy(_photo())
    mask = np.asarray(np.random.default_rng(2).random((H, W)) > 0.3)
    s = score_pair(pred, ref, mask)
    assert s["psnr"] == psnr(pred, ref, mask) and s["ssim"] == ssim(pred, ref, mask)
    assert s["ms_ssim"] == ms_ssim(pred, ref, mask) and s["ciede2000"] == ciede2000(pred, ref, mask)
    assert (s["width"], s["height"]) == (W, H) and s["ciede2000"] > 0
    with pytest.raises(ValueError, match="mask is empty"):  # (its figures were NaN; campaign 27b F5)
        score_pair(pred, ref, np.zeros((H, W), bool))
    with pytest.raises(ValueError, match="shapes differ"):
        score_pair(pred[:-1], ref, mask)


# --------------------------------------------------------------------------------------------- CLI
def _run(*args: object):
    app = typer.Typer()
    app.add_typer(evaluate_app, name="evaluate")
    return CliRunner().invoke(app, ["evaluate", "enhance", *[str(a) for a in args]])


def _png(path: Path, rgb: np.ndarray, bits: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype, top = (np.uint8, 255) if bits == 8 else (np.uint16, 65535)
    assert cv2.imwrite(str(path), np.rint(rgb[..., ::-1] * top).astype(dtype))


def _tree(tmp: Path, keys=("01_h", "02_h", "03_h")) -> tuple[Path, Path, Path]:
    """references (8-bit), an enhance-style output (KEY.png + manifest/results), FOV masks (KEY_mask.png)."""
    ref, enh, fov = tmp / "ref", tmp / "enh", tmp / "fov"
    for i, k in enumerate(keys):
        r = np.rint(_photo(seed=i) * 255) / 255
        _png(ref / f"{k}.png", r)
        if i == 0:  # identical content stored as 16 bit: v * 257 / 65535 == v / 255
            _png(enh / f"{k}.png", r, bits=16)
        else:
            _png(enh / f"{k}.png", _noisy(r, 0.03 * i, seed=i))
        m = np.zeros((H, W), np.uint8)
        m[4:44, 6:58] = 255
        _png(fov / f"{k}_mask.png", np.repeat(m[..., None] / 255.0, 3, axis=2))
    (enh / "manifest.json").write_text("{}")
    (enh / "results.csv").write_text("key,status\n")
    return enh, ref, fov


def test_end_to_end_json_with_fov_and_16_bit(tmp_path):
    enh, ref, fov = _tree(tmp_path)
    r = _run(enh, ref, "--fov", fov, "--format", "json", "--bootstrap", "50")
    assert r.exit_code == 0, (r.output, r.exception)
    s = json.loads(r.stdout)
    assert s["n_images"] == 3 and s["n_unpaired"] == 0 and s["n_errors"] == 0 and s["fov"] == "mask folder"
    assert set(s["definitions"]) >= {"psnr", "ssim", "ms_ssim", "ciede2000", "fov", "resolution"}
    assert len(s["ci95"]["mean"]["psnr"]) == 2 and s["bootstrap"] == {**s["bootstrap"], "n": 50, "seed": 0}
    out = enh / "eval"
    assert {p.name for p in out.iterdir()} == {"metrics.csv", "summary.json", "summary.md"}
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert list(rows[0])[:8] == ["key", "psnr", "ssim", "ms_ssim", "ciede2000", "fov_fraction", "width", "height"]
    assert [row["key"] for row in rows] == ["01_h", "02_h", "03_h"] and all(row["status"] == "ok" for row in rows)
    first = rows[0]  # the 16-bit copy of the 8-bit reference
    assert float(first["psnr"]) == 100 and float(first["ssim"]) == 1 and float(first["ciede2000"]) == 0
    assert float(first["fov_fraction"]) == pytest.approx(40 * 52 / (H * W))
    assert (first["width"], first["height"]) == (str(W), str(H))
    assert float(rows[1]["psnr"]) > float(rows[2]["psnr"])  # more noise, lower PSNR
    mean_psnr = np.mean([float(row["psnr"]) for row in rows])
    assert s["mean"]["psnr"] == pytest.approx(mean_psnr, abs=1e-5)
    md = (out / "summary.md").read_text()
    assert md.startswith("# Enhancement evaluation") and "| psnr [dB] |" in md and "## Definitions" in md


def test_estimated_fov_human_output_and_no_bootstrap(tmp_path):
    enh, ref, _ = _tree(tmp_path)
    r = _run(enh, ref, "--bootstrap", "0", "--out", tmp_path / "ev")
    assert r.exit_code == 0, (r.output, r.exception)
    assert "estimated on each reference image" in r.stdout and "95% CI" not in r.stdout
    header = next(ln for ln in r.stdout.splitlines() if ln.startswith("metric"))
    assert header.split() == ["metric", "mean", "std"]
    assert "psnr [dB]" in r.stdout and f"reports: {tmp_path / 'ev'}/metrics.csv" in r.stdout
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert "ci95" not in s and "reference image" in s["definitions"]["fov"]
    rows = list(csv.DictReader((tmp_path / "ev" / "metrics.csv").open()))
    assert all(row["fov"] == "estimated" and 0 < float(row["fov_fraction"]) <= 1 for row in rows)


def test_missing_pairs_and_shape_mismatch(tmp_path):
    enh, ref, fov = _tree(tmp_path, keys=("01", "02", "03", "04"))
    (ref / "02.png").unlink()  # enhanced without reference: a problem
    (enh / "04.png").unlink()  # reference without enhanced image: only counted
    _png(enh / "03.png", _photo(h=H + 2))  # shape mismatch
    r = _run(enh, ref, "--fov", fov, "--bootstrap", "0")
    assert r.exit_code == 3, r.output
    rows = {row["key"]: row for row in csv.DictReader((enh / "eval" / "metrics.csv").open())}
    assert set(rows) == {"01", "02", "03"}
    assert rows["01"]["status"] == "ok"
    assert rows["02"]["status"] == "unpaired: no reference" and rows["02"]["psnr"] == ""
    assert rows["03"]["status"] == f"error: size mismatch: enhanced {W}x{H + 2}, reference {W}x{H}"
    s = json.loads((enh / "eval" / "summary.json").read_text())
    assert s["n_images"] == 1 and s["n_unpaired"] == 1 and s["n_errors"] == 1
    assert s["ref_without_enhanced"] == ["04"] and [p["key"] for p in s["problems"]] == ["02", "03"]
    assert "warning: 02: unpaired: no reference" in r.stderr
    assert "1 reference image has no enhanced image (not scored)" in r.stderr


def test_subset_of_references_exit_0_and_missing_fov_mask(tmp_path):
    enh, ref, fov = _tree(tmp_path)
    (enh / "03_h.png").unlink()
    r = _run(enh, ref, "--fov", fov, "--bootstrap", "0", "--format", "json")
    assert r.exit_code == 0, r.output
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == ["1 reference image has no enhanced image (not scored)"]
    assert json.loads(r.stdout)["n_images"] == 2
    (fov / "02_h_mask.png").unlink()
    r = _run(enh, ref, "--fov", fov, "--bootstrap", "0")
    assert r.exit_code == 3 and "warning: 02_h: unpaired: no FOV mask" in r.stderr


def test_no_pairs_and_bad_folders_are_usage_errors(tmp_path):
    enh, _, _ = _tree(tmp_path)
    other = tmp_path / "other"
    _png(other / "99.png", _photo())
    r = _run(enh, other)
    assert isinstance(r.exception, UsageError) and r.exception.exit_code == 2
    assert "no enhanced image" in r.exception.message and not (enh / "eval").exists()
    r = _run(enh, tmp_path / "nope")
    assert isinstance(r.exception, UsageError) and "REF_DIR is not a folder" in r.exception.message
