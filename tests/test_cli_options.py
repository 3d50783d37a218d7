"""Options shared by the stage commands: progress lines off a terminal and --quiet, --workers 2 and
tile batching that do not change a single output byte, and help texts without value placeholders on flags."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image

from fundus_pipeline.cli import app, main
from fundus_pipeline.models.registry import build_model
from tests.conftest import synthetic_fundus


def run(*args) -> int:
    return main([str(a) for a in args])


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.png"))}


@pytest.fixture()
def photos(tmp_path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for k in range(4):
        Image.fromarray(synthetic_fundus(96, 104, k)).save(d / f"p{k}.png")
    return d


@pytest.fixture(scope="module")
def tiny_imff(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    p = tmp_path_factory.mktemp("w") / "imff_tiny.pt"
    torch.save(build_model("imff_tiny").state_dict(), p)
    return p


def test_progress_lines_off_a_terminal_and_quiet(photos, tmp_path, capsys):
    assert run("degrade", photos, tmp_path / "a", "--seed", "1") == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("degrade: ")]
    assert lines and lines[-1].startswith("degrade: 4/4 (100%), 0 failed,"), err  # stderr is not a tty under pytest
    assert run("degrade", photos, tmp_path / "b", "--seed", "1", "--quiet") == 0
    assert "degrade: " not in capsys.readouterr().err
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_segment_workers_and_tile_batching_do_not_change_outputs(photos, tmp_path, tiny_imff):
    common = ("--weights", tiny_imff, "--arch", "imff_tiny", "--device", "cpu", "--quiet")
    assert run("segment", photos, tmp_path / "one", *common, "--threads", "1") == 0
    assert run("segment", photos, tmp_path / "two", *common, "--workers", "2", "--threads", "1") == 0
    assert _digests(tmp_path / "one") == _digests(tmp_path / "two")
    # another thread count changes oneDNN's summation order: probabilities may move by one 16-bit level
    assert run("segment", photos, tmp_path / "two_threads", *common, "--threads", "2") == 0
    for p in sorted((tmp_path / "one").glob("*_prob.png")):
        a = np.asarray(Image.open(p), dtype=np.int64)
        b = np.asarray(Image.open(tmp_path / "two_threads" / p.name), dtype=np.int64)
        assert np.abs(a - b).max() <= 1, p.name
    # tiles of 48 px with 16 px overlap: 1 tile per pass and 3 tiles per pass agree (a batch changes oneDNN's
    # summation order like a thread count does: a probability may move by one 16-bit level)
    assert run("segment", photos, tmp_path / "t1", *common, "--threads", "1", "--tile", "48", "--overlap", "16") == 0
    assert run("segment", photos, tmp_path / "t3", *common, "--threads", "1", "--tile", "48", "--overlap", "16", "--batch-size", "3") == 0
    for p in sorted((tmp_path / "t1").glob("*_prob.png")):
        a = np.asarray(Image.open(p), dtype=np.int64)
        b = np.asarray(Image.open(tmp_path / "t3" / p.name), dtype=np.int64)
        assert np.abs(a - b).max() <= 1, p.name
    assert _digests(tmp_path / "t1") != _digests(tmp_path / "one")  # tiling took effect


def _commands(group=None, prefix=""):
    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", cmd


@pytest.mark.parametrize("name", [n for n, _ in _commands()])
def test_help_shows_flags_without_a_value_placeholder(name, capsys):
    assert run(*name.split(), "--help") == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out and "BOOLEAN" not in out, out
    cmd = dict(_commands())[name]
    for p in cmd.params:
        if getattr(p, "is_flag", False) and p.name != "help":
            opt = p.opts[0]
            assert re.search(rf"{re.escape(opt)}(\s|/|,|$)", out), f"{opt} missing from `fundus {name} --help`"
