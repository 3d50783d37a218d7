"""The ``fundus`` command line. Commands are thin: they parse options, call library code, and map
domain errors to one line on stderr plus a documented exit code (see README, "Exit codes")."""

from __future__ import annotations

import json
import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer._click import exceptions as click_exc

from fundus_pipeline import __version__
from fundus_pipeline.errors import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_USAGE, FundusError

app = typer.Typer(
    name="fundus",
    help="End-to-end pipeline for retinal fundus photographs: degrade, segment, evaluate, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Format(str, Enum):
    human = "human"
    json = "json"


def _version(value: bool):
    if value:
        typer.echo(f"fundus {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
):
    """fundus: degrade, segment and evaluate retinal fundus photographs, folder in, folder out."""


def report(result, fmt: Format) -> None:
    """Print a run summary (one JSON document with --format json) and exit with the run's code."""
    s = result.summary()
    if fmt == Format.json:
        typer.echo(json.dumps(s, indent=2))
    else:
        c = s["counts"]
        msg = f"{s['stage']}: {c.get('ok', 0)} ok, {c.get('error', 0)} failed"
        if c.get("skipped"):
            msg += f" ({c['skipped']} already done, resumed)"
        if s["interrupted"]:
            msg += ", interrupted"
        typer.echo(f"{msg} -> {s['output']}  (manifest.json, results.csv)")
        for f in s["failed"][:20]:
            typer.echo(f"  failed: {f['key']}: {f['error']}", err=True)
        if len(s["failed"]) > 20:
            typer.echo(f"  ... and {len(s['failed']) - 20} more (see results.csv)", err=True)
    code = result.exit_code
    if code:
        raise typer.Exit(code)


# Shared option aliases --------------------------------------------------------------------------
InDir = Annotated[Path, typer.Argument(help="Input folder of fundus images (searched recursively).", show_default=False)]
OutDir = Annotated[Path, typer.Argument(help="Output folder (created; must not be inside the input folder).", show_default=False)]
Workers = Annotated[int, typer.Option("--workers", "-j", min=1, help="Parallel worker processes.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an earlier run in OUT: finished items are skipped.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Allow a non-empty OUT and replace outputs of the same name.")]
FormatOpt = Annotated[Format, typer.Option("--format", help="human: short summary; json: one JSON summary on stdout.")]


@app.command()
def degrade(
    in_dir: InDir,
    out_dir: OutDir,
    types: Annotated[Optional[str], typer.Option("--types", help="Cofe-Net type codes (bits blur,spot,illumination): e.g. 111 (default), '001,010,100' or all.", show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="Cofe-Net variant: released (degrad_de.py, default) or training (the on-the-fly training degradation).", show_default=False)] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", help="A recipe instead of Cofe-Net types: mild, moderate, severe or a JSON file.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="Seed (default 0); each image's streams derive from (seed, key, step).", show_default=False)] = None,
    replay: Annotated[Optional[Path], typer.Option("--replay", help="Re-apply the parameters recorded in OLD_OUT/manifest.json (its types, preset, recipe and seed).")] = None,
    workers: Workers = 1,
    resume: Resume = False,
    overwrite: Overwrite = False,
    fmt: FormatOpt = Format.human,
):
    """Simulate low-quality fundus photographs (Cofe-Net degradation model and clinical recipes).

    Example: fundus degrade photos/ degraded/ --types all --seed 7
    """
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.runner import prepare_output, run_stage
    from fundus_pipeline.stages.degrade import DegradeStage, parse_codes

    if replay and any(v is not None for v in (types, preset, recipe, seed)):
        raise UsageError("--replay takes the types, preset, recipe and seed from the replay manifest; do not combine it with them")
    if recipe and (types is not None or preset is not None):
        raise UsageError("--recipe cannot be combined with --types or --preset")
    prepare_output(in_dir, out_dir, overwrite=overwrite, resume=resume, create=False)
    stage = DegradeStage(preset=preset or "released", codes=parse_codes(types or "111"), recipe=recipe, seed=seed or 0, replay=replay)
    result = run_stage(stage, in_dir, out_dir, overwrite=overwrite, resume=resume, workers=workers, progress=fmt == Format.human)
    report(result, fmt)


def _register_optional() -> None:
    from fundus_pipeline.cli import models as _models  # noqa: F401
    from fundus_pipeline.cli import sample as _sample  # noqa: F401
    from fundus_pipeline.cli import segment as _segment  # noqa: F401
    from fundus_pipeline.cli import train as _train  # noqa: F401

    try:
        from fundus_pipeline.cli.evaluate import evaluate_app

        app.add_typer(evaluate_app, name="evaluate", help="Evaluate outputs against ground truth.")
    except ImportError:
        pass


def _err(msg: str, hint: str | None = None) -> None:
    typer.echo(f"Error: {msg}", err=True)
    if hint:
        typer.echo(f"Hint: {hint}", err=True)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: never shows a traceback unless FUNDUS_DEBUG=1."""
    args = sys.argv[1:] if argv is None else argv
    try:
        _register_optional()
        cmd = typer.main.get_command(app)
        rv = cmd.main(args=args, prog_name="fundus", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click_exc.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help() if e.ctx else str(e))
        code = EXIT_USAGE
    except click_exc.ClickException as e:
        _err(e.format_message().splitlines()[0] if e.format_message() else type(e).__name__, "run with --help for usage")
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        _err("interrupted")
        code = EXIT_INTERRUPTED
    except FundusError as e:
        _err(e.message, e.hint)
        code = e.exit_code
    except Exception as e:
        if os.environ.get("FUNDUS_DEBUG"):
            traceback.print_exc()
        _err(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "set FUNDUS_DEBUG=1 for the traceback and report it")
        code = EXIT_FATAL
    if argv is None:
        sys.exit(code)
    return code
