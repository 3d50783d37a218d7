"""Synthetic fundus-like images for the degradation tests (no data needed)."""

from __future__ import annotations

import numpy as np

from degradation import soft_fov_mask
from degradation.fov import FovGeometry


def make_fundus(size: int = 128, height: int | None = None, width: int | None = None, seed: int = 0):
    """An orange disc with radial shading, a bright optic disc, dark vessel-like curves and fine texture.

    Returns (img float32 H×W×3 in [0,1] with black outside the FOV, FovGeometry, soft mask)."""
    h = height or size
    w = width or size
    r = size / 2
    cx, cy = w / 2, h / 2
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    rho = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
    base = np.stack([0.85 - 0.25 * rho**2, 0.45 - 0.2 * rho**2, 0.15 - 0.05 * rho], axis=-1)
    od = np.exp(-(((xx - cx + 0.45 * r) ** 2 + (yy - cy) ** 2) / (0.12 * r) ** 2))[..., None]
    base = base + 0.35 * od
    for k in range(6):
        path = cy + (0.15 + 0.1 * k) * r * np.sin((xx - cx) / r * (1.5 + 0.3 * k) + k)
        v = np.exp(-(((yy - path) / (0.012 * r + 0.5)) ** 2))[..., None]
        base = base - 0.25 * v * np.array([1.0, 0.6, 0.3], np.float32)
    tex = np.random.default_rng(seed).normal(0, 0.01, (h, w, 1)).astype(np.float32)
    img = np.clip(base + tex, 0, 1).astype(np.float32)
    fov = FovGeometry(cx, cy, r, h, w)
    binary = fov.circle_mask()
    img *= binary[..., None]
    return np.ascontiguousarray(img, dtype=np.float32), fov, soft_fov_mask(binary, fov)
