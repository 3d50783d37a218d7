"""The FOV estimator's surround check (``degradation.fov._MAX_SURROUND``: a surround brighter than half the fundus
level is no surround) against the EyePACS-256 photographs, per part of the patient split: the level of the
corners over the fundus level, as the estimator measures it at its working size (maximum over the channels,
blurred). The threshold was set on 2026-12-04 from all 1,433 photographs, test part included; this prints
each part's maximum so that the training and validation parts alone can be checked against it.

    python scripts/fov_surround_levels.py [--data ../shared/data]     (one JSON object; seconds)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from degradation.fov import _MAX_SURROUND, _MIN_CONTRAST, _to_float_work, corner_level
from fundus_pipeline.datasets import default_data_root

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    a = ap.parse_args()
    images = (a.data or default_data_root()) / "EyePACS-256" / "images"
    if not images.is_dir():
        print(f"Error: {images} not found (pass --data)", file=sys.stderr)
        raise SystemExit(2)
    ratios: dict[str, list[float]] = {}
    with open(ROOT / "docs" / "grade" / "eyepacs256_split.csv", newline="") as f:
        for row in csv.DictReader(f):
            bgr = cv2.imread(str(images / row["image"]), cv2.IMREAD_COLOR)
            if bgr is None:
                print(f"Error: cannot read {images / row['image']}", file=sys.stderr)
                raise SystemExit(2)
            v, _, _ = _to_float_work(np.ascontiguousarray(bgr[:, :, ::-1]))
            vs = cv2.GaussianBlur(v, (0, 0), max(1.0, max(v.shape) / 256.0))
            bg = corner_level(vs)
            above = vs[vs > bg + _MIN_CONTRAST]
            if above.size >= 0.1 * vs.size:  # as the estimator: no fundus level otherwise
                ratios.setdefault(row["split"], []).append(bg / float(np.median(above)))
    out = {"threshold": _MAX_SURROUND}
    for part in ("train", "val", "test"):
        x = np.array(ratios.get(part, []))
        if not x.size:
            print(f"Error: no photograph of the {part} part has a fundus level", file=sys.stderr)
            raise SystemExit(2)
        out[part] = {"photographs": int(x.size), "max": round(float(x.max()), 3), "p99": round(float(np.percentile(x, 99)), 3),
                     "above_threshold": int((x > _MAX_SURROUND).sum())}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
