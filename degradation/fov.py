"""Field-of-view (FOV) geometry and estimation for fundus photographs (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checks import as_array


@dataclass(frozen=True)
class FovGeometry:
    """The FOV circle in native pixel coordinates.

    ``cx``/``cy`` are the circle centre (column, row), ``radius`` its radius. The circle may extend past
    the image border (HRF and EyePACS photographs cut the FOV at the top and bottom).
    """

    cx: float
    cy: float
    radius: float
    height: int
    width: int

    @property
    def diameter(self) -> float:
        return 2.0 * self.radius

    def to_dict(self) -> dict:
        return {"cx": self.cx, "cy": self.cy, "radius": self.radius, "height": self.height, "width": self.width}

    @classmethod
    def from_dict(cls, d: dict) -> "FovGeometry":
        missing = [k for k in ("cx", "cy", "radius", "height", "width") if k not in d]
        if missing:
            raise ValueError(f"a FOV geometry needs cx, cy, radius, height and width; missing: {', '.join(missing)}")
        return cls(float(d["cx"]), float(d["cy"]), float(d["radius"]), int(d["height"]), int(d["width"]))

    def circle_mask(self) -> np.ndarray:
        """Bool HxW: pixel centres within the circle (computed in bands of rows, so a very large frame needs
        no full-size float array; each pixel's arithmetic is the same as in one piece)."""
        out = np.empty((self.height, self.width), bool)
        dx2 = (np.arange(self.width)[None, :] - self.cx) ** 2
        step = max(1, CIRCLE_BAND_PIXELS // max(1, self.width))
        for y0 in range(0, self.height, step):
            yy = np.arange(y0, min(self.height, y0 + step))[:, None]
            out[y0 : y0 + step] = dx2 + (yy - self.cy) ** 2 <= self.radius**2
        return out


CIRCLE_BAND_PIXELS = 1 << 21  # pixels per band of rows in FovGeometry.circle_mask (read when called)


# ------------------------------------------------------------------------------------------- estimation
#
# How the FOV is estimated (all at a working size whose longest side is ``_WORK_SIDE`` px):
#   1. v = max(R, G, B), smoothed (Gaussian), so a dark or colour-cast fundus still stands out from the
#      black surround.
#   2. The background level is the median of the four corner patches' levels (``corner_level``: a patch with
#      text burned into it counts by its darkest tenth; corners lie outside the FOV disc
#      even when the disc is cut at the top/bottom); the fundus level is the median of the pixels well
#      above it. Threshold = background + ``_THRESH_FRAC`` x (fundus - background), never less than
#      background + ``_MIN_CONTRAST``: low, so that dark, vignetted rims stay inside. A background above
#      ``_MAX_SURROUND`` x the fundus level is no surround (a crop inside the FOV: its darker, vignetted
#      corners are still fundus).
#   3. Largest connected region, holes filled (outer contour drawn filled).
#   4. A circle is fitted to the region's outline, leaving out the points on the image border (cut FOVs),
#      with a few rounds of outlier rejection (notches, labels, reflections, dark rims).
#   5. The native-resolution mask is the fitted circle clipped to the frame (rasterised exactly from
#      the geometry, so it does not inherit the working-size staircase).
# When there is no dark surround (an already-cropped image, a non-fundus photo) or the fit is implausible,
# ``estimate_fov`` returns the full frame and ``fov_geometry`` the inscribed circle.

_WORK_SIDE = 512
_THRESH_FRAC = 0.15
_MIN_CONTRAST = 0.02
# The surround must be dark: its level at most this fraction of the fundus level. Measured (max channel,
# corners' median over fundus median): 0.057 at most on DRIVE, 0.005 on HRF, 0 on HEI-MED and the CofeNet
# photographs, 0.24 on EyePACS-256 (grey, contrast-stretched surrounds); 0.82 at least on 60 crops lying
# inside the FOV of DRIVE and HRF photographs, where the vignetted rim of a crop was taken for a surround.
_MAX_SURROUND = 0.5
_BORDER_TOL = 1.5  # working-size px: outline points this close to the frame are the cut, not the rim


def _to_float_work(rgb: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Downscale (INTER_AREA) to the working size and return max-channel in [0,1] plus the scale factors."""
    import cv2

    a = as_array(rgb)
    if a.ndim not in (2, 3) or (a.ndim == 3 and not 1 <= a.shape[2] <= 4):
        hint = " (channels first? use x.transpose(1, 2, 0))" if a.ndim == 3 and a.shape[0] <= 4 else ""
        raise ValueError(f"expected an HxW or HxWxC image (C at most 4), got shape {a.shape}{hint}")
    if a.size == 0:
        raise ValueError(f"the image is empty (shape {a.shape})")
    h, w = a.shape[:2]
    ws, hs = fov_work_size(h, w)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    if a.ndim == 3 and a.shape[2] in (2, 4):
        a = a[..., : a.shape[2] - 1]  # drop alpha
    if a.dtype.kind == "f":
        scale = 1.0
    elif a.dtype in (np.uint8, np.uint16):
        scale = 1.0 / float(np.iinfo(a.dtype).max)
    else:  # an int64 image divided by 2**63 - 1 would be all dark: a full-frame "FOV" without a word
        raise TypeError(f"unsupported dtype {a.dtype}: give uint8, uint16 or float in [0, 1]")
    if (ws, hs) != (w, h):
        a = cv2.resize(np.ascontiguousarray(a), (ws, hs), interpolation=cv2.INTER_AREA)
    v = _channel_max(a) if a.ndim == 3 else a
    v = v.astype(np.float32) * np.float32(scale)
    if not np.isfinite(v).all():  # NaN survives the reduction: checked on the small working image
        raise ValueError("the image holds NaN or infinite values")
    return v, ws / w, hs / h


def _full_frame(h: int, w: int) -> FovGeometry:
    return FovGeometry(cx=(w - 1) / 2.0, cy=(h - 1) / 2.0, radius=min(h, w) / 2.0, height=h, width=w)


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Algebraic (Kasa) least-squares circle through points (x, y)."""
    xm, ym = x.mean(), y.mean()
    u, v = x - xm, y - ym
    A = np.stack([u, v, np.ones_like(u)], axis=1)
    b = u * u + v * v
    sol, *_ = np.linalg.lstsq(A, b, rcond=None)
    cx, cy = sol[0] / 2.0, sol[1] / 2.0
    r = float(np.sqrt(max(sol[2] + cx * cx + cy * cy, 0.0)))
    return float(cx + xm), float(cy + ym), r


def _robust_circle(x: np.ndarray, y: np.ndarray, rounds: int = 4) -> tuple[float, float, float, np.ndarray]:
    keep = np.ones(x.shape, bool)
    cx, cy, r = _fit_circle(x, y)
    for _ in range(rounds):
        res = np.hypot(x - cx, y - cy) - r
        mad = np.median(np.abs(res[keep])) if keep.any() else 0.0
        tol = max(1.0, 3.0 * 1.4826 * mad)
        new = np.abs(res) <= tol
        if new.sum() < 10 or np.array_equal(new, keep):
            break
        keep = new
        cx, cy, r = _fit_circle(x[keep], y[keep])
    return cx, cy, r, keep


def _outline_points(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float]] | None:
    """Outline of the largest region of ``mask`` (pixel centres), minus the points on straight cuts.

    A cut is the image border, or a straight horizontal/vertical edge of the region (black padding
    bands, e.g. EyePACS images padded to a square): a bounding-box side along which at least 8% of the
    outline runs. Returns (x, y, box) with box = (x0, y0, x1, y1), the kept region's extent in
    working pixel edges (the frame on uncut sides).
    """
    import cv2

    m = np.ascontiguousarray(mask.astype(np.uint8))
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    c = max(contours, key=cv2.contourArea).reshape(-1, 2).astype(np.float64)
    h, w = m.shape
    x, y = c[:, 0], c[:, 1]
    n = x.size
    box = [-0.5, -0.5, w - 0.5, h - 0.5]
    keep = (x > _BORDER_TOL) & (x < w - 1 - _BORDER_TOL) & (y > _BORDER_TOL) & (y < h - 1 - _BORDER_TOL)
    for side, coord, edge in ((0, x, x.min()), (1, y, y.min()), (2, x, x.max()), (3, y, y.max())):
        on = np.abs(coord - edge) <= 1.5
        if on.sum() >= 0.08 * n:
            keep &= np.abs(coord - edge) > _BORDER_TOL
            box[side] = edge - 0.5 if side < 2 else edge + 0.5
    return x[keep], y[keep], (box[0], box[1], box[2], box[3])


def _refine_radius(v: np.ndarray, cx: float, cy: float, r: float, box, bg: float) -> float:
    """Move the radius to the half-level crossing of the median radial profile around the rim."""
    import cv2

    band, step = 6.0, 0.5
    radii = np.arange(-band, band + 1e-9, step)
    theta = np.linspace(-np.pi, np.pi, 360, endpoint=False)
    xs = cx + np.cos(theta)[:, None] * (r + radii)[None, :]
    ys = cy + np.sin(theta)[:, None] * (r + radii)[None, :]
    # rays that meet a cut (or leave the frame) are left out
    inside = (xs > box[0] + 2) & (xs < box[2] - 2) & (ys > box[1] + 2) & (ys < box[3] - 2)
    rays = inside.all(axis=1)
    if rays.sum() < 30:
        return r
    samples = cv2.remap(v, xs[rays].astype(np.float32), ys[rays].astype(np.float32), cv2.INTER_LINEAR)
    prof = np.median(samples, axis=0)
    centres = radii
    ok = np.isfinite(prof)
    if ok.sum() < 8:
        return r
    prof, centres = prof[ok], centres[ok]
    inner = float(np.median(prof[centres < -band + 2.5]))
    half = bg + 0.5 * (inner - bg)
    if inner - bg < 2 * _MIN_CONTRAST:
        return r
    # last crossing from above to below the half level, walking outwards
    above = prof >= half
    for i in range(len(prof) - 1, 0, -1):
        if above[i - 1] and not above[i]:
            f = (prof[i - 1] - half) / max(prof[i - 1] - prof[i], 1e-6)
            return r + float(centres[i - 1] + f * (centres[i] - centres[i - 1]))
    return r


def _geometry_from_work_mask(
    work: np.ndarray, h: int, w: int, sx: float, sy: float, v: np.ndarray | None = None, bg: float = 0.0
) -> tuple[FovGeometry, tuple[float, float, float, float]] | None:
    """Fit the circle at working size and map it (and the cut box) to native coordinates; None if implausible."""
    pts = _outline_points(work)
    if pts is None or pts[0].size < 20:
        return None
    x, y, box = pts
    cx, cy, r, keep = _robust_circle(x, y)
    hs, ws = work.shape
    # the outline runs through the centres of the outermost FOV pixels: the edge is half a pixel further out
    r = r + 0.5
    if not np.isfinite(r) or r < 0.2 * min(hs, ws) or r > 1.5 * max(hs, ws):
        return None
    if not (0 <= cx < ws and 0 <= cy < hs):  # a field whose centre lies outside the picture (a squashed 1024x32 strip:
        return None  # campaign 27a F7); none of the 1,825 photographs of ../shared/data has one
    if keep.sum() < 20:
        return None
    # spread of kept points around the centre: an arc shorter than ~60 degrees cannot pin the circle
    ang = np.arctan2(y[keep] - cy, x[keep] - cx)
    if np.histogram(ang, bins=12, range=(-np.pi, np.pi))[0].astype(bool).sum() < 2:
        return None
    if v is not None:
        r = _refine_radius(v, cx, cy, r, box, bg)
    geom = FovGeometry(
        cx=(cx + 0.5) / sx - 0.5, cy=(cy + 0.5) / sy - 0.5, radius=float(r / np.sqrt(sx * sy)), height=h, width=w
    )
    nbox = (box[0] + 0.5) / sx - 0.5, (box[1] + 0.5) / sy - 0.5, (box[2] + 0.5) / sx - 0.5, (box[3] + 0.5) / sy - 0.5
    return geom, nbox


#: A corner square whose darkest tenth is dark (at most ``_CORNER_DARK``), whose median lies more than
#: ``_CORNER_SPREAD`` above it and whose brightest tenth more than ``_CORNER_BRIGHT`` above the median holds bright
#: marks on a dark ground (a burned-in date, name or logo): its level is that darkest tenth. (Without the last test a
#: thin black line along the frame of a grey surround counted as marks, and the FOV was lost; review 43 M2.) Text
#: on the black surround of DRIVE, HEI-MED, CofeNet and EyePACS photographs: tenths 0 to 0.047, medians 0.18 to 0.28,
#: brightest tenths 0.07 to 0.16 above them. A dark surround alone varies by less; a picture's own corners
#: (scikit-image's astronaut, 0.064 and 0.44) are not dark enough, so a natural picture is still read whole.
_CORNER_DARK = 0.05
_CORNER_SPREAD = 0.05
_CORNER_BRIGHT = 0.06


def corner_level(v: np.ndarray, least: int = 2) -> float:
    """The level of a picture's surround as its corners show it: the median of its four corner squares' levels,
    each square 4% of the shorter side (at least ``least`` pixels). A square's level is its median, or, where
    text or a logo is burned into it (see ``_CORNER_DARK``), its 10th percentile: a stamp in two or four corners
    had raised the surround to the fundus level, so no FOV was found or its dim rim was cut off (campaign 43a F1).
    ``v``: HxW or HxWxC, in [0, 1] (or integer levels, for which the limits are scaled to the type's range)."""
    p = max(least, int(round(0.04 * min(v.shape[:2]))))
    full = float(np.iinfo(v.dtype).max) if v.dtype.kind in "ui" else 1.0
    levels = []
    for c in (v[:p, :p], v[:p, -p:], v[-p:, :p], v[-p:, -p:]):
        low, med, high = (float(x) for x in np.percentile(c, (10, 50, 90)))
        text = low <= _CORNER_DARK * full and med - low > _CORNER_SPREAD * full and high - med > _CORNER_BRIGHT * full
        levels.append(low if text else med)
    return float(np.median(levels))


def _threshold_work(v: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(foreground mask at working size, background level), or None when there is no dark surround."""
    import cv2

    hs, ws = v.shape
    sig = max(1.0, max(hs, ws) / 256.0)
    vs = cv2.GaussianBlur(v, (0, 0), sig)
    bg = corner_level(vs)
    above = vs[vs > bg + _MIN_CONTRAST]
    if above.size < 0.1 * vs.size:
        return None
    fg = float(np.median(above))
    if fg - bg < 2 * _MIN_CONTRAST or bg > _MAX_SURROUND * fg:  # no dark surround: the corners are fundus too
        return None
    t = bg + max(_THRESH_FRAC * (fg - bg), _MIN_CONTRAST)
    m = (vs > t).astype(np.uint8)
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, k)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    big = max(contours, key=cv2.contourArea)
    out = np.zeros_like(m)
    cv2.drawContours(out, [big], -1, 1, thickness=cv2.FILLED)
    frac = out.mean()
    if frac > 0.985 or frac < 0.1:
        return None
    return out.astype(bool), bg


def _clip_to_box(mask: np.ndarray, box) -> np.ndarray:
    """Clear the native rows/columns outside the cut box (x0, y0, x1, y1 given as pixel-edge coordinates)."""
    h, w = mask.shape
    c0, r0 = int(np.ceil(box[0])), int(np.ceil(box[1]))
    c1, r1 = int(np.floor(box[2])) + 1, int(np.floor(box[3])) + 1
    c0, r0, c1, r1 = max(0, c0), max(0, r0), min(w, c1), min(h, r1)
    mask[:r0] = False
    mask[r1:] = False
    mask[:, :c0] = False
    mask[:, c1:] = False
    return mask


def estimate_fov_geometry(rgb: np.ndarray) -> tuple[np.ndarray, FovGeometry]:
    """(bool HxW FOV mask at native resolution, fitted FOV circle) for a fundus photograph.

    ``rgb``: HxWx3 (or HxW, or HxWx2 and HxWx4: alpha ignored) float in [0,1], uint8 or uint16, any size
    (another dtype, a channels-first array or NaN: a ``TypeError`` or ``ValueError``). The
    mask is the fitted circle clipped to the frame. If no FOV can be found (no dark surround: a cropped
    or non-fundus image), the mask is the full frame and the geometry the inscribed circle.
    """
    a = np.asarray(rgb)
    h, w = a.shape[:2]
    v, sx, sy = _to_float_work(a)
    return _estimate_from_work(v, h, w, sx, sy)


def fov_work_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of the working image the FOV is estimated on (longest side at most 512)."""
    s = min(1.0, _WORK_SIDE / max(height, width))
    return max(1, int(round(width * s))), max(1, int(round(height * s)))


def estimate_fov_geometry_work(work: np.ndarray, height: int, width: int) -> tuple[np.ndarray, FovGeometry]:
    """``estimate_fov_geometry`` of a ``height`` x ``width`` photograph given only its working image: the
    photograph as float in [0, 1] area-averaged to ``fov_work_size(height, width)`` (HxWx3 or HxW). For
    photographs too large to hold as float (the caller reduces them in bands)."""
    ws, hs = fov_work_size(height, width)
    v = np.asarray(work, np.float32)
    if v.shape[:2] != (hs, ws):
        raise ValueError(f"working image {v.shape[:2]} is not {(hs, ws)}")
    v = _channel_max(v) if v.ndim == 3 else v
    return _estimate_from_work(v, height, width, ws / width, hs / height)


def _channel_max(a: np.ndarray) -> np.ndarray:
    """``a.max(axis=2)``, the same values (NaN included), as elementwise maxima of the channel planes: numpy's
    reduction over a last axis of 3 took 9 ms on a DRIVE-size working image, this 0.3 ms (campaign 36b B3)."""
    out = a[..., 0].copy()
    for k in range(1, a.shape[2]):
        np.maximum(out, a[..., k], out=out)
    return out


def _estimate_from_work(v: np.ndarray, h: int, w: int, sx: float, sy: float) -> tuple[np.ndarray, FovGeometry]:
    found = _threshold_work(v)
    fit = None if found is None else _geometry_from_work_mask(found[0], h, w, sx, sy, v, found[1])
    if fit is None:
        return np.ones((h, w), bool), _full_frame(h, w)
    geom, box = fit
    return _clip_to_box(geom.circle_mask(), box), geom


def estimate_fov(rgb: np.ndarray) -> np.ndarray:
    """Bool HxW FOV mask at native resolution (full frame if no FOV is found); see estimate_fov_geometry."""
    return estimate_fov_geometry(rgb)[0]


def fov_geometry(mask: np.ndarray) -> FovGeometry:
    """Fit the FOV circle (centre, radius; native pixel coordinates) to a FOV mask.

    The circle is fitted to the outline of the mask's largest region, leaving out outline points on the
    image border, so FOVs cut at the top/bottom (HRF, EyePACS) give the full circle, which then extends
    past the frame. Large masks are fitted at a reduced size (longest side 512) for speed. An empty or
    full-frame mask, or one whose outline cannot pin a circle, gives the inscribed circle.
    """
    import cv2

    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., 0]
    m = m > (0 if m.dtype == np.bool_ else (np.iinfo(m.dtype).max // 2 if m.dtype.kind in "ui" else 0.5))
    h, w = m.shape
    s = min(1.0, _WORK_SIDE / max(h, w))
    if s < 1.0:
        ws, hs = max(1, int(round(w * s))), max(1, int(round(h * s)))
        small = cv2.resize(m.astype(np.float32), (ws, hs), interpolation=cv2.INTER_AREA) >= 0.5
        sx, sy = ws / w, hs / h
    else:
        small, sx, sy = m, 1.0, 1.0
    if not small.any() or small.all():
        return _full_frame(h, w)
    fit = _geometry_from_work_mask(small, h, w, sx, sy)
    return _full_frame(h, w) if fit is None else fit[0]
