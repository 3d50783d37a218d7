"""Byte-identity check of `degrade` and `segment` outputs across a refactor.

    python scripts/identical_outputs.py IN_DIR WORK_DIR [--code-root CHECKOUT] > hashes.json

Runs a fixed set of degrade/segment commands (the code of CHECKOUT, default this checkout) on IN_DIR
and prints the sha256 of every image written. Compare two runs' JSON (e.g. a checkout of an older
commit against this one) to show that a change did not move any output byte.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

COMMANDS = {
    "degrade_all_s7": ["degrade", "{in}", "{out}", "--types", "all", "--seed", "7"],
    "degrade_training_s3": ["degrade", "{in}", "{out}", "--preset", "training", "--types", "111,010", "--seed", "3"],
    "degrade_moderate": ["degrade", "{in}", "{out}", "--recipe", "moderate", "--seed", "1"],
    "degrade_severe_j2": ["degrade", "{in}", "{out}", "--recipe", "severe", "--seed", "2", "--workers", "2"],
    "segment_imff_overlay": ["segment", "{in}", "{out}", "--overlay"],
    "segment_msrf_tiles": ["segment", "{in}", "{out}", "--weights", "msrf_w8", "--tile", "256", "--batch-size", "3"],
    "segment_fov_full_margin": ["segment", "{in}", "{out}", "--fov", "full", "--fov-margin", "0.02", "--threshold", "0.4"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("in_dir", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--code-root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--only", action="append", default=[])
    args = ap.parse_args()
    from fundus_pipeline.errors import FundusError, UsageError

    unknown = sorted(set(args.only) - set(COMMANDS))
    if unknown:
        raise UsageError(f"--only {unknown[0]!r}: not one of {', '.join(COMMANDS)}")
    if not args.in_dir.is_dir():
        raise UsageError(f"IN_DIR {args.in_dir} is not a folder")
    env = {**os.environ, "PYTHONPATH": str(args.code_root.resolve()), "FUNDUS_WEIGHTS": str(args.code_root.resolve() / "weights")}
    result = {}
    for name, argv in COMMANDS.items():
        if args.only and name not in args.only:
            continue
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "fundus_pipeline", *(a.format(**{"in": args.in_dir, "out": out}) for a in argv), "--format", "json"]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        hashes = {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.rglob("*.png"))}
        result[name] = {"exit_code": p.returncode, "outputs": hashes}
        print(f"{name}: exit {p.returncode}, {len(hashes)} images", file=sys.stderr)
    print(json.dumps(result, indent=1, sort_keys=True))
    bad = [n for n, r in result.items() if r["exit_code"] != 0 or not r["outputs"]]
    if bad:  # two runs that both failed would compare equal: the check must not pass on nothing
        raise FundusError(f"{len(bad)} command(s) failed or wrote no image, e.g. {bad[0]} (exit {result[bad[0]]['exit_code']})")


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
