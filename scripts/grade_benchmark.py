"""The grader's benchmark: run `fundus grade` with each shipped grading model over the synthetic test part
and the real test sets, evaluate with `fundus evaluate grade`, and write one table.

    python scripts/grade_benchmark.py sets/grade --methods hemf,hemf_local,hemf_global,hemf_nomhea,grade_cnn \
        --work runs/grade_bench --out docs/grade_benchmark
    python scripts/grade_benchmark.py --sets clean_test,cofenet_real,eyepacs_test --out /tmp/check   # the real sets alone

The default --out holds the published tables (benchmark.json is merged into): give another to check them.

Sets (none of them is used for training, checkpoint choice or calibration):
  synthetic      the grade set's test part: DRIVE 01-20 and HRF 06-15, clean and degraded, plus the
                 held-out not-fundus pictures (astronaut, coffee, brick, coins, hubble_deep_field)
  clean_test     the raw DRIVE test (20) and HRF test (06-15, 30) photographs: expected Good
  cofenet_real   the 100 real low-quality photographs of ../shared/data/CofeNet/img/image (EyeQ: Usable)
  eyeq_full      the full-size EyePACS photographs of ../shared/data/EyeQ that have an EyeQ label (8)
  eyepacs_test   the EyePACS-256 test part (patient split, docs/grade/eyepacs256_split.csv)

Writes OUT/<method>__<set>/ (the evaluation reports), OUT/benchmark.json and OUT/benchmark.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from fundus_pipeline.config import GradeConfig
from fundus_pipeline.datasets import DRIVE_TEST, HRF_TEST, default_data_root, eyepacs256_split


def _keys(paths: list[Path]) -> list[str]:
    """The runner's keys of a list of input files (relative to their common folder, without extension)."""
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [p.relative_to(common).with_suffix("").as_posix() for p in paths]


def real_sets(root: Path) -> dict[str, list[tuple[Path, int]]]:
    """(path, EyeQ quality) of every photograph of each real set."""
    drive = [root / "DRIVE" / "test" / "images" / f"{i}_test.tif" for i in DRIVE_TEST]
    hrf_dir = root / "HRF" / "images"
    hrf = [next(p for p in hrf_dir.iterdir() if p.stem == i) for i in HRF_TEST]
    cofe = sorted((root / "CofeNet" / "img" / "image").glob("*.png"))
    split = eyepacs256_split(root)
    seen = {r["patient"] for r in split if r["split"] != "test"}  # patients the graders trained or were chosen on
    eyeq = []
    with open(root / "EyeQ" / "included_images_quality.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["quality"] != "" and Path(r["path"]).stem.split("_")[0] not in seen:  # e.g. patient 13: EyePACS-256 train
                eyeq.append((root / "EyeQ" / r["path"], int(r["quality"])))
    eyepacs = [(root / "EyePACS-256" / "images" / r["image"], r["quality"]) for r in split if r["split"] == "test"]
    return {
        "clean_test": [(p, 0) for p in drive + hrf],
        "cofenet_real": [(p, 1) for p in cofe],
        "eyeq_full": eyeq,
        "eyepacs_test": eyepacs,
    }


def write_inputs(work: Path, name: str, items: list[tuple[Path, int]]) -> tuple[Path, Path]:
    work.mkdir(parents=True, exist_ok=True)
    lst, lab = work / f"{name}.txt", work / f"{name}_labels.csv"
    lst.write_text("".join(f"{p}\n" for p, _ in items))
    with open(lab, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["key", "quality"])
        for key, (_, q) in zip(_keys([p for p, _ in items]), items):
            w.writerow([key, q])
    return lst, lab


def run(cmd: list[str]) -> int:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd).returncode


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and v != v) else f"{v:.{digits}f}"


def markdown(table: dict) -> str:
    """One row per (method, set): the headline figures of `fundus evaluate grade`."""
    head = "| method | set | n | accuracy | macro F1 | quadratic kappa | graded good / usable / reject | mean flag AUC | ECE before / after |"
    lines = [head, "|" + "---|" * 9]
    for key in sorted(table, key=lambda k: (table[k]["set"], table[k]["method"])):
        e = table[key]["summary"]
        lines.append(
            f"| `{table[key]['method']}` | {table[key]['set']} | {e['n']} | {_f(e['accuracy'])} | {_f(e['macro_f1'])} | {_f(e['kappa'])} | "
            f"{_f(e['pred_good'], 2)} / {_f(e['pred_usable'], 2)} / {_f(e['pred_reject'], 2)} | {_f(e['mean_flag_auc'])} | "
            f"{_f(e['ece_before'])} / {_f(e['ece_after'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("grade_set", type=Path, nargs="?", help="the grade set (fundus build grade-set); read by the synthetic set only")
    ap.add_argument("--methods", default=GradeConfig.model_fields["weights"].default)
    ap.add_argument("--sets", default="synthetic,clean_test,cofenet_real,eyeq_full,eyepacs_test")
    ap.add_argument("--work", type=Path, default=Path("runs/grade_bench"))
    ap.add_argument("--out", type=Path, default=Path("docs/grade_benchmark"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    root = default_data_root()
    wanted = [s for s in args.sets.split(",") if s]
    if "synthetic" in wanted and args.grade_set is None:  # (the real sets alone had needed a placeholder; campaign 36a L-2)
        ap.error("the synthetic set is the grade set's test part: give GRADE_SET, or --sets without synthetic")
    inputs: dict[str, tuple[Path, Path]] = {}
    if "synthetic" in wanted:
        inputs["synthetic"] = (args.grade_set / "test" / "images", args.grade_set / "labels.csv")
    for name, items in real_sets(root).items():
        if name in wanted:
            inputs[name] = write_inputs(args.work / "inputs", name, items)
    results_path = args.out / "benchmark.json"
    table = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for method in [m for m in args.methods.split(",") if m]:
        for name, (src, labels) in inputs.items():
            graded = args.work / method / name
            code = run(["fundus", "grade", str(src), str(graded), "--weights", method, "--threads", str(args.threads), "--quiet",
                        "--resume" if (graded / "manifest.json").is_file() else "--overwrite"])  # fmt: skip
            if code not in (0, 3):
                raise SystemExit(f"fundus grade failed ({code}) for {method} on {name}")
            ev = args.out / f"{method}__{name}"
            by = ["--by", "kind"] if name == "synthetic" else []
            code = run(["fundus", "evaluate", "grade", str(graded / "results.csv"), str(labels), "--out", str(ev),
                        "--bootstrap", str(args.bootstrap), "--format", "json", *by])  # fmt: skip
            summary = json.loads((ev / "summary.json").read_text())
            table[f"{method}__{name}"] = {"method": method, "set": name, "summary": summary.get("overall", summary)}
    args.out.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    (args.out / "benchmark.md").write_text(markdown(table))
    print(json.dumps({k: v["set"] for k, v in table.items()}, indent=1))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
