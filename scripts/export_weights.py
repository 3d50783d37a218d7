"""Export a trained run to weights/ and record it in weights/manifest.json.

    python scripts/export_weights.py runs/imff --name imff --arch imff [--command "..."]
    python scripts/export_weights.py runs/cofe --name cofe --arch cofe --transfer-selection docs/transfer_cofe.json
    python scripts/export_weights.py runs/vit --name vit_fundus --arch vit_fundus
    python scripts/export_weights.py runs/sdmp --name sdmp --arch sdmp

Enhancement runs (an ``enhancement`` architecture) take ``--transfer-selection``: the JSON printed by
scripts/choose_transfer.py, whose ``choice`` becomes the weights' rule for returning to native resolution.

Loads RUN/best.pt (the checkpoint chosen on the validation subset of the training images), chooses
the a-priori decision threshold on that same validation subset (the threshold that maximises the mean
of the DRIVE and HRF validation F1 scores), saves a plain state dict to weights/NAME.pt and writes its
manifest entry (sha256, architecture, preprocessing, threshold, data split, command, seed, validation
metrics). Test-split metrics are added afterwards with --test-metrics LABEL=FILE (a `fundus evaluate`
summary.json), never used for any choice here.

The generic part (checked loading of best.pt, the entry validated as a ``WeightsSpec`` before anything
is written, the manifest update) is ``fundus_pipeline.train.export.export_weights``; the segment-specific
part (threshold, input contract, data split) is ``fundus_pipeline.train.segment.export_description``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fundus_pipeline.errors import UsageError, run_script  # noqa: E402
from fundus_pipeline.train.export import export_weights  # noqa: E402
from fundus_pipeline.train import enhance as enhance_task  # noqa: E402
from fundus_pipeline.train import score as score_task  # noqa: E402
from fundus_pipeline.train.segment import export_description  # noqa: E402


def _json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None


def test_metrics_entry(path: Path) -> dict:
    """The manifest's test figures from a `fundus evaluate` summary.json."""
    s = _json(path, "--test-metrics")
    try:
        return {
            "threshold": s["threshold"],
            "n_images": s["n_images"],
            "pooled": {k: round(v, 4) for k, v in s["pooled"].items() if isinstance(v, float)},
            "mean": {k: round(v, 4) for k, v in s["mean"].items() if isinstance(v, float) and not k.endswith("_std")},
            "ci95": s.get("ci95"),
        }
    except (KeyError, TypeError, AttributeError):
        raise UsageError(f"--test-metrics {path} is not the summary.json of `fundus evaluate segment`") from None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--name", required=True)
    ap.add_argument("--arch", required=True)
    ap.add_argument("--command", default="", help="the exact training command(s), for the manifest")
    ap.add_argument("--test-metrics", action="append", default=[], help="LABEL=summary.json of `fundus evaluate` on a test split")
    ap.add_argument("--transfer-selection", type=Path, help="enhancement runs: the JSON of scripts/choose_transfer.py")
    ap.add_argument("--checkpoint", type=Path, help="export this training checkpoint (e.g. an early snapshot of RUN/last.pt) instead of RUN/best.pt")
    ap.add_argument("--replace", action="store_true", help="export over an existing entry of that name (its file and test figures are replaced)")
    args = ap.parse_args()
    if not args.run.is_dir():
        raise UsageError(f"RUN {args.run} is not a training run folder")
    torch.set_num_threads(2)
    metrics = {}
    for item in args.test_metrics:
        label, sep, path = item.partition("=")
        if not sep:
            raise UsageError(f"--test-metrics {item!r}: expected LABEL=summary.json")
        metrics[label] = test_metrics_entry(Path(path))
    from fundus_pipeline.models.registry import get_entry

    describe = export_description
    task = get_entry(args.arch).task
    summary = _json(args.run / "summary.json", "the run's summary")
    config = summary.get("config") if isinstance(summary, dict) else None
    if not isinstance(config, dict):
        raise UsageError(f"{args.run / 'summary.json'} records no config: not a finished `fundus train` run")
    if task == "enhancement":
        if args.transfer_selection is None:
            raise UsageError("enhancement runs need --transfer-selection (the JSON of scripts/choose_transfer.py)")
        describe = enhance_task.export_description(_json(args.transfer_selection, "--transfer-selection"), config)
    elif task == "pretext":
        describe = score_task.pretext_description(config)
    elif task == "quality":
        describe = score_task.score_description(config)
    elif task == "grading":
        from fundus_pipeline.train.grade import grade_description

        calib = args.run / "calibration.json"
        if not calib.is_file():
            raise UsageError(f"{calib} is missing (fundus train grade writes it after training)")
        describe = grade_description(config, _json(calib, "the run's calibration"))
    spec = export_weights(args.run, name=args.name, model_name=args.arch, describe=describe, command=args.command,
                          test_metrics=metrics or None, checkpoint=args.checkpoint, replace=args.replace)
    print(json.dumps({"name": spec.name, "sha256": spec.sha256, "params": spec.params, "output": spec.output.to_json_dict()}, indent=2))


if __name__ == "__main__":
    run_script(main)
