"""Score quality-scorer weights on the validation split of a quality set (the held-out training sources),
so that runs are compared on the same pairs and on more of them than the trainer's ``--val-stride``.

    python scripts/validate_score.py sets/quality weights/sdmp.pt runs/sdmp_v2_ft/best.pt [--stride 1] [--average]

Each weights argument is a shipped name, a weights file or a training checkpoint (best.pt, last.pt; its
architecture from ``--arch``, default ``sdmp``). The crops are the test-time protocol of ``fundus score`` and
of the trainer's validation. ``--average`` also scores the mean prediction of all the given weights.
``--stride 3`` reproduces the trainer's validation pairs. One JSON line per weights (and the average) on
stdout, with a bootstrap 95% CI over the validation sources and the SROCC per dataset (camera: the split
mixes them in other shares than the test part); ``--predictions FILE`` writes the per-pair predictions as CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from fundus_pipeline.evaluation.score import iqa_metrics
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.models.weights import load_state_dict, resolve_weights
from fundus_pipeline.quality.scoring import CROP, SCORE_SIZE, crop_boxes, predict_pairs
from fundus_pipeline.train.score import PairReader, read_pairs


def srocc_ci(pred: np.ndarray, lab: np.ndarray, groups: list[str], n: int = 1000, seed: int = 0) -> list[float]:
    """95% bootstrap CI of the SROCC over resampled source photographs."""
    from scipy.stats import spearmanr

    keys = sorted(set(groups))
    idx = {k: np.flatnonzero(np.array(groups) == k) for k in keys}
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        take = np.concatenate([idx[keys[i]] for i in rng.integers(len(keys), size=len(keys))])
        vals.append(spearmanr(pred[take], lab[take]).statistic)
    return [round(float(v), 4) for v in np.percentile(vals, [2.5, 97.5])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quality_set", type=Path)
    ap.add_argument("weights", nargs="+")
    ap.add_argument("--arch", default="sdmp")
    ap.add_argument("--stride", type=int, default=1, help="every n-th validation pair (the trainer's --val-stride)")
    ap.add_argument("--average", action="store_true", help="also score the mean prediction of all the weights")
    ap.add_argument("--predictions", type=Path, default=None, help="write key, label and each prediction as CSV")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = read_pairs(a.quality_set, "val")[:: a.stride]
    if not rows:
        raise SystemExit(f"{a.quality_set}/pairs.csv has no val pairs")
    reader = PairReader(a.quality_set, SCORE_SIZE)
    frames = [reader(r) for r in rows]
    lab = np.array([float(r["label"]) for r in rows])
    groups = [r["source"] for r in rows]
    datasets = [r["dataset"] for r in rows]
    boxes = crop_boxes(SCORE_SIZE, CROP)
    preds: dict[str, np.ndarray] = {}

    def report(name: str, pred: np.ndarray) -> None:
        from scipy.stats import spearmanr

        m = iqa_metrics(pred, lab)
        out = {"weights": name, "pairs": len(rows), "sources": len(set(groups))}
        out.update({k: round(float(m[k]), 4) for k in ("srocc", "plcc", "krocc", "rmse")})
        out["srocc_ci95"] = srocc_ci(pred, lab, groups)
        out["srocc_by_dataset"] = {
            d: round(float(spearmanr(pred[m], lab[m]).statistic), 4) if m.sum() >= 3 else None
            for d in sorted(set(datasets))
            for m in [np.array(datasets) == d]
        }
        print(json.dumps(out), flush=True)

    for w in a.weights:
        model = build_model(a.arch)
        model.load_state_dict(load_state_dict(resolve_weights(w)))
        model.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(frames), 4):
                chunk = frames[i : i + 4]
                res = predict_pairs(model, [e.astype(np.float32) / 255 for e, _ in chunk], [r.astype(np.float32) / 255 for _, r in chunk], "cpu", boxes)
                out.extend(float(p[0]) for p in res)
        preds[w] = np.array(out)
        report(w, preds[w])
    if a.average and len(preds) > 1:
        report("average(" + ",".join(preds) + ")", np.mean(list(preds.values()), axis=0))
    if a.predictions:
        with open(a.predictions, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["key", "source", "label", *preds])
            for i, r in enumerate(rows):
                wr.writerow([r["key"], r["source"], r["label"], *(f"{p[i]:.6f}" for p in preds.values())])


if __name__ == "__main__":
    main()
