"""Measure shipped segmentation weights on the standard test splits (one command).

    python scripts/evaluate_test_splits.py --weights imff [--weights msrf_w8] [--out docs/results] [--threads N]

For each weights name: `fundus segment` on DRIVE test images 01-20 and on the 27 labelled HRF test
images (06-15 of each class, without 11_h, 12_h, 13_h which have no annotation), then `fundus evaluate
segment` against DRIVE's 1st observer and HRF's manual1 inside the datasets' FOV masks, at the model's
a-priori threshold. Also evaluates DRIVE's 2nd observer. Writes OUT/<name>_<dataset>/summary.{json,md},
OUT/results.md (the comparison table) and a figure of the first weights' prediction beside the ground truth:
docs/segmentation_example.png with the default OUT (the committed results), else OUT/segmentation_example.png
(a check that leaves the checkout alone). The published figures were made with fundus segment's default
threads, the available cores (2 on this project's machine);
at another --threads a few 4th decimals can move (a probability by one level of 65,535).
Test images are only ever evaluated here, never used for training, thresholds or checkpoint choice.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fundus_pipeline.datasets import HRF_TEST, HRF_UNLABELLED, default_data_root, hrf_paths, require_datasets  # noqa: E402

PAPER = {"DRIVE": {"sensitivity": 0.8575, "specificity": 0.9860, "f1": 0.7977, "accuracy": 0.9621}}


def sh(*args) -> None:
    r = subprocess.run([sys.executable, "-m", "fundus_pipeline", *map(str, args)], cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): fundus {' '.join(map(str, args))}")


def link_folder(folder: Path, files: list[Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        (folder / f.name).symlink_to(f)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", action="append", required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of fundus segment [default: its own, the available cores]")
    ap.add_argument("--degraded", action="append", default=[], help="also evaluate on DRIVE test images degraded with this `fundus degrade` setting, e.g. 'released-111' or 'recipe-moderate' (seed 0)")
    args = ap.parse_args()
    args.out = args.out.resolve()  # the fundus commands below run from the repository root
    data = require_datasets(default_data_root(), "DRIVE", "HRF", how="set FUNDUS_DATA")
    committed = args.out == (ROOT / "docs" / "results").resolve()
    figure = ROOT / "docs" / "segmentation_example.png" if committed else args.out / "segmentation_example.png"
    threads = ["--threads", args.threads] if args.threads is not None else []
    args.out.mkdir(parents=True, exist_ok=True)
    drive = data / "DRIVE" / "test"
    hrf_ids = [i for i in HRF_TEST if i not in HRF_UNLABELLED]
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hrf_img = link_folder(tmp / "hrf_images", [hrf_paths(data, i)["image"] for i in hrf_ids])
        hrf_gt = link_folder(tmp / "hrf_gt", [hrf_paths(data, i)["vessels"] for i in hrf_ids])
        hrf_fov = link_folder(tmp / "hrf_fov", [hrf_paths(data, i)["fov"] for i in hrf_ids])
        degraded = {}
        for setting in args.degraded:
            kind, value = setting.split("-", 1)
            opts = ["--types", value] if kind == "released" else ["--recipe", value]
            target = tmp / f"drive_degraded_{setting}"
            sh("degrade", drive / "images", target, *opts, "--seed", 0, *threads, "--format", "json")
            degraded[setting] = target
        ev = args.out / "drive_2nd_observer"
        sh("evaluate", "segment", drive / "2nd_manual", drive / "1st_manual", "--fov", drive / "mask", "--out", ev, "--overwrite", "--bootstrap", args.bootstrap, "--format", "json")
        table["DRIVE 2nd observer"] = {"DRIVE": json.loads((ev / "summary.json").read_text())}
        for w in args.weights:
            row = {}
            for ds, images, gt, fov in (("DRIVE", drive / "images", drive / "1st_manual", drive / "mask"), ("HRF", hrf_img, hrf_gt, hrf_fov)):
                seg = tmp / f"seg_{w}_{ds}"
                sh("segment", images, seg, "--weights", w, "--device", "cpu", *threads, "--format", "json")
                ev = args.out / f"{w}_{ds.lower()}"
                sh("evaluate", "segment", seg, gt, "--fov", fov, "--out", ev, "--overwrite", "--bootstrap", args.bootstrap, "--format", "json")
                row[ds] = json.loads((ev / "summary.json").read_text())
                if ds == "DRIVE" and w == args.weights[0]:
                    example(seg, drive, figure)
            table[w] = row
            for setting, folder in degraded.items():
                seg = tmp / f"seg_{w}_{setting}"
                sh("segment", folder, seg, "--weights", w, "--device", "cpu", *threads, "--format", "json")
                ev = args.out / f"{w}_drive_{setting}"
                sh("evaluate", "segment", seg, drive / "1st_manual", "--fov", drive / "mask", "--out", ev, "--overwrite", "--bootstrap", args.bootstrap, "--format", "json")
                table[f"{w} on DRIVE degraded ({setting}, seed 0)"] = {"DRIVE": json.loads((ev / "summary.json").read_text()), "HRF": None}
    lines = ["| model | DRIVE Se | DRIVE Sp | DRIVE Acc | DRIVE F1 [95% CI] | DRIVE AUC-ROC | DRIVE AUC-PR | DRIVE clDice | HRF F1 [95% CI] | HRF AUC-ROC | HRF Acc |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x):
        return "-" if x is None or (isinstance(x, float) and x != x) else f"{x:.4f}"

    def ci(s, k):
        c = (s.get("ci95", {}).get("pooled") or {}).get(k)
        return f" [{c[0]:.3f}, {c[1]:.3f}]" if c and None not in c else ""

    for name, row in table.items():
        d, h = row.get("DRIVE"), row.get("HRF")
        cells = [name]
        cells += [f(d["pooled"].get(k)) for k in ("sensitivity", "specificity", "accuracy")]
        cells += [f(d["pooled"]["f1"]) + ci(d, "f1"), f(d["pooled"].get("auc_roc")), f(d["pooled"].get("auc_pr")), f(d["mean"].get("cldice"))]
        cells += [f(h["pooled"]["f1"]) + ci(h, "f1"), f(h["pooled"].get("auc_roc")), f(h["pooled"].get("accuracy"))] if h else ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    p = PAPER["DRIVE"]
    lines.append(f"| IMFF-Net paper (reported, protocol unspecified) | {p['sensitivity']} | {p['specificity']} | {p['accuracy']} | {p['f1']} | - | - | - | - | - | - |")
    md = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(md)
    print(md)


def example(seg: Path, drive: Path, target: Path) -> None:
    """01_test: photograph | ground truth | prediction | error map (green TP, red FP, blue FN)."""
    from fundus_pipeline.io import read_image

    img = read_image(drive / "images" / "01_test.tif")[0]
    gt = read_image(drive / "1st_manual" / "01_manual1.gif")[0]
    gt = (gt[..., 0] if gt.ndim == 3 else gt) > 127
    pred = read_image(seg / "01_test_vessels.png")[0] > 127
    err = np.zeros(img.shape, np.uint8)
    err[pred & gt] = (0, 200, 0)
    err[pred & ~gt] = (230, 40, 40)
    err[~pred & gt] = (40, 90, 255)
    panel = np.concatenate([img, np.repeat(gt[..., None] * 255, 3, 2).astype(np.uint8), np.repeat(pred[..., None] * 255, 3, 2).astype(np.uint8), err], 1)
    panel = cv2.resize(panel, (panel.shape[1] * 3 // 4, panel.shape[0] * 3 // 4), interpolation=cv2.INTER_AREA)
    target.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(target), cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
