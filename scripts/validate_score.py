"""Score quality-scorer weights on the validation split of a quality set (the held-out training sources),
so that runs are compared on the same pairs and on more of them than the trainer's ``--val-stride``.

    python scripts/validate_score.py sets/quality weights/sdmp.pt runs/sdmp_v2_ft/best.pt [--stride 1] [--average]

Each weights argument is a shipped name, a weights file or a training checkpoint (best.pt, last.pt; its
architecture from ``--arch``, default ``sdmp``). The predictions are the trainer's validation protocol
(``train.score.predict_frames``); ``--stride 3`` reproduces the trainer's validation pairs. ``--average``
also scores the mean prediction of all the given weights. The figures are ``fundus evaluate score``'s
(``evaluate_scores``: 95% CIs from a bootstrap over the validation sources), overall and per dataset
(camera: the split mixes them in other shares than the test part). One JSON line per weights (and the
average) on stdout; ``--predictions FILE`` keeps the per-pair predictions as CSV (one column per weights).
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from fundus_pipeline.errors import UsageError
from fundus_pipeline.evaluation.score import evaluate_scores
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.models.weights import load_state_dict, resolve_weights
from fundus_pipeline.quality.scoring import SCORE_SIZE
from fundus_pipeline.train.score import PairReader, predict_frames, read_pairs


def _r4(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)  # None: too few pairs (the evaluator's NaN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quality_set", type=Path)
    ap.add_argument("weights", nargs="+")
    ap.add_argument("--arch", default="sdmp")
    ap.add_argument("--stride", type=int, default=1, help="every n-th validation pair (the trainer's --val-stride)")
    ap.add_argument("--average", action="store_true", help="also score the mean prediction of all the weights")
    ap.add_argument("--predictions", type=Path, default=None, help="write key, source, label and each prediction as CSV")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    if a.threads < 1 or a.stride < 1:
        raise UsageError("--threads and --stride must be at least 1")
    torch.set_num_threads(a.threads)
    rows = read_pairs(a.quality_set, "val")[:: a.stride]
    if not rows:
        raise UsageError(f"{a.quality_set}/pairs.csv has no val pairs")
    reader = PairReader(a.quality_set, SCORE_SIZE)
    frames = [reader(r) for r in rows]  # read once for all the weights
    preds: dict[str, np.ndarray] = {}
    for w in a.weights:
        model = build_model(a.arch)
        model.load_state_dict(load_state_dict(resolve_weights(w)))
        model.eval()
        with torch.no_grad():
            preds[w] = predict_frames(model, frames, "cpu")
    if a.average and len(preds) > 1:
        preds["average(" + ",".join(preds) + ")"] = np.mean(list(preds.values()), axis=0)

    with tempfile.TemporaryDirectory() as tmp:
        path = a.predictions or Path(tmp) / "predictions.csv"
        with open(path, "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["key", "source", "label", *preds])
            for i, r in enumerate(rows):
                wr.writerow([r["key"], r["source"], r["label"], *(repr(float(p[i])) for p in preds.values())])  # exact: rounding would tie ranks
        for name in preds:
            s = evaluate_scores(path, a.quality_set / "pairs.csv", column=name, by=("dataset",), part=None).summary
            o = s["overall"]
            out = {"weights": name, "pairs": s["n_pairs"], "sources": s["n_sources"]}
            out.update({k: _r4(o[k]) for k in ("srocc", "plcc", "krocc", "rmse")})
            out["srocc_ci95"] = [_r4(v) for v in o["ci95"]["srocc"]]
            out["srocc_by_dataset"] = {d: _r4(g["srocc"]) for d, g in s["groups"]["dataset"].items()}
            cams = [g["srocc"] for g in s["groups"]["dataset"].values() if g["srocc"] is not None and np.isfinite(g["srocc"])]
            out["srocc_camera_mean"] = _r4(float(np.mean(cams))) if cams else None  # the trainer's --select srocc_camera_mean
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
