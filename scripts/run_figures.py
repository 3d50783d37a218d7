"""The README's figures of `fundus run` on real data ("Measured: what the chain buys on DRIVE test" and
"Measured on real poor photographs"), from the runs' joined tables, so that each figure has a file to cite.

    D=../shared/data
    fundus run $D/DRIVE/test/images runs/drive --simulate 111 --ground-truth $D/DRIVE/test/1st_manual --workers 2
    fundus run $D/DRIVE/test/images runs/drive_forced --simulate 111 --ground-truth $D/DRIVE/test/1st_manual --workers 2 --min-gain -1
    fundus run $D/CofeNet/img/image runs/cofenet --workers 2
    python scripts/run_figures.py --drive runs/drive --drive-forced runs/drive_forced --cofenet runs/cofenet --out docs/run_results

Copies each run's results.csv into OUT (the data root in its paths written as ``<data>``) and writes
OUT/summary.json; prints the same JSON. Any of the three runs may be left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import Counter
from pathlib import Path

from fundus_pipeline.datasets import default_data_root
from fundus_pipeline.errors import UsageError, run_script

MEANS = ("psnr_before", "psnr_after", "ssim_before", "ssim_after", "f1_before", "f1_after", "f1_gt_before", "f1_gt_after")


def read_rows(run: Path) -> list[dict]:
    table = run / "results.csv"
    if not table.is_file():
        raise UsageError(f"{run} holds no results.csv of a `fundus run`")
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    bad = [r["key"] for r in rows if r["status"] != "ok"]
    if bad:
        raise UsageError(f"{run}: {len(bad)} photographs did not finish ({bad[0]}, ...); finish the run with --resume first")
    return rows


def gains(rows: list[dict]) -> dict:
    g = [float(r["score_gain"]) for r in rows]
    return {"min": min(g), "median": round(statistics.median(g), 6), "max": max(g)} if g else {}


def simulate_figures(rows: list[dict], forced: list[dict] | None) -> dict:
    enhanced = [r for r in rows if r["enhanced"] == "yes"]
    trusted = [r for r in enhanced if r["segmented"] == "enhanced"]
    out = {
        "photographs": len(rows),
        "enhanced": len(enhanced),
        "not_enhanced": {r["key"]: {"grade": r["grade"], "p_good": float(r["p_good"])} for r in rows if r["enhanced"] != "yes"},
        "trusted": [r["key"] for r in trusted],
        "score_gain_of_enhanced": gains(enhanced),
        "means_over_enhanced_default_gate": {c: round(statistics.mean(float(r[c]) for r in enhanced), 4) for c in MEANS if enhanced},
    }
    if forced is not None:
        keys = {r["key"] for r in enhanced}
        fe = [r for r in forced if r["key"] in keys]
        if {r["key"] for r in fe if r["enhanced"] == "yes" and r["segmented"] == "enhanced"} != keys:
            raise UsageError("the forced run (--min-gain -1) did not enhance and trust the same photographs the default run enhanced")
        out["means_over_enhanced_every_enhancement_trusted"] = {c: round(statistics.mean(float(r[c]) for r in fe), 4) for c in MEANS}
        out["psnr_gain_per_photograph"] = {r["key"]: round(float(r["psnr_after"]) - float(r["psnr_before"]), 2) for r in fe}
    return out


def real_figures(rows: list[dict]) -> dict:
    enhanced = [r for r in rows if r["enhanced"] == "yes"]
    flags = Counter(f for r in rows for f in r["flags"].split())
    return {
        "photographs": len(rows),
        "grades": dict(Counter(r["grade"] for r in rows)),
        "flags": dict(flags.most_common()),
        "enhanced": len(enhanced),
        "trusted": sum(r["segmented"] == "enhanced" for r in enhanced),
        "score_gain_of_enhanced": gains(enhanced),
        "warnings": sum(bool(r["warning"]) for r in rows),
    }


def copy_table(run: Path, dest: Path) -> None:
    root = str(default_data_root().resolve())
    text = (run / "results.csv").read_text().replace(root, "<data>")
    dest.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drive", type=Path, help="fundus run --simulate 111 of the DRIVE test images (default gate)")
    ap.add_argument("--drive-forced", type=Path, help="the same with --min-gain -1 (every enhancement trusted)")
    ap.add_argument("--cofenet", type=Path, help="fundus run of the 100 real CofeNet photographs")
    ap.add_argument("--out", type=Path, help="folder for the copied tables and summary.json")
    a = ap.parse_args()
    if not (a.drive or a.cofenet):
        from fundus_pipeline.errors import UsageError

        raise UsageError("give the runs to summarise: --drive RUN [--drive-forced RUN] and/or --cofenet RUN (see the docstring)")
    summary: dict = {}
    if a.drive:
        summary["drive_simulate_111"] = simulate_figures(read_rows(a.drive), read_rows(a.drive_forced) if a.drive_forced else None)
    if a.cofenet:
        summary["cofenet_real"] = real_figures(read_rows(a.cofenet))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        for run, name in ((a.drive, "drive_simulate_111"), (a.drive_forced, "drive_simulate_111_min_gain_-1"), (a.cofenet, "cofenet_real")):
            if run:
                copy_table(run, a.out / f"{name}.csv")
        (a.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run_script(main)
