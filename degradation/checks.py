"""The checks of the library's array arguments: a wrong array is a ``TypeError`` or ``ValueError`` that says
what is wrong, never a silently wrong result (a float image in [0, 255] clipped to white, a 0/255 mask that
scales the output, a channels-first array read as a 3-pixel-high image, a NaN scored as a perfect match).

Used by ``Degrader.apply`` and ``estimate_fov_geometry`` here, and by ``fundus_pipeline``'s ``predict_native``,
``enhance_native`` and ``score_pair``; the lower-level helpers behind them (``predict_tiled``,
``apply_banded``) check less. Numpy only, as the rest of the package."""

from __future__ import annotations

from typing import Any

import numpy as np

#: How far outside [0, 1] a float image may stray (rounding of an upstream float operation) before it is
#: taken for an image on another scale.
RANGE_TOLERANCE = 1e-3


def as_array(x: Any) -> np.ndarray:
    """``x`` as a numpy array; a torch tensor (any device, with or without gradients) as its CPU values."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def unit_image(x: Any, name: str = "image", channels: int = 3) -> np.ndarray:
    """``x`` (H×W×``channels``, float, finite, in [0, 1]) as a numpy array, unchanged; else a ``TypeError``
    (not float) or ``ValueError`` (shape, NaN, range) naming ``name`` and the fix."""
    a = as_array(x)
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array in [0, 1], got dtype {a.dtype}; convert an integer image with "
                        f"fundus_pipeline.io.to_float_rgb, or divide it by 255 (65535 for 16 bits)")
    if a.ndim != 3 or a.shape[2] != channels:
        hint = ""
        if a.ndim == 3 and a.shape[0] == channels and a.shape[2] != channels:
            hint = " (channels first? use x.transpose(1, 2, 0))"
        elif a.ndim == 2 and channels == 3:
            hint = " (a grey image? repeat it: np.repeat(x[..., None], 3, axis=2))"
        raise ValueError(f"{name} must be H×W×{channels}, got shape {a.shape}{hint}")
    if a.size == 0:
        raise ValueError(f"{name} is empty (shape {a.shape})")
    lo, hi = float(a.min()), float(a.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name} holds NaN or infinite values")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        hint = "; divide by 255 (65535 for 16 bits)" if hi > 1.5 else ""
        raise ValueError(f"{name} must lie in [0, 1], its values span [{lo:.4g}, {hi:.4g}]{hint}")
    return a


def binary_mask(x: Any, shape: tuple[int, ...], name: str = "fov_mask") -> np.ndarray:
    """``x`` (H×W, any non-zero value inside: bool, 0/1 or 0/255) as a bool array of ``shape``."""
    a = as_array(x)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must be H×W {tuple(shape)} as the image, got shape {a.shape}")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return a if a.dtype == np.bool_ else a != 0


def unit_mask(x: Any, shape: tuple[int, ...], name: str = "fov_soft") -> np.ndarray:
    """``x`` (H×W weights in [0, 1], a soft mask) as float32 of ``shape``; a bool mask is taken as 0/1, and a
    0/255 mask is refused (it would scale what it multiplies)."""
    a = as_array(x)
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must be H×W {tuple(shape)} as the image, got shape {a.shape}")
    a = a.astype(np.float32, copy=False)
    if a.size:
        lo, hi = float(a.min()), float(a.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"{name} holds NaN or infinite values")
        if lo < 0 or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(f"{name} must hold weights in [0, 1], its values span [{lo:.4g}, {hi:.4g}]"
                             + ("; a 0/255 mask: use mask > 0, or degradation.soft_fov_mask" if hi > 1.5 else ""))
    return a
