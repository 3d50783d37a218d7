"""Visual check of the degradation model against the Cofe-Net authors' own degradations.

Writes ``docs/degradation_contact_sheet.png``:
  * 8 rows for the CofeNet ``img/<id>.png`` + ``img/<id>_fuse.png`` pairs (256×256):
    clean | authors' degradation | ours (released 111) | ours (training preset);
  * 2 rows: four of the authors' ``examples/parameters/*_111.png`` (earlier generator, exact params),
    then ours (released 111, different draws) on four clean images.

Usage: python scripts/contact_sheet.py [--data DATA/CofeNet] [--out docs/degradation_contact_sheet.png]
(DATA: ``$FUNDUS_DATA``, else ``../shared/data``; --out a .png file, written atomically)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from degradation import cofe_degrader, soft_fov_mask
from degradation.fov import estimate_fov_geometry

TILE = 176


def read_rgb(p: Path) -> np.ndarray:
    return cv2.imread(str(p), cv2.IMREAD_COLOR)[..., ::-1].copy()


def degrade(u8: np.ndarray, preset: str, seed: int, key: str) -> np.ndarray:
    mask, fov = estimate_fov_geometry(u8)
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
    ap.add_argument("--data", default=None, help="the Cofe-Net repository's folder (default: $FUNDUS_DATA/CofeNet, else ../shared/data/CofeNet)")
    ap.add_argument("--out", default=str(here / "docs" / "degradation_contact_sheet.png"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from fundus_pipeline.datasets import default_data_root
    from fundus_pipeline.errors import UsageError

    # the data root as every other script finds it (it had read an undocumented $FUNDUS_DATA_COFENET; campaign 32b F2),
    # and the output checked before the minute of work (a folder or another suffix ended in OpenCV's traceback, F3)
    root = Path(a.data) if a.data else default_data_root() / "CofeNet"
    out = Path(a.out)
    if out.is_dir() or out.suffix.lower() != ".png":
        raise UsageError(f"--out {out} is a folder" if out.is_dir() else f"--out {out} is not a .png file name")
    ids = sorted(p.stem for p in (root / "img").glob("*.png") if not p.stem.endswith("_fuse"))
    examples = sorted((root / "examples" / "parameters").glob("*_111.png"))[:4]
    if len(ids) < 4 or len(examples) < 4:
        raise UsageError(f"--data {root} holds {len(ids)} clean pictures in img/ and {len(examples)} examples in "
                         "examples/parameters/ (at least 4 of each: the Cofe-Net repository's folder)")
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
    rows.append(np.hstack([tile(read_rgb(p), "authors example" if j == 0 else None) for j, p in enumerate(examples)]))
    rows.append(
        np.hstack(
            [tile(degrade(cleans[j], "released", a.seed + 1, f"ex{j}"), "ours released 111" if j == 0 else None) for j in range(4)]
        )
    )
    sheet = np.vstack(rows)
    from fundus_pipeline.io import write_bytes_atomic

    ok, png = cv2.imencode(".png", sheet[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])  # level 9: the committed figure's bytes
    if not ok:
        raise UsageError(f"--out {out}: OpenCV could not encode the sheet as PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, png.tobytes())
    print(f"wrote {out} ({sheet.shape[1]}x{sheet.shape[0]}, {len(png) / 1e6:.2f} MB)")


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
