"""How the shipped segmenter's vessel F1 depends on the size of the photograph in pixels, on the HRF validation
photographs (05_h, 05_g, 05_dr: training split, never test). Each is resized (area) so that its estimated FOV has a
diameter of D pixels, with its manual annotation, and segmented at the working scale ``working_scale`` gives it (the
shipped rule: the smallest integer downscale that brings the FOV to at most 1800 px) and at two others: scaled to
exactly 1800 px, and natively. Pooled F1 inside the estimated FOV at the weights' threshold. Campaign 43a F3 found the
step of the shipped rule at 1800 px (1780 px processed natively, 1820 px at 910).

    python scripts/segment_scale_sweep.py [--weights imff] [--diameters 1300,1650,1800,1900,2100,2400]   (JSON on stdout; minutes)
"""

from __future__ import annotations

import argparse
import json
import sys

import cv2
import numpy as np

from degradation.fov import estimate_fov_geometry
from fundus_pipeline.datasets import HRF_VAL, default_data_root
from fundus_pipeline.errors import FundusError
from fundus_pipeline.io import read_image, to_float_rgb
from fundus_pipeline.models.inference import predict_native, working_scale
from fundus_pipeline.models.weights import load_model


def fail(message: str) -> None:
    print(f"Error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="imff")
    ap.add_argument("--diameters", default="1300,1650,1800,1900,2100,2400")
    a = ap.parse_args()
    try:
        diameters = [float(x) for x in a.diameters.split(",")]
        if not all(64 <= d <= 8000 for d in diameters):
            raise ValueError
    except ValueError:
        fail(f"--diameters takes FOV diameters of 64 to 8000 px, comma-separated, not {a.diameters!r}")
    root = default_data_root() / "HRF"
    if not all(any((root / "images").glob(i + ".*")) and (root / "manual1" / f"{i}.tif").is_file() for i in HRF_VAL):
        fail(f"HRF's validation photographs {', '.join(HRF_VAL)} or their annotations not found at {root} (set FUNDUS_DATA)")
    try:
        model, spec = load_model(a.weights)
    except FundusError as e:
        fail(e.message)
    counts: dict[str, list[int]] = {}
    photos: dict[str, dict] = {}  # per diameter and photograph: its FOV diameter as estimated, and each rule's scale and F1
    for ident in HRF_VAL:
        arr, meta = read_image(next((root / "images").glob(ident + ".*")))
        rgb0 = to_float_rgb(arr, meta)[0]
        gt0, _ = read_image(root / "manual1" / f"{ident}.tif")
        gt0 = (gt0 if gt0.ndim == 2 else gt0[..., 0]) > 127
        _, g0 = estimate_fov_geometry(rgb0)
        for d in diameters:
            s = d / g0.diameter
            rgb = cv2.resize(rgb0, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
            gt = cv2.resize(gt0.astype(np.float32), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_AREA) >= 0.5
            fov, g = estimate_fov_geometry(rgb)
            for rule, scale in (("shipped", working_scale(g.diameter, spec.max_fov_diameter)), ("to_1800", min(1.0, 1800 / g.diameter)), ("native", 1.0)):
                pred = predict_native(model, rgb, fov, scale) >= spec.threshold
                tp, fp, fn = int((pred & gt & fov).sum()), int((pred & ~gt & fov).sum()), int((~pred & gt & fov).sum())
                c = counts.setdefault(f"{d:g}/{rule}", [0, 0, 0])
                c[0], c[1], c[2] = c[0] + tp, c[1] + fp, c[2] + fn
                photos.setdefault(f"{d:g}", {}).setdefault(ident, {"diameter": round(g.diameter, 2)})[rule] = {
                    "scale": round(scale, 4), "f1": round(2 * tp / max(1, 2 * tp + fp + fn), 4)}
    out: dict = {"weights": a.weights, "photographs": HRF_VAL, "f1": {}}
    for key, (tp, fp, fn) in counts.items():
        d, rule = key.split("/")
        out["f1"].setdefault(d, {})[rule] = round(2 * tp / max(1, 2 * tp + fp + fn), 4)
    out["per_photograph"] = photos
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
