"""Training of the no-reference grader (``fundus train grade``) on the shared loop.

Data (``GradeConfig``): the ``train`` split of a grade set (``fundus build grade-set``: clean and degraded
photographs of the training sources with their grade and flags, and the not-fundus pictures), and the
``train`` part of EyePACS-256 (real photographs with EyeQ grades, split by patient once,
``datasets.eyepacs256_split``). A sample is drawn from EyePACS-256 with probability ``--real-p``, from the
not-fundus pictures with ``--natural-p``, else from the set's photographs; then a random square crop
(side 80-100% of the image; 30-100% for not-fundus pictures, which are also squashed to square at random),
a flip and a rotation by a multiple of 90 degrees, resized to the model's input (area averaging). No colour
augmentation (colour and illumination are what the grader judges), except ``--grey-p``: a fundus photograph
shown grey, as a red-free photograph (its luminance or green channel), with its labels.

Loss: class-weighted cross-entropy on the grade (weights 1/sqrt(frequency) of the grades in the training
mixture, normalised to mean 1) plus the binary cross-entropy of the flags, averaged over the flags each
sample has ground truth for (EyePACS-256 photographs: only ``not_fundus`` = 0 is known).

Validation: the set's ``val`` split (held-out training sources and not-fundus pictures) and the EyePACS-256
``val`` part; best.pt by the mean of their macro F1. After training, a temperature T is fitted on the same
validation images (grade logits, minimum negative log-likelihood) and written to OUT/calibration.json;
the export records it in the weights' manifest entry, and ``fundus grade`` divides the logits by it.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fundus_pipeline.errors import UsageError
from fundus_pipeline.io import LUMA
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.quality.grading import FLAGS, GRADES
from fundus_pipeline.train.config import GradeConfig
from fundus_pipeline.train.loop import Batch, Task, fit

NOT_FUNDUS = FLAGS.index("not_fundus")


def read_u8(path: Path) -> np.ndarray:
    """An image file as uint8 RGB (16-bit and gray inputs converted as the stages convert them)."""
    from fundus_pipeline.evaluation.enhance import read_rgb

    return np.clip(np.rint(read_rgb(path) * 255), 0, 255).astype(np.uint8)


def resize_square(a: np.ndarray, size: int) -> np.ndarray:
    if a.shape[0] == size and a.shape[1] == size:
        return a
    shrink = a.shape[0] > size or a.shape[1] > size
    return cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class GradeItem:
    """One training or validation image: uint8 pixels, grade code, flag targets and which flags are known."""

    __slots__ = ("image", "grade", "flags", "known", "kind")

    def __init__(self, image: np.ndarray, grade: int, flags: np.ndarray, known: np.ndarray, kind: str):
        self.image, self.grade, self.flags, self.known, self.kind = image, grade, flags, known, kind


def set_items(grade_set: Path, split: str, size: int) -> list[GradeItem]:
    """The images of one split of a grade set (any part), kept at the set's stored side (``fundus build
    grade-set --store-size``), or enlarged to ``size`` where that is smaller, so crops are taken at the
    finest resolution the set has."""
    items = []
    for line, r in set_rows(grade_set, split):
        try:
            grade = int(r["quality"])
            flags = np.array([float(r[f"flag_{f}"]) for f in FLAGS], np.float32)
            if not 0 <= grade < len(GRADES) or not np.isin(flags, (0.0, 1.0)).all() or r["part"] in ("", ".", "..") or "/" in r["part"]:
                raise ValueError("out of range")
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{grade_set / 'labels.csv'} line {line}: not a grade set's row (quality 0-{len(GRADES) - 1}, flags 0 or 1; "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", "rebuild it with `fundus build grade-set`") from None
        img = read_u8(grade_set / r["part"] / "images" / f"{r['key']}.png")
        img = resize_square(img, max(size, img.shape[0]))
        items.append(GradeItem(img, grade, flags, np.ones(len(FLAGS), np.float32), r["kind"]))
    return items


def set_rows(grade_set: Path, split: str) -> list[tuple[int, dict]]:
    """(line number, row) of one split of a grade set's labels.csv (a file without the columns: UsageError)."""
    path = grade_set / "labels.csv"
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"key", "part", "split", "kind", "quality", *(f"flag_{f}" for f in FLAGS)}
        missing = sorted(need - set(reader.fieldnames or ()))
        if missing:
            raise UsageError(f"{path}: not a grade set's labels (no column {missing[0]!r})", "build one with `fundus build grade-set`")
        return [(n, r) for n, r in enumerate(reader, start=2) if r["split"] == split]


def eyepacs_items(root: Path, split: str, store: int) -> list[GradeItem]:
    """The EyePACS-256 photographs of one part: only the grade and ``not_fundus`` = 0 are known."""
    from fundus_pipeline.datasets import eyepacs256_split

    known = np.zeros(len(FLAGS), np.float32)
    known[NOT_FUNDUS] = 1.0
    return [
        GradeItem(resize_square(read_u8(root / "EyePACS-256" / "images" / r["image"]), store), r["quality"], np.zeros(len(FLAGS), np.float32), known, "real")
        for r in eyepacs256_split(root)
        if r["split"] == split
    ]


def validation_items(grade_set: Path, data_root: Path | None, size: int) -> dict[str, list[GradeItem]]:
    """The trainer's validation images for a model of input ``size``: the set's ``val`` split and, unless
    ``data_root`` is None, the EyePACS-256 ``val`` part (``scripts/validate_grade.py`` and
    ``scripts/choose_grade_bias.py`` read the same)."""
    if not (Path(grade_set) / "labels.csv").is_file():
        raise UsageError(f"{grade_set} is not a grade set (no labels.csv)", "build one with `fundus build grade-set`")
    return {
        "set": set_items(grade_set, "val", size),
        "real": eyepacs_items(data_root, "val", max(size, 256)) if data_root is not None else [],
    }


def augment(item: GradeItem, rng: np.random.Generator, size: int, grey_p: float = 0.0) -> np.ndarray:
    """A random square crop, flip and 90-degree rotation of ``item`` at ``size`` (float32 HxWx3 in [0, 1]);
    with probability ``grey_p`` a fundus photograph is then made grey (``to_grey``)."""
    a = item.image
    h, w = a.shape[:2]
    natural = item.kind == "natural"
    lo = 0.3 if natural else 0.8
    s = max(8, int(round(min(h, w) * rng.uniform(lo, 1.0))))
    y, x = int(rng.integers(h - s + 1)), int(rng.integers(w - s + 1))
    crop = a[y : y + s, x : x + s]
    if natural and rng.random() < 0.3:
        crop = a  # the whole picture squashed to a square
    crop = resize_square(crop, size)
    crop = np.rot90(crop, int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if grey_p > 0 and not natural and rng.random() < grey_p:  # no draw at all when off: earlier runs replay
        crop = to_grey(crop, green=bool(rng.random() < 0.5))
    return np.ascontiguousarray(crop).astype(np.float32) / 255.0


def to_grey(rgb: np.ndarray, green: bool) -> np.ndarray:
    """A uint8 RGB photograph as a red-free one: its green channel (``green``) or its BT.601 luminance, rounded,
    in all three channels (how a grey file reaches the grader)."""
    plane = rgb[..., 1] if green else np.rint(rgb.astype(np.float32) @ LUMA).clip(0, 255).astype(np.uint8)
    return np.repeat(plane[..., None], 3, axis=2)


class GradeSampler:
    def __init__(self, groups: dict[str, list[GradeItem]], probs: dict[str, float], cfg: GradeConfig, size: int):
        self.groups = {k: v for k, v in groups.items() if v}
        p = np.array([probs[k] for k in self.groups], np.float64)
        self.names, self.p = list(self.groups), p / p.sum()
        self.cfg, self.size = cfg, size

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.cfg.seed, step])
        xs, gs, fs, ks = [], [], [], []
        for _ in range(self.cfg.batch_size):
            group = self.groups[self.names[int(rng.choice(len(self.names), p=self.p))]]
            item = group[int(rng.integers(len(group)))]
            xs.append(augment(item, rng, self.size, self.cfg.grey_p))
            gs.append(item.grade)
            fs.append(item.flags)
            ks.append(item.known)
        x = torch.from_numpy(np.stack(xs).transpose(0, 3, 1, 2).copy())
        return x, torch.tensor(gs, dtype=torch.long), torch.from_numpy(np.stack(fs)), torch.from_numpy(np.stack(ks))


def grade_loss(logits: torch.Tensor, grade: torch.Tensor, flags: torch.Tensor, known: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Class-weighted cross-entropy on the grade plus the flag BCE over the known flags."""
    n = len(GRADES)
    ce = F.cross_entropy(logits[:, :n], grade, weight=weights.to(logits.device))
    bce = F.binary_cross_entropy_with_logits(logits[:, n:], flags, reduction="none")
    return ce + (bce * known).sum() / known.sum().clamp_min(1.0)


def macro_f1(truth: np.ndarray, pred: np.ndarray, n: int = len(GRADES)) -> float:
    """Mean F1 over the classes present in truth or prediction."""
    f1s = []
    for c in range(n):
        tp = int(((pred == c) & (truth == c)).sum())
        fp = int(((pred == c) & (truth != c)).sum())
        fn = int(((pred != c) & (truth == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else 0.0


def predict_logits(model: nn.Module, images: list[np.ndarray], device: torch.device, batch: int = 32) -> torch.Tensor:
    """Model logits (float32, CPU) of uint8 images already at the model's input size."""
    out = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack(images[i : i + batch]).transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
        out.append(model(x.to(device)).float().cpu())
    return torch.cat(out)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of softmax(logits / T) (golden-section
    search on log T in [-3, 3])."""
    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / float(np.exp(log_t)), labels))

    a, b = -3.0, 3.0
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    for _ in range(80):
        if nll(c) < nll(d):
            b = d
        else:
            a = c
        c, d = b - g * (b - a), a + g * (b - a)
    return float(np.exp((a + b) / 2))


def log_probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Row-wise log-softmax of ``logits / temperature``."""
    z = logits / temperature
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def choose_decision_bias(parts: dict[str, tuple[np.ndarray, np.ndarray]], step: float = 0.1, span: float = 2.0) -> dict:
    """The grade offsets (good's 0; usable's and reject's on a grid of ``step`` in [-span, span]) that maximise
    the mean macro F1 over ``parts`` (name -> (log-probabilities N x 3, true grades N)), the smallest (L1)
    among equals; zeros when nothing beats them. Returns the choice, the rule and the figures before and after
    (``scripts/choose_grade_bias.py`` adds the inputs)."""
    grid = np.round(np.arange(-span, span + step / 2, step), 6)

    def figures(bias: np.ndarray) -> dict[str, float]:
        pred = {k: (lp + bias).argmax(1) for k, (lp, _) in parts.items()}
        f1 = {k: macro_f1(t, pred[k]) for k, (_, t) in parts.items()}
        acc = {k: float((pred[k] == t).mean()) for k, (_, t) in parts.items()}
        return {"mean_macro_f1": float(np.mean(list(f1.values()))), **{f"{k}_macro_f1": v for k, v in f1.items()}, **{f"{k}_accuracy": v for k, v in acc.items()}}

    zero = np.zeros(len(GRADES))
    best, best_key = zero, (figures(zero)["mean_macro_f1"], 0.0)
    for bu in grid:
        for br in grid:
            bias = np.array([0.0, bu, br])
            key = (figures(bias)["mean_macro_f1"], -float(np.abs(bias).sum()))
            if key > best_key:
                best, best_key = bias, key
    r4 = lambda d: {k: round(v, 4) for k, v in d.items()}  # noqa: E731
    return {
        "choice": [float(x) + 0.0 for x in best],  # + 0.0: no -0.0 in the record
        "rule": f"argmax over a grid (step {step:g}, offsets in [-{span:g}, {span:g}], good's 0) of the mean macro F1 over the validation parts ({', '.join(parts)}); the smallest offsets among equals",
        "means": {"before": r4(figures(zero)), "after": r4(figures(best))},
    }


class GradeTask(Task):
    """HEMF (or an ablation, or the CNN baseline) on the grade set and EyePACS-256; best.pt by validation macro F1."""

    name = "grade"
    score_key = "macro_f1"
    cfg: GradeConfig

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg.arch)
        self.size = int(model.input_size)
        return model

    def setup(self, log: Callable[[str], None]) -> None:
        cfg = self.cfg
        size = self.size  # set by build_model, which the loop calls first
        store = max(size, 256)  # EyePACS-256's photographs, at least the model's input
        synth = set_items(cfg.grade_set, "train", size)
        if not synth:  # (its test part, say): the grader would learn from EyePACS-256 alone, or not at all
            raise UsageError(f"{cfg.grade_set}/labels.csv has no train rows; build the set with its train part "
                             "(`fundus build grade-set --parts train,...`)")
        groups = {
            "set": [i for i in synth if i.kind != "natural"],
            "natural": [i for i in synth if i.kind == "natural"],
            "real": eyepacs_items(cfg.data_root, "train", store) if cfg.real_p > 0 else [],
        }
        probs = {"set": 1.0 - cfg.real_p - cfg.natural_p, "natural": cfg.natural_p, "real": cfg.real_p}
        self.sampler = GradeSampler(groups, probs, cfg, size)
        # class weights from the training mixture: 1/sqrt(frequency), mean 1
        freq = np.zeros(len(GRADES))
        for k, items in self.sampler.groups.items():
            counts = np.bincount([i.grade for i in items], minlength=len(GRADES)) / len(items)
            freq += probs[k] / sum(probs[n] for n in self.sampler.groups) * counts
        w = 1.0 / np.sqrt(np.maximum(freq, 1e-3))
        self.class_weights = torch.tensor(w / w.mean(), dtype=torch.float32)
        log(
            f"grade: {len(groups['set'])} set photographs, {len(groups['natural'])} not-fundus pictures, {len(groups['real'])} "
            f"EyePACS-256 photographs; mixture grades {np.round(freq, 3).tolist()}, class weights {np.round(w / w.mean(), 3).tolist()}"
        )
        self.val = validation_items(cfg.grade_set, cfg.data_root if cfg.real_p > 0 else None, size)
        self.val_images = {k: [resize_square(i.image, size) for i in v] for k, v in self.val.items()}
        log(f"grade validation: {len(self.val['set'])} set images, {len(self.val['real'])} EyePACS-256 photographs")

    def forward(self, model: nn.Module, batch: Batch):
        return model(batch[0])

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        return grade_loss(out, batch[1], batch[2], batch[3], self.class_weights)

    def val_logits(self, model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
        return {k: predict_logits(model, v, device) for k, v in self.val_images.items() if v}

    def validate(self, model: nn.Module, device: torch.device) -> dict:
        n = len(GRADES)
        res, f1s = {}, []
        for k, logits in self.val_logits(model, device).items():
            truth = np.array([i.grade for i in self.val[k]])
            pred = logits[:, :n].argmax(1).numpy()
            f1 = macro_f1(truth, pred)
            f1s.append(f1)
            res[f"{k}_macro_f1"] = round(f1, 4)
            res[f"{k}_accuracy"] = round(float((pred == truth).mean()), 4)
            if k == "set":
                flags = torch.from_numpy(np.stack([i.flags for i in self.val[k]]))
                res["set_flag_accuracy"] = round(float(((logits[:, n:] > 0).float() == flags).float().mean()), 4)
        return {"macro_f1": round(float(np.mean(f1s)), 4), **res}

    def summary(self) -> dict:
        return {**super().summary(), "grades": list(GRADES), "flags": list(FLAGS)}


def calibrate(task: GradeTask, out: Path, device: str = "cpu") -> dict:
    """Fit the temperature of OUT/best.pt on the validation images; writes and returns OUT/calibration.json."""
    model = build_model(task.cfg.arch)
    model.load_state_dict(torch.load(out / "best.pt", map_location="cpu", weights_only=True))
    model.to(device).eval()
    n = len(GRADES)
    with torch.no_grad():
        parts = task.val_logits(model, torch.device(device))
    logits = torch.cat([p[:, :n] for p in parts.values()])
    labels = torch.tensor([i.grade for k in parts for i in task.val[k]])
    t = fit_temperature(logits, labels)
    rec = {
        "temperature": round(t, 5),
        "fitted_on": {k: len(v) for k, v in parts.items()},
        "nll_before": round(float(F.cross_entropy(logits, labels)), 5),
        "nll_after": round(float(F.cross_entropy(logits / t, labels)), 5),
    }
    from fundus_pipeline.io import write_bytes_atomic

    write_bytes_atomic(out / "calibration.json", (json.dumps(rec, indent=2) + "\n").encode())
    return rec


def train_grade(cfg: GradeConfig) -> dict:
    task = GradeTask(cfg)
    summary = fit(task, cfg)
    from fundus_pipeline.device import resolve_device

    try:
        rec = calibrate(task, cfg.out, device=str(resolve_device(cfg.device)))  # on the training device
    except KeyboardInterrupt:  # train.log had ended with "done:" (campaign 30a L2)
        from fundus_pipeline.train.loop import _RunLog

        log = _RunLog(cfg.out / "train.log")
        log("interrupted while fitting the temperature: calibration.json not written; `--resume` fits it again")
        log.close()
        raise
    print(f"temperature {rec['temperature']} (validation NLL {rec['nll_before']} -> {rec['nll_after']})")
    return summary


# --------------------------------------------------------------------------------------- weights export
def grade_description(config: dict, calibration: dict | None = None) -> Callable[[nn.Module], dict]:
    """The manifest fields of grading weights, from the run's recorded config and calibration."""
    from fundus_pipeline.quality.grading import GRADE_RULE

    def describe(model: nn.Module) -> dict:
        size = int(model.input_size)
        return {
            "input": {
                "channels": 3,
                "color": "rgb",
                "value_range": [0, 1],
                "normalisation": "none outside the network (RGB divided by the bit depth's maximum)",
                "size_divisor": int(model.size_divisor),
                "scale_policy": {
                    "type": "canonical_frame",
                    "size": size,
                    "rule": "the FOV's bounding square (0 outside the FOV) resized to size x size with area averaging; without a field of view, the whole image squashed to size x size",
                },
            },
            "output": {
                "kind": "grade",
                "grades": list(GRADES),
                "flags": list(FLAGS),
                "temperature": (calibration or {}).get("temperature", 1.0),
                "grade_rule": GRADE_RULE,
            },
            "training": {
                "data": f"grade set {Path(config['grade_set']).name} train split (DRIVE 21-36, HRF 01-04, HEI-MED 152 sources, clean and degraded; scikit-image not-fundus pictures) and EyePACS-256 train part (real_p {config['real_p']})",
                "validation": "the grade set's val split (DRIVE 37-40, HRF 05_*, every 10th HEI-MED source; rocket, grass) and the EyePACS-256 val part; best checkpoint by mean macro F1; temperature fitted there",
                "test_never_used": "the grade set's test part (DRIVE 01-20, HRF 06-15; astronaut, coffee, brick, coins, hubble_deep_field) and the EyePACS-256 test part",
            },
        }

    return describe


__all__ = ["GradeTask", "calibrate", "choose_decision_bias", "fit_temperature", "log_probabilities", "grade_description", "train_grade"]
