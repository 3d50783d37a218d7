"""``fundus evaluate enhance``: score enhanced photographs against clean references, inside the FOV.

Pairing: as ``fundus evaluate segment`` (:func:`fundus_pipeline.evaluation.segment.pairing_key`): the
lower-cased file name without extension and without the suffixes ``_prob``, ``_vessels``, ``_mask``,
``_manual1``, ``_manual2``, ``_test``, ``_training``; discovery is recursive, sub-folder names are ignored,
two files of one folder with the same key are a usage error. Every image in ENH_DIR is an enhanced image
(``manifest.json`` and ``results.csv`` of a ``fundus enhance`` output are not images and are ignored, as are
REF_DIR, the FOV folder and the output folder when they lie inside ENH_DIR).

Reading: ``fundus_pipeline.io.read_image`` + ``to_float_rgb``: RGB divided by the bit depth's maximum (255
or 65535), grey replicated to RGB, palette images converted to RGB, fully transparent pixels (alpha 0) black and the
alpha channel then dropped (the input rule of every stage). Each pair is scored at
the images' native resolution; their sizes must match.

FOV: with a FOV folder, masks paired by key and binarised by ``read_binary`` (as ``evaluate segment``);
without it, the FOV is estimated on each *reference* image by
``degradation.fov.estimate_fov_geometry`` (the full frame when no dark surround is found).

Coverage and exit codes, as ``evaluate segment``: every enhanced image is scored; references without an
enhanced image are counted and listed (``n_ref_without_enhanced``, ``ref_without_enhanced``), not an
error. An enhanced image without a reference (or without a FOV mask when a FOV folder is given), an
unreadable item, a size mismatch or an empty FOV is a problem: a metrics.csv row with status
``unpaired: ...`` / ``error: ...``, listed under ``problems``. Nothing paired is a ``UsageError``.

Metrics: :func:`fundus_pipeline.evaluation.image_metrics.score_pair` (definitions there and in the
summary's ``definitions``). Summary: the mean over images of each metric (NaN-skipping) with its sample
standard deviation (``<metric>_std``) and percentile-bootstrap 95% CIs of the means (``ci95.mean``;
absent with ``n_boot = 0``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fundus_pipeline.errors import InputError, UsageError
from fundus_pipeline.evaluation.image_metrics import DEFINITIONS, METRIC_KEYS, score_pair
from fundus_pipeline.evaluation.metrics import _percentile_ci, json_safe, one_cluster_note
from fundus_pipeline.evaluation.segment import (
    SUFFIXES,
    EvalResult,
    _discover,
    _index,
    _num,
    markdown_table,
    read_binary,
    text_table,
    variants_hint,
    write_reports,
)
from fundus_pipeline.evaluation.segment import metrics_csv as segment_metrics_csv

CSV_COLUMNS = ("key",) + METRIC_KEYS + ("fov_fraction", "width", "height", "status", "enhanced", "reference", "fov")
LABELS = {"psnr": "psnr [dB]", "ssim": "ssim", "ms_ssim": "ms_ssim", "ciede2000": "ciede2000 [dE00]"}
FOV_ESTIMATED = "estimated on each reference image (degradation.fov.estimate_fov_geometry)"
BOOTSTRAP_METHOD = "percentile (2.5, 97.5) over resamples of the images with replacement"


def definitions(fov_dir: Path | None) -> dict[str, str]:
    """The ``definitions`` object of summary.json: each metric's exact definition and the protocol."""
    fov = (
        "FOV masks from the FOV folder, paired by key; palette -> index > 0, else value > half the dtype max "
        "(max over colour channels)"
        if fov_dir is not None
        else "estimated on each reference image by degradation.fov.estimate_fov_geometry (fitted circle clipped "
        "to the frame; the full frame when no dark surround is found)"
    )
    return {
        **DEFINITIONS,
        "fov": fov + ". Both images are set to 0 outside the FOV before any window is applied, so pixels "
        "outside it never influence a score; maps are averaged over the FOV pixels.",
        "resolution": "native: each pair is scored at the images' own size (no resizing); sizes must match.",
        "input": "read_image + to_float_rgb: RGB divided by the bit depth's maximum (255 or 65535), data range 1; "
        "grey replicated to RGB, palette converted to RGB, fully transparent pixels (alpha 0) black, alpha then dropped; EXIF orientation applied.",
        "pairing": "lower-cased file names without extension and without the suffixes " + ", ".join(SUFFIXES) + ".",
        "aggregation": "mean over images of the per-image values (NaN-skipping), sample std (<metric>_std); "
        "95% CIs of the means: " + BOOTSTRAP_METHOD + ".",
    }


# --------------------------------------------------------------------------------------------- evaluation
def read_rgb(path: Path) -> np.ndarray:
    """Float32 HxWx3 RGB in [0, 1] (``read_image`` + ``to_float_rgb``: fully transparent pixels black, alpha dropped)."""
    from fundus_pipeline.io import read_image, to_float_rgb

    return to_float_rgb(*read_image(path))[0]


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[0]}"


def score_files(enh: Path, ref: Path, fov: Path | None) -> dict[str, float | int]:
    """:func:`score_pair` of two image files (FOV mask file, or estimated on the reference); ``InputError``
    for an unreadable file, a size mismatch or an empty FOV."""
    pred, gt = read_rgb(enh), read_rgb(ref)
    if pred.shape != gt.shape:
        raise InputError(f"size mismatch: enhanced {_size(pred.shape)}, reference {_size(gt.shape)}")
    if fov is not None:
        mask = read_binary(fov)
        if mask.shape != gt.shape[:2]:
            raise InputError(f"size mismatch: images {_size(gt.shape)}, FOV {_size(mask.shape)}")
    else:
        from degradation.fov import estimate_fov_geometry

        mask = estimate_fov_geometry(gt)[0]
    if not mask.any():
        raise InputError("empty FOV mask")
    return score_pair(pred, gt, mask)


def _bootstrap_ci(values: np.ndarray, n_boot: int, seed: int) -> dict[str, list[float | None]]:
    """Percentile-bootstrap 95% CIs of the NaN-skipping column means of ``values`` (images x metrics)."""
    n = values.shape[0]
    finite = np.isfinite(values)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # n_boot x n resample counts
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = (w @ np.where(finite, values, 0.0)) / (w @ finite.astype(np.float64))
    return {k: _percentile_ci(boot[:, j]) for j, k in enumerate(METRIC_KEYS)}


def _mean_std(values: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    for j, k in enumerate(METRIC_KEYS):
        col = values[np.isfinite(values[:, j]), j]
        out[k] = float(col.mean()) if col.size else float("nan")
        out[k + "_std"] = float(col.std(ddof=1)) if col.size > 1 else float("nan")
    return out


def ref_only_note(n: int) -> str:
    """``15 reference images have no enhanced image (not scored)``."""
    return f"{n} reference image{'s have' if n != 1 else ' has'} no enhanced image (not scored)"


def evaluate_enhancement(
    enh_dir: Path,
    ref_dir: Path,
    fov_dir: Path | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    out_dir: Path | None = None,
) -> EvalResult:
    """Pair, score and summarise (see the module docstring); ``out_dir`` is only left out of the discovery.
    Raises ``UsageError`` when nothing pairs."""
    from fundus_pipeline.runner import refuse_while_written

    enh_dir, ref_dir = Path(enh_dir), Path(ref_dir)
    fov_dir = Path(fov_dir) if fov_dir is not None else None
    refuse_while_written(enh_dir, "ENH_DIR")
    others = [Path(p).resolve() for p in (ref_dir, fov_dir, out_dir) if p is not None]
    exclude = [p for p in others if p != enh_dir.resolve()]  # other inputs / the reports inside ENH_DIR
    found = [(k, p) for k, p in _discover(enh_dir) if not any(e in p.resolve().parents for e in exclude)]
    enhanced = _index(found, "enhanced")
    refs = _index(_discover(ref_dir), "reference")
    fovs = _index(_discover(fov_dir), "FOV mask") if fov_dir is not None else None
    if not set(enhanced) & set(refs):
        raise UsageError(
            f"no enhanced image in {enh_dir} pairs with a reference in {ref_dir} "
            f"({len(enhanced)} enhanced, {len(refs)} references; keys are file names without {', '.join(SUFFIXES)})",
            variants_hint(enhanced, refs),
        )

    rows: list[dict[str, Any]] = []
    for k in sorted(enhanced):
        rp = refs.get(k)
        fp = fovs.get(k) if fovs is not None else None
        row: dict[str, Any] = {
            "key": k,
            "enhanced": str(enhanced[k]),
            "reference": str(rp) if rp else "",
            "fov": str(fp) if fp else ("" if fovs is not None else "estimated"),
        }
        if rp is None:
            row["status"] = "unpaired: no reference"
        elif fovs is not None and fp is None:
            row["status"] = "unpaired: no FOV mask"
        else:
            try:
                row.update(score_files(enhanced[k], rp, fp))
                row["status"] = "ok"
            except InputError as exc:
                row["status"] = f"error: {exc.message}"
        rows.append(row)

    ok = [r for r in rows if r["status"] == "ok"]
    problems = [r for r in rows if r["status"] != "ok"]
    ref_only = sorted(set(refs) - set(enhanced))
    values = np.array([[r[k] for k in METRIC_KEYS] for r in ok], dtype=np.float64).reshape(len(ok), len(METRIC_KEYS))
    summary: dict[str, Any] = {
        "task": "enhancement",
        "enh_dir": str(enh_dir),
        "ref_dir": str(ref_dir),
        "fov_dir": str(fov_dir) if fov_dir is not None else None,
        "fov": "mask folder" if fov_dir is not None else FOV_ESTIMATED,
        "resolution": "native",
        "n_images": len(ok),
        "n_unpaired": sum(r["status"].startswith("unpaired") for r in rows),
        "n_errors": sum(r["status"].startswith("error") for r in rows),
        "n_ref_without_enhanced": len(ref_only),
        "ref_without_enhanced": ref_only,
        "mean": _mean_std(values),
        "bootstrap": {"n": int(n_boot), "seed": int(seed), "method": BOOTSTRAP_METHOD},
        "problems": [{"key": r["key"], "status": r["status"]} for r in problems],
        "definitions": definitions(fov_dir),
    }
    notes = [ref_only_note(len(ref_only))] if ref_only else []
    if n_boot > 0 and ok:
        if len(ok) > 1:
            summary["ci95"] = {"mean": _bootstrap_ci(values, n_boot, seed)}
        else:  # one image: every resample is that image (a zero-width "interval")
            summary["ci95"] = {"mean": {k: [None, None] for k in METRIC_KEYS}}
            notes.append(one_cluster_note("image"))
    return EvalResult(
        rows=rows,
        summary=json_safe(summary),
        n_problems=len(problems),
        messages=[f"{r['key']}: {r['status']}" for r in problems],
        notes=notes,
    )


# --------------------------------------------------------------------------------------------- outputs
def metrics_csv(rows: list[dict[str, Any]]) -> bytes:
    """metrics.csv: one row per enhanced image (problems included, with their status), sorted by key."""
    return segment_metrics_csv(rows, CSV_COLUMNS)


def summary_table(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """Header and rows (metric, mean, std[, mean 95% CI]) for the human and Markdown tables."""
    with_ci = "ci95" in summary
    rows: list[tuple[str, ...]] = [("metric", "mean", "std") + (("mean 95% CI",) if with_ci else ())]
    for k in METRIC_KEYS:
        row = (LABELS[k], _num(summary["mean"][k]), _num(summary["mean"][k + "_std"]))
        if with_ci:
            lo, hi = summary["ci95"]["mean"][k]
            row += (f"[{_num(lo)}, {_num(hi)}]",)
        rows.append(row)
    return rows


def _counts(summary: dict[str, Any]) -> str:
    n_ref_only = summary["n_ref_without_enhanced"]
    return (
        f"{summary['n_images']} images scored (unpaired {summary['n_unpaired']}, errors {summary['n_errors']}"
        + (f", {n_ref_only} references without enhanced image" if n_ref_only else "")
        + ")"
    )


def summary_human(summary: dict[str, Any]) -> str:
    """A short plain-text table for the terminal."""
    return "\n".join([f"{_counts(summary)}; native resolution; FOV: {summary['fov']}", *text_table(summary_table(summary))])


def summary_markdown(summary: dict[str, Any]) -> str:
    """summary.md: inputs, counts, the metric table and the definitions."""
    lines = [
        "# Enhancement evaluation",
        "",
        f"- enhanced: `{summary['enh_dir']}`",
        f"- reference: `{summary['ref_dir']}`",
        f"- FOV: {summary['fov']}" + (f" `{summary['fov_dir']}`" if summary["fov_dir"] else ""),
        f"- {_counts(summary)}",
    ]
    if summary["n_ref_without_enhanced"]:
        keys = ", ".join(f"`{k}`" for k in summary["ref_without_enhanced"])
        lines.append(f"- references without enhanced image (not scored): {summary['n_ref_without_enhanced']} ({keys})")
    if "ci95" in summary:
        lines.append(f"- bootstrap: {summary['bootstrap']['n']} resamples, seed {summary['bootstrap']['seed']}")
    else:
        lines.append("- bootstrap: none (no confidence intervals)")
    table = summary_table(summary)
    header = tuple("mean of images" if h == "mean" else h for h in table[0])
    lines += ["", *markdown_table([header, *table[1:]])]
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in summary["definitions"].items()] + [""]
    if summary["problems"]:
        lines += ["## Not scored", ""] + [f"- `{p['key']}`: {p['status']}" for p in summary["problems"]] + [""]
    return "\n".join(lines)


def write_outputs(result: EvalResult, out_dir: Path) -> list[Path]:
    """The enhancement reports of ``result`` (see ``segment.write_reports``)."""
    return write_reports(out_dir, metrics_csv(result.rows), result.summary, summary_markdown(result.summary))
