"""The ``fundus`` console script. The command line (Typer, and through the commands torch) takes a second or
so to import; a Ctrl-C in that time ends the command as one at any later moment does, with one line and
exit 130, instead of the interpreter's traceback of whatever module was being imported."""

from __future__ import annotations

import sys

from fundus_pipeline.errors import EXIT_INTERRUPTED  # a light module: constants and exception classes


def main() -> None:
    try:
        from fundus_pipeline.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")  # what the command line's own handler writes
        raise SystemExit(EXIT_INTERRUPTED) from None
    cli_main()
