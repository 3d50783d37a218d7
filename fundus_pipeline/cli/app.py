"""The ``fundus`` Typer application, the run-summary printer and the error-mapping entry point.

Commands are thin: they parse options, call library code, and map domain errors to one line on stderr
plus a documented exit code (see README, "Exit codes"). Each command lives in its own module of this
package and is registered explicitly in ``fundus_pipeline/cli/__init__.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from typing import Annotated

import typer

from fundus_pipeline import __version__
from fundus_pipeline.cli.options import EngineName, Format
from fundus_pipeline.errors import EXIT_FATAL, EXIT_INTERRUPTED, EXIT_USAGE, FundusError, internal_error, not_ignored, printable, stop_requested

app = typer.Typer(
    name="fundus",
    help="End-to-end pipeline for retinal fundus photographs: grade, enhance, score, segment and run the whole chain; degrade, build sets, train, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help text: readable in logs, no box drawing
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool):
    if value:
        typer.echo(f"fundus {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, metavar="", help="Show the version and exit.")] = False,
):
    """fundus: degrade, segment and evaluate retinal fundus photographs, folder in, folder out."""


def open_engine(engine: EngineName | str, address: str | None, workers: int, threads: int | None = None):
    """The engine of ``--engine``/``--address``: None for ``local`` (the runner's own processes), else a
    :class:`~fundus_pipeline.ray_engine.RayEngine`, connected when ``address`` names a cluster (a local instance
    starts with the first stage's work). Usage errors (exit 2): ``--address`` without ``--engine ray``, Ray not
    installed, no node with ``threads`` CPUs; exit 1: the cluster cannot be reached. Close it after."""
    from fundus_pipeline.errors import UsageError

    name = EngineName(engine)
    if address is not None and name != EngineName.ray:
        raise UsageError("--address names a Ray cluster: it needs --engine ray")
    if name == EngineName.local:
        return None
    from fundus_pipeline.ray_engine import RayEngine
    from fundus_pipeline.runner import default_threads

    ray_engine = RayEngine(address=address, workers=workers, threads=threads or default_threads(workers))
    if address is None:
        # a local instance starts at the first stage that has work (RayEngine.run), after OUT's checks: a refused
        # --resume or another stage's folder started one for nothing (8-11 s, a session folder; campaign 30b F2). It
        # has the CPUs the run asks for (workers x threads at least), so --threads cannot be too large for it.
        return ray_engine
    try:
        ray_engine.start()  # a cluster that cannot be reached, or too few CPUs, fails now: before OUT is created or a model loaded
    except BaseException:
        ray_engine.close()
        raise
    return ray_engine


def run_stage_command(
    make_stage, in_dir, out_dir, *, overwrite: bool, resume: bool, workers: int, threads, quiet: bool, fmt: Format, extra_dirs: dict | None = None,
    after=None, engine: EngineName = EngineName.local, address: str | None = None,
) -> None:
    """The common body of a stage command: refuse bad IN/OUT and engine options early (before a model is
    loaded), build the stage (``make_stage()``), run it over IN into OUT (``extra_dirs``: the folders of its
    further input roles, e.g. ``{"reference": ...}``) on the engine of ``--engine``, call ``after()`` unless
    the run was interrupted, and report."""
    from fundus_pipeline.runner import check_parallelism, check_run_paths, run_stage

    check_parallelism(workers, threads)
    check_run_paths(in_dir, out_dir, overwrite=overwrite, resume=resume)
    eng = open_engine(engine, address, workers, threads)

    def last_step(result) -> None:  # still under OUT's lock (run_stage): no other run sweeps its temporary files
        try:
            after()
        except KeyboardInterrupt:  # e.g. grade --sort-into while copying: the summary says so, exit 130
            _err("interrupted after the run, before its last step finished (grade --sort-into: rerun with --resume to finish the copies)")
            result.interrupted = True

    try:
        result = run_stage(
            make_stage(), in_dir, out_dir, overwrite=overwrite, resume=resume, workers=workers, threads=threads,
            progress=not quiet and fmt == Format.human, extra_dirs=extra_dirs, engine=eng, after=last_step if after is not None else None,
        )  # fmt: skip
    finally:
        if eng is not None:
            eng.close()
    report(result, fmt)


def report(result, fmt: Format) -> None:
    """Print a run summary (one JSON document with --format json) and exit with the run's code.

    Item failures were already printed one line each while the run went on; the summary only counts them.
    """
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
        if c.get("error"):
            say_err(f"  the failures are listed in {s['results']} (status=error)")
    code = result.exit_code
    if code:
        raise typer.Exit(code)


# Typer raises click's exception classes: from its own vendored copy in recent versions, from the click
# package in older ones. Both are reached through public names, never through a private import.
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def say_err(text: str) -> None:
    """One line on stderr after the work is done (the failures' table, a replay's outcome, a report's warnings); a
    stderr that cannot be written is passed over, as the progress lines are: the command's own exit status stands
    (campaign 29a F1: a closed or full stderr turned exit 3, or a replay's 0, into 1)."""
    with contextlib.suppress(OSError, ValueError):
        typer.echo(text, err=True)


def _err(msg: str, hint: str | None = None) -> None:
    typer.echo(f"Error: {printable(str(msg))}", err=True)
    if hint:
        typer.echo(f"Hint: {printable(str(hint))}", err=True)


def _stream_error(e: OSError) -> bool:
    """An error of a write to stdout or stderr: no file name, and an errno such a write gives."""
    import errno

    return e.filename is None and e.errno in (errno.EPIPE, errno.ENOSPC, errno.EBADF, errno.EIO, getattr(errno, "EDQUOT", -1))


def _internal_error(e: Exception) -> int:
    if os.environ.get("FUNDUS_DEBUG"):
        traceback.print_exc()
    _err(*internal_error(e))
    return EXIT_FATAL


def _closed_std_streams() -> None:
    """A process started with stdin, stdout or stderr closed (``2>&-``, a daemon): each closed descriptor is held
    by /dev/null, so no file the run opens takes its number (an OpenCV warning would land in an output), and
    Python's stream that is None then writes there (campaign 29a F1: a closed stderr made the progress crash,
    exit 1 after nothing)."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_RDWR)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
        if getattr(sys, name) is None:
            with contextlib.suppress(OSError):
                setattr(sys, name, open(fd, mode, closefd=False))


def _quiet_streams() -> None:
    """After a failed write to stdout or stderr: point both at /dev/null, so that the interpreter's final flush
    does not print "Exception ignored ... BrokenPipeError" on its way out."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        null = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(null, stream.fileno())


class _Interrupted(Exception):
    """A Ctrl-C (or SIGTERM / SIGHUP) that ended a command, carried past Typer to the one-line report."""


class _PipeError(Exception):
    """An error carried past Typer's own handling: an EPIPE from inside multiprocessing (Typer takes any EPIPE
    for a closed stdout and exits 1 without a word: right for `fundus models | head -1`, wrong for a dead
    multiprocessing helper), or an EOFError (Typer reports it as an interrupt)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _carry_pipe_errors(cmd) -> None:
    import errno

    invoke = cmd.invoke

    def guarded(ctx):
        try:
            return invoke(ctx)
        except KeyboardInterrupt as e:  # Typer makes it a silent Exit(130): `fundus train` ended without a word
            raise _Interrupted() from e
        except EOFError as e:  # Typer makes it an Abort, reported as an interrupt (a zero-byte file read to its end)
            raise _PipeError(e) from e
        except OSError as e:
            if e.errno == errno.EPIPE and _from_multiprocessing(e):
                raise _PipeError(e) from e
            raise

    cmd.invoke = guarded


def _from_multiprocessing(e: BaseException) -> bool:
    tb, names = e.__traceback__, []
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_filename.replace(os.sep, "/"))
        tb = tb.tb_next
    return any("/multiprocessing/" in n or "/concurrent/futures/" in n for n in names)


def _os_error(e: OSError, argv: list[str] | None) -> int:
    import errno

    if e.errno == errno.EPIPE and _from_multiprocessing(e):  # a helper process of multiprocessing is gone (its resource tracker, killed)
        _err(f"a helper process of the run's worker pool is gone: {type(e).__name__}: {e.strerror or e}",
             "rerun with --resume; the items already done are kept")
        return EXIT_FATAL
    if _stream_error(e):
        # a write to the terminal streams, e.g. stdout redirected to a full disk, or a pipe whose reader has
        # gone (then nothing more can be shown); the output folders' errors are FundusErrors
        if os.environ.get("FUNDUS_DEBUG"):
            traceback.print_exc()
        with contextlib.suppress(OSError, ValueError):
            _err(f"cannot write the command's output: {e.strerror or e}")
        if argv is None:  # the console command (not a caller's streams)
            _quiet_streams()
        return EXIT_FATAL
    return _internal_error(e)


def _exit_now(code: int) -> None:
    """End the process with ``code`` at once, what it printed flushed first (``os._exit`` skips the buffers)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # (a flush interrupted mid-write may refuse: reentrant call)
            stream.flush()
    os._exit(code)


def _interrupt_within(e: BaseException) -> bool:
    """Whether ``e`` came of a stop: a stop signal was received and not acted on, or a KeyboardInterrupt lies in its
    chain of causes."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return stop_requested() is not None


def main(argv: list[str] | None = None) -> int:
    """Console entry point: never shows a traceback unless FUNDUS_DEBUG=1."""
    import fundus_pipeline.cli  # noqa: F401  (registers every command)

    from fundus_pipeline.runner import stop_signals_as_interrupt

    args = sys.argv[1:] if argv is None else argv
    if argv is None:  # the console command: the process's own standard streams
        _closed_std_streams()
    try:
        cmd = typer.main.get_command(app)
        _carry_pipe_errors(cmd)
        with stop_signals_as_interrupt():  # SIGTERM / SIGHUP end a run as Ctrl-C does (exit 130, tables written)
            rv = cmd.main(args=args, prog_name="fundus", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except _CLICK_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # a group called without a command: its help
            typer.echo(e.ctx.get_help() if e.ctx else str(e))
            code = EXIT_USAGE
        else:
            _err(e.format_message().splitlines()[0] if e.format_message() else type(e).__name__, "run with --help for usage")
            code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt, _Interrupted):
        _err("interrupted")
        code = EXIT_INTERRUPTED
    except FundusError as e:
        _err(e.message, e.hint)
        code = e.exit_code
    except OSError as e:
        code = _os_error(e, argv)
    except _PipeError as e:
        code = _os_error(e.error, argv) if isinstance(e.error, OSError) else _internal_error(e.error)
    except Exception as e:
        if _interrupt_within(e):  # a stop signal's KeyboardInterrupt that a library turned into its own error (pydantic's
            _err("interrupted")  # SchemaError: it was an internal error to report; campaign 31b M2)
            code = EXIT_INTERRUPTED
        else:
            code = _internal_error(e)
    stop_requested(None)  # the command has ended and said how: nothing left for a next one in this process
    if argv is None:
        import signal

        from fundus_pipeline.runner import STOP_SIGNALS

        # the command has ended and said how: a Ctrl-C while the interpreter shuts down (worker pools, Ray)
        # would make the exit status 130 although the summary and the manifest say otherwise; a SIGTERM or SIGHUP
        # then (a scheduler's stop) ends the process at once with the command's own status (it was 143 after a
        # finished run's summary; campaign 27a F14)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for s in not_ignored(STOP_SIGNALS):
            signal.signal(s, lambda signum, frame, code=code: _exit_now(code))
        sys.exit(code)
    return code
