"""``fundus degrade``: realistic, seeded low-quality versions of each photograph."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fundus_pipeline.cli.app import app, run_stage_command
from fundus_pipeline.cli.options import Address, Engine, EngineName, Format, FormatOpt, InPath, OutDir, Overwrite, Quiet, Resume, Threads, Workers, path_arg


@app.command()
def degrade(
    in_dir: InPath,
    out_dir: OutDir,
    types: Annotated[Optional[str], typer.Option("--types", help="Cofe-Net type codes (bits blur,spot,illumination): e.g. 111 (default), '001,010,100' or all.", show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Cofe-Net variant: released (degrad_de.py, default) or training (the on-the-fly training degradation).", show_default=False)] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="A recipe instead of Cofe-Net types: mild, moderate, severe or a JSON file.", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="Seed (default 0); each image's streams derive from (seed, key, step).", show_default=False)] = None,
    replay: Annotated[Optional[Path], typer.Option("--replay", help="Re-apply the parameters recorded in OLD_OUT/manifest.json, or given the folder OLD_OUT (its types, preset, recipe and seed).", show_default=False, parser=path_arg)] = None,
    threads: Threads = None,
    workers: Workers = 1,
    engine: Engine = EngineName.local,
    address: Address = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    fmt: FormatOpt = Format.human,
):
    """Simulate low-quality fundus photographs (Cofe-Net degradation model and clinical recipes).

    Example: fundus degrade photos/ degraded/ --types all --seed 7
    """
    from fundus_pipeline.config import DegradeConfig
    from fundus_pipeline.stages.degrade import DegradeStage

    cfg = DegradeConfig.from_options(types=types, preset=preset, recipe=recipe, seed=seed, replay=replay)
    run_stage_command(lambda: DegradeStage(cfg), in_dir, out_dir, overwrite=overwrite, resume=resume, workers=workers, threads=threads, quiet=quiet, fmt=fmt,
                      engine=engine, address=address)
