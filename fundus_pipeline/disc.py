"""A classical optic-disc locator (no training): the disc is the brightest large blob inside the FOV where
the vessel tree converges. Used to place Cofe-Net's optic-disc loss region on training photographs that
have no marked disc (DRIVE, HRF); checked against the 169 hand-marked optic-nerve centres of HEI-MED
(``scripts/check_disc_locator.py``; the figure is in weights/README.md).

Score map (canonical frame of side ``n``): z-scored Gaussian-blurred luminance (sigma 0.025 n) plus
z-scored Gaussian-blurred vessel density (sigma 0.05 n), inside the FOV shrunk to 0.9 of its radius;
the centre is the arg-max. The loss region is the square of side ``DISC_BOX`` x FOV diameter around it.
"""

from __future__ import annotations

import cv2
import numpy as np

DISC_BOX = 0.25  # side of the disc loss box as a fraction of the FOV diameter (the disc itself is ~0.15)


def _z(v: np.ndarray, m: np.ndarray) -> np.ndarray:
    vals = v[m]
    return (v - vals.mean()) / (vals.std() + 1e-6)


def locate_disc(rgb: np.ndarray, fov: np.ndarray, vessels: np.ndarray | None = None) -> tuple[float, float]:
    """(x, y) of the optic-disc centre in a square canonical image (float32 RGB in [0,1], bool FOV mask,
    optional vessel probability map)."""
    n = rgb.shape[0]
    lum = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    yy, xx = np.mgrid[:n, :n]
    c = (n - 1) / 2.0
    inner = fov & (((xx - c) ** 2 + (yy - c) ** 2) <= (0.9 * n / 2) ** 2)
    if inner.sum() < 16:
        return c, c
    score = _z(cv2.GaussianBlur(lum * fov, (0, 0), 0.025 * n), inner)
    if vessels is not None:
        score = score + _z(cv2.GaussianBlur(vessels.astype(np.float32) * fov, (0, 0), 0.05 * n), inner)
    score[~inner] = -np.inf
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return float(x), float(y)


def disc_box_mask(x: float, y: float, size: int, box: float = DISC_BOX) -> np.ndarray:
    """Bool size x size mask of the disc loss box (side ``box`` x size) centred on (x, y)."""
    half = box * size / 2.0
    m = np.zeros((size, size), bool)
    x0, x1 = int(max(0, round(x - half))), int(min(size, round(x + half)))
    y0, y1 = int(max(0, round(y - half))), int(min(size, round(y + half)))
    m[y0:y1, x0:x1] = True
    return m
