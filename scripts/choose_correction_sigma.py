"""Choose the low-pass of an enhancer's correction (``correction_sigma`` in the weights' manifest) by
measurement on *validation* images at native resolution, as ``scripts/choose_transfer.py`` chooses the
transfer rule: DRIVE 37-40 (565x584) and HRF 05_h, 05_g, 05_dr (3504x2336), training split, never test,
each degraded with the released Cofe-Net type 111 and with the ``moderate`` recipe (seed 0), enhanced as
``fundus enhance`` does with each sigma (``fundus_pipeline.stages.enhance.smooth_correction``), and scored
against the clean original inside the dataset's FOV (PSNR, SSIM) and by the shipped segmenter's vessel F1
against the manual annotation. The choice: the highest mean PSNR among the sigmas whose mean vessel F1 is
within 0.002 of the best.

    python scripts/choose_correction_sigma.py WEIGHTS [--sigmas 0,8,32] [--record docs/correction_WEIGHTS.json]   (rows on stderr)

WEIGHTS is a name from the manifest or, without ``--record``, ``NAME=FILE`` for a training run's checkpoint
(``cofe_add@ctl=runs/ctl/best.pt``: architecture before the ``@``, as in ``scripts/enhance_benchmark.py``).

With ``--record FILE`` the JSON goes to FILE and the choice into the weights' manifest entry
(``output.correction_sigma`` and ``correction_selection``; ``fundus_pipeline.train.export.record_correction_selection``);
without it, to stdout only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from degradation import cofe_degrader, load_recipe
from fundus_pipeline.errors import UsageError
from fundus_pipeline.datasets import DRIVE_VAL, HRF_VAL, default_data_root, drive_paths, hrf_paths
from fundus_pipeline.evaluation.enhance_bench import Method, Segmenter, degrade_as_written, read_rgb, scores
from fundus_pipeline.evaluation.segment import read_binary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--sigmas", default="0,8,32")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--record", type=Path, help="write the JSON here and the choice into the weights' manifest entry")
    a = ap.parse_args()
    torch.set_num_threads(2)
    root = a.data or default_data_root()
    sigmas = [float(s) for s in a.sigmas.split(",")]
    name, eq, path = a.weights.partition("=")  # NAME=FILE (a training run's weights) as in enhance_benchmark.py
    if a.record and eq:
        raise UsageError("--record needs weights from the manifest, not NAME=FILE")
    methods = {s: Method(f"{name}~s{s:g}{eq}{path}") for s in sigmas}
    seg = Segmenter()
    degraders = {"released111": cofe_degrader("released", "111"), "moderate": load_recipe("moderate")}
    images = [(f"drive/{i}", drive_paths(root, i)) for i in DRIVE_VAL] + [(f"hrf/{i}", hrf_paths(root, i)) for i in HRF_VAL]
    rows = []
    for name, p in images:
        clean, fov, gt = read_rgb(p["image"]), read_binary(p["fov"]), read_binary(p["vessels"])
        for dname, d in degraders.items():
            deg = degrade_as_written(d, clean, fov, a.seed, name)
            rows.append({"image": name, "degradation": dname, "sigma": None, **scores(deg, clean, fov, gt, seg)})
            for s, m in methods.items():
                rows.append({"image": name, "degradation": dname, "sigma": s, **scores(m(deg), clean, fov, gt, seg)})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    def mean(sel) -> dict:
        return {k: round(float(np.mean([r[k] for r in rows if sel(r)])), 4) for k in ("psnr", "ssim", "f1")}

    means = {f"{s:g}": mean(lambda r, s=s: r["sigma"] == s) for s in sigmas}
    per = {f"{s:g}": {f"{ds}/{dg}": mean(lambda r, s=s, ds=ds, dg=dg: r["sigma"] == s and r["image"].startswith(ds) and r["degradation"] == dg) for ds in ("drive", "hrf") for dg in degraders} for s in sigmas}
    inputs = {f"{ds}/{dg}": mean(lambda r, ds=ds, dg=dg: r["sigma"] is None and r["image"].startswith(ds) and r["degradation"] == dg) for ds in ("drive", "hrf") for dg in degraders}
    best_f1 = max(m["f1"] for m in means.values())
    choice = max((k for k, m in means.items() if m["f1"] >= best_f1 - 0.002), key=lambda k: means[k]["psnr"])
    rule = "highest mean PSNR among the sigmas whose mean vessel F1 is within 0.002 of the best; DRIVE 37-40 and HRF 05_h/05_g/05_dr at native resolution, released 111 and moderate, seed 0"
    rounded = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    record = {"weights": a.weights, "choice": float(choice), "rule": rule, "means": means, "per_part": per, "inputs": inputs, "rows": rounded}
    text = json.dumps(record, indent=1)
    print(text)
    if a.record:
        from fundus_pipeline.train.export import record_correction_selection

        a.record.write_text(text + "\n")
        record_correction_selection(a.weights, record, str(a.record))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
