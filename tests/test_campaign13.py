"""Session of 2026-12-04 (fourth part): what campaign 13b (the stages' output contract) found. Each test
fails on the code before its mend."""

from __future__ import annotations

from tests.conftest import synthetic_fundus
from tests.test_run import photos, tiny  # noqa: F401  (fixtures)


def test_the_report_of_a_simulated_run_rebuilds_its_thumbnails(photos, tmp_path, tiny, capsys):  # noqa: F811
    """13b D1: `fundus report` on a `--simulate` run checked each row's input (the degraded image) against the
    sha256 of its clean original, called every input "changed since the run" and dropped the input thumbnails
    and vessel overlays. A degraded image replaced since the run is still named."""
    import numpy as np
    from PIL import Image

    from tests.test_campaign9 import run
    from tests.test_run import tiny_args

    for code in ("111", "001,100"):
        out = tmp_path / f"s{code.replace(',', '_')}"
        assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade,segment", "--simulate", code, "--seed", "3")) == 0
        capsys.readouterr()
        written = (out / "report.html").read_bytes()
        assert run("report", out) == 0
        assert "warning" not in capsys.readouterr().err
        assert (out / "report.html").read_bytes() == written  # the page the run wrote, byte for byte
    degraded = sorted((out / "degrade").glob("*.png"))[0]
    a = np.asarray(Image.open(degraded))
    Image.fromarray(synthetic_fundus(a.shape[1], a.shape[0], 9)).save(degraded)
    assert run("report", out) == 0
    err = capsys.readouterr().err
    assert "changed since the run" in err and degraded.stem in err
