"""The ``fundus`` console script. The command line (Typer, and through the commands torch) takes a second or
so to import; a Ctrl-C (or SIGTERM, SIGHUP) in that time ends the command as one at any later moment does, with one line and
exit 130, instead of the interpreter's traceback of whatever module was being imported; an import that fails
(a library that cannot be mapped under a low ``ulimit -v``) is one line, exit 1, as any later error."""

from __future__ import annotations

import sys

from fundus_pipeline.errors import EXIT_FATAL, EXIT_INTERRUPTED, internal_error  # a light module: constants, exceptions


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    import signal

    # SIGTERM and SIGHUP during the imports end the command as a Ctrl-C there does (exit 130), as they do once the
    # command line has set its own handlers (they had killed it, exit 143; campaign 29a F4)
    stops = [s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGHUP")) if s is not None]
    for s in stops:
        signal.signal(s, _stop)
    try:
        from fundus_pipeline.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")  # what the command line's own handler writes
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:  # e.g. OpenCV's library that cannot be mapped under a low `ulimit -v`: one line, not a traceback
        import os
        import traceback

        if os.environ.get("FUNDUS_DEBUG"):
            traceback.print_exc()
        message, hint = internal_error(e)
        try:
            sys.stderr.write(f"Error: {message}\nHint: {hint}\n")
        except (OSError, ValueError):
            pass
        raise SystemExit(EXIT_FATAL) from None
    try:
        # _stop stays until the command line sets its own handlers (runner.stop_signals_as_interrupt, after more
        # imports): restored here, they had left SIGTERM uncaught for another 0.2 s (review 30 M2)
        cli_main()
    except KeyboardInterrupt:  # raised before the command line's own handling begins
        sys.stderr.write("Error: interrupted\n")
        raise SystemExit(EXIT_INTERRUPTED) from None
