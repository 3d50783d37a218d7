"""Decide how an enhancer's canonical-frame result returns to native resolution, by measurement on the HRF
*validation* images (05_h, 05_g, 05_dr: training split, never test) at native resolution (3504x2336):
each is degraded with the released Cofe-Net type 111 and with the `moderate` recipe (seed 0), enhanced
with ``--transfer upsample`` and ``--transfer residual``, and scored against its clean original inside
the dataset's FOV (PSNR, SSIM, MS-SSIM, CIEDE2000) and by the shipped segmenter's vessel F1 against the
manual annotation. Prints JSON; the rule chosen is the one with the higher mean SSIM (structure at
native resolution is the question), recorded in the weights' manifest entry as ``transfer_selection``.

    python scripts/choose_transfer.py WEIGHTS [--arch cofe] > docs/transfer_cofe.json   (per-image rows on stderr)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from degradation import cofe_degrader, load_recipe
from fundus_pipeline.datasets import HRF_VAL, default_data_root, hrf_paths
from fundus_pipeline.evaluation.enhance_bench import Method, Segmenter, degrade_as_written, read_rgb, scores
from fundus_pipeline.evaluation.segment import read_binary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(2)
    root = a.data or default_data_root()
    spec = f"{a.arch}={a.weights}" if a.arch else a.weights
    methods = {t: Method(spec, transfer=t) for t in ("upsample", "residual")}
    seg = Segmenter()
    degraders = {"released111": cofe_degrader("released", "111"), "moderate": load_recipe("moderate")}
    rows = []
    for ident in HRF_VAL:
        p = hrf_paths(root, ident)
        clean, fov, gt = read_rgb(p["image"]), read_binary(p["fov"]), read_binary(p["vessels"])
        for dname, d in degraders.items():
            deg = degrade_as_written(d, clean, fov, a.seed, ident)
            for t, m in methods.items():
                rows.append({"image": ident, "degradation": dname, "transfer": t, **scores(m(deg), clean, fov, gt, seg)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    means = {t: {k: round(float(np.mean([r[k] for r in rows if r["transfer"] == t])), 4) for k in ("psnr", "ssim", "ms_ssim", "ciede2000", "f1")} for t in methods}
    choice = max(means, key=lambda t: means[t]["ssim"])
    rule = "higher mean SSIM on HRF validation 05_h/05_g/05_dr at native resolution, released 111 and moderate, seed 0"
    rounded = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    print(json.dumps({"choice": choice, "rule": rule, "means": means, "rows": rounded}, indent=1))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
