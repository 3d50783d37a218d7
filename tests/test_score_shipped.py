"""The shipped quality scorer on three test pairs of the quality set, rebuilt here from DRIVE test images
01-03 exactly as `fundus build quality-set` builds them (seed 2026, 512 frame, draw 0): the pairs' labels
match the set's pairs.csv recorded in docs/score_benchmark, `fundus score` reproduces the recorded test
scores (within 1e-3: thread counts may differ), and it ranks the unchanged input above the two harmful
enhancers (blur, over-sharpening) on each; runs when ../shared/data is present."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from fundus_pipeline.cli import main as cli_main
from fundus_pipeline.models.weights import weights_dir
from fundus_pipeline.quality.build import QualitySetConfig, SetEnhancer, build_source, part_sources
from fundus_pipeline.quality.label import VesselMapper

pytestmark = pytest.mark.data
ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT / "docs" / "score_benchmark" / "sdmp_test_scores.csv"
PAIRS = ROOT / "docs" / "score_benchmark" / "test_pairs.csv"  # the test part of the set's pairs.csv


def test_shipped_sdmp_on_rebuilt_test_pairs(data_root, tmp_path):
    if not (weights_dir() / "sdmp.pt").is_file() or not RECORDED.is_file():
        pytest.skip("weights/sdmp.pt or its recorded test scores not present")
    torch.set_num_threads(2)
    cfg = QualitySetConfig(draws=1, enhancers=("identity", "blur", "oversharpen"))
    enhancers = [SetEnhancer(n) for n in cfg.enhancers]
    mapper = VesselMapper()
    rows = []
    for name, info in part_sources(data_root, "test")[:3]:  # drive/01-03
        rows += build_source(name, info, "test", "test", cfg, enhancers, mapper, tmp_path / "set")[0]
    out = tmp_path / "scores"
    code = cli_main(["score", str(tmp_path / "set" / "test" / "enhanced"), str(out), "--reference",
                     str(tmp_path / "set" / "test" / "reference"), "--threads", "2", "--quiet"])  # fmt: skip
    assert code == 0
    got = {r["key"]: float(r["score"]) for r in csv.DictReader(open(out / "results.csv"))}
    recorded = {r["key"]: float(r["score"]) for r in csv.DictReader(open(RECORDED))}
    assert len(got) == 9
    for key, score in got.items():
        assert score == pytest.approx(recorded[key], abs=1e-3), key
    for src in ("drive-01__d0", "drive-02__d0", "drive-03__d0"):
        assert got[f"{src}__identity"] > max(got[f"{src}__blur"], got[f"{src}__oversharpen"]), src
    # the rebuilt pairs carry the labels recorded for the set (the label is reproducible)
    recorded_labels = {r["key"]: float(r["label"]) for r in csv.DictReader(open(PAIRS))}
    for r in rows:
        assert r["label"] == pytest.approx(recorded_labels[r["key"]], abs=1e-5), r["key"]
