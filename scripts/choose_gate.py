"""Measure fundus run's trust gate on a quality set, and choose its gain threshold on validation pairs.

An enhanced image is segmented instead of its input when ``score - score_input >= --min-gain`` (``score``: the scorer on
(enhanced, input); ``score_input``: on (input, input)). The quality set knows what the gate should decide:
each pair's label ``q(E)`` and its input's ``q(D)`` (``label`` and ``deg_label`` in pairs.csv). The figure of
merit is the mean label of what the gate delivers, ``q(E)`` where trusted and ``q(D)`` elsewhere; the
choice is the threshold on a grid (step ``--step`` in [-``--range``, ``--range``]) that maximises it on
the ``val`` split (held-out training sources), the smallest in magnitude among equals.

    python scripts/choose_gate.py sets/quality [--weights sdmp] [--enhancers model] [--split val] [--out FILE]

``--enhancers model`` (default) keeps the pairs of the learned enhancers (the kind ``fundus run``
applies); ``all`` keeps every enhancer but identity. ``--split test`` reports the figures of a threshold
given by ``--threshold`` (and of 0, never and always) on the test part, never choosing there. The scores
are the chain's own: ``predict_pair(..., identity=True)`` on the set's scoring frames, the five test-time
crops. One JSON document on stdout (and in ``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fundus_pipeline.errors import UsageError
from fundus_pipeline.quality.scoring import SCORE_SIZE
from fundus_pipeline.train.score import PairReader, predict_frames, read_pairs
from fundus_pipeline.train.score import gate_figures as score_gate_figures


def gate_figures(gain: np.ndarray, label: np.ndarray, deg: np.ndarray, t: float) -> dict:
    """What a gate at threshold ``t`` delivers over the pairs (``train.score.gate_figures``, the trainer's
    validation figures): the mean label, the share trusted, and how often it decides as the labels would
    (trust exactly when ``q(E) > q(D)``)."""
    g = score_gate_figures(gain, label, deg, t=t)
    return {"threshold": round(float(t), 6), "mean_delivered_label": g["gate"], "trusted": g["gate_trusted"], "decision_accuracy": g["gate_right"]}


def choose_threshold(gain: np.ndarray, label: np.ndarray, deg: np.ndarray, step: float, span: float) -> float:
    """The grid threshold with the largest mean delivered label; the smallest |t| among equals."""
    grid = np.round(np.arange(-span, span + step / 2, step), 6)
    best = max(grid, key=lambda t: (gate_figures(gain, label, deg, t)["mean_delivered_label"], -abs(float(t))))
    return float(best) + 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("quality_set", type=Path)
    ap.add_argument("--weights", default="sdmp", help="a shipped name, a weights file or a training checkpoint (with --arch)")
    ap.add_argument("--arch", default=None, help="the architecture of --weights when they are not in weights/manifest.json")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--enhancers", default="model", choices=("model", "all"))
    ap.add_argument("--threshold", type=float, default=None, help="with --split test: the threshold chosen on val")
    ap.add_argument("--step", type=float, default=0.001)
    ap.add_argument("--range", type=float, default=0.05, dest="span")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.split == "test" and a.threshold is None:
        raise UsageError("--split test reports a threshold chosen on val: give it with --threshold")
    if a.threads < 1 or a.step <= 0 or a.span < 0:
        raise UsageError("--threads must be at least 1, --step above 0 and --range at least 0")
    torch.set_num_threads(a.threads)
    from fundus_pipeline.models.weights import load_model

    rows = [r for r in read_pairs(a.quality_set, a.split) if r["enhancer"] != "identity" and (a.enhancers == "all" or r["enhancer_kind"] == "model")]
    if not rows:
        raise UsageError(f"{a.quality_set}/pairs.csv has no {a.split} pairs of {a.enhancers} enhancers")
    model, loaded = load_model(a.weights, arch=a.arch, task="quality")
    reader = PairReader(a.quality_set, SCORE_SIZE)
    score, own = predict_frames(model, (reader(r) for r in rows), "cpu", SCORE_SIZE, identity=True)  # the chain's protocol
    gain = score - own
    label = np.array([float(r["label"]) for r in rows])
    deg = np.array([float(r["deg_label"]) for r in rows])
    out = {
        "weights": a.weights, "sha256": loaded.sha256, "quality_set": str(a.quality_set), "split": a.split,
        "enhancers": sorted({r["enhancer"] for r in rows}), "pairs": len(rows), "sources": len({r["source"] for r in rows}),
        "labels_better_than_input": round(float((label > deg).mean()), 4),
        "never": round(float(deg.mean()), 5), "always": round(float(label.mean()), 5),
        "oracle": round(float(np.maximum(label, deg).mean()), 5),
        "at_0": gate_figures(gain, label, deg, 0.0),
    }  # fmt: skip
    if a.split == "val":
        t = choose_threshold(gain, label, deg, a.step, a.span)
        out["rule"] = f"the threshold on a grid (step {a.step:g} in [-{a.span:g}, {a.span:g}]) with the largest mean delivered label on val; the smallest |t| among equals"
        out["chosen"] = gate_figures(gain, label, deg, t)
    else:
        out["at_threshold"] = gate_figures(gain, label, deg, a.threshold)
    per = {}
    for name in out["enhancers"]:
        m = np.array([r["enhancer"] == name for r in rows])
        t = out.get("chosen", out.get("at_threshold"))["threshold"]
        per[name] = {"pairs": int(m.sum()), "at_0": gate_figures(gain[m], label[m], deg[m], 0.0), "at_threshold": gate_figures(gain[m], label[m], deg[m], t),
                     "never": round(float(deg[m].mean()), 5), "always": round(float(label[m].mean()), 5)}  # fmt: skip
    out["per_enhancer"] = per
    text = json.dumps(out, indent=1)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
