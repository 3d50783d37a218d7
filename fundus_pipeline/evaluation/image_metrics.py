"""Full-reference image-quality metrics inside a field-of-view mask: PSNR, SSIM, MS-SSIM, CIEDE2000.

Conventions shared by every function:

* ``pred`` and ``ref`` are HxWx3 RGB float arrays with values in [0, 1] (data range 1), e.g. from
  ``fundus_pipeline.io.to_float_rgb``; ``mask`` is an HxW FOV mask (nonzero = inside). They are scored at
  the resolution they are given in.
* Pixels outside the mask never influence a score: before any window is applied, both images are set to 0
  outside the mask, so a window straddling the FOV border sees 0 (in both images) beyond it; window-based
  maps are then averaged over the mask pixels only. At MS-SSIM's coarser scales the 2x2 average pooling
  mixes only those zeroed images (a pooled pixel with one of its four sources in the FOV holds a quarter
  of its value), and the pooled mask keeps the pixels with at least half of their sources inside.
* Arithmetic is in the inputs' floating precision (float32 for images read from files: the fast path),
  sums and means are accumulated in float64.
* An empty mask is a ``ValueError`` (every figure would be NaN; it had been returned so).

:func:`score_pair` computes all four (sharing the scale-1 SSIM statistics); the exact definitions are in
each function's docstring and, in words for reports, in :data:`DEFINITIONS`.
"""

from __future__ import annotations

from typing import Literal, overload

import cv2
import numpy as np

from degradation.checks import binary_mask, unit_image

PSNR_CAP_DB = 100.0
#: Gaussian window of SSIM: sigma 1.5 px, truncated at 3.5 sigma (radius 5, 11 taps), as skimage's
#: ``structural_similarity(gaussian_weights=True)``.
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)
SSIM_WIN = 2 * SSIM_RADIUS + 1
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_C1, SSIM_C2 = SSIM_K1**2, SSIM_K2**2  # data range 1
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
METRIC_KEYS = ("psnr", "ssim", "ms_ssim", "ciede2000")
CIEDE_CHUNK_PIXELS = 1 << 18  # CIEDE2000 is computed in bands of rows of about this many pixels

DEFINITIONS: dict[str, str] = {
    "psnr": (
        f"PSNR = 10 log10(1 / MSE) dB, data range 1; MSE = mean of the squared differences over all three RGB "
        f"values of the FOV pixels; capped at {PSNR_CAP_DB:g} dB (identical images score {PSNR_CAP_DB:g})."
    ),
    "ssim": (
        f"SSIM (Wang et al. 2004) per RGB channel: Gaussian window sigma {SSIM_SIGMA} px truncated at 3.5 sigma "
        f"({SSIM_WIN}x{SSIM_WIN} taps, reflect border), K1 {SSIM_K1}, K2 {SSIM_K2}, data range 1, population "
        "(co)variances; the SSIM map is the mean of the three channel maps, averaged over the FOV pixels, no "
        "border crop (with a full-frame FOV the map equals skimage structural_similarity(gaussian_weights=True, sigma=1.5, "
        "use_sample_covariance=False, data_range=1, full=True))."
    ),
    "ms_ssim": (
        "MS-SSIM (Wang et al. 2003) per RGB channel, then the mean over channels: 5 scales, weights "
        f"{MS_SSIM_WEIGHTS}, 2x2 average-pool downsampling between scales (an odd last row/column is dropped; "
        "the FOV mask is pooled the same way and kept where >= 0.5); contrast-structure term at scales 1-4, "
        "luminance x contrast-structure (= SSIM) at the last scale, each averaged over the FOV at that scale and "
        "clipped at >= 0 before the power; SSIM window and constants as for ssim. Only the leading scales whose "
        f"image is at least {SSIM_WIN} px on its shorter side (and whose FOV is not empty) are used, with their "
        "weights renormalised to sum to 1."
    ),
    "ciede2000": (
        "Mean CIEDE2000 colour difference (kL = kC = kH = 1) over the FOV pixels; RGB taken as sRGB-encoded, "
        "D65, converted to CIELAB by skimage.color.rgb2lab, differences by skimage.color.deltaE_ciede2000."
    ),
}


# --------------------------------------------------------------------------------------------- helpers
def _prepare(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred, ref) as floats (float32 at least) set to 0 outside the mask, and the mask as bool. The images
    must be float HxWx3 in [0, 1] (the metrics' data range is 1): an integer or [0, 255] image, or a NaN, is
    a ``TypeError`` or ``ValueError``, not a wrong figure; so is an empty mask."""
    pred, ref = unit_image(pred, "pred"), unit_image(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"shapes differ: pred {pred.shape}, ref {ref.shape}")
    m = np.ascontiguousarray(binary_mask(mask, pred.shape[:2], "mask"))
    if not m.any():  # every figure would be NaN (campaign 27b F5)
        raise ValueError("mask is empty: no pixel to compare")
    dtype = np.result_type(pred.dtype, ref.dtype, np.float32)
    keep = m[..., None]
    zero = dtype.type(0)
    return np.where(keep, pred.astype(dtype, copy=False), zero), np.where(keep, ref.astype(dtype, copy=False), zero), m


def _blur(a: np.ndarray) -> np.ndarray:
    """The SSIM window, per channel (scipy ``mode='reflect'`` is OpenCV ``BORDER_REFLECT``)."""
    return cv2.GaussianBlur(a, (SSIM_WIN, SSIM_WIN), SSIM_SIGMA, sigmaY=SSIM_SIGMA, borderType=cv2.BORDER_REFLECT)


def _ssim_terms(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel luminance and contrast-structure maps (HxWx3 each); SSIM = luminance x cs.

    The (co)variances are shift-invariant, so they are computed on the images minus their channel means:
    the same values as skimage's ``E[x^2] - E[x]^2`` with far less float32 cancellation. Operations are in
    place where possible (full-size temporaries are the cost on large images).
    """
    a = np.asarray(cv2.mean(x)[:3], x.dtype)
    b = np.asarray(cv2.mean(y)[:3], y.dtype)
    xc, yc = x - a, y - b
    ux, uy = _blur(xc), _blur(yc)
    t = np.multiply(xc, xc)
    vx = _blur(t)
    vx -= np.multiply(ux, ux, out=t)
    vy = _blur(np.multiply(yc, yc, out=t))
    vy -= np.multiply(uy, uy, out=t)
    cs = _blur(np.multiply(xc, yc, out=t))  # s_xy, then cs
    cs -= np.multiply(ux, uy, out=t)
    del xc, yc
    cs *= 2
    cs += SSIM_C2
    vx += vy
    vx += SSIM_C2
    cs /= vx
    ux += a
    uy += b
    lum = np.multiply(ux, uy, out=t)
    lum *= 2
    lum += SSIM_C1
    ux *= ux
    uy *= uy
    ux += uy
    ux += SSIM_C1
    lum /= ux
    return lum, cs


def _pool2(a: np.ndarray) -> np.ndarray:
    """2x2 average pooling (an odd last row/column is dropped); INTER_AREA at exactly half size."""
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return cv2.resize(a[: 2 * h, : 2 * w], (w, h), interpolation=cv2.INTER_AREA)


def _channel_mean(a: np.ndarray) -> np.ndarray:
    """HxWx3 -> HxW mean of the three channels."""
    return cv2.transform(a, np.full((1, 3), 1.0 / 3.0))


def _masked_mean(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per-channel mean over the (bool, non-empty) mask pixels, accumulated in float64 (OpenCV)."""
    return np.asarray(cv2.mean(a, mask=m.view(np.uint8))[: a.shape[2] if a.ndim == 3 else 1])


# --------------------------------------------------------------------------------------------- on prepared arrays
def _psnr(x: np.ndarray, y: np.ndarray, m: np.ndarray) -> float:
    n = 3 * int(np.count_nonzero(m))
    if n == 0:
        return float("nan")
    mse = cv2.norm(x, y, cv2.NORM_L2SQR) / n  # float64 sum; both images are 0 outside the mask
    if not np.isfinite(mse):  # min(cap, nan) would be the cap: a perfect score
        return float("nan")
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10.0 * float(np.log10(1.0 / mse)))


def _ssim_score(lum: np.ndarray, cs: np.ndarray, m: np.ndarray) -> tuple[float, np.ndarray]:
    smap = _channel_mean(lum * cs)
    return (float(_masked_mean(smap, m)[0]) if m.any() else float("nan")), smap


def _ms_ssim(x: np.ndarray, y: np.ndarray, m: np.ndarray, scale1: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    terms: list[np.ndarray] = []  # per scale: the (3,) channel means of cs (of SSIM at the last scale)
    last: tuple[np.ndarray, np.ndarray] | None = None  # (SSIM map, mask) of the latest scale
    for j in range(len(MS_SSIM_WEIGHTS)):
        if j:
            x, y = _pool2(x), _pool2(y)
            m = _pool2(m.astype(np.float32)) >= 0.5
        if min(m.shape) < SSIM_WIN or not m.any():
            break
        lum, cs = scale1 if (j == 0 and scale1 is not None) else _ssim_terms(x, y)
        terms.append(_masked_mean(cs, m))
        last = (lum * cs, m)
    if last is None:
        return float("nan")
    terms[-1] = _masked_mean(*last)
    w = np.asarray(MS_SSIM_WEIGHTS[: len(terms)])
    w = w / w.sum()
    per_channel = np.prod(np.maximum(np.stack(terms), 0.0) ** w[:, None], axis=0)
    return float(per_channel.mean())


def _ciede2000(x: np.ndarray, y: np.ndarray, m: np.ndarray) -> float:
    from skimage.color import deltaE_ciede2000, rgb2lab

    n = int(np.count_nonzero(m))
    if n == 0:
        return float("nan")
    total = 0.0
    step = max(1, CIEDE_CHUNK_PIXELS // m.shape[1])
    for r in range(0, m.shape[0], step):  # bands of rows: small temporaries (skimage allocates many)
        mb = m[r : r + step]
        if not mb.any():
            continue
        lab_x = rgb2lab(x[r : r + step][mb][:, None, :])  # FOV pixels only, as an Nx1 image
        lab_y = rgb2lab(y[r : r + step][mb][:, None, :])
        total += float(np.sum(deltaE_ciede2000(lab_y, lab_x), dtype=np.float64))
    return total / n


# --------------------------------------------------------------------------------------------- metrics
def psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB inside ``mask``, data range 1.

    ``10 * log10(1 / MSE)`` with MSE the mean of ``(pred - ref) ** 2`` over all three RGB values of the mask
    pixels, capped at 100 dB (so MSE == 0, identical images, gives 100). An empty mask is a ``ValueError``.
    """
    return _psnr(*_prepare(pred, ref, mask))


@overload
def ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, *, full: Literal[False] = ...) -> float: ...
@overload
def ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, *, full: Literal[True]) -> tuple[float, np.ndarray]: ...
def ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray, *, full: bool = False) -> float | tuple[float, np.ndarray]:
    """Mean structural similarity inside ``mask`` (and, with ``full=True``, the HxW SSIM map).

    Per RGB channel, with Gaussian-weighted local statistics (sigma 1.5, truncated at 3.5 sigma: an 11x11
    window; reflect border; population, not sample, (co)variances) ``mu_x, mu_y, s_x^2, s_y^2, s_xy``:
    ``SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))`` with
    ``C1 = 0.01^2, C2 = 0.03^2`` (data range 1): skimage's ``structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=1, full=True)`` map. The map is the mean of the three
    channel maps; the score is its mean over the mask pixels, without skimage's border crop (both images are
    0 outside the mask, see the module doc). An empty mask is a ``ValueError``.
    """
    x, y, m = _prepare(pred, ref, mask)
    score, smap = _ssim_score(*_ssim_terms(x, y), m)
    return (score, smap) if full else score


def ms_ssim(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Multi-scale SSIM (Wang, Simoncelli & Bovik 2003) inside ``mask``.

    Scales j = 1..5 with weights ``w = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)``; between scales the images
    and the mask are 2x2 average-pooled (an odd last row/column is dropped) and the pooled mask is kept where
    >= 0.5. Per RGB channel, ``cs_j`` is the contrast-structure map ``(2 s_xy + C2) / (s_x^2 + s_y^2 + C2)``
    (window and constants of :func:`ssim`) averaged over the mask at scale j, and at the last scale M the
    SSIM map (luminance x cs) averaged likewise; each term is clipped at >= 0, and
    ``MS-SSIM_c = prod_{j<M} cs_j ** w_j * ssim_M ** w_M``; the result is the mean over the three channels.
    Scales are used while the image is at least 11 px on its shorter side and the pooled mask is not empty;
    when fewer than 5 are used, their weights are renormalised to sum to 1. NaN when even scale 1 is unusable.
    """
    return _ms_ssim(*_prepare(pred, ref, mask))


def ciede2000(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Mean CIEDE2000 colour difference over the mask pixels.

    RGB values are taken as sRGB-encoded (D65), converted to CIELAB by ``skimage.color.rgb2lab`` (only the
    mask pixels are converted) and compared by ``skimage.color.deltaE_ciede2000`` (kL = kC = kH = 1).
    An empty mask is a ``ValueError``.
    """
    return _ciede2000(*_prepare(pred, ref, mask))


def score_pair(pred_rgb: np.ndarray, ref_rgb: np.ndarray, fov_mask: np.ndarray) -> dict[str, float | int]:
    """All metrics of one enhanced image against its reference, inside the FOV, at the given resolution.

    Returns ``{"psnr", "ssim", "ms_ssim", "ciede2000", "fov_fraction", "width", "height"}``: the four
    metrics as :func:`psnr`, :func:`ssim`, :func:`ms_ssim` and :func:`ciede2000` define them (identical
    values; the scale-1 SSIM statistics are computed once), the fraction of the frame inside the FOV and
    the image size. Raises ``ValueError`` when the shapes differ or the mask is empty.
    """
    x, y, m = _prepare(pred_rgb, ref_rgb, fov_mask)
    lum, cs = _ssim_terms(x, y)
    return {
        "psnr": _psnr(x, y, m),
        "ssim": _ssim_score(lum, cs, m)[0],
        "ms_ssim": _ms_ssim(x, y, m, scale1=(lum, cs)),
        "ciede2000": _ciede2000(x, y, m),
        "fov_fraction": float(np.count_nonzero(m)) / m.size,
        "width": int(m.shape[1]),
        "height": int(m.shape[0]),
    }
