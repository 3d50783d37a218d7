"""Input kinds (folder, single file, list of paths) and the output-folder lock."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from PIL import Image

from fundus_pipeline.cli import main
from fundus_pipeline.runner import LOCK
from tests.conftest import synthetic_fundus


def _photos(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for i, name in enumerate(["a", "b", "sub/c"]):
        Image.fromarray(synthetic_fundus(64, 64, seed=i)).save(d / f"{name}.png")
    return d


def test_single_file_and_list_inputs(tmp_path):
    d = _photos(tmp_path)
    assert main(["degrade", str(d / "a.png"), str(tmp_path / "one"), "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "one").glob("*.png")) == ["a.png"]
    lst = tmp_path / "list.txt"
    lst.write_text("# two photos and a missing one\nin/b.png\n\nin/sub/c.png\nin/missing.png\n")
    assert main(["degrade", str(lst), str(tmp_path / "fromlist"), "--quiet"]) == 3  # the missing file fails as an item
    out = tmp_path / "fromlist"
    assert (out / "b.png").exists() and (out / "sub" / "c.png").exists()
    assert "missing" in (out / "results.csv").read_text()


def test_a_second_run_into_a_locked_output_is_refused(tmp_path, capsys):
    d = _photos(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["degrade", str(d), str(out), "--quiet"]) == 2
        assert "another fundus run" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert main(["degrade", str(d), str(out), "--quiet"]) == 0
