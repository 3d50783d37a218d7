"""Speed of `fundus score`. Prints one JSON document.

Seconds per DRIVE-size pair (565x584: an enhanced photograph and its degraded reference) for the whole
per-item computation (FOV estimate, both images into the scoring frame, the five test-time crops through
the network) on this machine's CPU (threads = all cores), and pairs/s on CUDA when a GPU is present.
Goal: at most 1 s per DRIVE-size pair on 2 CPU cores.

Usage: python benchmarks/score.py [--weights sdmp] [--arch ARCH] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # _args and enhance, beside this script

from _args import count  # noqa: E402
from enhance import load  # noqa: E402

from fundus_pipeline.config import ScoreConfig  # noqa: E402
from fundus_pipeline.stages.base import Fov, Image, ItemInput  # noqa: E402
from fundus_pipeline.stages.score import ScoreStage  # noqa: E402
from fundus_pipeline.runner import environment  # noqa: E402


def degraded_twin(img: Image) -> Image:
    """The photograph degraded by the released Cofe-Net type 111 (seed 0), as an 8-bit image."""
    from degradation import cofe_degrader, soft_fov_mask

    fov = Fov.estimate(img.rgb)
    d = cofe_degrader("released", "111")
    params = d.sample(seed=0, key="bench", fov=fov.geometry)
    out = d.apply(img.rgb, params, soft_fov_mask(fov.mask, fov.geometry), levels=255)
    return Image(np.clip(np.rint(out * 255), 0, 255).astype(np.uint8), img.meta)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="sdmp")
    ap.add_argument("--arch")
    ap.add_argument("--reps", type=count(1), default=5)
    args = ap.parse_args()
    enh = load("drive")
    ref = degraded_twin(enh)
    result = {"weights": args.weights, "machine": environment(), "cpu_threads": torch.get_num_threads()}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        stage = ScoreStage(ScoreConfig(weights=args.weights, arch=args.arch, device=dev))

        def one() -> None:
            stage.compute(ItemInput("x", {"image": enh, "reference": ref}, Fov.estimate(enh.rgb)))
            if dev == "cuda":
                torch.cuda.synchronize()

        one()  # warm-up
        t = time.perf_counter()
        for _ in range(args.reps):
            one()
        sec = (time.perf_counter() - t) / args.reps
        result[dev] = {"seconds_per_drive_pair": round(sec, 4), "pairs_per_second": round(1 / sec, 2)}
        if dev == "cpu":
            result[dev]["goal_seconds"] = 1.0
            result[dev]["meets_goal"] = sec <= 1.0
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
