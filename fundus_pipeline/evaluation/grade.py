"""``fundus evaluate grade``: agreement of predicted quality grades (``fundus grade``) with quality labels.

Inputs: a results CSV (``fundus grade``'s ``results.csv``: ``key``, ``grade`` (good / usable / reject),
``p_good``, ``p_usable``, ``p_reject`` (temperature-calibrated probabilities), ``temperature`` (the fitted
T > 0), one ``p_<flag>`` per flag of :data:`fundus_pipeline.quality.grading.FLAGS`, optionally the runner's
``status`` and ``error``; other columns are ignored) and a labels file, either

* EyeQ's format as published (``image,quality[,DR_grade]``, with or without the leading unnamed index
  column): key = the image file name without its extension (``10028_left.jpeg`` -> ``10028_left``); or
* a keyed file (``key``, ``quality``; optionally ``flag_<name>`` 0/1 ground truth per flag, ``source``
  (the source photograph: the bootstrap cluster) and grouping columns such as ``family``).

Quality codes follow EyeQ: 0 good, 1 usable, 2 reject.

Join (exactly on ``key``, as ``evaluate score``), in this order for every results row: a key absent from
the labels file is a problem (``not in labels``); a row whose ``status`` is not ``ok`` is a problem
(``status error: ...``); an unknown grade, an empty, non-numeric, non-finite or out-of-range probability
(or flag probability of an evaluated flag), probabilities that do not sum to 1 (within 0.01) or a
temperature that is not a positive number is a problem; the rest are graded. Label rows without a results
row are only counted (``n_labels_not_graded``, one note). No results key in the labels, a missing column,
a bad label value or an unreadable file is a ``UsageError``.

Metrics (overall and per group of each ``by`` column), exact definitions in :data:`DEFINITIONS`: accuracy,
macro F1, quadratic-weighted kappa, per-class precision / recall / F1, the confusion matrix, the predicted
class fractions, flag ROC AUCs and their mean, ECE and NLL before and after temperature scaling; 95% CIs
from a cluster bootstrap (source photograph, else patient for EyeQ keys, else image).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from scipy import sparse, special

from fundus_pipeline.errors import UsageError
from fundus_pipeline.evaluation.metrics import (
    _percentile_ci,
    auc_roc_from_hist,
    blank_single_cluster_cis,
    json_safe,
    one_cluster_note,
)
from fundus_pipeline.evaluation.score import _float, _read_csv, read_csv_rows, source_bootstrap
from fundus_pipeline.evaluation.segment import EvalResult, _num, markdown_table, metrics_csv, text_table, write_reports
from fundus_pipeline.quality.grading import FLAGS, GRADES

N_BINS = 15  # ECE bins of equal width on [0, 1]
P_FLOOR = 1e-12  # probabilities are floored here (a rounded 0 would make the NLL infinite)
SUM_TOL = 0.01  # |p_good + p_usable + p_reject - 1| above this: a problem row
CI_KEYS = ("accuracy", "macro_f1", "kappa", "mean_flag_auc", "ece_after")
PROB_COLUMNS = tuple(f"p_{g}" for g in GRADES)
OVERALL = "all"
_EYEQ_KEY = re.compile(r"^(\d+)_(?:left|right)$")
_CHUNK_CELLS = 4_000_000  # bootstrap weights per chunk (resamples x images)

DEFINITIONS = {
    "classes": "quality grades in EyeQ order: 0 good, 1 usable, 2 reject. The truth is the labels' quality "
    "code; the prediction is the results' grade column.",
    "join": "results and labels rows are matched exactly on key (EyeQ labels: key = the image file name "
    "without its extension, 10028_left.jpeg -> 10028_left).",
    "confusion": "counts of images, rows = truth (good, usable, reject), columns = prediction (same order).",
    "accuracy": "fraction of graded images whose predicted grade is the truth (trace / n).",
    "precision": "per class k: TP_k / (images predicted k); n/a when no image is predicted k.",
    "recall": "per class k: TP_k / (images of truth k); n/a when k is absent from the truth.",
    "f1": "per class k: 2 TP_k / (2 TP_k + FP_k + FN_k) (= the harmonic mean of precision and recall when "
    "both are defined); n/a when k is neither in the truth nor in the prediction, 0 when it is in only one.",
    "macro_f1": "mean of the per-class F1 over the classes present in the truth or in the prediction (a class "
    "in neither is left out, so an all-good set predicted all good scores 1); equals sklearn f1_score("
    "average='macro') with its default labels (the union of truth and prediction) and zero_division=0.",
    "kappa": "Cohen's quadratic-weighted kappa: weights w_ij = (i - j)^2 / 4 on the grade codes, O = the "
    "confusion matrix, E = outer(truth counts, predicted counts) / n, kappa = 1 - sum(w O) / sum(w E) (as "
    "sklearn cohen_kappa_score(weights='quadratic')). It is 0 whenever exactly one of truth and prediction "
    "is a single class (e.g. an all-good set with some images predicted usable) and n/a (0/0) when both are "
    "the same single class: use accuracy and pred_* for one-class sets.",
    "pred_good, pred_usable, pred_reject": "fraction of graded images predicted good / usable / reject (for a "
    "set that is all one class: its fit rate, e.g. pred_good of an all-good set).",
    "flag_auc": "per flag with a flag_<name> column in the labels and a p_<name> column in the results: ROC "
    "AUC of p_<name> for flag_<name> = 1 against 0, as the Mann-Whitney statistic: the fraction of "
    "(positive, negative) image pairs where the positive scores higher, ties counting 1/2 (= sklearn "
    "roc_auc_score); n/a in a set without both positives and negatives.",
    "mean_flag_auc": "mean of the flag AUCs defined in the set (n_flags_auc of them); in a bootstrap resample "
    "the mean over the same flags, the resample skipped when one of them lacks positives or negatives there.",
    "probabilities": "p = (p_good, p_usable, p_reject) as written (temperature-calibrated, p = softmax(z / T)), "
    "floored at 1e-12 and divided by their sum. The uncalibrated probabilities are recovered as q = "
    "softmax(T ln p) (= softmax(z), exact up to the 6 decimals `fundus grade` writes), with T the row's "
    "temperature; without a temperature column the 'before' metrics are n/a. A probability below 5e-7 is "
    "written as 0 and floored here, so that image's NLL term reads 27.6 where it would be at least 14.5.",
    "ece": "expected calibration error on the confidence c = max_k of the probabilities: 15 bins of width "
    "1/15, (lower, upper] (edges numpy.linspace(0, 1, 16); c = 0 goes to the first); ECE = sum over bins of "
    "(n_b / n) |acc_b - conf_b|, acc_b the fraction of the bin's images whose most probable class (the "
    "first on ties) is the truth, conf_b their mean confidence. The grade column is not used here (it may "
    "apply a decision rule). ece_before on q (uncalibrated), ece_after on p (temperature-scaled).",
    "nll": "mean of -ln(probability of the true class); nll_before on q, nll_after on p.",
    "bootstrap": "cluster bootstrap: the clusters are the labels' source column when present (the source "
    "photograph; an empty source is its image alone), else the patient for EyeQ keys NNNN_left / "
    "NNNN_right (both eyes of patient NNNN together; other keys alone), else the image. Each resample "
    "draws the C clusters of the graded images uniformly with replacement (numpy default_rng(seed)."
    "multinomial(C, 1/C)) and takes every image of a cluster as many times as it was drawn; a group's "
    "resample is its images in the same resamples, skipped when it has none. CIs for accuracy, macro_f1, "
    "kappa, mean_flag_auc and ece_after: the 2.5th and 97.5th percentiles of the finite resample values "
    "(numpy.percentile, linear interpolation). ECE, a sum of absolute per-bin gaps, is biased upward under "
    "resampling: its point estimate lies near the lower end of its interval (in this project's grade "
    "benchmarks at the 10th-15th percentile of the resamples, the interval shifted up by about 0.015-0.02; "
    "read from those runs' resamples, not kept), so read ece_after's CI as wider above than the uncertainty is.",
}


# --------------------------------------------------------------------------------------------- metrics
def uncalibrated_probabilities(p: np.ndarray, temperature: np.ndarray | float) -> np.ndarray:
    """``softmax(T ln p)`` row-wise: the probabilities before temperature scaling, exactly for unrounded p (for
    p = softmax(z / T), T ln p = z - T logsumexp(z / T), a constant shift of z)."""
    p = np.asarray(p, np.float64)
    t = np.broadcast_to(np.asarray(temperature, np.float64), p.shape[:-1])[..., None]
    return np.exp(special.log_softmax(t * np.log(p), axis=-1))


def class_scores(cm: np.ndarray) -> dict[str, np.ndarray]:
    """``accuracy``, per-class ``precision``, ``recall``, ``f1`` and ``macro_f1`` of a K x K confusion
    matrix (rows truth, columns prediction) or a stack (..., K, K) of them; see :data:`DEFINITIONS`."""
    cm = np.asarray(cm, np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    truth, pred = cm.sum(-1), cm.sum(-2)
    n = truth.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pred > 0, tp / pred, np.nan)
        recall = np.where(truth > 0, tp / truth, np.nan)
        f1 = np.where(truth + pred > 0, 2 * tp / (truth + pred), np.nan)  # 2TP / (2TP + FP + FN)
        present = np.isfinite(f1)
        macro = np.where(present.any(-1), np.where(present, f1, 0.0).sum(-1) / present.sum(-1), np.nan)
        accuracy = np.where(n > 0, tp.sum(-1) / n, np.nan)
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "macro_f1": macro}


def quadratic_kappa(cm: np.ndarray) -> np.ndarray | float:
    """Cohen's quadratic-weighted kappa of a K x K confusion matrix (rows truth) or a stack of them;
    NaN when the expected weighted disagreement is 0."""
    cm = np.asarray(cm, np.float64)
    k = cm.shape[-1]
    i = np.arange(k)
    w = (i[:, None] - i[None, :]) ** 2 / (k - 1) ** 2
    n = cm.sum((-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = cm.sum(-1)[..., :, None] * cm.sum(-2)[..., None, :] / n[..., None, None]
        num, den = (w * cm).sum((-2, -1)), (w * expected).sum((-2, -1))
        kappa = np.where(den > 0, 1.0 - num / den, np.nan)
    return float(kappa) if kappa.ndim == 0 else kappa


def _conf_bins(conf: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin index of each confidence: bins (lower, upper] on numpy.linspace(0, 1, n_bins + 1), 0 in the first."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)


def _onehot(idx: np.ndarray, k: int, values: np.ndarray | None = None) -> sparse.csr_matrix:
    """n x k sparse matrix with ``values`` (default 1) at (i, idx[i])."""
    n = len(idx)
    data = np.ones(n) if values is None else np.asarray(values, np.float64)
    return sparse.csr_matrix((data, (np.arange(n), np.asarray(idx, np.int64))), shape=(n, k))


def _wsum(w: np.ndarray, s: sparse.csr_matrix) -> np.ndarray:
    """Weights (c x n) times a sparse n x k matrix: c x k (scipy's sequential sparse product: the same
    bytes whatever the BLAS threading)."""
    return np.ascontiguousarray(np.asarray(s.T @ w.T).T)


def _calibration_matrix(probs: np.ndarray, truth: np.ndarray, n_bins: int = N_BINS) -> sparse.csr_matrix:
    """n x bins: (correct - confidence) of each image in its confidence bin."""
    conf = probs.max(-1)
    correct = (probs.argmax(-1) == truth).astype(np.float64)
    return _onehot(_conf_bins(conf, n_bins), n_bins, correct - conf)


def _ece(w: np.ndarray, cal: sparse.csr_matrix) -> np.ndarray:
    """ECE per row of weights: sum_b |sum_{i in b} w_i (correct_i - conf_i)| / sum_i w_i."""
    total = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, np.abs(_wsum(w, cal)).sum(1) / total, np.nan)


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE of class probabilities (n x K) against the true class indices; see :data:`DEFINITIONS`."""
    probs = np.asarray(probs, np.float64)
    return float(_ece(np.ones((1, len(probs))), _calibration_matrix(probs, np.asarray(truth), n_bins))[0])


def _auc_matrices(scores: np.ndarray, positive: np.ndarray) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """n x L positive / negative indicators over the L distinct score levels (exact ties)."""
    levels, lev = np.unique(np.asarray(scores, np.float64), return_inverse=True)
    pos = np.asarray(positive, np.float64)
    return _onehot(lev, len(levels), pos), _onehot(lev, len(levels), 1.0 - pos)


def _auc(w: np.ndarray, mats: tuple[sparse.csr_matrix, sparse.csr_matrix]) -> np.ndarray:
    return np.atleast_1d(auc_roc_from_hist(_wsum(w, mats[0]), _wsum(w, mats[1])))


def auc_mann_whitney(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC: P(score of a positive > score of a negative) + P(tie) / 2; NaN without both classes."""
    mats = _auc_matrices(scores, positive)
    return float(_auc(np.ones((1, len(scores))), mats)[0])


def nll(probs: np.ndarray, truth: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    probs = np.asarray(probs, np.float64)
    return float(-np.mean(np.log(probs[np.arange(len(probs)), np.asarray(truth)])))


def cluster_ids(keys: Sequence[str], sources: Sequence[str] | None = None) -> tuple[np.ndarray, str]:
    """Bootstrap cluster code (0..C-1) of each image and the unit's name: the ``sources`` when given
    (an empty source: the image alone), else the patient of EyeQ keys ``NNNN_left`` / ``NNNN_right``
    (other keys alone), else the image."""
    if sources is not None:
        ids = [f"source:{s}" if s else f"image:{k}" for k, s in zip(keys, sources)]
        unit = "source photograph"
    else:
        matches = [_EYEQ_KEY.match(k) for k in keys]
        ids = [f"patient:{m.group(1)}" if m else f"image:{k}" for k, m in zip(keys, matches)]
        unit = "patient" if any(matches) else "image"
    _, codes = np.unique(np.array(ids, dtype=str), return_inverse=True)
    return codes.astype(np.int64).ravel(), unit


# --------------------------------------------------------------------------------------------- one set
@dataclass
class _Design:
    """The graded images as sparse indicator matrices, so every metric is a weighted sum (the point
    estimate: weights 1; a bootstrap resample: the draw count of each image's cluster)."""

    truth: np.ndarray
    cell: sparse.csr_matrix  # n x 9: truth * 3 + prediction
    cal_after: sparse.csr_matrix
    cal_before: sparse.csr_matrix | None
    nll_after: np.ndarray  # per image -ln p(true class)
    nll_before: np.ndarray | None
    flags: dict[str, tuple[np.ndarray, tuple[sparse.csr_matrix, sparse.csr_matrix]]]  # flag: (labels, matrices)

    @classmethod
    def build(cls, truth, pred, p, temperature, flag_data) -> _Design:
        rows = np.arange(len(truth))
        q = uncalibrated_probabilities(p, temperature) if temperature is not None else None
        return cls(
            truth=truth,
            cell=_onehot(truth * 3 + pred, 9),
            cal_after=_calibration_matrix(p, truth),
            cal_before=_calibration_matrix(q, truth) if q is not None else None,
            nll_after=-np.log(p[rows, truth]),
            nll_before=-np.log(q[rows, truth]) if q is not None else None,
            flags={f: (y, _auc_matrices(s, y)) for f, (s, y) in flag_data.items()},
        )

    def sub(self, idx: np.ndarray) -> _Design:
        flags = {f: (y[idx], (m[0][idx], m[1][idx])) for f, (y, m) in self.flags.items()}
        return _Design(
            self.truth[idx], self.cell[idx], self.cal_after[idx],
            self.cal_before[idx] if self.cal_before is not None else None,
            self.nll_after[idx], self.nll_before[idx] if self.nll_before is not None else None, flags,
        )  # fmt: skip


def _set_entry(d: _Design) -> dict[str, Any]:
    """The point metrics of one set (see :data:`DEFINITIONS`)."""
    n = len(d.truth)
    w = np.ones((1, n))
    cm = _wsum(w, d.cell).reshape(3, 3)
    cs = class_scores(cm)
    aucs = {f: float(_auc(w, m)[0]) for f, (_, m) in d.flags.items()}
    defined = [a for a in aucs.values() if math.isfinite(a)]
    support = cm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):  # n = 0 (nothing graded): NaN
        fractions = cm.sum(0) / n
    return {
        "n": n,
        "accuracy": float(cs["accuracy"]),
        "macro_f1": float(cs["macro_f1"]),
        "kappa": quadratic_kappa(cm),
        "mean_flag_auc": float(np.mean(defined)) if defined else math.nan,
        "n_flags_auc": len(defined),
        "ece_before": float(_ece(w, d.cal_before)[0]) if d.cal_before is not None else math.nan,
        "ece_after": float(_ece(w, d.cal_after)[0]),
        "nll_before": float(d.nll_before.mean()) if d.nll_before is not None and n else math.nan,
        "nll_after": float(d.nll_after.mean()) if n else math.nan,
        **{f"pred_{g}": float(fractions[k]) for k, g in enumerate(GRADES)},
        "support": {g: int(support[k]) for k, g in enumerate(GRADES)},
        "precision": {g: float(cs["precision"][k]) for k, g in enumerate(GRADES)},
        "recall": {g: float(cs["recall"][k]) for k, g in enumerate(GRADES)},
        "f1": {g: float(cs["f1"][k]) for k, g in enumerate(GRADES)},
        "classes_absent_from_truth": [g for k, g in enumerate(GRADES) if support[k] == 0],
        "auc": aucs,
        "confusion": cm.astype(np.int64).tolist(),
    }


def _resample_values(w: np.ndarray, d: _Design, auc_flags: Sequence[str]) -> np.ndarray:
    """c x len(CI_KEYS): the CI metrics for each row of weights (NaN for an empty resample)."""
    cm = _wsum(w, d.cell).reshape(-1, 3, 3)
    cs = class_scores(cm)
    if auc_flags:
        mean_auc = np.mean(np.stack([_auc(w, d.flags[f][1]) for f in auc_flags]), axis=0)  # NaN if one is
    else:
        mean_auc = np.full(len(w), np.nan)
    return np.stack([cs["accuracy"], cs["macro_f1"], quadratic_kappa(cm), mean_auc, _ece(w, d.cal_after)], axis=1)


def bootstrap_cis(
    design: _Design, codes: np.ndarray, sets: Sequence[tuple[np.ndarray, Sequence[str]]], n_boot: int, seed: int
) -> list[dict[str, list[float | None]]]:
    """Cluster-bootstrap 95% CIs of :data:`CI_KEYS` for each ``(image indices, flags with a defined AUC)``
    of ``sets``, all from the same resamples (``codes``: the cluster of each image, 0..C-1)."""
    counts = source_bootstrap(int(codes.max()) + 1, n_boot, seed)
    out = []
    for idx, auc_flags in sets:
        d = design.sub(idx)
        step = max(1, _CHUNK_CELLS // max(len(idx), 1))
        vals = np.concatenate(
            [_resample_values(counts[b : b + step][:, codes[idx]].astype(np.float64), d, auc_flags) for b in range(0, n_boot, step)]
        )
        out.append({k: _percentile_ci(vals[:, j]) for j, k in enumerate(CI_KEYS)})
    return out


# --------------------------------------------------------------------------------------------- reading
def read_labels(path: Path, by: Sequence[str] = ()) -> tuple[dict[str, dict[str, str]], str, list[str]]:
    """Label rows by key, the format (``keyed`` or ``eyeq``) and the columns; ``UsageError`` for an
    unreadable file, a missing column (``key`` or EyeQ's ``image``, ``quality``, ``by``) or a repeated key."""
    what = "labels file"
    rows, columns = read_csv_rows(path, what)
    fmt = "keyed" if "key" in columns else "eyeq" if "image" in columns else None
    missing = ([] if fmt else ["key"]) + [c for c in ["quality", *by] if c not in columns]
    if missing:
        have = ", ".join(repr(c) if not c else c for c in columns) if columns else "none"
        hint = " (or EyeQ's 'image')" if not fmt else ""
        raise UsageError(f"the {what} {path} has no column {', '.join(map(repr, missing))}{hint} (columns: {have})")
    out: dict[str, dict[str, str]] = {}
    for r in rows:
        k = r["key"] if fmt == "keyed" else PurePosixPath((r["image"] or "").replace("\\", "/")).stem
        if k in out:
            raise UsageError(f"the {what} {path} has key '{k}' twice")
        out[k] = r
    return out, fmt, columns


def _label_code(v: str | None, allowed: Sequence[int]) -> int | None:
    f = _float(v)
    return int(f) if f is not None and f == int(f) and int(f) in allowed else None


def _prob_problem(row: dict[str, str], column: str) -> str | None:
    raw = (row.get(column) or "").strip()
    if not raw:
        return f"empty {column}"
    f = _float(raw)
    if f is None:
        return f"{column} {raw!r} is not a finite number"
    if not 0.0 <= f <= 1.0:
        return f"{column} {raw} is outside [0, 1]"
    return None


def _grade_problem(row: dict[str, str], flag_columns: Sequence[str], with_temperature: bool) -> str | None:
    """Why a results row cannot be graded, or None."""
    status = (row.get("status") or "ok").strip()
    if status != "ok":
        err = (row.get("error") or "").strip()
        return f"status {status}" + (f": {err}" if err else "")
    grade = (row.get("grade") or "").strip()
    if grade not in GRADES:
        return f"grade {grade!r} is not {', '.join(GRADES[:-1])} or {GRADES[-1]}"
    for c in (*PROB_COLUMNS, *flag_columns):
        if (why := _prob_problem(row, c)) is not None:
            return why
    total = sum(float(row[c]) for c in PROB_COLUMNS)
    if abs(total - 1.0) > SUM_TOL:
        return f"{' + '.join(PROB_COLUMNS)} = {total:.6g} (not 1)"
    if with_temperature:
        raw = (row.get("temperature") or "").strip()
        t = _float(raw)
        if t is None or t <= 0:
            return f"temperature {raw!r} is not a positive number"
    return None


# --------------------------------------------------------------------------------------------- evaluation
def evaluate_grades(
    results_csv: Path, labels_csv: Path, *, by: Sequence[str] = (), n_boot: int = 1000, seed: int = 0
) -> EvalResult:
    """Join, grade and summarise (rules in the module docstring). ``rows`` of the result are the
    metrics.csv rows: the whole set (group_by ``all``), then each group of each ``by`` column."""
    from fundus_pipeline.runner import refuse_while_written

    results_csv, labels_csv = Path(results_csv), Path(labels_csv)
    refuse_while_written(results_csv.parent, "the folder of the results file")
    by = list(dict.fromkeys(by))
    labels, fmt, label_columns = read_labels(labels_csv, by)
    results = _read_csv(results_csv, "results file", ["key", "grade", *PROB_COLUMNS])
    if not results:
        raise UsageError(f"the results file {results_csv} has no rows")
    if not labels:
        raise UsageError(f"the labels file {labels_csv} has no rows")
    if not any(r["key"] in labels for r in results):
        raise UsageError(f"no key of the results file {results_csv} is in the labels file {labels_csv}")
    result_columns = list(results[0])

    labelled_flags = [f for f in FLAGS if f"flag_{f}" in label_columns]
    flags = [f for f in labelled_flags if f"p_{f}" in result_columns]
    truth_of: dict[str, int] = {}
    flag_truth: dict[str, dict[str, int]] = {f: {} for f in flags}
    for k, r in labels.items():
        q = _label_code(r["quality"], (0, 1, 2))
        if q is None:
            got = "an empty quality" if not (r["quality"] or "").strip() else f"quality {r['quality']!r}"
            raise UsageError(f"the labels file {labels_csv} has {got} for key '{k}' (expected 0, 1 or 2)")
        truth_of[k] = q
        for f in flags:
            v = _label_code(r[f"flag_{f}"], (0, 1))
            if v is None:
                raise UsageError(f"the labels file {labels_csv} has flag_{f} {r[f'flag_{f}']!r} for key '{k}' (expected 0 or 1)")
            flag_truth[f][k] = v

    with_temperature = "temperature" in result_columns
    problems: list[dict[str, str]] = []
    graded: list[dict[str, str]] = []
    for r in sorted(results, key=lambda r: r["key"]):
        if r["key"] not in labels:
            problems.append({"key": r["key"], "status": "not in labels"})
        elif (why := _grade_problem(r, [f"p_{f}" for f in flags], with_temperature)) is not None:
            problems.append({"key": r["key"], "status": why})
        else:
            graded.append(r)
    n_labels_not_graded = len(set(labels) - {r["key"] for r in results})

    keys = [r["key"] for r in graded]
    truth = np.array([truth_of[k] for k in keys], np.int64)
    pred = np.array([GRADES.index(r["grade"].strip()) for r in graded], np.int64)
    p = np.maximum(np.array([[float(r[c]) for c in PROB_COLUMNS] for r in graded], np.float64).reshape(-1, 3), P_FLOOR)
    p /= p.sum(1, keepdims=True)
    temperature = np.array([float(r["temperature"]) for r in graded]) if with_temperature else None
    flag_data = {f: (np.array([float(r[f"p_{f}"]) for r in graded]), np.array([flag_truth[f][k] for k in keys])) for f in flags}
    design = _Design.build(truth, pred, p, temperature, flag_data)
    sources = [labels[k]["source"] for k in keys] if "source" in label_columns else None
    codes, unit = cluster_ids(keys, sources)

    sets: list[tuple[str, str, np.ndarray]] = [(OVERALL, OVERALL, np.arange(len(keys)))]
    for col in by:
        values = np.array([labels[k][col] for k in keys], dtype=str)
        sets += [(col, str(g), np.flatnonzero(values == g)) for g in np.unique(values)]
    entries = []
    for _, _, idx in sets:
        e = _set_entry(design.sub(idx))
        entries.append({"n": e.pop("n"), "n_clusters": len(np.unique(codes[idx])), **e})
    if n_boot > 0 and not keys:
        for e in entries:
            e["ci95"] = {k: [math.nan, math.nan] for k in CI_KEYS}
    elif n_boot > 0:
        auc_sets = [(idx, [f for f, a in e["auc"].items() if math.isfinite(a)]) for (_, _, idx), e in zip(sets, entries)]
        for e, ci in zip(entries, bootstrap_cis(design, codes, auc_sets, n_boot, seed)):
            e["ci95"] = ci
    single = blank_single_cluster_cis(sets, entries, "n_clusters", CI_KEYS) if n_boot > 0 else []

    groups: dict[str, dict[str, Any]] = {col: {} for col in by}
    for (col, g, _), e in zip(sets[1:], entries[1:]):
        groups[col][g] = e
    temps = sorted(set(temperature.tolist())) if temperature is not None else []
    summary: dict[str, Any] = {
        "task": "quality-grading",
        "results_csv": str(results_csv),
        "labels_csv": str(labels_csv),
        "labels_format": fmt,
        "by": by,
        "flags": flags,
        "temperature": temps[0] if len(temps) == 1 else temps or None,
        "n_images": len(keys),
        "n_clusters": int(codes.max()) + 1 if len(keys) else 0,
        "n_problems": len(problems),
        "n_labels_not_graded": n_labels_not_graded,
        "overall": entries[0],
        "groups": groups,
        "bootstrap": {"n": int(n_boot), "seed": int(seed), "unit": unit},
        "problems": problems,
        "definitions": DEFINITIONS,
    }
    notes = []
    if n_labels_not_graded:
        s = "s have" if n_labels_not_graded != 1 else " has"
        notes.append(f"{n_labels_not_graded} label row{s} no row in the results file (not graded)")
    notes += [f"flag {f}: no p_{f} column in the results file (no AUC)" for f in labelled_flags if f not in flags]
    if single:
        notes.append(one_cluster_note(unit.split(" (")[0], [f"{col}={g}" for col, g in single]))
    notes += [f"flag {f}: the graded images are all {'positive' if 1 in y else 'negative'} (no AUC)"
              for f, (_, y) in flag_data.items() if len(keys) and len(set(y.tolist())) < 2]  # fmt: skip
    if not with_temperature:
        notes.append("no temperature column in the results file: ECE and NLL before calibration are n/a")
    elif len(temps) > 1:
        notes.append(f"the temperature differs between rows ({temps[0]:g} to {temps[-1]:g}): each row's is used")
    for (col, g, _), e in zip(sets, entries):
        if e["classes_absent_from_truth"] and e["n"]:
            absent = ", ".join(e["classes_absent_from_truth"])
            notes.append(f"{col}={g}: no {absent} in the truth (recall n/a; macro F1 over the classes in truth or prediction)")
    rows = [_csv_row(i, col, g, e) for i, ((col, g, _), e) in enumerate(zip(sets, entries))]
    return EvalResult(
        rows=rows,
        summary=json_safe(summary),
        n_problems=len(problems),
        messages=[f"{p['key']}: {p['status']}" for p in problems],
        notes=notes,
    )


_HEAD_KEYS = ("accuracy", "macro_f1", "kappa", "mean_flag_auc", "ece_after")
_MORE_KEYS = ("ece_before", "nll_before", "nll_after", "pred_good", "pred_usable", "pred_reject")


def _csv_row(order: int, col: str, group: str, e: dict[str, Any]) -> dict[str, Any]:
    """A metrics.csv row; ``key`` (not written) keeps the rows in set order."""
    row = {"key": order, "group_by": col, "group": group, "n": e["n"], "n_clusters": e["n_clusters"]}
    row.update({k: e[k] for k in _HEAD_KEYS + _MORE_KEYS})
    for k, (lo, hi) in e.get("ci95", {}).items():
        row[f"{k}_ci_lo"], row[f"{k}_ci_hi"] = lo, hi
    for what in ("precision", "recall", "f1"):
        row.update({f"{what}_{g}": e[what][g] for g in GRADES})
    row.update({f"auc_{f}": a for f, a in e["auc"].items()})
    for i, t in enumerate(GRADES):
        row.update({f"n_{t}_as_{p}": e["confusion"][i][j] for j, p in enumerate(GRADES)})
    return row


# --------------------------------------------------------------------------------------------- outputs
def csv_columns(with_ci: bool, flags: Sequence[str]) -> tuple[str, ...]:
    """metrics.csv columns (the CI columns only with a bootstrap, an AUC column per evaluated flag)."""
    ci = tuple(f"{k}_ci_{end}" for k in CI_KEYS for end in ("lo", "hi")) if with_ci else ()
    per_class = tuple(f"{what}_{g}" for what in ("precision", "recall", "f1") for g in GRADES)
    confusion = tuple(f"n_{t}_as_{p}" for t in GRADES for p in GRADES)
    return ("group_by", "group", "n", "n_clusters") + _HEAD_KEYS + ci + _MORE_KEYS + per_class + tuple(f"auc_{f}" for f in flags) + confusion


def _sets(summary: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(OVERALL, OVERALL, summary["overall"])] + [(c, g, e) for c in summary["by"] for g, e in summary["groups"][c].items()]


def _cell(e: dict[str, Any], k: str, with_ci: bool) -> str:
    cell = _num(e[k])
    if with_ci and k in CI_KEYS:
        lo, hi = e["ci95"][k]
        cell += f" [{_num(lo)}, {_num(hi)}]"
    return cell


def summary_tables(summary: dict[str, Any]) -> list[tuple[str, list[tuple[str, ...]]]]:
    """(title, header and rows) of each table: agreement and calibration by set, the overall confusion
    matrix with per-class precision / recall / F1, the overall flag AUCs."""
    with_ci = summary["bootstrap"]["n"] > 0
    ci = " [95% CI]" if with_ci else ""
    sets = _sets(summary)
    agree: list[tuple[str, ...]] = [("group_by", "group", "n", "clusters", "accuracy" + ci, "macro_f1" + ci, "kappa" + ci,
                                     "pred_good", "pred_usable", "pred_reject")]  # fmt: skip
    agree += [(c, g, str(e["n"]), str(e["n_clusters"]), *(_cell(e, k, with_ci) for k in ("accuracy", "macro_f1", "kappa")),
               *(_num(e[f"pred_{x}"]) for x in GRADES)) for c, g, e in sets]  # fmt: skip
    calib: list[tuple[str, ...]] = [("group_by", "group", "mean_flag_auc" + ci, "ece_before", "ece_after" + ci, "nll_before", "nll_after")]
    calib += [(c, g, _cell(e, "mean_flag_auc", with_ci), _num(e["ece_before"]), _cell(e, "ece_after", with_ci),
               _num(e["nll_before"]), _num(e["nll_after"])) for c, g, e in sets]  # fmt: skip
    o = summary["overall"]
    conf: list[tuple[str, ...]] = [("truth \\ predicted", *GRADES, "precision", "recall", "f1")]
    conf += [(t, *(str(v) for v in o["confusion"][i]), _num(o["precision"][t]), _num(o["recall"][t]), _num(o["f1"][t]))
             for i, t in enumerate(GRADES)]  # fmt: skip
    tables = [("Agreement", agree), ("Calibration and flags", calib), ("Confusion (all)", conf)]
    if o["auc"]:
        tables.append(("Flag AUC (all)", [("flag", "auc")] + [(f, _num(a)) for f, a in o["auc"].items()]))
    return tables


def _counts(summary: dict[str, Any]) -> str:
    temp = summary["temperature"]
    t = f"{temp:g}" if isinstance(temp, (int, float)) else "varies by row" if temp else "none"
    return (
        f"{summary['n_images']} images of {summary['n_clusters']} clusters ({summary['bootstrap']['unit']}) graded "
        f"(problems {summary['n_problems']}, label rows not graded {summary['n_labels_not_graded']}); temperature {t}"
    )


def summary_human(summary: dict[str, Any]) -> str:
    """Plain-text tables for the terminal."""
    lines = [_counts(summary)]
    for title, table in summary_tables(summary):
        lines += ["", f"{title}:", *text_table(table)]
    return "\n".join(lines)


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: inputs, counts, the tables, the definitions and the ungraded rows."""
    boot = summary["bootstrap"]
    lines = [
        "# Quality-grading evaluation",
        "",
        f"- results: `{summary['results_csv']}`",
        f"- labels: `{summary['labels_csv']}` ({summary['labels_format']} format)",
        f"- {_counts(summary)}",
        f"- flags evaluated: {', '.join(summary['flags']) or 'none'}",
        f"- bootstrap: {boot['n']} resamples of clusters ({boot['unit']}), seed {boot['seed']}"
        if boot["n"] > 0
        else "- bootstrap: none (no confidence intervals)",
    ]
    for title, table in summary_tables(summary):
        lines += ["", f"## {title}", "", *markdown_table(table)]
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in summary["definitions"].items()] + [""]
    if summary["problems"]:
        lines += ["## Not graded", ""] + [f"- `{p['key']}`: {p['status']}" for p in summary["problems"]] + [""]
    return "\n".join(lines)


def write_outputs(result: EvalResult, out_dir: Path) -> list[Path]:
    """The quality-grading reports of ``result`` (see ``segment.write_reports``)."""
    columns = csv_columns(result.summary["bootstrap"]["n"] > 0, result.summary["flags"])
    return write_reports(out_dir, metrics_csv(result.rows, columns), result.summary, summary_markdown(result.summary))
