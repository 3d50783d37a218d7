"""Speed and memory of `fundus enhance`. Prints one JSON document.

- seconds per image at DRIVE size (565x584) and HRF size (3504x2336) on this machine's CPU (threads =
  all cores): the enhancement alone (FOV estimate, canonical frame, network, return to native) and the
  whole per-item computation with the before/after vessel fractions (two segmenter passes); on CUDA too
  when a GPU is present (images/s);
- peak resident memory of a fresh process enhancing one photograph of each size, vessel fractions
  included (goal: an HRF photograph within 4 GB).

Usage: python benchmarks/enhance.py [--weights NAME (default: the default of fundus enhance)] [--arch ARCH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fundus_pipeline.config import EnhanceConfig  # noqa: E402
from fundus_pipeline.datasets import default_data_root  # noqa: E402
from fundus_pipeline.io import read_image  # noqa: E402
from fundus_pipeline.stages.base import Fov, Image, ItemInput  # noqa: E402
from fundus_pipeline.stages.enhance import EnhanceStage, enhance_native  # noqa: E402
from fundus_pipeline.runner import environment  # noqa: E402

FILES = {"drive": ("DRIVE/test/images/01_test.tif", (584, 565)), "hrf": ("HRF/images/06_h.jpg", (2336, 3504))}


def load(which: str) -> Image:
    path = default_data_root() / FILES[which][0]
    if not path.exists():  # no datasets: a synthetic photograph of the same size
        import tempfile

        from fundus_pipeline.io import write_image_atomic
        from tests.conftest import synthetic_fundus

        path = Path(tempfile.mkdtemp()) / f"{which}.png"
        write_image_atomic(path, synthetic_fundus(*FILES[which][1]))
    return Image(*read_image(path))


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def peak_rss(weights: str, arch: str | None, which: str) -> float:
    code = (
        "import sys;sys.path.insert(0,'benchmarks');from enhance import load,EnhanceStage,EnhanceConfig,ItemInput,Fov;"
        f"img=load({which!r});st=EnhanceStage(EnhanceConfig(weights={weights!r},arch={arch!r},device='cpu'));"
        "st.compute(ItemInput('x',{'image':img},Fov.estimate(img.rgb)));"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def measure(stage: EnhanceStage, device: torch.device, reps: dict) -> dict:
    out = {}
    model = stage._models[0]
    for which, n in reps.items():
        img = load(which)

        def enhance_only(img=img):
            fov = Fov.estimate(img.rgb)
            enhance_native(model, img.rgb, fov.mask, fov.geometry, stage.size, stage.transfer, device, stage.sigma)
            if device.type == "cuda":
                torch.cuda.synchronize()

        def whole(img=img):
            stage.compute(ItemInput("x", {"image": img}, Fov.estimate(img.rgb)))

        s1, s2 = timed(enhance_only, n), timed(whole, n)
        out[which] = {"seconds_enhance": round(s1, 3), "seconds_with_vessel_fractions": round(s2, 3), "images_per_s_enhance": round(1 / s1, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=EnhanceConfig.model_fields["weights"].default, help="default: the default of fundus enhance")
    ap.add_argument("--arch", default=None)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    stage = EnhanceStage(EnhanceConfig(weights=a.weights, arch=a.arch, device="cpu"))
    res = {
        "weights": {"name": stage.spec.name, "model": stage.spec.model, "sha256": stage.spec.sha256[:16]},
        "transfer": stage.transfer,
        "correction_sigma": stage.sigma,
        "canonical_size": stage.size,
        "machine": {**environment(), "torch_threads": torch.get_num_threads()},
        "data": "real (DRIVE 01_test, HRF 06_h)" if (default_data_root() / "DRIVE").is_dir() else "synthetic",
        "cpu": measure(stage, torch.device("cpu"), {"drive": 5, "hrf": 2}),
        "peak_rss_mb": {w: round(peak_rss(a.weights, a.arch, w)) for w in ("drive", "hrf")},
    }
    if torch.cuda.is_available():
        gpu = EnhanceStage(EnhanceConfig(weights=a.weights, arch=a.arch, device="cuda"))
        res["cuda"] = {"device": torch.cuda.get_device_name(0), **measure(gpu, torch.device("cuda"), {"drive": 20, "hrf": 5})}
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
