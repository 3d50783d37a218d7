"""``fundus models``: registered architectures and shipped weights."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fundus_pipeline.cli import Format, FormatOpt, app


@app.command()
def models(
    pattern: Annotated[str, typer.Argument(help="fnmatch pattern over model names.")] = "*",
    fmt: FormatOpt = Format.human,
):
    """List the model architectures and the shipped, verified weights."""
    from fundus_pipeline.models.registry import build_model, list_models
    from fundus_pipeline.models.weights import read_manifest

    shipped = {s["model"]: s for s in read_manifest()}
    rows = []
    for e in list_models(pattern):
        n = sum(p.numel() for p in build_model(e.name).parameters())
        s = shipped.get(e.name)
        rows.append({"name": e.name, "task": e.task, "arch": e.arch, "width": e.width, "params": n, "weights": s["file"] if s else None, "description": e.description})
    if fmt == Format.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        w = f"weights/{r['weights']}" if r["weights"] else "-"
        typer.echo(f"{r['name']:<12} {r['task']:<13} width {r['width']:<3} {r['params'] / 1e6:7.2f} M  {w:<22} {r['description']}")
