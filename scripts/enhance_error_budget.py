"""Where an enhancer's remaining error lies, on the *validation* pairs of ``fundus train enhance`` (the
canonical 512 frame; DRIVE 37-40, HRF 05_h/g/dr, every 10th HEI-MED photograph; released 111 and the
``moderate`` recipe, seed 0; never test images). For the degraded input and for each enhancer's output it
reports the mean PSNR inside the FOV and two oracle corrections that use the clean image (so they bound
what a correction of that kind can buy, they are not methods):

- ``affine``: the best per-channel gain and offset (least squares inside the FOV), a global colour fix;
- ``smooth``: the image plus its error low-passed (Gaussian, sigma 8 / 32 px, normalised inside the FOV),
  the best smooth correction, of the kind ``fundus enhance``'s correction low-pass keeps.

For each enhancer it also measures whether the deployed correction (the output's correction low-passed at
sigma 32, as ``fundus enhance`` writes it) is merely too timid: ``projection`` is the least-squares slope of
that correction on the ideal smooth correction (the clean image's, same low-pass; 1 = right amount in the
right direction), and ``scaled_K`` the PSNR of the input plus K times the correction (K = 0.5, 1, 1.5, 2).

And one correction that needs no clean image, a site colour prior: ``site_prior``, the image's per-channel
mean and standard deviation inside the FOV moved to the mean of those of the clean *training* sources of
the same dataset. Its row for the clean photographs themselves (``clean``) bounds what any colour prior of
that kind can reach: the photograph-to-photograph colour variation within one dataset.

    python scripts/enhance_error_budget.py [--weights cofe_add_seg,cofe] [--cache runs/enh_sources_512.npz] [--json FILE]

The JSON (stdout, or FILE) holds the means per degradation kind and per enhancer, over all pairs and per
source dataset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fundus_pipeline.stages.enhance import smooth_correction
from fundus_pipeline.train import enhance as E
from fundus_pipeline.train.config import EnhanceConfig


def affine_fix(img: np.ndarray, clean: np.ndarray, fov: np.ndarray) -> np.ndarray:
    out = img.copy()
    for c in range(3):
        x, y = img[..., c][fov], clean[..., c][fov]
        a = np.vstack([x, np.ones_like(x)]).T
        gain, offset = np.linalg.lstsq(a, y, rcond=None)[0]
        out[..., c] = img[..., c] * gain + offset
    return out


def channel_stats(img: np.ndarray, fov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = img[fov]
    return p.mean(0), p.std(0)


def site_prior(sources) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per dataset: the mean over its sources of the per-channel mean and standard deviation inside the FOV."""
    by: dict[str, list] = {}
    for s in sources:
        by.setdefault(s.name.split("/")[0], []).append(channel_stats(s.rgb, s.fov > 0))
    return {d: (np.mean([m for m, _ in v], 0), np.mean([sd for _, sd in v], 0)) for d, v in by.items()}


def prior_fix(img: np.ndarray, fov: np.ndarray, prior: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    m, sd = channel_stats(img, fov)
    return np.clip((img - m) / np.maximum(sd, 1e-4) * prior[1] + prior[0], 0, 1) * fov[..., None]


def budget(img: np.ndarray, clean: np.ndarray, fov: np.ndarray, prior: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    return {
        "psnr": E.psnr_in(img, clean, fov),
        "site_prior": E.psnr_in(prior_fix(img, fov, prior), clean, fov),
        "affine": E.psnr_in(affine_fix(img, clean, fov), clean, fov),
        "smooth8": E.psnr_in(smooth_correction(img, clean, fov, 8), clean, fov),
        "smooth32": E.psnr_in(smooth_correction(img, clean, fov, 32), clean, fov),
    }


SCALES = (0.5, 1.0, 1.5, 2.0)


def ideal_correction(deg: np.ndarray, clean: np.ndarray, fov: np.ndarray, sigma: float = 32.0) -> np.ndarray:
    """The clean image's smooth correction of ``deg`` inside the FOV (the same for every enhancer)."""
    return (smooth_correction(deg, clean, fov, sigma) - deg)[fov]


def correction_scale(out: np.ndarray, deg: np.ndarray, clean: np.ndarray, fov: np.ndarray, ideal: np.ndarray, sigma: float = 32.0) -> dict[str, float]:
    corr = smooth_correction(deg, out, fov, sigma) - deg
    res = {"projection": float((corr[fov] * ideal).sum() / max(float((ideal * ideal).sum()), 1e-12))}
    for k in SCALES:
        res[f"scaled_{k:g}"] = E.psnr_in(np.clip(deg + k * corr, 0, 1) * fov[..., None], clean, fov)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="cofe_add_seg,cofe")
    ap.add_argument("--cache", type=Path, default=Path("runs/enh_sources_512.npz"))
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    from fundus_pipeline.models.weights import load_model

    cfg = EnhanceConfig(out=Path("runs/_budget"), data=a.data, cache=a.cache, rsa_init=None)
    sources = E.prepare_sources(cfg.data_root, 512, E.resolve_segmenter(), cfg.cache_path, lambda m: None)
    train, val = E.split_sources(sources)
    priors = site_prior(train)
    pairs = [(k, d, s) for k, d, s in E.validation_pairs(val, E.VAL_SEED) if k != "clean"]
    models = {w: load_model(w, task="enhancement")[0] for w in a.weights.split(",") if w}
    rows: dict[str, dict[str, list[dict]]] = {}
    for kind, deg, s in pairs:
        fov = s.fov > 0
        dataset = s.name.split("/")[0]
        prior = priors[dataset]
        rows.setdefault(kind, {}).setdefault("input", []).append({"dataset": dataset, **budget(deg, s.rgb, fov, prior)})
        if kind == "released111":  # once per source
            rows.setdefault("clean", {}).setdefault("input", []).append({"dataset": dataset, "site_prior": E.psnr_in(prior_fix(s.rgb, fov, prior), s.rgb, fov)})
        ideal = ideal_correction(deg, s.rgb, fov)  # once per pair, for all the enhancers
        for w, m in models.items():
            out = np.clip(E.enhance_canonical(m, deg, "cpu"), 0, 1) * fov[..., None]
            rows[kind].setdefault(w, []).append({"dataset": dataset, **budget(out, s.rgb, fov, prior), **correction_scale(out, deg, s.rgb, fov, ideal)})

    def means(rs: list[dict]) -> dict:
        return {m: round(float(np.mean([r[m] for r in rs])), 3) for m in rs[0] if m != "dataset"}

    datasets = sorted({r["dataset"] for v in rows.values() for r in v["input"]})
    result = {
        "pairs": {k: len(v["input"]) for k, v in rows.items()},
        "pairs_by_dataset": {d: sum(r["dataset"] == d for r in next(iter(rows.values()))["input"]) for d in datasets},
        "frame": "canonical 512, validation sources, seed 0",
        "means": {k: {w: means(rs) for w, rs in v.items()} for k, v in rows.items()},
        "means_by_dataset": {k: {d: {w: means([r for r in rs if r["dataset"] == d]) for w, rs in v.items()} for d in datasets} for k, v in rows.items()},
    }
    text = json.dumps(result, indent=1)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
