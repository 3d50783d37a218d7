"""The ``segment`` stage: vessel probability and binary mask for each photograph, at native resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fundus_pipeline.errors import InputError
from fundus_pipeline.io import ImageItem, read_image, to_float_rgb, write_image_atomic
from fundus_pipeline.segmentation import DEFAULT_FOV_MARGIN, DEFAULT_MAX_FOV_DIAMETER, predict_native, working_scale


class SegmentStage:
    name = "segment"
    columns = ["vessel_fraction", "fov_fraction", "fov_found", "scale", "threshold"]

    def __init__(
        self,
        *,
        weights: str,
        arch: str | None = None,
        threshold: float | None = None,
        device: str = "auto",
        tile: int | None = 1024,
        overlap: int = 64,
        overlay: bool = False,
        fov_policy: str = "estimate",
        threads: int | None = None,
        batch_size: int = 1,
        fov_margin: float = DEFAULT_FOV_MARGIN,
    ):
        from fundus_pipeline.device import resolve_device
        from fundus_pipeline.models.weights import load_model

        self.weights, self.arch, self.device_name = str(weights), arch, device
        self.device = resolve_device(device)
        self.tile, self.overlap, self.overlay, self.fov_policy = tile, overlap, overlay, fov_policy
        self.threads = threads
        self.batch_size = batch_size
        if not 0.0 <= fov_margin <= 0.5:
            from fundus_pipeline.errors import UsageError

            raise UsageError(f"--fov-margin must be between 0 and 0.5 (a fraction of the FOV diameter), got {fov_margin}")
        self.fov_margin = float(fov_margin)
        self._model, self.spec = load_model(weights, arch=arch, device=self.device)
        self.threshold = float(threshold if threshold is not None else self.spec.get("output", {}).get("threshold", 0.5))
        if not 0.0 < self.threshold < 1.0:
            from fundus_pipeline.errors import UsageError

            raise UsageError(f"--threshold must be strictly between 0 and 1, got {self.threshold}")
        scale_policy = self.spec.get("input", {}).get("scale_policy", {})
        self.max_fov = float(scale_policy.get("max_fov_diameter", DEFAULT_MAX_FOV_DIAMETER))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_model"] = None  # reloaded (and re-verified) in each worker
        return state

    def setup_worker(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        if self._model is None:
            from fundus_pipeline.models.weights import load_model

            self._model, _ = load_model(self.weights, arch=self.arch, device=self.device)

    def config(self) -> dict:
        return {
            "weights": {k: self.spec.get(k) for k in ("name", "model", "sha256")},
            "arch": self.spec.get("model"),
            "threshold": self.threshold,
            "device": str(self.device),
            "tile": self.tile,
            "overlap": self.overlap,
            "max_fov_diameter": self.max_fov,
            "fov_policy": self.fov_policy,
            "fov_margin": self.fov_margin,
            "overlay": self.overlay,
            "batch_size": self.batch_size,
        }

    def info(self) -> dict:
        return {"weights_path": self.spec.get("path")}

    def process(self, item: ImageItem, out_dir: Path) -> tuple[list[str], dict]:
        from degradation.fov import estimate_fov_geometry, FovGeometry

        self.setup_worker()
        arr, meta = read_image(item.path)
        rgb, _ = to_float_rgb(arr, meta)
        h, w = rgb.shape[:2]
        if self.fov_policy == "full":
            mask = np.ones((h, w), bool)
            geom = FovGeometry(w / 2, h / 2, min(h, w) / 2, h, w)
            found = True
        else:
            mask, geom = estimate_fov_geometry(rgb)
            found = not bool(mask.all())
            if not found:
                raise InputError("no fundus field of view found (no dark surround); if the photograph is already cropped to the retina, pass --fov full")
        scale = working_scale(geom.diameter, self.max_fov)
        prob = predict_native(self._model, rgb, mask, scale, margin_px=self.fov_margin * geom.diameter, device=self.device, tile=self.tile, overlap=self.overlap, batch_size=self.batch_size)
        vessels = prob >= self.threshold  # prob is 0 beyond the FOV margin
        k = item.key
        outputs = [f"{k}_vessels.png", f"{k}_prob.png"]
        write_image_atomic(out_dir / outputs[0], vessels.astype(np.uint8) * 255)
        write_image_atomic(out_dir / outputs[1], np.round(prob * 65535).astype(np.uint16))
        if self.overlay:
            base = np.clip(rgb * 255, 0, 255).astype(np.uint8)
            ov = base.copy()
            ov[vessels] = (0.35 * base[vessels] + 0.65 * np.array([0, 255, 64])).astype(np.uint8)
            outputs.append(f"{k}_overlay.png")
            write_image_atomic(out_dir / outputs[2], ov)
        nf = int(mask.sum())
        return outputs, {
            "vessel_fraction": round(float((vessels & mask).sum()) / max(nf, 1), 6),
            "fov_fraction": round(nf / (h * w), 6),
            "fov_found": found,
            "scale": scale,
            "threshold": self.threshold,
        }
