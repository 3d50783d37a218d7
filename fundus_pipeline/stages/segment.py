"""The ``segment`` stage: vessel probability and binary mask for each photograph, at native resolution."""

from __future__ import annotations


import numpy as np

from fundus_pipeline.config import SegmentConfig
from fundus_pipeline.models.inference import DEFAULT_MAX_FOV_DIAMETER, predict_native, working_scale
from fundus_pipeline.stages.base import ItemInput, ItemOutput, NetworkStage


#: Outside these, a result is flagged in the ``warning`` column (the item still succeeds): vessel fractions
#: inside the FOV of real photographs lie between about 0.04 (heavily degraded) and 0.16 (DRIVE manual
#: annotations: 0.12); a black surround has a 75th-percentile level below 0.05 (``Fov.surround_level``).
PLAUSIBLE_VESSEL_FRACTION = (0.02, 0.25)
MAX_SURROUND_LEVEL = 0.15


def plausibility_warning(vessel_fraction: float, surround_level: float) -> str:
    """"" for a plausible fundus result, else why it is implausible (``; ``-separated)."""
    why = []
    if surround_level > MAX_SURROUND_LEVEL:
        why.append(f"no dark surround around the field of view (level {surround_level:.2f}): this may not be a fundus photograph")
    lo, hi = PLAUSIBLE_VESSEL_FRACTION
    if not lo <= vessel_fraction <= hi:
        why.append(f"implausible vessel fraction {vessel_fraction:.3f} (expected {lo}-{hi})")
    return "; ".join(why)


def _uncropped(photo, image: np.ndarray) -> str:
    """Under ``--fov full``: a warning when the photograph has a circular field of view in a dark surround after all
    (it is not cropped to the retina, so the surround was segmented too: on DRIVE 01, 44% of the "vessel" pixels;
    campaign 28a F1), else ""."""
    from fundus_pipeline.stages.base import Fov

    own = Fov.estimate_image(photo)
    if not own.found or own.surround_level(image) > MAX_SURROUND_LEVEL:
        return ""
    return (f"a circular field of view in a dark surround was found ({own.mask.mean():.0%} of the frame): --fov full "
            "segments the surround too; without it only the field is")


class SegmentStage(NetworkStage):
    name = "segment"
    task = "segmentation"
    columns = ("vessel_fraction", "fov_fraction", "fov_found", "scale", "threshold", "warning")
    no_fov_hint = "; if the photograph is already cropped to the retina, pass --fov full"

    def __init__(self, config: SegmentConfig):
        super().__init__(config)
        self.fov_policy = config.fov
        self.threshold = float(config.threshold if config.threshold is not None else self.spec.threshold)
        self.max_fov = float(self.spec.max_fov_diameter or DEFAULT_MAX_FOV_DIAMETER)

    def threshold_note(self, option: str = "--threshold") -> str | None:
        """A note when the masks are thresholded at the default because the weights have no manifest entry (a
        run's own best.pt) and ``option`` was not given: said nowhere before (campaign 21b L6, review 21 L1)."""
        if self.cfg.threshold is not None or self.spec.threshold_source != "default":
            return None
        return (f"{self.spec.path.name} has no entry in weights/manifest.json: its vessel masks are thresholded at {self.threshold:g}; "
                f"give {option}, or export the run (scripts/export_weights.py records the threshold its validation chose)")

    def config_record(self) -> dict:
        return {
            "weights": self.weights_record(),
            "arch": self.spec.model,
            "threshold": self.threshold,
            "device": str(self.device),
            **self.precision_record(),
            "tile": self.cfg.tile or None,
            "overlap": self.cfg.overlap,
            "max_fov_diameter": self.max_fov,
            "fov_policy": self.cfg.fov,
            "fov_margin": self.cfg.fov_margin,
            "overlay": self.cfg.overlay,
            "batch_size": self.cfg.batch_size,
        }

    def compute(self, item: ItemInput) -> ItemOutput:
        self.setup()
        fov = self.require_fov(item)
        if item.image.large:
            return self.compute_large(item, fov)
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
        return ItemOutput(images, self.fields(int((vessels & fov.mask).sum()), fov, scale, rgb, item.image))

    def fields(self, n_vessel: int, fov, scale: float, image: np.ndarray, photo=None) -> dict:
        """The results.csv columns; ``image``: the float RGB or the integer colour planes (for the surround);
        ``photo``: the decoded photograph (under ``--fov full``, its own field of view is looked for, for the warning)."""
        h, w = fov.mask.shape
        nf = int(fov.mask.sum())
        vf = n_vessel / max(nf, 1)
        warning = plausibility_warning(vf, fov.surround_level(image) if self.cfg.fov == "estimate" else 0.0)
        if self.cfg.fov == "full" and photo is not None:
            warning = "; ".join(w for w in (warning, _uncropped(photo, image)) if w)
        return {
            "vessel_fraction": round(vf, 6),
            "fov_fraction": round(nf / (h * w), 6),
            "fov_found": fov.found and self.cfg.fov == "estimate",  # --fov full searches for none: the frame is taken as it is
            "scale": scale,
            "threshold": self.threshold,
            "warning": warning,
        }

    def compute_large(self, item: ItemInput, fov) -> ItemOutput:
        """A very large photograph (``fundus_pipeline.bands``): the same outputs, computed in row bands from
        the decoded integer array (no full-resolution float copy)."""
        from fundus_pipeline.io import to_float_rgb
        from fundus_pipeline.models.inference import predict_native_bands

        image = item.image
        h, w = fov.mask.shape
        scale = working_scale(fov.geometry.diameter, self.max_fov)
        vessels = np.empty((h, w), np.uint8)
        prob16 = np.empty((h, w), np.uint16)
        overlay = np.empty((h, w, 3), np.uint8) if self.cfg.overlay else None
        n_vessel = 0
        bands = predict_native_bands(
            self._model, image, fov.mask, scale, margin_px=self.cfg.fov_margin * fov.geometry.diameter,
            device=self.device, tile=self.cfg.tile or None, overlap=self.cfg.overlap, batch_size=self.cfg.batch_size,
        )  # fmt: skip
        for rows, prob in bands:
            v = prob >= self.threshold
            n_vessel += int((v & fov.mask[rows]).sum())
            vessels[rows] = v.astype(np.uint8) * 255
            prob *= 65535
            prob16[rows] = np.round(prob)
            if overlay is not None:
                base = np.clip(to_float_rgb(image.array[rows], image.meta)[0] * 255, 0, 255).astype(np.uint8)
                ov = base.copy()
                ov[v] = (0.35 * base[v] + 0.65 * np.array([0, 255, 64])).astype(np.uint8)
                overlay[rows] = ov
        images = {"_vessels": vessels, "_prob": prob16}
        if overlay is not None:
            images["_overlay"] = overlay
        return ItemOutput(images, self.fields(n_vessel, fov, scale, image.color, image))
