"""How a quality network sees a pair, shared by ``fundus train score`` and ``fundus score``.

Both images are mapped into the canonical frame of the reference's field of view (the FOV's bounding
square resized to ``size`` = 448 by default, 0 outside the FOV; ``fundus_pipeline.canonical``) and scored on
224 x 224 crops. Test time (deterministic): the five crops of the frame, the four quadrants (which tile the
448 frame exactly) and the centre; the score is their mean and the spread their standard deviation.
Training takes one random 224 crop per pair, the same place in both images (the seed averaged twenty crops
pixelwise, a bug).
"""

from __future__ import annotations

import numpy as np

SCORE_SIZE = 448
CROP = 224
CROPS_RULE = "the four quadrants and the centre crop (224 x 224) of the 448 x 448 canonical frame; score = their mean, spread = their standard deviation"


def crop_boxes(size: int = SCORE_SIZE, crop: int = CROP) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the test-time crops: the four quadrant corners and the centre."""
    far = size - crop
    centre = far // 2
    return [(0, 0), (0, far), (far, 0), (far, far), (centre, centre)]


def to_score_frame(rgb: np.ndarray, geometry, size: int = SCORE_SIZE) -> np.ndarray:
    """A native float32 RGB photograph in the scoring frame of FOV ``geometry`` (values outside the FOV kept as given)."""
    from fundus_pipeline.canonical import CanonicalFrame

    return np.clip(CanonicalFrame.from_fov(geometry, size).to_canonical(rgb.astype(np.float32)), 0, 1)


def predict_pair(model, enhanced: np.ndarray, reference: np.ndarray, device="cpu", boxes=None, crop: int = CROP, *, identity: bool = False):
    """(mean score, standard deviation) over the crops ``boxes`` (default ``crop_boxes``) of two frames. With
    ``identity``: ((mean, std) of the pair, (mean, std) of the reference scored against itself), in one pass
    (``SDMPNet.forward_with_identity``; the same values as two calls)."""
    return predict_pairs(model, [enhanced], [reference], device, boxes, crop, identity=identity)[0]


def predict_pairs(model, enhanced: list[np.ndarray], reference: list[np.ndarray], device="cpu", boxes=None, crop: int = CROP, *, identity: bool = False) -> list:
    """:func:`predict_pair` of several pairs, their crops through one forward pass."""
    import torch

    from fundus_pipeline.device import to_device

    boxes = crop_boxes(enhanced[0].shape[0], crop) if boxes is None else boxes
    k = len(boxes)

    def stack(frames: list[np.ndarray]) -> torch.Tensor:
        t = np.stack([a[y : y + crop, x : x + crop] for a in frames for y, x in boxes]).transpose(0, 3, 1, 2)
        return to_device(torch.from_numpy(np.ascontiguousarray(t)), device)

    def stats(s: torch.Tensor) -> list[tuple[float, float]]:
        a = s.float().cpu().numpy().astype(np.float64).reshape(len(enhanced), k)
        return [(float(r.mean()), float(r.std())) for r in a]

    with torch.inference_mode():
        if identity:
            s, si = model.forward_with_identity(stack(enhanced), stack(reference))
            return list(zip(stats(s), stats(si)))
        return stats(model(stack(enhanced), stack(reference)))