"""Session 2026-12-05: review 24's LOW findings left by the last stop, campaigns 27a/27b and their mends.
Each test fails on the code before its mend."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundus_pipeline.cli import main as cli_main
from tests.test_run import photos, rows_of, run, tiny  # noqa: F401  (photos, tiny: fixtures)


def _metrics(out: Path) -> dict[str, dict]:
    with open(out / "metrics.csv", newline="") as f:
        return {r["key"]: r for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------------ review 24 R24-4
def test_a_16_bit_map_without_vessel_response_scores_when_all_zero_or_written_by_fundus_segment(photos, tmp_path, tiny):  # noqa: F811
    """R24-4: a 16-bit probability map all zero, or one `fundus segment` wrote whose values stay under 256 (a
    segmenter finding no vessel), was an error row blaming the file format; the same map in 8 bits scored F1 0."""
    rng = np.random.default_rng(2)
    seg = tmp_path / "seg"
    assert run("segment", photos, seg, "--weights", tiny["imff_tiny"], "--arch", "imff_tiny", "--device", "cpu", "--quiet") == 0
    gt = tmp_path / "gt"
    gt.mkdir()
    for p in sorted(photos.glob("*.png")):
        h, w = np.asarray(Image.open(p)).shape[:2]
        Image.fromarray((rng.random((h, w)) < 0.15).astype(np.uint8) * 255).save(gt / p.name)
    h, w = np.asarray(Image.open(photos / "p0.png")).shape[:2]
    Image.fromarray(np.zeros((h, w), np.uint16)).save(seg / "p0_prob.png")  # no response at all
    h, w = np.asarray(Image.open(photos / "p1.png")).shape[:2]
    Image.fromarray(rng.integers(0, 200, (h, w)).astype(np.uint16)).save(seg / "p1_prob.png")  # all under 0.4%
    out = tmp_path / "ev"
    assert cli_main(["evaluate", "segment", str(seg), str(gt), "--bootstrap", "0", "--out", str(out)]) == 0
    rows = _metrics(out)
    assert rows["p0"]["status"] == rows["p1"]["status"] == "ok"
    assert float(rows["p0"]["f1"]) == float(rows["p1"]["f1"]) == 0.0

    # the same low map in a folder no fundus segment wrote is still refused (R23-6), with a message naming both causes
    other = tmp_path / "other"
    other.mkdir()
    for name in ("p0_prob.png", "p1_prob.png"):
        (other / name).write_bytes((seg / name).read_bytes())
    out2 = tmp_path / "ev2"
    assert cli_main(["evaluate", "segment", str(other), str(gt), "--bootstrap", "0", "--out", str(out2)]) == 3
    rows = _metrics(out2)
    assert rows["p0"]["status"] == "ok" and float(rows["p0"]["f1"]) == 0.0
    assert "next to no vessel response" in rows["p1"]["status"]
