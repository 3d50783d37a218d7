"""Classical (non-learned) enhancers on float32 RGB in [0, 1] with a FOV mask: the baselines of the
enhancement benchmark (and, with the harmful ones to come, enhancers of the quality set).

Each is ``f(rgb, fov_mask) -> rgb`` at native resolution, 0 outside the FOV.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np


def identity(rgb: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """The degraded input itself, masked to the FOV."""
    return rgb * fov[..., None]


def clahe(rgb: np.ndarray, fov: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """CLAHE on the L channel of CIELAB (OpenCV, 16-bit L, clip limit 2, 8x8 tiles over the image), the
    usual fundus contrast enhancement; colour (a, b) unchanged."""
    lab = cv2.cvtColor(np.clip(rgb, 0, 1).astype(np.float32), cv2.COLOR_RGB2LAB)
    l16 = np.clip(lab[..., 0] / 100.0 * 65535.0, 0, 65535).astype(np.uint16)
    l16 = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles)).apply(l16)
    lab[..., 0] = l16.astype(np.float32) / 65535.0 * 100.0
    out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return np.clip(out, 0, 1) * fov[..., None]


CLASSICAL: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"identity": identity, "clahe": clahe}
