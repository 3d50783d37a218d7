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
import os
import platform
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from fundus_pipeline import __version__
from fundus_pipeline.errors import EXIT_INTERRUPTED, EXIT_ITEMS_FAILED, EXIT_OK, FundusError, InputError, UsageError
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


def prepare_output(in_dir: Path, out_dir: Path, *, overwrite: bool, resume: bool) -> tuple[Path, Path]:
    """Validate the input folder and the output folder; create the latter. Returns resolved paths."""
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
    if dst.exists() and any(dst.iterdir()) and not (overwrite or resume):
        raise UsageError(f"output folder {out_dir} is not empty; pass --resume to continue a run or --overwrite to replace its outputs")
    try:
        dst.mkdir(parents=True, exist_ok=True)
        probe = dst / f".fundus-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise FundusError(f"cannot write to output folder {out_dir}: {e.strerror or e}") from None
    return src, dst


def _load_previous(out_dir: Path) -> dict[str, dict]:
    """Rows of an earlier run in this folder (results.csv, then the crash-safe journal)."""
    rows: dict[str, dict] = {}
    manifest = out_dir / "manifest.json"
    if manifest.exists():
        try:
            for r in json.loads(manifest.read_text()).get("items", []):
                rows[r["key"]] = r
        except (OSError, ValueError, KeyError):
            pass
    journal = out_dir / JOURNAL
    if journal.exists():
        for line in journal.read_text().splitlines():
            try:
                r = json.loads(line)
                rows[r["key"]] = r
            except (ValueError, KeyError):
                continue  # a torn last line after a crash
    return rows


def _previous_config_hash(out_dir: Path) -> str | None:
    for name in ("manifest.json", JOURNAL):
        p = out_dir / name
        if not p.exists():
            continue
        try:
            if name == "manifest.json":
                return json.loads(p.read_text()).get("config_sha256")
            first = p.read_text().splitlines()[0]
            return json.loads(first).get("config_sha256")
        except (OSError, ValueError, IndexError):
            continue
    return None


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
    except (InputError, FundusError) as e:
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


def write_reports(stage, rows: list[dict], *, in_dir: Path, out_dir: Path, command: list[str], started: float, interrupted: bool, extra: dict | None = None) -> dict:
    rows = sorted(rows, key=lambda r: r["key"])
    counts = {"total": len(rows), "ok": 0, "error": 0, "skipped": 0}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    cols = BASE_COLUMNS + list(stage.columns)
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: _csv_cell(r.get(c, "")) for c in cols})
    write_bytes_atomic(out_dir / "results.csv", buf.getvalue().encode())
    cfg = stage.config()
    manifest = {
        "schema_version": 1,
        "tool": {"name": "fundus-pipeline", "version": __version__},
        "stage": stage.name,
        "command": command,
        "config": cfg,
        "config_sha256": config_sha256(cfg),
        "input": {"dir": str(in_dir), "count": len(rows)},
        "output": {"dir": str(out_dir)},
        "environment": environment(),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": round(time.time() - started, 3),
        "interrupted": interrupted,
        "counts": counts,
        **(extra or {}),
        "items": rows,
    }
    write_bytes_atomic(out_dir / "manifest.json", (json.dumps(manifest, indent=2, default=str) + "\n").encode())
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
    src, dst = prepare_output(in_dir, out_dir, overwrite=overwrite, resume=resume)
    if items is None:
        items = discover_images(src)
    if not items:
        raise UsageError(f"no images found in {in_dir} (supported: png, jpg, jpeg, tif, tiff, bmp, ppm, gif)")
    cfg_hash = config_sha256(stage.config())
    done: dict[str, dict] = {}
    if resume:
        prev_hash = _previous_config_hash(dst)
        if prev_hash is not None and prev_hash != cfg_hash:
            raise UsageError(f"{out_dir} was written with a different configuration; rerun with the same options, or use --overwrite")
        for key, r in _load_previous(dst).items():
            if r.get("status") in ("ok", "skipped") and all((dst / o).exists() for o in r.get("outputs", [])):
                done[key] = {**r, "status": "ok"}
    journal_path = dst / JOURNAL
    if overwrite and journal_path.exists():
        journal_path.unlink()
    todo = [it for it in items if it.key not in done]
    rows: dict[str, dict] = {it.key: done[it.key] for it in items if it.key in done}
    skipped = len(rows)
    interrupted = False
    bar = tqdm(total=len(items), initial=skipped, desc=stage.name, unit="img", file=sys.stderr, disable=not progress or None, dynamic_ncols=True)
    journal = open(journal_path, "a", buffering=1)

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
            with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(stage,)) as ex:
                pending = set()
                queue = iter(todo)
                try:
                    for it in queue:
                        pending.add(ex.submit(_in_worker, it, dst))
                        if len(pending) >= 2 * workers:
                            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                            for f in finished:
                                record(f.result())
                    for f in pending:
                        record(f.result())
                except KeyboardInterrupt:
                    ex.shutdown(wait=True, cancel_futures=True)
                    raise
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        journal.close()
        counts = write_reports(stage, list(rows.values()), in_dir=src, out_dir=dst, command=command or sys.argv, started=started, interrupted=interrupted)
    counts["skipped"] = skipped
    failed = [{"key": r["key"], "error": r["error"]} for r in sorted(rows.values(), key=lambda r: r["key"]) if r["status"] == "error"]
    return RunResult(stage.name, src, dst, counts, failed, time.time() - started, interrupted, list(rows.values()))
