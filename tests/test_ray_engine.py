"""``--engine ray``: the same bytes as the local engine, a killed actor retried without losing or duplicating
a row, an image that kills every actor recorded as an error, and the usage errors. The Ray tests share one
local Ray instance of 2 CPUs (started once for the module) and are skipped when Ray is not installed."""

from __future__ import annotations

import csv
import faulthandler
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fundus_pipeline.cli import main
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.runner import JOURNAL, run_stage
from fundus_pipeline.stages.base import ItemOutput, Stage
from tests.conftest import synthetic_fundus


def run(*args) -> int:
    return main([str(a) for a in args])


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.png"))}


def _table(out: Path) -> list[dict]:
    """results.csv without the timing column (``seconds`` differs between any two runs)."""
    with open(out / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    for k in range(5):
        Image.fromarray(synthetic_fundus(96, 104, k)).save(d / f"p{k}.png")
    return d


# -------------------------------------------------------------------------- without Ray (run first: no Ray started yet)
def test_engine_ray_without_ray_installed_says_how_to_get_it(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    assert run("degrade", photos, tmp_path / "out", "--engine", "ray") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'fundus-pipeline[ray]'" in err[0], err
    assert not (tmp_path / "out").exists()
    assert run("run", photos, tmp_path / "chain", "--engine", "ray", "--steps", "segment") == 2
    assert "pip install 'fundus-pipeline[ray]'" in capsys.readouterr().err


def test_address_needs_engine_ray(photos, tmp_path, capsys):
    assert run("degrade", photos, tmp_path / "out", "--address", "127.0.0.1:6379") == 2
    assert "--address" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert run("run", photos, tmp_path / "chain", "--address", "auto", "--engine", "local") == 2
    assert "needs --engine ray" in capsys.readouterr().err


def test_a_cluster_that_cannot_be_reached_fails_before_any_work(photos, tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'fundus-pipeline[ray]')")
    import ray

    assert not ray.is_initialized()  # runs before the module's Ray instance starts (it would be used instead)
    assert run("degrade", photos, tmp_path / "out", "--engine", "ray", "--address", "127.0.0.1:1") == 1
    err = capsys.readouterr().err
    assert "cannot connect to the Ray cluster at 127.0.0.1:1" in err and not (tmp_path / "out").exists()


def test_engine_and_address_change_no_output_byte_of_a_chained_run():
    from fundus_pipeline.config import RunConfig

    assert RunConfig(engine="ray", address="head:6379", workers=4).chain_record() == RunConfig().chain_record()


def test_an_actor_refuses_weights_other_than_the_drivers(tmp_path):
    """On a cluster each actor loads the weights again on its node: other bytes there would change outputs
    silently, so the actor's setup fails instead (the run then exits 1 with one line)."""
    import dataclasses

    from fundus_pipeline.config import SegmentConfig
    from fundus_pipeline.ray_engine import _StageActor
    from fundus_pipeline.stages.segment import SegmentStage

    torch.manual_seed(0)
    weights = tmp_path / "imff_tiny.pt"
    torch.save(build_model("imff_tiny").state_dict(), weights)
    stage = SegmentStage(SegmentConfig.build(weights=str(weights), arch="imff_tiny", device="cpu"))
    import cv2

    threads = torch.get_num_threads(), cv2.getNumThreads()  # an actor sets them: restore this process's after
    try:
        _StageActor(stage, 1, str(tmp_path), os.getcwd())  # the same weights: accepted
        stage.spec, stage._model = dataclasses.replace(stage.spec, sha256="0" * 64), None  # the driver loaded other bytes
        with pytest.raises(RuntimeError, match="weights on this node .* are not the driver's"):
            _StageActor(stage, 1, str(tmp_path), os.getcwd())
    finally:
        torch.set_num_threads(threads[0])
        cv2.setNumThreads(threads[1])


# -------------------------------------------------------------------------------------------------- with Ray
@pytest.fixture(scope="module")
def ray_engine():
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'fundus-pipeline[ray]')")
    import ray.cloudpickle

    from fundus_pipeline.ray_engine import RayEngine

    # pytest imports this file as a top-level module that Ray's workers cannot import: ship its classes by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    engine = RayEngine(workers=2, num_cpus=2)
    engine.start()  # one local instance for the module; the commands below find it initialised and leave it running
    yield engine
    engine.close()


def test_degrade_on_ray_writes_the_bytes_of_the_local_engine(ray_engine, photos, tmp_path, capsys):
    assert run("degrade", photos, tmp_path / "local", "--seed", "3", "--workers", "2", "--quiet") == 0
    capsys.readouterr()
    assert run("degrade", photos, tmp_path / "ray", "--seed", "3", "--workers", "2", "--engine", "ray", "--format", "json") == 0
    summary = json.loads(capsys.readouterr().out)  # exactly one JSON document on stdout: no Ray banner or log line
    assert summary["counts"]["ok"] == 5 and summary["exit_code"] == 0
    assert len(_digests(tmp_path / "local")) == 5
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "local")
    assert _table(tmp_path / "ray") == _table(tmp_path / "local")


def test_a_torch_stage_in_batches_on_ray_writes_the_bytes_of_the_local_engine(ray_engine, photos, tmp_path):
    """enhance with --batch-size 2 over 5 photographs: Ray must form the local engine's batches ([p0 p1] [p2 p3]
    [p4]) for the same forward passes, hence the same bytes."""
    torch.manual_seed(0)
    weights = tmp_path / "cofe_tiny.pt"
    torch.save(build_model("cofe_tiny").state_dict(), weights)
    common = ("--weights", weights, "--arch", "cofe_tiny", "--device", "cpu", "--no-vessel-stats", "--batch-size", "2",
              "--workers", "2", "--threads", "1", "--quiet")
    assert run("enhance", photos, tmp_path / "local", *common) == 0
    assert run("enhance", photos, tmp_path / "ray", *common, "--engine", "ray") == 0
    assert len(_digests(tmp_path / "local")) == 5
    assert _digests(tmp_path / "ray") == _digests(tmp_path / "local")
    assert _table(tmp_path / "ray") == _table(tmp_path / "local")
    m = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert m["config_sha256"] == json.loads((tmp_path / "local" / "manifest.json").read_text())["config_sha256"]


class DyingStage(Stage):
    """Copies each image. Its process dies on a key ending in 'once' the first time only (a marker file
    remembers it: the retry succeeds), and on one ending in 'poison' every time (a stand-in for an image that
    crashes a decoder)."""

    name = "dying"
    fov_policy = "none"

    def __init__(self, marks: Path):
        self.marks = str(marks)

    def config_record(self) -> dict:
        return {"dying": 1}

    def compute(self, item):
        if item.key.endswith("poison"):
            os._exit(1)
        if item.key.endswith("once"):
            mark = Path(self.marks) / "once.died"
            if not mark.exists():
                mark.write_text(str(os.getpid()))
                os._exit(1)
        return ItemOutput({"": item.image.array})


def test_a_killed_actor_is_retried_and_no_row_is_lost_or_duplicated(ray_engine, tmp_path, monkeypatch):
    """Two tasks of three items (as a long listing is cut, ``MAX_BLOCKS``): the task with 'b_once' is retried
    whole; the one with 'e_poison' fails twice, so its three items go again one a task and only 'e_poison'
    fails."""
    import fundus_pipeline.ray_engine as ray_engine_module

    monkeypatch.setattr(ray_engine_module, "MAX_BLOCKS", 2)
    d = tmp_path / "in"
    d.mkdir()
    keys = ["a", "b_once", "c", "d", "e_poison", "f"]  # in key order: [a b_once c] [d e_poison f]
    for k, key in enumerate(keys):
        Image.fromarray(synthetic_fundus(48, 48, k)).save(d / f"{key}.png")
    marks = tmp_path / "marks"
    marks.mkdir()
    res = run_stage(DyingStage(marks), d, tmp_path / "out", workers=2, threads=1, progress=False, engine=ray_engine)
    assert (marks / "once.died").exists()  # an actor did die on 'b_once'
    assert res.exit_code == 3
    assert [f["key"] for f in res.failed] == ["e_poison"] and "worker process died" in res.failed[0]["error"]  # 'b_once' was retried
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(r["key"] for r in m["items"]) == sorted(keys)
    assert m["counts"]["ok"] == 5 and m["counts"]["error"] == 1
    journal = [json.loads(x)["key"] for x in (tmp_path / "out" / JOURNAL).read_text().splitlines()]
    assert sorted(journal) == sorted(keys)  # recorded once each, never twice
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [f"{k}.png" for k in sorted(keys) if k != "e_poison"]
    for k in ("b_once", "d", "f"):
        assert Image.open(tmp_path / "out" / f"{k}.png").tobytes() == Image.open(d / f"{k}.png").tobytes()


def test_an_error_of_the_driver_while_it_records_a_row_is_not_blamed_on_the_cluster(ray_engine, photos, tmp_path, monkeypatch, capsys):
    """Review 12, M3: a full disk met while an image is written stops the run with the free-space hint; on Ray
    the driver's own FundusError was rewrapped as "failed on the Ray cluster ... the Ray logs hold the traceback"."""
    from fundus_pipeline import runner
    from fundus_pipeline.errors import FundusError

    def full(self, row):
        raise FundusError(f"{row['key']}: cannot write it: No space left on device", hint="free space, then rerun with --resume")

    monkeypatch.setattr(runner.Progress, "update", full)
    capsys.readouterr()
    assert run("degrade", photos, tmp_path / "ray", "--workers", "2", "--engine", "ray") == 1
    err = capsys.readouterr().err
    assert "Hint: free space, then rerun with --resume" in err and "Ray cluster" not in err


class DyingSetupStage(Stage):
    """Its process dies while the stage is set up (a stand-in for running out of memory loading the models)."""

    name = "dying_setup"
    fov_policy = "none"

    def config_record(self) -> dict:
        return {"dying_setup": 1}

    def setup(self) -> None:
        os._exit(1)

    def compute(self, item):
        return ItemOutput({"": item.image.array})


def test_an_actor_dying_while_the_stage_is_set_up_fails_the_stage_instead_of_looping(ray_engine, photos, tmp_path, monkeypatch):
    """Campaign 14b G2: with unbounded restarts (max_restarts=-1) such an actor was restarted without end and
    the run hung without a word; the restarts are now bounded and the stage fails (exit 1)."""
    import time

    import fundus_pipeline.ray_engine as ray_engine_module
    from fundus_pipeline.errors import FundusError

    monkeypatch.setattr(ray_engine_module, "MAX_BLOCKS", 1)  # one task: restarts_allowed(1) restarts per actor
    t0 = time.monotonic()
    faulthandler.dump_traceback_later(480, exit=True)  # a regression loops for ever: end the session, do not hang CI
    try:
        with pytest.raises(FundusError, match="failed on the Ray cluster"):
            run_stage(DyingSetupStage(), photos, tmp_path / "out", workers=1, threads=1, progress=False, engine=ray_engine)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert time.monotonic() - t0 < 240


class RaisingSetupStage(DyingSetupStage):
    """Its setup raises (a stand-in for weights that differ on a node, or a model that does not load there)."""

    name = "raising_setup"

    def setup(self) -> None:
        raise RuntimeError("WeightsError: simulated setup failure on this node")


def test_a_stage_that_cannot_be_set_up_on_the_cluster_is_one_line_not_rays_tracebacks(ray_engine, photos, tmp_path, capfd):
    """Campaign 14b G7 (and G5): the one-line error came after some 160 lines of Ray's messages (a traceback
    for each failed try, coloured with ANSI codes on a file); Ray's messages on the driver are now one line
    each, without colour codes, and Ray Data's traceback of the failed execution stays in its log file."""
    import time

    from fundus_pipeline.errors import FundusError

    with pytest.raises(FundusError, match="failed on the Ray cluster: RuntimeError: WeightsError: simulated"):
        run_stage(RaisingSetupStage(), photos, tmp_path / "out", workers=1, threads=1, progress=False, engine=ray_engine)
    time.sleep(2)  # Ray's messages reach the driver on a thread of their own
    err = capfd.readouterr().err  # the file descriptor: Ray's loggers hold the stderr of before the test
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "\x1b[" not in err and not any(ln.lstrip().startswith(("Traceback", "File ")) for ln in lines), err
    assert len(lines) <= 6, err
