"""``fundus evaluate``: score outputs against references (``segment``: vessel maps vs ground truth)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from fundus_pipeline.errors import UsageError

evaluate_app = typer.Typer(
    help="Evaluate pipeline outputs against reference annotations.",
    no_args_is_help=True,
    add_completion=False,
)


class OutputFormat(str, Enum):
    human = "human"
    json = "json"


@evaluate_app.command("segment")
def segment(
    pred_dir: Annotated[
        Path,
        typer.Argument(
            help="Predictions: a `fundus segment` output folder (K_prob.png / K_vessels.png) or a folder of "
            "binary masks or probability maps (e.g. DRIVE 2nd_manual for the second observer).",
            show_default=False,
        ),
    ],
    gt_dir: Annotated[Path, typer.Argument(help="Ground-truth vessel masks (e.g. DRIVE 1st_manual, HRF manual1).", show_default=False)],
    fov: Annotated[
        Optional[Path],
        typer.Option("--fov", help="FOV masks folder (e.g. DRIVE mask/). Without it the FOV is the whole image."),
    ] = None,
    threshold: Annotated[
        Optional[float],
        typer.Option(
            "--threshold",
            min=0.0,
            max=1.0,
            help="Decision threshold (prob >= T is vessel). Default: config.threshold of PRED_DIR/manifest.json, else 0.5.",
        ),
    ] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder [default: PRED_DIR/eval].")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the reports in an existing output folder.")] = False,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="stdout format: human table or the summary JSON.")] = OutputFormat.human,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the 95% CIs (0: none).")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    no_cldice: Annotated[bool, typer.Option("--no-cldice", help="Skip clDice (skeletonisation is the slowest part on large images).")] = False,
) -> None:
    """Score vessel predictions against ground truth inside the FOV.

    Files pair by name: lower-cased, without extension and without the suffixes _prob, _vessels, _mask,
    _manual1, _manual2, _test, _training (DRIVE 01_test_prob.png ~ 01_manual1.gif ~ 01_test_mask.gif;
    HRF 01_h_prob.png ~ 01_h.tif ~ 01_h_mask.tif). Writes metrics.csv, summary.json and summary.md.
    Exit 3 when some items are unpaired or unreadable (the others are still scored), 2 when nothing pairs.
    """
    from fundus_pipeline.evaluate import evaluate_segmentation, summary_human, write_outputs

    for what, p in (("PRED_DIR", pred_dir), ("GT_DIR", gt_dir), ("--fov", fov)):
        if p is not None and not p.is_dir():
            raise UsageError(f"{what} is not a folder: {p}")
    out_dir = out if out is not None else pred_dir / "eval"
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UsageError(f"output folder {out_dir} already exists and is not empty; pass --overwrite or choose --out")

    result = evaluate_segmentation(
        pred_dir, gt_dir, fov, threshold=threshold, n_boot=bootstrap, seed=seed, out_dir=out_dir, with_cldice=not no_cldice
    )
    write_outputs(result, out_dir, overwrite=overwrite)

    for msg in result.messages:
        typer.echo(f"warning: {msg}", err=True)
    if fmt is OutputFormat.json:
        typer.echo(json.dumps(result.summary, indent=2, allow_nan=False))
    else:
        typer.echo(summary_human(result.summary))
        typer.echo(f"reports: {out_dir}/metrics.csv, summary.json, summary.md")
    if result.n_problems:
        raise typer.Exit(3)
