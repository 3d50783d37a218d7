"""The enhancers' output rule on validation photographs (training split, never test): clean | degraded with the
released Cofe-Net type 111 (seed 0, as the trainer's validation) | `cofe` (logit rule) | `cofe_add` (additive
rule), each in the canonical 512 frame, with the mean RGB inside the FOV printed per panel.

    python scripts/output_rule_figure.py [--sources drive/39,drive/38] [--out docs/enhance_output_rule.jpg]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from degradation import cofe_degrader
from fundus_pipeline.models.weights import load_model
from fundus_pipeline.train import enhance as E
from fundus_pipeline.train.config import EnhanceConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", default="drive/39,drive/38")
    ap.add_argument("--weights", default="cofe,cofe_add")
    ap.add_argument("--cache", default="runs/enh_sources_512.npz")
    ap.add_argument("--out", type=Path, default=Path("docs/enhance_output_rule.jpg"))
    ap.add_argument("--side", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(2)
    cfg = EnhanceConfig(out="runs/_figure", cache=a.cache)
    sources = {s.name: s for s in E.prepare_sources(cfg.data_root, 512, E.resolve_segmenter(), cfg.cache_path, lambda m: None)}
    _, val = E.split_sources(list(sources.values()))
    names = a.sources.split(",")
    assert all(n in {s.name for s in val} for n in names), "validation sources only"
    models = {w: load_model(w, task="enhancement")[0] for w in a.weights.split(",")}
    d111 = cofe_degrader("released", "111")
    rows = []
    for n in names:
        s = sources[n]
        deg = E.degrade(d111, s.rgb, s.fov, 0, f"val/{n}")
        panels = [("clean", s.rgb), ("degraded 111", deg)] + [(w, E.enhance_canonical(m, deg, "cpu") * s.fov[..., None]) for w, m in models.items()]
        tiles = []
        for label, img in panels:
            t = cv2.resize(np.clip(img, 0, 1), (a.side, a.side), interpolation=cv2.INTER_AREA)
            t = (t[..., ::-1] * 255).round().astype(np.uint8).copy()
            mean = img[s.fov].mean(0)
            psnr = "" if label == "clean" else f" {E.psnr_in(img, s.rgb, s.fov):.1f} dB"
            for k, text in enumerate((f"{n} {label}", f"RGB {mean[0]:.2f} {mean[1]:.2f} {mean[2]:.2f}{psnr}")):
                cv2.putText(t, text, (4, 14 + 14 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(t)
            print(n, label, np.round(mean, 3), psnr)
        rows.append(np.concatenate(tiles, 1))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(a.out), np.concatenate(rows, 0), [cv2.IMWRITE_JPEG_QUALITY, 90])


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
