"""Pure numerical helpers shared by the degradation ops (numpy + cv2 only, no randomness).

Conventions: images are float32 ``H×W×3`` arrays in [0, 1]; masks are float32 ``H×W``. Lengths given
in *canonical* pixels refer to the 512×512 FOV-cropped frame of the Cofe-Net model; a :class:`Frame`
maps them to native pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .fov import FovGeometry

CANONICAL = 512
_BORDER = cv2.BORDER_REFLECT_101


#: Pixels per row chunk of the per-pixel ops (chunks stay in cache). The colour statistic and the noise
#: stream are defined on this grid, so the banded path (``degradation.banded``) must use the same one.
CHUNK_PIXELS = 1 << 17


def chunk_rows(width: int) -> int:
    """Rows per chunk of the fixed chunk grid (:data:`CHUNK_PIXELS` pixels, at least one row)."""
    return max(1, CHUNK_PIXELS // max(1, width))


def row_chunks(h: int, w: int):
    """Slices of rows [0, h) on the fixed chunk grid."""
    step = chunk_rows(w)
    for y in range(0, h, step):
        yield slice(y, min(h, y + step))


def make_odd(k: int) -> int:
    """The released rule: an even kernel side becomes odd by adding one."""
    k = int(k)
    return k + 1 if k % 2 == 0 else k


def gaussian_blur(x: np.ndarray, kw: int, kh: int, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur with ksize (width=kw, height=kh), the same sigma on both axes, REFLECT_101."""
    if kw <= 1 and kh <= 1:
        return x.copy()
    return cv2.GaussianBlur(x, (int(kw), int(kh)), sigmaX=float(sigma), sigmaY=float(sigma), borderType=_BORDER)


def blur_in_place(img: np.ndarray, blur, radius: int, band: int = 256) -> np.ndarray:
    """``blur(img)`` written back into ``img`` and returned, holding only a window of rows besides it.

    ``blur`` is a row-local filter with reflected image borders (``gaussian_blur``), ``radius`` its reach in
    rows. Output rows [a, b) are ``blur`` of the rows [a - radius, b + radius) (a copy, clipped to the
    image, so the image's top and bottom are reflected exactly as in one piece); a finished row is written
    back once no later band reads it. Each output value is computed from the same input values by the
    same filter as in one piece."""
    h = img.shape[0]
    if h <= band + 2 * radius:
        img[...] = blur(img)
        return img
    pending: list[tuple[int, np.ndarray]] = []  # (first row, finished rows) not yet written back
    for a in range(0, h, band):
        b = min(h, a + band)
        lo, hi = max(0, a - radius), min(h, b + radius)
        out = blur(np.ascontiguousarray(img[lo:hi]))[a - lo : b - lo]
        pending.append((a, out))
        while pending and pending[0][0] + len(pending[0][1]) <= b - radius:  # no later band reads these rows
            r0, rows = pending.pop(0)
            img[r0 : r0 + len(rows)] = rows
        if b == h:
            for r0, rows in pending:
                img[r0 : r0 + len(rows)] = rows
    return img


# ---------------------------------------------------------------------------------------------------
# Geometry: canonical 512 frame <-> native pixels
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """The canonical square (side ``2·radius`` around the FOV centre) inside a native image.

    Canonical pixel ``x_c`` lies at native ``x_n = cx − radius + x_c·s`` with ``s = 2·radius/512``.
    """

    fov: FovGeometry
    size: int = CANONICAL

    @property
    def s(self) -> float:
        return 2.0 * self.fov.radius / self.size

    @property
    def origin(self) -> tuple[float, float]:
        return (self.fov.cx - self.fov.radius, self.fov.cy - self.fov.radius)

    @property
    def is_identity(self) -> bool:
        """True when the native image *is* the canonical frame (the released setting, s = 1)."""
        f = self.fov
        return (f.height, f.width) == (self.size, self.size) and self.origin == (0.0, 0.0) and self.s == 1.0

    def to_native(self, xc: float, yc: float) -> tuple[float, float]:
        x0, y0 = self.origin
        return x0 + xc * self.s, y0 + yc * self.s

    def length(self, v: float) -> float:
        return float(v) * self.s

    def kernel(self, k: int) -> int:
        """A canonical kernel side scaled to native pixels and made odd again (>= 1)."""
        if k <= 1:
            return 1
        return make_odd(max(1, int(round(k * self.s))))

    def box(self) -> tuple[int, int, int, int, int]:
        """Native pixel box (x0, x1, y0, y1) of the canonical square clipped to the image, and the
        square's full pixel count (out-of-image parts count as black background, as in the released
        pre-processing that pads the crop to a square)."""
        f = self.fov
        ox, oy = self.origin
        side = 2.0 * f.radius
        gx0, gx1 = math.ceil(ox - 1e-9), math.ceil(ox + side - 1e-9)
        gy0, gy1 = math.ceil(oy - 1e-9), math.ceil(oy + side - 1e-9)
        area = (gx1 - gx0) * (gy1 - gy0)
        return max(gx0, 0), min(gx1, f.width), max(gy0, 0), min(gy1, f.height), area

    def warp_from_canonical(self, field: np.ndarray, factor: int = 1, pad: int = 0, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Resample a field on the canonical grid (at 1/factor resolution, padded by ``pad`` canonical
        pixels) to native pixels: bilinear, pixel-centre aligned, edge values replicated. ``rows=(a, b)``:
        only native rows [a, b) (the same mapping, shifted; OpenCV's 1/32-pixel coordinate rounding can
        differ in rare pixels)."""
        f = self.fov
        if factor == 1 and pad == 0 and self.is_identity:
            return field if rows is None else field[rows[0] : rows[1]]
        s = self.s
        ox, oy = self.origin
        a = 1.0 / (s * factor)
        bx = (-ox / s + pad + 0.5) / factor - 0.5
        by = (-oy / s + pad + 0.5) / factor - 0.5
        y0, y1 = (0, f.height) if rows is None else rows
        m = np.array([[a, 0.0, bx], [0.0, a, by + a * y0]], dtype=np.float64)
        return cv2.warpAffine(
            field, m, (f.width, y1 - y0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE
        )


def canonical_disk(cx: float, cy: float, radius: float, size: int = CANONICAL) -> np.ndarray:
    """Float32 ``size×size`` indicator of ``dist <= radius`` around integer-grid centre (cx, cy)."""
    yy, xx = np.ogrid[:size, :size]
    return (((xx - cx) ** 2 + (yy - cy) ** 2) <= radius * radius).astype(np.float32)


def work_factor(kernel_min: int, amplitude: float, exact: bool) -> int:
    """Resolution divisor for blurring a large smooth canonical field of peak ``amplitude``.

    Computing the near-box Gaussian blur at 1/f resolution (binned kernel, see
    :func:`blurred_canonical_field`) errs by at most about ``0.05·f²/ksize`` of the field (measured on
    sampled halo and hole fields, see the tests); f is chosen so that ``amplitude`` times that bound stays
    below half a level of 8-bit output (0.5/255)."""
    if exact or kernel_min < 48:
        return 1
    for f in (4, 2):
        if amplitude * 0.05 * f * f / kernel_min < 0.5 / 255:
            return f
    return 1


def _binned_kernel(k: int, sigma: float, factor: int) -> np.ndarray:
    """The cv2 Gaussian kernel (size k, sigma) re-expressed on a grid ``factor`` times coarser.

    For cell-averaged input and cell-averaged output the exact coarse weights are
    ``kc[j] = Σ_δ (factor − |δ|)/factor · k[factor·j + δ]``; using them instead of a resampled Gaussian
    keeps the near-box kernels' hard truncation (the dominant error otherwise)."""
    fine = cv2.getGaussianKernel(int(k), float(sigma), cv2.CV_64F).ravel()
    h = (int(k) - 1) // 2
    jmax = (h + factor - 1) // factor + 1
    kc = np.zeros(2 * jmax + 1)
    for j in range(-jmax, jmax + 1):
        for d in range(-(factor - 1), factor):
            t = factor * j + d
            if -h <= t <= h:
                kc[j + jmax] += (factor - abs(d)) / factor * fine[t + h]
    return (kc / kc.sum()).astype(np.float32)


def blurred_canonical_field(mask512: np.ndarray, kw: int, kh: int, sigma: float, factor: int) -> tuple[np.ndarray, int]:
    """Gaussian blur (REFLECT_101 at the canonical frame border) of a canonical 512 field.

    ``factor == 1``: exactly cv2.GaussianBlur on the 512 grid. Otherwise the field is reflect-padded by
    ``pad`` canonical pixels (so the frame-border reflection is exact), area-averaged by ``factor`` and
    blurred with the binned kernel. Returns ``(field, pad)`` for :meth:`Frame.warp_from_canonical`."""
    if factor == 1:
        return gaussian_blur(mask512, kw, kh, sigma), 0
    pad = (max(kw, kh) // 2 + 3 * factor + factor - 1) // factor * factor
    padded = cv2.copyMakeBorder(mask512, pad, pad, pad, pad, _BORDER)
    n = padded.shape[0] // factor
    small = cv2.resize(padded, (n, n), interpolation=cv2.INTER_AREA)
    kx = _binned_kernel(kw, sigma, factor) if kw > 1 else np.ones(1, np.float32)
    ky = _binned_kernel(kh, sigma, factor) if kh > 1 else np.ones(1, np.float32)
    return cv2.sepFilter2D(small, -1, kx, ky, borderType=_BORDER), pad


# ---------------------------------------------------------------------------------------------------
# PIL ImageEnhance look-alikes (brightness / contrast / saturation on quantised levels)
# ---------------------------------------------------------------------------------------------------


def quantise(x: np.ndarray, levels: int) -> np.ndarray:
    """Float [0,1] -> integer-valued float32 level in [0, levels] (round to nearest)."""
    return np.rint(np.clip(x, 0.0, 1.0) * np.float32(levels)).astype(np.float32)


def pil_luma(q: np.ndarray) -> np.ndarray:
    """PIL's RGB->L conversion on integer levels: (19595 R + 38470 G + 7471 B + 2^15) >> 16,
    i.e. round((299 R + 587 G + 114 B)/1000) in fixed point. Returns float32 levels.

    For 8-bit levels every intermediate is an integer below 2^24, hence exact in float32."""
    if float(q.max(initial=0.0)) <= 255.0:
        w = np.array([19595.0, 38470.0, 7471.0], np.float32)
        lum = q @ w
        lum += np.float32(32768.0)
        lum *= np.float32(1.0 / 65536.0)
        return np.floor(lum, out=lum)
    qi = q.astype(np.int64)
    lum = (qi[..., 0] * 19595 + qi[..., 1] * 38470 + qi[..., 2] * 7471 + 32768) >> 16
    return lum.astype(np.float32)


def pil_blend(degenerate: np.ndarray | float, q: np.ndarray, factor: float, levels: int) -> np.ndarray:
    """PIL ``Image.blend(degenerate, image, factor)`` on levels: float32 ``d + f·(q − d)``, clipped
    to [0, levels] and truncated toward zero."""
    f = np.float32(factor)
    d = np.asarray(degenerate, dtype=np.float32)
    out = np.subtract(q, d, dtype=np.float32)
    out *= f
    out += d
    np.clip(out, np.float32(0.0), np.float32(levels), out=out)
    return np.floor(out, out=out)


def pil_color(
    q: np.ndarray, brightness: float, contrast: float, saturation: float, levels: int, luma_mean: float | None = None
) -> np.ndarray:
    """Brightness, then contrast, then saturation, as torchvision's PIL path (ImageEnhance) does.

    ``q`` holds integer levels. Contrast blends with the constant ``int(mean(L) + 0.5)``; ``luma_mean``
    overrides the mean (used for native images: the mean over the equivalent canonical square)."""
    out = pil_blend(0.0, q, brightness, levels)
    if luma_mean is None:
        luma_mean = float(pil_luma(out).mean())
    grey = float(int(luma_mean + 0.5))
    out = pil_blend(grey, out, contrast, levels)
    lum = pil_luma(out)[..., None]
    return pil_blend(lum, out, saturation, levels)


# ---------------------------------------------------------------------------------------------------
# Point-spread functions for the clinical ops
# ---------------------------------------------------------------------------------------------------


def disc_psf(radius: float) -> np.ndarray:
    """Pillbox (defocus) PSF of the given radius in pixels, anti-aliased at the rim, sum 1."""
    if radius < 0.5:
        return np.ones((1, 1), np.float32)
    n = int(math.ceil(radius))
    yy, xx = np.mgrid[-n : n + 1, -n : n + 1].astype(np.float32)
    k = np.clip(radius + 0.5 - np.sqrt(xx * xx + yy * yy), 0.0, 1.0)
    return (k / k.sum()).astype(np.float32)


def line_psf(length: float, angle_deg: float) -> np.ndarray:
    """Linear motion PSF: a segment of ``length`` pixels at ``angle_deg`` (0 = horizontal), sum 1."""
    if length < 1.0:
        return np.ones((1, 1), np.float32)
    n = int(math.ceil(length / 2.0)) + 1
    k = np.zeros((2 * n + 1, 2 * n + 1), np.float64)
    th = math.radians(angle_deg)
    dx, dy = math.cos(th), -math.sin(th)
    m = max(2, int(math.ceil(length * 4)))
    for t in np.linspace(-length / 2.0, length / 2.0, m):
        x, y = n + t * dx, n + t * dy
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        k[y0, x0] += (1 - fx) * (1 - fy)
        k[y0, x0 + 1] += fx * (1 - fy)
        k[y0 + 1, x0] += (1 - fx) * fy
        k[y0 + 1, x0 + 1] += fx * fy
    return (k / k.sum()).astype(np.float32)


def _gauss_ksize(sigma: float) -> int:
    return 2 * int(math.ceil(4.0 * sigma)) + 1  # ±4σ: the truncated mass is < 1e-4


def smooth_factor(sigma: float) -> int:
    """The resolution divisor of :func:`smooth_blur` (1: a direct blur)."""
    return max(1, int(sigma // 6))


def smooth_small(small: np.ndarray, sigma: float, f: int) -> np.ndarray:
    """The blur of :func:`smooth_blur` on its 1/f-scale, area-averaged, zero-padded copy."""
    # the area average adds (f²−1)/12 and the bilinear upsampling ~f²/6 of variance: take them off
    fs = math.sqrt(max(sigma * sigma - (f * f - 1) / 12.0 - f * f / 6.0, 0.25 * f * f)) / f
    k = _gauss_ksize(fs)
    return cv2.GaussianBlur(small, (k, k), sigmaX=fs, sigmaY=fs, borderType=cv2.BORDER_CONSTANT)


def smooth_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """A wide Gaussian blur (sigma in native pixels, ±4σ) with *dark* surroundings (zero padding: no light
    comes from outside the picture), computed at reduced resolution when sigma is large (then the result
    is a view into a slightly larger array, the caller's to modify). Zero padding
    is exact on any grid, so down-blur-up stays within ~1/255 of the direct blur (tested)."""
    if sigma <= 0:
        return img.copy()
    h, w = img.shape[:2]
    f = smooth_factor(sigma)
    if f == 1:
        k = _gauss_ksize(sigma)
        return cv2.GaussianBlur(img, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_CONSTANT)
    # zero margins of one cell (and up to a multiple of f) keep the bilinear upsampling exact at the edges
    ph, pw = (-h) % f, (-w) % f
    src = cv2.copyMakeBorder(img, f, f + ph, f, f + pw, cv2.BORDER_CONSTANT, value=0)
    hh, ww = src.shape[:2]
    small = cv2.resize(src, (ww // f, hh // f), interpolation=cv2.INTER_AREA)
    del src  # a full-size copy: gone before the full-size upsampling
    small = smooth_small(small, sigma, f)
    up = cv2.resize(small, (ww, hh), interpolation=cv2.INTER_LINEAR)
    return up[f : f + h, f : f + w]  # a view of the padded result (no second full-size copy)


def _soft_params(fov: FovGeometry) -> tuple[int, float] | None:
    """(kernel side, sigma) of the rim ramp, or None when the rim is under 1.5 native pixels (no ramp)."""
    s = 2.0 * fov.radius / CANONICAL
    if s < 1.5:
        return None
    sigma = 0.5 * s
    return make_odd(int(math.ceil(3 * sigma)) * 2 + 1), sigma


def _soften(blurred: np.ndarray, bf: np.ndarray) -> np.ndarray:
    # map the edge value 0.5 -> 0, interior 1 -> 1: a ramp of about s pixels inside the mask
    soft = np.clip(2.0 * blurred - 1.0, 0.0, 1.0) * bf
    soft[soft > 0.9999] = 1.0  # the blurred interior sums to 1 only up to rounding
    return soft.astype(np.float32)


def soft_fov_mask(binary: np.ndarray, fov: FovGeometry | dict) -> np.ndarray:
    """Soft-rim FOV mask (float32 H×W in [0,1]) from a binary FOV mask.

    The released generator multiplies by the 0/255 mask that was bilinearly resized to 512 and then
    bicubic-resized (a no-op at 512), i.e. a hard disk whose rim pixels carry partial values over about
    one canonical pixel. Here the rim ramp is one canonical pixel wide (``s`` native pixels); it lies
    inside the binary mask, so the result is 0 wherever ``binary`` is False.
    """
    if isinstance(fov, dict):
        fov = FovGeometry.from_dict(fov)
    if not isinstance(fov, FovGeometry):
        raise TypeError(f"fov must be a FovGeometry or its dict (estimate_fov_geometry), got {type(fov).__name__}")
    b = np.asarray(binary).astype(bool)
    if b.shape != (fov.height, fov.width):
        raise ValueError(f"mask shape {b.shape} does not match the FOV geometry {(fov.height, fov.width)}")
    bf = b.astype(np.float32)
    p = _soft_params(fov)
    if p is None:
        return bf
    k, sigma = p
    return _soften(gaussian_blur(bf, k, k, sigma), bf)


def soft_fov_rows(binary: np.ndarray, fov: FovGeometry, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of :func:`soft_fov_mask` (the same values), blurring only those rows and the kernel's reach."""
    binary = np.asarray(binary)
    if binary.shape != (fov.height, fov.width):
        raise ValueError(f"mask shape {binary.shape} does not match the FOV geometry {(fov.height, fov.width)}")
    p = _soft_params(fov)
    bf = binary[a:b].astype(bool).astype(np.float32)
    if p is None:
        return bf
    k, sigma = p
    lo, hi = max(0, a - k // 2), min(fov.height, b + k // 2)
    wide = binary[lo:hi].astype(bool).astype(np.float32)
    return _soften(gaussian_blur(wide, k, k, sigma)[a - lo : b - lo], bf)
