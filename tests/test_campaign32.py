"""Campaign 32b (``fundus evaluate`` with odd inputs, ``scripts/*.py``) and the CI failure of the last stop:
each test fails on the code before its mend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import cv2
import numpy as np
import pytest

from fundus_pipeline.errors import UsageError
from fundus_pipeline.evaluation.segment import evaluate_segmentation

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def _script(*argv, cwd: Path | None = None, data: str = "/nonexistent", timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "FUNDUS_DATA": data, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPTS / argv[0]), *map(str, argv[1:])], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def _maps(folder: Path, name: str, arr: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    path.write_bytes(buf.tobytes())  # (cv2.imwrite would not take a decomposed name on every platform)
    return path


def _truth(h: int = 48, w: int = 48) -> np.ndarray:
    gt = np.zeros((h, w), np.uint8)
    gt[10:14, :] = 255
    gt[:, 30:33] = 255
    return gt


def test_evaluate_pairs_names_written_composed_and_decomposed(tmp_path):
    """32b F7: a prediction named ``café.png`` composed (NFC) and its ground truth named decomposed (NFD, as macOS
    writes it) did not pair: "unpaired: no ground truth" with the ground truth's name looking the same."""
    gt = _truth()
    _maps(tmp_path / "pred", unicodedata.normalize("NFC", "café.png"), gt)
    _maps(tmp_path / "gt", unicodedata.normalize("NFD", "café.png"), gt)
    r = evaluate_segmentation(tmp_path / "pred", tmp_path / "gt", n_boot=0)
    assert r.n_problems == 0 and r.summary["n_images"] == 1, r.summary["problems"]
    assert r.summary["pooled"]["f1"] == pytest.approx(1.0)


def test_a_threshold_given_for_predictions_read_as_masks_is_said_not_to_apply(tmp_path):
    """32b F8: a map of two levels {0, 100} at ``--threshold 0.9`` was read as a binary mask (every 100 a vessel), F1
    1.0, and the header said "threshold 0.9 (option)" with no word that it had not been applied."""
    gt = _truth()
    _maps(tmp_path / "pred", "a.png", np.where(gt > 0, 100, 0).astype(np.uint8))
    _maps(tmp_path / "gt", "a.png", gt)
    r = evaluate_segmentation(tmp_path / "pred", tmp_path / "gt", threshold=0.9, n_boot=0)
    assert any("read as binary masks" in n and "--threshold 0.9 does not apply" in n for n in r.notes), r.notes
    assert r.summary["threshold_not_applied"] == {"n": 1, "keys": ["a"]}  # in the reports too (33b F1)
    from fundus_pipeline.evaluation.segment import summary_markdown

    assert "not applied to 1 prediction(s) read as binary masks" in summary_markdown(r.summary)
    r = evaluate_segmentation(tmp_path / "pred", tmp_path / "gt", n_boot=0)  # no option given: nothing to say
    assert not any("binary masks" in n for n in r.notes) and "threshold_not_applied" not in r.summary, r.notes


def test_a_weights_folder_named_by_fundus_weights_without_a_manifest_says_what_it_must_be(tmp_path, monkeypatch):
    """33b F2: FUNDUS_WEIGHTS set to the checkout (not its weights/) was told to "set FUNDUS_WEIGHTS to that folder"."""
    from fundus_pipeline.models.weights import no_weights_folder

    monkeypatch.setenv("FUNDUS_WEIGHTS", str(tmp_path))
    assert no_weights_folder().endswith("holds no manifest.json; FUNDUS_WEIGHTS must name the weights/ folder of a checkout of fundus")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "manifest.json").write_text("{}")
    assert "(the checkout's weights/ folder is inside it)" in no_weights_folder()
    monkeypatch.setenv("FUNDUS_WEIGHTS", str(tmp_path / "missing"))
    assert "(the folder FUNDUS_WEIGHTS names) does not exist;" in no_weights_folder()


def test_a_folder_another_stage_wrote_is_not_taken_for_vessel_predictions(tmp_path):
    """32b F9: an enhance folder's photographs scored as vessel probability maps (F1 0.23, exit 0, no warning)."""
    from fundus_pipeline.config import DegradeConfig
    from fundus_pipeline.stages.degrade import DegradeStage
    from fundus_pipeline.runner import run_stage
    from tests.conftest import synthetic_fundus

    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), synthetic_fundus(96, 96)[..., ::-1])
    run_stage(DegradeStage(DegradeConfig(seed=1)), tmp_path / "in", tmp_path / "deg", progress=False)
    _maps(tmp_path / "gt", "a.png", _truth(96, 96))
    with pytest.raises(UsageError, match="holds the outputs of fundus degrade"):
        evaluate_segmentation(tmp_path / "deg", tmp_path / "gt", n_boot=0)


def test_an_inverted_ground_truth_is_noted(tmp_path):
    """32b F11: a ground truth with the vessels black on white (82% of the FOV "vessel") was scored without a word."""
    gt = _truth()
    _maps(tmp_path / "pred", "a.png", gt)
    _maps(tmp_path / "gt", "a.png", 255 - gt)
    r = evaluate_segmentation(tmp_path / "pred", tmp_path / "gt", n_boot=0)
    assert any("more than half of the FOV as vessel" in n and "a: " in n for n in r.notes), r.notes
    r = evaluate_segmentation(tmp_path / "pred", tmp_path / "pred", n_boot=0)
    assert not any("more than half" in n for n in r.notes), r.notes


def test_the_enhancement_benchmark_summary_does_not_depend_on_the_order_it_was_scored_in():
    """32b F1: the summary's datasets came in the order of the command that last rewrote it (hrf, authors, drive after
    a --datasets hrf run; drive, authors, hrf after a drive run): the committed files changed with equal values."""
    from fundus_pipeline.evaluation.enhance_bench import markdown, summarise

    rows = {}
    for p in sorted((ROOT / "docs" / "enhance_benchmark" / "rows").glob("*.json")):
        m, ds = p.stem.split("__")
        rows[(m, ds)] = json.loads(p.read_text())
    backwards = dict(reversed(list(rows.items())))
    drive_first = dict(sorted(rows.items(), key=lambda kv: kv[0][1] != "drive"))
    committed = (ROOT / "docs" / "enhance_benchmark" / "summary.json").read_text()
    for order in (rows, backwards, drive_first):
        s = summarise(order)
        assert json.dumps(s, indent=1) + "\n" == committed
        assert markdown(s) + "\n" == (ROOT / "docs" / "enhance_benchmark" / "summary.md").read_text()


def test_the_enhancement_benchmark_refuses_a_missing_bench_before_it_rewrites_the_summaries(tmp_path):
    """32b F1: with every row cached, a BENCH that does not exist rewrote the committed summaries, exit 0."""
    rows = tmp_path / "out" / "rows"
    rows.mkdir(parents=True)
    src = ROOT / "docs" / "enhance_benchmark" / "rows" / "identity__drive.json"
    (rows / src.name).write_bytes(src.read_bytes())
    r = _script("enhance_benchmark.py", tmp_path / "nonexistent", "--methods", "identity", "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.startswith("Error: BENCH ") and "Traceback" not in r.stderr, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rows"]


@pytest.mark.parametrize("name", ["sheet.jpg", "folder.png"])
def test_the_contact_sheet_refuses_an_output_it_cannot_write_before_the_work(tmp_path, name):
    """32b F3: --out a folder or another suffix ended in OpenCV's traceback after the figure was computed."""
    if name == "folder.png":
        (tmp_path / name).mkdir()
    r = _script("contact_sheet.py", "--out", tmp_path / name, data="/work/does-not-matter")
    assert r.returncode == 2 and r.stderr.startswith("Error: --out ") and "Traceback" not in r.stderr, r.stderr


def test_the_contact_sheet_reads_the_data_root_every_script_reads(tmp_path):
    """32b F2: the contact sheet ignored $FUNDUS_DATA (it read an undocumented $FUNDUS_DATA_COFENET) and went on with
    ../shared/data, rewriting the committed figure."""
    r = _script("contact_sheet.py", "--out", tmp_path / "sheet.png", data=str(tmp_path / "data"))
    assert r.returncode == 2 and f"--data {tmp_path / 'data' / 'CofeNet'} holds 0 clean pictures" in r.stderr, r.stderr
    assert not (tmp_path / "sheet.png").exists()


def test_the_disc_locator_check_finds_the_data_root_and_the_shipped_segmenter_from_any_folder(tmp_path):
    """32b F4: from another working folder it said "weights/imff.pt: No such file or directory"; with $FUNDUS_DATA
    set it read ../shared/data all the same."""
    r = _script("check_disc_locator.py", "--cache", tmp_path / "c.npz", cwd=tmp_path)
    assert r.returncode != 0 and "/nonexistent/" in r.stderr and "imff" not in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 2, r.stderr


def test_the_eyepacs_split_script_takes_help_and_refuses_an_unknown_option(tmp_path):
    """32b F5: --help and --bogus printed the 1,434-line CSV, exit 0."""
    r = _script("eyepacs256_split.py", "--bogus")
    assert r.returncode == 2 and r.stdout == "" and "unrecognized arguments: --bogus" in r.stderr, (r.stdout[:200], r.stderr)
    r = _script("eyepacs256_split.py", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage:") and "image,patient" not in r.stdout


@pytest.mark.parametrize("argv", [["evaluate_test_splits.py", "--weights", "imff", "--out", "{tmp}/results"],
                                  ["enhance_real.py", "{tmp}/work", "--sheet", "{tmp}/s.jpg", "--json", "{tmp}/s.json"]])
def test_figure_scripts_say_in_one_line_which_datasets_the_data_root_lacks(tmp_path, argv):
    """32b F6: they started, and ended in two lines (the failing command's error, then "command failed (2)"), exit 1."""
    r = _script(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert r.returncode == 2 and r.stderr.startswith("Error: dataset root /nonexistent lacks ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


def _toy_cfg(out, **kw):
    """A toy training of 5 steps whose first last.pt comes at step 4."""
    from fundus_pipeline.train.config import TrainConfig

    return TrainConfig(out=out, steps=5, batch_size=4, lr=1e-2, seed=5, val_every=2, ckpt_every=4, **kw)


def _stopped_at_step_1(monkeypatch, task_cls, cfg) -> None:
    """``task_cls(cfg)`` trained and stopped by a Ctrl-C at step 1, before its first last.pt."""
    from fundus_pipeline.train.loop import fit
    from tests.test_train_segment import _ToySampler

    real = _ToySampler.batch

    def interrupt(self, step):
        if step == 1:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(_ToySampler, "batch", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit(task_cls(cfg), cfg)
    monkeypatch.setattr(_ToySampler, "batch", real)


def test_a_training_interrupted_before_its_first_checkpoint_is_started_again_by_resume(tmp_path, monkeypatch):
    """32a F2: a training stopped before its first last.pt exited 130, and its rerun with --resume (what a wrapper
    does after exit 130) was refused: "--resume: OUT/last.pt does not exist (start without --resume)", exit 2. It
    now starts again from step 0 and ends with the weights of an uninterrupted run; a folder where no run of fundus
    started is still refused."""
    import torch
    from pydantic import ValidationError

    from fundus_pipeline.train.loop import fit
    from tests.test_train_segment import _ToyTask

    cfg = _toy_cfg

    class _PretrainedTask(_ToyTask):
        def build_model(self):  # as the enhance and score trainers start their pretrained parts (--rsa-init, --cnn-init)
            model = super().build_model()
            if not self.cfg.resume:
                with torch.no_grad():
                    for q in model.parameters():
                        q.fill_(0.05)
            return model

    fit(_PretrainedTask(cfg(tmp_path / "a")), cfg(tmp_path / "a"))
    _stopped_at_step_1(monkeypatch, _PretrainedTask, cfg(tmp_path / "b"))
    assert not (tmp_path / "b" / "last.pt").exists()
    (tmp_path / "b" / ".summary.json.0123abcd.tmp").write_text("{")  # a kill -9 in an atomic write (33a F2)
    torch.manual_seed(12345)
    # 33a F1: the first version of this mend resumed with the task still told "resume": the pretrained parts were
    # left random, and the run ended with other weights under the same recorded command
    fit(_PretrainedTask(cfg(tmp_path / "b", resume=True)), cfg(tmp_path / "b", resume=True))
    assert "starting again from step 0" in (tmp_path / "b" / "train.log").read_text()
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not list((tmp_path / "b").glob(".*.tmp"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValidationError, match="last.pt does not exist"):
        cfg(tmp_path / "empty", resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "train.log").write_text("another tool's log\n")  # review 32 R32-3: no training of fundus
    with pytest.raises(ValidationError, match="last.pt does not exist"):
        cfg(tmp_path / "other", resume=True)


def _hang_up_mid_run(tmp_path, photos: int, side: int, command: list[str], first_output: str, ignored: bool):
    """``fundus COMMAND IN OUT`` over ``photos`` synthetic photographs, in a session of its own (SIGHUP ignored from
    its start when ``ignored``, as nohup starts it), sent SIGHUP as a group once ``first_output`` appears in OUT (a
    terminal closing: the workers get it too); returns the process, its stderr and OUT."""
    import signal
    import time

    from tests.conftest import synthetic_fundus

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(photos):
        cv2.imwrite(str(src / f"p{i:02d}.png"), synthetic_fundus(side, side, seed=i)[..., ::-1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", "from fundus_pipeline.console import main; main()", command[0], str(src), str(out), *command[1:]]
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=(lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN)) if ignored else None)
    end = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < end and not any(out.glob(first_output)):
        time.sleep(0.02)
    if p.poll() is not None or not any(out.glob(first_output)):  # (the signal must come while the workers run: R34-6)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.communicate(timeout=60)
        pytest.fail("the run ended, or wrote nothing within 240 s, before the signal could be sent")
    os.killpg(p.pid, signal.SIGHUP)
    _, err = p.communicate(timeout=300)
    return p, err, out


def test_a_command_started_with_sighup_ignored_is_not_ended_by_one(tmp_path):
    """32a F1: `nohup fundus ... &` ended with exit 130 when the terminal hung up: the command set its own SIGHUP
    handler over the ignored disposition nohup had given it (its worker processes set the default, which kills)."""
    p, err, out = _hang_up_mid_run(tmp_path, 24, 384, ["degrade", "--seed", "1", "--workers", "2", "--quiet"], "p*.png", ignored=True)
    assert p.returncode == 0, (p.returncode, err[-600:])
    assert len(list(out.glob("p*.png"))) == 24


def test_a_hang_up_sent_to_the_group_of_a_pooled_run_ends_it_without_tracebacks(tmp_path):
    """Review 32 R32-1: a SIGHUP to the process group (a terminal closing) killed multiprocessing's resource tracker
    (it ignores only SIGINT and SIGTERM); the one relaunched printed KeyError tracebacks for the pool's semaphores."""
    p, err, _ = _hang_up_mid_run(tmp_path, 6, 256, ["segment", "--workers", "2", "--threads", "1", "--quiet"], "p*_vessels.png", ignored=False)
    assert p.returncode == 130, (p.returncode, err[-600:])
    assert "Traceback" not in err and "KeyError" not in err and "resource_tracker" not in err, err[-1500:]


def test_two_names_that_differ_only_in_their_unicode_form_are_told_apart(tmp_path):
    """Review 32 R32-2: with names paired in their composed form, a folder holding café.png written both ways is
    refused, and the message had named two paths that print alike."""
    gt = _truth()
    _maps(tmp_path / "pred", unicodedata.normalize("NFC", "café.png"), gt)
    _maps(tmp_path / "pred", unicodedata.normalize("NFD", "café.png"), gt)
    _maps(tmp_path / "gt", "café.png", gt)
    with pytest.raises(UsageError, match="differ only in their Unicode form") as e:
        evaluate_segmentation(tmp_path / "pred", tmp_path / "gt", n_boot=0)
    assert "'caf\\xe9.png'" in str(e.value) and "'cafe\\u0301.png'" in str(e.value), str(e.value)


def test_a_fine_tune_interrupted_before_its_first_checkpoint_starts_again_from_its_init(tmp_path, monkeypatch):
    """34a F1: a fine-tune (--init W) stopped before its first last.pt and rerun with --resume (which cannot take
    --init) started again from a random start under the same folder. The options the run was started with are
    recorded before its data is prepared; the restart takes its --init from there and refuses other options."""
    import torch

    from fundus_pipeline.errors import UsageError as Usage
    from fundus_pipeline.train.loop import fit
    from tests.test_train_segment import _ToyNet, _ToyTask

    w = tmp_path / "w.pt"
    net = _ToyNet()
    with torch.no_grad():
        for q in net.parameters():
            q.fill_(0.03)
    torch.save(net.state_dict(), w)

    cfg = _toy_cfg

    fit(_ToyTask(cfg(tmp_path / "a", init=w)), cfg(tmp_path / "a", init=w))
    _stopped_at_step_1(monkeypatch, _ToyTask, cfg(tmp_path / "b", init=w))
    with pytest.raises(Usage, match="was written with --steps 5, not 6"):  # another deciding option: refused
        fit(_ToyTask(cfg(tmp_path / "b", resume=True).model_copy(update={"steps": 6})),
            cfg(tmp_path / "b", resume=True).model_copy(update={"steps": 6}))
    fit(_ToyTask(cfg(tmp_path / "b", resume=True)), cfg(tmp_path / "b", resume=True))
    assert f"(from --init {w}, as the run was started)" in (tmp_path / "b" / "train.log").read_text()
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert json.loads(b["config"])["init"] == str(w)


def test_a_shipped_weights_name_and_its_file_are_the_same_option_on_resume():
    """34a F2: --vit-init /path/weights/vit_fundus.pt was refused on resume against the recorded vit_fundus."""
    from fundus_pipeline.models.weights import resolve_weights
    from fundus_pipeline.train.loop import _same_option

    path = str(resolve_weights("vit_fundus"))
    assert _same_option("vit_init", "vit_fundus", path) and _same_option("cnn_init", "imff", str(resolve_weights("imff")))
    assert not _same_option("vit_init", "vit_fundus", str(resolve_weights("imff")))
    assert not _same_option("seed", 1, 2)


def test_a_folder_a_fundus_process_is_still_writing_is_not_evaluated(tmp_path):
    """34b F1: `fundus evaluate segment OUT/segment` while `fundus run` wrote it scored the photographs done so far at
    the default threshold 0.5 (the run's manifest, with its 0.689, not yet written), exit 0."""
    import fcntl

    from fundus_pipeline.evaluation.grade import evaluate_grades
    from fundus_pipeline.runner import JOURNAL, LOCK

    gt = _truth()
    _maps(tmp_path / "pred", "a_prob.png", gt)
    _maps(tmp_path / "gt", "a.png", gt)
    (tmp_path / "pred" / "results.csv").write_text("key,grade\n")
    fd = os.open(tmp_path / "pred" / LOCK, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running stage holds it
        with pytest.raises(UsageError, match="is being written by another fundus process"):
            evaluate_segmentation(tmp_path / "pred", tmp_path / "gt", n_boot=0)
        with pytest.raises(UsageError, match="is being written by another fundus process"):
            evaluate_grades(tmp_path / "pred" / "results.csv", tmp_path / "labels.csv")
    finally:
        os.close(fd)
    (tmp_path / "pred" / JOURNAL).write_text("")  # a run killed before its first manifest
    with pytest.raises(UsageError, match="stopped before writing its manifest.json"):
        evaluate_segmentation(tmp_path / "pred", tmp_path / "gt", n_boot=0)
    (tmp_path / "pred" / JOURNAL).unlink()
    assert evaluate_segmentation(tmp_path / "pred", tmp_path / "gt", n_boot=0).summary["n_images"] == 1  # the lock file alone: a run that ended


def test_a_sub_folder_of_a_folder_being_written_is_refused_and_a_lock_of_ones_own_is_not(tmp_path):
    """Review 33 R33-3: a sub-folder of a stage folder being written (nested outputs) was evaluated; R33-4: the Python
    API was refused on a folder whose lock the calling process itself holds ("another fundus process")."""
    import fcntl

    from fundus_pipeline.runner import LOCK, OutputLock

    gt = _truth()
    _maps(tmp_path / "seg" / "sub", "a_prob.png", gt)
    _maps(tmp_path / "gt", "a.png", gt)
    fd = os.open(tmp_path / "seg" / LOCK, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match=r"sub \(inside .*seg\) is being written by another fundus process"):
            evaluate_segmentation(tmp_path / "seg" / "sub", tmp_path / "gt", n_boot=0)
    finally:
        os.close(fd)
    with OutputLock(tmp_path / "seg", tmp_path / "seg"):  # this process's own
        assert evaluate_segmentation(tmp_path / "seg" / "sub", tmp_path / "gt", n_boot=0).summary["n_images"] == 1


def test_a_file_size_limit_is_met_as_a_full_disk(tmp_path):
    """34b F2: under `ulimit -f` an output that could not be written was a plain error (no hint; each photograph an
    error row in turn, then the manifest): it is a DiskFullError, which stops the run with the hint to rerun."""
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
            "from fundus_pipeline.errors import DiskFullError\n"
            "from fundus_pipeline.io import write_bytes_atomic\n"
            "try:\n"
            "    write_bytes_atomic(__import__('pathlib').Path(sys.argv[1]), b'x' * 10000)\n"
            "except DiskFullError as e:\n"
            "    print(e.message, '|', e.hint)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.bin")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "File too large" in r.stdout and "ulimit -f" in r.stdout, (r.stdout, r.stderr[-500:])
    assert list(tmp_path.iterdir()) == []  # nothing under the final name, no temporary left


def test_the_start_record_names_the_init_file_itself_and_survives_a_refused_rerun(tmp_path, monkeypatch):
    """Review 33 R33-1: a relative --init was recorded as typed: a restart from another working folder read another
    file of that name (and one changed in place was used in silence). R33-2: a rerun refused before training (an
    --init that does not fit) left its own options as the record, and the interrupted run could no longer restart."""
    import torch

    from fundus_pipeline.errors import FundusError as Fatal
    from fundus_pipeline.train.loop import fit
    from tests.test_train_segment import _ToyNet, _ToyTask

    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    for d, value in ((d1, 0.03), (d2, 0.07)):
        d.mkdir()
        net = _ToyNet()
        with torch.no_grad():
            for q in net.parameters():
                q.fill_(value)
        torch.save(net.state_dict(), d / "w.pt")
    torch.save({"other.weight": torch.zeros(3)}, d1 / "bad.pt")

    cfg = _toy_cfg

    monkeypatch.chdir(d1)
    fit(_ToyTask(cfg(tmp_path / "a", init=Path("w.pt"))), cfg(tmp_path / "a", init=Path("w.pt")))
    _stopped_at_step_1(monkeypatch, _ToyTask, cfg(tmp_path / "b", init=Path("w.pt")))
    record = (tmp_path / "b" / ".fundus-train-start.json").read_bytes()
    with pytest.raises(Fatal):  # R33-2: another run, refused before its first step
        other = cfg(tmp_path / "b", init=Path("bad.pt")).model_copy(update={"lr": 2e-3})
        fit(_ToyTask(other), other)
    assert (tmp_path / "b" / ".fundus-train-start.json").read_bytes() == record
    monkeypatch.chdir(d2)  # R33-1: another working folder, another w.pt there
    fit(_ToyTask(cfg(tmp_path / "b", resume=True)), cfg(tmp_path / "b", resume=True))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # R34-5: the run's lasting provenance names the file itself too, interrupted or not (the uninterrupted run's
    # summary.json and checkpoints had recorded "w.pt" as typed, the restarted run's the absolute path)
    for run in (tmp_path / "a", tmp_path / "b"):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["config"]["init"] == str(d1 / "w.pt"), run
        assert summary["argv"][summary["argv"].index("--init") + 1] == str(d1 / "w.pt"), run
        assert json.loads(torch.load(run / "last.pt", weights_only=True)["config"])["init"] == str(d1 / "w.pt"), run
    # a restart whose --init file changed since is refused
    (tmp_path / "c").mkdir()
    monkeypatch.chdir(d1)
    _stopped_at_step_1(monkeypatch, _ToyTask, cfg(tmp_path / "c", init=Path("w.pt")))
    (d1 / "w.pt").write_bytes((d2 / "w.pt").read_bytes())
    with pytest.raises(Fatal, match="has changed since the run was started") as e:  # weights not the run's: exit 1
        fit(_ToyTask(cfg(tmp_path / "c", resume=True)), cfg(tmp_path / "c", resume=True))
    assert e.value.exit_code == 1


def test_a_folder_given_through_dot_dot_is_checked_against_its_own_parents(tmp_path, monkeypatch):
    """Review 34 R34-1: `../preds` typed inside a stage folder that stopped before its manifest was refused: the
    walk up to the nearest lock went through the path as typed (the working folder), not the folder's parents."""
    from fundus_pipeline.runner import JOURNAL, LOCK, refuse_while_written

    stage, elsewhere = tmp_path / "stage", tmp_path / "elsewhere"
    stage.mkdir()
    elsewhere.mkdir()
    (stage / LOCK).write_text("")
    (stage / JOURNAL).write_text("")
    monkeypatch.chdir(stage)
    refuse_while_written(Path("..") / "elsewhere", "PRED_DIR")  # not inside the stage folder: nothing to refuse
    (elsewhere / "sub").symlink_to(stage)
    with pytest.raises(UsageError, match="stopped before writing its manifest.json"):  # a link into it: its own folder
        refuse_while_written(elsewhere / "sub", "PRED_DIR")


def test_a_checkpoint_cut_by_a_file_size_limit_says_so(tmp_path):
    """Review 33 R33-5: a checkpoint that a file-size limit cut was reported as a full disk, "62011.3 MiB free"."""
    code = ("import resource, sys, torch\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
            "from fundus_pipeline.errors import FundusError\n"
            "from fundus_pipeline.train.loop import save_atomic\n"
            "try:\n"
            "    save_atomic({'w': torch.zeros(100000)}, __import__('pathlib').Path(sys.argv[1]))\n"
            "except FundusError as e:\n"
            "    print(e.message, '|', e.hint)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "last.pt")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert "file-size limit" in r.stdout and "raise the file-size limit" in r.stdout, (r.stdout, r.stderr[-500:])
    assert not (tmp_path / "last.pt").exists()
