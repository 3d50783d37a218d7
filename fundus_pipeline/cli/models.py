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
    pattern: Annotated[str, typer.Argument(metavar="PATTERN", help="fnmatch pattern over model names.")] = "*",
    fmt: FormatOpt = Format.human,
):
    """List the model architectures and the shipped weights (by architecture or weights name). A weights file
    missing from the weights folder is marked; `*` marks each command's default weights."""
    import fnmatch

    from fundus_pipeline.config import EnhanceConfig, GradeConfig, ScoreConfig, SegmentConfig
    from fundus_pipeline.models.catalog import catalog_entries
    from fundus_pipeline.models.weights import NO_WEIGHTS_HOW, no_weights_folder, read_manifest, weights_dir

    defaults = {c.model_fields["weights"].default: name for name, c in
                (("segment", SegmentConfig), ("enhance", EnhanceConfig), ("score", ScoreConfig), ("grade", GradeConfig))}
    folder = weights_dir()
    by_model: dict[str, list] = {}
    for spec in read_manifest():
        by_model.setdefault(spec.model, []).append(spec)
    rows = []
    for e in catalog_entries("*"):
        specs = sorted(by_model.get(e.name, []), key=lambda w: (w.name != e.name, w.name))  # the weights named after the model first
        if not (fnmatch.fnmatch(e.name, pattern) or any(fnmatch.fnmatch(w.name, pattern) for w in specs)):
            continue
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
                "default_for": {w.name: defaults[w.name] for w in specs if w.name in defaults},  # the command it is the default of
                "missing_files": [w.file for w in specs if not (folder / w.file).is_file()],
                "description": e.description,
            }
        )
    if (why := no_weights_folder()) is not None:  # every row would show "-": say why, once
        typer.echo(f"warning: {why}; {NO_WEIGHTS_HOW}", err=True)
    if not rows:  # said, not silent (JSON still gets its empty list on stdout)
        typer.echo(f"no architecture or weights name matches {pattern!r} (`fundus models` lists them all)", err=True)
    if fmt == Format.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    name_w = max((len(r["name"]) for r in rows), default=0)
    for r in rows:
        star = lambda n: n + ("*" if n in r["default_for"] else "")  # noqa: E731
        w = f"weights/{r['weights']}" + ("*" if r["weights_name"] in r["default_for"] else "") if r["weights"] else "-"
        if r["other_weights"]:
            w += f" (+{', '.join(map(star, r['other_weights']))})"
        if r["missing_files"]:
            w += f" [missing: {', '.join(r['missing_files'])}]"
        typer.echo(f"{r['name']:<{name_w}} {r['task']:<13} width {r['width']:<3} {r['params'] / 1e6:7.2f} M  {w:<22} {r['description']}")
    shown = sorted({(cmd, n) for r in rows for n, cmd in r["default_for"].items()})
    if shown:
        typer.echo("* the default weights of " + ", ".join(f"fundus {cmd} ({n})" for cmd, n in shown))
