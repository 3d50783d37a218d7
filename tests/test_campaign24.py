"""Known-left items of review 22 and campaign 23 (mended 2026-12-05), and campaigns 24a (the Ray engine) and
24b (the evaluate commands and grading as a screening programme)."""

from __future__ import annotations

import json

from PIL import Image

from tests.conftest import synthetic_fundus
from tests.test_campaign8 import _photos
from tests.test_run import rows_of, run, tiny, tiny_args  # noqa: F401  (tiny is a fixture)


# ------------------------------------------------------------------------------------------------ review 22 L6
def test_a_row_whose_photograph_changed_under_the_run_carries_no_figure_and_counts_as_nothing(tmp_path, tiny, monkeypatch):  # noqa: F811
    """L6: the row was an error, yet it kept its grade, its gain from two versions and its vessel image, and the
    summary counted it as graded, enhanced and trusted."""
    from fundus_pipeline import chain

    photos = _photos(tmp_path / "in", 2)
    real = chain.Chain._stage

    def stage(self, name, *args, **kw):
        got = real(self, name, *args, **kw)
        if name == "enhance":  # replaced after it was graded and enhanced, before it is scored against its input
            Image.fromarray(synthetic_fundus(72, 80, 9)).save(photos / "p1.png")
        return got

    monkeypatch.setattr(chain.Chain, "_stage", stage)
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--min-gain", "-1", "--enhance-if", "good,usable,reject")) == 3
    rows = rows_of(out / "results.csv")
    assert rows["p0"]["status"] == "ok" and rows["p0"]["grade"] and rows["p0"]["segmented"] == "enhanced"
    bad = rows["p1"]
    assert bad["status"] == "error" and "changed during the run" in bad["error"]
    figures = {k: v for k, v in bad.items() if k not in ("key", "input", "status", "error")}
    assert not any(figures.values()), figures
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["error"] == 1 and counts["enhanced"] == counts["enhanced_used"] == counts["segmented"] == 1
    assert sum(counts[g] for g in ("good", "usable", "reject")) == 1
