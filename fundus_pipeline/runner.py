"""The stage runner shared by every folder-in/folder-out command (the contract is in ``stages/base.py``).

It resolves the inputs (a folder searched recursively, one image file, or a text file listing image
paths) and pairs the stage's extra input roles by key, guards and locks the output folder, decodes each
item and estimates its field of view once, calls the stage's pure ``compute``, writes every output
atomically, records per-item failures without stopping, journals finished items so that ``--resume``
works even after a crash, processes items in parallel worker processes when asked (each with its share
of the CPU threads), reports progress (a bar on a terminal, a line every 30 s or 10% otherwise), and
writes ``manifest.json`` and ``results.csv`` every minute while it runs, at the end and on Ctrl-C, each
streamed from the rows (kept as compact JSON text) a row at a time.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import hashlib
import json
import math
import multiprocessing
import os
import platform
import re
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from tqdm import tqdm

from fundus_pipeline import __version__
from fundus_pipeline.config import MAX_THREADS, MAX_WORKERS
from fundus_pipeline.errors import EXIT_INTERRUPTED, EXIT_ITEMS_FAILED, EXIT_OK, DiskFullError, FundusError, InputError, UsageError, out_of_memory, printable, STOP_SIGNALS, check_stop, not_ignored, raise_stop, signals_held, stop_requested
from fundus_pipeline.io import SUPPORTED_EXTENSIONS, ImageItem, discover_images, fold_key, fundus_manifest_head, open_atomic, read_image, read_manifest_head, write_image_atomic
from fundus_pipeline.provenance import code_record
from fundus_pipeline.stages.base import Fov, Image, ItemInput, ItemOutput, Stage

JOURNAL = ".fundus-journal.jsonl"
LOCK = ".fundus-lock"
#: The outputs that rows no longer in the journal wrote and that stay in the folder (a photograph no longer among
#: the inputs, a key renamed): ``{"key", "outputs"}`` a line, so they still count as the folder's own (review 23 R23-9).
LEFT = ".fundus-left.jsonl"
BASE_COLUMNS = ["key", "input", "outputs", "status", "error", "seconds"]
LIST_EXTENSIONS = (".txt", ".lst", ".list")
#: Seconds between snapshots of results.csv and manifest.json during a run (the journal has every row at once).
SNAPSHOT_S = 60.0
SNAPSHOT_SHARE = 0.05  # ... or longer, so that writing them takes at most this share of the run (100,000 rows: seconds)
MAX_LIST_BYTES = 64 << 20


@dataclass
class RunResult:
    stage: str
    in_dir: Path
    out_dir: Path
    counts: dict
    failed: list[dict]
    duration_s: float
    interrupted: bool
    store: "RowStore" = field(default_factory=lambda: RowStore())
    threads_used: "int | list[int] | None" = None  # the CPU threads a worker used (a list: a resume ran on another count)
    notes: list[str] = field(default_factory=list)  # what the resume noted (``resumable_rows``), as the manifest records it

    @property
    def rows(self) -> list[dict]:
        """Every row, in key order (parsed from the compact store: for a small run or a test)."""
        return list(self.store.values())

    @property
    def exit_code(self) -> int:
        return exit_code_of(self.interrupted, self.counts)

    def summary(self) -> dict:
        return {
            "stage": self.stage,
            "input": str(self.in_dir),
            "output": str(self.out_dir),
            "counts": self.counts,
            "failed": self.failed,
            "manifest": str(self.out_dir / "manifest.json"),
            "results": str(self.out_dir / "results.csv"),
            "duration_s": round(self.duration_s, 3),
            "interrupted": self.interrupted,
            **({"resume_notes": self.notes} if self.notes else {}),
            "exit_code": self.exit_code,
        }


def exit_code_of(interrupted: bool, counts: dict) -> int:
    """A run's exit code: 130 when interrupted, 3 when an item failed, else 0 (README, "Exit codes")."""
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_ITEMS_FAILED if counts.get("error", 0) else EXIT_OK


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere platform.processor()), '' when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment() -> dict:
    """Versions and the machine, recorded in manifests and benchmark JSON. The CPU model and the vector
    instruction set torch dispatches to are recorded because timings (and the last bits of float results)
    depend on them: this project's 2-core machine has trained the same networks 3.4-3.8x slower on some days
    than on others (README, "Speed and memory")."""
    import cv2
    import numpy

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
    }
    if "torch" in sys.modules:
        import torch

        env["torch"] = torch.__version__
        env["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():  # every visible GPU (the stage's own device is in its config record)
            env["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def _is_relative_to(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class Inputs:
    """The resolved primary input: its kind (folder, file or list), the path given, the items, and what the
    search of a folder passed over (``discover_images``'s notes: printed with the progress, recorded in the
    manifest)."""

    kind: str
    path: Path
    items: list[ImageItem]
    notes: tuple[str, ...] = ()

    def record(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "count": len(self.items), **({"notes": list(self.notes)} if self.notes else {})}

    def say_notes(self) -> None:
        for note in self.notes:
            say_note(note)


def _to_stderr(line: str) -> None:
    """``line`` on stderr; a stderr that cannot be written (closed, a caller's stream without flush) or none at all
    (pythonw, some daemons: print would write to stdout instead; campaign 43c F9) is passed over."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            print(line, file=sys.stderr, flush=True)


def say_note(note: str) -> None:
    """``note`` on stderr, one line (``note: ...``)."""
    _to_stderr(printable(f"note: {note}"))


def _stderr_is_terminal() -> bool:
    """Whether stderr is a terminal: False for a caller's stream without ``isatty`` (a logging proxy, an
    AttributeError that had escaped the Python API and left the manifest "running"; campaign 43c F9) or none."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _read_list(path: Path) -> list[ImageItem]:
    """Items of a list file: one image path a line (blank lines and lines starting with # skipped; a
    leading UTF-8 byte-order mark too), relative paths taken from the list's folder; a path listed twice is
    one item. Keys are the paths relative to the deepest folder that
    holds them all, without extension. A listed file that is missing is kept: it fails as an item."""
    try:
        if path.stat().st_size > MAX_LIST_BYTES:
            raise UsageError(f"input list {path} is larger than {MAX_LIST_BYTES >> 20} MiB")
        text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")  # a byte-order mark is no path
    except OSError as e:
        raise UsageError(f"cannot read input list {path}: {e.strerror or e}") from None
    base = os.path.dirname(os.path.realpath(path))
    paths = []  # strings: os.path is several times faster than pathlib over 100,000 lines
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            paths.append(os.path.abspath(line if os.path.isabs(line) else os.path.join(base, line)))
    if not paths:
        return []
    common = os.path.commonpath([os.path.dirname(p) for p in paths])
    prefix = common if common.endswith(os.sep) else common + os.sep
    items: dict[str, ImageItem] = {}
    for p in paths:
        key = os.path.splitext(p[len(prefix):])[0]
        if key in items and str(items[key].path) != p:
            raise UsageError(f"two listed files have the same key '{key}': {items[key].path} and {p}; rename or remove one")
        items[key] = ImageItem(key, Path(p))
    return [items[k] for k in sorted(items)]


def resolve_inputs(path: Path) -> Inputs:
    """A folder (searched recursively), one image file (key: its name without extension), or a text
    file (``.txt``, ``.lst``, ``.list``) listing image paths."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"input does not exist: {path}")
    # absolute from here on: the tables and manifests then name every input unambiguously, so a replay,
    # a resume or `fundus report` from another working folder finds the same files
    path = Path(os.path.abspath(path))
    if path.is_dir():
        notes: list[str] = []
        items = discover_images(path, notes)
        return Inputs("folder", path, items, tuple(notes))
    if not path.is_file():
        raise UsageError(f"input is neither a folder nor a regular file: {path}")
    ext = path.suffix.lower()
    if ext in SUPPORTED_EXTENSIONS:
        return Inputs("file", path, [ImageItem(path.stem, path)])
    if ext in LIST_EXTENSIONS:
        return Inputs("list", path, _read_list(path))
    raise UsageError(
        f"input {path} is not a folder, an image ({', '.join(SUPPORTED_EXTENSIONS)}) or a list of paths ({', '.join(LIST_EXTENSIONS)})"
    )


def own_file(name: str) -> bool:
    """A file fundus leaves behind in an output folder without it holding a run: the lock, or the temporary
    file of a write that a kill -9 cut short (``.<name>.<12 hex>.tmp``)."""
    return name == LOCK or _TEMP_NAME.fullmatch(name) is not None


def is_empty(d: Path) -> bool:
    """``d`` holds nothing but :func:`own_file` files (a run killed before its first table is a fresh start)."""
    return all(own_file(p.name) for p in d.iterdir())


def check_run_paths(in_path: Path, out_dir: Path, *, overwrite: bool, resume: bool, inputs: Inputs | None = None,
                    stage: str | None = None) -> tuple[Path, Path]:
    """Refuse bad input/output combinations before any work (and before a model is loaded). ``stage``: the
    name of the stage (``"run"`` for a chain) that would write OUT; a folder another stage's run wrote is not
    resumed or overwritten by it.

    Returns the resolved (input, output) paths. Nothing is created here.
    """
    if overwrite and resume:
        raise UsageError("--overwrite and --resume cannot be used together")
    in_path = Path(in_path)
    if not in_path.exists():
        raise UsageError(f"input does not exist: {in_path}")
    try:
        src, dst = in_path.resolve(), Path(out_dir).resolve()
    except (RuntimeError, OSError) as e:  # a symbolic link loop (RuntimeError before Python 3.13)
        raise UsageError(f"cannot resolve {out_dir} or {in_path}: {getattr(e, 'strerror', None) or e}") from None
    if src.is_dir() and (dst == src or _is_relative_to(dst, src)):
        raise UsageError(f"output folder {out_dir} is the input folder or inside it; choose a folder outside {in_path}")
    if dst.exists() and not dst.is_dir():  # (before the next check: `enhance x.png x.png` is about this; campaign 27a F10)
        raise UsageError(f"output path exists and is not a folder: {out_dir}")
    if src == dst or _is_relative_to(src, dst):
        # a folder too: the run would write over its files, and --overwrite remove them with the run's folders
        what = "input folder" if src.is_dir() else "input"
        raise UsageError(f"the {what} {in_path} lies inside the output folder {out_dir}; choose another output folder")
    if inputs is not None and inputs.kind in ("list", "folder"):
        # a folder's items too: a symbolic link in it may lead into OUT, whose outputs would be read back as inputs
        inside = _first_inside((it.path for it in inputs.items if inputs.kind == "list" or it.linked), dst)
        if inside is not None:
            if inputs.kind == "list":
                raise UsageError(f"listed input {inside} lies inside the output folder {out_dir}; choose another output folder")
            raise UsageError(f"input {inside} lies inside the output folder {out_dir} through a symbolic link; remove the link or choose another output folder")
    non_empty = dst.exists() and not is_empty(dst)
    if non_empty and not (overwrite or resume):
        raise UsageError(f"output folder {out_dir} is not empty; pass --resume to continue a run or --overwrite to replace its outputs")
    if non_empty and resume and not (manifest_stage(dst / "manifest.json") or (dst / JOURNAL).exists()):
        # a manifest.json that fundus did not write is no run to continue: its files would be replaced
        raise UsageError(f"--resume: {out_dir} holds no earlier fundus run (no manifest.json written by fundus); choose an empty folder or pass --overwrite")
    if non_empty and (resume or overwrite) and stage is not None:
        # another stage's folder: its record and table would be replaced by this stage's, its outputs left without
        # one (campaign 27a F2: `fundus score --overwrite` into an enhance folder; a --resume then compared the two
        # stages' settings)
        other = manifest_stage(dst / "manifest.json")
        if other is not None and other != stage:
            flag = "--resume" if resume else "--overwrite"
            raise UsageError(f"{flag}: {out_dir} holds the outputs of `fundus {other}` (its manifest.json), not of `fundus {stage}`; "
                             "choose another folder")
    if non_empty and (resume or overwrite):
        # the run rewrites its tables: each one there must be fundus's, whatever else the folder holds
        foreign = foreign_table(dst)
        if foreign is not None:
            flag = "--resume" if resume else "--overwrite"
            raise UsageError(f"{flag}: {out_dir} holds {foreign} that no fundus run wrote, so it is not replaced; move it away or choose another folder")
    return src, dst


def foreign_table(folder: Path, tables: tuple[str, ...] = ("manifest.json", "results.csv")) -> str | None:
    """The first of ``tables`` in ``folder`` that fundus did not write (a ``manifest.json`` without fundus's
    head, a ``results.csv`` whose header does not start with ``key,input,``), or None. A run replaces these."""
    for name in tables:
        p = folder / name
        if not (p.exists() or p.is_symlink()):
            continue
        if name == "manifest.json":
            if manifest_stage(p) is None:
                return name
            continue
        try:
            with open(p, "rb") as f:
                head = f.read(64)
        except OSError:
            return name
        if not head.startswith(b"key,input,"):
            return name
    return None


_MANIFEST_STAGE = re.compile(rb'"stage": "([a-z_]+)"')


def manifest_stage(manifest: Path) -> str | None:
    """The ``stage`` of a manifest.json that fundus wrote ("run", "grade", ...), or None when the file is
    missing or not fundus's. Only its head is read: every manifest starts with its schema version, ``"tool":
    {"name": "fundus-pipeline", ...}`` and ``"stage"``, and the manifest of a 100,000-photograph run is tens
    of megabytes (``io.fundus_manifest_head``)."""
    head = fundus_manifest_head(manifest)
    if head is None:
        return None
    m = _MANIFEST_STAGE.search(head)
    return m.group(1).decode() if m else None


def _first_inside(paths: Iterable[Path], root: Path) -> Path | None:
    """The first of ``paths`` that is ``root`` (resolved) or lies inside it once symbolic links are resolved;
    each folder is resolved once, so 100,000 listed files in a few folders take a stat each."""
    r = str(root)
    prefix = r if r.endswith(os.sep) else r + os.sep
    folders: dict[str, str] = {}
    for p in paths:
        d, name = os.path.split(str(p))
        real = folders.get(d)
        if real is None:
            real = folders[d] = os.path.realpath(d)
        full = os.path.join(real, name)
        if os.path.islink(full):
            full = os.path.realpath(full)
        if full == r or full.startswith(prefix):
            return p
    return None


def _create_output(out_dir: Path, shown: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".fundus-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FundusError(f"cannot write to output folder {shown}: {e.strerror or e}") from None


_HELD_LOCKS: set[tuple[int, int]] = set()  # (device, inode) of the output locks this process holds


def probe_lock(path: Path, exclusive: bool = False) -> tuple[int | None, bool]:
    """Open the lock file ``path`` (never through a link) and try to flock it without waiting: (its fd, or None
    when there is no such file; whether another holder has it). The lock taken stays until the caller closes
    the fd."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None, False
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as e:
        return fd, e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    return fd, False


def refuse_while_written(folder: Path, what: str) -> None:
    """A UsageError (exit 2) when a fundus process writes ``folder``: the nearest folder at or above it that holds
    a lock file (the stage folder whose outputs these are: a sub-folder of one too, review 33 R33-3) has it held
    by another process (this process's own locks do not count, R33-4), or a run there stopped before its first
    manifest. What the folder holds is then part of a run whose record is not written (evaluated, a run's first
    photographs were scored at the default threshold, not the run's, exit 0; campaign 34b F1)."""
    folder = Path(folder)
    real = Path(os.path.realpath(folder))  # the folder's own ancestors: `..` and links resolved (review 34 R34-1)
    owner = next((d for d in (real, *real.parents) if (d / LOCK).is_file()), None)
    if owner is None:
        return
    lock, shown = owner / LOCK, (folder if owner == real else f"{folder} (inside {owner})")
    own = False
    with contextlib.suppress(OSError):
        st = os.stat(lock, follow_symlinks=False)
        own = (st.st_dev, st.st_ino) in _HELD_LOCKS
    if not own:
        fd, busy = probe_lock(lock)
        if fd is not None:
            os.close(fd)
        if busy:
            raise UsageError(f"{what} {shown} is being written by another fundus process (its {LOCK} is held)",
                             hint="evaluate it once that command has ended")
    if (owner / JOURNAL).is_file() and not (owner / "manifest.json").is_file():
        # a run stopped (killed) before its first manifest: what it used, a segmenter's threshold, is not recorded
        raise UsageError(f"{what} {shown} holds outputs of a fundus run that stopped before writing its manifest.json",
                         hint="finish it first: rerun its command with --resume")


class OutputLock:
    """An exclusive advisory lock on ``OUT/.fundus-lock`` held for the whole run, so that a second run
    into the same folder is refused at once (exit 2) instead of interleaving with the first."""

    def __init__(self, out_dir: Path, shown: Path):
        self.path, self.shown, self.fd = out_dir / LOCK, shown, None
        self.created = False  # this run made the lock file (a run refused before any work removes it again)
        self.id: tuple[int, int] | None = None

    def __enter__(self) -> "OutputLock":
        import fcntl
        import stat

        # the lock file is truncated and written: never through a symbolic link (it could point at an input),
        # and never a FIFO or device (opening or writing one blocks or fails)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(self.path).st_mode):
                raise UsageError(f"{self.shown / LOCK} is not a regular file (a symbolic link, folder or special file); "
                                 "fundus keeps its lock there: remove it, or choose another output folder")
        nofollow = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow, 0o644)
                self.created = True
            except FileExistsError:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | nofollow, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:  # replaced by a link since the check above
                raise UsageError(f"{self.shown / LOCK} is a symbolic link; remove it, or choose another output folder") from None
            raise FundusError(f"cannot write to output folder {self.shown}: {e.strerror or e}") from None
        try:
            for attempt in range(4):  # a moment's shared lock (another command's _check_parent probe) is waited out
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 3:
                        raise
                    time.sleep(0.02)
        except OSError as e:
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UsageError(f"another fundus run is writing to {self.shown}; wait for it to finish or choose another output folder") from None
            raise FundusError(f"cannot lock output folder {self.shown}: {e.strerror or e}") from None
        st = os.fstat(self.fd)
        self.id = (st.st_dev, st.st_ino)
        _HELD_LOCKS.add(self.id)
        try:
            self._check_parent()
        except BaseException:
            self.__exit__(UsageError)
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())
        return self

    def _check_parent(self) -> None:
        """Refuse a stage folder of a ``fundus run`` that another process is running (its OUT's lock is held,
        not by this process): a stage command writing there replaced the chain's results under it."""
        parent = self.path.parent.parent / LOCK
        with contextlib.suppress(OSError):
            st = os.stat(parent, follow_symlinks=False)
            if (st.st_dev, st.st_ino) in _HELD_LOCKS:
                return  # this process's own run: fundus run's stages
        fd, held = probe_lock(parent)
        if fd is not None:
            os.close(fd)  # releases the shared lock at once
        if held:
            raise UsageError(f"another fundus command is writing to {self.shown.parent}, which holds {self.shown} "
                             "(a stage folder of a running `fundus run`, say); wait for it to finish or choose another output folder")

    def intact(self) -> bool:
        """Whether the lock file is still the one this run holds: False when the output folder was removed or
        replaced under the run (writing on would re-create it, unlocked, and report outputs that are gone)."""
        try:
            a, b = os.fstat(self.fd), os.stat(self.path)
        except (OSError, TypeError):
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def __exit__(self, exc_type, *exc) -> None:
        if self.fd is not None:
            if self.created and exc_type is not None and issubclass(exc_type, UsageError):
                # Refused before any work (e.g. --overwrite on a folder fundus did not write): the folder is
                # left as it was. Unlinked while still locked, so a run that opened it meanwhile is refused.
                with contextlib.suppress(OSError):
                    self.path.unlink()
            os.close(self.fd)  # releases the lock; otherwise the file stays (removing it would race a waiting run)
            self.fd = None
            _HELD_LOCKS.discard(self.id)


class RowStore(Mapping):
    """A stage's rows by key, each kept as its compact JSON text and parsed when read (a third of the
    memory of a dict, so a run over 100,000 photographs holds tens of megabytes of rows, not hundreds).
    Iterates in key order; ``rows[key]`` is a fresh dict."""

    def __init__(self) -> None:
        self._text: dict[str, str] = {}

    def add_text(self, key: str, text: str) -> None:
        self._text[key] = text

    def discard(self, key: str) -> None:
        self._text.pop(key, None)

    def text(self, key: str) -> str:
        return self._text[key]

    def __getitem__(self, key: str) -> dict:
        return json.loads(self._text[key])

    def __contains__(self, key: object) -> bool:
        return key in self._text

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._text))

    def __len__(self) -> int:
        return len(self._text)


def _dumps(row: dict) -> str:
    return json.dumps(row, default=str)


def _revision_words(found: set, now: int | None) -> str:
    """How a resume's note names the rows made by other code: "were made by another version of fundus (results
    revision 1; this one computes revision 2), whose results can differ,"."""
    known = sorted(r for r in found if isinstance(r, int) and not isinstance(r, bool))
    which = f"results revision {', '.join(map(str, known))}" if known else "before results revisions were recorded"
    if known and None in found:
        which += ", or before they were recorded"
    return f"were made by another version of fundus ({which}; this one computes revision {now}), whose results can differ,"


def _previous_lines(out_dir: Path) -> Iterator[tuple[dict, str]]:
    """Rows of earlier runs in this folder, oldest first, each with the configuration hash it was written
    with, and its JSON text: the crash-safe journal when there is one (it holds every row of the run that
    wrote it, the resumed ones included, and is read a line at a time), else manifest.json."""
    journal = out_dir / JOURNAL
    if journal.exists():
        with open(journal, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue  # a torn last line after a crash
                if isinstance(r, dict) and isinstance(r.get("key"), str):
                    yield r, line.rstrip("\n")
        return
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text(errors="surrogateescape"))
            items = m.get("items", [])
            for r in items:
                if isinstance(r, dict) and isinstance(r.get("key"), str):
                    r = {**r, "config_sha256": m.get("config_sha256"), "results_revision": m.get("results_revision")}
                    yield r, _dumps(r)
        except (OSError, ValueError, AttributeError, TypeError):
            return


#: The fields the journal adds to a row (its tag): the configuration hash and the results revision it was made with.
_TAG_FIELDS = ("config_sha256", "results_revision")


def _tag(cfg_hash: object, revision: object = None) -> str:
    """The end of a journal line after the row's own fields (``revision`` None: as versions before the results
    revision wrote it)."""
    more = "" if revision is None else f', "results_revision": {json.dumps(revision)}'
    return f', "config_sha256": {json.dumps(cfg_hash)}{more}}}'


def _untag(row: dict, text: str) -> str:
    """The JSON text of a journal row without its tag (cut from the text when it ends with it, as the journal
    writes it; else the row re-encoded)."""
    tag = _tag(row.get("config_sha256"), row.get("results_revision"))
    if text.endswith(tag):
        return text[: -len(tag)] + "}"
    return _dumps({k: v for k, v in row.items() if k not in _TAG_FIELDS})


def resumable_rows(dst: Path, cfg_hash: str, work: list[WorkItem], notes: list | None = None, redone: dict | None = None,
                   config: dict | None = None, left: dict | None = None, checked: dict | None = None,
                   revision: int | None = None) -> "RowStore":
    """The rows of earlier runs in ``dst`` that ``--resume`` keeps: written with this configuration, ok, of a
    key of ``work`` that still names the same files (every role's), their outputs present with the size they
    were written with (``outputs_intact``) and their input
    unchanged (``input_state``; ``checked``: the caller has checked every row's input already, and these are its
    findings, ``{key: (state, refreshed stat fields)}``).
    An input no longer listed is not part of this run's table (its outputs stay in place); a key that now
    names another file (another listed path; in `fundus run`, the enhanced image instead of the input, or as
    the image a simulated run's comparison delivers) is computed again. A UsageError when the folder holds
    rows of other configurations only. One pass over the journal, a stat or two a row. ``notes`` receives a
    line when photographs done before are planned now under other keys (campaign 23b M1: a list file's keys
    are relative to the deepest folder holding every listed file, so one file added in another folder renames
    them all, and the resume redid everything without a word); and when photographs done before are processed
    again because their input or an output changed since, or are no longer among the inputs (campaign 23b
    LOW-3). ``redone`` receives ``{key: (why, the outputs of its last finished row)}`` for the planned keys whose
    finished row is not kept (processed again, or failed since); ``why``: "input" (its bytes changed), "file"
    (another file under the key), "unreadable", "outputs", "revision" (made by other code), or None (its last row
    had failed). ``config``: this run's configuration record, to
    name what differs from the folder's when it holds rows of other configurations only. ``left`` receives
    ``{key: outputs}`` of the finished rows of keys no longer planned (their outputs stay; ``LEFT``). ``revision``:
    the stage's ``results_revision``; a finished row made with another (or before it was recorded) is processed
    again, and said (campaign 39b F1)."""
    planned = {w.key: (str(w.path), _extra_paths(w) if w.extra else None) for w in work}
    key_of = {str(w.path): w.key for w in work}
    renamed: dict[str, str] = {}
    again: dict[str, tuple[str, list]] = {}  # key: (why, its earlier outputs) of a finished row processed again
    dropped: set[str] = set()
    away: set[str] = set()  # keys whose finished row is kept though an input of it cannot be found now
    finished: dict[str, list] = {}  # key: the outputs of its newest ok row of this configuration
    rows, hashes = RowStore(), set()
    made_by: dict = {}  # key: the results revision of its row processed again for it
    for r, text in _previous_lines(dst):  # oldest first: a newer row of a key decides
        hashes.add(r.get("config_sha256"))
        key = r["key"]
        if r.get("status") == "ok" and key_of.get(str(r.get("input"))) not in (None, key):  # (its old key may be another file's now)
            renamed[key] = key_of[str(r.get("input"))]
        why = None
        finished_here = r.get("config_sha256") == cfg_hash and r.get("status") == "ok"
        if finished_here and key in planned and revision is not None and r.get("results_revision") != revision:
            # (before the file's check: versions before 2026-12-02 recorded a relative path, campaign 39b F3; and before the
            # input's: computed again anyway, it is not read for a note's sake, review 41 F1: every input of an older
            # version's folder had been read in full before the first item)
            why = "revision"
            made = r.get("results_revision")
            made_by[key] = made if isinstance(made, int) and not isinstance(made, bool) else None  # (a hand edit: a list)
        elif not (finished_here and (r.get("input"), r.get("inputs")) == planned.get(key)):
            # a finished row whose key now names another file (p0.png replaced by p0.jpg): processed again, and said
            why = "file" if finished_here and key in planned else "other"
        elif not outputs_intact(dst, r):
            why = "outputs"
        else:
            fresh: dict = {}
            if checked is None:
                state = input_state(r, fresh)
            else:  # the caller's findings (a chained run's first stage)
                state, fresh = checked.get(key, ("same", {}))
            if state in ("changed", "unreadable"):  # an input replaced since (or unreadable now) is processed again
                why = "input" if state == "changed" else "unreadable"
            elif state == "missing":  # one that cannot be found now (a list on storage that is away) keeps its row (campaign 36d F3)
                away.add(key)
            if fresh and why is None:  # its bytes read and found the same: recorded with the stat of now (review 37 M-2)
                r.update(fresh)
                text = _dumps(r)
        if r.get("config_sha256") == cfg_hash and (r.get("status") == "ok" or isinstance(r.get("earlier_outputs"), list)):
            finished[key] = r.get("outputs" if r.get("status") == "ok" else "earlier_outputs")
            finished[key] = finished[key] if isinstance(finished[key], list) else []
        if why is None:
            rows.add_text(key, _untag(r, text))
            again.pop(key, None)
        else:
            rows.discard(key)
            away.discard(key)
            if why == "other":
                again.pop(key, None)
            else:
                again[key] = (why, finished[key])
        if key not in planned and r.get("status") == "ok" and r.get("config_sha256") == cfg_hash:
            dropped.add(key)
        if key not in planned and left is not None:
            left.setdefault(key, []).extend(n for field in ("outputs", "earlier_outputs") if isinstance(r.get(field), list)
                                            for n in r[field] if plain_name(n))
    if hashes and cfg_hash not in hashes:
        raise UsageError(f"{dst} was written with a different configuration{_config_change(dst, config)}; rerun with the same options, "
                         "write into a new folder, or use --overwrite")
    if redone is not None:
        redone.update((k, (again.get(k, (None,))[0], outs)) for k, outs in finished.items() if k in planned and k not in rows)
    dropped -= set(renamed)
    if notes is not None:
        for why, what in (("input", "changed since (its bytes differ from those recorded)"),
                          ("unreadable", "cannot be read now (its file's status changed since)"),
                          ("outputs", "lost or changed an output file since"),
                          ("revision", _revision_words({made_by.get(k) for k, (w, _) in again.items() if w == "revision"}, revision)),
                          ("file", "are listed now as another file under the same key")):  # (review 23 R23-10)
            if n := sum(1 for w, _ in again.values() if w == why):
                first = next(k for k, (w, _) in again.items() if w == why)
                notes.append(f"{n} photograph(s) done before {what} and are processed again (e.g. {first!r})")
        if dropped:
            notes.append(f"{len(dropped)} photograph(s) done before are no longer among the inputs (e.g. {min(dropped)!r}): this run's "
                         "table leaves them out; their outputs stay in place")
        if away := {k for k in away if k in rows and k in planned}:
            notes.append(f"{len(away)} photograph(s) done before are listed but cannot be found now (e.g. {min(away)!r}): "
                         "their rows of the earlier run are kept as they were (rerun with --resume once the files are back, "
                         "or leave them out of the list)")
    if renamed and notes is not None:
        old, new = next(iter(renamed.items()))
        notes.append(f"{len(renamed)} photograph(s) done before are listed now under another key (e.g. {old!r} is now {new!r}) and are "
                     "processed again; their earlier outputs stay under the old names, unless a new key takes a name (a "
                     "list file's keys are relative to the deepest folder holding every listed file: a file added in another folder "
                     "changes them)")
    return rows


def _config_change(dst: Path, config: dict | None) -> str:
    """What differs between the configuration ``dst/manifest.json`` records and ``config`` (``config_change``); ""
    when either is unknown (campaign 24b F7: the refusal did not say which option)."""
    try:
        old = read_manifest_head(dst / "manifest.json", errors="surrogateescape").get("config")
    except (OSError, ValueError, AttributeError):
        return ""
    return config_change(old, config)


#: What a long configuration value that differs stands for, where its key does not say (campaign 27b F1: "degraders
#: differs" did not say that a --recipe or --simulate file's contents had changed).
_DIFFERS = {"degraders": ": the degradations' settings, a recipe file's contents, a preset's or a type's"}


def config_change(old: object, now: object) -> str:
    """`` (flag_threshold: 0.5 there, 0.3 now; degraders differs)``: the keys whose values differ between a recorded
    configuration ``old`` and this run's ``now`` (plain values first, at most three); "" when either is not a dict
    or none differs."""
    if not isinstance(old, dict) or not isinstance(now, dict):
        return ""
    now = json.loads(json.dumps(now, default=str))  # as a manifest records it
    diff = [k for k in sorted(set(old) | set(now)) if old.get(k) != now.get(k)]

    def said(k: str) -> str:  # a key one side does not record is its default there (campaign 27a F11: it read "null")
        a, b = (json.dumps(c[k], default=str) if k in c else "the default" for c in (old, now))
        return f"{k}: {a} there, {b} now" if max(len(a), len(b)) <= 40 else f"{k} differs{_DIFFERS.get(k, '')}"

    parts = sorted((said(k) for k in diff), key=lambda t: t.endswith(" differs"))  # the plain values first
    return f" ({'; '.join(parts[:3])}{'; ...' if len(parts) > 3 else ''})" if parts else ""


def stage_lines(folder: Path) -> Iterator[dict]:
    """The rows a stage folder holds, oldest first, without the configuration tag (a later row of the same
    key replaces an earlier one); nothing for a folder that holds none. Read a line at a time."""
    for r, _ in _previous_lines(folder):
        for name in _TAG_FIELDS:
            r.pop(name, None)
        yield r


def stage_texts(folder: Path) -> Iterator[tuple[str, str]]:
    """(key, the row's JSON text without the configuration tag) of each row a stage folder holds, oldest
    first (see ``stage_lines``): for keeping rows as text without encoding them again."""
    for r, text in _previous_lines(folder):
        yield r["key"], _untag(r, text)


def stage_rows(folder: Path) -> RowStore:
    """The rows a stage folder holds, by key (see ``stage_lines``)."""
    rows = RowStore()
    for key, text in stage_texts(folder):
        rows.add_text(key, text)
    return rows


_TEMP_NAME = re.compile(r"\..*\.[0-9a-f]{12}\.tmp", re.DOTALL)


def remove_stale_temporaries(out_dir: Path, recursive: bool = True) -> None:
    """Temporary files left by a killed run (``.<name>.<12 hex>.tmp``, see fundus_pipeline.io), in ``out_dir``
    and, with ``recursive``, its subfolders; a hidden ``.tmp`` file of another name is not fundus's and is left
    alone. Only under the folder's lock (no other fundus process writes there)."""
    for p in (out_dir.rglob if recursive else out_dir.glob)(".*.tmp"):
        if not _TEMP_NAME.fullmatch(p.name):
            continue
        try:
            p.unlink()
        except OSError:
            pass


@dataclass(frozen=True)
class WorkItem:
    """One unit of work: the key, the primary input file, and the files of the other input roles
    (None when the role's folder has no file with this key)."""

    key: str
    path: Path
    extra: dict[str, Path | None] = field(default_factory=dict)
    near: dict[str, str] = field(default_factory=dict)  # role: a key there differing from this one only in case or Unicode form


def check_parallelism(workers: int, threads: int | None) -> None:
    """``--workers`` and ``--threads`` in range (a UsageError before anything is created: a value past a C
    int would otherwise fail inside the thread pools, after OUT was made)."""
    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads must be between 1 and {MAX_THREADS}, got {threads}")


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(workers: int) -> int:
    """CPU threads per worker: the available cores shared among the workers (at least 1)."""
    return max(1, available_cpus() // max(1, workers))


_MALLOC_KEPT = [False]
_GLIBC_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def _keep_freed_memory() -> None:
    """glibc only, once per process that runs a network: freed blocks under 32 MB stay in the heap and its top is
    not trimmed, so each forward pass reuses the pages of the last one instead of mapping fresh ones and faulting
    them in (campaign 36b: 50,000 page faults and 0.1 s of system time per DRIVE-size segmentation; the chain
    12% faster, segment 16-20%). The results are the same bytes; the process keeps the heap of its largest
    photograph (about 5% more memory on DRIVE-size ones; after an HRF-size one 0.95 GB where glibc's defaults
    keep 0.41: README). Where glibc's own malloc settings are in the environment (``_GLIBC_MALLOC_ENV``, or
    ``glibc.malloc.*`` in GLIBC_TUNABLES), they are left to decide; elsewhere (macOS, musl) nothing is done."""
    if _MALLOC_KEPT[0]:
        return
    _MALLOC_KEPT[0] = True
    if (not sys.platform.startswith("linux") or any(k in os.environ for k in _GLIBC_MALLOC_ENV)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")):  # (another tunable leaves malloc to us; review 36 L-3)
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: a fixed threshold (glibc's dynamic one stops adapting)
        libc.mallopt(-1, (1 << 31) - 1)  # M_TRIM_THRESHOLD: the heap's top is not given back after each pass
    except (OSError, AttributeError):
        return


def _set_threads(stage: Stage | None, threads: int, forked: bool = False) -> None:
    """OpenCV's and (for a torch stage, or any stage when ``stage`` is None) torch's CPU thread counts; a process
    that runs a network keeps its freed memory (``_keep_freed_memory``)."""
    import cv2

    if not forked:  # OpenCV's thread pool must not be reconfigured in a forked child (it can deadlock)
        cv2.setNumThreads(threads)
    if stage is None or stage.uses_torch:
        _keep_freed_memory()
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


_WORKER_STAGE: Any = None


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    """End this worker process when the run's process ``parent`` is gone (killed by kill -9, say): a forked
    worker holds the output folder's lock and journal, so an orphan would keep writing and keep ``--resume``
    refused, and a spawned one would hold its memory for good. A daemon thread compares the parent's pid once
    a second. ``parent`` comes from the parent (``initargs``): read here, in a worker still importing torch
    when the parent was killed, it was already init's, and the worker never ended."""
    import threading

    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="fundus-parent-watch", daemon=True).start()


def _worker_init(stage: Stage, threads: int, parent: int) -> None:
    global _WORKER_STAGE
    _worker_signals()
    _exit_with_parent(parent)
    _WORKER_STAGE = stage
    _set_threads(stage, threads, forked=multiprocessing.get_start_method(allow_none=True) == "fork" or stage.start_method == "fork")
    stage.setup()


def decode(path: Path, info: dict | None = None) -> Image:
    arr, meta = read_image(path, info=info)
    return Image(arr, meta, (info or {}).get("sha256"))


def _stat_record(info: dict) -> list[int]:
    """An input's ``input_stat``: [size, modification time, status-change time, inode] (ns). ``cp -p``, ``rsync -a``
    or an archive's extraction give another photograph the size and modification time of the one it replaces (an
    uncompressed format has one size per camera): they cannot set the status-change time, and a new file has
    another inode (campaign 36d F1: the replaced photograph kept the old one's results)."""
    return [info["size"], info["mtime_ns"], info["ctime_ns"], info["ino"]]


def input_state(row: dict, refreshed: dict | None = None) -> str:
    """``"changed"`` when an input file of a finished row is no longer the one it was computed from: its stat differs
    from that recorded (``input_stat``; the other roles' files, such as score's reference, in ``inputs_stat``) and so
    does its sha256 (read only then), or it is no longer a regular file; ``"unreadable"`` when its stat changed and
    it cannot be read (whether its bytes changed is not known: processed again, its error saying why); ``"missing"``
    when one cannot be found now (its stat fails: a listed file on storage that is away); else ``"same"`` (in that
    order of precedence over the row's files). A file without the
    record (an older run) counts as the same; one recorded by size and modification time only (before 2026-12-05)
    is read once. ``refreshed`` receives the row's stat fields with the stat of now for a file whose bytes were read
    and found the same (a ``chmod``, a rename, a restored backup), so that the next resume does not read it again."""
    files = [("input_stat", None, row.get("input"), row.get("input_stat"), row.get("input_sha256"))]
    stats, digests, paths = row.get("inputs_stat"), row.get("inputs_sha256"), row.get("inputs")
    if isinstance(stats, dict) and isinstance(digests, dict) and isinstance(paths, dict):
        files += [("inputs_stat", role, paths.get(role), stats.get(role), digests.get(role)) for role in sorted(stats)]
    states = set()
    for name, role, *f in files:
        state, now = _file_state(*f)
        states.add(state)
        if now is not None and refreshed is not None:
            if role is None:
                refreshed[name] = now
            else:
                refreshed.setdefault(name, dict(stats))[role] = now
    return next((state for state in ("changed", "unreadable", "missing") if state in states), "same")


#: The sha256 of the input files a resume has read in this process, by (path, stat): fundus run's stages check the
#: same photograph one after the other (review 38 M-2: read two to four times after a chmod -R or an upgrade).
_DIGESTS_READ: dict[tuple[str, tuple], str] = {}


def _file_state(path, stat, digest) -> tuple[str, list | None]:
    """(state, the stat of now when the bytes were read and found the same) of one recorded input file."""
    import stat as stat_mod

    if not (isinstance(stat, list) and len(stat) in (2, 4) and digest and isinstance(path, str)):
        return "same", None
    try:
        st = os.stat(path)
    except OSError:  # not found now (or its folder cannot be entered): away, not changed (campaign 36d F3)
        return "missing", None
    now = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    if now == stat:
        return "same", None
    if not stat_mod.S_ISREG(st.st_mode):  # a FIFO in its place would block the read for good (review 38 L-2)
        return "changed", None
    seen = (path, tuple(now))
    if seen not in _DIGESTS_READ:
        from fundus_pipeline.models.weights import sha256_file

        try:  # (a record of size and time only, of an older run, is read once: review 37 L-1)
            if len(_DIGESTS_READ) >= 200_000:
                _DIGESTS_READ.clear()
            _DIGESTS_READ[seen] = sha256_file(Path(path))
        except OSError:  # there, but not readable now (review 37 M-3, review 38 M-1)
            return "unreadable", None
    return ("same", now) if _DIGESTS_READ[seen] == digest else ("changed", None)


def prepare_item(stage: Stage, key: str, images: dict[str, Image]) -> ItemInput:
    """The stage's input for one item: its decoded images and the FOV of the primary image, found once."""
    primary = images["image"]
    if stage.fov_policy == "estimate":
        fov = Fov.estimate_image(primary)
    elif stage.fov_policy == "full":
        fov = Fov.full(primary.meta.height, primary.meta.width)
    else:
        fov = None
    return ItemInput(key, images, fov)


def write_outputs(stage: Stage, key: str, result: ItemOutput, out_dir: Path) -> dict[str, tuple[int, str]]:
    """Write each output image atomically; on a failure remove the ones already written (no half item).
    Returns {file name: (size in bytes, sha256)}, in the order written."""
    written: dict[str, tuple[int, str]] = {}
    try:
        for suffix, arr in result.images.items():
            name = stage.output_name(key, suffix)
            check_inside(out_dir, name)
            written[name] = write_image_atomic(out_dir / name, arr() if callable(arr) else arr)  # deferred outputs: one at a time
    except BaseException:
        for name in written:
            (out_dir / name).unlink(missing_ok=True)
        raise
    return written


def check_inside(out_dir: Path, name: str) -> None:
    """Refuse (InputError, an item error) an output whose folder below ``out_dir`` is, or lies through, a
    symbolic link: writing through it would replace files outside OUT (campaign 19a F1: a key's sub-folder
    linked elsewhere before ``--resume`` or ``--overwrite``). OUT itself may be a link."""
    parent = os.path.dirname(name)
    if not parent:
        return
    real_out = os.path.realpath(out_dir)
    if os.path.realpath(os.path.join(out_dir, parent)) != os.path.normpath(os.path.join(real_out, parent)):
        raise InputError(f"{os.path.join(out_dir, parent)} is a symbolic link or lies through one: "
                         "fundus writes nothing through a link below the output folder; remove the link")


def plain_name(name: object) -> bool:
    """An output name a row may record: a relative path of plain parts (no ``..``, not absolute, no NUL)."""
    if not isinstance(name, str) or not name or "\0" in name or os.path.isabs(name):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def outputs_intact(dst: Path, row: dict) -> bool:
    """Whether every output file of a finished row is still in ``dst`` with the size it was written with
    (``outputs_size``; a row of an older run without the record: present is enough). One stat a file: a
    truncated or replaced output makes ``--resume`` compute the row again."""
    sizes = row.get("outputs_size") if isinstance(row.get("outputs_size"), dict) else {}
    names = row.get("outputs", [])
    if not isinstance(names, list) or not all(plain_name(n) for n in names):  # a hand-edited row (campaign 19a F4)
        return False
    for name in names:
        try:
            st = os.stat(os.path.join(dst, name))
        except (OSError, TypeError, ValueError):
            return False
        if name in sizes and sizes[name] != st.st_size:
            return False
    return True


def record_left(dst: Path, left: dict[str, list]) -> None:
    """Add ``left`` (``{key: outputs}`` of rows that drop out of the journal while their files stay) to ``dst/LEFT``,
    the files still there only; written atomically."""
    known = left_outputs(dst)
    for key, names in left.items():
        known.setdefault(key, set()).update(names)
    kept = {k: sorted(n for n in v if os.path.isfile(os.path.join(dst, n))) for k, v in sorted(known.items())}
    lines = [json.dumps({"key": k, "outputs": v}) for k, v in kept.items() if v]
    if not lines:  # no file left to list: no file at all (review 24 R24-7: an empty one had been written)
        with contextlib.suppress(FileNotFoundError):
            (dst / LEFT).unlink()
        return
    with open_atomic(dst / LEFT) as f:  # (its OSError is a FundusError already)
        f.writelines(line + "\n" for line in lines)


def left_outputs(dst: Path) -> dict[str, set[str]]:
    """``{key: outputs}`` of ``dst/LEFT``: files the folder's earlier rows wrote that its journal no longer lists."""
    out: dict[str, set[str]] = {}
    for r in json_lines(dst / LEFT):
        if isinstance(r.get("key"), str) and isinstance(r.get("outputs"), list):
            out.setdefault(r["key"], set()).update(n for n in r["outputs"] if plain_name(n))
    return out


def json_lines(path: Path) -> Iterator[dict]:
    """The JSON objects of a JSON-lines file fundus keeps beside its outputs, one a line; a torn line (a kill mid
    write) or another value is passed over, a missing or unreadable file gives none."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict):
                    yield r
    except OSError:
        return


def _earlier_outputs(dst: Path, earlier: list, now) -> list[str]:
    """The files an earlier row of a key wrote that are still in ``dst`` and not among its outputs ``now``: an item
    done before that fails on resume keeps them (they are of the bytes read then, and are left, not removed; its
    error says so, campaign 23b LOW-1)."""
    now = set(now) if isinstance(now, list) else set()
    return [n for n in earlier if isinstance(n, str) and n not in now and plain_name(n) and os.path.isfile(os.path.join(dst, n))]


#: Key of a row whose item met a full disk (its value: the hint); taken off before the row is recorded.
_STOP = "_stop_run"


def _guard(row: dict, fn, *args):
    """``fn(*args)``; a failure becomes the row's error (one line) instead of ending the run. Returns None then."""
    try:
        return fn(*args)
    except FundusError as e:  # InputError, WeightsError, ... are FundusErrors
        row["status"], row["error"] = "error", e.message
        if isinstance(e, DiskFullError):  # the row is recorded (a resume redoes it), then the run stops
            row[_STOP] = e.hint
    except Exception as e:  # an unexpected failure on one item must not stop the run
        line = (str(e).strip().splitlines() or [""])[0]
        if out_of_memory(e):  # what was asked for stays visible (a size bug asks for absurd amounts)
            row["status"], row["error"] = "error", "out of memory while processing this image" + (f" ({line[:200]})" if line else "")
        else:
            row["status"], row["error"] = "error", f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def _new_row(work: WorkItem) -> dict[str, Any]:
    row: dict[str, Any] = {"key": work.key, "input": str(work.path), "outputs": [], "status": "ok", "error": ""}
    if work.extra:  # the files of the other roles too: a resume recomputes a row whose reference or annotation changed
        row["inputs"] = _extra_paths(work)
    return row


def _extra_paths(work: WorkItem) -> dict[str, str | None]:
    return {role: None if p is None else str(p) for role, p in sorted(work.extra.items())}


def _decode_item(stage: Stage, work: WorkItem, row: dict) -> ItemInput:
    info: dict = {}
    try:
        images = {"image": decode(work.path, info)}
    finally:  # provenance, hashed from the bytes read (also when they do not decode)
        if info:
            row["input_sha256"], row["input_stat"] = info["sha256"], _stat_record(info)
    if images["image"].meta.colour_profile:  # converted to sRGB on reading (io.to_srgb): the manifest says from what
        row["input_colour_profile"] = images["image"].meta.colour_profile
    for role, path in sorted(work.extra.items()):
        if path is None:
            like = work.near.get(role)
            raise InputError(f"no {role} image with the key {work.key!r}" + (
                f"; its key {like!r} differs from it only in case or Unicode form (rename one of them)" if like else ""))
        info = {}
        try:
            images[role] = decode(path, info)
        finally:  # the other roles' provenance too: a resume recomputes a row whose reference changed
            if info:
                row.setdefault("inputs_sha256", {})[role] = info["sha256"]
                row.setdefault("inputs_stat", {})[role] = _stat_record(info)
    return prepare_item(stage, work.key, images)


#: A field of an item's result: ``{output name: sha256}`` its outputs must be written with (a replay's recorded
#: bytes); an output written otherwise makes the row an error (campaign 26a C26a-2). Not kept in the row.
REPLAYED = "_replayed_sha256"


def _finish(stage: Stage, row: dict, result: ItemOutput, out_dir: Path) -> None:
    written = write_outputs(stage, row["key"], result, out_dir)
    row["outputs"] = list(written)
    if written:  # each output's size and the sha256 of its bytes (the manifest's record; resume checks the size)
        row["outputs_size"] = {name: size for name, (size, _) in written.items()}
        row["outputs_sha256"] = {name: digest for name, (_, digest) in written.items()}
    fields = dict(result.fields)
    expected = fields.pop(REPLAYED, None)
    row.update(fields)
    if isinstance(expected, dict):
        differ = [n for n, (_, digest) in written.items() if n in expected and expected[n] != digest]
        if differ:
            raise InputError(f"--replay: {differ[0]} was written with other bytes than the replayed run's (sha256 "
                             f"{row['outputs_sha256'][differ[0]][:12]}..., recorded {expected[differ[0]][:12]}...): its parameter "
                             "record does not reproduce it (edited, or replayed on another platform?)")


def _compute_one(stage: Stage, item: ItemInput) -> ItemOutput:
    with stage.forward_context():
        return stage.compute(item)


def _compute_many(stage: Stage, items: list[ItemInput]) -> list[ItemOutput]:
    with stage.forward_context():
        return stage.compute_batch(items)


def _compute_ready(stage: Stage, ready: list[tuple[dict, ItemInput]], batch: bool) -> list[tuple[dict, ItemOutput | None]]:
    """Decoded items computed (``batch``: through ``compute_batch`` together; if the batch fails, one at a
    time, so only the culprit fails), each with its row (the result None when it failed)."""
    results = _guard({}, _compute_many, stage, [item for _, item in ready]) if batch and ready else None
    return [(row, results[k] if results is not None else _guard(row, _compute_one, stage, item)) for k, (row, item) in enumerate(ready)]


def _process_batch(stage: Stage, works: list[WorkItem], out_dir: Path) -> list[dict]:
    """Items through ``stage.compute_batch`` together (one forward pass for a network stage; a single item
    through ``compute``), each decoded, checked and written on its own: an item that cannot be read fails
    alone. ``seconds``: the batch's time shared."""
    t0 = time.perf_counter()
    rows = [_new_row(w) for w in works]
    ready = [(row, item) for row, w in zip(rows, works) if (item := _guard(row, _decode_item, stage, w, row)) is not None]
    for row, result in _compute_ready(stage, ready, batch=len(works) > 1):
        if result is not None:
            _guard(row, _finish, stage, row, result, out_dir)
    for row in rows:
        row["seconds"] = round((time.perf_counter() - t0) / len(works), 4)
    return rows


def process_items(stage: Stage, works: list[WorkItem], out_dir: Path) -> list[dict]:
    """The rows of ``works`` processed by ``stage`` (already set up) into ``out_dir``: decoded, computed
    together (``stage.batch_size`` at most), written atomically, every failure a row of its own. What an
    engine's worker calls (see :class:`Engine`)."""
    return _process_batch(stage, works, out_dir)


class Engine(Protocol):
    """Where a stage's items are processed when not in this machine's processes (``--engine``; the local
    engine is the runner itself). The runner keeps everything else: inputs, pairing, the lock, resume,
    the journal, progress and the reports. ``run`` processes ``todo`` (items of ``stage`` not done yet)
    into ``dst`` with ``threads`` CPU threads per worker, each worker setting the stage up once
    (``stage.setup()``) and calling :func:`process_items`, and calls ``record(row)`` in this process once
    for every item, in any order, never twice; a worker that dies must not lose or duplicate a row.
    ``close`` releases the engine's workers (a chained run uses one engine for all its stages)."""

    name: str

    def run(self, stage: Stage, todo: list[WorkItem], dst: Path, threads: int, record: Callable[[dict], None]) -> None: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------- feeding one device (a GPU)
_DECODE_STAGE: Any = None


def _decoder_init(stage: Stage, parent: int) -> None:
    global _DECODE_STAGE
    import cv2

    _worker_signals()
    _exit_with_parent(parent)
    cv2.setNumThreads(1)
    _DECODE_STAGE = stage


def _decode_in_worker(work: WorkItem) -> tuple[dict, ItemInput | None]:
    t0 = time.perf_counter()
    row = _new_row(work)
    item = _guard(row, _decode_item, _DECODE_STAGE, work, row)
    row["seconds"] = time.perf_counter() - t0
    return row, item


def _write_fed(stage: Stage, row: dict, result: ItemOutput, dst: Path) -> dict:
    t0 = time.perf_counter()
    _guard(row, _finish, stage, row, result, dst)
    row["seconds"] = round(row["seconds"] + time.perf_counter() - t0, 4)
    return row


def _decode_alone(stage: Stage, work: WorkItem, ctx) -> tuple[dict, ItemInput | None]:
    """Decode one item in a fresh process (after a decoding process died): its row, with an error if it
    kills that process too."""
    ex = new_pool(1, ctx, _decoder_init, (stage, os.getpid()))
    try:
        result = submit(ex, _decode_in_worker, work).result()
    except BrokenProcessPool:
        discard_pool(ex)
        row = _new_row(work)
        row.update(status="error", seconds=0.0, error="the decoding process died while reading this image (out of memory or a crash in a decoder)")
        return row, None
    except BaseException:
        discard_pool(ex, grace=FATAL_GRACE_S)
        raise
    ex.shutdown(wait=True)
    return result


def run_fed(stage: Stage, todo: list[WorkItem], dst: Path, workers: int, threads: int, record, depth: int | None = None) -> dict:
    """Process ``todo`` with one model in this process (on its device: a GPU holds one copy, and batches
    are formed across items), fed by ``workers`` decoding processes (decode and field of view) through a
    bounded window, with the outputs written by a thread pool while the next batch computes.

    At most ``depth`` items (default: two batches, and at least two per decoder) are decoded ahead of the
    computation, and at most ``depth`` computed items wait to be written: memory is bounded whatever the
    number of items. Results equal ``_process_batch``'s (the same batches in the same order; tested).
    Returns {"depth", "max_waiting", "max_writing"} (what the tests check)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    _set_threads(stage, threads)
    stage.setup()
    size = max(1, stage.batch_size)
    depth = depth or max(2 * size, 2 * workers)
    ctx = multiprocessing.get_context("spawn")
    stats = {"depth": depth, "max_waiting": 0, "max_writing": 0}
    queue = list(reversed(todo))
    pending: deque = deque()  # (work, future of its decoding), in order
    ready: list[tuple[dict, ItemInput]] = []
    writes: deque = deque()

    def fresh_decoders(old: ProcessPoolExecutor | None = None) -> ProcessPoolExecutor:
        if old is not None:
            discard_pool(old)
        return new_pool(workers, ctx, _decoder_init, (stage, os.getpid()))

    decoders = fresh_decoders()
    writers = ThreadPoolExecutor(max_workers=2)  # PNG encoding releases the GIL
    try:
        while queue or pending or ready:
            while queue and len(pending) + len(ready) < depth:
                try:
                    pending.append((queue[-1], submit(decoders, _decode_in_worker, queue[-1])))
                except BrokenProcessPool:  # a decoder died since the last submit: the item it held is in
                    if not pending:  # pending and is recovered below; a pool that died with nothing in flight is replaced
                        decoders = fresh_decoders(decoders)
                        continue
                    break
                queue.pop()
            stats["max_waiting"] = max(stats["max_waiting"], len(pending) + len(ready))
            if pending:
                w, f = pending.popleft()
                try:
                    row, item = f.result()
                except BrokenProcessPool:  # a decoder died: the items in flight are decoded again one at a time
                    redo = [w] + [x for x, _ in pending]
                    pending.clear()
                    decoders = fresh_decoders(decoders)
                    row, item = _decode_alone(stage, redo[0], ctx)
                    queue.extend(reversed(redo[1:]))
                if item is None:
                    row["seconds"] = round(row["seconds"], 4)
                    record(row)
                else:
                    ready.append((row, item))
            if ready and (len(ready) >= size or not (pending or queue)):
                t0 = time.perf_counter()
                computed = _compute_ready(stage, ready, batch=len(ready) > 1 or size > 1)
                share = (time.perf_counter() - t0) / len(ready)
                ready = []
                for row, result in computed:
                    row["seconds"] += share
                    if result is None:
                        row["seconds"] = round(row["seconds"], 4)
                        record(row)
                    else:
                        writes.append(writers.submit(_write_fed, stage, row, result, dst))
                stats["max_writing"] = max(stats["max_writing"], len(writes))
            while writes and (writes[0].done() or len(writes) > depth):
                record(writes.popleft().result())
        while writes:
            record(writes.popleft().result())
    except BaseException:
        discard_pool(decoders, grace=FATAL_GRACE_S)  # decoders write nothing; a decoded image they are sending is let through
        raise
    else:
        decoders.shutdown(wait=False, cancel_futures=True)
    finally:
        writers.shutdown(wait=True)  # a write in flight completes (atomic either way)
    return stats


def _chunks(works: list[WorkItem], n: int) -> list[list[WorkItem]]:
    n = max(1, n)
    return [works[i : i + n] for i in range(0, len(works), n)]


def _in_worker(works: list[WorkItem], out_dir: Path) -> list[dict]:
    return _process_batch(_WORKER_STAGE, works, out_dir)


def _csv_cell(v: Any) -> Any:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return v


def write_reports(
    stage: Stage,
    rows: RowStore,
    *,
    inputs: Inputs,
    extra_dirs: dict[str, ExtraInput],
    out_dir: Path,
    command: list[str],
    started: float,
    interrupted: bool,
    threads: int | None = None,
    resumed: int = 0,
    running: bool = False,
    stopped: bool = False,
    notes: list[str] | None = None,
) -> tuple[dict, list[dict]]:
    """``results.csv`` and ``manifest.json`` of the rows, in key order, each streamed to its file a row at a
    time (never a whole table in memory) and renamed into place. ``running``: a snapshot taken while the
    run goes on (``status`` "running", no ``finished_at``). ``stopped``: the run ended on an error before
    every item was done (``status`` "stopped"; ``--resume`` continues). Returns (counts, failed items, the
    threads the rows were made with: ``threads_used``). ``notes``: what the resume noted (``resume_notes``)."""
    counts = {"total": len(rows), "ok": 0, "error": 0, "skipped": resumed}
    failed = []
    used: set[int] = set()
    cols = BASE_COLUMNS + list(stage.columns)
    with open_atomic(out_dir / "results.csv") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for key in rows:
            r = rows[key]
            counts[r["status"]] = counts.get(r["status"], 0) + 1
            if isinstance(r.get("threads"), int):
                used.add(r["threads"])
            if r["status"] == "error":
                failed.append({"key": key, "error": r["error"]})
            w.writerow({c: _csv_cell(r.get(c, "")) for c in cols})
    if interrupted or running or stopped:
        counts["not_processed"] = len(inputs.items) - len(rows)
    threads_used = threads_record(used, threads)
    cfg = stage.config_record()
    manifest = {
        "schema_version": 1,
        "tool": {"name": "fundus-pipeline", "version": __version__, **dict(code_record())},  # which code (campaign 39b F9)
        "stage": stage.name,
        "command": command,
        "config": cfg,
        "config_sha256": config_sha256(cfg),
        "results_revision": stage.results_revision,  # (the rows' own: the journal records each one's)
        "input": {"dir": str(inputs.path), **inputs.record(), **{role: _extra_record(p) for role, p in extra_dirs.items()}},
        "output": {"dir": str(out_dir)},
        "environment": environment(),
        **({"threads_used": threads_used} if threads_used is not None else {}),  # part of what fixes the bytes
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "status": "running" if running else "interrupted" if interrupted else "stopped" if stopped else "finished",
        "finished_at": None if running else time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.time() - started, 3),
        "interrupted": interrupted,
        "counts": counts,
        **({"resume_notes": list(notes)} if notes else {}),  # recorded under --quiet and --format json too
        **stage.info(),
    }
    write_json_streamed(out_dir / "manifest.json", manifest, {"items": (rows.text(k) for k in rows)})
    return counts, failed, threads_used


def threads_record(used: "set[int] | Iterable[int]", default: int | None = None) -> "int | list[int] | None":
    """What a manifest records as ``threads_used``: the CPU threads a worker used, one count when every row was
    made with it, else the sorted counts (a ``--resume`` on another ``--threads``, which can move a probability
    by one level: no single count reproduces such a folder). ``default`` when no row says."""
    counts = sorted(set(used))
    return default if not counts else counts[0] if len(counts) == 1 else counts


def write_json_streamed(path: Path, head: dict, lists: dict[str, Iterable[str]]) -> None:
    """Write ``head`` (indented) plus, as its last keys, each of ``lists``: a JSON array written one element
    a line from an iterable of JSON texts, so that a manifest of 100,000 items is never built in memory.
    Atomic (``open_atomic``); the result is ordinary JSON."""
    text = json.dumps(head, indent=2, default=str)
    with open_atomic(path) as f:
        if not lists:
            f.write(text + "\n")
            return
        f.write(text[:-2] if head else "{")  # the head without its closing "\n}"
        for n, (name, texts) in enumerate(lists.items()):
            f.write(f"{',' if head or n else ''}\n  {json.dumps(name)}: [")
            for i, t in enumerate(texts):
                f.write(f"{',' if i else ''}\n    {t}")
            f.write("\n  ]")
        f.write("\n}\n")


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise a plain line every 30 s and every 10% of the
    items, so batch logs are not silent until the end. Item failures are printed once, as they happen."""

    def __init__(self, name: str, total: int, done: int, enabled: bool):
        self.name, self.total, self.done, self.enabled = name, total, done, enabled
        self.failed = 0
        self.broken = False  # stderr could not be written: nothing more is printed
        self.start = self.last = time.monotonic()
        self.start_done = done
        self.next_mark = self._mark_after(done)
        self.bar = None
        if enabled and _stderr_is_terminal():
            self.bar = tqdm(total=total, initial=done, desc=name, unit="img", file=sys.stderr, dynamic_ncols=True)

    def _mark_after(self, n: int) -> int:
        step = max(1, math.ceil(self.total / 10))
        return (n // step + 1) * step

    def update(self, row: dict) -> None:
        """Count ``row``; an error row is said on stderr."""
        self._update(row, True)

    def update_unsaid(self, row: dict) -> None:
        """Count ``row`` without saying its error: the error that ends the run, which the command says itself (it
        had been said twice; campaign 27a F9)."""
        self._update(row, False)

    def _update(self, row: dict, say: bool) -> None:
        self.done += 1
        if row["status"] == "error":
            self.failed += 1
        if row["status"] == "error" and say:
            msg = printable(f"error: {row['key']}: {row['error']}")
            if self.bar is not None:
                self._say(lambda: self.bar.write(msg, file=sys.stderr))
            else:
                self._say(lambda: print(msg, file=sys.stderr, flush=True))
        if self.bar is not None:
            self._say(lambda: self.bar.update(1))
            return
        now = time.monotonic()
        if self.enabled and (self.done >= self.next_mark or now - self.last >= 30 or self.done == self.total):
            self.next_mark = self._mark_after(self.done)
            self.last = now
            rate = (self.done - self.start_done) / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta_s = f", ETA {eta:.0f} s" if math.isfinite(eta) and self.done < self.total else ""
            line = f"{self.name}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%), {self.failed} failed, {rate:.2f} img/s{eta_s}"
            self._say(lambda: print(line, file=sys.stderr, flush=True))

    def _say(self, write) -> None:
        """Progress is for the eye only: a stderr that cannot be written (closed, or a pipe whose reader has
        gone) silences it instead of ending the run (the failures are in results.csv either way)."""
        if self.broken or sys.stderr is None:
            return
        try:
            write()
        except (OSError, ValueError, AttributeError):  # ValueError: a closed file; AttributeError: a stream without flush
            self.broken, self.enabled, self.bar = True, False, None

    def close(self) -> None:
        if self.bar is not None:
            with contextlib.suppress(OSError, ValueError):
                self.bar.close()


ExtraInput = Path | dict[str, Path]  # a folder (its images matched by key) or a planned {key: file} mapping


def _pair_inputs(stage: Stage, items: list[ImageItem], extra_dirs: dict[str, ExtraInput]) -> list[WorkItem]:
    roles = [spec.role for spec in stage.inputs[1:]]
    missing = [r for r in roles if r not in extra_dirs]
    if missing:
        raise UsageError(f"the {stage.name} stage needs the {', '.join(missing)} input(s)")
    found = {
        role: dict(extra_dirs[role]) if isinstance(extra_dirs[role], dict)
        else {it.key: it.path for it in discover_images(Path(os.path.abspath(extra_dirs[role])))}  # absolute, as the inputs
        for role in roles
    }
    empty = next((r for r in roles if not isinstance(extra_dirs[r], dict) and not found[r]), None)
    if empty is not None:  # every item would fail: a wrong folder, not a per-item problem
        raise UsageError(f"no images found in the --{empty} folder {extra_dirs[empty]} (supported: {', '.join(e.lstrip('.') for e in SUPPORTED_EXTENSIONS)})")
    # a key there that differs only in case or Unicode form (a name copied from macOS, NFD) is named in the item's
    # error (campaign 27a F6: "no reference image with the key 'café'" beside a file that looks the same)
    folded = {role: {} for role in roles}
    for role in roles:
        for k in found[role]:
            folded[role].setdefault(fold_key(k), k)
    return [WorkItem(it.key, it.path, {role: found[role].get(it.key) for role in roles},
                     {role: folded[role][fold_key(it.key)] for role in roles if it.key not in found[role] and fold_key(it.key) in folded[role]})
            for it in items]


def _extra_record(value: ExtraInput) -> str:
    return f"{len(value)} planned files" if isinstance(value, dict) else os.path.abspath(value)


def _keeps_threads(fn):
    """``fn`` leaves the caller's OpenCV and torch CPU thread counts as they were: a stage run in this process
    sets them to its ``threads`` (a library caller's own settings must not change under it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import cv2

        cv_n = cv2.getNumThreads()
        torch = sys.modules.get("torch")  # not imported yet: no setting of the caller's to keep
        torch_n = torch.get_num_threads() if torch is not None else None
        try:
            return fn(*args, **kwargs)
        finally:
            if cv2.getNumThreads() != cv_n:
                cv2.setNumThreads(cv_n)
            if torch_n is not None and torch.get_num_threads() != torch_n:
                torch.set_num_threads(torch_n)

    return wrapper


@_keeps_threads
def run_stage(
    stage: Stage,
    in_path: Path,
    out_dir: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    workers: int = 1,
    threads: int | None = None,
    progress: bool = True,
    command: list[str] | None = None,
    extra_dirs: dict[str, ExtraInput] | None = None,
    items: list[ImageItem] | None = None,
    pool: "WorkerPool | None" = None,
    engine: Engine | None = None,
    feed: bool | None = None,
    checked_inputs: dict | None = None,
    after: Callable[[RunResult], None] | None = None,
    said: set[str] | None = None,
) -> RunResult:
    """Run ``stage`` over every image of ``in_path`` (folder, file or list) into ``out_dir``; see the
    module docstring. ``extra_dirs`` gives the folder of each further input role of the stage, or a
    planned ``{key: file}`` mapping. ``items``: a planned list of (key, file) to process instead of the
    images of ``in_path`` (a chained run's subset; ``in_path`` is then the run's input, for the checks).
    ``pool``: worker processes kept across several stages (a chained run), used when ``workers > 1``.
    ``engine``: process the items there instead (:class:`Engine`, e.g. Ray); ``workers`` is then unused.
    ``feed``: one model in this process fed by ``workers`` decoding processes (``run_fed``); default: when the
    stage runs on a GPU (``stage.feeds_device``). ``checked_inputs``: the caller has checked the inputs of the
    earlier rows (a chained run, for its first stage), so resuming does not stat them again; its findings by key
    (``resumable_rows``'s ``checked``).
    ``after(result)``: a last step still under the output folder's lock, unless the run was interrupted
    (``grade --sort-into``'s copies: another run into OUT would sweep their temporary files).
    ``said``: the notes said already (a chained run's stages resume alike: each note is said once); what this
    resume notes is added to it, and recorded in the manifest whether said or not."""
    started = time.time()
    check_stop()  # a stop received while the command set up (its KeyboardInterrupt lost on the way)
    check_parallelism(workers, threads)
    extra_dirs = dict(extra_dirs or {})
    check_run_paths(in_path, out_dir, overwrite=overwrite, resume=resume, stage=stage.name)
    inputs = resolve_inputs(in_path) if items is None else Inputs("planned", Path(in_path), list(items))
    if progress:
        inputs.say_notes()
        for note in stage.notes():
            say_note(note if said is None else f"{stage.name}: {note}")
    if not inputs.items:
        raise UsageError(f"no images found in {in_path} (supported: {', '.join(e.lstrip('.') for e in SUPPORTED_EXTENSIONS)})")
    _, dst = check_run_paths(in_path, out_dir, overwrite=overwrite, resume=resume, inputs=inputs, stage=stage.name)
    for role, folder in extra_dirs.items():  # a further input folder is read, never written: OUT stays out of it
        if not isinstance(folder, dict) and (dst == Path(folder).resolve() or _is_relative_to(dst, Path(folder).resolve())):
            raise UsageError(f"output folder {out_dir} is the --{role} folder or inside it; choose a folder outside {folder}")
    work = _pair_inputs(stage, inputs.items, extra_dirs)
    _create_output(dst, out_dir)
    with OutputLock(dst, out_dir) as lock:
        # Checked again under the lock: a run that started meanwhile has made the folder non-empty.
        check_run_paths(in_path, out_dir, overwrite=overwrite, resume=resume, inputs=inputs, stage=stage.name)
        result = _run_locked(stage, work, inputs, extra_dirs, dst, overwrite=overwrite, resume=resume, workers=workers,
                             threads=threads or default_threads(workers), progress=progress, command=command, started=started, pool=pool,
                             engine=engine, feed=feed, checked_inputs=checked_inputs, lock=lock, said=said)
        if after is not None and not result.interrupted:
            after(result)
        return result


def _run_locked(stage: Stage, work: list[WorkItem], inputs: Inputs, extra_dirs: dict[str, ExtraInput], dst: Path, *, overwrite: bool,
                resume: bool, workers: int, threads: int, progress: bool, command: list[str] | None, started: float,
                pool: "WorkerPool | None" = None, engine: Engine | None = None, feed: bool | None = None,
                checked_inputs: dict | None = None, lock: OutputLock | None = None,
                said: set[str] | None = None) -> RunResult:
    cfg_hash = config_sha256(stage.config_record())
    journal_path = dst / JOURNAL
    notes: list[str] = []
    redone: dict[str, tuple] = {}  # key: (why, the outputs of its earlier row), for a row processed again because something changed
    left: dict[str, list] = {}
    rows = (resumable_rows(dst, cfg_hash, work, notes=notes, redone=redone, config=stage.config_record(), left=left, checked=checked_inputs,
                           revision=stage.results_revision)
            if resume else RowStore())  # this run's rows: the resumed ones, then each one as recorded
    for key, (_, earlier) in redone.items():  # processed again: its earlier outputs stay the folder's own until its new row is
        left.setdefault(key, []).extend(n for n in earlier if plain_name(n))  # written (review 40 M-3: an interrupted first resume after an upgrade
    if left:  # had left every earlier output unlisted, and --overwrite refused them as somebody else's)
        record_left(dst, left)
    for note in notes:  # in a chained run (``said`` given) each is said once, with the stage it was found in first
        if progress and (said is None or note not in said):
            say_note(note if said is None else f"{stage.name}: {note}")
        if said is not None:
            said.add(note)
    if overwrite:
        for name in (JOURNAL, "manifest.json", "results.csv"):  # the reports of the run being replaced
            (dst / name).unlink(missing_ok=True)
    remove_stale_temporaries(dst)  # of a killed run (the lock is held: no other fundus process writes here)
    # The journal keeps only rows of the current configuration (the others are not resumable).
    tag = _tag(cfg_hash, stage.results_revision)
    try:
        with open_atomic(journal_path) as f:
            for key in rows:
                f.write(rows.text(key)[:-1] + tag + "\n")
        journal = open(journal_path, "a", buffering=1, encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise FundusError(f"cannot write to output folder {dst}: {e.strerror or e}") from None
    todo = [w for w in work if w.key not in rows]
    resumed = len(rows)
    deaths = WORKER_DEATHS[0]
    interrupted = stopped = False
    bar = Progress(stage.name, len(work), resumed, progress)

    def reports(**kw) -> tuple[dict, list[dict], "int | list[int] | None"]:
        return write_reports(stage, rows, inputs=inputs, extra_dirs=extra_dirs, out_dir=dst, command=command or sys.argv, started=started,
                             threads=threads, resumed=resumed, notes=notes, **kw)

    next_snapshot = time.monotonic() + SNAPSHOT_S

    def check_folder(consequence: str) -> None:
        """Stop when OUT was removed or replaced under the run (writing on would re-create it, unlocked)."""
        if lock is not None and not lock.intact():
            raise FundusError(f"the output folder {dst} was removed or replaced during the run; {consequence}",
                              hint="rerun into a folder that nothing else removes")

    def record(row: dict) -> None:
        nonlocal next_snapshot
        check_stop()
        check_folder("nothing more is written there")
        stop = row.pop(_STOP, None)
        if row.get("status") != "ok" and row["key"] in redone:  # done before, failing now: its earlier outputs are not this row's
            why, earlier = redone[row["key"]]
            if stay := _earlier_outputs(dst, earlier, row.get("outputs")):
                # "other bytes" only where they are known to be (an input unreadable now or an output lost had been said so
                # too); where that is not known (unreadable, outputs, another revision, a row that had failed too) no claim
                # is made (review 40 M-2)
                made = " from other bytes" if why in ("input", "file") else ""
                row["error"] = f"{row.get('error', '')} (outputs of an earlier run{made} stay: {', '.join(stay[:3])}{', ...' if len(stay) > 3 else ''})"
                row["earlier_outputs"] = stay  # (a later resume that fails again says so too)
        row["threads"] = threads  # each row says what made its bytes: a resume may run on another count
        text = _dumps(row)
        rows.add_text(row["key"], text)
        try:
            journal.write(text[:-1] + tag + "\n")
        except OSError as e:  # a full disk: the run stops here; what the journal holds is resumable
            raise FundusError(f"cannot write to output folder {dst}: {e.strerror or e}", hint="free space, then rerun with --resume") from None
        (bar.update if stop is None else bar.update_unsaid)(row)
        if stop is not None:  # an output image met a full disk: every later item would too (was: one error row each, exit 3)
            raise FundusError(f"{row['key']}: {row['error']}", hint=stop)
        if time.monotonic() >= next_snapshot:  # results.csv and manifest.json kept current in a long run
            t0 = time.monotonic()
            reports(interrupted=False, running=True)
            took = time.monotonic() - t0
            next_snapshot = t0 + took + max(SNAPSHOT_S, took / SNAPSHOT_SHARE)  # snapshots cost at most 5% of the run

    try:
        if engine is not None and todo:
            engine.run(stage, todo, dst, threads, record)
        elif (stage.feeds_device if feed is None else feed) and len(todo) > 1:
            run_fed(stage, todo, dst, workers, threads, record)
        elif workers == 1 or len(todo) <= 1:
            _set_threads(stage, threads)
            stage.setup()
            for chunk in _chunks(todo, stage.batch_size):
                for row in _process_batch(stage, chunk, dst):
                    record(row)
        else:
            _run_pool(stage, todo, dst, workers, threads, record, pool)
    except KeyboardInterrupt:
        interrupted = True
        stop_requested(None)  # acted on
    except BaseException:
        stopped = True  # the error propagates; the tables say the run did not finish (was: "finished")
        raise
    else:
        if WORKER_DEATHS[0] != deaths:
            remove_stale_temporaries(dst)  # a worker killed while writing left one (its item was written again)
    finally:
        with interrupts_deferred(held := []):  # (the progress bar's last line too: a stop there had left no tables; campaign 31b L2)
            bar.close()
            with contextlib.suppress(OSError):  # a full disk was reported where the write failed
                journal.close()
            check_folder("no results.csv or manifest.json was written")  # they would list outputs that are gone
            try:
                counts, failed, threads_used = reports(interrupted=interrupted, stopped=stopped)
            except OSError as e:
                raise FundusError(f"cannot write results.csv and manifest.json in {dst}: {e.strerror or e}",
                                  hint="free space, then rerun with --resume") from None
    # a stop held while the tables were written ends the command as interrupted once they are complete: what would come
    # after them (a chain's later stages, grade's copies into --sort-into, an API caller's next call) does not run
    # (campaign 43c F2, review 43 M3); the manifest says what was done
    return RunResult(stage.name, inputs.path, dst, counts, failed, time.time() - started, interrupted or bool(held), rows, threads_used, notes)


def _worker_signals() -> None:
    """In a worker process: Ctrl-C ignored (the parent handles it and ends the pool), SIGTERM and SIGHUP back to
    their default action (a forked worker inherits the parent's handler, which would raise KeyboardInterrupt
    there and print its traceback; the parent records the run)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for s in not_ignored(STOP_SIGNALS):  # one the parent ignores (nohup) stays ignored
        signal.signal(s, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, *STOP_SIGNALS})  # blocked since its start: submit()


def submit(ex: ProcessPoolExecutor, fn, *args):
    """``ex.submit(fn, *args)``, which may start worker processes, with Ctrl-C, SIGTERM and SIGHUP held until it
    returns. A Ctrl-C raised inside it was lost (raised in an at-fork hook, which prints and drops it: the run
    went on to exit 0) or hung the run for good (raised after a worker was forked but before the executor's
    manager thread started: nothing could end that worker). Held here, it is raised when ``submit`` returns,
    where the caller's ``except KeyboardInterrupt`` can shut the pool down. The new processes start with the
    signals blocked (the mask is inherited through fork and exec) until :func:`_worker_signals` ignores
    Ctrl-C in them: a spawned worker interrupted while it imports torch printed a traceback."""
    with _processes_start_held():
        try:
            return ex.submit(fn, *args)
        except OSError as e:
            raise _cannot_start(e) from None


@contextlib.contextmanager
def _processes_start_held():
    """Ctrl-C, SIGTERM and SIGHUP held while the block starts processes: a signal that comes meanwhile is handed
    to its handler on leaving (:class:`errors.signals_held`), and the processes started inherit them blocked (the
    mask passes through fork and exec) until they set their own handling (:func:`_worker_signals`)."""
    signals = {signal.SIGINT, *STOP_SIGNALS}
    with signals_held(signals):
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _cannot_start(e: OSError) -> FundusError:
    # multiprocessing's resource tracker killed, say: as a BrokenPipeError it reached the command line's EPIPE
    # handling (meant for a closed stdout), which ended the run with exit 1 and not a word
    return FundusError(f"cannot start a worker process: {type(e).__name__}: {e.strerror or e}",
                       hint="rerun with --resume; the items already done are kept")


def new_pool(workers: int, ctx, initializer, initargs: tuple) -> ProcessPoolExecutor:
    """A ProcessPoolExecutor; an OSError while making its queues (their semaphores are registered with
    multiprocessing's resource tracker) is a FundusError, as in :func:`submit`."""
    from multiprocessing import resource_tracker

    try:
        with _processes_start_held():
            # multiprocessing's resource tracker, started here if not yet running, keeps SIGHUP blocked for good (it
            # ignores only SIGINT and SIGTERM): a terminal's hang-up sent to the group had killed it, and the one
            # relaunched printed KeyError tracebacks for the pool's semaphores (review 32 R32-1)
            resource_tracker.ensure_running()
            return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer, initargs=initargs)
    except OSError as e:
        raise _cannot_start(e) from None


#: Worker processes found dead in this process's pools so far (a run sweeps its folder's temporaries again when
#: one died during it: a worker killed while writing leaves one).
WORKER_DEATHS = [0]

#: After a fatal error, how long a healthy pool's workers may take to finish the items they hold before they are killed.
FATAL_GRACE_S = 10.0


def discard_pool(ex: ProcessPoolExecutor, grace: float = 0.0) -> None:
    """Give up a pool whose worker died (``BrokenProcessPool``), or that a fatal error ends (then its workers
    get ``grace`` seconds to finish what they hold), without waiting for good: every worker process still alive
    is killed. The executor's own clean-up terminates the workers it knows when it finds the pool broken, but
    one that a ``submit`` was starting at that moment escaped it, waited for work for good, and the executor's
    manager thread joined it at exit: the run printed its summary and never ended (7 of 8 trials with the first
    worker killed while it started)."""
    processes = list((getattr(ex, "_processes", None) or {}).values())
    if grace and not getattr(ex, "_broken", False):
        # a healthy pool (a fatal error ends the run): no new work, and the items in flight a moment to finish,
        # since a worker killed while it sends a large result leaves a partial message the executor waits on
        ex.shutdown(wait=False, cancel_futures=True)
        end = time.monotonic() + grace
        for p in processes:
            with contextlib.suppress(Exception):
                p.join(max(0.0, end - time.monotonic()))
    for p in processes:
        with contextlib.suppress(Exception):
            if p.is_alive():
                p.kill()
    ex.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _signal_handlers(signals: Iterable[int], handler):
    """``handler`` for ``signals`` while the block runs, the previous handlers after it. Only in the main
    thread, where Python delivers signals; elsewhere a no-op."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_signals_as_interrupt():
    """In the command's main thread: SIGTERM and SIGHUP (kill, timeout, a scheduler or container stopping the
    job, a closed terminal) end the run as Ctrl-C does: the tables record what was done, exit 130, and
    ``--resume`` continues."""

    stop_requested(None)  # a new command (the Python API may run several in one process)
    return _signal_handlers(not_ignored(STOP_SIGNALS), raise_stop)


def interrupts_deferred(seen: list | None = None):
    """While a run writes its final tables: a Ctrl-C (or SIGTERM / SIGHUP where the command turned them into
    one) waits until results.csv and manifest.json are complete (they then record what was done), a second one
    stops at once (the tables of the last snapshot stay, since every write is atomic). The signals held are
    appended to ``seen``: the caller then ends as interrupted, and what comes after the tables does not run. Only in
    the main thread; elsewhere a no-op."""
    seen = [] if seen is None else seen

    def hold(signum, frame) -> None:
        seen.append(signum)
        if len(seen) > 1:
            raise KeyboardInterrupt
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name  # (a SIGTERM had said "Ctrl-C"; campaign 31b L5)
        _to_stderr(f"{what}: finishing results.csv and manifest.json first (a second one stops now)")

    held = tuple(s for s in (signal.SIGINT, *STOP_SIGNALS) if callable(signal.getsignal(s)))  # an ignored SIGINT stays ignored (32a F1)
    return _signal_handlers(held, hold)


def _run_pool(stage: Stage, todo: list[WorkItem], dst: Path, workers: int, threads: int, record, pool: "WorkerPool | None" = None) -> None:
    """Process ``todo`` in ``workers`` processes, spawned by default (safe with CUDA and torch threads);
    a torch-free stage may ask for ``start_method = "fork"``, which starts workers much faster. With
    ``pool``, its processes are used (and kept for the next stage).

    A worker that dies (killed for memory, a crash in a native decoder) does not end the run: the items
    that were in flight are retried one at a time in a fresh process, so only the item that kills its
    process is recorded as an error, and a fresh pool takes the rest.
    """
    method = stage.start_method
    ctx = multiprocessing.get_context(method if method in multiprocessing.get_all_start_methods() else "spawn")
    queue = list(reversed(todo))
    while queue:
        suspects = _pool_pass(stage, queue, dst, workers, threads, record, ctx, pool)
        for it in suspects:  # isolate the culprit
            if _pool_pass(stage, [it], dst, 1, threads, record, ctx):
                record({"key": it.key, "input": str(it.path), "outputs": [], "status": "error", "seconds": 0.0,
                        "error": "the worker process died while processing this image (out of memory or a crash in a decoder)"})


def _pool_pass(stage: Stage, queue: list[WorkItem], dst: Path, workers: int, threads: int, record, ctx, pool: "WorkerPool | None" = None) -> list[WorkItem]:
    """Run items from ``queue`` (consumed from the end) until it is empty or a worker dies; return the
    items that were in flight when a worker died."""
    in_flight: dict = {}
    if pool is not None:
        ex = pool.executor()
        token = pool.register(stage)

        def submit_chunk(chunk: list[WorkItem]):
            return submit(ex, _in_pool_worker, token, stage, chunk, dst)
    else:
        ex = new_pool(workers, ctx, _worker_init, (stage, threads, os.getpid()))

        def submit_chunk(chunk: list[WorkItem]):
            return submit(ex, _in_worker, chunk, dst)
    size = max(1, stage.batch_size)
    try:
        while queue or in_flight:
            while queue and len(in_flight) < 2 * workers:
                chunk = [queue.pop() for _ in range(min(size, len(queue)))]
                try:
                    in_flight[submit_chunk(chunk)] = chunk
                except BrokenProcessPool:  # a worker died since the last submit: this chunk never started
                    queue.extend(reversed(chunk))
                    raise
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for f in finished:
                rows = f.result()  # raises BrokenProcessPool if a worker died
                del in_flight[f]
                for row in rows:
                    record(row)
    except BrokenProcessPool:
        WORKER_DEATHS[0] += 1
        suspects = []
        try:
            for f, chunk in in_flight.items():
                if f.done() and not f.cancelled() and f.exception() is None:
                    for row in f.result():
                        record(row)  # may raise (a full disk): the pool is given up all the same
                else:
                    suspects.extend(chunk)
        finally:
            if pool is not None:
                pool.reset()
            else:
                discard_pool(ex)
        return suspects
    except KeyboardInterrupt:
        if getattr(ex, "_broken", False):  # a worker died as well: waiting could hang on one that escaped (discard_pool)
            discard_pool(ex)
        else:
            ex.shutdown(wait=True, cancel_futures=True)
        for f in in_flight:  # items that finished while shutting down
            if f.done() and not f.cancelled() and f.exception() is None:
                for row in f.result():
                    record(row)
        if pool is not None:
            pool.reset()
        raise
    except BaseException:  # a fatal error (a full disk, a worker that could not start): the run stops now
        if pool is not None:
            pool.reset(grace=FATAL_GRACE_S)
        else:
            discard_pool(ex, grace=FATAL_GRACE_S)  # (waiting for good would hang at exit on work no worker will take)
        raise
    if pool is None:
        ex.shutdown(wait=True)
    return []


# ------------------------------------------------------------------------------------ persistent pool
_POOL_STAGES: dict[str, Stage] = {}


def _pool_worker_init(threads: int, parent: int) -> None:
    _worker_signals()
    _exit_with_parent(parent)
    _set_threads(None, threads)  # spawned, not forked; the stages it will serve may use torch


def _in_pool_worker(token: str, stage: Stage, works: list[WorkItem], dst: Path) -> list[dict]:
    """A batch of items in a persistent worker: the stage is set up once per worker (its models stay loaded,
    and models shared by several stages are loaded once: ``load_model(shared=True)``)."""
    known = _POOL_STAGES.get(token)
    if known is None:
        stage.setup()
        _POOL_STAGES.clear()  # one stage at a time: the previous stage object goes (its models stay cached)
        _POOL_STAGES[token] = known = stage
    return _process_batch(known, works, dst)


class WorkerPool:
    """Worker processes kept across the stages of a chained run (``fundus run``): spawned once, each with
    ``threads`` CPU threads; each worker sets a stage up on its first item and keeps the loaded models, so
    a model used by several stages, or a stage run over several folders, is loaded once per worker."""

    def __init__(self, workers: int, threads: int):
        self.workers, self.threads = workers, threads
        self._ex: ProcessPoolExecutor | None = None
        self._n = 0

    def executor(self) -> ProcessPoolExecutor:
        if self._ex is None:
            ctx = multiprocessing.get_context("spawn")
            self._ex = new_pool(self.workers, ctx, _pool_worker_init, (self.threads, os.getpid()))
        return self._ex

    def register(self, stage: Stage) -> str:
        """A token for this stage's pass (workers set the stage up again when the token changes)."""
        self._n += 1
        return f"{os.getpid()}-{self._n}-{stage.name}"

    def reset(self, grace: float = 0.0) -> None:
        """Give the processes up (after one died, or after an interrupt): the next pass starts fresh ones."""
        if self._ex is not None:
            discard_pool(self._ex, grace)
            self._ex = None

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True)
            self._ex = None

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
