"""Seventh campaign (can the numbers and images be trusted?), and the mends of this session's review."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def test_a_ppm_whose_maxval_is_not_full_scale_is_read_at_full_scale(tmp_path):
    """12-bit data under maxval 4095 was read as 16-bit values 0..4095 (16 times too dark), maxval 100 as 8-bit
    0..100: graded reject, 'brightened', written on the wrong scale. Read as every viewer shows them."""
    from fundus_pipeline.io import read_image

    rgb = synthetic_fundus(40, 48).astype(np.int64)
    h, w = rgb.shape[:2]
    (tmp_path / "p8.ppm").write_bytes(b"P6\n%d %d\n255\n" % (w, h) + rgb.astype(np.uint8).tobytes())
    (tmp_path / "p12.ppm").write_bytes(b"P6\n# a comment\n%d %d\n4095\n" % (w, h) + (rgb * 4095 // 255).astype(">u2").tobytes())
    (tmp_path / "p100.ppm").write_bytes(b"P6 %d %d 100\n" % (w, h) + (rgb * 100 // 255).astype(np.uint8).tobytes())
    (tmp_path / "g12.ppm").write_bytes(b"P5\n%d %d\n4095\n" % (w, h) + (rgb[..., 1] * 4095 // 255).astype(">u2").tobytes())
    ref = rgb / 255
    for name, depth, tol in (("p8", 8, 0), ("p12", 16, 1 / 4095), ("p100", 8, 1 / 100 + 1 / 255), ("g12", 16, 1 / 4095)):
        arr, meta = read_image(tmp_path / f"{name}.ppm")
        assert meta.bit_depth == depth
        want = ref[..., 1] if name == "g12" else ref
        assert np.abs(arr / np.iinfo(arr.dtype).max - want).max() <= tol + 1e-9, name


def test_enhance_after_columns_describe_the_samples_written(tmp_path):
    """A correction under half a code value leaves the 8-bit file equal to the input; the "after" columns said
    it changed (they were computed on the float result before rounding)."""
    from fundus_pipeline.config import EnhanceConfig
    from fundus_pipeline.runner import decode, prepare_item
    from fundus_pipeline.stages.enhance import EnhanceStage

    for name, arr in (("rgb.png", synthetic_fundus(80, 96, 2)), ("grey.png", synthetic_fundus(80, 96, 3)[..., 1])):
        Image.fromarray(arr).save(tmp_path / name)
        stage = EnhanceStage(EnhanceConfig(vessel_stats=False))
        item = prepare_item(stage, "x", {"image": decode(tmp_path / name)})
        rgb = item.image.rgb
        out = stage.finish(item, item.fov, np.clip(rgb + 0.3 / 255, 0, 1) * item.fov.mask[..., None])
        written = out.images[""]
        assert np.array_equal(written[item.fov.mask], arr[item.fov.mask]), name
        f = out.fields
        assert (f["luminance_after"], f["contrast_after"]) == (f["luminance_before"], f["contrast_before"]), name


def test_grade_warns_on_a_grey_photograph(tmp_path):
    """The grader learned from colour photographs: clean grey (red-free) ones are graded reject at p 0.96-0.996
    (validation photographs). The row says so instead of passing the grade off as calibrated; `fundus run`
    carries the warning into its table."""
    import csv

    from fundus_pipeline.cli import main
    from fundus_pipeline.stages.grade import GREY_WARNING

    d = tmp_path / "in"
    d.mkdir()
    rgb = synthetic_fundus(96, 96, 5)
    Image.fromarray(rgb).save(d / "colour.png")
    Image.fromarray(rgb[..., 1]).save(d / "green.png")
    Image.fromarray(np.repeat(rgb[..., 1:2], 3, axis=2)).save(d / "grey_as_rgb.png")
    assert main(["run", str(d), str(tmp_path / "out"), "--steps", "grade", "--quiet", "--no-report"]) == 0
    for table in ("out/grade/results.csv", "out/results.csv"):
        with open(tmp_path / table) as f:
            warn = {r["key"]: r["warning"] for r in csv.DictReader(f)}
        assert warn == {"colour": "", "green": GREY_WARNING, "grey_as_rgb": GREY_WARNING}, table
    assert main(["report", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count(GREY_WARNING) == 2 and "2 grey (red-free)" in page and "implausible" not in page


def test_report_tells_the_grey_warning_from_the_segmenters():
    """The joined table's warning holds the grader's, then the segmenter's; the report counted both as
    'implausible' vessel results and showed them only beside the vessel fraction."""
    from fundus_pipeline.report import split_warning, summary
    from fundus_pipeline.stages.grade import GREY_WARNING

    seg = "no dark surround around the FOV and an implausible vessel fraction 0.394"
    assert split_warning(f"{GREY_WARNING}; {seg}") == (GREY_WARNING, seg)
    assert split_warning(GREY_WARNING) == (GREY_WARNING, "") and split_warning(seg) == ("", seg) and split_warning(None) == ("", "")
    rows = [{"status": "ok", "warning": w} for w in (f"{GREY_WARNING}; {seg}", GREY_WARNING, seg, "")]
    s = summary(rows, simulate=False, truth=False)
    assert (s["grey"], s["warnings"]) == (2, 2)


def test_grade_training_can_show_fundus_photographs_grey():
    """--grey-p: a fundus sample made red-free (luminance or green channel in all three channels), labels kept;
    a not-fundus picture never; off by default."""
    from fundus_pipeline.train.grade import GradeItem, augment

    rgb = synthetic_fundus(64, 64, 1)
    flags = np.zeros(9, np.float32)
    fundus, natural = GradeItem(rgb, 1, flags, flags, "set"), GradeItem(rgb, 2, flags, flags, "natural")
    greys = [augment(fundus, np.random.default_rng(i), 32, grey_p=1.0) for i in range(8)]
    assert all(np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2]) for g in greys)
    assert len({round(float(g.mean()), 6) for g in greys}) > 1
    for make in (lambda i: augment(natural, np.random.default_rng(i), 32, grey_p=1.0), lambda i: augment(fundus, np.random.default_rng(i), 32)):
        assert not any(np.array_equal(a[..., 0], a[..., 1]) for a in map(make, range(8)))


def test_building_a_test_part_needs_no_vessel_annotation(tmp_path):
    """The builders read a source's photograph and FOV mask, never its vessel annotation; the pre-check demanded
    it, so `fundus build grade-set --parts test` was refused on the real data (HRF 11_h, 12_h, 13_h have none)."""
    from fundus_pipeline.cli.build import _check_build
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.quality.build import part_sources

    for _, info in part_sources(tmp_path, "test"):
        for role, path in info["paths"].items():
            if role != "vessels":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_bytes(b"")
    _check_build(tmp_path, tmp_path.parent / "out", ("test",), None)  # refused before
    next(p for p in (tmp_path / "HRF" / "mask").iterdir()).unlink()
    with pytest.raises(UsageError, match="lacks 1 file"):
        _check_build(tmp_path, tmp_path.parent / "out", ("test",), None)
