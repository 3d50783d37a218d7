"""``fundus segment``: retinal vessel segmentation."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from fundus_pipeline.cli import FormatOpt, Format, InDir, OutDir, Overwrite, Resume, Workers, app, report


@app.command()
def segment(
    in_dir: InDir,
    out_dir: OutDir,
    weights: Annotated[str, typer.Option("--weights", "-w", help="Weights: a name from `fundus models` or a .pt state-dict file.")] = "imff",
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture, required for weights not listed in weights/manifest.json.")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Decision threshold (default: the model's a-priori threshold).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    tile: Annotated[int, typer.Option("--tile", min=0, help="Tile side at the working scale (0 = whole image at once).")] = 1024,
    overlap: Annotated[int, typer.Option("--overlap", min=0, help="Tile overlap in pixels, blended linearly.")] = 64,
    overlay: Annotated[bool, typer.Option("--overlay", help="Also write KEY_overlay.png.")] = False,
    fov: Annotated[str, typer.Option("--fov", help="estimate (find the circular field of view) or full (whole frame).")] = "estimate",
    fov_margin: Annotated[float, typer.Option("--fov-margin", min=0.0, max=0.5, help="Keep probabilities this far outside the estimated FOV edge, as a fraction of its diameter (default 0: zero outside).")] = 0.0,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads per worker (default: torch's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Tiles per forward pass (more is faster on a GPU, uses more memory).")] = 1,
    workers: Workers = 1,
    resume: Resume = False,
    overwrite: Overwrite = False,
    fmt: FormatOpt = Format.human,
):
    """Segment retinal vessels: OUT/KEY_vessels.png (0/255), OUT/KEY_prob.png (16-bit probability).

    Example: fundus segment photos/ vessels/ --weights imff --overlay
    """
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.runner import prepare_output, run_stage
    from fundus_pipeline.stages.segment import SegmentStage

    if fov not in ("estimate", "full"):
        raise UsageError(f"invalid --fov {fov!r}: use estimate or full")
    prepare_output(in_dir, out_dir, overwrite=overwrite, resume=resume, create=False)  # refuse early, before loading a model
    stage = SegmentStage(weights=weights, arch=arch, threshold=threshold, device=device, tile=tile or None, overlap=overlap, overlay=overlay, fov_policy=fov, fov_margin=fov_margin, threads=threads, batch_size=batch_size)
    result = run_stage(stage, in_dir, out_dir, overwrite=overwrite, resume=resume, workers=workers, progress=fmt == Format.human)
    report(result, fmt)
