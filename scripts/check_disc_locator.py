"""Check the classical optic-disc locator (fundus_pipeline.disc) against the 169 hand-marked optic-nerve
centres of HEI-MED, in the canonical frame the enhancement trainer uses. Prints JSON: the error as a
fraction of the FOV diameter (median, 90th percentile) and the share of photographs whose located centre
lies inside the marked disc (error < 0.075 D, half a typical disc diameter) and inside the loss box.

    python scripts/check_disc_locator.py [--cache runs/enh_sources_512.npz] [--data DATA]

(DATA: ``$FUNDUS_DATA``, else ``../shared/data``; the shipped ``imff`` segmenter, wherever the script is run from.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fundus_pipeline.disc import DISC_BOX, locate_disc
from fundus_pipeline.datasets import default_data_root
from fundus_pipeline.train.enhance import prepare_sources, resolve_segmenter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=None, help="the datasets' root (default: $FUNDUS_DATA, else ../shared/data)")
    ap.add_argument("--cache", type=Path, default=Path("runs/enh_sources_512.npz"))
    ap.add_argument("--size", type=int, default=512)
    a = ap.parse_args()
    # the data root and the shipped segmenter as the other scripts find them (it had ignored $FUNDUS_DATA and
    # looked for weights/imff.pt in the working folder; campaign 32b F4)
    root = a.data or default_data_root()
    sources = [s for s in prepare_sources(root, a.size, resolve_segmenter(), a.cache) if s.disc_kind == "marked"]
    errs, in_box, errs_lum = [], [], []
    for s in sources:
        x, y = locate_disc(s.rgb, s.fov, s.vessels)
        xl, yl = locate_disc(s.rgb, s.fov, None)
        mx, my = s.disc
        errs.append(np.hypot(x - mx, y - my) / a.size)
        errs_lum.append(np.hypot(xl - mx, yl - my) / a.size)
        half = DISC_BOX * a.size / 2
        in_box.append(abs(x - mx) < half and abs(y - my) < half)
    errs, errs_lum = np.array(errs), np.array(errs_lum)
    print(json.dumps({
        "n": len(errs),
        "error_over_fov_diameter": {"median": round(float(np.median(errs)), 4), "p90": round(float(np.percentile(errs, 90)), 4)},
        "inside_disc_rate": round(float((errs < 0.075).mean()), 4),
        "marked_centre_inside_loss_box_rate": round(float(np.mean(in_box)), 4),
        "brightness_only": {"median": round(float(np.median(errs_lum)), 4), "inside_disc_rate": round(float((errs_lum < 0.075).mean()), 4)},
    }, indent=2))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
