"""Domain errors. Each maps to one line on stderr and a documented exit code (see README)."""

from __future__ import annotations

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
    """An output that cannot be written for want of space (ENOSPC, EDQUOT): fatal even while one item is
    written, since every following item would fail the same way (exit code 1, the run ``stopped``)."""


class WeightsError(FundusError):
    """Missing, corrupt, unknown or mismatching model weights (exit code 1)."""


#: What the allocators say when memory runs out: OpenCV (-4), C++ (std::bad_alloc), torch's CPU and CUDA
#: allocators, the C library (ENOMEM).
_OUT_OF_MEMORY = ("Insufficient memory", "bad_alloc", "can't allocate memory", "out of memory", "Cannot allocate memory")


def address_space_limit() -> int | None:
    """The process's address-space limit in bytes (``ulimit -v``), None when unlimited."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, OSError, ValueError, AttributeError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def out_of_memory(e: BaseException, *, starting: bool = False) -> bool:
    """``e`` says that memory ran out: a MemoryError (also as the cause of ``e``), or an allocator's message.
    With ``starting`` (an error that ended a command, not an item) also the SystemError "error return without
    exception set" under an address-space limit: what importing torch under a low ``ulimit -v`` raises. A
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
    return (starting and isinstance(e, SystemError) and "error return without exception set" in str(e)
            and address_space_limit() is not None)


def run_script(main) -> None:
    """Run a ``scripts/`` entry point as the commands run: a ``FundusError`` (unknown weights, a missing set, a
    refused output) becomes its one-line message, its hint and its exit code instead of a traceback."""
    import sys

    try:
        main()
    except FundusError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        if e.hint:
            print(f"Hint: {e.hint}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
