"""``fundus evaluate segment``: score vessel predictions against ground truth, inside the FOV.

Pairing rule (documented in the report): every file is identified by its *pairing key*, the lower-cased
file name (in Unicode's composed form, NFC: a name written decomposed, as macOS writes it, pairs) without extension and without known suffixes, stripped repeatedly from the end:
``_prob``, ``_vessels`` (``fundus segment`` outputs), ``_mask`` (FOV masks), ``_manual1``/``_manual2``
(DRIVE observers), ``_test``/``_training`` (DRIVE image names). So DRIVE ``01_test_prob.png``,
``1st_manual/01_manual1.gif`` and ``mask/01_test_mask.gif`` all have key ``01``; HRF ``01_h_prob.png``,
``manual1/01_h.tif`` and ``mask/01_h_mask.tif`` have key ``01_h``. Discovery is recursive and
case-insensitive on the extension; folders are paired by key only (sub-folder names are ignored), and
two files of one folder with the same key are a usage error.

Predictions: if PRED_DIR holds ``*_prob.*`` / ``*_vessels.*`` files (a ``fundus segment`` output), those
are used (other images there, e.g. overlays, are ignored): ``_prob`` is a probability map (uint16 v/65535,
uint8 v/255) giving AUCs and, thresholded with ``prob >= T``, the binary metrics; a key with only
``_vessels`` uses that mask (its brighter level) and has no AUC. Otherwise every image in PRED_DIR is
a prediction: palette images are binarised on their raw indices (> 0), images with at most two grey levels
are binary masks (the brighter level; a ``--threshold`` does not apply to them, and the report says so), other
images are probability maps (v / dtype max). A PRED_DIR whose manifest says another stage wrote it (degrade,
enhance, grade, score: photographs, not vessel maps) is a usage error.

Ground truth and FOV masks: palette images -> raw index > 0 (DRIVE 2nd_manual is a {0,1} palette GIF
shown as grey 3/253), otherwise the brighter of two grey levels (0/255 in 8 or 16 bits, 0/1), and for a mask of
more levels value > half of the dtype max (127 for uint8); colour images use the maximum over their colour
channels. Without ``--fov`` the FOV is the whole image. A ground truth without a vessel pixel inside the FOV is
an error row (it would score sensitivity 1 and F1 0, or a perfect 1); one that marks more than half of the FOV
as vessel is scored and noted (an inverted map, vessels dark on light, does that; DRIVE's and HRF's mark 6-17%).

Threshold: ``--threshold``, else ``config.threshold`` of PRED_DIR/manifest.json (or of the nearest manifest above
the predictions), else 0.5; a manifest there that is not readable JSON is a usage error.

Coverage: every prediction is scored against its ground truth. Ground-truth images without a prediction
are not an error (evaluating a subset of a test set is normal): they are counted and listed in the summary
(``n_gt_without_prediction``, ``gt_without_prediction``) and are not rows of metrics.csv. A prediction
without ground truth, or without a FOV mask when a FOV folder is given, and unreadable items are problems
(rows with status ``unpaired: ...`` / ``error: ...``, listed under ``problems``).

Bootstrap: with ``n_boot = 0`` there are no confidence intervals; the summary then has no ``ci95`` key
(``bootstrap.n`` is 0) and the tables have no CI columns.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fundus_pipeline.errors import InputError, UsageError
from fundus_pipeline.evaluation.metrics import (
    ALL_KEYS,
    cldice,
    confusion,
    json_safe,
    one_cluster_note,
    predicted_mask,
    score_histograms,
    segmentation_report,
)

REPORT_NAMES = ("metrics.csv", "summary.json", "summary.md")
#: Stages whose folders hold photographs, not vessel maps: refused as PRED_DIR.
NOT_PREDICTIONS = ("degrade", "enhance", "grade", "score")
#: A ground truth marking more of the FOV than this as vessel is noted as implausible (DRIVE's and HRF's: 6-17%).
MAX_PLAUSIBLE_VESSEL_SHARE = 0.5
SUFFIXES = ("_prob", "_vessels", "_mask", "_manual1", "_manual2", "_test", "_training")
CSV_COLUMNS = (
    "key", "status", "source", "pred", "gt", "fov", "height", "width", "tp", "fp", "tn", "fn",
) + ALL_KEYS
PROTOCOL = (
    "Metrics inside the FOV mask (whole image when no FOV folder is given). Predicted vessel: prob >= threshold "
    "(or the binary mask). Pooled = confusion counts and score histograms summed over all images (pooled AUCs "
    "are over all FOV pixels of all images); mean = mean of per-image metrics. AUC-ROC: exact Mann-Whitney "
    "(ties 1/2) on 65536 score levels; AUC-PR: step-wise average precision. 0/0 ratios are 1.0 (no error "
    "possible). clDice: skeletons by skimage skeletonize inside the FOV. 95% CIs: percentile bootstrap over "
    "images. Pairing: lower-cased file names with the suffixes " + ", ".join(SUFFIXES) + " stripped."
)


def pairing_key(name: str) -> str:
    """Lower-cased base name (no folder, no extension) with the known suffixes stripped repeatedly."""
    import unicodedata

    base = unicodedata.normalize("NFC", Path(name).name)  # (composed and decomposed names had not paired; campaign 32b F7)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    k = stem.lower()
    changed = True
    while changed:
        changed = False
        for suf in SUFFIXES:
            if k.endswith(suf) and len(k) > len(suf):
                k = k[: -len(suf)]
                changed = True
    return k


def variants_hint(keys, others) -> str | None:
    """The hint for keys that end in a Cofe-Net type code (``KEY_111``: ``fundus degrade`` with several
    ``--types``) and would pair with one of ``others`` without it: the code is part of the key, not a suffix
    this rule strips."""
    import re

    if any(pairing_key(re.sub(r"_[01]{3}$", "", k)) in others for k in keys if re.search(r"_[01]{3}$", k)):
        return ("these look like `fundus degrade` variants (KEY_<type code>), which pair with nothing here: degrade one "
                "type code at a time (--types 111), or use `fundus run --simulate CODES --ground-truth DIR`, which scores each variant")
    return None


def _discover(root: Path) -> list[tuple[str, Path]]:
    from fundus_pipeline.io import discover_images

    return [(item.key, item.path) for item in discover_images(root)]


def _same_key(what: str, k: str, a: Path, b: Path, tail: str = "") -> UsageError:
    """Two files of one folder under one pairing key; names that print alike (composed and decomposed forms of
    one name) are shown escaped, so the difference can be seen (review 32 R32-2)."""
    import unicodedata

    a, b = sorted([a, b])
    shown = f"{a} and {b}"
    if a.name != b.name and unicodedata.normalize("NFC", a.name) == unicodedata.normalize("NFC", b.name):
        shown += f" (the names differ only in their Unicode form: {ascii(a.name)} and {ascii(b.name)})"
    return UsageError(f"two {what} files pair under the same key '{k}': {shown}{tail}")


def _index(files: list[tuple[str, Path]], what: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for key, path in files:
        k = pairing_key(key)
        if k in out:
            raise _same_key(what, k, out[k], path, "; point to a narrower folder")
        out[k] = path
    return out


@dataclass
class PredEntry:
    key: str
    prob: Path | None = None
    mask: Path | None = None
    plain: Path | None = None

    @property
    def path(self) -> Path:
        return self.prob or self.mask or self.plain  # type: ignore[return-value]


def collect_predictions(pred_dir: Path, exclude: list[Path] | None = None) -> tuple[dict[str, PredEntry], str, int]:
    """Predictions by pairing key, the folder mode (``"segment"`` or ``"plain"``) and how many other images
    the folder holds that are left out (in ``"segment"`` mode, those that are not ``*_prob``/``*_vessels``)."""
    files = _discover(pred_dir)
    if exclude:
        ex = [p.resolve() for p in exclude]
        files = [(k, p) for k, p in files if not any(e in p.resolve().parents for e in ex)]
    tagged = [(k, p, Path(k).name.lower()) for k, p in files]
    seg = [t for t in tagged if t[2].endswith("_prob") or t[2].endswith("_vessels")]
    out: dict[str, PredEntry] = {}
    if seg:
        for key, path, low in seg:
            k = pairing_key(key)
            e = out.setdefault(k, PredEntry(k))
            slot = "prob" if low.endswith("_prob") else "mask"
            if getattr(e, slot) is not None:
                raise _same_key("prediction", k, getattr(e, slot), path)
            setattr(e, slot, path)
        return out, "segment", len(tagged) - len(seg)
    for k, p in _index(files, "prediction").items():
        out[k] = PredEntry(k, plain=p)
    return out, "plain", 0


# --------------------------------------------------------------------------------------------- reading
def _read(path: Path) -> tuple[np.ndarray, Any]:
    from fundus_pipeline.io import read_image

    return read_image(path, raw_palette=True)


def _grey(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3:
        c = arr.shape[2]
        arr = arr[..., : (1 if c == 2 else 3)].max(axis=2) if c in (2, 3, 4) else arr.max(axis=2)
    return arr


def binarise(g: np.ndarray) -> np.ndarray:
    """A mask of two grey levels is its brighter level whatever the levels are (0/1, 0/255 in 16 bits as some
    tools write it, 0/100: each was read as empty by the half-the-dtype-maximum rule and scored F1 0, or a
    perfect 1 against another such mask; campaign 24b F2); one of more levels (an anti-aliased or compressed
    mask) is > half of the dtype max (127 for uint8), and so is one of a single level."""
    lo, hi = int(g.min(initial=0)), int(g.max(initial=0))
    if hi <= 1:
        return g > 0
    if lo != hi and not np.any((g != lo) & (g != hi)):
        return g > lo
    return g > np.iinfo(g.dtype).max // 2


def _palette_binary(path: Path, idx: np.ndarray) -> np.ndarray:
    # Raw index > 0 (DRIVE 2nd_manual: indices {0,1} shown as grey 3/253). Safeguard for inverted
    # palettes, where index 0 is the bright colour: then the displayed grey > 127 is used instead.
    if idx.min() == 0 and idx.max() > 0:
        from fundus_pipeline.io import read_image

        rgb, _ = read_image(path, raw_palette=False)
        shown = _grey(rgb)
        if shown[idx == 0].mean() > 127 >= shown[idx != 0].mean():
            return shown > 127
    return idx > 0


def read_binary(path: Path) -> np.ndarray:
    """Binary mask: palette -> raw index > 0, else ``binarise`` of the maximum over colours (a mask of two grey
    levels is its brighter one)."""
    arr, meta = _read(path)
    if meta.palette:
        return _palette_binary(path, _grey(arr))
    return binarise(_grey(arr))


def require_vessels(gt: np.ndarray, fov: np.ndarray) -> None:
    """An ``InputError`` for a ground truth without a vessel pixel inside the FOV: it would score sensitivity 0/0 := 1
    and F1 0, or a perfect 1 against an empty prediction (campaign 24b F2); no vessel map is empty."""
    if not (gt & fov).any():
        raise InputError("the ground truth has no vessel pixel inside the FOV: not a vessel map, or one read as empty")


def _probability_map(g: np.ndarray, path: Path, written_by_segment: bool = False) -> np.ndarray:
    """``g`` as a probability map (v / dtype max). A 16-bit one whose values all stay below 256 is refused
    unless ``fundus segment`` wrote it (its stage manifest says so) or it is all zero: an 8-bit map saved in 16
    bits reads as probabilities under 0.004, no vessel at any threshold (review 23 R23-6: F1 0, exit 0), but a
    segmenter that finds no vessel writes such a map too (review 24 R24-4), and an all-zero map means the same
    at either depth."""
    if g.dtype == np.uint16 and 0 < int(g.max(initial=0)) <= 255 and not written_by_segment:
        raise InputError(f"{path}: a 16-bit probability map whose values all stay below 256 (under 0.4%): an 8-bit map "
                         "saved in 16 bits, or one with next to no vessel response; save it in 8 bits, or scaled to 0-65535")
    return g


def read_prediction(entry: PredEntry, written_by_segment: bool = False) -> tuple[np.ndarray, str]:
    """(array, source): a float/uint probability map (source ``prob``) or a bool mask (``mask``).
    ``written_by_segment``: ``fundus segment`` wrote the file, so a 16-bit map's scale is its own (see
    ``_probability_map``)."""
    if entry.prob is not None:
        arr, meta = _read(entry.prob)
        if meta.palette:
            return _palette_binary(entry.prob, _grey(arr)), "mask"
        return _probability_map(_grey(arr), entry.prob, written_by_segment), "prob"
    if entry.mask is not None:
        return read_binary(entry.mask), "mask"
    arr, meta = _read(entry.plain)  # type: ignore[arg-type]
    g = _grey(arr)
    if meta.palette:
        return _palette_binary(entry.plain, g), "mask"  # type: ignore[arg-type]
    if np.count_nonzero(np.bincount(g.ravel())) <= 2:
        return binarise(g), "mask"
    return _probability_map(g, entry.plain, written_by_segment), "prob"  # type: ignore[arg-type]


def _segment_wrote(path: Path, root: Path, cache: dict[Path, bool]) -> bool:
    """Whether the nearest fundus manifest.json at or above ``path``'s folder, up to ``root``, is a
    ``fundus segment`` stage's."""
    from fundus_pipeline.runner import manifest_stage

    d, root = path.parent.resolve(), root.resolve()
    seen: list[Path] = []
    found = False
    while True:
        if d in cache:
            found = cache[d]
            break
        seen.append(d)
        stage = manifest_stage(d / "manifest.json")
        if stage is not None:
            found = stage == "segment"
            break
        if d == root or root not in d.parents:
            break
        d = d.parent
    for x in seen:
        cache[x] = found
    return found


def _threshold_from_manifest(pred_dir: Path) -> float | None:
    from fundus_pipeline.io import read_manifest_head

    mf = pred_dir / "manifest.json"
    if not mf.is_file():
        return None
    try:
        data = read_manifest_head(mf)  # its head: the rows of a 10,000-photograph run are not parsed (issue 13)
    except (OSError, ValueError) as e:
        # an unreadable manifest may hold the threshold the masks were written with: scoring them at 0.5 in
        # silence is not a fallback (a 5000-digit value, or a cut or hand-broken file, had been)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"{mf} cannot be read ({reason}); give --threshold") from None
    try:
        t = data.get("config", {}).get("threshold")
    except (AttributeError, TypeError):  # another tool's manifest, not one of ours: it records no threshold
        return None
    if t is None:
        return None
    # a hand-edited value is not used as it is (-5 was, true read as 1) nor replaced by 0.5 in silence
    # (campaign 19a F6): the option's own range
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 < t < 1 and math.isfinite(float(t))):
        raise UsageError(f"{mf} records threshold {json.dumps(t)}, not a number in (0, 1); give --threshold")
    return float(t)


def _threshold_of_predictions(pred_dir: Path, paths: list[Path]) -> tuple[float, str]:
    """(threshold, its source) when ``--threshold`` is not given: the one recorded in ``PRED_DIR/manifest.json``;
    else the one in the manifest nearest above the predictions (a `fundus run` folder's ``segment/manifest.json``,
    which records the threshold its masks were written with, where the run's own manifest records none) when
    every prediction has the same; else 0.5. Predictions written with different thresholds, or only some of
    them with a recorded one, are a usage error (give --threshold)."""
    top = _threshold_from_manifest(pred_dir)
    if top is not None:
        return top, "manifest"
    root = pred_dir.resolve()
    cache: dict[Path, float | None] = {}

    def nearest(d: Path) -> tuple[Path, float] | None:
        while d != root and root in d.parents:
            if d not in cache:
                cache[d] = _threshold_from_manifest(d)
            if cache[d] is not None:
                return d, cache[d]
            d = d.parent
        return None

    found = {nearest(p.parent.resolve()) for p in paths}
    if found == {None}:
        return 0.5, "default"
    if None in found or len({t for _, t in found}) > 1:
        where = ", ".join(f"{d.relative_to(root)}: {t:g}" for d, t in sorted(f for f in found if f is not None))
        raise UsageError(
            f"the predictions in {pred_dir} were not all written with one recorded threshold ({where}"
            f"{'; others record none' if None in found else ''}); give --threshold"
        )
    names = sorted((d.relative_to(root) / "manifest.json").as_posix() for d, _ in found)
    return next(iter(found))[1], "manifest " + ", ".join(names)


# --------------------------------------------------------------------------------------------- evaluation
@dataclass
class EvalResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    n_problems: int = 0
    messages: list[str] = field(default_factory=list)  # one warning per problem item
    notes: list[str] = field(default_factory=list)  # informational lines (not problems)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6f}"
    return str(v)


def evaluate_segmentation(
    pred_dir: Path,
    gt_dir: Path,
    fov_dir: Path | None = None,
    threshold: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    out_dir: Path | None = None,
    with_cldice: bool = True,
) -> EvalResult:
    """Pair, score and summarise; see the module docstring for the rules. Raises ``UsageError`` when
    nothing pairs."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    fov_dir = Path(fov_dir) if fov_dir is not None else None
    if threshold is not None:
        if not (0.0 <= threshold <= 1.0):
            raise UsageError(f"--threshold must be in [0, 1], got {threshold}")
        thr, thr_source = float(threshold), "option"

    from fundus_pipeline.runner import manifest_stage, refuse_while_written

    refuse_while_written(pred_dir, "PRED_DIR")
    exclude = [p for p in (gt_dir, fov_dir, out_dir) if p is not None and p.resolve() != pred_dir.resolve()]
    preds, mode, ignored = collect_predictions(pred_dir, exclude)
    if not preds:
        raise UsageError(f"{pred_dir} holds no prediction (no image outside the ground-truth, FOV and --out folders)")
    stage = manifest_stage(pred_dir / "manifest.json")
    if stage in NOT_PREDICTIONS:  # (an enhance folder's photographs had scored as vessel maps, exit 0; campaign 32b F9)
        raise UsageError(f"{pred_dir} holds the outputs of fundus {stage} (its manifest.json says so), not vessel predictions",
                         hint="give the folder fundus segment wrote")
    if threshold is None:
        thr, thr_source = _threshold_of_predictions(pred_dir, [pe.path for pe in preds.values()])
    gts = _index(_discover(gt_dir), "ground-truth")
    fovs = _index(_discover(fov_dir), "FOV mask") if fov_dir is not None else None

    paired = sorted(set(preds) & set(gts))
    if not paired:
        raise UsageError(
            f"no prediction in {pred_dir} pairs with a ground truth in {gt_dir} "
            f"({len(preds)} predictions, {len(gts)} ground truths; keys are file names without {', '.join(SUFFIXES)})",
            variants_hint(preds, gts),
        )

    gt_only = sorted(set(gts) - set(preds))  # not scored, not a problem: a subset of the GT was predicted
    rows: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    sources: set[str] = set()
    masks_from_plain: list[str] = []  # predictions read as binary masks although a --threshold was given
    mostly_vessel: list[tuple[str, float]] = []  # ground truths that mark more than half of the FOV
    wrote: dict[Path, bool] = {}
    for k in sorted(preds):
        pe, gp = preds[k], gts.get(k)
        fp_ = fovs.get(k) if fovs is not None else None
        row: dict[str, Any] = {
            "key": k,
            "pred": str(pe.path),
            "gt": str(gp) if gp else "",
            "fov": str(fp_) if fp_ else ("" if fovs is not None else "whole image"),
            "source": "",
        }
        if gp is None:
            row["status"] = "unpaired: no ground truth"
        elif fovs is not None and fp_ is None:
            row["status"] = "unpaired: no FOV mask"
        else:
            try:
                pred, source = read_prediction(pe, _segment_wrote(pe.path, pred_dir, wrote))
                gt = read_binary(gp)
                fov = read_binary(fp_) if fp_ is not None else np.ones(gt.shape, bool)
                if pred.shape != gt.shape or fov.shape != gt.shape:
                    raise InputError(
                        f"size mismatch: prediction {pred.shape[1]}x{pred.shape[0]}, ground truth "
                        f"{gt.shape[1]}x{gt.shape[0]}, FOV {fov.shape[1]}x{fov.shape[0]}"
                    )
                if not fov.any():  # 0/0 would score the image perfect and raise the means
                    raise InputError("empty FOV mask: no pixel to score")
                require_vessels(gt, fov)
                share = float(np.count_nonzero(gt & fov)) / float(np.count_nonzero(fov))
                if share > MAX_PLAUSIBLE_VESSEL_SHARE:
                    mostly_vessel.append((k, share))
                if source == "mask" and thr_source == "option":
                    masks_from_plain.append(k)
                tp, fp, tn, fn = confusion(pred, gt, fov, thr)
                item: dict[str, Any] = {"key": k, "tp": tp, "fp": fp, "tn": tn, "fn": fn}
                if source == "prob":
                    item["pos_hist"], item["neg_hist"] = score_histograms(pred, gt, fov)
                binary = pred if pred.dtype == bool else None
                if with_cldice:
                    if binary is None:
                        binary = predicted_mask(pred, thr)
                    item["cldice"] = cldice(binary, gt, fov)
                items.append(item)
                sources.add(source)
                row.update({"status": "ok", "source": "prob>=threshold" if source == "prob" else "mask",
                            "height": gt.shape[0], "width": gt.shape[1]})
            except InputError as exc:
                row["status"] = f"error: {exc.message if hasattr(exc, 'message') else exc}"
        rows.append(row)

    rep = segmentation_report(items, n_boot=n_boot, seed=seed)
    per = {r["key"]: r for r in rep["per_image"]}
    for row in rows:
        if row["key"] in per and row["status"] == "ok":
            row.update({k: v for k, v in per[row["key"]].items() if k != "key"})

    problems = [r for r in rows if r["status"] != "ok"]
    summary = {
        "task": "segmentation",
        "pred_dir": str(pred_dir),
        "gt_dir": str(gt_dir),
        "fov_dir": str(fov_dir) if fov_dir is not None else None,
        "fov": "mask folder" if fov_dir is not None else "whole image (no --fov given)",
        "prediction_mode": mode,
        "prediction_source": sorted(sources),
        "threshold": thr,
        "threshold_source": thr_source,
        "n_images": rep["n_images"],
        "n_unpaired": sum(r["status"].startswith("unpaired") for r in rows),
        "n_errors": sum(r["status"].startswith("error") for r in rows),
        "n_gt_without_prediction": len(gt_only),
        "gt_without_prediction": gt_only,
        "pooled": rep["pooled"],
        "mean": rep["mean"],
        "ci95": rep["ci95"],
        "bootstrap": rep["bootstrap"],
        "problems": [{"key": r["key"], "status": r["status"]} for r in problems],
        "protocol": PROTOCOL,
    }
    if masks_from_plain:  # recorded in the reports, not only said (campaign 33b F1); absent otherwise
        summary["threshold_not_applied"] = {"n": len(masks_from_plain), "keys": masks_from_plain}
    if n_boot <= 0:
        del summary["ci95"]  # no resamples, no CIs (documented: the key is absent, bootstrap.n is 0)
    msgs = [f"{r['key']}: {r['status']}" for r in problems]
    notes = [gt_only_note(len(gt_only))] if gt_only else []
    if n_boot > 0 and rep["n_images"] == 1:
        notes.append(one_cluster_note("image"))
    if masks_from_plain:  # said: the header prints the option's threshold (campaign 32b F8)
        notes.append(f"{len(masks_from_plain)} prediction(s) read as binary masks (at most two grey levels, a palette or a "
                     f"_vessels file; e.g. {masks_from_plain[0]}): --threshold {thr:g} does not apply to them")
    if mostly_vessel:  # (an inverted ground truth had been scored without a word; campaign 32b F11)
        k, share = mostly_vessel[0]
        notes.append(f"{len(mostly_vessel)} ground truth(s) mark more than half of the FOV as vessel (e.g. {k}: {share:.0%}; "
                     "DRIVE's and HRF's mark 6-17%): inverted, vessels dark on light?")
    if ignored:  # said, not silent: an image beside fundus segment's outputs is not a prediction here
        notes.append(f"{ignored} other image(s) in {pred_dir} ignored: it holds fundus segment outputs, so only *_prob and *_vessels files are predictions")
    return EvalResult(rows=rows, summary=json_safe(summary), n_problems=len(problems), messages=msgs, notes=notes)


def gt_only_note(n: int) -> str:
    """``15 ground-truth images have no prediction (not scored)``."""
    return f"{n} ground-truth image{'s have' if n != 1 else ' has'} no prediction (not scored)"


# --------------------------------------------------------------------------------------------- outputs
def metrics_csv(rows: list[dict[str, Any]], columns: tuple[str, ...] = CSV_COLUMNS) -> bytes:
    """metrics.csv: one row per item (problems included, with their status), sorted by key."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in sorted(rows, key=lambda r: r["key"]):
        w.writerow([_fmt(r.get(c)) for c in columns])
    return utf8(buf.getvalue())


_MD_METRICS = ("sensitivity", "specificity", "accuracy", "precision", "f1", "iou", "auc_roc", "auc_pr", "cldice")


def _num(v: Any, nd: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}"


def has_ci(summary: dict[str, Any]) -> bool:
    """Whether the summary carries bootstrap CIs (not with ``--bootstrap 0``)."""
    return bool(summary.get("ci95")) and summary.get("bootstrap", {}).get("n", 0) > 0


def summary_header(summary: dict[str, Any]) -> tuple[str, ...]:
    """Column titles matching :func:`summary_table`."""
    if has_ci(summary):
        return ("metric", "pooled [95% CI]", "mean", "mean 95% CI")
    return ("metric", "pooled", "mean")


def summary_table(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows (metric, pooled [CI], mean, mean 95% CI) for human/Markdown output; without CIs
    (``--bootstrap 0``) the rows are (metric, pooled, mean)."""
    with_ci = has_ci(summary)
    ci95 = summary.get("ci95") or {}
    out: list[tuple[str, ...]] = []
    for k in _MD_METRICS:
        pooled = summary["pooled"].get(k)
        p = _num(pooled) if k != "cldice" else "-"
        mean = _num(summary["mean"].get(k))
        if not with_ci:
            out.append((k, p, mean))
            continue
        pci = ci95.get("pooled", {}).get(k)
        if pci and pooled is not None:
            p += f" [{_num(pci[0])}, {_num(pci[1])}]"
        ci = ci95.get("mean", {}).get(k) or [None, None]
        out.append((k, p, mean, f"[{_num(ci[0])}, {_num(ci[1])}]"))
    return out


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# Vessel segmentation evaluation",
        "",
        f"- predictions: `{summary['pred_dir']}` ({summary['prediction_mode']}; {', '.join(summary['prediction_source']) or 'none'})",
        f"- ground truth: `{summary['gt_dir']}`",
        f"- FOV: {summary['fov']}" + (f" `{summary['fov_dir']}`" if summary["fov_dir"] else ""),
        f"- threshold: {summary['threshold']} ({summary['threshold_source']})"
        + (f"; not applied to {summary['threshold_not_applied']['n']} prediction(s) read as binary masks"
           if summary.get("threshold_not_applied") else ""),
        f"- images scored: {summary['n_images']}; unpaired: {summary['n_unpaired']}; errors: {summary['n_errors']}",
    ]
    n_gt_only = summary.get("n_gt_without_prediction", 0)
    if n_gt_only:
        keys = ", ".join(f"`{k}`" for k in summary.get("gt_without_prediction", []))
        lines.append(f"- ground truth without prediction (not scored): {n_gt_only} ({keys})")
    if has_ci(summary):
        lines.append(f"- bootstrap: {summary['bootstrap']['n']} resamples, seed {summary['bootstrap']['seed']}")
    else:
        lines.append("- bootstrap: none (0 resamples, no confidence intervals)")
    header = tuple("mean of images" if h == "mean" else h for h in summary_header(summary))
    lines += ["", *markdown_table([header, *summary_table(summary)])]
    lines += ["", f"Protocol: {summary['protocol']}", ""]
    if summary["problems"]:
        lines += ["## Not scored", ""] + [f"- `{p['key']}`: {p['status']}" for p in summary["problems"]] + [""]
    return "\n".join(lines)


def summary_human(summary: dict[str, Any]) -> str:
    n_gt_only = summary.get("n_gt_without_prediction", 0)
    head = (
        f"{summary['n_images']} images scored (unpaired {summary['n_unpaired']}, errors {summary['n_errors']}"
        + (f", {n_gt_only} ground truth without prediction" if n_gt_only else "")
        + f"); threshold {summary['threshold']:g} ({summary['threshold_source']}); FOV: {summary['fov']}"
    )
    return "\n".join([head, *text_table([summary_header(summary), *summary_table(summary)])])


def text_table(rows: list[tuple[str, ...]]) -> list[str]:
    """The lines of a plain-text table (first row: the header), columns padded to their widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def markdown_table(rows: list[tuple[str, ...]]) -> list[str]:
    """The lines of a Markdown table (first row: the header)."""
    return ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])] + ["| " + " | ".join(r) + " |" for r in rows[1:]]


def check_out_dir(out_dir: Path, inputs: tuple[Path | None, ...] = ()) -> list[Path]:
    """Refuse an output path that cannot take the reports (``UsageError``); return the reports of an earlier
    run found there (they will be replaced). Other files in the folder are never touched, and files of the
    reports' names are replaced only when they are an earlier evaluation's (its summary.json is there and
    names its task): never one of ``inputs``, never a file of that name that an evaluation did not write."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output path exists and is not a folder: {out_dir}")
    found = []
    for name in REPORT_NAMES:
        p = out_dir / name
        if p.is_dir() or (p.exists() and not p.is_file()):
            raise UsageError(f"cannot write the report {p}: a folder or special file has that name; choose --out")
        if p.is_file():
            if any(i is not None and Path(i).exists() and p.resolve() == Path(i).resolve() for i in inputs):
                raise UsageError(f"the report {p} would replace an input of this evaluation; choose another --out")
            found.append(p)
    if found and not _earlier_report(out_dir / "summary.json"):
        raise UsageError(f"{out_dir} holds {', '.join(p.name for p in found)} that no evaluation wrote; choose another --out", "the reports are metrics.csv, summary.json and summary.md")
    return found


def _earlier_report(summary: Path) -> bool:
    """Whether ``summary`` is the summary.json of an earlier ``fundus evaluate`` (a JSON object naming its task)."""
    try:
        d = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and isinstance(d.get("task"), str)


def utf8(text: str) -> bytes:
    """``text`` as UTF-8; a file name that is not UTF-8 (Linux allows any bytes, Python keeps them as lone
    surrogates) is written with its odd bytes as ``\\udcXX`` escapes, as summary.json's JSON escapes them."""
    return text.encode("utf-8", errors="backslashreplace")


def write_reports(out_dir: Path, csv_bytes: bytes, summary: dict[str, Any], markdown: str) -> list[Path]:
    """Write metrics.csv, summary.json and summary.md atomically into ``out_dir`` (created), replacing
    earlier reports of the same name; nothing else in the folder is touched (every evaluator's writer)."""
    from fundus_pipeline.io import write_bytes_atomic

    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    paths = [out_dir / name for name in REPORT_NAMES]
    texts = [csv_bytes, utf8(json.dumps(summary, indent=2, allow_nan=False) + "\n"), utf8(markdown)]  # all made before any is written
    for path, data in zip(paths, texts):
        write_bytes_atomic(path, data)
    return paths


def write_outputs(result: EvalResult, out_dir: Path) -> list[Path]:
    """The segmentation reports of ``result`` (see ``write_reports``)."""
    return write_reports(out_dir, metrics_csv(result.rows), result.summary, summary_markdown(result.summary))
