"""Campaign 10a (can a user trust `fundus train`?, runs/campaign10a.md): resume with other options, damaged
checkpoints, interrupts, unreadable set rows, leftovers. Each test fails on the code before its mend."""

from __future__ import annotations

import csv
import fcntl
import json
import shutil
from pathlib import Path

import pytest
import torch

from fundus_pipeline.errors import WeightsError
from fundus_pipeline.runner import LOCK
from fundus_pipeline.train import segment as trainer
from tests.test_grade import _train as _train_grade
from tests.test_grade import grade_set  # noqa: F401  (a fixture)
from tests.test_refusals import _err
from tests.test_train_segment import _args, _train


def _interrupted_at_step_2(monkeypatch, *args: str) -> None:
    """``fundus train segment ARGS`` interrupted (Ctrl-C) as it starts step 2."""
    real = trainer.PatchSampler.batch

    def interrupt_at_step_2(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(trainer.PatchSampler, "batch", interrupt_at_step_2)
    assert _train(*args) == 130
    monkeypatch.setattr(trainer.PatchSampler, "batch", real)


@pytest.fixture()
def stopped(fake_data, tmp_path, monkeypatch) -> Path:
    """A segment run interrupted at step 2 (last.pt at step 2, of 4)."""
    out = tmp_path / "run"
    _interrupted_at_step_2(monkeypatch, *_args(fake_data, out))
    return out


# D1: a resume with other options or other data trained on (exit 0), a note in the log the only trace
@pytest.mark.parametrize("extra, option", [(["--seed", "1"], "--seed"), (["--lr", "0.3"], "--lr"), (["--steps", "6"], "--steps"),
                                           (["--patch", "48"], "--patch"), (["--arch", "msrf_tiny"], "--arch")])
def test_a_resume_with_other_options_is_refused(stopped, fake_data, capsys, extra, option):
    before = (stopped / "last.pt").read_bytes()
    capsys.readouterr()
    assert _train(*_args(fake_data, stopped, "--resume", *extra)) == 2  # --arch: was an internal error, exit 1
    err = _err(capsys)
    assert f"was written with {option} " in err and "a resumed run keeps its options" in err
    assert (stopped / "last.pt").read_bytes() == before


def test_a_resume_on_other_data_is_refused_and_where_it_runs_may_change(stopped, fake_data, tmp_path, capsys, monkeypatch):
    other = tmp_path / "data2"
    shutil.copytree(fake_data, other)
    capsys.readouterr()
    assert _train(*_args(other, stopped, "--resume")) == 2  # was: trained on the other images, exit 0
    assert "was written with --data" in _err(capsys)
    moved = tmp_path / "moved"
    shutil.move(stopped, moved)  # the folder moved, another thread count and checkpoint interval: accepted
    assert _train(*_args(fake_data, moved, "--resume", "--threads", "2", "--ckpt-every", "3")) == 0
    assert torch.load(moved / "last.pt", map_location="cpu", weights_only=True)["step"] == 4


# D3: Ctrl-C of a training ended with exit 130 and not a word
def test_an_interrupted_training_says_so(fake_data, tmp_path, capsys, monkeypatch):
    def interrupt(self, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.PatchSampler, "batch", interrupt)
    capsys.readouterr()
    assert _train(*_args(fake_data, tmp_path / "r")) == 130
    err = capsys.readouterr().err
    assert "Error: interrupted" in err and "interrupted; no last.pt was written yet" in err


# D4: a run killed after its first best.pt and before its first last.pt could be neither resumed nor restarted
def test_a_run_with_a_best_pt_is_always_resumable(fake_data, tmp_path, monkeypatch):
    out = tmp_path / "r"
    args = _args(fake_data, out, "--val-every", "1", "--ckpt-every", "3")
    _interrupted_at_step_2(monkeypatch, *args)
    assert (out / "best.pt").exists() and (out / "last.pt").exists()  # was: best.pt alone
    assert _train(*args, "--resume") == 0


# D5: a damaged last.pt: an internal error, "interrupted" (an empty file), or training on NaN weights (exit 0)
@pytest.mark.parametrize("damage", ["empty", "truncated", "nan"])
def test_a_damaged_checkpoint_is_one_line_exit_1(stopped, fake_data, capsys, damage):
    last = stopped / "last.pt"
    if damage == "empty":
        last.write_bytes(b"")
    elif damage == "truncated":
        last.write_bytes(last.read_bytes()[:2000])
    else:
        ck = torch.load(last, map_location="cpu", weights_only=True)
        k = next(k for k, v in ck["model"].items() if v.is_floating_point())
        ck["model"][k] = torch.full_like(ck["model"][k], float("nan"))
        torch.save(ck, last)
    capsys.readouterr()
    assert _train(*_args(fake_data, stopped, "--resume")) == 1
    err = _err(capsys)
    assert ("not a readable checkpoint" if damage != "nan" else "holds NaN or infinite values") in err and "interrupted" not in err


def test_a_diverging_run_stops_instead_of_saving_nan_weights(fake_data, tmp_path, capsys, monkeypatch):
    real = trainer.SegmentTask.loss

    def diverged(self, out, batch):
        loss = real(self, out, batch)
        return loss * float("nan") if self_step[0] >= 2 else loss

    self_step = [0]
    real_batch = trainer.PatchSampler.batch

    def count(self, step):
        self_step[0] = step
        return real_batch(self, step)

    monkeypatch.setattr(trainer.SegmentTask, "loss", diverged)
    monkeypatch.setattr(trainer.PatchSampler, "batch", count)
    out = tmp_path / "r"
    capsys.readouterr()
    assert _train(*_args(fake_data, out)) == 1  # was: exit 0 with NaN weights in best.pt and last.pt
    assert "the training loss is nan at step 3: the run diverged" in _err(capsys)
    ck = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


# D9: the temporary folder of a save cut short by kill -9 stayed for good
def test_a_save_cut_short_is_swept_on_resume(stopped, fake_data):
    leftover = stopped / ".last.pt.abc12345"
    leftover.mkdir()
    (leftover / "last.pt").write_bytes(b"PK partial")
    assert _train(*_args(fake_data, stopped, "--resume")) == 0
    assert not leftover.exists()


# two trainings into one folder were interleaved
def test_a_second_training_into_a_running_ones_folder_is_refused(stopped, fake_data, capsys):
    fd = open(stopped / LOCK, "a")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first training, still running
        capsys.readouterr()
        assert _train(*_args(fake_data, stopped, "--resume")) == 2
        assert "another fundus run is writing to" in _err(capsys)
    finally:
        fd.close()


# D6, D7: a grade set's unreadable rows were internal errors; a set without a train part trained on EyePACS alone
@pytest.mark.parametrize("column, value", [("quality", "x"), ("quality", "7"), ("flag_blur", "")])
def test_a_grade_sets_bad_row_is_named(grade_set, fake_data, tmp_path, capsys, column, value):  # noqa: F811
    gs = tmp_path / "gs"
    shutil.copytree(grade_set, gs)
    with open(gs / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[0][column] = value
    with open(gs / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    capsys.readouterr()
    assert _train_grade(gs, fake_data, tmp_path / "o") == 2
    assert "labels.csv line 2: not a grade set's row" in _err(capsys)
    assert not (tmp_path / "o").exists()  # nothing left behind (was: OUT/train.log)
    for r in rows:
        r["split"] = "test"
    with open(gs / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert _train_grade(gs, fake_data, tmp_path / "o") == 2
    assert "has no train rows" in _err(capsys)


# D8: --cnn-init weights of another width were an internal error
def test_cnn_init_of_another_width_is_one_line():
    from fundus_pipeline.models.registry import build_model
    from fundus_pipeline.train.score import load_streams

    with pytest.raises(WeightsError, match="--cnn-init .*do not fit"):
        load_streams(build_model("sdmp_tiny"), "imff", None)


# D11: --out (or --cache) inside the dataset root wrote into the data
def test_an_out_inside_the_dataset_root_is_refused(fake_data, tmp_path, capsys):
    capsys.readouterr()
    assert _train(*_args(fake_data, fake_data / "DRIVE" / "training" / "run1")) == 2
    assert "lies inside the dataset root" in _err(capsys) and not (fake_data / "DRIVE" / "training" / "run1").exists()


# D12, D13: an --out that cannot be made was an internal error; --steps had no bound
def test_an_out_that_cannot_be_made_and_an_absurd_step_count(fake_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    capsys.readouterr()
    assert _train(*_args(fake_data, blocker / "sub")) == 1
    assert "cannot create --out" in _err(capsys)
    assert _train(*_args(fake_data, tmp_path / "r", "--steps", "99999999999999999999")) == 2
    assert "--steps" in _err(capsys)


# D14: the torch RNG state of an enhance run depended on whether its sources cache already existed
def test_building_the_frozen_segmenter_leaves_the_rng_alone():
    from fundus_pipeline.train.enhance import frozen_segmenter

    torch.manual_seed(0)
    before = torch.get_rng_state()
    frozen_segmenter(torch.device("cpu"))
    assert torch.equal(before, torch.get_rng_state())


# Review 10c of these mends
def test_a_resume_on_another_thread_count_says_it_is_not_bit_for_bit(stopped, fake_data):
    assert _train(*_args(fake_data, stopped, "--resume", "--threads", "2")) == 0
    assert "continues on 2: not bit for bit the uninterrupted run" in (stopped / "train.log").read_text()


def test_a_full_disk_at_a_checkpoint_is_one_line_with_the_resume_hint(fake_data, tmp_path, capsys, monkeypatch):
    from fundus_pipeline.train import loop

    real = loop.torch.save

    def full(obj, path, *a, **k):
        if Path(path).name == "last.pt":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(loop.torch, "save", full)
    capsys.readouterr()
    assert _train(*_args(fake_data, tmp_path / "r")) == 1  # was: an internal error
    err = _err(capsys)
    # the run never wrote a last.pt, so the hint says to start again (11b F3: it said --resume, which is refused)
    assert "cannot write" in err and "last.pt" in err and "Hint: free space, then start the run again" in err
    assert (tmp_path / "r" / "train.log").exists()  # a run that trained keeps its log


def test_a_grade_set_given_by_another_spelling_resumes_and_a_rebuilt_one_is_refused(grade_set, fake_data, tmp_path, capsys, monkeypatch):  # noqa: F811
    from fundus_pipeline.train import grade as trainer_g

    gs = tmp_path / "gs"
    shutil.copytree(grade_set, gs)
    real = trainer_g.GradeSampler.batch

    def interrupted(out: Path) -> None:
        def interrupt(self, step):
            if step == 2:
                raise KeyboardInterrupt
            return real(self, step)

        monkeypatch.setattr(trainer_g.GradeSampler, "batch", interrupt)
        assert _train_grade(gs, fake_data, out) == 130
        monkeypatch.setattr(trainer_g.GradeSampler, "batch", real)

    interrupted(tmp_path / "o")
    monkeypatch.chdir(tmp_path)
    assert _train_grade(Path("gs"), fake_data, tmp_path / "o", "--resume") == 0  # relative now, absolute then (was: exit 2)
    interrupted(tmp_path / "o2")
    with open(gs / "labels.csv", "a") as f:
        f.write("\n")  # the set rebuilt or edited in place
    capsys.readouterr()
    assert _train_grade(gs, fake_data, tmp_path / "o2", "--resume") == 2  # was: trained on with the other set
    assert "was written with --grade-set whose labels.csv has changed since" in _err(capsys)


def test_a_run_killed_before_its_first_last_pt_can_start_again(fake_data, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "train.log").write_text("12:00:00 new best {}\n")  # killed while its first last.pt was written
    torch.save({}, out / "best.pt")
    assert _train(*_args(fake_data, out)) == 0  # was: refused ('pass --resume'), and --resume refused too
    alone = tmp_path / "a"
    alone.mkdir()
    torch.save({}, alone / "best.pt")  # a best.pt without a run's log: not fundus's to replace
    assert _train(*_args(fake_data, alone)) == 2


def test_non_finite_weights_after_a_finite_loss_are_never_checkpointed(fake_data, tmp_path, capsys, monkeypatch):
    real, calls = torch.optim.Adam.step, [0]

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls[0] += 1
        if calls[0] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    capsys.readouterr()
    assert _train(*_args(fake_data, tmp_path / "r")) == 1
    assert "the weights hold NaN or infinite values at step 2" in _err(capsys)
    assert torch.load(tmp_path / "r" / "last.pt", map_location="cpu", weights_only=True)["step"] == 1


def test_an_unreadable_sources_cache_is_prepared_again(fake_data, tmp_path):
    from fundus_pipeline.train.enhance import prepare_sources, resolve_segmenter

    cache = tmp_path / "src.npz"
    cache.write_bytes(b"")  # a kill while it was written, say
    lines = []
    sources = prepare_sources(fake_data, 64, resolve_segmenter(), cache, lines.append)  # was: EOFError, an internal error
    assert sources and any("cannot be read (EOFError); preparing again" in m for m in lines)


def test_a_resumed_fine_tune_is_recorded_with_its_init_and_amp_off_cuda_is_no_option(fake_data, tmp_path, monkeypatch):
    base = tmp_path / "base"
    assert _train(*_args(fake_data, base, "--steps", "1")) == 0
    out = tmp_path / "ft"
    _interrupted_at_step_2(monkeypatch, *_args(fake_data, out, "--init", str(base / "last.pt"), "--amp"))
    assert _train(*_args(fake_data, out, "--resume")) == 0  # without --amp: it had no effect on the CPU (was: exit 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["init"] == str(base / "last.pt") and "--init" in summary["argv"]  # was: lost on resume
