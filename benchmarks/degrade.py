"""Speed and memory of `fundus degrade`. Prints one JSON document.

- images/s at DRIVE size (565x584) and HRF size (3504x2336), 1 and 2 workers, code 111 (released);
- the ratio of degrade time to plain read + PNG write time of the same images (goal: <= 3x for
  DRIVE size on 1 worker);
- peak resident memory of a run over 50 and over 200 images (must stay flat).

Uses the real DRIVE/HRF images when ../shared/data is present, else synthetic fundus-like images of
the same sizes. Usage: python benchmarks/degrade.py [--drive N] [--hrf N] [--memory-images N (more than 50)]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _args, beside this script

from _args import count  # noqa: E402

from fundus_pipeline.datasets import default_data_root  # noqa: E402
from fundus_pipeline.io import discover_images, read_image, write_image_atomic  # noqa: E402
from fundus_pipeline.runner import environment  # noqa: E402


def synthetic(h: int, w: int, seed: int) -> np.ndarray:
    from tests.conftest import synthetic_fundus

    return synthetic_fundus(h, w, seed)


def make_set(folder: Path, kind: str, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    root = default_data_root()
    if kind == "drive":
        src = sorted((root / "DRIVE" / "test" / "images").glob("*.tif"))
        shape = (584, 565)
    else:
        src = sorted((root / "HRF" / "images").glob("*.*"))
        shape = (2336, 3504)
    for i in range(n):
        if src:
            arr, _ = read_image(src[i % len(src)])
        else:
            arr = synthetic(*shape, seed=i)
        write_image_atomic(folder / f"{kind}_{i:03d}.png", arr)
    return folder


def time_degrade(in_dir: Path, workers: int, reps: int = 1) -> float:
    from fundus_pipeline.runner import run_stage
    from fundus_pipeline.config import DegradeConfig
    from fundus_pipeline.stages.degrade import DegradeStage

    best = float("inf")
    for r in range(reps):
        out = in_dir.parent / f"out_{in_dir.name}_{workers}_{r}"
        t = time.perf_counter()
        res = run_stage(DegradeStage(DegradeConfig(types=["111"], seed=0)), in_dir, out, workers=workers, progress=False)
        best = min(best, time.perf_counter() - t)
        assert res.counts["error"] == 0, res.failed
    return best


def time_read_write(in_dir: Path, reps: int = 1) -> float:
    items = discover_images(in_dir)
    best = float("inf")
    for r in range(reps):
        out = in_dir.parent / f"rw_{in_dir.name}_{r}"
        t = time.perf_counter()
        for it in items:
            arr, _ = read_image(it.path)
            write_image_atomic(out / f"{it.key}.png", arr)
        best = min(best, time.perf_counter() - t)
    return best


def peak_rss_mb(in_dir: Path, n: int) -> float:
    code = (
        "import sys;from pathlib import Path;"
        "from fundus_pipeline.config import DegradeConfig;from fundus_pipeline.runner import run_stage;"
        "from fundus_pipeline.stages.degrade import DegradeStage;"
        f"lst=Path({str(in_dir.parent / f'list_{n}.txt')!r});"
        f"lst.write_text(''.join(str(p)+chr(10) for p in sorted(Path({str(in_dir)!r}).glob('*'))[:{n}]));"  # the first n images, as a list input
        f"run_stage(DegradeStage(DegradeConfig(types=['111'])),lst,Path({str(in_dir.parent / f'mem_{n}')!r}),progress=False);"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"  # peak RSS in kB; ru_maxrss would inherit the parent's across fork+exec
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return int(out.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--drive", type=count(1), default=20)
    ap.add_argument("--hrf", type=count(1), default=4)
    ap.add_argument("--memory-images", type=count(51), default=200, help="compared with a run over 50 images: more than 50")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        drive = make_set(tmp / "drive", "drive", args.drive)
        hrf = make_set(tmp / "hrf", "hrf", args.hrf)
        rw_d = time_read_write(drive, reps=2)
        d1 = time_degrade(drive, 1, reps=2)
        d2 = time_degrade(drive, 2)
        rw_h = time_read_write(hrf)
        h1 = time_degrade(hrf, 1)
        h2 = time_degrade(hrf, 2)
        mem_set = make_set(tmp / "mem", "drive", args.memory_images)
        m_small = peak_rss_mb(mem_set, 50)
        m_big = peak_rss_mb(mem_set, args.memory_images)
    result = {
        "machine": environment(),
        "data": "real DRIVE/HRF" if (default_data_root() / "DRIVE").is_dir() else "synthetic",
        "drive_size": {"images": args.drive, "images_per_s_1_worker": round(args.drive / d1, 2), "images_per_s_2_workers": round(args.drive / d2, 2), "read_write_images_per_s": round(args.drive / rw_d, 2), "degrade_over_read_write": round(d1 / rw_d, 2), "goal_ratio_at_most": 3.0},
        "hrf_size": {"images": args.hrf, "images_per_s_1_worker": round(args.hrf / h1, 3), "images_per_s_2_workers": round(args.hrf / h2, 3), "read_write_images_per_s": round(args.hrf / rw_h, 3), "degrade_over_read_write": round(h1 / rw_h, 2)},
        "peak_rss_mb": {"50_images": round(m_small, 1), f"{args.memory_images}_images": round(m_big, 1), "growth_mb": round(m_big - m_small, 1)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
