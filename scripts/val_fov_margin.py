"""How far outside the estimated FOV to keep probabilities: measured on the validation images only.

    python scripts/val_fov_margin.py [--weights imff]

For the validation images (DRIVE 37-40, HRF 05_h/05_g/05_dr at the working scale) the shipped model's
probabilities are zeroed outside the *estimated* FOV grown by a margin (a fraction of the estimated
diameter, as `fundus segment --fov-margin`), then scored inside the datasets' own FOV masks: pooled
AUC-ROC and pooled F1 at the model's a-priori threshold, per dataset, and the number of predicted vessel
pixels *outside* the datasets' masks (false vessels beyond the retina's edge, which the metrics inside
the masks cannot see). "none" keeps every probability. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from degradation.fov import estimate_fov_geometry  # noqa: E402
from fundus_pipeline.datasets import default_data_root, training_sets  # noqa: E402
from fundus_pipeline.evaluation.metrics import auc_roc_from_hist, binary_metrics, confusion, score_histograms  # noqa: E402
from fundus_pipeline.models.weights import load_model  # noqa: E402
from fundus_pipeline.models.inference import fov_keep_mask, predict_logits, sigmoid  # noqa: E402

MARGINS = [0.0, 0.005, 0.01, 0.015, 0.02, 0.03]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="imff")
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, loaded = load_model(args.weights)
    thr = loaded.threshold
    _, val = training_sets(default_data_root())
    acc: dict[str, dict[str, list]] = {}
    for s in val:
        ds = s.name.split("/")[0]
        prob = sigmoid(predict_logits(model, s.rgb))
        est, geom = estimate_fov_geometry(s.rgb)
        gt = s.vessels > 0.5
        variants = {"none": prob}
        for m in MARGINS:
            q = prob.copy()
            q[~fov_keep_mask(est, m * geom.diameter)] = 0.0
            variants[f"{m:g}"] = q
        for name, q in variants.items():
            a = acc.setdefault(ds, {}).setdefault(name, [0, 0, np.zeros(4, np.int64), 0])
            pos, neg = score_histograms(q, gt, s.fov)
            a[0] = a[0] + pos
            a[1] = a[1] + neg
            a[2] += np.array(confusion(q, gt, s.fov, thr))
            a[3] += int(((q >= thr) & ~s.fov).sum())
    out = {"weights": loaded.name, "threshold": thr, "margins_as_fraction_of_fov_diameter": {}}
    for ds, per in acc.items():
        out["margins_as_fraction_of_fov_diameter"][ds] = {
            name: {"auc_roc": round(float(auc_roc_from_hist(pos, neg)), 5), "f1": round(binary_metrics(*map(int, c))["f1"], 5), "vessel_px_outside_mask": out_px}
            for name, (pos, neg, c, out_px) in per.items()
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
