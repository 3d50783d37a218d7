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

from fundus_pipeline.config import ScoreConfig
from fundus_pipeline.errors import InputError
from fundus_pipeline.quality.scoring import CROP, SCORE_SIZE, crop_boxes, predict_pair, to_score_frame
from fundus_pipeline.stages.base import InputSpec, ItemInput, ItemOutput, NetworkStage


class ScoreStage(NetworkStage):
    name = "score"
    task = "quality"
    columns = ("score", "score_spread", "crops")
    inputs = (InputSpec("image"), InputSpec("reference", "--reference", "the degraded photograph each enhanced image was made from"))

    def __init__(self, config: ScoreConfig):
        super().__init__(config)
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
            **({"input_score": True} if self.cfg.input_score else {}),
        }

    def compute(self, item: ItemInput) -> ItemOutput:
        self.setup()
        fov = self.require_fov(item)
        enh, ref = item.image, item.images["reference"]
        if (ref.meta.height, ref.meta.width) != (enh.meta.height, enh.meta.width):
            raise InputError(f"size mismatch: enhanced {enh.meta.width}x{enh.meta.height}, reference {ref.meta.width}x{ref.meta.height}")
        mask = fov.mask[..., None]
        e = to_score_frame(enh.rgb * mask, fov.geometry, self.size)
        r = to_score_frame(ref.rgb * mask, fov.geometry, self.size)
        if not self.cfg.input_score:
            score, spread = predict_pair(self._model, e, r, self.device, self.boxes, self.crop)
            return ItemOutput({}, {"score": round(score, 6), "score_spread": round(spread, 6), "crops": len(self.boxes)})
        (score, spread), (si, si_spread) = predict_pair(self._model, e, r, self.device, self.boxes, self.crop, identity=True)
        return ItemOutput({}, {"score": round(score, 6), "score_spread": round(spread, 6), "crops": len(self.boxes),
                               "score_input": round(si, 6), "score_input_spread": round(si_spread, 6)})
