"""Campaign 9b (scale and hard failures): kill -9 of a run, of its workers and of its parent; out of memory;
a full disk; very large inputs. Each test fails on the code before the mend it names."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import subprocess
import sys
import textwrap
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from PIL import Image

from fundus_pipeline import chain, runner
from fundus_pipeline.errors import FundusError
from tests.conftest import synthetic_fundus
from tests.test_campaign9 import run
from tests.test_refusals import _err
from tests.test_run import photos, tiny, tiny_args  # noqa: F401  (photos and tiny are fixtures)

TEMP = ".manifest.json.0123456789ab.tmp"  # a write that a kill -9 cut short (io.open_atomic's name)


def _killed_at_start(out: Path, temp: str = TEMP) -> None:
    """OUT as a kill -9 right after the lock was taken leaves it: the lock file and a temporary file."""
    out.mkdir()
    (out / runner.LOCK).write_text("")
    (out / temp).write_text("{")


# ---------------------------------------------------------------- D4: a kill -9 in the first second
@pytest.mark.parametrize("flag", [(), ("--resume",)])
def test_a_stage_folder_killed_before_its_first_table_counts_as_empty(two, tmp_path, flag):
    out = tmp_path / "o"
    _killed_at_start(out, "..fundus-journal.jsonl.0123456789ab.tmp")
    assert run("degrade", two, out, "--quiet", *flag) == 0  # was exit 2: "not empty" / "holds no earlier fundus run"
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []
    assert json.loads((out / "manifest.json").read_text())["counts"]["ok"] == 2


def test_a_run_killed_before_its_first_manifest_resumes(photos, tmp_path, tiny):  # noqa: F811
    out = tmp_path / "r"
    _killed_at_start(out)
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "segment", "--resume")) == 0  # was exit 2
    assert not list(out.glob("*.tmp")) and json.loads((out / "manifest.json").read_text())["status"] == "finished"


def test_other_files_still_make_a_folder_not_empty(two, tmp_path, capsys):
    out = tmp_path / "o"
    _killed_at_start(out)
    (out / ".notes.tmp").write_text("mine")  # hidden .tmp, not fundus's name
    assert run("degrade", two, out, "--quiet") == 2
    assert "is not empty" in _err(capsys) and (out / ".notes.tmp").read_text() == "mine"


# ------------------------------------------------------------------------ D5: temporaries left behind
def test_a_run_removes_its_killed_predecessors_top_level_temporaries(photos, tmp_path, tiny):  # noqa: F811
    out = tmp_path / "r"
    args = tiny_args(tiny, "--steps", "segment")
    assert run("run", photos, out, *args) == 0
    for name in (".results.csv.0123456789ab.tmp", ".report.html.0123456789ab.tmp", TEMP):
        (out / name).write_text("cut short")
    (out / ".keep.tmp").write_text("not fundus's")
    assert run("run", photos, out, *args, "--resume") == 0  # was: every temporary left, one more per crash
    assert sorted(p.name for p in out.glob(".*.tmp")) == [".keep.tmp"]
    (out / ".report-2.html.0123456789ab.tmp").write_text("cut short")
    assert run("report", out) == 0
    assert sorted(p.name for p in out.glob(".*.tmp")) == [".keep.tmp"]


def test_a_worker_killed_while_writing_is_retried_its_pool_discarded_and_its_temporary_removed(two, tmp_path, monkeypatch):
    out, marker = tmp_path / "o", tmp_path / "killed-once"
    real, discarded = runner._process_batch, []
    real_discard = runner.discard_pool

    def killed_writer(stage, works, dst):  # in a forked degrade worker: the first p0 dies half-way through its write
        if works[0].key == "p0" and not marker.exists():
            marker.write_text("")
            (dst / ".p0.png.0123456789ab.tmp").write_bytes(b"\x89PNG")
            os._exit(1)
        return real(stage, works, dst)

    monkeypatch.setattr(runner, "_process_batch", killed_writer)
    monkeypatch.setattr(runner, "discard_pool", lambda ex, grace=0.0: (discarded.append(getattr(ex, "_broken", False)), real_discard(ex, grace)))
    deaths = runner.WORKER_DEATHS[0]
    assert run("degrade", two, out, "--quiet", "--workers", "2", "--threads", "1") == 0
    assert marker.exists() and runner.WORKER_DEATHS[0] == deaths + 1
    assert discarded and discarded[0]  # the broken pool was given up through discard_pool (its escaped workers killed)
    assert not list(out.glob(".*.tmp"))  # was: left behind after an exit 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["ok"] == 2


def test_scratch_folders_of_dead_runs_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    old = tmp_path / f"fundus-rows-{dead.stdout.strip()}-abc_1234"  # its process is gone
    mine = tmp_path / f"fundus-join-{os.getpid()}-abc_1234"  # this process's own
    fresh = tmp_path / f"fundus-rows-{dead.stdout.strip()}-xyz_9876"  # gone too, but touched a moment ago
    other = tmp_path / "fundus-rows-notapid"
    for d in (old, mine, fresh, other):
        d.mkdir()
        (d / "rows.jsonl").write_text("{}\n")
    past = time.time() - 2 * chain.SCRATCH_STALE_S
    for d in (old, mine, other):
        os.utime(d / "rows.jsonl", (past, past))
        os.utime(d, (past, past))
    assert chain.sweep_scratch(tmp_path) == [old]
    assert not old.exists() and mine.exists() and fresh.exists() and other.exists()
    with chain.scratch_dir("rows") as name:  # the folders fundus makes carry its pid
        assert chain._SCRATCH.fullmatch(Path(name).name) and f"-{os.getpid()}-" in name


# ------------------------------------------------------------- D1: a worker that escaped a broken pool
def test_a_broken_pool_kills_a_worker_that_started_as_it_broke():
    ctx = multiprocessing.get_context("spawn")
    ex = ProcessPoolExecutor(1, mp_context=ctx)
    late = []
    try:
        with pytest.raises(BrokenProcessPool):
            ex.submit(os._exit, 1).result(timeout=120)
        # the race: a submit was starting a worker while the executor found the pool broken, so its clean-up
        # never terminated it; the worker then waits for work that never comes
        p = ctx.Process(target=time.sleep, args=(600,))
        p.start()
        ex._processes[p.pid] = p
        late = [p]
        runner.discard_pool(ex)  # was: shutdown(wait=False); the worker waited for work for good, joined at exit
        for p in late:
            p.join(20)
            assert not p.is_alive()
    finally:
        for p in late:
            if p.is_alive():
                p.kill()


# ------------------------------------------------------------------ D2: the parent killed at start-up
def test_a_worker_whose_parent_was_killed_while_it_started_ends(tmp_path):
    script = textwrap.dedent("""
        import os, signal, sys
        from fundus_pipeline import runner
        pool = runner.WorkerPool(1, 1)
        ex = pool.executor()
        runner.submit(ex, os.getpid)
        print(" ".join(str(p.pid) for p in ex._processes.values()), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # before the worker has even imported fundus_pipeline
    """)
    log = tmp_path / "pids.txt"
    with open(log, "w") as f:  # a file, not a pipe: a worker left alive would hold a pipe open, and the wait for its end
        subprocess.run([sys.executable, "-c", script], stdout=f, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1], timeout=120)
    pids = [int(p) for p in log.read_text().split()[:1] if p.isdigit()]
    assert pids, log.read_text()

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        return state not in ("Z", "X")

    deadline = time.monotonic() + 60
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    leaked = [p for p in pids if alive(p)]
    for p in leaked:
        os.kill(p, 9)
    assert not leaked  # was: the worker read its parent's pid after the parent died (init's), and lived on


# ----------------------------------------------------------------- D3: a worker that cannot be started
class _NoStart:
    def submit(self, fn, *args):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")  # multiprocessing's resource tracker killed


def test_a_worker_that_cannot_start_is_a_one_line_error():
    with pytest.raises(FundusError, match="cannot start a worker process: BrokenPipeError: Broken pipe") as e:
        runner.submit(_NoStart(), print)  # was: the BrokenPipeError reached Typer's EPIPE handling: exit 1, no message
    assert "--resume" in e.value.hint


def test_a_broken_pipe_inside_multiprocessing_is_said(two, tmp_path, monkeypatch, capsys):
    def tracker_gone(*a, **k):  # as making a pool's queues does when the resource tracker was killed
        reader, writer = multiprocessing.Pipe(duplex=False)
        reader.close()
        writer.send_bytes(b"REGISTER")

    monkeypatch.setattr(sys.modules["fundus_pipeline.cli.degrade"], "run_stage_command", tracker_gone)
    assert run("degrade", two, tmp_path / "o") == 1  # was: Typer's EPIPE rule, exit 1 and nothing on stderr
    err = _err(capsys)
    assert err.startswith("Error: a helper process of the run's worker pool is gone: BrokenPipeError") and "--resume" in err


# ------------------------------------------------------------------------------------ D6: out of memory
def test_out_of_memory_is_said_not_reported_as_a_bug(two, tmp_path, monkeypatch, capsys):
    def no_memory(*a, **k):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(sys.modules["fundus_pipeline.cli.degrade"], "run_stage_command", no_memory)
    assert run("degrade", two, tmp_path / "o") == 1
    err = _err(capsys)  # no "internal error"
    assert err.startswith("Error: out of memory: MemoryError: std::bad_alloc") and "lower --workers" in err
    row = {}
    runner._guard(row, lambda: (_ for _ in ()).throw(RuntimeError("OpenCV(5.1.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate")))
    assert row["status"] == "error" and row["error"].startswith("out of memory while processing this image (OpenCV(5.1.0) alloc.cpp:73")  # was: only OpenCV's message


def test_a_failed_import_under_an_address_space_limit_is_out_of_memory():
    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2**40, resource.getrlimit(resource.RLIMIT_AS)[1]))
        from fundus_pipeline.cli.app import _internal_error
        raise SystemExit(_internal_error(SystemError("error return without exception set")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
    assert out.returncode == 1
    assert out.stderr.startswith("Error: out of memory (the address space is limited to 1048576 MiB: ulimit -v): SystemError"), out.stderr


# ------------------------------------------------------------------------------------- D7: a full disk
def test_a_full_disk_keeps_the_resume_hint_and_a_run_says_stopped(photos, tmp_path, tiny, monkeypatch, capsys):  # noqa: F811
    import fundus_pipeline.io as fio

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(fio.os, "fsync", full)
        with pytest.raises(FundusError) as e:
            fio.write_bytes_atomic(tmp_path / "x.bin", b"1")
    assert "No space left on device" in e.value.message and "--resume" in e.value.hint  # was: no hint
    out = tmp_path / "r"

    def stops(self):
        raise FundusError(f"cannot write {out}/segment/results.csv: No space left on device", hint="free space, then rerun with --resume")

    monkeypatch.setattr(chain.Chain, "_run_steps", stops)
    capsys.readouterr()
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "segment")) == 1
    assert "Hint: free space" in _err(capsys)
    assert json.loads((out / "manifest.json").read_text())["status"] == "stopped"  # was: "running" for good
    assert run("report", out) == 2  # nothing to report yet; --resume finishes it
    assert "stopped by an error" in _err(capsys)
    monkeypatch.undo()
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "segment", "--resume")) == 0


# ------------------------------------------------------------------------ D8: 89-179 MP photographs
def test_a_photograph_past_pillows_warning_size_reads_without_a_warning(tmp_path, monkeypatch):
    from fundus_pipeline import io as fio

    p = tmp_path / "big.png"
    Image.fromarray(synthetic_fundus(64, 64, 0)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4,096 pixels: past the warning, below Pillow's error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: DecompressionBombWarning from the PNG check
        arr, _ = fio.read_image(p)
    assert arr.shape == (64, 64, 3)
