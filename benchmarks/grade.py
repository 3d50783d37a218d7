"""Speed and memory of `fundus grade`. Prints one JSON document.

* Seconds per DRIVE photograph (565x584 TIFF) on this machine's CPU (threads = all cores), including
  decoding, the FOV estimate, the canonical frame and the network (the stage's whole per-item work).
  Goal: at most 0.2 s on 2 cores.
* Peak resident memory of `fundus grade` over 20 HRF photographs (3504x2336 JPEGs), as a child
  process (ru_maxrss). Goal: at most 2 GB.
* Images per second on CUDA (batch of one, as the stage runs) when a GPU is present.

Usage: python benchmarks/grade.py [--weights NAME (default: fundus grade's)] [--reps 10] [--hrf 20]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _args, beside this script

from _args import count  # noqa: E402

from fundus_pipeline.config import GradeConfig  # noqa: E402
from fundus_pipeline.datasets import HRF_TEST, default_data_root  # noqa: E402
from fundus_pipeline.io import read_image  # noqa: E402
from fundus_pipeline.stages.base import Fov, Image, ItemInput  # noqa: E402
from fundus_pipeline.stages.grade import GradeStage  # noqa: E402
from fundus_pipeline.runner import environment  # noqa: E402


def drive_path() -> Path:
    p = default_data_root() / "DRIVE" / "test" / "images" / "01_test.tif"
    if p.exists():
        return p
    from fundus_pipeline.io import write_image_atomic
    from tests.conftest import synthetic_fundus

    p = Path(tempfile.mkdtemp()) / "drive.png"
    write_image_atomic(p, synthetic_fundus(584, 565))
    return p


def hrf_memory(weights: str, n: int) -> dict:
    d = default_data_root() / "HRF" / "images"
    if not d.is_dir():
        return {"skipped": "HRF not present"}
    files = sorted(p for p in d.iterdir() if p.stem in HRF_TEST)[:n]
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp) / "list.txt"
        lst.write_text("".join(f"{p}\n" for p in files))
        t = time.perf_counter()
        code = subprocess.run(["fundus", "grade", str(lst), str(Path(tmp) / "out"), "--weights", weights, "--quiet", "--device", "cpu"], stdout=subprocess.DEVNULL).returncode
        wall = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"photographs": len(files), "exit_code": code, "wall_seconds": round(wall, 2), "peak_rss_mb": round(peak_mb, 1),
            "goal_mb": 2048, "meets_goal": peak_mb <= 2048}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=GradeConfig.model_fields["weights"].default)
    ap.add_argument("--arch")
    ap.add_argument("--reps", type=count(1), default=10)
    ap.add_argument("--hrf", type=count(0), default=20)
    args = ap.parse_args()
    path = drive_path()
    result = {"weights": args.weights, "machine": environment(), "cpu_threads": torch.get_num_threads()}
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        stage = GradeStage(GradeConfig(weights=args.weights, arch=args.arch, device=dev))

        def one() -> None:
            img = Image(*read_image(path))
            stage.compute(ItemInput("x", {"image": img}, Fov.estimate(img.rgb)))
            if dev == "cuda":
                torch.cuda.synchronize()

        one()  # warm-up
        t = time.perf_counter()
        for _ in range(args.reps):
            one()
        sec = (time.perf_counter() - t) / args.reps
        result[dev] = {"seconds_per_drive_photograph": round(sec, 4), "images_per_second": round(1 / sec, 2)}
        if dev == "cpu":
            result[dev].update(goal_seconds=0.2, meets_goal=sec <= 0.2)
    result["hrf_memory"] = hrf_memory(args.weights, args.hrf)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
