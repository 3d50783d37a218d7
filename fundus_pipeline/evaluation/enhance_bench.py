"""The enhancement benchmark's machinery: enhancers as ``fundus enhance`` runs them, the shipped segmenter
as ``fundus segment`` runs it, and per-image scoring against clean originals and manual vessels (used by
scripts/enhance_benchmark.py and scripts/choose_transfer.py)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from fundus_pipeline.classical import CLASSICAL
from fundus_pipeline.datasets import DRIVE_TEST, HRF_TEST, drive_paths, hrf_paths
from fundus_pipeline.evaluation.metrics import auc_roc, binary_metrics, cldice, confusion
from fundus_pipeline.evaluation.segment import read_binary
from fundus_pipeline.io import read_image, to_float_rgb
from fundus_pipeline.models.inference import predict_native, working_scale
from fundus_pipeline.stages.base import Fov

CODES = ("001", "010", "011", "100", "101", "110", "111")
RECIPES = ("mild", "moderate", "severe")
CONDITIONS = tuple(f"released_{c}" for c in CODES) + RECIPES + ("clean", "authors_pairs")


def read_rgb(path: Path) -> np.ndarray:
    arr, meta = read_image(path)
    return to_float_rgb(arr, meta)[0]


def test_items(root: Path, ds: str) -> list[dict]:
    ids = DRIVE_TEST if ds == "drive" else HRF_TEST
    out = []
    for i in ids:
        p = drive_paths(root, i) if ds == "drive" else hrf_paths(root, i)
        key = p["image"].stem
        gt = p["vessels"] if p["vessels"].is_file() else None
        out.append({"key": key, "image": p["image"], "fov": p["fov"], "vessels": gt})
    return out


def degraded_path(bench: Path, ds: str, cond: str, key: str, image: Path) -> Path:
    if cond == "clean":
        return image
    if cond.startswith("released_"):
        p = bench / ds / "released" / f"{key}_{cond.split('_')[1]}.png"
        return p if p.is_file() else bench / ds / "released" / f"{key}.png"  # built with one type: no suffix
    return bench / ds / cond / f"{key}.png"


class Method:
    """An enhancer by name: ``identity``, ``clahe``, a weights name, or ``NAME=FILE`` (see the script's help);
    a name ending in ``~sSIGMA`` (``cofe~s32``) low-passes the correction with that sigma instead of the
    weights' ``correction_sigma``. ``transfer`` overrides the weights' rule for returning to native resolution."""

    def __init__(self, spec: str, transfer: str | None = None):
        from fundus_pipeline.models.weights import load_model

        self.name, _, path = spec.partition("=")
        base, _, sigma = self.name.partition("~s")
        self.fn = CLASSICAL.get(self.name)
        self.model = None
        if self.fn is None:
            arch = base.split("@")[0] if path else None
            self.model, self.loaded = load_model(path or base, arch=arch, task="enhancement")
            from fundus_pipeline.stages.enhance import output_rules

            self.size, self.transfer, self.sigma = output_rules(self.loaded.spec, transfer, float(sigma) if sigma else None)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        from fundus_pipeline.stages.enhance import enhance_native

        fov = Fov.estimate(rgb)
        if self.fn is not None:
            return self.fn(rgb, fov.mask)
        return enhance_native(self.model, rgb, fov.mask, fov.geometry, self.size, self.transfer, "cpu", self.sigma)


class Segmenter:
    def __init__(self):
        from fundus_pipeline.models.weights import load_model

        self.model, self.spec = load_model("imff", task="segmentation")

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        fov = Fov.estimate(rgb)
        return predict_native(self.model, rgb, fov.mask, working_scale(fov.geometry.diameter, self.spec.max_fov_diameter))


def vessel_scores(prob: np.ndarray, gt: np.ndarray, fov: np.ndarray, threshold: float) -> dict:
    pred = prob >= threshold
    m = binary_metrics(*confusion(pred, gt, fov, threshold))
    return {"f1": m["f1"], "auc_roc": auc_roc(prob, gt, fov), "cldice": cldice(pred, gt, fov)}


def scores(out: np.ndarray, clean: np.ndarray, fov: np.ndarray, gt: np.ndarray, seg: Segmenter) -> dict:
    """``out`` against ``clean`` inside ``fov`` (``score_pair``) and the segmenter's map of it against ``gt``."""
    from fundus_pipeline.evaluation.image_metrics import score_pair

    return {**score_pair(out, clean, fov), **vessel_scores(seg(out), gt, fov, seg.spec.threshold)}


def degrade_as_written(degrader, clean: np.ndarray, fov: np.ndarray, seed: int, key: str) -> np.ndarray:
    """``clean`` degraded with parameters drawn from (seed, key) for its FOV mask ``fov``, quantised to 8 bits as
    `fundus degrade` writes it (the validation measurements of scripts/choose_*.py)."""
    from degradation import soft_fov_mask
    from degradation.fov import fov_geometry

    geom = fov_geometry(fov)
    params = degrader.sample(seed=seed, key=key, fov=geom)
    return np.floor(degrader.apply(clean, params, soft_fov_mask(fov, geom), levels=255) * 255) / 255


def bench_build(bench: Path, ds: str) -> str:
    """The build of BENCH's ``ds`` part: the first 16 hex digits of the sha256 of its images' sha256 table in
    BENCH/benchmark.json. Each row records the build it was measured on."""
    from fundus_pipeline.errors import UsageError

    try:
        table = json.loads((bench / "benchmark.json").read_text(encoding="utf-8"))["datasets"][ds]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"BENCH {bench} holds no built {ds} part (its benchmark.json does not list one)",
                         hint=f"build it: python scripts/build_enhance_benchmark.py {bench} --datasets {ds}") from None
    return hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()[:16]


def cached_rows(rows_path: Path, build: str) -> list[dict]:
    """The rows an earlier command measured into ``rows_path``; rows of another build of the benchmark are refused
    (they would be mixed with this build's in one mean). Rows written before 2026-12-05 record no build: kept."""
    from fundus_pipeline.errors import UsageError

    rows = json.loads(rows_path.read_text()) if rows_path.is_file() else []
    other = {r["bench"] for r in rows if r.get("bench", build) != build}
    if other:
        raise UsageError(f"{rows_path} holds rows measured on another build of the benchmark ({', '.join(sorted(other))}; "
                         f"this one is {build})", hint="score into a fresh --out, or remove that file to measure its rows again")
    return rows


def run_method(method: Method, seg: Segmenter, bench: Path, root: Path, ds: str, rows_path: Path, conditions,
               build: str) -> tuple[list[dict], int]:
    """(the rows of ``method`` on ``ds``, how many of them were measured now): the rows cached in ``rows_path``
    (see ``cached_rows``) are read back, the missing ones measured and appended, each recording ``build``."""
    from fundus_pipeline.evaluation.image_metrics import score_pair

    rows = cached_rows(rows_path, build)
    cached = len(rows)
    done = {(r["key"], r["condition"]) for r in rows}
    for item in test_items(root, ds):
        clean = None
        for cond in conditions:
            if (item["key"], cond) in done:
                continue
            if clean is None:
                clean = read_rgb(item["image"])
                fov = read_binary(item["fov"])
                gt = read_binary(item["vessels"]) if item["vessels"] else None
            t = time.time()
            out = method(read_rgb(degraded_path(bench, ds, cond, item["key"], item["image"])))
            t_enh = time.time() - t
            row = {"key": item["key"], "condition": cond, **score_pair(out, clean, fov), "seconds": round(t_enh, 3)}
            if gt is not None:
                row.update(vessel_scores(seg(out), gt, fov, seg.spec.threshold))
            rows.append({**row, "bench": build})
            rows_path.write_text(json.dumps(rows))
    return rows, len(rows) - cached


def summarise(all_rows: dict) -> dict:
    """Mean scores by dataset, condition and method, in one order whatever the order of ``all_rows`` (datasets
    and methods by name, conditions as in ``CONDITIONS``): the summary a command rewrites from the cached rows
    does not depend on which methods that command scored (campaign 32b F1)."""
    out: dict = {}
    for (method, ds), rows in sorted(all_rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for cond in CONDITIONS:
            rs = [r for r in rows if r["condition"] == cond]
            if not rs:
                continue
            agg = {k: round(float(np.nanmean([r[k] for r in rs if k in r])), 4) for k in ("psnr", "ssim", "ms_ssim", "ciede2000", "f1", "auc_roc", "cldice", "seconds") if any(k in r for r in rs)}
            agg["n"] = len(rs)
            out.setdefault(ds, {}).setdefault(cond, {})[method] = agg
    return {ds: {c: conds[c] for c in CONDITIONS if c in conds} for ds, conds in out.items()}


def markdown(summary: dict) -> str:
    lines = []
    for ds, conds in summary.items():
        lines += [f"### {ds.upper()} test", "", "| degradation | method | PSNR dB | SSIM | MS-SSIM | CIEDE2000 | vessel F1 | AUC | clDice |", "|---|---|---|---|---|---|---|---|---|"]
        for cond, methods in conds.items():
            for m, a in methods.items():
                f = lambda k, nd=4: f"{a[k]:.{nd}f}" if k in a else "-"  # noqa: E731
                lines.append(f"| {cond} | {m} | {f('psnr', 2)} | {f('ssim')} | {f('ms_ssim')} | {f('ciede2000', 2)} | {f('f1')} | {f('auc_roc')} | {f('cldice')} |")
        lines.append("")
    return "\n".join(lines)


def authors_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    """The Cofe-Net authors' 8 synthetic pairs (256x256): (id, degraded ``<id>_fuse.png``, clean ``<id>.png``)."""
    d = root / "CofeNet" / "img"
    return [(p.name[: -len("_fuse.png")], p, d / p.name.replace("_fuse", "")) for p in sorted(d.glob("*_fuse.png"))]


def run_authors_pairs(method: Method, seg: Segmenter, root: Path) -> list[dict]:
    """Each pair scored like the benchmark; the vessel reference is the segmenter's map of the clean twin
    (no manual annotation exists), inside the FOV estimated on the clean twin."""
    rows = []
    for ident, fuse, clean_path in authors_pairs(root):
        clean = read_rgb(clean_path)
        fov = Fov.estimate(clean).mask
        ref = seg(clean) >= seg.spec.threshold
        out = method(read_rgb(fuse))
        rows.append({"key": ident, "condition": "authors_pairs", **scores(out, clean, fov, ref, seg)})
    return rows
