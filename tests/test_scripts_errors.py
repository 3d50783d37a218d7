"""The grading scripts fail as the commands do: one line (and a hint), a documented exit code, no traceback;
and ``expand_hemf_stems.py`` never replaces its input, a shipped file or an existing output unasked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fundus_pipeline.models.weights import weights_dir

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str, cwd: Path, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra_env}  # this checkout's package
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _one_error(r: subprocess.CompletedProcess, code: int, text: str) -> None:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("Error: ") and text in lines[0] and all(x.startswith("Hint: ") for x in lines[1:]), r.stderr


def test_scripts_report_user_errors_in_one_line(tmp_path):
    _one_error(_script("validate_grade.py", str(tmp_path / "nowhere"), "hemf", cwd=tmp_path), 2, "is not a grade set")
    _one_error(_script("choose_grade_bias.py", "hemf", "--grade-set", str(tmp_path / "nowhere"), cwd=tmp_path), 2, "is not a grade set")
    _one_error(_script("expand_hemf_stems.py", str(tmp_path / "missing.pt"), "out.pt", cwd=tmp_path), 1, "weights not found")


@pytest.mark.skipif(not (weights_dir() / "hemf.pt").is_file(), reason="weights/hemf.pt not present")
def test_expand_hemf_stems_never_replaces_unasked(tmp_path):
    src = tmp_path / "hemf224.pt"
    src.write_bytes((weights_dir() / "hemf.pt").read_bytes())
    before = src.read_bytes()
    _one_error(_script("expand_hemf_stems.py", str(src), str(src), cwd=tmp_path), 2, "refusing to write")
    _one_error(_script("expand_hemf_stems.py", str(src), str(weights_dir() / "hemf_x.pt"), cwd=tmp_path), 2, "refusing to write")
    assert src.read_bytes() == before and not (weights_dir() / "hemf_x.pt").exists()
    # with FUNDUS_WEIGHTS set elsewhere, both that folder and the checkout's weights/ are refused
    other = tmp_path / "other_weights"
    other.mkdir()
    for target in (other / "hemf_x.pt", ROOT / "weights" / "hemf_x.pt"):
        try:
            _one_error(_script("expand_hemf_stems.py", str(src), str(target), cwd=tmp_path, FUNDUS_WEIGHTS=str(other)), 2, "refusing to write")
            assert not target.exists()
        finally:
            target.unlink(missing_ok=True)  # never leave a file in the checkout, even when the check fails
    out = tmp_path / "hemf448.pt"
    out.write_bytes(b"mine")
    _one_error(_script("expand_hemf_stems.py", str(src), str(out), cwd=tmp_path), 2, "exists")
    assert out.read_bytes() == b"mine"
    r = _script("expand_hemf_stems.py", str(src), str(out), "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() != b"mine" and not list(tmp_path.glob(".*.tmp"))
