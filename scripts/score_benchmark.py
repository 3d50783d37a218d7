"""The quality scorer's benchmark on the test part of a quality set: one table of SROCC / PLCC / KROCC /
RMSE (bootstrap CIs over source photographs) for the learned scorers and the classical baselines, and the
ranking check of the issue.

    python scripts/score_benchmark.py sets/quality --scores sdmp=runs/score_sdmp/results.csv [NAME=CSV ...] \
        --out docs/score_benchmark

Baselines, computed here on every test pair (cached in OUT/baselines.csv), inside the FOV estimated on
the reference (the degraded photograph), at the set's resolution:
- full-reference, between the degraded reference and the enhanced image: PSNR, SSIM, MS-SSIM
  (``fundus_pipeline.evaluation.image_metrics``, as ``fundus evaluate enhance`` defines them);
- no-reference, on the enhanced image alone: FOV contrast, sharpness (variance of the Laplacian),
  entropy (``fundus_pipeline.evaluation.score``).
Every column is taken as "higher = better", as it is computed.

Ranking check: for each test degraded image (one per source and draw), does the scorer rank a shipped
Cofe-Net's enhancement (``--enhancers``, default ``cofe`` and the default enhancer ``cofe_add_seg``, each
where the set has it) above identity, and above every harmful enhancer? Reported as the fraction of
degraded images where it does, for each scorer and for the label itself.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fundus_pipeline.evaluation.enhance import read_rgb  # noqa: E402
from fundus_pipeline.evaluation.image_metrics import score_pair  # noqa: E402
from fundus_pipeline.evaluation.score import evaluate_scores, nr_contrast, nr_entropy, nr_sharpness  # noqa: E402
from fundus_pipeline.stages.base import Fov  # noqa: E402

BASELINES = ("psnr", "ssim", "ms_ssim", "nr_contrast", "nr_sharpness", "nr_entropy")
HARMFUL = ("oversharpen", "blur", "colour_cast")


def pairs(set_dir: Path, part: str) -> list[dict]:
    with open(set_dir / "pairs.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["part"] == part]


def baselines(set_dir: Path, rows: list[dict], cache: Path) -> Path:
    done = {}
    if cache.is_file():
        done = {r["key"]: r for r in csv.DictReader(open(cache, newline=""))}
    refs: dict[str, tuple[np.ndarray, Fov]] = {}
    out = []
    for i, r in enumerate(rows):
        if r["key"] in done:
            out.append(done[r["key"]])
            continue
        if r["degraded_key"] not in refs:
            ref = read_rgb(set_dir / r["part"] / "degraded" / f"{r['degraded_key']}.png")
            refs = {r["degraded_key"]: (ref, Fov.estimate(ref))}  # pairs of one degraded image are consecutive
        ref, fov = refs[r["degraded_key"]]
        enh = read_rgb(set_dir / r["part"] / "enhanced" / f"{r['key']}.png")
        fr = score_pair(enh, ref, fov.mask)
        row = {"key": r["key"], "status": "ok", "psnr": fr["psnr"],
               "ssim": fr["ssim"], "ms_ssim": fr["ms_ssim"], "nr_contrast": nr_contrast(enh, fov.mask),
               "nr_sharpness": nr_sharpness(enh, fov.mask), "nr_entropy": nr_entropy(enh, fov.mask)}  # fmt: skip
        out.append(row)
        if i % 100 == 0:
            print(f"baselines {i}/{len(rows)}", file=sys.stderr, flush=True)
    with open(cache, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["key", "status", *BASELINES], lineterminator="\n")
        w.writeheader()
        w.writerows(out)
    return cache


def ranking(scores: dict[str, float], rows: list[dict], enhancer: str = "cofe") -> dict[str, float]:
    """Fractions of degraded images where ``enhancer``'s enhancement scores above identity / every harmful one."""
    by: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["key"] in scores:
            by.setdefault(r["degraded_key"], {})[r["enhancer"]] = scores[r["key"]]
    full = [e for e in by.values() if all(o in e for o in (enhancer, "identity", *HARMFUL))]
    n = max(len(full), 1)  # ties count as "not above"
    return {
        "n_degraded": len(full),
        "above_identity": sum(e[enhancer] > e["identity"] for e in full) / n,
        "above_every_harmful": sum(all(e[enhancer] > e[h] for h in HARMFUL) for e in full) / n,
        "above_identity_and_every_harmful": sum(all(e[enhancer] > e[o] for o in ("identity", *HARMFUL)) for e in full) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("set", type=Path)
    ap.add_argument("--scores", action="append", default=[], help="NAME=results.csv of `fundus score` on SET/test")
    ap.add_argument("--part", default="test")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--enhancers", default="cofe,cofe_add_seg", help="the Cofe-Nets of the ranking check (those the set has)")
    ap.add_argument("--out", type=Path, default=Path("docs/score_benchmark"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = pairs(args.set, args.part)
    present = {r["enhancer"] for r in rows}
    cofes = [e for e in args.enhancers.split(",") if e in present]
    base = baselines(args.set, rows, args.out / "baselines.csv")
    labels = args.set / "pairs.csv"
    table: dict[str, dict] = {}
    def ranks_of(got: dict[str, float]) -> dict[str, dict]:
        return {e: ranking(got, rows, e) for e in cofes}

    ranks: dict[str, dict] = {"label": ranks_of({r["key"]: float(r["label"]) for r in rows})}
    for spec in args.scores:
        name, _, path = spec.partition("=")
        res = evaluate_scores(Path(path), labels, column="score", by=("enhancer_kind", "family"), part=args.part, n_boot=args.bootstrap)
        table[name] = res.summary
        got = {r["key"]: float(r["score"]) for r in csv.DictReader(open(path, newline="")) if r.get("status", "ok") == "ok" and r["score"]}
        ranks[name] = ranks_of(got)
    for col in BASELINES:
        res = evaluate_scores(base, labels, column=col, by=("enhancer_kind", "family"), part=args.part, n_boot=args.bootstrap)
        table[col] = res.summary
        got = {r["key"]: float(r[col]) for r in csv.DictReader(open(base, newline=""))}
        ranks[col] = ranks_of(got)

    def fmt(s: dict, k: str) -> str:
        o = s["overall"]
        ci = (o.get("ci95") or {}).get(k)
        return f"{o[k]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    def cells(r: dict) -> str:
        return " | ".join(f"{100 * r[e]['above_identity']:.0f}% | {100 * r[e]['above_every_harmful']:.0f}%" for e in cofes)

    head = "".join(f" `{e}` > identity | `{e}` > every harmful |" for e in cofes)
    lines = [f"| predictor | SROCC [95% CI] | PLCC [95% CI] | KROCC | RMSE |{head}", "|---|---|---|---|---|" + "---|" * (2 * len(cofes))]
    for name, s in table.items():
        lines.append(f"| {name} | {fmt(s, 'srocc')} | {fmt(s, 'plcc')} | {s['overall']['krocc']:.3f} | {s['overall']['rmse']:.3f} | {cells(ranks[name])} |")
    lines.append(f"| (the label itself) | 1 | 1 | 1 | 0 | {cells(ranks['label'])} |")
    n = next(iter(table.values()))["overall"]["n"] if table else 0
    n_deg = ranks["label"][cofes[0]]["n_degraded"] if cofes else 0
    md = f"Test part of the quality set: {n} pairs, {n_deg} degraded images.\n\n" + "\n".join(lines) + "\n"
    (args.out / "summary.md").write_text(md)
    (args.out / "summary.json").write_text(json.dumps({"metrics": {k: v["overall"] for k, v in table.items()}, "ranking": ranks}, indent=1, default=str) + "\n")
    print(md)


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
