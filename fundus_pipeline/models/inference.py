"""Inference helpers shared by every network stage: padding to the model's size divisor, tiled
prediction with overlap blending and batched tiles (any number of output channels), the working scale,
and the vessel-specific finishing (sigmoid, FOV margin, native resolution)."""

from __future__ import annotations

import contextlib
import math
import threading
import weakref

import cv2
import numpy as np
import torch

from degradation.checks import binary_mask, unit_image
from fundus_pipeline.device import to_device
import torch.nn.functional as F

DEFAULT_MAX_FOV_DIAMETER = 1800.0
# Probabilities are kept up to this fraction of the FOV diameter outside the estimated FOV edge. 0 by
# default: pixels outside the estimated FOV are 0. A margin recovers the ~1-px ring by which the datasets'
# own masks exceed the estimate (DRIVE validation AUC-ROC +0.0009 at 1.5%), but the model also fires on
# the bright-to-black rim itself, so on photographs with a wide dark border it draws false vessels along
# the edge (scripts/val_fov_margin.py counts them on the validation images).
DEFAULT_FOV_MARGIN = 0.0
DEFAULT_TILE = 1024
DEFAULT_OVERLAP = 64


def working_scale(fov_diameter: float, max_fov_diameter: float = DEFAULT_MAX_FOV_DIAMETER) -> float:
    """The model's working scale for an image whose FOV has this diameter (native pixels).

    Images are downscaled by the smallest integer factor that brings the FOV diameter to at most
    ``max_fov_diameter``: DRIVE (FOV ~540 px) stays at 1, HRF (~3260 px) and 2560-px EyePACS photographs
    go to 1/2. This matches how the shipped models were trained (DRIVE native, HRF halved).
    """
    if not math.isfinite(fov_diameter) or fov_diameter <= 0:
        return 1.0
    return 1.0 / max(1, math.ceil(fov_diameter / max_fov_diameter))


def _pad_to(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, int, int]:
    h, w = x.shape[-2:]
    ph = (-h) % divisor
    pw = (-w) % divisor
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    return x, h, w


def _ramp(n: int, overlap: int) -> np.ndarray:
    w = np.ones(n, np.float32)
    if overlap > 0:
        r = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
        w[:overlap] = np.minimum(w[:overlap], r)
        w[-overlap:] = np.minimum(w[-overlap:], r[::-1])
    return w


def _axis_tiles(n: int, tile: int, overlap: int, divisor: int) -> tuple[list[int], int]:
    """(tile starts, tile length) along one axis of ``n`` pixels: the fewest tiles of at most ``tile`` pixels
    that overlap by at least ``overlap``, all of one length (the smallest multiple of ``divisor`` that
    suffices, so no padding), spread evenly. Balanced tiles cover 1411 px with two of 752 instead of two of
    1024 (the computation nearly halves on a 1411x1411 photograph)."""
    if n <= tile:
        return [0], n
    k = math.ceil((n - overlap) / (tile - overlap))
    t = min(tile, math.ceil((math.ceil((n - overlap) / k) + overlap) / divisor) * divisor)
    k = max(k, math.ceil((n - overlap) / (t - overlap)))  # the divisor rounding may not be available under tile
    return [((n - t) * i) // (k - 1) for i in range(k)], t


def _tile_boxes(H: int, W: int, tile: int, overlap: int, divisor: int = 1) -> list[tuple[int, int, int, int]]:
    ys, th = _axis_tiles(H, tile, overlap, divisor)
    xs, tw = _axis_tiles(W, tile, overlap, divisor)
    return [(y0, x0, th, tw) for y0 in ys for x0 in xs]


def _tile_weight(box: tuple[int, int, int, int], overlap: int, H: int, W: int) -> np.ndarray:
    """Linear-ramp blending weights of one tile; tiles that touch the image border keep full weight there."""
    y0, x0, th, tw = box
    wy = _ramp(th, min(overlap, th // 2))
    wx = _ramp(tw, min(overlap, tw // 2))
    if y0 == 0:
        wy[:overlap] = 1.0
    if y0 + th >= H:
        wy[-overlap:] = 1.0
    if x0 == 0:
        wx[:overlap] = 1.0
    if x0 + tw >= W:
        wx[-overlap:] = 1.0
    return wy[:, None] * wx[None, :]


_EVAL_LOCK = threading.Lock()
_EVALUATING: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()  # model: [depth, its modes]


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """``model`` in eval mode inside (BatchNorm and dropout as at inference, BatchNorm's running statistics
    left alone), each submodule's own mode restored after: a caller's training loop is not disturbed. Calls that
    overlap on one model (threads sharing it) keep it in eval mode until the last one leaves, which restores the
    modes the first one found: each call had restored its own, so one thread's train mode came back while another
    thread's forward pass ran, which then updated BatchNorm's statistics and gave wrong maps (campaign 43c F1)."""
    with _EVAL_LOCK:
        state = _EVALUATING.get(model)
        if state is None:
            state = _EVALUATING[model] = [0, [(m, m.training) for m in model.modules()]]
            model.eval()
        state[0] += 1
    try:
        yield model
    finally:
        with _EVAL_LOCK:
            state[0] -= 1
            if state[0] == 0:
                for m, mode in state[1]:
                    m.training = mode
                _EVALUATING.pop(model, None)


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of ``model``'s first floating-point parameter (CPU float32 without one)."""
    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def to_model(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """A float32 input batch on ``device`` (:func:`~fundus_pipeline.device.to_device`), in the model's
    parameter ``dtype`` when that is not float32 (a ``.half()`` model)."""
    t = to_device(t, device)
    return t if dtype == torch.float32 else t.to(dtype)


@torch.inference_mode()
def predict_tiled(
    model: torch.nn.Module,
    image: np.ndarray,
    *,
    device: torch.device | str | None = None,
    tile: int | None = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
    batch_size: int = 1,
) -> np.ndarray:
    """The model's output (float32 HxWxC, all C output channels) for a float HxWxC_in image.

    The model maps N x C_in x h x w to N x C x h x w for h, w divisible by its ``size_divisor``; the
    image is padded (reflect) to that and the output cropped back. With ``tile`` set and the image
    larger than a tile, overlapping tiles are blended with linear ramps, which bounds memory for any
    image size; ``batch_size`` tiles go through the model together. ``tile=None``: one pass. The model
    runs in eval mode (its own mode restored after), on ``device`` (default: its parameters' device), with
    the input in its parameters' dtype when that is not float32 (a ``.half()`` model).
    """
    if image.dtype.kind != "f":  # a uint8 image would be taken as values up to 255
        raise TypeError(f"image must be a float array, got dtype {image.dtype}")
    own_device, own_dtype = model_device_dtype(model)
    device = torch.device(device) if device is not None else own_device
    divisor = int(getattr(model, "size_divisor", 16))
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
    H, W = image.shape[:2]

    def run(t: torch.Tensor) -> np.ndarray:  # N x h x w x C
        t, h, w = _pad_to(t, divisor)
        y = model(to_model(t, device, own_dtype))
        return y.float()[:, :, :h, :w].cpu().numpy().transpose(0, 2, 3, 1)

    with evaluating(model):
        return _tiled(run, x, H, W, tile, overlap, divisor, batch_size)


def _tiled(run, x: torch.Tensor, H: int, W: int, tile: int | None, overlap: int, divisor: int, batch_size: int) -> np.ndarray:
    """:func:`predict_tiled`'s passes: ``run`` on the whole image, or on overlapping tiles blended."""
    if tile is None or (H <= tile and W <= tile):
        return np.ascontiguousarray(run(x)[0])
    tile = max(tile, 2 * overlap + divisor)
    boxes = _tile_boxes(H, W, tile, overlap, divisor)
    outs: list[np.ndarray] = []
    step = max(1, batch_size)
    for i in range(0, len(boxes), step):
        group = boxes[i : i + step]
        if len({(th, tw) for _, _, th, tw in group}) == 1:
            outs.extend(run(torch.cat([x[..., y0 : y0 + th, x0 : x0 + tw] for y0, x0, th, tw in group])))
        else:
            outs.extend(run(x[..., y0 : y0 + th, x0 : x0 + tw])[0] for y0, x0, th, tw in group)
    acc = np.zeros((H, W, outs[0].shape[-1]), np.float32)
    wsum = np.zeros((H, W), np.float32)
    for box, out in zip(boxes, outs):
        y0, x0, th, tw = box
        wgt = _tile_weight(box, overlap, H, W)
        acc[y0 : y0 + th, x0 : x0 + tw] += out * wgt[..., None]
        wsum[y0 : y0 + th, x0 : x0 + tw] += wgt
    return acc / np.maximum(wsum, 1e-6)[..., None]


def predict_logits(model: torch.nn.Module, rgb: np.ndarray, **kw) -> np.ndarray:
    """Vessel logits (float32 HxW): :func:`predict_tiled`'s one channel for an RGB image at the model's scale; a
    network of another number of output channels (an enhancer's three) is a ``ValueError`` (its first channel had
    been read as vessels; campaign 27b F3)."""
    out = predict_tiled(model, rgb, **kw)
    if out.shape[-1] != 1:
        raise ValueError(f"the model gives {out.shape[-1]} channels: a vessel segmenter gives one (weights of another task?)")
    return np.ascontiguousarray(out[..., 0])


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))).astype(np.float32)


def fov_keep_mask(fov_mask: np.ndarray, margin_px: float) -> np.ndarray:
    """``fov_mask`` grown by ``margin_px`` pixels (Euclidean distance), the region whose probabilities are kept."""
    fov_mask = np.asarray(fov_mask, bool)
    if margin_px <= 0 or fov_mask.all() or not fov_mask.any():
        return fov_mask
    dist = cv2.distanceTransform((~fov_mask).astype(np.uint8), cv2.DIST_L2, 5)
    return dist <= margin_px


def predict_native(
    model: torch.nn.Module,
    rgb: np.ndarray,
    fov_mask: np.ndarray,
    scale: float,
    margin_px: float = 0.0,
    **kw,
) -> np.ndarray:
    """Vessel probability (float32 HxW in [0,1]) at the image's native resolution.

    ``rgb``: float HxWx3 in [0, 1] (``fundus_pipeline.io.to_float_rgb`` of what ``read_image`` gives; an
    integer or [0, 255] image is a ``TypeError`` or ``ValueError``, not a worse map). ``fov_mask``: HxW, any
    non-zero value inside. ``scale``: the working scale, ``working_scale(geometry.diameter)``, so that the
    FOV has the diameter the weights were trained at. 0 further than ``margin_px`` outside ``fov_mask``
    (see :func:`fov_keep_mask`). ``kw``: :func:`predict_tiled`'s ``device`` (default: the model's),
    ``tile``, ``overlap`` and ``batch_size``. The model runs in eval mode.
    """
    rgb = unit_image(rgb, "rgb")
    fov_mask = binary_mask(fov_mask, rgb.shape[:2], "fov_mask")
    try:
        ok = math.isfinite(float(scale)) and float(scale) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"scale must be a positive number (working_scale(geometry.diameter)), got {scale!r}")
    H, W = rgb.shape[:2]
    if scale != 1.0:
        small = cv2.resize(rgb, (max(1, round(W * scale)), max(1, round(H * scale))), interpolation=cv2.INTER_AREA)
    else:
        small = rgb
    logits = predict_logits(model, small, **kw)
    if scale != 1.0:
        logits = cv2.resize(logits, (W, H), interpolation=cv2.INTER_LINEAR)
    prob = sigmoid(logits)
    prob[~fov_keep_mask(fov_mask, margin_px)] = 0.0
    return prob


def predict_native_bands(
    model: torch.nn.Module,
    image,
    fov_mask: np.ndarray,
    scale: float,
    margin_px: float = 0.0,
    **kw,
):
    """:func:`predict_native` for a very large photograph (a ``stages.base.Image``, or anything with its
    ``color`` integer planes and ``maxval``): yields ``(rows, probability rows)`` one band of native rows at
    a time (``fundus_pipeline.bands``), with no full-resolution float copy of the photograph or of the
    probability map. The working-scale image is area-averaged from the integer planes in bands and the
    logits return to native size by banded bilinear interpolation, both as OpenCV computes them (to float
    rounding)."""
    from fundus_pipeline.bands import BandUpsampler, rgb_downscale, row_bands

    H, W = image.color.shape[:2]
    ws, hs = (max(1, round(W * scale)), max(1, round(H * scale))) if scale != 1.0 else (W, H)
    small = rgb_downscale(image.color, ws, hs, image.maxval)  # scale 1 (a huge frame, a small FOV): native size
    logits = predict_logits(model, small, **kw)
    del small
    keep = fov_keep_mask(fov_mask, margin_px)
    up = BandUpsampler(logits, W, H) if scale != 1.0 else None
    for rows in row_bands(H, W):
        prob = sigmoid(up.rows(rows) if up is not None else logits[rows])
        prob[~keep[rows]] = 0.0
        yield rows, prob
