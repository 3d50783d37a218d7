"""``fundus score``: a full-reference quality score of enhanced photographs against their degraded inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fundus_pipeline.cli.app import app, run_stage_command
from fundus_pipeline.cli.options import Address, Compile, Device, Precision, Engine, EngineName, Format, FormatOpt, InPath, OutDir, Overwrite, Quiet, Resume, Threads, Workers, flag, path_arg
from fundus_pipeline.config import ScoreConfig, default


@app.command()
def score(
    in_dir: InPath,
    out_dir: OutDir,
    reference: Annotated[
        Path,
        typer.Option("--reference", "-r", help="Folder of the degraded photographs the enhanced ones were made from, matched by key (KEY.png ~ KEY.*).", show_default=False, parser=path_arg),
    ],
    weights: Annotated[str, typer.Option("--weights", "-w", help="Quality weights: a name from `fundus models` or a .pt state-dict file.")] = default(ScoreConfig, "weights"),
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture, required for weights not listed in weights/manifest.json.", show_default=False)] = None,
    input_score: Annotated[bool, flag("--input-score", help="Also score each reference against itself (score_input: the scorer's estimate of the unenhanced photograph's quality), in the same pass.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per forward pass (more is faster on a GPU).")] = default(ScoreConfig, "batch_size"),
    device: Device = default(ScoreConfig, "device"),
    precision: Precision = default(ScoreConfig, "precision"),
    compile: Compile = default(ScoreConfig, "compile"),
    threads: Threads = None,
    workers: Workers = 1,
    engine: Engine = EngineName.local,
    address: Address = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    fmt: FormatOpt = Format.human,
):
    """Score enhanced photographs against the degraded photographs they were made from (SDMP-Net).

    results.csv: score in [0, 1] (higher is better: the predicted quality label, see README "Quality
    scoring"), its spread over the five test-time crops. No images are written. An enhanced image without
    its reference is a per-item error (exit 3). Example: fundus score restored/ scores/ --reference poor/
    """
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.stages.score import ScoreStage

    if not reference.is_dir():
        raise UsageError(f"--reference is not a folder: {reference}")
    cfg = ScoreConfig.build(weights=weights, arch=arch, device=device, precision=precision, compile=compile, input_score=input_score, batch_size=batch_size)
    run_stage_command(lambda: ScoreStage(cfg), in_dir, out_dir, overwrite=overwrite, resume=resume, workers=workers, threads=threads,
                      quiet=quiet, fmt=fmt, extra_dirs={"reference": reference}, engine=engine, address=address)
