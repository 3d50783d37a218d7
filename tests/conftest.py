"""Shared fixtures. Tests that need the real datasets use ``data_root`` and skip (with a reason) when
``../shared/data`` (or ``$FUNDUS_DATA``) is absent; when present they run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def data_root() -> Path:
    from fundus_pipeline.datasets import default_data_root

    root = default_data_root()
    if not (root / "DRIVE").is_dir():
        pytest.skip(f"datasets not found at {root} (set FUNDUS_DATA or place them in ../shared/data)")
    return root


def synthetic_fundus(h: int = 96, w: int = 96, seed: int = 0) -> np.ndarray:
    """A fundus-like uint8 RGB image: orange disc on black with a bright optic disc and dark vessels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = h / 2, w / 2, 0.46 * min(h, w)
    d = np.hypot(yy - cy, xx - cx)
    img = np.zeros((h, w, 3), np.float32)
    inside = d <= r
    shade = 1.0 - 0.35 * (d / r) ** 2
    img[..., 0] = 0.80 * shade
    img[..., 1] = 0.40 * shade
    img[..., 2] = 0.18 * shade
    od = np.hypot(yy - cy, xx - (cx + 0.45 * r)) < 0.14 * r
    img[od] = [0.98, 0.9, 0.6]
    for k in range(5):
        a = rng.uniform(0, np.pi)
        dist = np.abs((yy - cy) * np.cos(a) - (xx - cx - 0.45 * r) * np.sin(a))
        img[dist < max(1.0, 0.012 * min(h, w))] *= 0.6
    img[~inside] = 0
    img += rng.normal(0, 0.01, img.shape).astype(np.float32) * inside[..., None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
