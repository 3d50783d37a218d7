"""The ``segment`` stage: vessel probability and binary mask for each photograph, at native resolution."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fundus_pipeline.config import SegmentConfig
from fundus_pipeline.models.inference import DEFAULT_MAX_FOV_DIAMETER, predict_native, working_scale
from fundus_pipeline.stages.base import ItemInput, ItemOutput, Stage


class SegmentStage(Stage):
    name = "segment"
    columns = ("vessel_fraction", "fov_fraction", "fov_found", "scale", "threshold")
    uses_torch: ClassVar = True
    transient = ("_model",)  # reloaded (and re-verified) in each worker

    def __init__(self, config: SegmentConfig):
        from fundus_pipeline.device import resolve_device
        from fundus_pipeline.models.weights import load_model

        self.cfg = config
        self.fov_policy = config.fov
        self.device = resolve_device(config.device)
        self._model, self.spec = load_model(config.weights, arch=config.arch, device=self.device, task="segmentation")
        self.threshold = float(config.threshold if config.threshold is not None else self.spec.threshold)
        self.max_fov = float(self.spec.max_fov_diameter or DEFAULT_MAX_FOV_DIAMETER)

    def setup(self) -> None:
        if self._model is None:
            from fundus_pipeline.models.weights import load_model

            self._model, _ = load_model(self.cfg.weights, arch=self.cfg.arch, device=self.device, task="segmentation")

    def config_record(self) -> dict:
        return {
            "weights": {"name": self.spec.name, "model": self.spec.model, "sha256": self.spec.sha256},
            "arch": self.spec.model,
            "threshold": self.threshold,
            "device": str(self.device),
            "tile": self.cfg.tile or None,
            "overlap": self.cfg.overlap,
            "max_fov_diameter": self.max_fov,
            "fov_policy": self.cfg.fov,
            "fov_margin": self.cfg.fov_margin,
            "overlay": self.cfg.overlay,
            "batch_size": self.cfg.batch_size,
        }

    def info(self) -> dict:
        return {"weights_path": str(self.spec.path)}

    def compute(self, item: ItemInput) -> ItemOutput:
        self.setup()
        fov = self.require_fov(item)
        rgb = item.image.rgb
        h, w = rgb.shape[:2]
        scale = working_scale(fov.geometry.diameter, self.max_fov)
        prob = predict_native(
            self._model, rgb, fov.mask, scale, margin_px=self.cfg.fov_margin * fov.geometry.diameter, device=self.device,
            tile=self.cfg.tile or None, overlap=self.cfg.overlap, batch_size=self.cfg.batch_size,
        )
        vessels = prob >= self.threshold  # prob is 0 beyond the FOV margin
        images = {"_vessels": vessels.astype(np.uint8) * 255, "_prob": np.round(prob * 65535).astype(np.uint16)}
        if self.cfg.overlay:
            base = np.clip(rgb * 255, 0, 255).astype(np.uint8)
            ov = base.copy()
            ov[vessels] = (0.35 * base[vessels] + 0.65 * np.array([0, 255, 64])).astype(np.uint8)
            images["_overlay"] = ov
        nf = int(fov.mask.sum())
        return ItemOutput(images, {
            "vessel_fraction": round(float((vessels & fov.mask).sum()) / max(nf, 1), 6),
            "fov_fraction": round(nf / (h * w), 6),
            "fov_found": fov.found,
            "scale": scale,
            "threshold": self.threshold,
        })
