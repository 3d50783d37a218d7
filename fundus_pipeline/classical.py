"""Classical (non-learned) enhancers on float32 RGB in [0, 1] with a FOV mask: the baselines of the
enhancement benchmark, and the classical and deliberately harmful enhancers of the quality set
(``fundus build quality-set``).

Each is ``f(rgb, fov_mask) -> rgb`` at the resolution it is given, deterministic, clipped to [0, 1] and
0 outside the FOV. Filter sizes are in pixels of the quality set's 512 canonical frame (FOV diameter 512).
``HELPFUL`` are meant to help (or be neutral), ``HARMFUL`` to damage the retina in a known way.
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from fundus_pipeline.io import LUMA


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


def _finish(out: np.ndarray, fov: np.ndarray) -> np.ndarray:
    return (np.clip(out, 0, 1) * fov[..., None]).astype(np.float32)


def _gauss(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(rgb.astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def gamma(rgb: np.ndarray, fov: np.ndarray, target: float = 0.45) -> np.ndarray:
    """Exposure correction: ``rgb ** g`` with ``g = log(target) / log(mean luminance in the FOV)`` (BT.601 Y),
    so the mean luminance moves to about ``target``; g is clipped to [0.4, 2.5]."""
    y = (rgb @ LUMA)[fov]
    mean = float(np.clip(y.mean(), 1e-3, 0.999)) if y.size else target
    g = float(np.clip(np.log(target) / np.log(mean), 0.4, 2.5))
    return _finish(np.power(np.clip(rgb, 0, 1), g), fov)


def unsharp(rgb: np.ndarray, fov: np.ndarray, sigma: float = 2.0, amount: float = 0.8) -> np.ndarray:
    """Unsharp masking: ``rgb + amount * (rgb - Gaussian_sigma(rgb))`` (sigma 2 px, amount 0.8)."""
    return _finish(rgb + amount * (rgb - _gauss(rgb, sigma)), fov)


def denoise(rgb: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Edge-preserving denoising: OpenCV's bilateral filter (9 px neighbourhood, colour sigma 0.06, space sigma 3 px)."""
    return _finish(cv2.bilateralFilter(rgb.astype(np.float32), 9, 0.06, 3.0), fov)


def oversharpen(rgb: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Harmful: unsharp masking far too strong and wide (sigma 4 px, amount 4): bright and dark halos
    around vessels and the disc, amplified noise."""
    return unsharp(rgb, fov, sigma=4.0, amount=4.0)


def blur(rgb: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Harmful: a strong Gaussian blur (sigma 3 px) that erases the small vessels."""
    return _finish(_gauss(rgb, 3.0), fov)


def colour_cast(rgb: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Harmful: a strong colour cast (R x 1.25, G x 0.8, B x 0.55) that keeps the structure but not the colours."""
    return _finish(rgb * np.array([1.25, 0.8, 0.55], np.float32), fov)


HELPFUL: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "identity": identity,
    "clahe": clahe,
    "gamma": gamma,
    "unsharp": unsharp,
    "denoise": denoise,
}
HARMFUL: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"oversharpen": oversharpen, "blur": blur, "colour_cast": colour_cast}
CLASSICAL: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {**HELPFUL, **HARMFUL}
