"""The ``fundus`` console script. The command line (Typer, and through the commands torch) takes a second or
so to import; a Ctrl-C in that time ends the command as one at any later moment does, with one line and
exit 130, instead of the interpreter's traceback of whatever module was being imported."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from fundus_pipeline.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        raise SystemExit(130) from None
    cli_main()
