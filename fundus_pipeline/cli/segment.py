"""``fundus segment``: retinal vessel segmentation."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from fundus_pipeline.cli.app import app, run_stage_command
from fundus_pipeline.cli.options import Address, Compile, Device, Precision, Engine, EngineName, Format, FormatOpt, InPath, OutDir, Overwrite, Quiet, Resume, Threads, Workers, flag
from fundus_pipeline.config import SegmentConfig, default


@app.command()
def segment(
    in_dir: InPath,
    out_dir: OutDir,
    weights: Annotated[str, typer.Option("--weights", "-w", help="Weights: a name from `fundus models` or a .pt state-dict file.")] = default(SegmentConfig, "weights"),
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture, required for weights not listed in weights/manifest.json.", show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Decision threshold in (0, 1) [default: the weights' a-priori threshold].", show_default=False)] = None,
    device: Device = default(SegmentConfig, "device"),
    precision: Precision = default(SegmentConfig, "precision"),
    compile: Compile = default(SegmentConfig, "compile"),
    tile: Annotated[int, typer.Option("--tile", help="Tile side at the working scale (0 = whole image at once; else at least 2 x --overlap + 16).")] = default(SegmentConfig, "tile"),
    overlap: Annotated[int, typer.Option("--overlap", help="Tile overlap in pixels, blended linearly.")] = default(SegmentConfig, "overlap"),
    overlay: Annotated[bool, flag("--overlay", help="Also write KEY_overlay.png.")] = default(SegmentConfig, "overlay"),
    fov: Annotated[str, typer.Option("--fov", help="estimate (find the circular field of view) or full (whole frame).")] = default(SegmentConfig, "fov"),
    fov_margin: Annotated[float, typer.Option("--fov-margin", help="Keep probabilities this far outside the estimated FOV edge, as a fraction of its diameter, 0-0.5 (0: zero outside).")] = default(SegmentConfig, "fov_margin"),
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tiles per forward pass (more is faster on a GPU, uses more memory).")] = default(SegmentConfig, "batch_size"),
    threads: Threads = None,
    workers: Workers = 1,
    engine: Engine = EngineName.local,
    address: Address = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    fmt: FormatOpt = Format.human,
):
    """Segment retinal vessels: OUT/KEY_vessels.png (0/255), OUT/KEY_prob.png (16-bit probability).

    Example: fundus segment photos/ vessels/ --weights imff --overlay
    """
    from fundus_pipeline.stages.segment import SegmentStage

    cfg = SegmentConfig.build(weights=weights, arch=arch, threshold=threshold, device=device, precision=precision, compile=compile, tile=tile, overlap=overlap, overlay=overlay,
                              fov=fov, fov_margin=fov_margin, batch_size=batch_size)
    def make_stage() -> SegmentStage:
        stage = SegmentStage(cfg)
        if (note := stage.threshold_note()) and not quiet and fmt == Format.human:  # as the input folder's notes
            from fundus_pipeline.runner import say_note

            say_note(note)
        return stage

    run_stage_command(make_stage, in_dir, out_dir, overwrite=overwrite, resume=resume, workers=workers, threads=threads, quiet=quiet, fmt=fmt,
                      engine=engine, address=address)
