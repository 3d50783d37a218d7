"""Session of 2026-12-05 (evening): campaign 39b (a run folder of an older version used by this one) and the
known-left items of earlier reviews mended on the way."""

from __future__ import annotations

from pathlib import Path


def test_an_input_unreadable_now_does_not_say_its_earlier_outputs_came_from_other_bytes(tmp_path, monkeypatch):
    """Known left of review 38: a photograph done before whose file's status changed and that cannot be read now is
    processed again and fails; its error said the earlier outputs that stay were "from other bytes", which nobody
    knows (a chmod changes the status, not the bytes). A photograph replaced since still says "other bytes"."""
    from fundus_pipeline import runner
    from fundus_pipeline.cli import main
    from fundus_pipeline.models import weights
    from tests.test_campaign36 import _bmp, _rows

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for k in range(2):
        _bmp(src / f"p{k}.bmp", k)
    args = ["degrade", str(src), str(out), "--types", "111", "--workers", "1", "--quiet"]
    assert main(args) == 0
    (src / "p0.bmp").chmod(0o600)  # its status changes, its bytes stay
    _bmp(src / "p1.bmp", 7)  # replaced by another photograph

    def denied(path, *a, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    real_sha, real_read = weights.sha256_file, runner.read_image
    monkeypatch.setattr(weights, "sha256_file", lambda p, *a, **kw: denied(p) if Path(p).name == "p0.bmp" else real_sha(p, *a, **kw))
    monkeypatch.setattr(runner, "read_image", lambda p, *a, **kw: denied(p) if Path(p).name in ("p0.bmp", "p1.bmp") else real_read(p, *a, **kw))
    runner._DIGESTS_READ.clear()
    assert main([*args, "--resume"]) == 3
    rows = _rows(out)
    assert rows["p0"]["status"] == rows["p1"]["status"] == "error"
    assert rows["p0"]["error"].endswith("(outputs of an earlier run from the bytes it read then stay: p0.png)"), rows["p0"]["error"]
    assert rows["p1"]["error"].endswith("(outputs of an earlier run from other bytes stay: p1.png)"), rows["p1"]["error"]
