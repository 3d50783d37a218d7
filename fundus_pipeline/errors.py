"""Domain errors. Each maps to one line on stderr and a documented exit code (see README)."""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_USAGE = 2
EXIT_ITEMS_FAILED = 3
EXIT_INTERRUPTED = 130


class FundusError(Exception):
    """Base class: a fatal error with a one-line message (exit code 1)."""

    exit_code = EXIT_FATAL

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(FundusError):
    """Bad flag, bad config, refused output folder (exit code 2)."""

    exit_code = EXIT_USAGE


class InputError(FundusError):
    """A single input item cannot be read or processed (recorded per item, never fatal to a run)."""


class DiskFullError(FundusError):
    """An output that cannot be written for want of space (ENOSPC, EDQUOT, or EFBIG: a file-size limit): fatal
    even while one item is written, since every following item would fail the same way (exit code 1, the run
    ``stopped``)."""


def no_space(errno_: int | None) -> bool:
    """Whether an OSError's errno means no room for the file: a full disk, a quota, a file-size limit (``ulimit -f``;
    it had ended a run with no hint, its items error rows one by one; campaign 34b F2)."""
    import errno

    return errno_ in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


class WeightsError(FundusError):
    """Missing, corrupt, unknown or mismatching model weights (exit code 1)."""


def printable(text: str) -> str:
    """``text`` for one line of a terminal: each character that is not printable (a newline, a tab, an escape
    sequence's ESC, the ``\\udcXX`` of a file-name byte that is not UTF-8) written as its Python escape, so a
    file name cannot break the line or drive the terminal (campaign 17b F7); printable characters, accented
    and CJK too, stay as they are."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def refuse_repeated_columns(columns, what: str, path) -> None:
    """A header naming a column twice is refused (``UsageError``): csv.DictReader would keep the last silently."""
    twice = sorted({c for c in columns if c and list(columns).count(c) > 1})
    if twice:
        raise UsageError(f"the {what} {path} names the column {', '.join(map(repr, twice))} more than once")


#: What the allocators say when memory runs out: OpenCV (-4), C++ (std::bad_alloc), torch's CPU and CUDA
#: allocators, the C library (ENOMEM).
_OUT_OF_MEMORY = ("Insufficient memory", "bad_alloc", "can't allocate memory", "out of memory", "Cannot allocate memory")


try:  # imported now: after a failed import of torch under a low limit, importing it can fail too
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]


def address_space_limit() -> int | None:
    """The process's address-space limit in bytes (``ulimit -v``), None when unlimited."""
    if resource is None:
        return None
    try:
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (OSError, ValueError, AttributeError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def out_of_memory(e: BaseException, *, starting: bool = False) -> bool:
    """``e`` says that memory ran out: a MemoryError (also as the cause of ``e``), or an allocator's message.
    With ``starting`` (an error that ended a command, not an item) also the SystemError "error return without
    exception set" and an ImportError or OSError "failed to map segment from shared object" under an
    address-space limit: what importing torch, OpenCV or numpy's libraries under a low ``ulimit -v`` raises. A
    missing module or another import error stays an internal error, limit or not."""
    seen: BaseException | None = e
    for _ in range(8):  # the chain of causes
        if seen is None:
            break
        if isinstance(seen, MemoryError):
            return True
        seen = seen.__cause__ or seen.__context__
    if any(m in str(e) for m in _OUT_OF_MEMORY):
        return True
    if not starting or address_space_limit() is None:
        return False
    return ((isinstance(e, SystemError) and "error return without exception set" in str(e))
            or (isinstance(e, (ImportError, OSError)) and "failed to map segment" in str(e)))  # a library that could not be mapped


def internal_error(e: BaseException) -> tuple[str, str]:
    """(message, hint) of an unexpected error that ended a command: "out of memory" with the address-space
    limit when memory ran out (``out_of_memory(starting=True)``), else "internal error" and where to report it."""
    first = str(e).splitlines()[0] if str(e) else ""
    if out_of_memory(e, starting=True):  # not a bug: say what to change
        limit = address_space_limit()
        where = f" (the address space is limited to {limit // 2**20} MiB: ulimit -v)" if limit is not None else ""
        return f"out of memory{where}: {type(e).__name__}: {first}", "free memory, lower --workers or --batch-size, or raise the limit"
    return f"internal error: {type(e).__name__}: {first}", "set FUNDUS_DEBUG=1 for the traceback and report it"


def run_script(main) -> None:
    """Run a ``scripts/`` entry point as the commands run: a ``FundusError`` (unknown weights, a missing set, a
    refused output) becomes its one-line message, its hint and its exit code instead of a traceback; so do a
    missing or unreadable file (exit 1), a failed check of typed options (pydantic, exit 2) and Ctrl-C (130)."""
    import sys

    def fail(message: str, hint: str | None, code: int) -> SystemExit:
        print(f"Error: {printable(message)}", file=sys.stderr)
        if hint:
            print(f"Hint: {printable(hint)}", file=sys.stderr)
        return SystemExit(code)

    try:
        main()
    except FundusError as e:
        raise fail(e.message, e.hint, e.exit_code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", None, EXIT_INTERRUPTED) from None
    except OSError as e:  # a file or folder a script reads or writes: named in one line
        if e.filename is None:
            raise fail(e.strerror or str(e) or type(e).__name__, None, EXIT_FATAL) from None
        from fundus_pipeline.datasets import default_data_root

        in_data = str(e.filename).startswith(str(default_data_root()))
        raise fail(f"{e.filename}: {e.strerror or e}", "is ../shared/data there (or FUNDUS_DATA set)?" if in_data else None, EXIT_FATAL) from None
    except Exception as e:
        if type(e).__name__ != "ValidationError":
            raise
        from fundus_pipeline.train.config import config_error  # a script's typed options or config (a data root without DRIVE/)

        u = config_error(e)
        raise fail(u.message, u.hint, u.exit_code) from None


#: The stop signal received and not yet acted on (None: none). A KeyboardInterrupt raised where Python drops it
#: (an import lock's clean-up callback prints "Exception ignored ...") had let the run go on to exit 0, and one that
#: pydantic turned into a SchemaError was an internal error to report (campaign 31b H2, M2): the run checks it.
_STOP_SIGNAL: list[int | None] = [None]


def stop_requested(signum: int | None | bool = True) -> int | None:
    """Record ``signum`` as received (None: forget any), or with no argument say which one was received."""
    if signum is not True:
        _STOP_SIGNAL[0] = signum
    return _STOP_SIGNAL[0]


#: The signals a command ends on as on a Ctrl-C (a scheduler's or container's stop, a closed terminal).
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def not_ignored(signals) -> tuple[int, ...]:
    """Those of ``signals`` the process does not ignore: one it was started with ignored (``nohup``'s SIGHUP, a
    background job's Ctrl-C) stays ignored, by the command and its workers (campaign 32a F1)."""
    return tuple(s for s in signals if signal.getsignal(s) is not signal.SIG_IGN)


def raise_stop(signum, frame) -> None:
    """The handler of a stop signal while a command runs: recorded (``stop_requested``), then a KeyboardInterrupt."""
    stop_requested(signum)
    raise KeyboardInterrupt


class signals_held:
    """While the block runs, the Python handlers of ``signals`` that raise (Python's Ctrl-C handler, :func:`raise_stop`)
    only record a signal; on leaving, the handlers are back and the first signal recorded is handed to its own handler
    then (a KeyboardInterrupt raised where the caller can act on it). Only in the main thread, where Python runs
    signal handlers; elsewhere nothing is changed.

    Handlers, not the thread's signal mask: a process-directed signal blocked in the main thread is delivered to
    another thread that does not block it (OpenBLAS's, OpenMP's), and Python then runs the handler in the main
    thread all the same (CI, where OMP_NUM_THREADS is unset, raised the interrupt inside torch's import)."""

    def __init__(self, signals) -> None:
        import os

        self.signals = tuple(signals)
        self.held: list[int] = []
        self.previous: dict = {}
        self.pid = os.getpid()

    def _hold(self, signum, frame) -> None:
        import os

        if os.getpid() == self.pid:  # not in a process forked meanwhile, before it set its own handlers
            self.held.append(signum)

    def __enter__(self) -> "signals_held":
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous = {s: h for s in self.signals if callable(h := signal.getsignal(s))}
            for s in self.previous:
                signal.signal(s, self._hold)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        if self.held:
            first = self.held[0]
            self.previous[first](first, None)  # raises: Python's handler, or raise_stop


def check_stop() -> None:
    """A stop signal whose KeyboardInterrupt was lost ends the run here, as it would have where it arrived."""
    if _STOP_SIGNAL[0] is not None:
        raise KeyboardInterrupt
