"""The stage runner shared by every folder-in/folder-out command.

It discovers the images, guards the output folder, processes items (optionally in parallel worker
processes), records per-item failures without stopping, writes every output atomically, journals
finished items so that ``--resume`` works even after a crash, and writes ``manifest.json`` and
``results.csv`` at the end and on Ctrl-C.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import multiprocessing
import os
import platform
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from fundus_pipeline import __version__
from fundus_pipeline.errors import EXIT_INTERRUPTED, EXIT_ITEMS_FAILED, EXIT_OK, FundusError, UsageError
from fundus_pipeline.io import ImageItem, discover_images, write_bytes_atomic

JOURNAL = ".fundus-journal.jsonl"
BASE_COLUMNS = ["key", "input", "outputs", "status", "error", "seconds"]


class Stage(Protocol):
    """What a stage provides to the runner."""

    name: str
    columns: list[str]  # stage-specific results.csv columns

    def config(self) -> dict: ...

    def process(self, item: ImageItem, out_dir: Path) -> tuple[list[str], dict]:
        """Process one item; return (relative output paths, stage columns). Raise on failure."""
        ...

    # Optional: ``setup_worker()`` (load models once per process; the stage is pickled to spawned
    # workers) and ``info() -> dict`` (manifest fields kept out of the configuration hash, e.g. paths).


@dataclass
class RunResult:
    stage: str
    in_dir: Path
    out_dir: Path
    counts: dict
    failed: list[dict]
    duration_s: float
    interrupted: bool
    rows: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_ITEMS_FAILED if self.counts.get("error", 0) else EXIT_OK

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
            "exit_code": self.exit_code,
        }


def config_sha256(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def environment() -> dict:
    import cv2
    import numpy

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "opencv": cv2.__version__,
    }
    if "torch" in sys.modules:
        import torch

        env["torch"] = torch.__version__
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


def _is_relative_to(a: Path, b: Path) -> bool:
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def prepare_output(in_dir: Path, out_dir: Path, *, overwrite: bool, resume: bool, create: bool = True) -> tuple[Path, Path]:
    """Validate the input folder and the output folder; create the latter (``create``). Returns resolved paths."""
    if overwrite and resume:
        raise UsageError("--overwrite and --resume cannot be used together")
    if not in_dir.exists():
        raise UsageError(f"input folder does not exist: {in_dir}")
    if not in_dir.is_dir():
        raise UsageError(f"input is not a folder: {in_dir}")
    src, dst = in_dir.resolve(), out_dir.resolve()
    if dst == src or _is_relative_to(dst, src):
        raise UsageError(f"output folder {out_dir} is the input folder or inside it; choose a folder outside {in_dir}")
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"output path exists and is not a folder: {out_dir}")
    non_empty = dst.exists() and any(dst.iterdir())
    if non_empty and not (overwrite or resume):
        raise UsageError(f"output folder {out_dir} is not empty; pass --resume to continue a run or --overwrite to replace its outputs")
    if non_empty and resume and not ((dst / "manifest.json").exists() or (dst / JOURNAL).exists()):
        raise UsageError(f"--resume: {out_dir} holds no earlier fundus run (no manifest.json); choose an empty folder or pass --overwrite")
    if not create:
        return src, dst
    try:
        dst.mkdir(parents=True, exist_ok=True)
        probe = dst / f".fundus-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FundusError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None
    return src, dst


def _load_previous(out_dir: Path) -> tuple[dict[str, dict], set[str]]:
    """Rows of earlier runs in this folder (manifest.json, then the crash-safe journal, which is newer),
    each tagged with the configuration hash it was written with; and the set of hashes seen."""
    rows: dict[str, dict] = {}
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        try:
            m = json.loads(manifest.read_text())
            for r in m.get("items", []):
                rows[r["key"]] = {**r, "config_sha256": m.get("config_sha256")}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    journal = out_dir / JOURNAL
    if journal.exists():
        for line in journal.read_text(errors="surrogateescape").splitlines():
            try:
                r = json.loads(line)
                rows[r["key"]] = r
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash
    return rows, {r.get("config_sha256") for r in rows.values()}


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files left by a killed run (``.<name>.<hex>.tmp``, see fundus_pipeline.io)."""
    for p in out_dir.rglob(".*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass


_WORKER_STAGE: Any = None


def _worker_init(stage) -> None:
    global _WORKER_STAGE
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    _WORKER_STAGE = stage
    setup = getattr(stage, "setup_worker", None)
    if setup:
        setup()


def _process_one(stage, item: ImageItem, out_dir: Path) -> dict:
    t0 = time.perf_counter()
    row: dict[str, Any] = {"key": item.key, "input": str(item.path), "outputs": [], "status": "ok", "error": ""}
    try:
        outputs, fields = stage.process(item, out_dir)
        row["outputs"] = outputs
        row.update(fields)
    except FundusError as e:  # InputError, WeightsError, ... are FundusErrors
        row["status"], row["error"] = "error", e.message
    except MemoryError:
        row["status"], row["error"] = "error", "out of memory while processing this image"
    except Exception as e:  # an unexpected failure on one item must not stop the run
        row["status"], row["error"] = "error", f"{type(e).__name__}: {e}".splitlines()[0]
    row["seconds"] = round(time.perf_counter() - t0, 4)
    return row


def _in_worker(item: ImageItem, out_dir: Path) -> dict:
    return _process_one(_WORKER_STAGE, item, out_dir)


def _csv_cell(v: Any) -> Any:
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return v


def write_reports(stage, rows: list[dict], *, in_dir: Path, out_dir: Path, command: list[str], started: float, interrupted: bool, n_inputs: int, resumed: int = 0) -> dict:
    rows = sorted(rows, key=lambda r: r["key"])
    counts = {"total": len(rows), "ok": 0, "error": 0, "skipped": resumed}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if interrupted:
        counts["not_processed"] = n_inputs - len(rows)
    cols = BASE_COLUMNS + list(stage.columns)
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _csv_cell(r.get(c, "")) for c in cols})
    write_bytes_atomic(out_dir / "results.csv", buf.getvalue().encode("utf-8", "surrogateescape"))
    cfg = stage.config()
    manifest = {
        "schema_version": 1,
        "tool": {"name": "fundus-pipeline", "version": __version__},
        "stage": stage.name,
        "command": command,
        "config": cfg,
        "config_sha256": config_sha256(cfg),
        "input": {"dir": str(in_dir), "count": n_inputs},
        "output": {"dir": str(out_dir)},
        "environment": environment(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.time() - started, 3),
        "interrupted": interrupted,
        "counts": counts,
        **(stage.info() if hasattr(stage, "info") else {}),
        "items": rows,
    }
    write_bytes_atomic(out_dir / "manifest.json", (json.dumps(manifest, indent=2, default=str) + "\n").encode("utf-8", "surrogateescape"))
    return counts


def run_stage(
    stage,
    in_dir: Path,
    out_dir: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    workers: int = 1,
    progress: bool = True,
    command: list[str] | None = None,
    items: list[ImageItem] | None = None,
) -> RunResult:
    """Run ``stage`` over every image of ``in_dir`` into ``out_dir``; see the module docstring."""
    started = time.time()
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    src, dst = prepare_output(in_dir, out_dir, overwrite=overwrite, resume=resume, create=False)
    if items is None:
        items = discover_images(src)
    if not items:
        raise UsageError(f"no images found in {in_dir} (supported: png, jpg, jpeg, tif, tiff, bmp, ppm, gif)")
    prepare_output(in_dir, out_dir, overwrite=overwrite, resume=resume)  # creates OUT, checks it is writable
    cfg_hash = config_sha256(stage.config())
    journal_path = dst / JOURNAL
    done: dict[str, dict] = {}
    if resume:
        previous, hashes = _load_previous(dst)
        if previous and cfg_hash not in hashes:
            raise UsageError(f"{out_dir} was written with a different configuration; rerun with the same options, or use --overwrite")
        for key, r in previous.items():
            if r.get("config_sha256") == cfg_hash and r.get("status") == "ok" and all((dst / o).exists() for o in r.get("outputs", [])):
                done[key] = {k: v for k, v in r.items() if k != "config_sha256"}
    if overwrite:
        for name in (JOURNAL, "manifest.json", "results.csv"):  # the reports of the run being replaced
            (dst / name).unlink(missing_ok=True)
    if resume or overwrite:
        _remove_stale_temporaries(dst)
    # The journal keeps only rows of the current configuration (the others are not resumable).
    keep = [json.dumps({**r, "config_sha256": cfg_hash}, default=str) for r in done.values()]
    write_bytes_atomic(journal_path, ("".join(line + "\n" for line in keep)).encode("utf-8", "surrogateescape"))
    todo = [it for it in items if it.key not in done]
    rows: dict[str, dict] = {it.key: done[it.key] for it in items if it.key in done}
    resumed = len(rows)
    interrupted = False
    bar = tqdm(total=len(items), initial=resumed, desc=stage.name, unit="img", file=sys.stderr, disable=not progress or None, dynamic_ncols=True)
    journal = open(journal_path, "a", buffering=1, encoding="utf-8", errors="surrogateescape")

    def record(row: dict) -> None:
        rows[row["key"]] = row
        journal.write(json.dumps({**row, "config_sha256": cfg_hash}, default=str) + "\n")
        bar.update(1)
        if row["status"] == "error":
            bar.write(f"error: {row['key']}: {row['error']}", file=sys.stderr)

    try:
        if workers == 1 or len(todo) <= 1:
            setup = getattr(stage, "setup_worker", None)
            if setup:
                setup()
            for it in todo:
                record(_process_one(stage, it, dst))
        else:
            _run_pool(stage, todo, dst, workers, record)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        journal.close()
        counts = write_reports(
            stage, list(rows.values()), in_dir=src, out_dir=dst, command=command or sys.argv, started=started,
            interrupted=interrupted, n_inputs=len(items), resumed=resumed,
        )
    failed = [{"key": r["key"], "error": r["error"]} for r in sorted(rows.values(), key=lambda r: r["key"]) if r["status"] == "error"]
    return RunResult(stage.name, src, dst, counts, failed, time.time() - started, interrupted, list(rows.values()))


def _run_pool(stage, todo: list[ImageItem], dst: Path, workers: int, record) -> None:
    """Process ``todo`` in ``workers`` processes, spawned by default (safe with CUDA and torch threads);
    a torch-free stage may ask for ``start_method = "fork"``, which starts workers much faster.

    A worker that dies (killed for memory, a crash in a native decoder) does not end the run: the items
    that were in flight are retried one at a time in a fresh process, so only the item that kills its
    process is recorded as an error, and a fresh pool takes the rest.
    """
    method = getattr(stage, "start_method", "spawn")
    ctx = multiprocessing.get_context(method if method in multiprocessing.get_all_start_methods() else "spawn")
    queue = list(reversed(todo))
    while queue:
        suspects = _pool_pass(stage, queue, dst, workers, record, ctx)
        for it in suspects:  # isolate the culprit
            if _pool_pass(stage, [it], dst, 1, record, ctx):
                record({"key": it.key, "input": str(it.path), "outputs": [], "status": "error", "seconds": 0.0,
                        "error": "the worker process died while processing this image (out of memory or a crash in a decoder)"})


def _pool_pass(stage, queue: list[ImageItem], dst: Path, workers: int, record, ctx) -> list[ImageItem]:
    """Run items from ``queue`` (consumed from the end) until it is empty or a worker dies; return the
    items that were in flight when a worker died."""
    in_flight: dict = {}
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init, initargs=(stage,))
    try:
        while queue or in_flight:
            while queue and len(in_flight) < 2 * workers:
                it = queue.pop()
                in_flight[ex.submit(_in_worker, it, dst)] = it
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for f in finished:
                row = f.result()  # raises BrokenProcessPool if a worker died
                del in_flight[f]
                record(row)
    except BrokenProcessPool:
        suspects = []
        for f, it in in_flight.items():
            if f.done() and not f.cancelled() and f.exception() is None:
                record(f.result())
            else:
                suspects.append(it)
        ex.shutdown(wait=False, cancel_futures=True)
        return suspects
    except KeyboardInterrupt:
        ex.shutdown(wait=True, cancel_futures=True)
        for f in in_flight:  # items that finished while shutting down
            if f.done() and not f.cancelled() and f.exception() is None:
                record(f.result())
        raise
    ex.shutdown(wait=True)
    return []
