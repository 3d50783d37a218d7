"""Ninth campaign, and the last defects of the eighth (D5: a running chain's stage folders; D14-D15: Ctrl-C while
a pool starts its workers)."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import shutil
import signal
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundus_pipeline import runner
from fundus_pipeline.cli import main
from tests.conftest import synthetic_fundus
from tests.test_refusals import _err
from tests.test_run import output_bytes, photos, tiny, tiny_args  # noqa: F401  (photos and tiny are fixtures)


def run(*args) -> int:
    return main([str(a) for a in args])


def test_a_stage_command_refuses_the_stage_folder_of_a_chain_another_process_runs(two, tmp_path, capsys):
    chain = tmp_path / "out"
    (chain / "grade").mkdir(parents=True)
    (chain / "grade" / "kept.txt").write_text("the chain's")
    held = os.open(chain / runner.LOCK, os.O_RDWR | os.O_CREAT, 0o644)  # a running fundus run holds its OUT
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run("degrade", two, chain / "grade", "--overwrite", "--quiet") == 2
        err = _err(capsys)
        assert "another fundus command is writing to" in err and "stage folder" in err and len(err.strip().splitlines()) == 1
        assert sorted(p.name for p in (chain / "grade").iterdir()) == ["kept.txt"]  # nothing written, lock file left out too
    finally:
        os.close(held)
    # the chain gone (its lock released, the file left behind as always): the folder is free
    assert run("degrade", two, chain / "grade", "--overwrite", "--quiet") == 0


def test_a_stage_command_in_a_folder_beside_an_unheld_lock_runs(two, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / runner.LOCK).write_text("123\n")  # left by a finished or killed run
    assert run("degrade", two, tmp_path / "out" / "grade", "--quiet") == 0


class _SignalledExecutor:
    """Stands for ProcessPoolExecutor.submit receiving Ctrl-C half-way (while it forks a worker)."""

    def __init__(self) -> None:
        self.completed = False

    def submit(self, fn, *args):
        signal.raise_signal(signal.SIGINT)
        self.completed = True  # with the signal raised at once, submit would stop above, its worker half-started
        return "future"


def test_ctrl_c_while_a_pool_starts_a_worker_is_raised_when_submit_has_returned():
    ex = _SignalledExecutor()
    with pytest.raises(KeyboardInterrupt):
        runner.submit(ex, print)
    assert ex.completed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_sigterm_held_while_a_pool_starts_ends_the_run_as_an_interrupt():
    ex = _SignalledExecutor()
    ex.submit = lambda fn, *a: (signal.raise_signal(signal.SIGTERM), setattr(ex, "completed", True))  # type: ignore[method-assign]
    with runner.stop_signals_as_interrupt(), pytest.raises(KeyboardInterrupt):
        runner.submit(ex, print)
    assert ex.completed


_AT_START: tuple = ()


def _probe_init() -> None:
    global _AT_START
    _AT_START = tuple(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))  # as the worker came up (spawn: after its imports)
    runner._worker_signals()


def _probe() -> tuple:
    return _AT_START, signal.getsignal(signal.SIGINT), tuple(sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_pool_workers_start_with_ctrl_c_held_and_then_ignore_it(method):
    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    ctx = multiprocessing.get_context(method)
    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_probe_init) as ex:
        at_start, handler, mask = runner.submit(ex, _probe).result(timeout=120)
    # a Ctrl-C while a spawned worker imports torch waited (was a KeyboardInterrupt traceback from each worker);
    # once the worker ignores it, a held one is dropped and the signals are deliverable again (SIGTERM ends it)
    assert signal.SIGINT in at_start and signal.SIGTERM in at_start
    assert handler == signal.SIG_IGN and signal.SIGINT not in mask and signal.SIGTERM not in mask


# ------------------------------------------------------------------ campaign 9a: reproducibility
def test_build_refuses_to_finish_a_set_on_another_thread_count(fake_data, tmp_path, capsys):
    from tests.test_quality import _build

    out = tmp_path / "set"
    assert _build(fake_data, out) == 0  # --threads 1
    before = sorted(p.name for p in out.rglob("*"))
    assert run("build", "quality-set", out, "--data", fake_data, "--parts", "train", "--limit", "1", "--draws", "1",
               "--size", "128", "--enhancers", "identity,blur", "--threads", "2") == 2
    err = _err(capsys)
    assert "built (or being built) with --threads 1" in err and "finish it with --threads 1" in err, err
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing rebuilt, the manifest's count stays true
    assert _build(fake_data, out) == 0  # the same count resumes (nothing to do)
    assert json.loads((out / "manifest.json").read_text())["threads"] == 1


def test_enhance_source_cache_is_prepared_again_for_other_data(fake_data, tmp_path):
    from fundus_pipeline.train import enhance as trainer

    other = tmp_path / "data"
    shutil.copytree(fake_data, other)
    photo = other / "DRIVE" / "training" / "images" / "21_training.tif"
    Image.fromarray((np.asarray(Image.open(photo)) * 0.6).astype(np.uint8)).save(photo)  # a changed photograph
    cache, said = tmp_path / "sources.npz", []
    seg = trainer.resolve_segmenter()
    a = trainer.prepare_sources(fake_data, 64, seg, cache, said.append)
    b = trainer.prepare_sources(other, 64, seg, cache, said.append)  # same names, other bytes: was the cache of fake_data
    assert any("prepared from other data" in m for m in said)
    assert not np.array_equal(a[0].rgb, b[0].rgb) and [s.name for s in a] == [s.name for s in b]
    c = trainer.prepare_sources(other, 64, seg, cache, said.append)  # now the cache fits: loaded
    assert np.array_equal(b[0].rgb, c[0].rgb)


def _simulated(tmp_path: Path) -> tuple[Path, Path]:
    clean, truth = tmp_path / "clean", tmp_path / "truth"
    clean.mkdir()
    truth.mkdir()
    for i in range(2):
        img = synthetic_fundus(80, 80, i)
        Image.fromarray(img).save(clean / f"{i:02d}_test.png")
        Image.fromarray(((img[..., 1] < 90) & (img.max(2) > 20)).astype(np.uint8) * 255).save(truth / f"{i:02d}_manual1.png")
    return clean, truth


def test_replay_checks_its_results_against_the_recorded_run(tmp_path, tiny, capsys):  # noqa: F811
    clean, truth = _simulated(tmp_path)
    x = tmp_path / "x"
    args = tiny_args(tiny, "--steps", "grade,segment", "--simulate", "001", "--seed", "0", "--ground-truth", truth)
    assert run("run", clean, x, *args) == 0
    m = json.loads((x / "manifest.json").read_text())
    assert m["threads_used"] >= 1 and set(m["ground_truth_sha256"]) == {"00_manual1", "01_manual1"}
    first = output_bytes(x)
    copy = tmp_path / "m0.json"
    shutil.copy(x / "manifest.json", copy)
    capsys.readouterr()
    # nothing changed: identical, and said so (rows and files compared)
    assert run("run", "--replay", x, tmp_path / "r1") == 0
    err = capsys.readouterr().err
    assert "--replay: identical to the recorded run (2 rows and" in err and "files of" in err
    assert json.loads((tmp_path / "r1" / "manifest.json").read_text())["config"]["threads"] == m["threads_used"]  # not the default of this replay
    # OLD_OUT rewritten by another run (seed 1): a copy of the seed-0 manifest replays seed 0, not what OLD_OUT now holds
    assert run("run", clean, x, *tiny_args(tiny, "--steps", "grade,segment", "--simulate", "001", "--seed", "1", "--ground-truth", truth, "--overwrite")) == 0
    assert output_bytes(x) != first
    assert run("run", "--replay", copy, tmp_path / "r2", "--quiet") == 0
    assert output_bytes(tmp_path / "r2") == first
    # a recorded result that the replay does not reproduce: said, exit 3
    doctored = json.loads(copy.read_text())
    doctored["items"][0]["grade"] = "good" if doctored["items"][0]["grade"] != "good" else "reject"
    (tmp_path / "m1.json").write_text(json.dumps(doctored))
    capsys.readouterr()
    assert run("run", "--replay", tmp_path / "m1.json", tmp_path / "r3", "--quiet") == 3
    err = _err(capsys)
    assert "the results differ from the recorded run: 1 of 2 rows; first: 00_test grade" in err
    # the column named is the table's first that differs, not the alphabet's (campaign 35a F3)
    row = doctored["items"][0]
    later = [c for c in list(row)[list(row).index("grade") + 1:] if c < "grade" and isinstance(row[c], (int, float)) and not isinstance(row[c], bool)]
    assert later, list(row)
    row[later[0]] = row[later[0]] + 1
    (tmp_path / "m1.json").write_text(json.dumps(doctored))
    assert run("run", "--replay", tmp_path / "m1.json", tmp_path / "r3b", "--quiet") == 3
    assert "first: 00_test grade" in _err(capsys)
    # the ground truth changed since the run: refused before any work (was: other f1_gt figures, exit 0)
    mask = truth / "00_manual1.png"
    Image.fromarray(255 - np.asarray(Image.open(mask))).save(mask)
    assert run("run", "--replay", copy, tmp_path / "r4", "--quiet") == 2
    assert "ground-truth image '00_manual1'" in _err(capsys) and not (tmp_path / "r4").exists()


def test_run_records_weights_given_as_a_relative_file_by_absolute_path(photos, tmp_path, tiny, monkeypatch):  # noqa: F811
    shutil.copy(tiny["imff_tiny"], tmp_path / "mine.pt")
    monkeypatch.chdir(tmp_path)
    assert run("run", photos, tmp_path / "o", "--steps", "segment", "--segment-weights", "mine.pt", "--segment-arch", "imff_tiny",
               "--device", "cpu", "--quiet", "--thumbnail", "64") == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["config"]["segment_weights"] == str(tmp_path / "mine.pt")
    monkeypatch.chdir(photos)  # replay from another working folder (was: 'weights not found: mine.pt', exit 1)
    assert run("run", "--replay", tmp_path / "o", tmp_path / "again", "--quiet") == 0
