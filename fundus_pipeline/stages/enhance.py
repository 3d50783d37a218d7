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

from typing import ClassVar

import numpy as np

from fundus_pipeline.canonical import CanonicalFrame
from fundus_pipeline.config import EnhanceConfig
from fundus_pipeline.io import from_float_rgb
from fundus_pipeline.stages.base import ItemInput, ItemOutput, Stage

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def luminance_stats(rgb: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(mean, standard deviation) of BT.601 luminance over ``mask``."""
    y = (rgb @ _LUMA)[mask]
    if y.size == 0:
        return 0.0, 0.0
    return float(y.mean()), float(y.std())


def enhance_native(model, rgb: np.ndarray, fov_mask: np.ndarray, geometry, size: int, transfer: str, device) -> np.ndarray:
    """The enhanced photograph (float32 HxWx3 in [0, 1], native resolution; 0 outside ``fov_mask``)."""
    import torch

    frame = CanonicalFrame.from_fov(geometry, size)
    masked = rgb * fov_mask[..., None]
    c_in = np.clip(frame.to_canonical(masked), 0, 1).astype(np.float32)
    c_fov = frame.to_canonical(fov_mask.astype(np.uint8), interpolation=0) > 0
    c_in *= c_fov[..., None]
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(c_in.transpose(2, 0, 1)))[None].to(device)
        c_out = model(x)[0].float().cpu().numpy().transpose(1, 2, 0)
    c_out *= c_fov[..., None]
    if transfer == "upsample":
        out = frame.to_native(c_out)
    else:
        out = masked  # in place from here on: a large photograph holds fewer full-size copies
        out += frame.to_native(c_out - c_in)
    np.clip(out, 0, 1, out=out)
    out *= fov_mask[..., None]
    return out


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
        self._models = None
        self._load()
        policy = self.spec.spec.input.scale_policy if self.spec.spec else None
        self.size = int(getattr(policy, "size", 512))
        out = self.spec.spec.output if self.spec.spec else None
        self.transfer = config.transfer if config.transfer != "auto" else getattr(out, "transfer", "residual")

    def _load(self) -> None:
        from fundus_pipeline.models.weights import load_model

        model, self.spec = load_model(self.cfg.weights, arch=self.cfg.arch, device=self.device, task="enhancement")
        seg = None
        if self.cfg.vessel_stats:
            seg, self.seg_spec = load_model(self.cfg.segmenter, device=self.device, task="segmentation")
        self._models = (model, seg)

    def setup(self) -> None:
        if self._models is None:
            self._load()

    def config_record(self) -> dict:
        rec = {
            "weights": {"name": self.spec.name, "model": self.spec.model, "sha256": self.spec.sha256},
            "size": self.size,
            "transfer": self.transfer,
            "keep_outside": self.cfg.keep_outside,
            "device": str(self.device),
            "vessel_stats": self.cfg.vessel_stats,
        }
        if self.cfg.vessel_stats:
            rec["segmenter"] = {"name": self.seg_spec.name, "sha256": self.seg_spec.sha256, "threshold": self.seg_spec.threshold}
        return rec

    def info(self) -> dict:
        return {"weights_path": str(self.spec.path)}

    def vessel_fraction(self, rgb: np.ndarray, fov) -> float:
        from fundus_pipeline.models.inference import predict_native, working_scale

        seg = self._models[1]
        prob = predict_native(seg, rgb, fov.mask, working_scale(fov.geometry.diameter, self.seg_spec.max_fov_diameter), device=self.device)
        return float(((prob >= self.seg_spec.threshold) & fov.mask).sum()) / max(int(fov.mask.sum()), 1)

    def compute(self, item: ItemInput) -> ItemOutput:
        self.setup()
        fov = self.require_fov(item)
        image = item.image
        rgb = image.rgb
        out = enhance_native(self._models[0], rgb, fov.mask, fov.geometry, self.size, self.transfer, self.device)
        if self.cfg.keep_outside:
            out = np.where(fov.mask[..., None], out, rgb)
        lb, cb = luminance_stats(rgb, fov.mask)
        la, ca = luminance_stats(out, fov.mask)
        fields = {
            "luminance_before": round(lb, 5), "luminance_after": round(la, 5),
            "contrast_before": round(cb, 5), "contrast_after": round(ca, 5),
            "vessel_fraction_before": "", "vessel_fraction_after": "",
            "fov_fraction": round(float(fov.mask.mean()), 6), "transfer": self.transfer,
        }  # fmt: skip
        if self.cfg.vessel_stats:
            fields["vessel_fraction_before"] = round(self.vessel_fraction(rgb, fov), 6)
            fields["vessel_fraction_after"] = round(self.vessel_fraction(out, fov), 6)
        return ItemOutput({"": from_float_rgb(out, image.meta, image.alpha)}, fields)
