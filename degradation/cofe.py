"""The Cofe-Net fundus degradation model (Shen et al., IEEE TMI 2021), re-implemented from its description.

Three variants ("presets") of the authors' code are provided:

* ``released``: the released generator ``degradation_code/degrad_de.py``. Type codes ``'001'..'111'``,
  bits ``[blur, spot, illumination]``; order ILLUMINATION (COLOR → HALO → HOLE) → SPOT → BLUR.
* ``training``: the stronger on-the-fly degradation of the training data loader: order
  COLOR → SPOT → HALO → BLUR → HOLE, wider ranges, other halo colours. The type code selects the same
  bits (``'111'`` = the loader's behaviour).
* ``examples``: the earlier generator behind the authors' ``examples/parameters/*.json`` (15–23 spots,
  colour factors U(0.5, 1.5), β = 0.5 for r < 25, halo outer weight 1).

Sampling (:func:`sample_cofe`) draws every parameter in the canonical 512×512 frame with the exact
released ranges (inclusive integer draws, kernels made odd by +1 after σ is computed, disk radius
``int(d/2)``). Each op uses its own random stream. :func:`apply_cofe` is pure: it maps the canonical
parameters to native pixels through a :class:`~degradation.functional.Frame`.

Two departures from the released generator (``degradation/README.md``, "Known differences from the
authors' code"): the hole's image mean ``a`` is the mean inside the FOV (:meth:`_Ctx.region_mean`),
where the digest's formula divides the whole frame's sum by the FOV area; and the released driver's
final JPEG save (quality 95) is not part of the ``released`` preset.
"""

from __future__ import annotations

import math
from typing import Callable

import cv2
import numpy as np

from .functional import (
    CANONICAL,
    Frame,
    blur_in_place,
    blurred_canonical_field,
    canonical_disk,
    gaussian_blur,
    make_odd,
    pil_blend,
    pil_color,
    pil_luma,
    quantise,
    row_chunks,
    work_factor,
)

PRESETS = ("released", "training", "examples")
CODES = ("001", "010", "011", "100", "101", "110", "111")

#: Halo colour tables, rows R, G, B indexed by ``num`` (values /255).
HALO_WEIGHTS = {
    "released": ((251, 141, 177), (249, 238, 195), (246, 238, 147)),
    "training": ((255, 141, 162), (255, 238, 205), (255, 238, 90)),
}
HALO_WEIGHTS["examples"] = HALO_WEIGHTS["released"]


def validate_code(code: str) -> str:
    code = str(code)
    if code not in CODES:
        raise ValueError(f"invalid Cofe-Net type code {code!r}: expected one of {', '.join(CODES)}")
    return code


def code_bits(code: str) -> dict[str, bool]:
    """``'abc'`` -> {blur: a, spot: b, illumination: c} (the released bit order)."""
    code = validate_code(code)
    return {"blur": code[0] == "1", "spot": code[1] == "1", "illumination": code[2] == "1"}


def _ri(rng: np.random.Generator, a: float, b: float) -> int:
    """Python ``random.randint(a, b)``: inclusive on both ends (float bounds truncated as int())."""
    return int(rng.integers(int(a), int(b), endpoint=True))


def _u(rng: np.random.Generator, a: float, b: float) -> float:
    return float(a + (b - a) * rng.random())


# ---------------------------------------------------------------------------------------------------
# Sampling (canonical frame, h = w = 512)
# ---------------------------------------------------------------------------------------------------


def _sample_color(rng, variant: str) -> dict:
    if variant == "released":
        lo, hi = max(0.0, 1 - 0.3), 1 + 0.3 - 0.1
        b = _u(rng, lo, hi)
        c = _u(rng, 1 - 0.4, 1 + 0.4)
        s = _u(rng, 1 - 0.4, 1 + 0.4)
    else:  # training, examples: ColorJitter(0.5, 0.5, 0.5)
        b, c, s = _u(rng, 0.5, 1.5), _u(rng, 0.5, 1.5), _u(rng, 0.5, 1.5)
    return {"brightness_factor": b, "contrast_factor": c, "saturation_factor": s}


def _halo_disks(rng, variant: str, h: int, w: int) -> dict:
    cx = _ri(rng, w / 2 - w // 8, w / 2 + w // 8)
    cy = _ri(rng, h / 2 - h // 8, h / 2 + h // 8)
    dia_a = min(h, w) * _u(rng, 0.75, 1.0)
    if variant == "examples":
        wei_b = 1.0  # dia_b_max was integer-divided to 1 in that generator
    else:
        dia_b_max = 2 * int(math.sqrt(max(cx, h - cx) ** 2 + max(cy, h - cy) * max(cy, w - cy))) / min(w, h)
        wei_b = 1 + (dia_b_max - 1) * _u(rng, 0.0, 1.0)
    dia_b = min(h, w) * wei_b + abs(max(cx - w / 2, cy - h / 2) + max(w, h) / 2)
    return {"center_a": [cx, cy], "dia_a": dia_a, "center_b": [cx, cy], "dia_b": dia_b}


def _sample_halo(rng, variant: str, brightness: float, h: int = CANONICAL, w: int = CANONICAL) -> dict:
    if variant == "training":
        num = _ri(rng, 0, 2)
    else:
        num = _ri(rng, 1, 2) if brightness >= 0.2 else _ri(rng, 0, 2)
    rec: dict = {"num": num, **_halo_disks(rng, variant, h, w)}
    if variant == "training":
        sigma = _ri(rng, min(h, w) // 6, min(h, w) / 2) / 3
        g = make_odd(int(1.5 * sigma))
    else:
        cx, cy = rec["center_a"]
        dia = 2 * max(cx, h - cx, cy, h - cy)
        g = int(abs(dia - rec["dia_a"]))
        sigma = 2.0 / 3.0 * g  # computed before the kernel is made odd
        g = make_odd(g)
    table = HALO_WEIGHTS[variant]
    rec.update({"gauss_rad": g, "sigma": sigma, "weights": [table[ch][num] / 255.0 for ch in range(3)]})
    return rec


def _sample_hole(rng, variant: str, h: int = CANONICAL, w: int = CANONICAL) -> dict:
    if variant == "training":
        d = _ri(rng, math.floor(0.3 * w), math.floor(0.5 * w))
        center = [_ri(rng, 1, w - 1), _ri(rng, 1, h - 1)]
        factor = _u(rng, -0.25, -0.05)
        sigma = _u(rng, d / 4, d / 3)
        kw = _ri(rng, math.floor(d / 4), math.floor(d / 3))
        kh = _ri(rng, math.floor(d / 4), math.floor(d / 3))
        return {
            "center": center,
            "diameter_circle": d,
            "brightness_factor": factor,
            "rad_w": make_odd(kw),
            "rad_h": make_odd(kh),
            "sigma": sigma,
        }
    d = _ri(rng, math.floor(0.4 * w), math.floor(0.7 * w))
    center = [_ri(rng, w / 4, 3 * w / 4), _ri(rng, 3 * h / 8, 5 * h / 8)]
    beta0 = _u(rng, -0.26, -0.262)
    u = float(rng.random())  # position inside U(beta0 - 0.06 a, beta0 - 0.05 a); `a` is image dependent
    kw = _ri(rng, math.floor(0.55 * d), math.floor(0.75 * d))
    kh = _ri(rng, math.floor(0.55 * d), math.floor(0.75 * d))
    sigma = 2.0 / 3.0 * max(kw, kh) * 1.2
    return {
        "center": center,
        "diameter_circle": d,
        "brightness_factor": None,  # resolved at apply time from the image mean a (see hole_factor)
        "beta0": beta0,
        "u": u,
        "rad_w": make_odd(kw),
        "rad_h": make_odd(kh),
        "sigma": sigma,
    }


def hole_factor(beta0: float, u: float, a: float) -> float:
    """Released hole strength: U(β0 − 0.06a, β0 − 0.05a) when a > 0.25, else 0."""
    if a <= 0.25:
        return 0.0
    lo, hi = beta0 - 0.06 * a, beta0 - 0.05 * a
    return lo + (hi - lo) * u


def spot_value(r: int) -> float:
    """Released spot intensity v = k·(1 − exp(−β·dd)), deterministic in the spot size r."""
    k = 14 / 25 + (1 - r / 25)
    beta = 0.5 + 1.0 * (r / 25)
    dd = 0.3 * (r / 25)
    return k * (1 - math.exp(-beta * dd))


def _sample_spots(rng, variant: str, h: int = CANONICAL, w: int = CANONICAL) -> list[dict]:
    if variant == "training":
        n = _ri(rng, 5, 20)
        rlo = math.ceil(0.026 * h)
    elif variant == "examples":
        n = _ri(rng, 15, 23)
        rlo = math.ceil(0.01 * h)
    else:
        n = _ri(rng, 5, 10)
        rlo = math.ceil(0.01 * h)
    spots = []
    for _ in range(n):
        r = _ri(rng, rlo, math.floor(0.05 * h))
        center = [_ri(rng, r + 1, w - r - 1), _ri(rng, r + 1, h - r - 1)]
        if variant == "training":
            k, beta, dd = _u(rng, 0.7, 1.0), _u(rng, 0.5, 1.5), _u(rng, 0.0, 0.3)
            spots.append(
                {"radius": r, "center": center, "rad_w": 5, "rad_h": 5, "sigma": 1.8, "value": k * (1 - math.exp(-beta * dd))}
            )
            continue
        if variant == "examples":
            k = 14 / 25 + (1 - r / 25)
            beta = 0.5 + 1.0 * (r // 25)
            value = k * (1 - math.exp(-beta * 0.3 * (r / 25)))
        else:
            value = spot_value(r)
        sigma = 2 * (5 + 20 * r / 25)
        kw = _ri(rng, math.floor(sigma / 5), math.floor(sigma / 4))
        kh = _ri(rng, math.floor(sigma / 5), math.floor(sigma / 4))
        spots.append(
            {"radius": r, "center": center, "rad_w": make_odd(kw), "rad_h": make_odd(kh), "sigma": sigma, "value": value}
        )
    return spots


def _sample_blur(rng, variant: str) -> dict:
    sigma = _u(rng, 0.0, 15.0) if variant == "training" else _u(rng, 5.0, 15.0)
    kw = _ri(rng, math.floor(sigma / 3), math.floor(sigma / 2))
    kh = _ri(rng, math.floor(sigma / 3), math.floor(sigma / 2))
    return {"sigma": sigma, "rad_w": make_odd(kw), "rad_h": make_odd(kh)}


def sample_cofe(variant: str, code: str, rng_for: Callable[[str], np.random.Generator]) -> dict:
    """Draw one parameter record. ``rng_for(op)`` returns the independent stream of op
    ``'color' | 'halo' | 'hole' | 'spot' | 'blur'``."""
    if variant not in PRESETS:
        raise ValueError(f"unknown Cofe-Net preset {variant!r}: expected one of {', '.join(PRESETS)}")
    bits = code_bits(code)
    rec: dict = {"variant": variant, "type": code}
    if bits["illumination"]:
        rec["color"] = _sample_color(rng_for("color"), variant)
        rec["halo"] = _sample_halo(rng_for("halo"), variant, rec["color"]["brightness_factor"])
        rec["hole"] = _sample_hole(rng_for("hole"), variant)
    if bits["spot"]:
        rec["spot"] = _sample_spots(rng_for("spot"), variant)
    if bits["blur"]:
        rec["blur"] = _sample_blur(rng_for("blur"), variant)
    return rec


# ---------------------------------------------------------------------------------------------------
# Application (pure)
# ---------------------------------------------------------------------------------------------------


class _Ctx:
    """Per-call state: geometry, FOV region, quantisation levels and image-dependent values."""

    def __init__(self, frame: Frame, region: np.ndarray, levels: int, exact: bool, details: dict | None, owned: bool = False):
        self.frame = frame
        self.owned = owned  # the ops may overwrite their input (the caller's working copy): fewer full-size arrays
        self.region = region  # bool H×W: inside the FOV
        self.levels = int(levels)
        self.exact = exact
        self.details = details if details is not None else {}
        self.bg = np.zeros(3, np.float32)  # value that black background takes after the colour op
        x0, x1, y0, y1, area = frame.box()
        self.box = (slice(y0, y1), slice(x0, x1))
        self.area = area
        self.missing = area - max(0, (x1 - x0)) * max(0, (y1 - y0))
        self._region_u8 = None

    def region_mean(self, img: np.ndarray) -> float:
        """Mean of all channel values inside the FOV (0 when the FOV is empty)."""
        if self._region_u8 is None:
            self._region_u8 = self.region.astype(np.uint8)
        if not self._region_u8.any():
            return 0.0
        return float(np.mean(cv2.mean(img, mask=self._region_u8)[:3]))


class ColorOp:
    """PIL brightness → contrast → saturation on quantised levels (LUTs for 8-bit, same values), split into
    the statistic it needs (the mean luminance after brightness over the canonical square) and the
    per-pixel part, so that both can also run a band of rows at a time."""

    def __init__(self, rec: dict, levels: int):
        self.lv = lv = int(levels)
        self.b, self.c, self.s = rec["brightness_factor"], rec["contrast_factor"], rec["saturation_factor"]
        self.use_lut = lv <= 255
        self.ramp = np.arange(256, dtype=np.float32)
        self.lut_b = pil_blend(0.0, self.ramp, self.b, lv).astype(np.uint8) if self.use_lut else None
        self.lut_c = None
        self.grey = None

    def brightness(self, x: np.ndarray) -> np.ndarray:
        q = quantise(x, self.lv)
        return cv2.LUT(q.astype(np.uint8), self.lut_b) if self.use_lut else pil_blend(0.0, q, self.b, self.lv)

    @staticmethod
    def luma_sum(qb: np.ndarray) -> float:
        return float(pil_luma(qb.astype(np.float32)).sum(dtype=np.float64))

    def set_mean(self, luma_mean: float, ctx: "_Ctx") -> None:
        """Fix the contrast grey from the mean luminance; the black background's value goes to ``ctx.bg``."""
        self.grey = float(int(luma_mean + 0.5))
        self.lut_c = pil_blend(self.grey, self.ramp, self.c, self.lv).astype(np.uint8) if self.use_lut else None
        bg = pil_color(np.zeros((1, 1, 3), np.float32), self.b, self.c, self.s, self.lv, luma_mean=luma_mean)
        ctx.bg = (bg.reshape(3) / np.float32(self.lv)).astype(np.float32)
        ctx.details["contrast_mean"] = self.grey

    def finish(self, qb: np.ndarray) -> np.ndarray:
        """Contrast and saturation of brightness levels ``qb``, back to [0, 1] (float32)."""
        qc = cv2.LUT(qb, self.lut_c).astype(np.float32) if self.use_lut else pil_blend(self.grey, qb, self.c, self.lv)
        o = pil_blend(pil_luma(qc)[..., None], qc, self.s, self.lv)
        o /= np.float32(self.lv)
        return o


def _apply_color(img: np.ndarray, rec: dict, ctx: _Ctx) -> np.ndarray:
    op = ColorOp(rec, ctx.levels)
    h, w = img.shape[:2]
    qb = np.empty(img.shape, np.uint8 if op.use_lut else np.float32)
    by, bx = ctx.box
    luma_sum = 0.0
    for rows in row_chunks(h, w):
        qb[rows] = op.brightness(img[rows])
        r0, r1 = max(rows.start, by.start), min(rows.stop, by.stop)
        if r0 < r1:
            luma_sum += op.luma_sum(qb[r0:r1, bx])
    # mean luminance over the canonical square; pixels outside the image are black (L = 0)
    op.set_mean(luma_sum / ctx.area, ctx)
    out = img if ctx.owned else np.empty(img.shape, np.float32)
    for rows in row_chunks(h, w):
        out[rows] = op.finish(qb[rows])
    return out


def _canonical_mean(img: np.ndarray, ctx: _Ctx) -> float:
    """mean(img) over all CHW values of the canonical square incl. its background."""
    total = float(img[ctx.box].sum(dtype=np.float64)) + ctx.missing * float(ctx.bg.sum(dtype=np.float64))
    return total / (3.0 * ctx.area)


def halo_field(rec: dict, mu: float, ctx: _Ctx) -> tuple[tuple[np.ndarray, int, int], np.ndarray]:
    """((canonical field, factor, pad), channel weights) of a halo record for the image mean ``mu``."""
    ctx.details["halo_mean"] = mu
    cx, cy = rec["center_a"]
    bx, by = rec["center_b"]
    ring = canonical_disk(bx, by, int(rec["dia_b"] / 2)) - canonical_disk(cx, cy, int(rec["dia_a"] / 2))
    np.abs(ring, out=ring)
    g, sigma = int(rec["gauss_rad"]), float(rec["sigma"])
    w = np.asarray(rec["weights"], np.float32) * np.float32(mu)
    f = work_factor(g, float(w.max()), ctx.exact)
    field, pad = blurred_canonical_field(ring, g, g, sigma, f)
    return (field, f, pad), w


def _apply_halo(img: np.ndarray, rec: dict, ctx: _Ctx) -> np.ndarray:
    mu = _canonical_mean(img, ctx)
    (field, f, pad), w = halo_field(rec, mu, ctx)
    field = ctx.frame.warp_from_canonical(field, f, pad)
    if ctx.owned:  # img + field * w in place, by row chunks and channels (float addition commutes: same values)
        for rows in row_chunks(*field.shape):
            for k in range(3):
                img[rows, :, k] += field[rows] * w[k]
        out = img
    else:
        out = field[..., None] * w
        out += img
    return np.clip(out, np.float32(0.0), np.float32(1.0), out=out)


def hole_strength(rec: dict, ctx: _Ctx, a: float | None) -> float:
    """The hole's brightness factor: recorded (training preset) or from the FOV mean ``a`` (released)."""
    factor = rec.get("brightness_factor")
    if factor is None:
        factor = hole_factor(rec["beta0"], rec["u"], a)
        ctx.details["hole_mean"] = a
    ctx.details["hole_brightness_factor"] = factor
    return factor


def hole_field(rec: dict, factor: float, ctx: _Ctx) -> tuple[np.ndarray, int, int]:
    """(canonical field, factor, pad) of a hole record of strength ``factor``."""
    cx, cy = rec["center"]
    disk = canonical_disk(cx, cy, int(rec["diameter_circle"] / 2))
    kw, kh = int(rec["rad_w"]), int(rec["rad_h"])
    f = work_factor(min(kw, kh), abs(factor), ctx.exact)
    field, pad = blurred_canonical_field(disk, kw, kh, float(rec["sigma"]), f)
    return field, f, pad


def _apply_hole(img: np.ndarray, rec: dict, ctx: _Ctx) -> np.ndarray:
    factor = rec.get("brightness_factor")
    factor = hole_strength(rec, ctx, None if factor is not None else ctx.region_mean(img))
    if factor == 0.0:
        return img
    field, f, pad = hole_field(rec, factor, ctx)
    field = ctx.frame.warp_from_canonical(field, f, pad)
    field *= np.float32(factor)
    if ctx.owned:
        img += field[..., None]
        out = img
    else:
        out = img + field[..., None]
    return np.clip(out, np.float32(0.0), np.float32(1.0), out=out)


def spot_patches(spots: list[dict], fr: Frame, hgt: int, wid: int):
    """Per spot, in order: (y0, y1, x0, x1, blurred disk) of its native patch (skipped when off the image)."""
    for sp in spots:
        xn, yn = fr.to_native(*sp["center"])
        rad = int(sp["radius"] / 2) * fr.s
        kw, kh = fr.kernel(int(sp["rad_w"])), fr.kernel(int(sp["rad_h"]))
        mx, my = kw // 2 + 2, kh // 2 + 2
        x0 = max(0, int(math.floor(xn - rad)) - mx)
        x1 = min(wid, int(math.ceil(xn + rad)) + mx + 1)
        y0 = max(0, int(math.floor(yn - rad)) - my)
        y1 = min(hgt, int(math.ceil(yn + rad)) + my + 1)
        if x0 >= x1 or y0 >= y1:
            continue
        yy, xx = np.ogrid[y0:y1, x0:x1]
        disk = (((xx - xn) ** 2 + (yy - yn) ** 2) <= rad * rad).astype(np.float32) * np.float32(sp["value"])
        yield y0, y1, x0, x1, gaussian_blur(disk, kw, kh, fr.length(sp["sigma"]))


def _apply_spots(img: np.ndarray, spots: list[dict], ctx: _Ctx) -> np.ndarray:
    out = img if ctx.owned else img.copy()
    for y0, y1, x0, x1, disk in spot_patches(spots, ctx.frame, *out.shape[:2]):
        patch = out[y0:y1, x0:x1]
        patch += disk[..., None]
        np.clip(patch, 0.0, 1.0, out=patch)
    return out


def blur_kernel(rec: dict, fr: Frame) -> tuple[int, int, float]:
    """(kernel width, kernel height, sigma) of a blur record in native pixels."""
    return fr.kernel(int(rec["rad_w"])), fr.kernel(int(rec["rad_h"])), fr.length(rec["sigma"])


def _apply_blur(img: np.ndarray, rec: dict, ctx: _Ctx) -> np.ndarray:
    kw, kh, sigma = blur_kernel(rec, ctx.frame)
    if ctx.owned:  # the same blur, written back into the input as a sliding window of row bands
        out = blur_in_place(img, lambda a: gaussian_blur(a, kw, kh, sigma), kh // 2)
    else:
        out = gaussian_blur(img, kw, kh, sigma)
    return np.clip(out, 0.0, 1.0, out=out)


_ORDER = {
    "released": ("color", "halo", "hole", "spot", "blur"),
    "examples": ("color", "halo", "hole", "spot", "blur"),
    "training": ("color", "spot", "halo", "blur", "hole"),
}
_APPLY = {"color": _apply_color, "halo": _apply_halo, "hole": _apply_hole, "spot": _apply_spots, "blur": _apply_blur}


def apply_cofe(
    img: np.ndarray,
    rec: dict,
    frame: Frame,
    region: np.ndarray,
    levels: int = 255,
    exact: bool | None = None,
    details: dict | None = None,
    *,
    consume: bool = False,
) -> np.ndarray:
    """Apply one Cofe-Net record to ``img`` (float32 H×W×3, background already black). No FOV
    multiply here: the caller (:class:`~degradation.Degrader`) multiplies by the soft mask last.
    ``consume``: ``img`` is the caller's working copy and may be overwritten (same result, fewer
    full-size arrays: what large photographs need)."""
    if exact is None:
        exact = frame.is_identity
    ctx = _Ctx(frame, region, levels, exact, details, owned=consume)
    out = img
    for op in _ORDER[rec["variant"]]:
        if op in rec and rec[op] is not None:
            out = _APPLY[op](out, rec[op], ctx)
    return out
