"""The default shipped grader (and hemf_4k, the default before hemf_4750, and hemf_grey) on a few real photographs (DRIVE test 01-03, three real low-quality CofeNet
photographs, three EyePACS-256 test photographs) and scikit-image's astronaut: `fundus grade` reproduces
the probabilities recorded in docs/grade_benchmark/<weights>_check.csv when the weights were exported
(within 1e-3: thread counts may differ) and writes a consistent grade; runs when ../shared/data is present."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from fundus_pipeline.cli import main as cli_main
from fundus_pipeline.models.weights import weights_dir

pytestmark = pytest.mark.data
ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("p_good", "p_usable", "p_reject", "p_blur", "p_illumination", "p_not_fundus")
sys.path.insert(0, str(ROOT / "scripts"))

from grade_check import check_inputs, default_weights, recorded_check  # noqa: E402


@pytest.mark.parametrize("weights", ["default", "hemf_4k", "hemf_grey"])
def test_shipped_grader_on_real_photographs(weights, data_root, tmp_path):
    name = default_weights() if weights == "default" else weights
    recorded_csv = recorded_check(name)
    if not (weights_dir() / f"{name}.pt").is_file():
        pytest.skip(f"weights/{name}.pt not present")
    assert recorded_csv.is_file(), f"record it: python scripts/grade_check.py {name} > {recorded_csv.relative_to(ROOT)}"
    check_inputs(data_root, tmp_path / "in")
    out = tmp_path / "out"
    args = [] if weights == "default" else ["--weights", name]
    assert cli_main(["grade", str(tmp_path / "in"), str(out), *args, "--threads", "2", "--quiet"]) == 0
    got = {r["key"]: r for r in csv.DictReader(open(out / "results.csv"))}
    recorded = {r["key"]: r for r in csv.DictReader(open(recorded_csv))}
    assert got.keys() == recorded.keys() and len(got) == 10
    for key, r in got.items():
        p = np.array([float(r[c]) for c in ("p_good", "p_usable", "p_reject")])
        assert p.sum() == pytest.approx(1.0, abs=1e-5) and r["grade"] == ("good", "usable", "reject")[int(p.argmax())]
        for c in COLUMNS:
            assert float(r[c]) == pytest.approx(float(recorded[key][c]), abs=1e-3), (key, c)
        assert r["grade"] == recorded[key]["grade"], key
