"""Row-band processing of very large photographs, so that memory does not grow with full-resolution float
copies of the image.

Photographs up to ``LARGE_PIXELS`` (32 megapixels: every camera in the datasets here is at most 10) take
the stages' exact paths, whose bytes are pinned by the tests. Above it, the network stages keep only the
decoded image, the FOV mask and their integer outputs at native size, and compute everything else in
bands of rows (``row_bands``):

* the FOV is estimated from the decoded integer array (``Fov.estimate`` downsizes it first anyway), and
  images are brought to a model's working scale from the integer array (area averaging), then converted
  to float;
* a low-resolution result is brought back to native size by :class:`BandUpsampler`, bilinear
  interpolation with OpenCV's ``INTER_LINEAR`` coordinate convention (pixel centres at +0.5, edge
  clamping) computed one band of destination rows at a time.

The banded results agree with the exact path to within float rounding on the network side and one code
value on rare pixels of the written images (measured in ``tests/test_bands.py``); the same input and
options still give the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator

import cv2
import numpy as np

LARGE_PIXELS = 32_000_000
BAND_PIXELS = 1 << 22  # about 4 megapixels of destination per band


def is_large(height: int, width: int) -> bool:
    return height * width > LARGE_PIXELS


def row_bands(height: int, width: int, pixels: int | None = None) -> Iterator[slice]:
    """Consecutive row slices covering ``height`` rows, each about ``pixels`` (default: ``BAND_PIXELS``, read
    when called) destination pixels at ``width`` columns."""
    step = max(1, (BAND_PIXELS if pixels is None else pixels) // max(1, width))
    for y in range(0, height, step):
        yield slice(y, min(height, y + step))


def _taps(dst: np.ndarray, scale: float, n_src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and weights of i1 for destination coordinates ``dst`` (INTER_LINEAR:
    ``s = (d + 0.5) * scale - 0.5``, clamped to the source)."""
    s = (dst.astype(np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(s).astype(np.int64)
    f = (s - i0).astype(np.float32)
    low = i0 < 0
    i0[low], f[low] = 0, 0.0
    high = i0 >= n_src - 1
    i0[high], f[high] = n_src - 1, 0.0
    return i0, np.minimum(i0 + 1, n_src - 1), f


class BandUpsampler:
    """``cv2.resize(src, (width, height), interpolation=INTER_LINEAR)``, one band of destination rows at a time.

    ``src``: float32 h x w or h x w x c. The horizontal pass of every source row is computed once (h x
    width x c floats: small, since the source is a low-resolution result); ``rows(sl)`` interpolates the
    destination rows ``sl`` from it."""

    def __init__(self, src: np.ndarray, width: int, height: int):
        src = np.asarray(src, np.float32)
        self.h, w = src.shape[:2]
        self.height, self.width = height, width
        x0, x1, fx = _taps(np.arange(width), w / width, w)
        fx = fx.reshape((1, width) + (1,) * (src.ndim - 2))
        self._wide = src[:, x0] * (1 - fx) + src[:, x1] * fx
        self._scale_y = self.h / height

    def rows(self, sl: slice) -> np.ndarray:
        y0, y1, fy = _taps(np.arange(sl.start, sl.stop), self._scale_y, self.h)
        fy = fy.reshape((-1, 1) + (1,) * (self._wide.ndim - 2))
        return self._wide[y0] * (1 - fy) + self._wide[y1] * fy


def _area_weights(n_src: int, n_dst: int):
    """Sparse n_dst x n_src matrix of area-averaging weights (OpenCV's INTER_AREA when shrinking: destination
    pixel i averages the source interval [i s, (i + 1) s), s = n_src / n_dst, partial pixels weighted by
    their overlap)."""
    from scipy import sparse

    s = n_src / n_dst
    rows, cols, vals = [], [], []
    for i in range(n_dst):
        a, b = i * s, (i + 1) * s
        j0, j1 = int(np.floor(a)), min(n_src, int(np.ceil(b)))
        for j in range(j0, j1):
            w = min(b, j + 1) - max(a, j)
            if w > 1e-12:
                rows.append(i)
                cols.append(j)
                vals.append(w / s)
    return sparse.csr_matrix((np.array(vals, np.float64), (rows, cols)), shape=(n_dst, n_src))


def area_downscale_float(
    arr: np.ndarray, width: int, height: int, maxval: float, *, box: tuple[int, int, int, int] | None = None, mask: np.ndarray | None = None
) -> np.ndarray:
    """``cv2.resize(region, (width, height), INTER_AREA)`` (shrinking) of ``arr / maxval`` as float32, computed from
    the integer ``arr`` one band of source rows at a time: no full-size float copy. Agrees with OpenCV to float
    rounding. ``box`` = (x0, y0, box width, box height): the region to resize, in ``arr``'s pixels; it may
    extend past the image, which then counts as 0 (the canonical frame's black padding). ``mask``: bool
    HxW; pixels outside it count as 0."""
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    bx, by, bw, bh = box if box is not None else (0, 0, w, h)
    ax0, ax1, ay0, ay1 = max(bx, 0), min(bx + bw, w), max(by, 0), min(by + bh, h)
    out = np.zeros((height, width * c), np.float32)
    if ax1 > ax0 and ay1 > ay0:
        wx = _area_weights(bw, width)[:, ax0 - bx : ax1 - bx].astype(np.float32)
        wy = _area_weights(bh, height).tocsc()[:, ay0 - by : ay1 - by].astype(np.float32)
        nx = ax1 - ax0
        for rows in row_bands(ay1 - ay0, nx):
            img_rows = slice(ay0 + rows.start, ay0 + rows.stop)
            n = rows.stop - rows.start
            band = arr[img_rows, ax0:ax1].astype(np.float32).reshape(n, nx, c)
            if mask is not None:
                band *= mask[img_rows, ax0:ax1, None]
            hx = wx @ band.transpose(1, 0, 2).reshape(nx, -1)  # horizontal pass: (nx, n*c) -> (width, n*c)
            hx = hx.reshape(width, n, c).transpose(1, 0, 2).reshape(n, width * c)
            out += wy[:, rows] @ hx
    out /= np.float32(maxval)
    return out.reshape((height, width) if arr.ndim == 2 else (height, width, c))


def rgb_downscale(color: np.ndarray, width: int, height: int, maxval: float, **kw) -> np.ndarray:
    """:func:`area_downscale_float` of an image's colour planes as float32 HxWx3 RGB (gray replicated), as
    ``to_float_rgb`` would give it."""
    small = area_downscale_float(color, width, height, maxval, **kw)
    return np.repeat(small[..., None], 3, axis=2) if small.ndim == 2 else small


def masked_frame(image, geometry, mask: np.ndarray, size: int) -> np.ndarray | None:
    """``clip(CanonicalFrame.from_fov(geometry, size).to_canonical(image.rgb * mask), 0, 1)`` of a very large
    photograph, area-averaged from its integer array in row bands (equal to float rounding, no float copy);
    None when the frame is no reduction (a small FOV in a huge frame: take the float path)."""
    from fundus_pipeline.canonical import CanonicalFrame

    frame = CanonicalFrame.from_fov(geometry, size)
    if frame.side <= size:
        return None
    box = (frame.x0, frame.y0, frame.side, frame.side)
    return np.clip(rgb_downscale(image.color, size, size, image.maxval, box=box, mask=mask), 0, 1)


def area_downscale(arr: np.ndarray, width: int, height: int) -> np.ndarray:
    """``arr`` (integer, any channels) resized to (width, height) with area averaging, from the integer array
    (no full-size float copy)."""
    a = np.ascontiguousarray(arr)
    if a.ndim == 3 and a.shape[2] == 2:  # OpenCV resizes 1, 3 or 4 channels in one call; gray+alpha by planes
        return np.stack([cv2.resize(np.ascontiguousarray(a[..., k]), (width, height), interpolation=cv2.INTER_AREA) for k in range(2)], axis=2)
    return cv2.resize(a, (width, height), interpolation=cv2.INTER_AREA)


__all__ = ["BAND_PIXELS", "LARGE_PIXELS", "BandUpsampler", "area_downscale", "area_downscale_float", "is_large", "masked_frame", "rgb_downscale", "row_bands"]
