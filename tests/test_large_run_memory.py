"""Issue 13's large-run memory goal (peak memory of 10,000 photographs within 10% of 1,000): what made it grow.

Bisected on 2026-12-05 to the report's header (campaign 21a), which read the vessel threshold from the segment
folder's manifest.json with ``json.loads`` of the whole file, rows and all, once per page of the report: a
10,000-photograph run parsed a manifest of 10,000 rows ten times, +17% peak memory where +6% had been measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fundus_pipeline.config import RunConfig
from fundus_pipeline.io import read_manifest_head
from fundus_pipeline.runner import write_json_streamed
from tests.test_campaign21 import _run_folder
from tests.test_run import photos, run, tiny, tiny_args  # noqa: F401  (fixtures)


def _row_text(i: int) -> str:
    return json.dumps({"key": f"k{i:05d}", "status": "ok", "outputs": [f"k{i:05d}_vessels.png"], "threshold": 0.5})


def _stage_manifest(folder: Path, n: int, threshold: float = 0.4) -> Path:
    head = {"schema_version": 1, "tool": {"name": "fundus-pipeline"}, "stage": "segment",
            "config": {"threshold": threshold}, "notes": ["a list in the head", '  "items": ['], "counts": {"ok": n}}
    write_json_streamed(folder / "manifest.json", head, {"items": (_row_text(i) for i in range(n))})
    return folder / "manifest.json"


@pytest.fixture
def parsed(monkeypatch):
    """The length of every text ``json.loads`` parses."""
    sizes: list[int] = []
    real = json.loads

    def loads(s, *a, **k):
        sizes.append(len(s))
        return real(s, *a, **k)

    monkeypatch.setattr(json, "loads", loads)
    return sizes


def test_a_manifests_head_is_read_without_its_rows(tmp_path, parsed):
    mf = _stage_manifest(tmp_path, 5000)
    size = mf.stat().st_size
    head = read_manifest_head(mf)
    assert parsed and max(parsed) < 2000 < size  # the head alone was parsed, not the 5,000 rows
    assert head == {k: v for k, v in json.loads(mf.read_text()).items() if k != "items"}
    assert head["config"]["threshold"] == 0.4
    # the run's manifest (a plan, then its items) and one without a head
    write_json_streamed(tmp_path / "run.json", {"stage": "run", "config": {"a": [1, 2]}}, {"plan": ["1", "2"], "items": ['{"k": 1}']})
    assert read_manifest_head(tmp_path / "run.json") == {"stage": "run", "config": {"a": [1, 2]}}
    # laid out otherwise: read whole, as json.loads reads it (another tool's, one line, a cut file)
    (tmp_path / "one.json").write_text(json.dumps({"config": {"threshold": 0.3}, "items": [{"k": 1}]}))
    assert read_manifest_head(tmp_path / "one.json") == {"config": {"threshold": 0.3}, "items": [{"k": 1}]}
    (tmp_path / "list.json").write_text(json.dumps([1, 2], indent=2))
    assert read_manifest_head(tmp_path / "list.json") == [1, 2]
    # many such lines inside a value: one try at a head, then the file whole (review 39 F2: parsed again at each)
    (tmp_path / "odd.json").write_text('{"a": {"b": 1,\n' + '  "items": [\n1],\n' * 3000 + '"c": 2}}')
    parsed.clear()
    assert read_manifest_head(tmp_path / "odd.json")["a"]["c"] == 2 and len(parsed) == 2
    for text in ('{"config": {"threshold": 0.3', "", '{\n  "config": {"t": 1,\n  "items": [\n    {}\n  ]\n}\n'):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError):
            read_manifest_head(tmp_path / "bad.json")


def test_the_report_reads_the_segment_threshold_once_and_never_the_rows(tmp_path, parsed, monkeypatch):
    """A report of 5 pages (2 rows a page here, 1,000 in a run) read the segment manifest, rows and all, on each."""
    from fundus_pipeline import report

    out = tmp_path / "run"
    rows = _run_folder(out, keys=("a", "b", "c", "d", "e", "f", "g", "h", "i"))
    mf = _stage_manifest(out / "segment", 3000, threshold=0.37)
    monkeypatch.setattr(report, "PAGE_ROWS", 2)
    reads = []
    real = report._segment_threshold
    monkeypatch.setattr(report, "_segment_threshold", lambda o: reads.append(o) or real(o))
    page = report.write_report(out, RunConfig(steps=["grade", "segment"]), rows).read_text()
    assert "vessel threshold 0.37" in page and (out / "report-5.html").is_file()
    assert len(reads) == 1  # once for the five pages
    assert max(parsed, default=0) < mf.stat().st_size // 10  # the 3,000 rows were not parsed
    mf.unlink()  # no threshold known: still read once, not once a page (review 39 F4)
    reads.clear()
    page = report.write_report(out, RunConfig(steps=["grade", "segment"]), rows).read_text()
    assert "vessel threshold: the weights&#39; own" in page and len(reads) == 1


def test_evaluate_segment_reads_the_threshold_from_a_large_manifests_head(tmp_path, parsed):
    from fundus_pipeline.evaluation.segment import _threshold_from_manifest

    mf = _stage_manifest(tmp_path, 3000, threshold=0.42)
    assert _threshold_from_manifest(tmp_path) == 0.42
    assert max(parsed) < mf.stat().st_size // 10
    # its rows cut (a copy broken off): the head the masks were written with still reads (review 39 F3: refused
    # before, when the whole file was parsed); one cut inside its head is refused as before (test_campaign19)
    mf.write_bytes(mf.read_bytes()[: mf.stat().st_size // 2])
    assert _threshold_from_manifest(tmp_path) == 0.42


def test_a_resume_reads_the_previous_run_manifests_head_only(tmp_path, photos, tiny, monkeypatch):  # noqa: F811
    """--resume compared the configuration of the run's manifest.json after parsing it whole (its plan and rows:
    tens of megabytes for a 100,000-photograph run), where its head holds what is compared."""
    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny)) == 0
    whole = len((out / "manifest.json").read_text())
    sizes: list[int] = []
    real = json.loads
    monkeypatch.setattr(json, "loads", lambda s, *a, **k: sizes.append(len(s)) or real(s, *a, **k))
    held: list[Path] = []
    real_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: held.append(self) or real_bytes(self))
    assert run("run", photos, out, *tiny_args(tiny), "--resume") == 0
    assert sizes and whole not in sizes
    # nor held its bytes for the whole run, to put them back if refused (review 39 F7): a hard link to it is kept
    assert out / "manifest.json" not in held and not list(out.glob(".*.tmp"))
    # fundus report: the head, and the plan a line at a time (review 39 F6: parsed whole and held through the report)
    before, whole = (out / "report.html").read_bytes(), len((out / "manifest.json").read_text())
    sizes.clear()
    assert run("report", out) == 0
    assert sizes and whole not in sizes and (out / "report.html").read_bytes() == before

