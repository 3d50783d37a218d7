"""Speed, memory and the scale/tiling choice of `fundus segment`. Prints one JSON document.

- seconds per image and images/s at DRIVE size (565x584) and HRF size (3504x2336) for the shipped
  model on this machine's CPU (threads = all cores), and on CUDA when a GPU is present;
- peak resident memory of a fresh process segmenting one image of each size (goal: HRF within 4 GB);
- accuracy of the two ways to handle a large photograph, measured on the HRF *validation* images
  (05_h, 05_g, 05_dr; training images held out from training, never test images): processing at the
  model's working scale (half resolution for HRF, the default) versus tiled inference at native
  resolution.

Usage: python benchmarks/segment.py [--weights imff] [--skip-accuracy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fundus_pipeline.datasets import HRF_VAL, default_data_root, hrf_paths  # noqa: E402
from fundus_pipeline.io import read_image, to_float_rgb  # noqa: E402
from fundus_pipeline.models.weights import load_model  # noqa: E402
from fundus_pipeline.models.inference import DEFAULT_FOV_MARGIN, predict_native, working_scale  # noqa: E402
from fundus_pipeline.runner import environment  # noqa: E402


def images(root: Path, names=("drive", "hrf")) -> dict[str, np.ndarray]:
    out = {}
    files = {"drive": root / "DRIVE" / "test" / "images" / "01_test.tif", "hrf": root / "HRF" / "images" / "06_h.jpg"}
    shapes = {"drive": (584, 565), "hrf": (2336, 3504)}
    for name in names:
        if files[name].exists():
            a, m = read_image(files[name])
            out[name] = to_float_rgb(a, m)[0]
        else:
            from tests.conftest import synthetic_fundus

            out[name] = synthetic_fundus(*shapes[name]).astype(np.float32) / 255
    return out


def time_one(model, rgb, device, reps: int) -> float:
    from degradation.fov import estimate_fov_geometry

    mask, geom = estimate_fov_geometry(rgb)
    s, margin = working_scale(geom.diameter), DEFAULT_FOV_MARGIN * geom.diameter  # as `fundus segment`
    predict_native(model, rgb, mask, s, margin_px=margin, device=device)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        predict_native(model, rgb, mask, s, margin_px=margin, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def peak_rss(weights: str, which: str) -> float:
    code = (
        "import sys;sys.path.insert(0,'benchmarks');from segment import images,load_model;"
        "from degradation.fov import estimate_fov_geometry;from fundus_pipeline.models.inference import predict_native,working_scale;"
        f"from fundus_pipeline.datasets import default_data_root;rgb=images(default_data_root(),({which!r},))[{which!r}];"
        f"m,_=load_model({weights!r});mask,g=estimate_fov_geometry(rgb);predict_native(m,rgb,mask,working_scale(g.diameter));"
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"  # peak RSS in kB; ru_maxrss would inherit the parent's across fork+exec
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return int(r.stdout.strip().splitlines()[-1]) / 1024


def scale_accuracy(model, root: Path, threshold: float) -> dict:
    from fundus_pipeline.evaluation.metrics import auc_roc

    out = {}
    for mode, s in (("working_scale_0.5", 0.5), ("native_tiled", 1.0)):
        tp = fp = fn = 0
        aucs = []
        t = time.perf_counter()
        for ident in HRF_VAL:
            p = hrf_paths(root, ident)
            a, m = read_image(p["image"])
            rgb = to_float_rgb(a, m)[0]
            gt = read_image(p["vessels"])[0] > 127
            fov = read_image(p["fov"])[0]
            fov = (fov[..., 0] if fov.ndim == 3 else fov) > 127
            prob = predict_native(model, rgb, fov, s)
            pred = prob >= threshold
            tp += int((pred & gt & fov).sum())
            fp += int((pred & ~gt & fov).sum())
            fn += int((~pred & gt & fov).sum())
            aucs.append(auc_roc(prob, gt, fov))
        out[mode] = {"f1_pooled": round(2 * tp / (2 * tp + fp + fn), 4), "auc_roc_mean": round(float(np.mean(aucs)), 4), "seconds_per_image": round((time.perf_counter() - t) / len(HRF_VAL), 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default="imff")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    root = default_data_root()
    imgs = images(root)
    model, spec = load_model(args.weights, shared=True)  # as every stage loads it (channels-last where it helps)
    res = {
        "weights": {"name": spec.name, "model": spec.model, "sha256": spec.sha256[:16]},
        "machine": {**environment(), "torch_threads": torch.get_num_threads()},
        "data": "real (DRIVE 01_test, HRF 06_h)" if (root / "DRIVE").is_dir() else "synthetic",
        "cpu": {},
    }
    for name, reps in (("drive", 5), ("hrf", 1)):
        s = time_one(model, imgs[name], torch.device("cpu"), reps)
        res["cpu"][name] = {"shape": list(imgs[name].shape[:2]), "seconds_per_image": round(s, 3), "images_per_s": round(1 / s, 3)}
    res["peak_rss_mb"] = {name: round(peak_rss(args.weights, name), 1) for name in ("drive", "hrf")}
    res["peak_rss_mb"]["note"] = "a fresh process: imports, model, one image read, FOV, inference, outputs"
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        gm, _ = load_model(args.weights, device=dev, shared=True)
        res["cuda"] = {"device": torch.cuda.get_device_name(0)}
        for name, reps in (("drive", 20), ("hrf", 3)):
            torch.cuda.reset_peak_memory_stats()
            s = time_one(gm, imgs[name], dev, reps)
            res["cuda"][name] = {"seconds_per_image": round(s, 4), "images_per_s": round(1 / s, 2), "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    else:
        res["cuda"] = "no CUDA device on this machine"
    if not args.skip_accuracy and (root / "HRF").is_dir():
        res["hrf_validation_scale_choice"] = scale_accuracy(model, root, spec.threshold)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
