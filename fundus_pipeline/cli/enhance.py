"""``fundus enhance``: restore poor fundus photographs with a trained Cofe-Net."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from fundus_pipeline.cli.app import app, run_stage_command
from fundus_pipeline.cli.options import Address, Compile, Device, Precision, Engine, EngineName, Format, FormatOpt, InPath, OutDir, Overwrite, Quiet, Resume, Threads, Workers, flag
from fundus_pipeline.config import EnhanceConfig, default


@app.command()
def enhance(
    in_dir: InPath,
    out_dir: OutDir,
    weights: Annotated[str, typer.Option("--weights", "-w", help="Enhancement weights: a name from `fundus models` or a .pt state-dict file.")] = default(EnhanceConfig, "weights"),
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture, required for weights not listed in weights/manifest.json.", show_default=False)] = None,
    device: Device = default(EnhanceConfig, "device"),
    precision: Precision = default(EnhanceConfig, "precision"),
    compile: Compile = default(EnhanceConfig, "compile"),
    transfer: Annotated[str, typer.Option("--transfer", help="How the result returns to native resolution: auto (the weights' choice), upsample (resize the output) or residual (add the resized correction to the photograph).")] = default(EnhanceConfig, "transfer"),
    correction_sigma: Annotated[Optional[float], typer.Option("--correction-sigma", help="Low-pass the correction (output - input) with a Gaussian of this standard deviation in the network's 512-px frame before it returns to native resolution (0: not) [default: the weights' choice].", show_default=False)] = None,
    keep_outside: Annotated[bool, flag("--keep-outside", help="Pass the pixels outside the field of view through (default: 0 there).")] = default(EnhanceConfig, "keep_outside"),
    vessel_stats: Annotated[bool, typer.Option("--vessel-stats/--no-vessel-stats", help="Segment before and after for the vessel-fraction columns (two segmenter passes per image).")] = default(EnhanceConfig, "vessel_stats"),
    segmenter: Annotated[str, typer.Option("--segmenter", help="Segmentation weights behind the vessel-fraction columns.")] = default(EnhanceConfig, "segmenter"),
    segmenter_arch: Annotated[Optional[str], typer.Option("--segmenter-arch", help="The architecture of --segmenter weights not in weights/manifest.json (e.g. imff).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Photographs per forward pass (more is faster on a GPU; outputs within one code value).")] = default(EnhanceConfig, "batch_size"),
    threads: Threads = None,
    workers: Workers = 1,
    engine: Engine = EngineName.local,
    address: Address = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    fmt: FormatOpt = Format.human,
):
    """Enhance fundus photographs: OUT/KEY.png at the input's resolution and bit depth (0 outside the FOV).

    results.csv: luminance and contrast inside the FOV and the segmenter's vessel fraction, before and after.
    Example: fundus enhance poor/ restored/ --weights cofe
    """
    from fundus_pipeline.stages.enhance import EnhanceStage

    cfg = EnhanceConfig.build(weights=weights, arch=arch, device=device, precision=precision, compile=compile, transfer=transfer, correction_sigma=correction_sigma,
                              keep_outside=keep_outside, vessel_stats=vessel_stats, segmenter=segmenter, segmenter_arch=segmenter_arch, batch_size=batch_size)
    run_stage_command(lambda: EnhanceStage(cfg), in_dir, out_dir, overwrite=overwrite, resume=resume, workers=workers, threads=threads, quiet=quiet, fmt=fmt,
                      engine=engine, address=address)
