"""The quality label of an (enhanced, clean) pair: what ``fundus score`` learns to predict.

For an enhanced photograph E of a degraded photograph whose clean original is C, inside the FOV of C
(estimated by the project's FOV code, ``Fov.estimate``) and at the resolution the images are given in:

    q = (SSIM(E, C) + F1(vessels(E), vessels(C))) / 2

* SSIM: the mean over the RGB channels of the Gaussian-window (sigma 1.5) SSIM map with data range 1,
  averaged over the FOV pixels (``fundus_pipeline.evaluation.image_metrics.ssim``, identical to
  ``fundus evaluate enhance``'s SSIM).
* vessels: the shipped ``weights/imff.pt`` segmenter run as ``fundus segment`` runs it (working scale from
  the FOV diameter), binarised at its manifest threshold; F1 of the map of E against the map of C over the
  FOV pixels, 1 when both maps are empty.

So q rewards fidelity to the real retina and a vessel tree that a segmenter finds as it would on the clean
photograph. q = 1 for E = C; a black E gives SSIM near 0 and no vessels, so q near 0.
"""

from __future__ import annotations

import numpy as np

from fundus_pipeline.evaluation.image_metrics import ssim

LABEL_DEFINITION = (
    "q = (SSIM(E, C) + F1(vessels(E), vessels(C))) / 2 inside the FOV of the clean image C (estimated by the project's "
    "FOV code), at the pair's resolution; SSIM = mean over RGB channels of the Gaussian-window (sigma 1.5) SSIM map with "
    "data range 1, averaged over FOV pixels; vessels = the shipped weights/imff.pt segmenter at its manifest threshold; "
    "F1 over FOV pixels, 1 when both vessel maps are empty"
)


def vessel_f1(pred: np.ndarray, ref: np.ndarray, fov: np.ndarray) -> float:
    """F1 (Dice) of boolean vessel map ``pred`` against ``ref`` over the ``fov`` pixels; 1.0 when both are empty there."""
    p, r = pred[fov], ref[fov]
    tp = int(np.count_nonzero(p & r))
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    return 1.0 if total == 0 else 2.0 * tp / total


def quality_label(enhanced: np.ndarray, clean: np.ndarray, fov: np.ndarray, vessels_enhanced: np.ndarray, vessels_clean: np.ndarray) -> dict[str, float]:
    """``{"ssim", "f1", "label"}`` of one pair (RGB float arrays in [0, 1], boolean FOV and vessel maps)."""
    s = float(ssim(enhanced, clean, fov))
    f = vessel_f1(vessels_enhanced, vessels_clean, fov)
    return {"ssim": s, "f1": f, "label": (s + f) / 2.0}


class VesselMapper:
    """The shipped segmenter as the label uses it: ``mapper(rgb, fov) -> bool vessel map`` at its manifest threshold."""

    def __init__(self, weights: str = "imff", device: str = "cpu"):
        from fundus_pipeline.models.weights import load_model

        self.model, self.loaded = load_model(weights, task="segmentation", device=device)
        self.device = device
        self.threshold = float(self.loaded.threshold)

    def __call__(self, rgb: np.ndarray, fov) -> np.ndarray:
        """``fov``: a ``stages.base.Fov`` (mask and geometry) of the image."""
        from fundus_pipeline.models.inference import predict_native, working_scale

        prob = predict_native(self.model, rgb, fov.mask, working_scale(fov.geometry.diameter, self.loaded.max_fov_diameter), device=self.device)
        return (prob >= self.threshold) & fov.mask
