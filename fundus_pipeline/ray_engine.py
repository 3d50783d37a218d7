"""``--engine ray``: a stage's items processed by actors of a Ray cluster (see ``docs/scale-out.md``).

The runner keeps everything that is not computation (inputs, pairing, the output lock, resume, the journal,
progress and the reports; :class:`fundus_pipeline.runner.Engine`); this engine only turns ``todo`` into rows.

Design: Ray Data ``map_batches`` over the listing of work items, with a fixed pool of actors
(``ActorPoolStrategy(size=N)``), each holding the set-up stage: an actor sets its CPU threads and calls
``stage.setup()`` once (models loaded once per actor), then :func:`fundus_pipeline.runner.process_items`
per batch. Choices, and why:

* One dataset row is one whole batch of the local engine (``_chunks(todo, stage.batch_size)``, pickled),
  mapped with ``batch_size=1``: a network stage's batches must be exactly the local engine's (a different
  grouping changes the forward pass's summation order, so a probability could move by one level) for
  outputs byte-identical to ``--engine local``. A block (one Ray task) holds one batch, or several when
  there are more than ``MAX_BLOCKS`` (Ray Data makes blocks slowly: 20,000 one-row blocks took 50 s here,
  1,000 blocks of 100,000 rows 3 s). Rows come back pickled in a binary column (exact types, no Arrow
  conversion) and are streamed to ``record`` as each task finishes (``iter_batches``, any order).
* A killed actor (out of memory, a crash in a native decoder) is restarted and its task retried once
  (``max_task_retries=1``), never forever: an image that kills every process that reads it would otherwise
  loop. Restarts are bounded too (``restarts_allowed``: what the pass's tasks can use up, at most
  ``RESTART_CAP``, plus ``SETUP_RESTARTS``): an actor whose process dies while the stage is set up (out
  of memory loading the models) was restarted without end, and the run hung without a word; it now fails
  the stage (exit 1). An actor is given one task at a time (``max_tasks_in_flight_per_actor=1``), so a
  death fails only the task it was computing, never an innocent one queued behind it. Blocks whose task
  still fails are dropped (``DataContext.max_errored_blocks = -1``) and their items go through
  a second pass one item a task, as the local engine isolates a culprit; an item that still kills its
  actor is recorded as an error. A row is recorded once per key: a task retried after its rows already
  came back (a death between returning and finishing) rewrites identical bytes (atomic, deterministic
  writes) and is not recorded again.
* ``max_restarts``/``max_task_retries`` go through ``map_batches``' Ray remote arguments, which Ray
  2.60 deprecates (removal announced for 2.64) without a named replacement for the retry count; hence the
  ``ray[data]<2.64`` bound in ``pyproject.toml``. Ray Core actors with ``ObjectRef.future()`` were the
  fallback; Ray Data works here and gives streaming, back-pressure and actor restarts for free.
* Quiet: no Ray banner, no progress bars, no worker output on the driver (``log_to_driver=False``: a
  stage's rows carry its errors); Ray's own messages about dead workers go to stderr, never stdout, so
  ``--format json`` prints exactly one JSON document.

Workers: ``--workers N`` is the number of actors per stage, each reserving ``--threads`` Ray CPUs (and
one GPU when the stage runs on CUDA), capped by what the cluster holds and by the number of batches.
"""

from __future__ import annotations

import logging
import os
import contextlib
import pickle
import re
import signal
import socket
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from fundus_pipeline.errors import FundusError, UsageError, printable
from fundus_pipeline.runner import WorkItem, _chunks, _set_threads, available_cpus, process_items
from fundus_pipeline.stages.base import Stage

INSTALL_HINT = "pip install 'fundus-pipeline[ray]' (in a checkout of the project: pip install -e '.[ray]')"
#: Retries of a batch whose actor died, before its items are isolated (one per task) and, failing again, recorded as errors.
TASK_RETRIES = 1
SETUP_RESTARTS = 2  # restarts of an actor beyond those its tasks' deaths can use up
RESTART_CAP = 16  # restarts of an actor for its tasks' deaths at most (8 tasks that kill it twice each)


def restarts_allowed(blocks: int) -> int:
    """An actor's restarts in a pass of ``blocks`` tasks: each task can kill its actor at most 1 +
    ``TASK_RETRIES`` times, up to ``RESTART_CAP``, and ``SETUP_RESTARTS`` more for the pool to start. Finite
    and small, so that an actor dying while the stage is set up (out of memory loading the models) fails the
    stage after a few restarts (a restart took about 11 s on a loaded node) instead of looping; a pass whose
    tasks kill one actor more often than that fails the stage too (exit 1), where the local engine would
    record each culprit as an error row."""
    return min((1 + TASK_RETRIES) * blocks, RESTART_CAP) + SETUP_RESTARTS


#: A local instance starts with the first stage that has work, after OUT is created (review 30 L1).
LOCAL_START_HINT = "OUT keeps what this run did: rerun with --resume once Ray starts here, or with --engine local"
DIED = "the worker process died while processing this image (out of memory or a crash in a decoder)"
#: Blocks (Ray tasks) per pass at most: Ray Data creates about 400 blocks a second, so a listing of 100,000
#: photographs is cut into 2,000 tasks of 50, not 100,000 tasks of one.
MAX_BLOCKS = 2000


def import_ray() -> Any:
    """The ``ray`` module (with Ray Data), or a usage error that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "ray":
            raise UsageError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}") from None
        # installed, but Ray (or pyarrow under Ray Data) cannot be imported: in its own words (campaign 36c L-2:
        # pyarrow built for NumPy 2, under NumPy 1.26, had been reported as Ray not installed)
        why = printable((str(e).strip().splitlines() or [type(e).__name__])[0])[:300]
        raise UsageError(f"--engine ray: Ray is installed but cannot be imported ({why})",
                         hint=f"install the versions the project was tested with: {INSTALL_HINT}") from None
    return ray


def _weights(stage: Stage) -> dict[str, str]:
    """The sha256 of each model a network stage has loaded (its weights specs: ``spec``, ``seg_spec``)."""
    return {k: v.sha256 for k, v in vars(stage).items() if isinstance(getattr(v, "sha256", None), str)}


class _StageActor:
    """One actor of the pool: the stage set up once, then one batch of the local engine per call."""

    def __init__(self, stage: Stage, threads: int, dst: str, cwd: str):
        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative input paths resolve as in the driver (and error messages read the same)
        device = getattr(stage, "device", None)
        if getattr(device, "type", None) == "cuda":
            import torch

            stage.device = torch.device("cuda", 0)  # Ray shows this actor its own GPU only, as device 0
        _set_threads(stage, threads)
        expected = _weights(stage)  # what the driver loaded: a node must compute with the same bytes
        stage.setup()
        found = _weights(stage)
        for name, sha in expected.items():
            if found.get(name) != sha:
                raise RuntimeError(f"WeightsError: the {stage.name} stage's weights on this node (sha256 {found.get(name)}) are not the "
                                   f"driver's ({sha}); give every node the same weights (FUNDUS_WEIGHTS, or --weights on shared storage)")
        self.stage, self.dst = stage, Path(dst)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        out = [pickle.dumps(process_items(self.stage, pickle.loads(b), self.dst)) for b in batch["works"]]
        return {"rows": np.array(out, dtype=object)}


class _Hidden(logging.Filter):
    """Hides, on the console (Ray's log files keep them), Ray Data's traceback for a batch whose actor died on
    every retry (the engine does not ignore that batch, it processes its items again one at a time), and the
    traceback of a failed execution (the engine reports it in one line, ``failed on the Ray cluster: ...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != "ray.data.exceptions" and "Ignoring this exception with remaining max_errored_blocks" not in record.getMessage()


def _quiet(ray: Any) -> None:
    """Ray Data without progress bars or start/finish lines, and Ray's error messages (a worker died, a
    task is retried) on stderr: Ray prints them on the driver's stdout, which ``--format json`` owns."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    for name, value in (("enable_progress_bars", False), ("print_on_execution_start", False), ("enable_auto_log_stats", False),
                        ("verbose_stats_logs", False), ("max_errored_blocks", -1)):
        if hasattr(ctx, name):
            setattr(ctx, name, value)
    try:
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")  # the "progress bars disabled" notice: we asked for it
    except ImportError:
        pass
    for name in ("ray", "ray.data"):  # a console handler set up while another stderr was current (one since closed,
        # as a test's capture, or a notebook cell's) would print "--- Logging error ---" and a traceback for every record
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                    and getattr(handler.stream, "closed", False):
                handler.acquire()
                try:
                    handler.stream = sys.stderr  # (setStream would flush the closed one first)
                finally:
                    handler.release()
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and not any(
            isinstance(f, _Hidden) for f in handler.filters
        ):
            handler.setLevel(logging.WARNING)
            handler.addFilter(_Hidden())
    worker = sys.modules.get("ray._private.worker")
    show = getattr(worker, "print_to_stdstream", None)
    if show is not None and not getattr(show, "_fundus_stderr", False):
        def to_stderr(data: dict, *args, **kwargs):
            if data.get("pid") == "raylet":  # Ray's own messages (a task retried, a worker died): one line each
                for text in data.get("lines", []):
                    if _STOPPING[0] and "will be retried" in text:
                        continue  # the engine stops its own actors on an interrupt: nothing is retried (campaign 24a C24A-5)
                    if line := _ray_message(text):
                        print(f"ray: {line}", file=sys.stderr, flush=True)
                return None
            return show({**data, "is_err": True}, *args, **kwargs)

        to_stderr._fundus_stderr = True  # type: ignore[attr-defined]
        worker.print_to_stdstream = to_stderr


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _exception_line(text: str) -> str | None:
    """The last line of ``text`` that names an exception (``ModuleNotFoundError: No module named 'x'``)."""
    for ln in reversed(text.splitlines()):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*: ", ln := _ANSI.sub("", ln).strip()):
            return ln
    return None


def _first_line(e: BaseException) -> str:
    """One line for a Ray failure: Ray's messages wrap the cause's traceback, so the last line that names an
    exception when there is one, else the first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return _exception_line(str(e)) or (f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__)


def _ray_message(text: str) -> str:
    """One line, without colour codes, for a message Ray sends the driver: its first line, where the traceback
    it may go on with is replaced by the exception that ends it (the Ray logs keep the whole message)."""
    lines = [ln for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    if not lines:
        return ""
    head, sep, _ = lines[0].strip().partition("Traceback (most recent call last):")
    return f"{head}{_exception_line(text) or ''}".strip() if sep else head


#: Set while the engine stops its actors (an interrupt or an error): Ray's "will be retried" lines are not shown.
_STOPPING = [False]

#: How long connecting to a cluster may take: ``ray.init`` retries a GCS that does not answer for as long as
#: it is left to (campaign 24a C24A-2: more than 11 minutes at a port where another service listens).
CONNECT_TIMEOUT_S = 60.0

_ADDRESS = re.compile(r"(ray://)?(\[[0-9A-Fa-f:.]+(%[\w.-]+)?\]|[A-Za-z0-9._-]+):(\d{1,5})", re.ASCII)  # no full-width digits (review 24 R24-8)


def check_address(address: str) -> None:
    """A usage error (exit 2) for an ``--address`` that is not ``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``
    (it was exit 1 with a hint about authentication; campaign 24a C24A-3)."""
    m = _ADDRESS.fullmatch(address)
    if address != "auto" and not (m and 1 <= int(m.group(4)) <= 65535):
        raise UsageError(f"--address {address!r} is not an address of a Ray cluster: give auto, HOST:PORT (as `ray start --head` "
                         "prints it) or ray://HOST:PORT")


def _init(ray: Any, address: str | None, kwargs: dict) -> None:
    """``ray.init``, with the process's signal handlers as they were (Ray sets its own SIGTERM handler, which
    exits 15: a scheduler's stop was no longer an interruption, exit 130; campaign 24a C24A-1), and, for a
    cluster, within ``CONNECT_TIMEOUT_S``."""
    import _thread
    import threading

    names = [n for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n)]
    main = threading.current_thread() is threading.main_thread()
    saved = {n: signal.getsignal(getattr(signal, n)) for n in names} if main else {}
    fired = threading.Event()

    def give_up() -> None:
        fired.set()
        _thread.interrupt_main()

    timer = threading.Timer(CONNECT_TIMEOUT_S, give_up) if address is not None and main else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        ray.init(address=address if address is not None else "local", **kwargs)
    except KeyboardInterrupt:
        if not fired.is_set():
            raise
        with contextlib.suppress(Exception):
            ray.shutdown()
        raise FundusError(f"cannot connect to the Ray cluster at {address}: no answer as a Ray cluster within {CONNECT_TIMEOUT_S:.0f} s",
                          "is a Ray cluster's head at that address (`ray start --head` prints it), reachable from here?") from None
    finally:
        if timer is not None:
            timer.cancel()
        for n, handler in saved.items():
            if handler is not None:
                signal.signal(getattr(signal, n), handler)


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail at once (exit 1) when a ``host:port`` address does not answer: ``ray.init`` would retry for
    minutes. ``auto`` and ``ray://`` client addresses are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as e:
        raise FundusError(f"cannot connect to the Ray cluster at {address}: {e.strerror or e}",
                          "start one with `ray start --head` and pass the address it prints") from None


class RayEngine:
    """Process a stage's items on Ray (see the module docstring).

    ``address``: an existing cluster (``ray start --head`` prints it; ``auto`` finds a local one); None
    starts a local Ray instance with ``num_cpus`` CPUs (default: this machine's available cores, or
    ``workers * threads`` when more, as the local engine runs ``workers`` processes whatever the cores).
    ``workers``: actors per stage. ``threads``: the CPU threads per actor the runs will ask for, checked
    against the cluster by ``start`` (optional). Ray is initialised by ``start`` (the first ``run`` calls
    it; a Ray already initialised in this process is used as it is); ``close`` shuts Ray down only if
    this engine initialised it (the local instance it started stops; a cluster is only disconnected from)."""

    name = "ray"

    def __init__(self, *, address: str | None = None, workers: int = 1, threads: int | None = None, num_cpus: int | None = None):
        self.ray = import_ray()
        if workers < 1:
            raise UsageError(f"--workers must be at least 1, got {workers}")
        self.address, self.workers, self.threads, self.num_cpus = address, workers, threads, num_cpus
        self._owned = False  # this engine called ray.init (close calls ray.shutdown)

    # -- the cluster ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect to ``address``, or start a local instance (once; ``run`` calls it), and quiet Ray."""
        ray = self.ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
            if self.address is None:
                # as many CPUs as the local engine would use: --workers processes of --threads, at least the cores
                kwargs["num_cpus"] = self.num_cpus or max(available_cpus(), self.workers * (self.threads or 1))
            else:
                check_address(self.address)
                _check_reachable(self.address)
            try:
                # "local": a new instance of this run's own, also where a cluster runs on this machine or RAY_ADDRESS
                # names one (ray.init() would connect to it, and refuses num_cpus there)
                _init(ray, self.address, kwargs)
            except ValueError as e:
                if self.address is None:
                    raise FundusError(f"cannot start a local Ray instance: {_first_line(e)}", LOCAL_START_HINT) from None
                raise UsageError(f"--address {self.address}: {_first_line(e)}") from None  # e.g. ray:// without ray[client]
            except (ConnectionError, RuntimeError) as e:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise FundusError(f"cannot connect to {where}: {_first_line(e)}",
                                  "is a cluster running there (`ray start --head` prints its address)? If `ray start` said token "
                                  "authentication is enabled, set RAY_AUTH_MODE=token (or use --address auto on the head)"
                                  if self.address else LOCAL_START_HINT) from None
            self._owned = True
        _quiet(ray)
        if self.threads is not None:
            self._actors(self.threads, 1)  # --threads larger than every node: a usage error before any work

    def _actors(self, threads: int, batches: int, gpu: bool = False) -> tuple[int, dict]:
        """(actors, their resources): ``workers`` actors of ``threads`` CPUs (and a GPU each for a CUDA
        stage), no more than the batches or than the cluster holds; a usage error when not even one fits."""
        nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        res: dict[str, Any] = {"num_cpus": threads}
        fits = sum(int(n.get("CPU", 0) // threads) for n in nodes)
        if gpu:
            res["num_gpus"] = 1
            fits = sum(min(int(n.get("CPU", 0) // threads), int(n.get("GPU", 0))) for n in nodes)
        if fits < 1:
            most = max((int(n.get("CPU", 0)) for n in nodes), default=0)
            need = f"{threads} CPUs" + (" and a GPU" if gpu else "")
            raise UsageError(f"--engine ray: no node of the Ray cluster has {need} for one actor (largest node: {most} CPUs); lower --threads")
        return max(1, min(self.workers, batches, fits)), res

    # -- the Engine protocol ---------------------------------------------------------------------------------
    def run(self, stage: Stage, todo: list[WorkItem], dst: Path, threads: int, record: Callable[[dict], None]) -> None:
        self.start()
        wanted = {w.key for w in todo}
        done: set[str] = set()

        def take(rows: list[dict]) -> None:
            for row in rows:
                if row["key"] in wanted and row["key"] not in done:  # once per key, even when a batch is retried
                    done.add(row["key"])
                    record(row)

        self._pass(stage, _chunks(todo, stage.batch_size), dst, threads, take, MAX_BLOCKS)
        rest = [w for w in todo if w.key not in done]
        if rest:  # tasks whose actor died on every retry: each item a task of its own, so only a culprit fails
            self._pass(stage, [[w] for w in rest], dst, threads, take, len(rest))
        take([{"key": w.key, "input": str(w.path), "outputs": [], "status": "error", "seconds": 0.0, "error": DIED}
              for w in todo if w.key not in done])

    def _pass(self, stage: Stage, batches: list[list[WorkItem]], dst: Path, threads: int, take: Callable[[list[dict]], None],
              max_blocks: int) -> None:
        """``batches`` through a fresh actor pool in at most ``max_blocks`` tasks, each row to ``take``."""
        ray = self.ray
        blocks = min(len(batches), max_blocks)
        actors, res = self._actors(threads, blocks, gpu=getattr(getattr(stage, "device", None), "type", None) == "cuda")
        ds = ray.data.from_items([{"works": pickle.dumps(b)} for b in batches], override_num_blocks=blocks)
        with warnings.catch_warnings():  # max_restarts/max_task_retries as remote args: deprecated in Ray 2.60, no replacement yet
            warnings.simplefilter("ignore")
            ds = ds.map_batches(
                _StageActor, fn_constructor_args=(stage, threads, str(dst), os.getcwd()), batch_size=1, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
                max_restarts=restarts_allowed(blocks), max_task_retries=TASK_RETRIES, **res,
            )  # fmt: skip
        it = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        _STOPPING[0] = False
        try:
            for out in it:
                for blob in out["rows"]:
                    take(pickle.loads(blob))
        except (KeyboardInterrupt, FundusError):  # FundusError: raised by ``take`` itself (a full disk stops the run)
            _STOPPING[0] = True  # (Ray's messages of the actors the engine stops arrive after this)
            raise
        except Exception as e:  # the actors could not start (stage.setup() failed on a node), the cluster went away
            _STOPPING[0] = True
            raise FundusError(f"--engine ray: the {stage.name} stage failed on the Ray cluster: {_first_line(e)}",
                              "the Ray logs (/tmp/ray/session_latest/logs on the node) hold the traceback") from None
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # stops the streaming executor (and its actors) on Ctrl-C or an error

    def close(self) -> None:
        if self._owned and self.ray.is_initialized():
            self.ray.shutdown()  # stops the local instance this engine started, or disconnects from the cluster
        self._owned = False

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
