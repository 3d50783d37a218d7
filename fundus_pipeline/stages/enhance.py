"""The ``enhance`` stage: a restored photograph at the input's native resolution, bit depth and geometry.

The network works in its canonical frame (the FOV's bounding square at the weights' size, 0 outside the
FOV). The result returns to native resolution by the weights' ``transfer`` rule: ``upsample`` resizes
the network output; ``residual`` adds the resized correction (output minus the canonical input) to the
native photograph, so detail finer than the canonical frame survives. Outside the FOV the output is 0
(``--keep-outside``: the input's pixels).

Columns, without a reference: mean luminance (BT.601 Y) and RMS contrast (standard deviation of Y)
inside the FOV before and after, and with ``vessel_stats`` the vessel fraction inside the FOV that the
segmenter finds before and after.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fundus_pipeline.canonical import CanonicalFrame
from fundus_pipeline.config import MAX_CORRECTION_SIGMA, EnhanceConfig
from fundus_pipeline.io import LUMA, from_float_rgb, to_float_rgb
from fundus_pipeline.stages.base import ItemInput, ItemOutput, Stage

if TYPE_CHECKING:
    import torch

    from degradation.fov import FovGeometry


def luminance_stats(rgb: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(mean, standard deviation) of BT.601 luminance over ``mask``."""
    y = (rgb @ LUMA)[mask]
    if y.size == 0:
        return 0.0, 0.0
    return float(y.mean()), float(y.std())


def canonical_input(rgb: np.ndarray, fov_mask: np.ndarray, geometry, size: int):
    """(frame, the masked photograph, the network's canonical input size x size x 3, the canonical FOV)."""
    frame = CanonicalFrame.from_fov(geometry, size)
    masked = rgb * fov_mask[..., None]
    c_in = np.clip(frame.to_canonical(masked), 0, 1).astype(np.float32)
    c_fov = frame.to_canonical(fov_mask.astype(np.uint8), interpolation=0) > 0
    c_in *= c_fov[..., None]
    return frame, masked, c_in, c_fov


def run_network(model, frames: list[np.ndarray], device=None) -> list[np.ndarray]:
    """The network's outputs (size x size x 3 each) for canonical inputs, in one forward pass (the model in
    eval mode, on ``device``, default its own, and in its parameters' dtype, as
    :func:`~fundus_pipeline.models.inference.predict_tiled`)."""
    import torch

    from fundus_pipeline.models.inference import evaluating, model_device_dtype, to_model

    own_device, dtype = model_device_dtype(model)
    with torch.inference_mode(), evaluating(model):
        x = to_model(torch.from_numpy(np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2))), own_device if device is None else device, dtype)
        y = model(x)
        if y.ndim != 4 or y.shape[1] != 3:  # a segmenter's one channel would broadcast into a black "photograph"
            raise ValueError(f"the model gives {tuple(y.shape)} for {tuple(x.shape)}: an enhancement network maps an image to an "
                             "image of 3 channels")
        y = y.float().cpu().numpy().transpose(0, 2, 3, 1)
    return list(y)


def output_rules(spec, transfer: str | None = None, sigma: float | None = None) -> tuple[int, str, float]:
    """(canonical frame side, transfer rule, correction sigma) of enhancement weights whose manifest entry is
    ``spec`` (``None``: a bare checkpoint), each taken from the entry unless overridden (``transfer`` None or
    ``"auto"``, ``sigma`` None: the entry's; defaults 512, ``residual``, 0). The one place that reads them, for
    ``fundus enhance``, the benchmark and the quality set."""
    from fundus_pipeline.models.spec import WeightsSpec

    if spec is not None and not isinstance(spec, WeightsSpec):  # (review 29 R29-6: a name was told it is no enhancer's)
        raise TypeError(f"output_rules takes a weights manifest entry (load_model(...)[1].spec) or None, got {type(spec).__name__}")
    if spec is not None and getattr(spec.output, "kind", None) != "image":  # (campaign 27b F5: a segmenter's gave defaults)
        raise ValueError(f"output_rules takes an enhancement weights' entry; {spec.name!r} is not one")
    policy = spec.input.scale_policy if spec else None
    out = spec.output if spec else None
    size = int(getattr(policy, "size", 512))
    rule = transfer if transfer not in (None, "auto") else getattr(out, "transfer", "residual")
    return size, rule, float(sigma if sigma is not None else getattr(out, "correction_sigma", 0.0))


def smooth_correction(c_in: np.ndarray, c_out: np.ndarray, c_fov: np.ndarray, sigma: float) -> np.ndarray:
    """``c_in`` plus the correction ``c_out - c_in`` low-passed inside the canonical FOV (a Gaussian of
    standard deviation ``sigma`` pixels, normalised by the blurred FOV so the rim is not darkened); ``c_out``
    itself when ``sigma`` is 0. Measured on validation: the network's fine-detail correction costs vessels
    and PSNR (README, "Enhancement results")."""
    if sigma <= 0:
        return c_out
    if not sigma <= MAX_CORRECTION_SIGMA:  # (the option's range; a kernel of a huge sigma takes gigabytes)
        raise ValueError(f"the correction's sigma must be at most {MAX_CORRECTION_SIGMA:g}, got {sigma!r}")
    import cv2

    m = c_fov.astype(np.float32)
    corr = cv2.GaussianBlur((c_out - c_in) * m[..., None], (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    weight = cv2.GaussianBlur(m, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    return c_in + corr / np.maximum(weight, 1e-3)[..., None]


def to_native(frame, masked: np.ndarray, c_in: np.ndarray, c_out: np.ndarray, c_fov: np.ndarray, fov_mask: np.ndarray, transfer: str) -> np.ndarray:
    """The network output back at native resolution by the ``transfer`` rule (0 outside ``fov_mask``)."""
    c_out = c_out * c_fov[..., None]
    if transfer == "upsample":
        out = frame.to_native(c_out)
    else:
        out = masked  # in place from here on: a large photograph holds fewer full-size copies
        out += frame.to_native(c_out - c_in)
    np.clip(out, 0, 1, out=out)
    out *= fov_mask[..., None]
    return out


def enhance_native(model, rgb: np.ndarray, fov_mask: np.ndarray, geometry: "FovGeometry | dict", size: int, transfer: str,
                   device: "str | torch.device | None" = None, sigma: float = 0.0) -> np.ndarray:
    """The enhanced photograph (float32 HxWx3 in [0, 1], native resolution; 0 outside ``fov_mask``).

    ``model``: enhancement weights' network (``load_model("cofe_add_seg")[0]``; run in eval mode). ``rgb``:
    float HxWx3 in [0, 1] (``fundus_pipeline.io.to_float_rgb``); ``fov_mask``: HxW, any non-zero value
    inside; ``geometry``: its FOV circle (``estimate_fov_geometry``; a ``FovGeometry`` or its dict).
    ``size``, ``transfer`` (``"upsample"`` or ``"residual"``) and ``sigma`` (the correction's low-pass, 0:
    none) are the weights' own: ``output_rules(weights.spec)``. ``device``: default the model's. A wrong
    argument is a ``TypeError`` or ``ValueError``, not a wrong photograph."""
    from degradation.checks import binary_mask, unit_image
    from degradation.fov import FovGeometry

    rgb = unit_image(rgb, "rgb")
    fov_mask = binary_mask(fov_mask, rgb.shape[:2], "fov_mask")  # a 0/255 mask would scale the output
    if isinstance(geometry, dict):
        geometry = FovGeometry.from_dict(geometry)
    if not isinstance(geometry, FovGeometry):  # (None had been an AttributeError deep in the frame; campaign 27b F2)
        raise TypeError(f"geometry must be a FovGeometry or its dict (estimate_fov_geometry), got {type(geometry).__name__}")
    if transfer not in ("upsample", "residual"):
        raise ValueError(f"transfer must be 'upsample' or 'residual' (output_rules(spec) gives the weights' own), got {transfer!r}")
    divisor = int(getattr(model, "size_divisor", 1))
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < divisor or size % divisor:
        raise ValueError(f"size must be a whole multiple of the network's {divisor} (output_rules(spec) gives the weights' own), got {size!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.integer, np.floating)) or not (math.isfinite(sigma) and 0 <= sigma <= MAX_CORRECTION_SIGMA):
        raise ValueError(f"sigma must be a number in [0, {MAX_CORRECTION_SIGMA:g}] (0: no low-pass; output_rules(spec) gives the weights' own), got {sigma!r}")
    frame, masked, c_in, c_fov = canonical_input(rgb, fov_mask, geometry, size)
    (c_out,) = run_network(model, [c_in], device)
    return to_native(frame, masked, c_in, smooth_correction(c_in, c_out, c_fov, sigma), c_fov, fov_mask, transfer)


def enhance_native_large(model, image, fov, size: int, transfer: str, device, keep_outside: bool, sigma: float = 0.0):
    """:func:`enhance_native` for a very large photograph (``fundus_pipeline.bands``), from its decoded integer
    array and in row bands: returns (the enhanced photograph in the input's dtype and layout, luminance
    statistics before (mean, std), after (mean, std)). The canonical input is area-averaged from the
    integer square and masked by the canonical FOV afterwards; the correction returns to native size by
    banded bilinear interpolation."""
    from fundus_pipeline.bands import BandUpsampler, rgb_downscale, row_bands

    frame = CanonicalFrame.from_fov(fov.geometry, size)
    c_fov = frame.to_canonical(fov.mask.view(np.uint8), interpolation=0) > 0
    if frame.side > size:  # the usual case: the masked FOV square area-averaged in bands, as to_canonical does
        c_in = rgb_downscale(image.color, size, size, image.maxval, box=(frame.x0, frame.y0, frame.side, frame.side), mask=fov.mask)
    else:  # a small FOV in a huge frame: only its (small) square is converted, as to_canonical would
        import cv2

        ax0, ax1, ay0, ay1 = frame._overlap()
        sq = np.zeros((frame.side, frame.side, 3), np.float32)
        box = (slice(ay0, ay1), slice(ax0, ax1))
        sq[ay0 - frame.y0 : ay1 - frame.y0, ax0 - frame.x0 : ax1 - frame.x0] = to_float_rgb(image.array[box], image.meta)[0] * fov.mask[box][..., None]
        c_in = sq if frame.side == size else cv2.resize(sq, (size, size), interpolation=cv2.INTER_LINEAR)
    np.clip(c_in, 0, 1, out=c_in)
    c_in *= c_fov[..., None]
    (c_out,) = run_network(model, [c_in], device)
    c_out = smooth_correction(c_in, c_out, c_fov, sigma) * c_fov[..., None]
    corr = c_out if transfer == "upsample" else c_out - c_in
    up = BandUpsampler(corr, frame.side, frame.side)
    ax0, ax1, ay0, ay1 = frame._overlap()
    h, w = fov.mask.shape
    out = np.empty_like(image.array)
    stats = np.zeros((2, 3), np.float64)  # before / after: count, sum, sum of squares of the luminance in the FOV
    for rows in row_bands(h, w):
        rgb, alpha = to_float_rgb(image.array[rows], image.meta)
        m = fov.mask[rows]
        native = np.zeros_like(rgb)
        r0, r1 = max(rows.start, ay0), min(rows.stop, ay1)
        if r0 < r1 and ax1 > ax0:
            native[r0 - rows.start : r1 - rows.start, ax0:ax1] = up.rows(slice(r0 - frame.y0, r1 - frame.y0))[:, ax0 - frame.x0 : ax1 - frame.x0]
        res = native if transfer == "upsample" else rgb * m[..., None] + native
        np.clip(res, 0, 1, out=res)
        res *= m[..., None]
        if keep_outside:
            res = np.where(m[..., None], res, rgb)
        out[rows] = from_float_rgb(res, image.meta, alpha)
        for k, img in enumerate((rgb, to_float_rgb(out[rows], image.meta)[0])):  # "after": the samples written
            y = (img @ LUMA)[m].astype(np.float64)
            stats[k] += (y.size, y.sum(), (y * y).sum())

    def mean_std(n: float, s1: float, s2: float) -> tuple[float, float]:
        return (0.0, 0.0) if n == 0 else (float(s1 / n), float(np.sqrt(max(s2 / n - (s1 / n) ** 2, 0.0))))

    return out, mean_std(*stats[0]), mean_std(*stats[1])


class EnhanceStage(Stage):
    name = "enhance"
    columns = (
        "luminance_before", "luminance_after", "contrast_before", "contrast_after",
        "vessel_fraction_before", "vessel_fraction_after", "fov_fraction", "transfer",
    )  # fmt: skip
    uses_torch: ClassVar = True
    transient = ("_models",)  # reloaded (and re-verified) in each worker

    def __init__(self, config: EnhanceConfig):
        from fundus_pipeline.device import resolve_device

        self.cfg = config
        self.device = resolve_device(config.device)
        self.check_precision()
        self.batch_size = config.batch_size
        self._models = None
        self._load()
        self.size, self.transfer, self.sigma = output_rules(self.spec.spec, config.transfer, config.correction_sigma)

    def _load(self) -> None:
        from fundus_pipeline.models.weights import load_model

        model, self.spec = load_model(self.cfg.weights, arch=self.cfg.arch, device=self.device, task="enhancement", shared=True,
                                      compile=self.cfg.compile)
        seg = None
        if self.cfg.vessel_stats:
            seg, self.seg_spec = load_model(self.cfg.segmenter, arch=self.cfg.segmenter_arch, device=self.device, task="segmentation",
                                            shared=True, compile=self.cfg.compile, arch_option="--segmenter-arch")
        self._models = (model, seg)

    def setup(self) -> None:
        if self._models is None:
            self._load()

    def config_record(self) -> dict:
        rec = {
            "weights": {"name": self.spec.name, "model": self.spec.model, "sha256": self.spec.sha256},
            "size": self.size,
            "transfer": self.transfer,
            "correction_sigma": self.sigma,
            "keep_outside": self.cfg.keep_outside,
            "device": str(self.device),
            **self.precision_record(),
            "vessel_stats": self.cfg.vessel_stats,
            **({"batch_size": self.batch_size} if self.batch_size > 1 else {}),
        }
        if self.cfg.vessel_stats:
            rec["segmenter"] = {"name": self.seg_spec.name, "sha256": self.seg_spec.sha256, "threshold": self.seg_spec.threshold}
        return rec

    def info(self) -> dict:
        return {"weights_path": str(self.spec.path)}

    def vessel_fraction(self, rgb, fov, large: bool = False) -> float:
        """Vessel fraction inside the FOV of ``rgb`` (float RGB; with ``large``, a very large photograph's ``Image``)."""
        from fundus_pipeline.models.inference import predict_native, predict_native_bands, working_scale

        seg = self._models[1]
        scale = working_scale(fov.geometry.diameter, self.seg_spec.max_fov_diameter)
        if large:
            n = sum(int(((p >= self.seg_spec.threshold) & fov.mask[rows]).sum()) for rows, p in predict_native_bands(seg, rgb, fov.mask, scale, device=self.device))
        else:
            n = int(((predict_native(seg, rgb, fov.mask, scale, device=self.device) >= self.seg_spec.threshold) & fov.mask).sum())
        return float(n) / max(int(fov.mask.sum()), 1)

    def fields(self, lb: float, cb: float, la: float, ca: float, fov) -> dict:
        """The results.csv columns (the vessel fractions empty until filled)."""
        return {
            "luminance_before": round(lb, 5), "luminance_after": round(la, 5),
            "contrast_before": round(cb, 5), "contrast_after": round(ca, 5),
            "vessel_fraction_before": "", "vessel_fraction_after": "",
            "fov_fraction": round(float(fov.mask.mean()), 6), "transfer": self.transfer,
        }  # fmt: skip

    def compute(self, item: ItemInput) -> ItemOutput:
        self.setup()
        fov = self.require_fov(item)
        image = item.image
        if image.large:
            return self.compute_large(item, fov)
        out = enhance_native(self._models[0], image.rgb, fov.mask, fov.geometry, self.size, self.transfer, self.device, self.sigma)
        return self.finish(item, fov, out)

    def compute_batch(self, items: list[ItemInput]) -> list[ItemOutput]:
        """Several photographs' canonical frames through one forward pass (``--batch-size``); a very large
        photograph, or a batch of one, goes through ``compute``."""
        if len(items) == 1 or any(it.image.large for it in items):
            return [self.compute(it) for it in items]
        self.setup()
        fovs = [self.require_fov(it) for it in items]  # a photograph without a FOV fails the batch: the runner retries one by one
        prepared = [canonical_input(it.image.rgb, fov.mask, fov.geometry, self.size) for it, fov in zip(items, fovs)]
        outs = run_network(self._models[0], [p[2] for p in prepared], self.device)
        return [
            self.finish(it, fov, to_native(frame, masked, c_in, smooth_correction(c_in, c_out, c_fov, self.sigma), c_fov, fov.mask, self.transfer))
            for it, fov, (frame, masked, c_in, c_fov), c_out in zip(items, fovs, prepared, outs)
        ]

    def finish(self, item: ItemInput, fov, out: np.ndarray) -> ItemOutput:
        """The output image and columns of one photograph from its enhanced float RGB ``out``."""
        image = item.image
        rgb = image.rgb
        if self.cfg.keep_outside:
            out = np.where(fov.mask[..., None], out, rgb)
        written = from_float_rgb(out, image.meta, image.alpha)
        out = to_float_rgb(written, image.meta)[0]  # the "after" columns describe the samples written, not the float result
        lb, cb = luminance_stats(rgb, fov.mask)
        la, ca = luminance_stats(out, fov.mask)
        fields = self.fields(lb, cb, la, ca, fov)
        if self.cfg.vessel_stats:
            fields["vessel_fraction_before"] = round(self.vessel_fraction(rgb, fov), 6)
            fields["vessel_fraction_after"] = round(self.vessel_fraction(out, fov), 6)
        return ItemOutput({"": written}, fields)

    def compute_large(self, item: ItemInput, fov) -> ItemOutput:
        """A very large photograph: the same output and columns, computed in row bands (``enhance_native_large``)."""
        image = item.image
        out, (lb, cb), (la, ca) = enhance_native_large(self._models[0], image, fov, self.size, self.transfer, self.device, self.cfg.keep_outside, self.sigma)
        fields = self.fields(lb, cb, la, ca, fov)
        if self.cfg.vessel_stats:
            from fundus_pipeline.stages.base import Image

            fields["vessel_fraction_before"] = round(self.vessel_fraction(image, fov, large=True), 6)
            fields["vessel_fraction_after"] = round(self.vessel_fraction(Image(out, image.meta), fov, large=True), 6)
        return ItemOutput({"": out}, fields)
