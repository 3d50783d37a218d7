"""Very large photographs degraded a band of rows at a time: the same operations, a bounded working set.

:meth:`Degrader.apply` holds the photograph as one float32 array (12 bytes a pixel) plus full-size
fields. :func:`apply_banded` reads the photograph through a callback a band of rows at a time and hands
each finished band to another callback, so besides the caller's own arrays it holds bands of rows only
(their height set by the band size and the widest blur), whatever the photograph's height.

How. The recorded steps become a chain of row operations. A *local* operation (the blurs, JPEG, the
spots and every per-pixel operation) computes output rows [a, b) from input rows [a - r, b + r), so a
band is *pulled* through the chain: each operation asks its predecessor for the rows it needs, the
overlaps being recomputed. An operation that needs a statistic of its whole input (the colour jitter's
mean luminance, the halo's and the hole's image means, the haze glare's coarse blur) first gets a pass
over the photograph that computes the chain up to it and accumulates the statistic, band by band.

Exactness, against :meth:`Degrader.apply` on the same input:

* every local operation gives the same values as in one piece: filters reflect only at the
  photograph's own top and bottom (a band carries its reach in rows on both sides), noise is drawn chunk
  by chunk on the same chunk grid from recorded generator states, JPEG bands start on the 16-row MCU
  grid and carry 16 rows of context, the colour jitter's luminance is summed on the same chunk grid, and
  the glare's area average and bilinear upsampling are computed on block-aligned bands;
* the halo's and hole's image means are sums in float64 accumulated band by band (in one piece numpy
  and OpenCV sum in another order), and the smooth fields are warped band by band (OpenCV rounds the
  mapped coordinates to 1/32 pixel, which can fall the other way): so a value can differ in its last bits
  and an output pixel by one code value, rarely (measured in ``tests/degradation/test_deg_banded.py``); a
  later JPEG step re-encodes such a pixel's 8x8 block, which can then move by a few code values.

Memory: bands of rows, the soft mask's rim, and the haze glare's coarse copy (1/f² of the photograph, f =
glare sigma / 6 native pixels: tiny for the built-in recipes, up to a quarter of a float copy for a custom
recipe with a glare sigma of a few canonical pixels).
"""

from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from . import clinical, cofe
from .fov import FovGeometry
from .functional import (
    Frame,
    _gauss_ksize,
    chunk_rows,
    gaussian_blur,
    smooth_factor,
    smooth_small,
    soft_fov_rows,
)

#: Destination pixels per band (about 2 megapixels: 24 MB of float32 RGB).
BAND_PIXELS = 1 << 21
#: Rows of a JPEG band's MCU grid and of the context it carries (4:2:0 chroma: 16-row MCUs).
_JPEG_ROWS = 16


class _Op:
    radius = 0  # rows of input needed beyond the output rows, on each side
    align = 1  # an input band must start on a multiple of this row (or 0)
    unit = 1  # a statistic pass hands bands whose first row is a multiple of this
    stat = False  # needs a pass over its whole input before it can run

    def collect(self, x: np.ndarray, y0: int, region: np.ndarray) -> None:  # pragma: no cover - stat ops override
        raise NotImplementedError

    def finish(self) -> None:  # pragma: no cover - stat ops override
        raise NotImplementedError

    def __call__(self, x: np.ndarray, y0: int) -> np.ndarray:
        raise NotImplementedError


class _Color(_Op):
    stat = True

    def __init__(self, rec: dict, ctx, w: int):
        self.op = cofe.ColorOp(rec, ctx.levels)
        self.ctx = ctx
        self.unit = chunk_rows(w)
        self.luma_sum = 0.0

    def collect(self, x, y0, region):
        by, bx = self.ctx.box
        for c0 in range(0, len(x), self.unit):  # the chunk grid of the one-piece path, summed in its order
            c1 = min(len(x), c0 + self.unit)
            r0, r1 = max(y0 + c0, by.start), min(y0 + c1, by.stop)
            if r0 < r1:
                qb = self.op.brightness(x[c0:c1])
                self.luma_sum += self.op.luma_sum(qb[r0 - y0 - c0 : r1 - y0 - c0, bx])

    def finish(self):
        self.op.set_mean(self.luma_sum / self.ctx.area, self.ctx)

    def __call__(self, x, y0):
        for c0 in range(0, len(x), self.unit):
            rows = slice(c0, min(len(x), c0 + self.unit))
            x[rows] = self.op.finish(self.op.brightness(x[rows]))
        return x


class _Field(_Op):
    """Halo (image mean over the canonical square) or hole (mean inside the FOV): a smooth field added."""

    def __init__(self, kind: str, rec: dict, ctx):
        self.kind, self.rec, self.ctx = kind, rec, ctx
        self.total = np.zeros(3)
        self.count = 0
        self.field = None
        self.factor = rec.get("brightness_factor") if kind == "hole" else None
        self.stat = kind == "halo" or self.factor is None
        if not self.stat:
            self._prepare()

    def collect(self, x, y0, region):
        if self.kind == "halo":
            by, bx = self.ctx.box
            r0, r1 = max(y0, by.start), min(y0 + len(x), by.stop)
            if r0 < r1:
                self.total[0] += float(x[r0 - y0 : r1 - y0, bx].sum(dtype=np.float64))
        else:
            sel = x[region]
            self.total += sel.sum(axis=0, dtype=np.float64)
            self.count += len(sel)

    def finish(self):
        ctx = self.ctx
        if self.kind == "halo":
            mu = float((self.total[0] + ctx.missing * float(ctx.bg.sum(dtype=np.float64))) / (3.0 * ctx.area))
            self.mean = mu
        else:
            self.mean = float(np.mean(self.total / self.count)) if self.count else 0.0
        self._prepare()

    def _prepare(self):
        if self.kind == "halo":
            (self.field, self.f, self.pad), self.w = cofe.halo_field(self.rec, self.mean, self.ctx)
        else:
            self.factor = cofe.hole_strength(self.rec, self.ctx, getattr(self, "mean", None))
            if self.factor != 0.0:
                self.field, self.f, self.pad = cofe.hole_field(self.rec, self.factor, self.ctx)

    def __call__(self, x, y0):
        if self.field is None:  # a hole of strength 0
            return x
        fld = self.ctx.frame.warp_from_canonical(self.field, self.f, self.pad, rows=(y0, y0 + len(x)))
        if self.kind == "halo":
            for k in range(3):
                x[:, :, k] += fld * self.w[k]
        else:
            fld = fld * np.float32(self.factor)  # not in place: for the 512 frame itself fld is a view of the field
            x += fld[..., None]
        return np.clip(x, np.float32(0.0), np.float32(1.0), out=x)


class _Spots(_Op):
    def __init__(self, spots: list[dict], frame: Frame, h: int, w: int):
        self.patches = list(cofe.spot_patches(spots, frame, h, w))  # small: a spot's blurred disk each

    def __call__(self, x, y0):
        y1 = y0 + len(x)
        for p0, p1, x0, x1, disk in self.patches:
            a, b = max(p0, y0), min(p1, y1)
            if a < b:
                patch = x[a - y0 : b - y0, x0:x1]
                patch += disk[a - p0 : b - p0, :, None]
                np.clip(patch, 0.0, 1.0, out=patch)
        return x


class _Filter(_Op):
    """A row-local filter with reflected borders (Gaussian blur, defocus or motion PSF), then clipped."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], radius: int, clip: bool = True):
        self.fn, self.radius, self.clip = fn, radius, clip

    def __call__(self, x, y0):
        out = self.fn(x)
        return np.clip(out, 0.0, 1.0, out=out) if self.clip else out


class _Pointwise(_Op):
    def __init__(self, fn: Callable[[np.ndarray, int], np.ndarray]):
        self.fn = fn

    def __call__(self, x, y0):
        return self.fn(x, y0)


class _Noise(_Op):
    """Sensor noise drawn on the one-piece path's chunk grid, each chunk from its recorded generator state."""

    def __init__(self, rec: dict, h: int, w: int):
        self.rec, self._height = rec, h
        self.step = chunk_rows(w)
        self.gen = np.random.Generator(np.random.PCG64(int(rec["seed"])))
        self.states = {0: self.gen.bit_generator.state}  # chunk index -> state before drawing it

    def __call__(self, x, y0):
        if float(self.rec["a"]) == 0.0 and float(self.rec["b"]) == 0.0:
            return x
        y1 = y0 + len(x)
        for c in range(y0 // self.step, -(-y1 // self.step)):
            if c not in self.states:  # pragma: no cover - bands are pulled top to bottom without gaps
                raise RuntimeError(f"noise chunk {c} requested before chunk {c - 1}")
            self.gen.bit_generator.state = self.states[c]
            c0 = c * self.step
            c1 = min(c0 + self.step, self._height)
            z = self.gen.standard_normal((c1 - c0, x.shape[1], x.shape[2]), dtype=np.float32)
            self.states.setdefault(c + 1, self.gen.bit_generator.state)
            a, b = max(c0, y0), min(c1, y1)
            x[a - y0 : b - y0] = clinical.noisy(x[a - y0 : b - y0], self.rec, z[a - c0 : b - c0])
        return x


class _Jpeg(_Op):
    radius = _JPEG_ROWS
    align = _JPEG_ROWS

    def __init__(self, rec: dict, ctx):
        self.rec, self.ctx = rec, ctx

    def __call__(self, x, y0):
        return clinical.apply_jpeg(x, self.rec, self.ctx)


class _Haze(_Op):
    def __init__(self, rec: dict, frame: Frame, h: int, w: int):
        self.rec, self.h, self.w = rec, h, w
        t, m = np.float32(rec["t"]), np.float32(rec["glare_mix"])
        self.identity = bool(t >= 1.0)
        self.sigma = frame.length(rec["glare_sigma"])
        self.glare = bool(not self.identity and m > 0)
        self.f = smooth_factor(self.sigma) if self.glare and self.sigma > 0 else 1
        if self.glare and self.sigma > 0 and self.f == 1:  # a direct blur with zero padding: row-local
            self.k = _gauss_ksize(self.sigma)
            self.radius = self.k // 2
        self.stat = self.glare and self.f > 1
        if self.stat:
            f = self.f
            self.unit = f
            self.pw = (-w) % f
            self.parts = [np.zeros((1, (w + f + self.pw + f) // f, 3), np.float32)]  # the top margin: f rows of zeros

    def collect(self, x, y0, region):
        f = self.f
        if y0 + len(x) == self.h:  # the last band: zero rows to the block grid, then the bottom margin
            x = np.concatenate([x, np.zeros(((-self.h) % f + f, self.w, 3), np.float32)])
        src = cv2.copyMakeBorder(x, 0, 0, f, f + self.pw, cv2.BORDER_CONSTANT, value=0)
        self.parts.append(cv2.resize(src, (src.shape[1] // f, src.shape[0] // f), interpolation=cv2.INTER_AREA))

    def finish(self):
        small = np.ascontiguousarray(np.concatenate(self.parts))
        self.parts = None
        self.small = smooth_small(small, self.sigma, self.f)

    def _glare_rows(self, y0: int, y1: int) -> np.ndarray:
        f, n = self.f, self.small.shape[0]
        # padded rows [f + y0, f + y1) come from small rows [s0, s1) (bilinear: one row of context each side)
        s0, s1 = max(0, (f + y0) // f - 1), min(n, -(-(f + y1) // f) + 2)
        ww = self.small.shape[1] * f
        up = cv2.resize(self.small[s0:s1], (ww, (s1 - s0) * f), interpolation=cv2.INTER_LINEAR)
        return up[f + y0 - s0 * f : f + y1 - s0 * f, f : f + self.w]

    def __call__(self, x, y0):
        if self.identity:
            return x
        glare = None
        if self.glare:
            if self.sigma <= 0:
                glare = x.copy()
            elif self.f == 1:
                glare = cv2.GaussianBlur(x, (self.k, self.k), sigmaX=self.sigma, sigmaY=self.sigma, borderType=cv2.BORDER_CONSTANT)
            else:
                glare = self._glare_rows(y0, y0 + len(x))
        return clinical.haze_mix(x, glare, self.rec, True)


def _chain(params: dict, frame: Frame, region_any, levels: int, exact: bool | None, details: dict | None) -> list[_Op]:
    """The recorded steps as a list of row operations."""
    fov = frame.fov
    h, w = fov.height, fov.width
    ops: list[_Op] = []
    octx = clinical.OpCtx(frame, region_any, levels, owned=True)
    for rec in params["steps"]:
        if not rec.get("applied") or rec.get("params") is None:
            continue
        p = rec["params"]
        if rec["type"].startswith("cofe_"):
            sub = {} if details is not None else None
            ctx = cofe._Ctx(frame, region_any, levels, frame.is_identity if exact is None else exact, sub, owned=True)
            if details is not None:
                details[rec["name"]] = sub
            for op in cofe._ORDER[p["variant"]]:
                if p.get(op) is None:
                    continue
                if op == "color":
                    ops.append(_Color(p[op], ctx, w))
                elif op in ("halo", "hole"):
                    ops.append(_Field(op, p[op], ctx))
                elif op == "spot":
                    ops.append(_Spots(p[op], frame, h, w))
                else:
                    kw, kh, sigma = cofe.blur_kernel(p[op], frame)
                    ops.append(_Filter(lambda a, kw=kw, kh=kh, s=sigma: gaussian_blur(a, kw, kh, s), kh // 2))
            continue
        kind = rec["type"]
        if kind == "noise":
            ops.append(_Noise(p, h, w))
        elif kind == "jpeg":
            ops.append(_Jpeg(p, octx))
        elif kind in ("defocus", "motion"):
            k = clinical.psf(p, kind, frame)
            if k.shape == (1, 1):
                continue  # the identity (unclipped, as in one piece)
            ops.append(_Filter(lambda a, k=k: cv2.filter2D(a, -1, k, borderType=cv2.BORDER_REFLECT_101), k.shape[0] // 2))
        elif kind == "haze":
            ops.append(_Haze(p, frame, h, w))
        elif kind == "vignetting":
            ops.append(_Pointwise(lambda x, y0, p=p: clinical.apply_vignetting(x, p, octx, y0)))
        elif kind in ("overexposure", "underexposure"):
            ops.append(_Pointwise(lambda x, y0, p=p: clinical.apply_exposure(x, p, octx)))
        else:  # pragma: no cover - the recipe schema admits no other type
            raise ValueError(f"no banded form for step type {kind!r}")
    return ops


class _SoftMask:
    """The soft FOV mask, computed once a band at a time and kept per row as its nonzero span plus the
    values in it that are not 1 (the rim): a few megabytes instead of 4 bytes a pixel, rows rebuilt exactly."""

    def __init__(self, binary: np.ndarray, fov: FovGeometry, band: int):
        self.w = fov.width
        self.span = np.zeros((fov.height, 2), np.int64)
        self.rim: list[tuple[np.ndarray, np.ndarray] | None] = []
        for a in range(0, fov.height, band):
            for i, row in enumerate(soft_fov_rows(binary, fov, a, min(fov.height, a + band))):
                nz = np.flatnonzero(row)
                if not len(nz):
                    self.rim.append(None)
                    continue
                x0, x1 = int(nz[0]), int(nz[-1]) + 1
                self.span[a + i] = (x0, x1)
                idx = np.flatnonzero(row[x0:x1] != 1.0)
                self.rim.append((idx + x0, row[x0:x1][idx].copy()) if len(idx) else None)

    def rows(self, a: int, b: int) -> np.ndarray:
        out = np.zeros((b - a, self.w), np.float32)
        for i, y in enumerate(range(a, b)):
            x0, x1 = self.span[y]
            out[i, x0:x1] = 1.0
            if self.rim[y] is not None:
                out[i, self.rim[y][0]] = self.rim[y][1]
        return out


class _Bands:
    """Pulls rows of any operation's output through the chain (recomputing the overlaps)."""

    def __init__(self, ops: list[_Op], read_rows, soft: _SoftMask, h: int):
        self.ops, self.read_rows, self._mask, self.h = ops, read_rows, soft, h

    def soft(self, a: int, b: int) -> np.ndarray:
        return self._mask.rows(a, b)

    def rows(self, k: int, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of the output of operation ``k`` (-1: the masked, clipped input): float32, C-contiguous,
        the caller's to overwrite."""
        if k < 0:
            x = np.asarray(self.read_rows(a, b), dtype=np.float32)
            x = np.clip(x, 0.0, 1.0, out=x) if x.flags.writeable and x.flags.c_contiguous else np.clip(x, 0.0, 1.0)
            x *= (self.soft(a, b) > 0)[..., None]
            return x
        op = self.ops[k]
        lo, hi = max(0, a - op.radius), min(self.h, b + op.radius)
        if op.align > 1:
            lo = lo // op.align * op.align
            hi = min(self.h, -(-hi // op.align) * op.align)
        return op(self.rows(k - 1, lo, hi), lo)[a - lo : b - lo]  # a view: contiguous rows, this call's own

    def grid(self, band: int, unit: int = 1):
        band = max(unit, band // unit * unit)
        for a in range(0, self.h, band):
            yield a, min(self.h, a + band)


def apply_banded(
    params: dict,
    read_rows: Callable[[int, int], np.ndarray],
    binary: np.ndarray,
    write_rows: Callable[[int, np.ndarray], None],
    levels: int = 255,
    *,
    exact: bool | None = None,
    details: dict | None = None,
    band_rows: int | None = None,
) -> None:
    """:meth:`Degrader.apply` for a photograph too large to hold as float: the same result, a band at a time.

    ``read_rows(a, b)`` returns rows [a, b) of the input as float32 ``(b - a)×W×3`` in [0, 1] (a new
    array the callee may overwrite); it is called several times per row (once per statistic pass, and
    for the overlaps). ``binary`` is the boolean H×W FOV mask (the soft mask is derived from it a band
    at a time, as :func:`~degradation.soft_fov_mask` does). ``write_rows(a, rows)`` receives the result's
    rows [a, a + len(rows)) once each, top to bottom, already multiplied by the soft mask. ``band_rows``
    overrides the band height (default: about :data:`BAND_PIXELS` pixels)."""
    fov = FovGeometry.from_dict(params["fov"])
    if np.shape(binary) != (fov.height, fov.width):
        raise ValueError(f"mask shape {np.shape(binary)} does not match the recorded FOV frame {(fov.height, fov.width)}")
    frame = Frame(fov)
    w = fov.width
    ops = _chain(params, frame, binary, int(levels), exact, details)
    band = band_rows or max(16, BAND_PIXELS // max(1, w))
    bands = _Bands(ops, read_rows, _SoftMask(binary, fov, band), fov.height)
    for k, op in enumerate(ops):  # one pass per statistic, over the chain up to it
        if not op.stat:
            continue
        for a, b in bands.grid(band, op.unit):
            x = bands.rows(k - 1, a, b)
            op.collect(x, a, bands.soft(a, b) > 0)
        op.finish()
    for a, b in bands.grid(band):
        x = bands.rows(len(ops) - 1, a, b)
        np.clip(x, 0.0, 1.0, out=x)
        x *= bands.soft(a, b)[..., None]
        write_rows(a, x)
