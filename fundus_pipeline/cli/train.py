"""``fundus train ...``: training entry points (arguments are passed to the trainer)."""

from __future__ import annotations

import typer

from fundus_pipeline.cli import app

train_app = typer.Typer(help="Train the models on real data (see weights/README.md for the exact commands).", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("segment", context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def train_segment(ctx: typer.Context):
    """Train a vessel segmenter (IMFF-Net, MSRF-Net) on DRIVE + HRF. `fundus train segment --help` lists the options."""
    from fundus_pipeline.train.segment import main

    try:
        code = main(list(ctx.args))
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        code = e.code if isinstance(e.code, int) else 2
    raise typer.Exit(code)
