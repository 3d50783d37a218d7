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

    by_model: dict[str, list] = {}
    for spec in read_manifest():
        by_model.setdefault(spec.model, []).append(spec)
    rows = []
    for e in catalog_entries(pattern):
        specs = sorted(by_model.get(e.name, []), key=lambda w: (w.name != e.name, w.name))  # the weights named after the model first
        s = specs[0] if specs else None
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
                "other_weights": [w.name for w in specs[1:]],  # e.g. early checkpoints of the same architecture
                "description": e.description,
            }
        )
    if fmt == Format.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    name_w = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        w = f"weights/{r['weights']}" if r["weights"] else "-"
        if r["other_weights"]:
            w += f" (+{', '.join(r['other_weights'])})"
        typer.echo(f"{r['name']:<{name_w}} {r['task']:<13} width {r['width']:<3} {r['params'] / 1e6:7.2f} M  {w:<22} {r['description']}")
