"""Score grading weights on the validation images of `fundus train grade` (the grade set's val split and
the EyePACS-256 val part): the trainer's macro F1 (and their mean, its checkpoint criterion), the recall of
each grade and the AUC of each flag on the set's val split, so that runs on different inputs (a 224 or a
448 grader) are compared on the same images, flag by flag. With two or more weights, each after the first
also gets the paired bootstrap (1,000 resamples, seed 0) of its macro F1 minus the first's (each part and their mean):
source photographs of the set and patients of EyePACS-256 resampled, the same draw for both weights.
Never the test parts.

    python scripts/validate_grade.py sets/grade512 weights/hemf_4k.pt:hemf runs/hemf448/best.pt:hemf_448

WEIGHTS: a shipped name (its architecture from the manifest) or FILE:ARCH. One JSON line each on stdout.
``--grey luma`` or ``--grey green``: every validation fundus photograph shown grey first, as a red-free
photograph (``train.grade.to_grey``; labels kept, not-fundus pictures as they are): how a grader treats grey
photographs, on the same labelled images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fundus_pipeline.datasets import default_data_root
from fundus_pipeline.evaluation.grade import auc_mann_whitney
from fundus_pipeline.models.weights import load_model
from fundus_pipeline.quality.grading import FLAGS, GRADES
from fundus_pipeline.train.grade import macro_f1, predict_logits, resize_square, to_grey, validation_items


def _model(spec: str) -> tuple[torch.nn.Module, str]:
    """The model in eval mode and its architecture, through the stages' checked loader."""
    path, arch = spec.rsplit(":", 1) if ":" in spec else (spec, None)
    model, loaded = load_model(path, arch=arch, task="grading")
    return model, arch or loaded.spec.arch


def _clusters(grade_set: Path, root: Path) -> dict[str, np.ndarray]:
    """Per validation image, in ``validation_items`` order, the unit a bootstrap resamples."""
    import csv

    from fundus_pipeline.datasets import eyepacs256_split

    with open(grade_set / "labels.csv", newline="") as f:
        sources = [r["source"] for r in csv.DictReader(f) if r["split"] == "val"]
    patients = [r["patient"] for r in eyepacs256_split(root) if r["split"] == "val"]
    return {k: np.unique(v, return_inverse=True)[1] for k, v in (("set", sources), ("real", patients))}


def paired_bootstrap(preds: list[dict[str, np.ndarray]], truth: dict[str, np.ndarray], clusters: dict[str, np.ndarray], n: int = 1000, seed: int = 0) -> list[dict]:
    """For each prediction set after the first, per validation part and for their mean (the trainer's
    criterion): the macro-F1 difference to the first, its 95% interval over cluster resamples (the same
    resample for all the weights) and the share of resamples where it is above 0."""
    rng = np.random.default_rng(seed)
    idx = {k: [np.flatnonzero(c == u) for u in range(c.max() + 1)] for k, c in clusters.items()}
    keys = [*truth, "mean"]
    diffs = np.zeros((n, len(preds) - 1, len(keys)))

    def scores(take: dict[str, np.ndarray]) -> np.ndarray:
        f = np.array([[macro_f1(truth[k][t], p[k][t]) for k, t in take.items()] for p in preds])
        return np.concatenate([f, f.mean(1, keepdims=True)], axis=1)  # weights x (parts..., mean)

    for b in range(n):
        s = scores({k: np.concatenate([groups[i] for i in rng.integers(len(groups), size=len(groups))]) for k, groups in idx.items()})
        diffs[b] = s[1:] - s[0]
    point = scores({k: np.arange(len(t)) for k, t in truth.items()})
    return [
        {key: {"difference": round(float(point[j + 1, i] - point[0, i]), 4), "ci95": [round(float(v), 4) for v in np.percentile(diffs[:, j, i], [2.5, 97.5])],
               "share_above_0": round(float((diffs[:, j, i] > 0).mean()), 3)} for i, key in enumerate(keys)}
        for j in range(len(preds) - 1)
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grade_set", type=Path)
    ap.add_argument("weights", nargs="+", help="a shipped name, or FILE:ARCH")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grey", choices=("none", "luma", "green"), default="none", help="show the fundus photographs grey (red-free)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = len(GRADES)
    root = a.data or default_data_root()
    all_preds: list[dict[str, np.ndarray]] = []
    truth: dict[str, np.ndarray] = {}
    read: dict[int, dict] = {}  # the validation images, read (and made grey) once per input size

    def items_at(size: int) -> dict:
        if size not in read:
            parts = validation_items(a.grade_set, root, size)
            if a.grey != "none":
                for items in parts.values():
                    for i in items:
                        if i.kind != "natural":
                            i.image = to_grey(i.image, green=a.grey == "green")
            read[size] = parts
        return read[size]

    for spec in a.weights:
        model, arch = _model(spec)
        size = int(model.input_size)
        parts = items_at(size)
        out: dict = {"weights": spec, "arch": arch, "input": size, "grey": a.grey}
        f1s, preds = [], {}
        for k, items in parts.items():
            with torch.no_grad():
                logits = predict_logits(model, [resize_square(i.image, size) for i in items], torch.device("cpu")).numpy()
            t = truth[k] = np.array([i.grade for i in items])
            pred = preds[k] = logits[:, :n].argmax(1)
            f1s.append(macro_f1(t, pred))
            out[f"{k}_macro_f1"] = round(f1s[-1], 4)
            out[f"{k}_accuracy"] = round(float((pred == t).mean()), 4)
            out[f"{k}_recall"] = {g: round(float((pred[t == c] == c).mean()), 3) if (t == c).any() else None for c, g in enumerate(GRADES)}
            if k == "set":
                flags = np.stack([i.flags for i in items])
                aucs = {f: auc_mann_whitney(logits[:, n + j], flags[:, j] > 0.5) for j, f in enumerate(FLAGS) if 0 < flags[:, j].sum() < len(items)}
                out["set_flag_auc"] = {f: round(float(v), 3) for f, v in aucs.items()}
                out["set_mean_flag_auc"] = round(float(np.mean(list(aucs.values()))), 4)
        out["macro_f1"] = round(float(np.mean(f1s)), 4)
        all_preds.append(preds)
        print(json.dumps(out), flush=True)
    if len(all_preds) > 1:
        for spec, d in zip(a.weights[1:], paired_bootstrap(all_preds, truth, _clusters(a.grade_set, root))):
            print(json.dumps({"weights": spec, "against": a.weights[0], "macro_f1_difference": d}), flush=True)


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
