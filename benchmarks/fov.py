"""Benchmark FOV estimation (degradation.fov.estimate_fov_geometry) against the datasets' own FOV masks.

Prints JSON: per dataset the mean/min IoU of the estimated mask against the reference masks (DRIVE
training+test 40, HRF 45, CofeNet 100 real low-quality images), the mean estimation time per image
(decoding excluded), the IoU of a circle fitted to the *reference* mask (how circular the references
are: the ceiling for a circle-based estimate), the IoU when the estimated circle is shrunk by a few
native pixels (DRIVE's masks are slightly eroded relative to the visible FOV), and for the 13 EyeQ
photographs (no masks) whether a FOV was found.

    python benchmarks/fov.py [--data ../shared/data] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _args, beside this script

from _args import count  # noqa: E402

from degradation.fov import FovGeometry, estimate_fov_geometry, fov_geometry  # noqa: E402
from fundus_pipeline.io import read_image  # noqa: E402

SHRINK_PX = (0, 1, 2, 3, 5)


def default_data() -> Path:
    return Path(os.environ.get("FUNDUS_DATA", ROOT.parent / "shared" / "data"))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return float(inter / union) if union else 1.0


def load_mask(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    import cv2

    arr, _ = read_image(path)
    m = arr if arr.ndim == 2 else arr[..., 0]
    if size is not None and m.shape != size:
        m = cv2.resize(m, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
    return m > 127


def dataset_pairs(data: Path) -> dict[str, list[tuple[Path, Path]]]:
    out: dict[str, list[tuple[Path, Path]]] = {"DRIVE": [], "HRF": [], "CofeNet": []}
    for split in ("training", "test"):
        for img in sorted((data / "DRIVE" / split / "images").glob("*.tif")):
            num = img.name.split("_")[0]
            out["DRIVE"].append((img, data / "DRIVE" / split / "mask" / f"{num}_{split}_mask.gif"))
    for img in sorted((data / "HRF" / "images").iterdir()) if (data / "HRF" / "images").is_dir() else []:
        out["HRF"].append((img, data / "HRF" / "mask" / f"{img.stem}_mask.tif"))
    for img in sorted((data / "CofeNet" / "img" / "image").glob("*.png")):
        out["CofeNet"].append((img, data / "CofeNet" / "img" / "mask" / img.name))
    return {k: v for k, v in out.items() if v}


def shrunk(g: FovGeometry, px: float, est: np.ndarray) -> np.ndarray:
    return FovGeometry(g.cx, g.cy, g.radius - px, g.height, g.width).circle_mask() & est


def evaluate(pairs: list[tuple[Path, Path]]) -> dict:
    ious, times, ref_fit, worst = [], [], [], []
    shrink = {p: [] for p in SHRINK_PX}
    for img_path, mask_path in pairs:
        img, _ = read_image(img_path)
        ref = load_mask(mask_path, img.shape[:2])
        t0 = time.perf_counter()
        est, geom = estimate_fov_geometry(img)
        times.append(time.perf_counter() - t0)
        ious.append(iou(est, ref))
        worst.append((ious[-1], img_path.name))
        ref_fit.append(iou(fov_geometry(ref).circle_mask(), ref))
        for p in SHRINK_PX:
            shrink[p].append(est if p == 0 else None)
            if p:
                shrink[p][-1] = iou(shrunk(geom, p, est), ref)
        shrink[0][-1] = ious[-1]
    worst.sort()
    return {
        "n": len(pairs),
        "mean_iou": round(float(np.mean(ious)), 4),
        "min_iou": round(float(np.min(ious)), 4),
        "worst": [f"{n}:{v:.4f}" for v, n in worst[:3]],
        "mean_time_ms": round(1000 * float(np.mean(times)), 1),
        "max_time_ms": round(1000 * float(np.max(times)), 1),
        "shape": list(read_image(pairs[0][0])[0].shape[:2]),
        "reference_circle_fit_mean_iou": round(float(np.mean(ref_fit)), 4),
        "mean_iou_if_circle_shrunk_by_px": {str(p): round(float(np.mean(v)), 4) for p, v in shrink.items()},
    }


def eyeq(data: Path) -> dict | None:
    files = sorted(p for d in ("original_img", "sample", "mcfnet_examples") for p in (data / "EyeQ" / d).glob("*.jp*g"))
    if not files:
        return None
    found, times, cover = 0, [], []
    for f in files:
        img, _ = read_image(f)
        t0 = time.perf_counter()
        m, g = estimate_fov_geometry(img)
        times.append(time.perf_counter() - t0)
        found += not m.all()
        cover.append(round(float(m.mean()), 3))
    return {"n": len(files), "fov_found": found, "mask_fraction": cover, "mean_time_ms": round(1000 * float(np.mean(times)), 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--limit", type=count(0), default=0, help="at most N images per dataset (0: all)")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(json.dumps({"error": f"datasets not found at {args.data}"}))
        return 2
    result: dict = {"work_side": 512}
    for name, pairs in dataset_pairs(args.data).items():
        result[name] = evaluate(pairs[: args.limit] if args.limit else pairs)
    e = eyeq(args.data)
    if e:
        result["EyeQ_no_masks"] = e
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
