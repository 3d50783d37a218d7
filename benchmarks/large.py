"""Peak memory and time of each stage on one very large photograph. Prints one JSON document.

The photograph: a 12000x9000 RGB JPEG (108 megapixels, 324 MB decoded), an HRF photograph upscaled when
../shared/data is present, else a synthetic fundus. Each command runs in a fresh process; its peak
resident memory is the child's ru_maxrss. Goal (README, "Very large photographs"): memory bounded by
the decoded photograph, its output and bands of rows, not by float copies of it.

Usage: python benchmarks/large.py [--size 12000x9000] [--only degrade,degrade_severe,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _args, beside this script

from _args import names, size  # noqa: E402

from fundus_pipeline.runner import environment  # noqa: E402

COMMANDS = {
    "degrade": ["degrade", "{inp}", "{out}", "--types", "111"],
    "degrade_3_types": ["degrade", "{inp}", "{out}", "--types", "001,010,111"],
    "degrade_severe": ["degrade", "{inp}", "{out}", "--recipe", "severe", "--seed", "31"],
    "segment": ["segment", "{inp}", "{out}"],
    "enhance_no_vessel_stats": ["enhance", "{inp}", "{out}", "--no-vessel-stats"],
    "enhance": ["enhance", "{inp}", "{out}"],
}

_MAKE = r"""
import sys, cv2, numpy as np
from pathlib import Path
w, h, dst = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
from fundus_pipeline.datasets import default_data_root
src = default_data_root() / "HRF" / "images" / "01_h.jpg"
if src.is_file():
    img = cv2.imread(str(src), cv2.IMREAD_COLOR)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
    print("HRF 01_h upscaled")
else:
    from tests.conftest import synthetic_fundus
    img = synthetic_fundus(h, w, 0)[..., ::-1]
    print("synthetic")
cv2.imwrite(dst, img, [cv2.IMWRITE_JPEG_QUALITY, 95])
"""


def run(cmd: list[str]) -> tuple[float, float, int]:
    """(wall s, peak RSS MB of the child, exit code), in a fresh process."""
    code = (
        "import resource, subprocess, sys, time, json\n"
        "t = time.perf_counter(); rc = subprocess.call(sys.argv[1:])\n"
        "print(json.dumps([time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=size, default=(12000, 9000), help="WIDTHxHEIGHT")
    ap.add_argument("--only", type=names(COMMANDS), default=list(COMMANDS), help="comma-separated: " + ", ".join(COMMANDS))
    args = ap.parse_args()
    w, h = args.size
    fundus = [sys.executable, "-m", "fundus_pipeline"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "in"
        inp.mkdir()
        made = subprocess.run([sys.executable, "-c", _MAKE, str(w), str(h), str(inp / "large.jpg")], capture_output=True, text=True, check=True)
        source = made.stdout.strip().splitlines()[-1]
        for name in args.only:
            out = Path(tmp) / f"out_{name}"
            cmd = fundus + [a.format(inp=inp, out=out) for a in COMMANDS[name]] + ["--workers", "1", "--quiet"]
            wall, rss, rc = run(cmd)
            results[name] = {"peak_rss_mb": round(rss, 1), "wall_s": round(wall, 1), "exit_code": rc}
    print(json.dumps({
        "machine": environment(),
        "photograph": {"width": w, "height": h, "megapixels": round(w * h / 1e6, 1), "decoded_mb": round(w * h * 3 / 1e6, 1), "source": source},
        "commands": results,
        "note": "ru_maxrss of each command's process; times depend on what else shares the cores",
    }, indent=2))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
