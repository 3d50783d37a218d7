"""The ``score`` stage: how good is an enhancement? A full-reference quality score of each enhanced
photograph against the degraded photograph it was made from (SDMP-Net; ``fundus_pipeline.models.sdmp``).

Inputs: the enhanced images (IN) and, matched by key, the degraded references (``--reference``); an
enhanced image without its partner, or of another size, is a per-item error. Both images are mapped into
the scoring frame of the enhanced image's field of view (``fundus_pipeline.quality.scoring``) and scored on
the five deterministic test-time crops. No images are written; ``results.csv`` gets ``score`` (the crop
mean, in [0, 1], higher is better) and ``score_spread`` (the standard deviation over the crops); with
``input_score`` also ``score_input`` / ``score_input_spread``, the reference scored against itself (the
scorer's estimate of the unenhanced photograph's quality), from the same pass.
"""

from __future__ import annotations

import math

import numpy as np

from fundus_pipeline.config import ScoreConfig
from fundus_pipeline.errors import InputError
from fundus_pipeline.quality.scoring import CROP, SCORE_SIZE, crop_boxes, predict_pairs, to_score_frame
from fundus_pipeline.stages.base import InputSpec, ItemInput, ItemOutput, NetworkStage


class ScoreStage(NetworkStage):
    name = "score"
    task = "quality"
    columns = ("score", "score_spread", "crops")
    inputs = (InputSpec("image"), InputSpec("reference", "--reference", "the degraded photograph each enhanced image was made from"))

    def __init__(self, config: ScoreConfig):
        super().__init__(config)
        self.batch_size = config.batch_size
        if config.input_score:
            self.columns = (*type(self).columns, "score_input", "score_input_spread")
        spec = self.spec.spec
        self.size = int(getattr(spec.input.scale_policy, "size", SCORE_SIZE)) if spec else SCORE_SIZE
        self.crop = int(getattr(spec.output, "crop", CROP)) if spec else CROP
        self.boxes = crop_boxes(self.size, self.crop)

    def config_record(self) -> dict:
        return {
            "weights": self.weights_record(),
            "size": self.size,
            "crops": self.boxes,
            "crop": self.crop,
            "device": str(self.device),
            **self.precision_record(),
            **({"input_score": True} if self.cfg.input_score else {}),
            **({"batch_size": self.batch_size} if self.batch_size > 1 else {}),
        }

    #: Whether a pair is checked to be one (``check_pair``). ``fundus run`` pairs each enhanced photograph with the
    #: photograph it made it from and sets it off: the check's field-of-view estimates disagree on a photograph
    #: squashed out of shape, which the run then failed as "not the photograph it was made from?" (campaign 30b F1).
    check_pairs: bool = True

    def frames(self, item: ItemInput) -> tuple[np.ndarray, np.ndarray]:
        """(enhanced, reference) in the scoring frame of the enhanced image's FOV."""
        fov = self.require_fov(item)
        enh, ref = item.image, item.images["reference"]
        if (ref.meta.height, ref.meta.width) != (enh.meta.height, enh.meta.width):
            raise InputError(f"size mismatch: enhanced {enh.meta.width}x{enh.meta.height}, reference {ref.meta.width}x{ref.meta.height}")
        if self.check_pairs:
            check_pair(enh, ref, fov)
        return score_frames(enh, ref, fov, self.size)

    def compute(self, item: ItemInput) -> ItemOutput:
        return self.compute_batch([item])[0]

    def compute_batch(self, items: list[ItemInput]) -> list[ItemOutput]:
        """The pairs' crops through one forward pass (``--batch-size``)."""
        self.setup()
        frames = [self.frames(it) for it in items]  # a bad pair fails the batch: the runner retries one by one
        preds = predict_pairs(self._model, [e for e, _ in frames], [r for _, r in frames], self.device, self.boxes, self.crop,
                              identity=self.cfg.input_score)
        outs = []
        for pred in preds:
            (score, spread), own = (pred, None) if not self.cfg.input_score else pred
            if not all(math.isfinite(v) for v in (score, spread, *(own or ()))):  # a NaN gain would decide nothing
                raise InputError("the scorer's output is not a finite number (NaN or infinity); the weights or the photographs are broken")
            fields = {"score": round(score, 6), "score_spread": round(spread, 6), "crops": len(self.boxes)}
            if own is not None:
                fields.update(score_input=round(own[0], 6), score_input_spread=round(own[1], 6))
            outs.append(ItemOutput({}, fields))
        return outs


#: How far the reference's field of view may lie from the enhanced photograph's (centre offset, and radius
#: difference, as fractions of its radius) before the pair is refused: an enhancement keeps the field where it
#: was (measured: at most 1.2% between DRIVE/HRF photographs and their Cofe-Net and clinical degradations).
FOV_TOLERANCE = 0.1


def check_pair(enh, ref, fov) -> None:
    """An ``InputError`` for a reference that cannot be the photograph the enhanced one was made from (campaign
    27a F5: they were scored, an all-black reference at 0.27): one of another layout (grey against colour), one
    blank inside the field of view, or one whose own field of view lies elsewhere (a shifted or another
    photograph). A reference whose field of view is not found (a hazy degradation) is checked for blankness only."""
    from fundus_pipeline.stages.base import Fov

    if (enh.meta.mode in ("gray", "graya")) != (ref.meta.mode in ("gray", "graya")):
        raise InputError(f"the enhanced photograph is {_layout(enh)} and its reference {_layout(ref)}: an enhancement keeps "
                         "the layout, so this is not its pair (or convert one of them)")
    own = Fov.estimate_image(ref)
    if own.found:
        g, h = fov.geometry, own.geometry
        apart = math.hypot(h.cx - g.cx, h.cy - g.cy)
        if apart / g.radius > FOV_TOLERANCE or abs(h.radius / g.radius - 1) > FOV_TOLERANCE:
            raise InputError(f"the reference's field of view is not where the enhanced photograph's is (centres "
                             f"{apart:.0f} px apart, radii {g.radius:.0f} and {h.radius:.0f} px): "
                             "not the photograph it was made from?")
        return
    step = max(1, max(ref.meta.height, ref.meta.width) // 512)
    a, m = ref.array[::step, ::step], fov.mask[::step, ::step]
    inside = a[m] if a.ndim == 2 else a[m][:, : min(3, a.shape[2])]
    if inside.size and inside.min() == inside.max():
        raise InputError(f"the reference is blank inside the field of view (every pixel at level {int(inside.min())}): "
                         "not the photograph the enhanced one was made from")


def _layout(image) -> str:
    return "grey" if image.meta.mode in ("gray", "graya") else "in colour"


def score_frames(enh, ref, fov, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(enhanced, reference) images in the scoring frame of ``fov``; above ``bands.LARGE_PIXELS`` area-averaged
    from their integer arrays in row bands (no float copy; equal to float rounding)."""
    if enh.large:
        from fundus_pipeline.bands import masked_frame

        pair = [masked_frame(im, fov.geometry, fov.mask, size) for im in (enh, ref)]
        if pair[0] is not None and pair[1] is not None:
            return pair[0], pair[1]
    mask = fov.mask[..., None]
    return to_score_frame(enh.rgb * mask, fov.geometry, size), to_score_frame(ref.rgb * mask, fov.geometry, size)
