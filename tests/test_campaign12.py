"""Session of 2026-12-04 (third part): what campaigns 12a (`fundus degrade`, the report) and 12b (weights,
scripts, benchmarks) found. Each test fails on the code before its mend."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import synthetic_fundus


def _inner_crops(a: np.ndarray):
    h, w = a.shape[:2]
    for frac, dy, dx in ((0.45, 0, 0), (0.35, -0.1, 0.1), (0.3, 0.1, -0.1)):
        s = int(min(h, w) * frac)
        cy, cx = int(h * (0.5 + dy)), int(w * (0.5 + dx))
        yield a[cy - s // 2 : cy + s // 2, cx - s // 2 : cx + s // 2]


def test_a_photograph_cropped_inside_its_fov_keeps_the_whole_frame(data_root):
    """12a D1: on a crop with no dark surround the estimator took the vignetted corners for the surround and
    fitted a circle, and `degrade` blacked out 12-83% of the photograph (27 of 30 DRIVE crops)."""
    from PIL import Image

    from degradation.fov import estimate_fov_geometry

    photos = [synthetic_fundus(400, 400, 1)]
    drive = data_root / "DRIVE" / "test" / "images"
    if drive.is_dir():
        photos += [np.array(Image.open(drive / f"{i:02d}_test.tif").convert("RGB")) for i in (1, 4, 7)]
    for a in photos:
        assert estimate_fov_geometry(a)[0].mean() < 0.9  # the whole photograph has its surround
        for crop in _inner_crops(a):
            mask, geom = estimate_fov_geometry(crop)
            assert mask.all() and geom.radius == min(crop.shape[:2]) / 2  # the documented fallback
