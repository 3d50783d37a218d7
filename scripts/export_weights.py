"""Export a trained segmentation run to weights/ and record it in weights/manifest.json.

    python scripts/export_weights.py runs/imff --name imff --arch imff [--command "..."]

Loads RUN/best.pt (the checkpoint chosen on the validation subset of the training images), chooses
the a-priori decision threshold on that same validation subset (the threshold that maximises the mean
of the DRIVE and HRF validation F1 scores), saves a plain state dict to weights/NAME.pt and writes its
manifest entry (sha256, architecture, preprocessing, threshold, data split, command, seed, validation
metrics). Test-split metrics are added afterwards with --test-metrics FILE (a `fundus evaluate`
summary.json), never used for any choice here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fundus_pipeline.datasets import default_data_root, training_sets  # noqa: E402
from fundus_pipeline.metrics import pooled_f1_curve  # noqa: E402
from fundus_pipeline.models.registry import build_model, get_entry  # noqa: E402
from fundus_pipeline.models.weights import sha256_file, weights_dir  # noqa: E402
from fundus_pipeline.segmentation import DEFAULT_MAX_FOV_DIAMETER, predict_logits, sigmoid  # noqa: E402


def val_threshold(model, val) -> dict:
    """The a-priori threshold: maximise the mean of the per-dataset pooled validation F1 (0.05..0.95, 0.001 steps)."""
    probs = {s.name: sigmoid(predict_logits(model, s.rgb)) for s in val}  # the defaults of `fundus segment`
    curves, aucs = {}, {}
    for ds in sorted({s.name.split("/")[0] for s in val}):
        ss = [s for s in val if s.name.startswith(ds + "/")]
        thr, curves[ds], aucs[ds] = pooled_f1_curve([probs[s.name] for s in ss], [s.vessels for s in ss], [s.fov for s in ss])
    mean_f1 = np.mean(list(curves.values()), axis=0)
    lo, hi = int(np.searchsorted(thr, 0.05)), int(np.searchsorted(thr, 0.95)) + 1
    k = lo + int(np.argmax(mean_f1[lo:hi]))
    return {
        "threshold": round(float(thr[k]), 3),
        "rule": "maximise the mean of the per-dataset pooled validation F1 (thresholds 0.05-0.95 in 0.001 steps)",
        "val_f1": {ds: round(float(v[k]), 4) for ds, v in curves.items()},
        "val_auc_roc": {ds: round(a, 4) for ds, a in aucs.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--command", default="", help="the exact training command(s), for the manifest")
    ap.add_argument("--test-metrics", type=Path, action="append", default=[], help="LABEL=summary.json of `fundus evaluate` on a test split")
    args = ap.parse_args()
    torch.set_num_threads(2)
    entry = get_entry(args.arch)
    model = build_model(args.arch)
    model.load_state_dict(torch.load(args.run / "best.pt", map_location="cpu", weights_only=True))
    model.eval()
    wdir = weights_dir()
    wdir.mkdir(exist_ok=True)
    target = wdir / f"{args.name}.pt"
    manifest_path = wdir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"schema_version": 1, "weights": []}
    old = next((w for w in manifest["weights"] if w["name"] == args.name), None)
    if args.test_metrics and old:  # only add test figures; the weights and threshold stay as exported
        thr = old["output"]["threshold_selection"]
    else:
        _, val = training_sets(default_data_root())
        thr = val_threshold(model, val)
        torch.save(model.state_dict(), target)
    summary = json.loads((args.run / "summary.json").read_text()) if (args.run / "summary.json").exists() else {}
    spec = {
        "name": args.name,
        "file": target.name,
        "format": "pt-state-dict",
        "sha256": sha256_file(target),
        "size_bytes": target.stat().st_size,
        "model": args.arch,
        "arch": entry.arch,
        "width": entry.width,
        "params": sum(p.numel() for p in model.parameters()),
        "input": {
            "channels": 3,
            "color": "rgb",
            "value_range": [0, 1],
            "normalisation": "none (RGB divided by the bit depth's maximum)",
            "size_divisor": int(model.size_divisor),
            "scale_policy": {"type": "fov_max_diameter", "max_fov_diameter": DEFAULT_MAX_FOV_DIAMETER, "rule": "downscale by the smallest integer factor that brings the FOV diameter to <= max_fov_diameter"},
        },
        "output": {"activation": "sigmoid", "threshold": thr["threshold"], "threshold_selection": thr},
        "training": {
            "data": "DRIVE training 21-36 + HRF training split 01-04 of each class (h, g, dr) at half resolution",
            "validation": "DRIVE 37-40 + HRF 05_h, 05_g, 05_dr (training images; checkpoint selection and threshold)",
            "test_never_used": "DRIVE 01-20, HRF 06-15",
            "command": args.command or " ".join(summary.get("argv", [])),
            "seed": summary.get("seed"),
            "steps": summary.get("steps"),
            "best_checkpoint": summary.get("best"),
            "torch": torch.__version__,
        },
        "metrics": {},
        "license": "MIT (weights trained by the fundus-pipeline authors; DRIVE and HRF are research datasets, cite them)",
    }
    if old and args.test_metrics:  # adding test figures to the same weights keeps what was recorded
        if old["sha256"] != spec["sha256"]:
            raise SystemExit(f"{target} changed since it was exported; export it again before adding test metrics")
        spec["metrics"] = old.get("metrics", {})
        if not args.command:
            spec["training"] = old["training"]
    # a fresh export starts with no test metrics: figures measured on other weights must not carry over
    for item in args.test_metrics:
        label, path = str(item).split("=", 1)
        s = json.loads(Path(path).read_text())
        spec["metrics"][label] = {
            "threshold": s["threshold"],
            "n_images": s["n_images"],
            "pooled": {k: round(v, 4) for k, v in s["pooled"].items() if isinstance(v, float)},
            "mean": {k: round(v, 4) for k, v in s["mean"].items() if isinstance(v, float) and not k.endswith("_std")},
            "ci95": s.get("ci95"),
        }
    manifest["weights"] = [w for w in manifest["weights"] if w["name"] != args.name] + [spec]
    manifest["weights"].sort(key=lambda w: w["name"])
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: spec[k] for k in ("name", "sha256", "params")} | {"threshold": thr}, indent=2))


if __name__ == "__main__":
    main()
