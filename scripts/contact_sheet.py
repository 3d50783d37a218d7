"""Visual check of the degradation model against the Cofe-Net authors' own degradations.

Writes ``docs/degradation_contact_sheet.png``:
  * 8 rows for the CofeNet ``img/<id>.png`` + ``img/<id>_fuse.png`` pairs (256×256):
    clean | authors' degradation | ours (released 111) | ours (training preset);
  * 2 rows: four of the authors' ``examples/parameters/*_111.png`` (earlier generator, exact params),
    then ours (released 111, different draws) on four clean images.

Usage: python scripts/contact_sheet.py [--data ../shared/data/CofeNet] [--out docs/degradation_contact_sheet.png]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import cv2
import numpy as np

import degradation.fov as fovmod
from degradation import cofe_degrader, soft_fov_mask
from degradation.fov import FovGeometry

TILE = 176


def read_rgb(p: Path) -> np.ndarray:
    return cv2.imread(str(p), cv2.IMREAD_COLOR)[..., ::-1].copy()


def threshold_fov(u8: np.ndarray) -> tuple[np.ndarray, FovGeometry]:
    """Simple FOV estimate: threshold the red+green sum, keep the largest blob, circle from its extent."""
    g = u8[..., :2].astype(np.int32).sum(axis=2)
    m = (g > max(12, 0.1 * np.median(g[g > 0]) if (g > 0).any() else 12)).astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, np.ones((5, 5), np.uint8))
    n, lab, stats, _ = cv2.connectedComponentsWithStats(m)
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) if n > 1 else 0
    ys, xs = np.nonzero(lab == k)
    cx, cy = (xs.min() + xs.max() + 1) / 2 - 0.5, (ys.min() + ys.max() + 1) / 2 - 0.5
    r = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / 2
    fov = FovGeometry(float(cx), float(cy), float(r), u8.shape[0], u8.shape[1])
    return fov.circle_mask() & (lab == k) | fov.circle_mask() & (m > 0), fov


def get_fov(u8: np.ndarray) -> tuple[np.ndarray, FovGeometry]:
    """The project's FOV estimator when available (degradation.fov), else a simple threshold."""
    try:
        if hasattr(fovmod, "estimate_fov_geometry"):
            mask, fov = fovmod.estimate_fov_geometry(u8)
            return np.asarray(mask, bool), fov
        if hasattr(fovmod, "estimate_fov") and hasattr(fovmod, "fov_geometry"):
            mask = np.asarray(fovmod.estimate_fov(u8), bool)
            return mask, fovmod.fov_geometry(mask)
    except Exception:  # noqa: BLE001 - fall back to the simple threshold
        pass
    return threshold_fov(u8)


def degrade(u8: np.ndarray, preset: str, seed: int, key: str) -> np.ndarray:
    mask, fov = get_fov(u8)
    soft = soft_fov_mask(mask, fov)
    d = cofe_degrader(preset, "111")
    out = d.apply(u8.astype(np.float32) / 255, d.sample(seed, key, fov), soft, levels=255)
    return np.floor(out * 255).astype(np.uint8)


def tile(u8: np.ndarray, label: str | None = None) -> np.ndarray:
    t = cv2.resize(u8, (TILE, TILE), interpolation=cv2.INTER_AREA)
    if label:
        cv2.putText(t, label, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return t


def main() -> None:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.environ.get("FUNDUS_DATA_COFENET", str(here.parent / "shared" / "data" / "CofeNet")))
    ap.add_argument("--out", default=str(here / "docs" / "degradation_contact_sheet.png"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    root = Path(a.data)
    ids = sorted(p.stem for p in (root / "img").glob("*.png") if not p.stem.endswith("_fuse"))
    rows, cleans = [], []
    for i, ident in enumerate(ids):
        clean = read_rgb(root / "img" / f"{ident}.png")
        fuse = read_rgb(root / "img" / f"{ident}_fuse.png")
        cleans.append(clean)
        lab = (lambda s: s) if i == 0 else (lambda s: None)
        rows.append(
            np.hstack(
                [
                    tile(clean, lab("clean")),
                    tile(fuse, lab("authors")),
                    tile(degrade(clean, "released", a.seed, ident), lab("ours released 111")),
                    tile(degrade(clean, "training", a.seed, ident), lab("ours training")),
                ]
            )
        )
    examples = sorted((root / "examples" / "parameters").glob("*_111.png"))[:4]
    rows.append(np.hstack([tile(read_rgb(p), "authors example" if j == 0 else None) for j, p in enumerate(examples)]))
    rows.append(
        np.hstack(
            [tile(degrade(cleans[j], "released", a.seed + 1, f"ex{j}"), "ours released 111" if j == 0 else None) for j in range(4)]
        )
    )
    sheet = np.vstack(rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(a.out, sheet[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {a.out} ({sheet.shape[1]}x{sheet.shape[0]}, {Path(a.out).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
