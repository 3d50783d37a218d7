"""Review 10b of the campaign-9 mends (runs/review10b.md): each test fails on the code it reviewed (e6ec6b4)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from PIL import Image

from fundus_pipeline import chain, runner
from fundus_pipeline.cli import main
from fundus_pipeline.config import RunConfig
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.runner import config_sha256
from tests.conftest import synthetic_fundus
from tests.test_refusals import _err
from tests.test_run import photos, tiny, tiny_args  # noqa: F401  (photos and tiny are fixtures)

ROOT = Path(__file__).parents[1]


def run(*args) -> int:
    return main([str(a) for a in args])


# F1: a replay into the recorded run's own folder compared the new manifest with itself ("identical", exit 0)
def test_a_replay_into_the_recorded_runs_folder_is_refused(photos, tmp_path, tiny, capsys):  # noqa: F811
    x = tmp_path / "x"
    assert run("run", photos, x, *tiny_args(tiny, "--steps", "segment")) == 0
    before = (x / "manifest.json").read_bytes()
    for target, flag in ((x, "--overwrite"), (x / "manifest.json", "--resume")):
        capsys.readouterr()
        assert run("run", "--replay", target, x, flag, "--quiet") == 2
        assert "is the folder of the recorded run" in _err(capsys)
    assert (x / "manifest.json").read_bytes() == before


def test_a_replay_compares_with_the_rows_recorded_when_it_started(photos, tmp_path, tiny, monkeypatch, capsys):  # noqa: F811
    x = tmp_path / "x"
    assert run("run", photos, x, *tiny_args(tiny, "--steps", "segment")) == 0
    m = json.loads((x / "manifest.json").read_text())
    assert list(chain.manifest_items(x / "manifest.json")) == m["items"]  # read a line at a time, the same rows
    copy = tmp_path / "m.json"
    m["items"][0]["vessel_fraction"] = 0.5
    copy.write_text(json.dumps(m))
    real = chain.Chain.run

    def and_then_edited(self):  # the recorded manifest changes while the replay runs
        result = real(self)
        copy.write_text(json.dumps({**m, "items": json.loads((self.out / "manifest.json").read_text())["items"]}))
        return result

    monkeypatch.setattr(chain.Chain, "run", and_then_edited)
    capsys.readouterr()
    assert run("run", "--replay", copy, tmp_path / "r", "--quiet") == 3  # the row recorded at the start differs
    assert "the results differ from the recorded run: 1 of 3 rows; first: p0" in _err(capsys)


# F2: a reader that has gone (`fundus models | head -1`) is not an error line
def test_a_closed_stdout_stays_silent():
    out = subprocess.run(["sh", "-c", f"'{sys.executable}' -m fundus_pipeline models | true"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.stderr == ""  # was: "Error: cannot write the command's output: Broken pipe"


# F3: only the failure that a low address-space limit gives is "out of memory", not any import error under a limit
def test_a_missing_module_under_an_address_space_limit_is_not_out_of_memory():
    script = textwrap.dedent("""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2**40, resource.getrlimit(resource.RLIMIT_AS)[1]))
        from fundus_pipeline.cli.app import _internal_error
        raise SystemExit(_internal_error(ModuleNotFoundError("No module named 'torch'")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 1 and out.stderr.startswith("Error: internal error: ModuleNotFoundError"), out.stderr
    from fundus_pipeline.errors import out_of_memory

    try:
        try:
            raise MemoryError
        except MemoryError as e:
            raise ImportError("DLL load failed") from e
    except ImportError as e:
        assert out_of_memory(e, starting=True)  # a MemoryError behind it still counts


# F4: fundus run --overwrite removed a stage folder that a running stage command holds
def test_run_overwrite_refuses_a_stage_folder_another_process_writes(photos, tmp_path, tiny, capsys):  # noqa: F811
    out = tmp_path / "out"
    args = tiny_args(tiny, "--steps", "segment")
    assert run("run", photos, out, *args) == 0
    fd = os.open(out / "segment" / runner.LOCK, os.O_RDWR)
    ino = os.fstat(fd).st_ino
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # `fundus segment x out/segment --resume` running
        capsys.readouterr()
        assert run("run", photos, out, *args, "--overwrite") == 2
        assert "another fundus command is writing to" in _err(capsys)
        assert os.stat(out / "segment" / runner.LOCK).st_ino == ino and (out / "segment" / "manifest.json").exists()
    finally:
        os.close(fd)
    assert run("run", photos, out, *args, "--overwrite") == 0


# F6: grade --sort-into's copies ran after the lock was released; a run's last step now holds it
def test_the_last_step_of_a_stage_command_runs_under_the_lock(tmp_path):
    from fundus_pipeline.config import DegradeConfig
    from fundus_pipeline.stages.degrade import DegradeStage

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(synthetic_fundus(48, 48, 0)).save(src / "p0.png")
    seen = []

    def after(result) -> None:
        fd = os.open(tmp_path / "o" / runner.LOCK, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            seen.append("free")
        except BlockingIOError:
            seen.append("held")
        finally:
            os.close(fd)

    runner.run_stage(DegradeStage(DegradeConfig.build(types="001", seed=0)), src, tmp_path / "o", progress=False, after=after)
    assert seen == ["held"]


# F7: a scratch folder in use is kept whatever its pid and age say (another container's pid means nothing here)
def test_a_scratch_folder_in_use_is_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout.strip()
    d = tmp_path / f"fundus-rows-{dead}-abc_1234"
    d.mkdir()
    (d / chain.ALIVE).write_text("")
    past = time.time() - 2 * chain.SCRATCH_STALE_S
    for p in (d / chain.ALIVE, d):
        os.utime(p, (past, past))
    fd = os.open(d / chain.ALIVE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # its process, seen from another pid namespace
        assert chain.sweep_scratch(tmp_path) == [] and d.exists()
    finally:
        os.close(fd)
    os.utime(d, (past, past))
    assert chain.sweep_scratch(tmp_path) == [d]
    with chain.scratch_dir("join") as name:  # fundus's own folders hold the lock while in use
        assert chain._in_use(Path(name))


# F13: a run recorded with a relative weights file (before weights were recorded absolute) resumes
def test_a_run_recorded_with_a_relative_weights_path_resumes(photos, tmp_path, tiny, monkeypatch):  # noqa: F811
    shutil.copy(tiny["imff_tiny"], tmp_path / "mine.pt")
    monkeypatch.chdir(tmp_path)
    args = ["run", photos, "o", "--steps", "segment", "--segment-weights", "mine.pt", "--segment-arch", "imff_tiny", "--device", "cpu",
            "--quiet", "--thumbnail", "64"]
    assert run(*args) == 0
    path = tmp_path / "o" / "manifest.json"
    m = json.loads(path.read_text())
    m["config"]["segment_weights"] = "mine.pt"  # as the earlier version recorded it, with its hash
    m["run_sha256"] = config_sha256({"config": RunConfig.model_validate(m["config"]).chain_record(), "weights": {
        step: {k: v for k, v in w.items()} for step, w in m["weights"].items()}})
    path.write_text(json.dumps(m))
    assert run(*args, "--resume") == 0  # was: "written by a run with another configuration", exit 2
    torch.manual_seed(99)
    torch.save(build_model("imff_tiny").state_dict(), tmp_path / "mine.pt")  # other weights under the same name
    path.write_text(json.dumps(m))
    assert run(*args, "--resume") == 2  # refused: never resumed with other weights
