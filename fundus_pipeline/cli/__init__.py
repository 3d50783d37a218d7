"""The ``fundus`` command line: one Typer app (``cli/app.py``), one module per command, registered here."""

from __future__ import annotations

from fundus_pipeline.cli.app import app, main, report
from fundus_pipeline.cli import build, degrade, enhance, evaluate, grade, models, run, sample, score, segment, train  # noqa: F401  (each registers its command)

__all__ = ["app", "main", "report"]
