"""Seventh campaign (can the numbers and images be trusted?), and the mends of this session's review."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fundus_pipeline import report
from tests.conftest import synthetic_fundus


def test_report_thumbnails_name_unreadable_images_but_let_a_bug_propagate(tmp_path, monkeypatch):
    good = tmp_path / "a.png"
    Image.fromarray(synthetic_fundus(64, 64)).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:40])  # truncated
    row = {"key": "a", "status": "ok", "input": str(good), "enhanced_image": "cut.png", "vessels_image": "gone.png", "segmented": "input"}
    missing: list = []
    t = report.thumbnails(tmp_path, row, 32, missing)
    assert t["input"].startswith("data:image/jpeg;base64,") and t["enhanced"] == "" and t["vessels"] == ""
    assert [Path(p).name for _, p in missing] == ["cut.png", "gone.png"]

    def broken(path, side):  # a bug in the report's own code is not an unreadable image
        raise TypeError("bug")

    monkeypatch.setattr(report, "thumb_array", broken)
    with pytest.raises(TypeError):
        report.thumbnails(tmp_path, row, 32, [])
