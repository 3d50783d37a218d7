"""Degradations met in clinical fundus photography beyond the Cofe-Net model.

Every op is a pair ``sample(rng, cfg) -> dict`` (JSON-able) and ``apply(img, rec, ctx) -> img`` (pure).
``cfg`` holds ``*_range`` pairs (validated in :mod:`degradation.recipe`). Lengths are given in
*canonical* pixels (the 512-pixel FOV-cropped frame) and scaled by ``s = 2·radius/512`` at apply time,
so a 3504×2336 photograph gets the same relative degradation as a 512 crop. Noise is per native pixel
(it is a sensor property) and drawn from a sub-seed stored in the record, so replay is exact.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .functional import Frame, blur_in_place, disc_psf, line_psf, row_chunks, smooth_blur


class OpCtx:
    def __init__(self, frame: Frame, region: np.ndarray, levels: int, owned: bool = False):
        self.frame = frame
        self.region = region
        self.levels = int(levels)
        self.owned = owned  # the ops may overwrite their input (the caller's working copy): fewer full-size arrays


def _u(rng: np.random.Generator, r) -> float:
    lo, hi = r
    return float(lo + (hi - lo) * rng.random())


# ---------------------------------------------------------------------------------------------------
# Sensor noise
# ---------------------------------------------------------------------------------------------------


def sample_noise(rng, cfg: dict) -> dict:
    """Signal-dependent sensor noise (Poisson–Gaussian).

    Physics: photon shot noise has a variance proportional to the signal (Poisson, gain ``a``), read-out
    and dark-current noise add a constant variance ``b``: ``var(x) = a·x + b`` (Foi et al. 2008). Fundus
    cameras with small pupils or low flash energy run at high ISO, which raises both. Typical ranges:
    ``a ∈ [0, 0.01]``, ``b ∈ [0, 1e-4]`` (σ up to ~0.1 at mid grey).
    """
    return {"a": _u(rng, cfg["a_range"]), "b": _u(rng, cfg["b_range"]), "seed": int(rng.integers(0, 2**63 - 1))}


def apply_noise(img: np.ndarray, rec: dict, ctx: OpCtx) -> np.ndarray:
    a, b = float(rec["a"]), float(rec["b"])
    if a == 0.0 and b == 0.0:
        return img.copy()
    g = np.random.Generator(np.random.PCG64(int(rec["seed"])))
    out = img if ctx.owned and img.dtype == np.float32 else np.empty_like(img, dtype=np.float32)
    for rows in row_chunks(img.shape[0], img.shape[1]):  # fixed chunking: the stream order is fixed
        x = img[rows]
        out[rows] = noisy(x, rec, g.standard_normal(x.shape, dtype=np.float32))
    return out


def noisy(x: np.ndarray, rec: dict, z: np.ndarray) -> np.ndarray:
    """``x`` plus signal-dependent noise from the standard normal draws ``z`` (a new array, clipped)."""
    std = x * np.float32(rec["a"])
    std += np.float32(rec["b"])
    np.maximum(std, 0.0, out=std)
    np.sqrt(std, out=std)
    std *= z
    std += x
    return np.clip(std, 0.0, 1.0, out=std)


# ---------------------------------------------------------------------------------------------------
# JPEG compression
# ---------------------------------------------------------------------------------------------------


def sample_jpeg(rng, cfg: dict) -> dict:
    """JPEG compression artefacts (8×8 block edges, ringing, chroma bleeding).

    Physics/practice: screening programmes and tele-ophthalmology store and transmit fundus photographs
    as JPEG, often re-compressed at low quality. Quality is drawn as an integer in ``quality_range``
    (1..100; 95 is the cv2 default and nearly lossless, 30 shows clear blocking). Applied on the 8-bit
    image with cv2.imencode/imdecode (the result has 8-bit precision even for 16-bit outputs).
    """
    lo, hi = cfg["quality_range"]
    return {"quality": int(rng.integers(int(lo), int(hi), endpoint=True))}


def apply_jpeg(img: np.ndarray, rec: dict, ctx: OpCtx) -> np.ndarray:
    u8 = np.empty(img.shape, np.uint8)
    for rows in row_chunks(img.shape[0], img.shape[1]):  # by row bands: no full-size float temporaries
        u8[rows] = np.rint(np.clip(img[rows], 0, 1) * 255.0)
    ok, buf = cv2.imencode(".jpg", u8[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rec["quality"])])
    if not ok:  # pragma: no cover - cv2 always encodes a valid uint8 RGB array
        raise RuntimeError("JPEG encoding failed")
    del u8
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    if ctx.owned and img.dtype == np.float32:
        np.divide(dec, np.float32(255.0), out=img, dtype=np.float32)
        return img
    return dec.astype(np.float32) / np.float32(255.0)


# ---------------------------------------------------------------------------------------------------
# Defocus and motion blur
# ---------------------------------------------------------------------------------------------------


def sample_defocus(rng, cfg: dict) -> dict:
    """Defocus blur: the geometric-optics PSF of an out-of-focus camera is a uniform disc (pillbox) whose
    radius grows with the focus error (patient refraction not compensated, wrong working distance).
    ``radius_range`` in canonical pixels, e.g. [0, 6] (6 px ≈ 1.2 % of the FOV diameter)."""
    return {"radius": _u(rng, cfg["radius_range"])}


def _filter(img: np.ndarray, k: np.ndarray, owned: bool = False) -> np.ndarray:
    if k.shape == (1, 1):
        return img if owned else img.copy()

    def filt(a: np.ndarray) -> np.ndarray:
        return cv2.filter2D(a, -1, k, borderType=cv2.BORDER_REFLECT_101)

    out = blur_in_place(img, filt, k.shape[0] // 2) if owned else filt(img)  # in place: the same values, by row bands
    return np.clip(out, 0.0, 1.0, out=out)


def psf(rec: dict, kind: str, frame: Frame) -> np.ndarray:
    """The native-pixel PSF of a defocus or motion record."""
    if kind == "defocus":
        return disc_psf(frame.length(rec["radius"]))
    return line_psf(frame.length(rec["length"]), float(rec["angle"]))


def apply_defocus(img: np.ndarray, rec: dict, ctx: OpCtx) -> np.ndarray:
    return _filter(img, psf(rec, "defocus", ctx.frame), ctx.owned)


def sample_motion(rng, cfg: dict) -> dict:
    """Motion blur: eye or head movement (saccades, fixation loss) during the exposure smears the image
    along a line; the PSF is a segment of ``length`` canonical pixels at ``angle`` degrees.
    Typical: length [0, 15], angle [0, 180)."""
    return {"length": _u(rng, cfg["length_range"]), "angle": _u(rng, cfg["angle_range"])}


def apply_motion(img: np.ndarray, rec: dict, ctx: OpCtx) -> np.ndarray:
    return _filter(img, psf(rec, "motion", ctx.frame), ctx.owned)


# ---------------------------------------------------------------------------------------------------
# Small-pupil vignetting
# ---------------------------------------------------------------------------------------------------


def sample_vignetting(rng, cfg: dict) -> dict:
    """Small-pupil vignetting: with a non-dilated or small pupil the illumination and imaging beams are
    partly blocked by the iris, so the periphery of the field darkens. Modelled as a radial gain
    ``1 − strength·ρ^power`` (ρ = distance to the FOV centre / FOV radius, optionally decentred by
    ``offset`` FOV radii in a random direction). Typical: strength [0, 0.7], power [1.5, 4],
    offset [0, 0.2]."""
    return {
        "strength": _u(rng, cfg["strength_range"]),
        "power": _u(rng, cfg["power_range"]),
        "offset": _u(rng, cfg["offset_range"]),
        "direction": float(rng.uniform(0.0, 360.0)),
    }


def apply_vignetting(img: np.ndarray, rec: dict, ctx: OpCtx, y0: int = 0) -> np.ndarray:
    """``y0``: the native row of ``img``'s first row (a band of a larger photograph)."""
    fov = ctx.frame.fov
    th = math.radians(rec["direction"])
    cx = fov.cx + rec["offset"] * fov.radius * math.cos(th)
    cy = fov.cy + rec["offset"] * fov.radius * math.sin(th)
    out = img if ctx.owned else np.empty(img.shape, np.result_type(img.dtype, np.float32))
    dx2 = (np.arange(img.shape[1])[None, :] - cx) ** 2
    for rows in row_chunks(img.shape[0], img.shape[1]):  # the gain per row band: no full-size temporaries
        yy = np.arange(y0 + rows.start, y0 + rows.stop)[:, None]
        rho = np.sqrt((dx2 + (yy - cy) ** 2).astype(np.float32)) / np.float32(fov.radius)
        gain = 1.0 - np.float32(rec["strength"]) * np.minimum(rho, 1.0) ** np.float32(rec["power"])
        out[rows] = img[rows] * np.clip(gain, 0.0, 1.0)[..., None].astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


# ---------------------------------------------------------------------------------------------------
# Cataract-like haze
# ---------------------------------------------------------------------------------------------------


def sample_haze(rng, cfg: dict) -> dict:
    """Cataract-like haze: an opaque lens scatters light. Part of the light reaches the sensor directly
    (transmission ``t``), the rest forms a veil: a uniform yellowish airlight ``A·tint`` (lens yellowing)
    mixed with a wide-blurred copy of the image (forward-scattered glare, Gaussian ``glare_sigma``
    canonical px, dark surroundings): ``I' = t·I + (1 − t)·((1 − m)·A·tint + m·blur(I))``. Lowers
    contrast and sharpness.
    Typical: t [0.5, 1], A [0.3, 0.8], glare_sigma [10, 40], m [0, 0.8]."""
    return {
        "t": _u(rng, cfg["t_range"]),
        "airlight": _u(rng, cfg["airlight_range"]),
        "glare_sigma": _u(rng, cfg["glare_sigma_range"]),
        "glare_mix": _u(rng, cfg["glare_mix_range"]),
        "tint": [float(v) for v in cfg["tint"]],
    }


def apply_haze(img: np.ndarray, rec: dict, ctx: OpCtx) -> np.ndarray:
    t, m = np.float32(rec["t"]), np.float32(rec["glare_mix"])
    if t >= 1.0:
        return img.copy()
    glare = smooth_blur(img, ctx.frame.length(rec["glare_sigma"])) if m > 0 else None
    return haze_mix(img, glare, rec, ctx.owned)


def haze_mix(img: np.ndarray, glare: np.ndarray | None, rec: dict, owned: bool) -> np.ndarray:
    """``t·I + (1 − t)·((1 − m)·A·tint + m·glare)``, clipped (``glare`` is scaled in place)."""
    t, m = np.float32(rec["t"]), np.float32(rec["glare_mix"])
    veil = np.float32(rec["airlight"]) * np.asarray(rec["tint"], np.float32) * (np.float32(1.0) - m)
    if owned:  # the same arithmetic in the input's buffer
        img *= t
        img += (np.float32(1.0) - t) * veil
        out = img
    else:
        out = img * t + (np.float32(1.0) - t) * veil
    if glare is not None:
        glare *= (np.float32(1.0) - t) * m
        out += glare
    return np.clip(out, 0.0, 1.0, out=out)


# ---------------------------------------------------------------------------------------------------
# Exposure errors
# ---------------------------------------------------------------------------------------------------


def sample_exposure(rng, cfg: dict) -> dict:
    """Exposure error: flash energy or sensor gain set wrong. ``I' = clip(gain·I^gamma)``.
    Over-exposure (gain [1, 1.8], gamma [0.7, 1]) washes out the optic disc and clips highlights;
    under-exposure (gain [0.3, 1], gamma [1, 1.6]) crushes the dark periphery and vessels into noise."""
    return {"gain": _u(rng, cfg["gain_range"]), "gamma": _u(rng, cfg["gamma_range"])}


def apply_exposure(img: np.ndarray, rec: dict, ctx: OpCtx) -> np.ndarray:
    g, gm = np.float32(rec["gain"]), np.float32(rec["gamma"])
    if gm == 1.0:
        out = img if ctx.owned else img.copy()
        out *= g
        return np.clip(out, 0.0, 1.0, out=out)
    src = np.ascontiguousarray(img, dtype=np.float32)
    out = cv2.pow(src, float(gm), dst=src if ctx.owned and src is img else None)
    out *= g
    return np.clip(out, 0.0, 1.0, out=out)


OPS = {
    "noise": (sample_noise, apply_noise),
    "jpeg": (sample_jpeg, apply_jpeg),
    "defocus": (sample_defocus, apply_defocus),
    "motion": (sample_motion, apply_motion),
    "vignetting": (sample_vignetting, apply_vignetting),
    "haze": (sample_haze, apply_haze),
    "overexposure": (sample_exposure, apply_exposure),
    "underexposure": (sample_exposure, apply_exposure),
}
