"""``fundus models``: registered architectures and shipped weights.

Answers from metadata only, without importing torch: the architectures come from the static catalogue
(``fundus_pipeline.models.catalog``, kept equal to the registry by tests/test_models_contract.py), the
shipped weights from the validated ``weights/manifest.json``.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fundus_pipeline.cli.app import app
from fundus_pipeline.cli.options import Format, FormatOpt


@app.command()
def models(
    pattern: Annotated[str, typer.Argument(help="fnmatch pattern over model names.")] = "*",
    fmt: FormatOpt = Format.human,
):
    """List the model architectures and the shipped, verified weights."""
    from fundus_pipeline.models.catalog import catalog_entries
    from fundus_pipeline.models.weights import read_manifest

    shipped = {s.model: s for s in read_manifest()}
    rows = []
    for e in catalog_entries(pattern):
        s = shipped.get(e.name)
        rows.append(
            {
                "name": e.name,
                "task": e.task,
                "arch": e.arch,
                "width": e.width,
                "params": s.params if s else e.params,
                "weights": s.file if s else None,
                "weights_name": s.name if s else None,
                "threshold": s.threshold if s else None,  # None for image-output (enhancement) weights
                "description": e.description,
            }
        )
    if fmt == Format.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    name_w = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        w = f"weights/{r['weights']}" if r["weights"] else "-"
        typer.echo(f"{r['name']:<{name_w}} {r['task']:<13} width {r['width']:<3} {r['params'] / 1e6:7.2f} M  {w:<22} {r['description']}")
