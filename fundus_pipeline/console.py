"""The ``fundus`` console script. The command line (Typer, and through the commands torch) takes a second or
so to import; a Ctrl-C (or SIGTERM, SIGHUP) in that time ends the command as one at any later moment does, with
one line and exit 130, instead of the interpreter's traceback of whatever module was being imported; an import
that fails (a library that cannot be mapped under a low ``ulimit -v``) is one line, exit 1, as any later error.

Four guards of the process's signals (campaigns 31b, 32a), set here and only for the console command:

* torch's first import runs with SIGINT, SIGTERM and SIGHUP held (``_HeldTorchImport``): a KeyboardInterrupt
  raised inside its C++ initialisation aborted the process ("terminate called after throwing an instance of
  'pybind11::error_already_set'", exit 134); a signal held is handed to its handler when the import has finished.
* a second signal while the first one is being reported is ignored (it gave tracebacks or a kill).
* a stop signal the process was started with ignored (``nohup``'s SIGHUP) stays ignored throughout.
* once the command has ended, SIGTERM and SIGHUP are ignored while the interpreter shuts down: Python resets
  the command's handlers to the default before it tears its modules down (0.2-0.6 s with torch loaded), and a
  scheduler's SIGTERM then killed a finished command (exit 143 for its own status).
"""

from __future__ import annotations

import sys

from fundus_pipeline.errors import EXIT_FATAL, EXIT_INTERRUPTED, STOP_SIGNALS, internal_error, not_ignored, raise_stop, signals_held  # a light module: constants, exceptions


class _HeldTorchImport:
    """A meta path finder for the first ``import torch``: torch's own loader, run with the stop signals held."""

    def __init__(self, signals):
        self.signals = signals

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        import importlib.machinery

        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]  # once
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run = loader.exec_module

        def exec_module(module, run=run, signals=self.signals):
            with signals_held(signals):  # a signal held is handed to its handler when the import is done
                run(module)

        loader.exec_module = exec_module  # this loader is torch's own (one per spec): nothing else is wrapped
        return spec


def _ignore_stops() -> None:
    """SIGTERM and SIGHUP ignored from here to the process's end (see the module docstring)."""
    import signal

    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def _interrupted() -> None:
    import signal

    for s in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(s, signal.SIG_IGN)  # a second signal while this one is reported (campaign 31b M3)
    sys.stderr.write("Error: interrupted\n")  # what the command line's own handler writes
    raise SystemExit(EXIT_INTERRUPTED) from None


def main() -> None:
    import atexit
    import signal

    # SIGTERM and SIGHUP during the imports end the command as a Ctrl-C there does (exit 130), as they do once the
    # command line has set its own handlers (they had killed it, exit 143; campaign 29a F4)
    # ... except a signal the process was started with ignored: ``nohup`` (or a supervisor) asked for that, and a
    # SIGHUP when the terminal closed had ended a `nohup fundus train ... &` all the same (campaign 32a F1)
    for s in not_ignored(STOP_SIGNALS):
        signal.signal(s, raise_stop)
    if "torch" not in sys.modules:
        sys.meta_path.insert(0, _HeldTorchImport({signal.SIGINT, *STOP_SIGNALS}))
    atexit.register(_ignore_stops)  # registered first, so run last: after every other exit function
    try:
        from fundus_pipeline.cli import main as cli_main
    except KeyboardInterrupt:
        _interrupted()
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
        # raise_stop stays until the command line sets its own handlers (runner.stop_signals_as_interrupt, after more
        # imports): restored here, they had left SIGTERM uncaught for another 0.2 s (review 30 M2)
        cli_main()
    except KeyboardInterrupt:  # raised before the command line's own handling begins
        _interrupted()
