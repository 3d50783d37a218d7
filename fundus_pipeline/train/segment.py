"""``fundus train segment``: a vessel segmenter on DRIVE 21-40 + the HRF training split (see
fundus_pipeline.datasets), as a task on the shared loop (``fundus_pipeline.train.loop``).

Patch training: each step draws ``batch`` patches; a patch is a random rotation (0-360 deg), scale
(0.75-1.33) and flip of a window centred inside the FOV, followed by colour, gamma, blur and noise
jitter and, with ``--degrade-p``, a pre-computed whole-image degradation from the ``degradation``
library (Cofe-Net released/training presets and the clinical recipes), so the model learns to see
vessels in poor photographs. Loss: BCE + soft Dice inside the FOV, plus the deep supervision and edge
BCE of models that provide them, weighted as the model declares (``forward_train`` returns
``main_weight``, the ``aux`` weights and ``edge_weight``). Every ``--val-every`` steps the whole
validation images are segmented at the working scale; the checkpoint with the best pooled validation
F1 (at its best threshold) is kept as best.pt. The a-priori decision threshold of exported weights is
chosen on the same validation images by ``export_description`` (``scripts/export_weights.py``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fundus_pipeline.datasets import Sample, training_sets
from fundus_pipeline.evaluation.metrics import pooled_f1_curve
from fundus_pipeline.models.inference import DEFAULT_MAX_FOV_DIAMETER, predict_logits, sigmoid
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.train.config import SegmentConfig
from fundus_pipeline.train.loop import Batch, Task, fit


def _affine_patch(sample_arrays, rng: np.random.Generator, patch: int, fov: np.ndarray, fov_pts: np.ndarray):
    """Random rotation/scale/flip patch centred on a random FOV pixel."""
    cy, cx = fov_pts[rng.integers(len(fov_pts))]
    angle = rng.uniform(0, 360)
    scale = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), angle, scale)
    m[0, 2] += patch / 2 - cx
    m[1, 2] += patch / 2 - cy
    out = []
    for arr, interp in sample_arrays:
        out.append(cv2.warpAffine(arr, m, (patch, patch), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0))
    if rng.random() < 0.5:
        out = [o[:, ::-1] for o in out]
    return out


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = img * rng.uniform(0.7, 1.3)  # brightness
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.7, 1.3) + mean  # contrast
    grey = img.mean(axis=2, keepdims=True)
    img = (img - grey) * rng.uniform(0.7, 1.3) + grey  # saturation
    img = np.clip(img, 0, 1) ** rng.uniform(0.7, 1.4)  # gamma
    if rng.random() < 0.2:
        s = rng.uniform(0.3, 1.2)
        img = cv2.GaussianBlur(img, (0, 0), s)
    if rng.random() < 0.2:
        img = img + rng.normal(0, rng.uniform(0.005, 0.03), img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


class PatchSampler:
    """``batch(step)``: (images N x 3 x P x P, vessels N x 1 x P x P, FOV N x 1 x P x P) as float32, a pure
    function of (seed, step): the datasets are balanced, then an image, its degraded copy (with
    probability ``degrade_p``), the affine patch and the photometric jitter are drawn."""

    def __init__(
        self,
        samples: list[Sample],
        patch: int,
        seed: int,
        degraded: dict[str, list[np.ndarray]] | None,
        degrade_p: float,
        batch_size: int = 8,
    ):
        self.samples = samples
        self.batch_size = batch_size
        self.patch = patch
        self.degraded = degraded or {}
        self.degrade_p = degrade_p
        self.fov_pts = [np.argwhere(s.fov) for s in samples]
        self.by_dataset: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            self.by_dataset.setdefault(s.name.split("/")[0], []).append(i)
        self.seed = seed

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        xs, ys, ms = [], [], []
        datasets = sorted(self.by_dataset)
        for _ in range(self.batch_size):
            ds = datasets[rng.integers(len(datasets))]  # balance the datasets
            i = self.by_dataset[ds][rng.integers(len(self.by_dataset[ds]))]
            s = self.samples[i]
            rgb = s.rgb
            pool = self.degraded.get(s.name)
            if pool and rng.random() < self.degrade_p:
                rgb = pool[rng.integers(len(pool))]
            img, ves, fov = _affine_patch(
                [(rgb, cv2.INTER_LINEAR), (s.vessels, cv2.INTER_LINEAR), (s.fov.astype(np.uint8), cv2.INTER_NEAREST)],
                rng,
                self.patch,
                s.fov,
                self.fov_pts[i],
            )
            xs.append(_photometric(np.ascontiguousarray(img), rng).transpose(2, 0, 1))
            ys.append(np.ascontiguousarray(ves)[None])
            ms.append(np.ascontiguousarray(fov)[None].astype(np.float32))
        return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), torch.from_numpy(np.stack(ms)))


def seg_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * mask).sum() / mask.sum().clamp_min(1.0)
    p = torch.sigmoid(logits) * mask
    t = target * mask
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return bce + dice


def edge_target(target: torch.Tensor) -> torch.Tensor:
    t = (target.detach().cpu().numpy() > 0.5).astype(np.uint8) * 255
    edges = np.stack([cv2.Canny(t[i, 0], 10, 100)[None] for i in range(t.shape[0])]).astype(np.float32) / 255.0
    return torch.from_numpy(edges).to(target.device)


def total_loss(out: dict, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The segmentation loss, weighted as the model's ``forward_train`` declares: ``main_weight`` x
    seg_loss(logits) + sum of w x seg_loss(aux) over ``aux`` = [(logits, w), ...] + ``edge_weight`` x
    the FOV-masked BCE of ``edge`` logits against the Canny edges of the target."""
    if "main_weight" not in out:
        raise TypeError("forward_train() must declare its loss weighting: return 'main_weight' (and 'edge_weight' with 'edge')")
    loss = out["main_weight"] * seg_loss(out["logits"], y, m)
    for aux, w in out.get("aux") or []:
        loss = loss + w * seg_loss(aux, y, m)
    if out.get("edge") is not None:
        e = F.binary_cross_entropy_with_logits(out["edge"], edge_target(y), reduction="none")
        loss = loss + out["edge_weight"] * ((e * m).sum() / m.sum().clamp_min(1.0))
    return loss


def f1_curve(probs: list[np.ndarray], gts: list[np.ndarray], fovs: list[np.ndarray]):
    """(best pooled F1 over thresholds 0.01..0.989, its threshold, pooled AUC-ROC), inside the FOV."""
    thr, f1, auc = pooled_f1_curve(probs, gts, fovs)
    k = int(np.argmax(f1[10:990])) + 10
    return float(f1[k]), float(thr[k]), auc


def validate(model, val: list[Sample], device) -> dict:
    """Pooled F1 (at its best threshold) and AUC-ROC over all validation images, and per dataset:
    ``{"f1", "threshold", "auc_roc", "per_dataset": {ds: {...}}}`` (model in eval mode)."""
    probs = [sigmoid(predict_logits(model, s.rgb, device=device, tile=512, overlap=64)) for s in val]
    per = {}
    for ds in sorted({s.name.split("/")[0] for s in val}):
        idx = [i for i, s in enumerate(val) if s.name.startswith(ds + "/")]
        f1, thr, auc = f1_curve([probs[i] for i in idx], [val[i].vessels for i in idx], [val[i].fov for i in idx])
        per[ds] = {"f1": f1, "threshold": thr, "auc_roc": auc}
    f1, thr, auc = f1_curve(probs, [s.vessels for s in val], [s.fov for s in val])
    return {"f1": f1, "threshold": thr, "auc_roc": auc, "per_dataset": per}


def build_degraded_pool(samples: list[Sample], per_image: int, seed: int) -> dict[str, list[np.ndarray]]:
    """Whole-image degraded copies of each training image (Cofe-Net presets + clinical recipes)."""
    from degradation import cofe_degrader, load_recipe, soft_fov_mask
    from degradation.fov import fov_geometry

    makers = [
        lambda: cofe_degrader(preset="released", code="111"),
        lambda: cofe_degrader(preset="training", code="111"),
        lambda: load_recipe("mild"),
        lambda: load_recipe("moderate"),
        lambda: load_recipe("severe"),
    ]
    pool: dict[str, list[np.ndarray]] = {}
    for s in samples:
        geom = fov_geometry(s.fov)
        soft = soft_fov_mask(s.fov, geom)
        copies = []
        for k in range(per_image):
            d = makers[k % len(makers)]()
            params = d.sample(seed=seed, key=f"{s.name}#{k}", fov=geom)
            copies.append(d.apply(s.rgb, params, soft, levels=255).astype(np.float32))
        pool[s.name] = copies
    return pool


class SegmentTask(Task):
    """Vessel segmentation on DRIVE + HRF; best.pt is chosen on the pooled validation F1."""

    name = "segment"
    score_key = "f1"
    cfg: SegmentConfig

    def __init__(self, cfg: SegmentConfig):
        super().__init__(cfg)
        self.val: list[Sample] = []

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.arch)

    def setup(self, log: Callable[[str], None]) -> None:
        cfg = self.cfg
        train, self.val = training_sets(cfg.data_root)
        log(f"train {len(train)} images, val {[s.name for s in self.val]}")
        degraded = build_degraded_pool(train, cfg.degrade_copies, cfg.seed) if cfg.degrade_p > 0 else None
        self.sampler = PatchSampler(train, cfg.patch, cfg.seed, degraded, cfg.degrade_p, cfg.batch_size)

    def loss(self, out: dict, batch: Batch) -> torch.Tensor:
        _, y, m = batch
        return total_loss(out, y, m)

    def validate(self, model: nn.Module, device: torch.device) -> dict:
        return validate(model, self.val, device)


def train(cfg: SegmentConfig) -> dict:
    """Train as ``fundus train segment`` does; returns the run summary (also OUT/summary.json)."""
    return fit(SegmentTask(cfg), cfg)


# --------------------------------------------------------------------------------------- weights export
def val_threshold(model: nn.Module, val: list[Sample]) -> dict:
    """The a-priori threshold: maximise the mean of the per-dataset pooled validation F1 (0.05..0.95, 0.001 steps)."""
    probs = {s.name: sigmoid(predict_logits(model, s.rgb)) for s in val}  # the defaults of `fundus segment`
    curves, aucs = {}, {}
    for ds in sorted({s.name.split("/")[0] for s in val}):
        ss = [s for s in val if s.name.startswith(ds + "/")]
        thr, curves[ds], aucs[ds] = pooled_f1_curve([probs[s.name] for s in ss], [s.vessels for s in ss], [s.fov for s in ss])
    mean_f1 = np.mean(list(curves.values()), axis=0)
    lo, hi = int(np.searchsorted(thr, 0.05)), int(np.searchsorted(thr, 0.95)) + 1
    k = lo + int(np.argmax(mean_f1[lo:hi]))
    return {
        "threshold": round(float(thr[k]), 3),
        "rule": "maximise the mean of the per-dataset pooled validation F1 (thresholds 0.05-0.95 in 0.001 steps)",
        "val_f1": {ds: round(float(v[k]), 4) for ds, v in curves.items()},
        "val_auc_roc": {ds: round(a, 4) for ds, a in aucs.items()},
    }


def export_description(model: nn.Module, data_root: Path | None = None) -> dict:
    """The segment-specific parts of a weights manifest entry: input contract, output with the a-priori
    threshold chosen on the validation images, and the data split (``export_weights``'s ``describe``)."""
    from fundus_pipeline.datasets import default_data_root

    _, val = training_sets(data_root or default_data_root())
    thr = val_threshold(model, val)
    return {
        "input": {
            "channels": 3,
            "color": "rgb",
            "value_range": [0, 1],
            "normalisation": "none (RGB divided by the bit depth's maximum)",
            "size_divisor": int(model.size_divisor),
            "scale_policy": {"type": "fov_max_diameter", "max_fov_diameter": DEFAULT_MAX_FOV_DIAMETER, "rule": "downscale by the smallest integer factor that brings the FOV diameter to <= max_fov_diameter"},
        },
        "output": {"activation": "sigmoid", "threshold": thr["threshold"], "threshold_selection": thr},
        "training": {
            "data": "DRIVE training 21-36 + HRF training split 01-04 of each class (h, g, dr) at half resolution",
            "validation": "DRIVE 37-40 + HRF 05_h, 05_g, 05_dr (training images; checkpoint selection and threshold)",
            "test_never_used": "DRIVE 01-20, HRF 06-15",
        },
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m fundus_pipeline.train.segment ARGS`` = ``fundus train segment ARGS``."""
    import sys

    from fundus_pipeline.cli import main as cli_main

    return cli_main(["train", "segment", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
