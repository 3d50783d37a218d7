"""The ``grade`` stage: is a photograph fit to read? A no-reference grade (Good / Usable / Reject, EyeQ's
classes) and what is wrong with it (the flags of ``fundus_pipeline.quality.grading``), by HEMF.

The network sees the photograph in its canonical frame: the field of view's bounding square (0 outside the
FOV) resized to the weights' input size with area averaging. An image without a circular field of view is
not refused (it may be a photograph cropped to the retina, or not a fundus photograph at all, which is what
the ``not_fundus`` flag is for): the whole image is squashed to the input size instead. Grade probabilities
are the softmax of the grade logits divided by the weights' temperature (fitted on validation images); the
grade is the most probable one or, where the weights carry decision offsets (chosen on validation images by
``scripts/choose_grade_bias.py``), the argmax of the log-probabilities plus the offsets. Flag
probabilities are the sigmoid of the flag logits. No images are written (``--sort-into`` copies the
inputs afterwards, see the command).
"""

from __future__ import annotations

import json

import numpy as np

from fundus_pipeline.config import GradeConfig
from fundus_pipeline.errors import InputError
from fundus_pipeline.quality.grading import FLAGS, GRADES
from fundus_pipeline.stages.base import ItemInput, ItemOutput, NetworkStage


def grade_frame(rgb: np.ndarray, fov, size: int) -> np.ndarray:
    """The grader's input (float32 size x size x 3): the FOV's canonical frame, or the squashed image."""
    import cv2

    from fundus_pipeline.canonical import CanonicalFrame

    if fov is not None and fov.found:
        frame = CanonicalFrame.from_fov(fov.geometry, size)
        return np.clip(frame.to_canonical(rgb * fov.mask[..., None]), 0, 1).astype(np.float32)
    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if h > size or w > size else cv2.INTER_LINEAR
    return cv2.resize(rgb, (size, size), interpolation=interp).astype(np.float32)


def grade_frame_large(image, fov, size: int) -> np.ndarray:
    """``grade_frame`` of a very large photograph, area-averaged from its integer array in row bands
    (``fundus_pipeline.bands``; equal to ``grade_frame`` to float rounding)."""
    from fundus_pipeline.bands import masked_frame, rgb_downscale

    if fov is not None and fov.found:
        out = masked_frame(image, fov.geometry, fov.mask, size)
        return grade_frame(image.rgb, fov, size) if out is None else out  # None: a small FOV in a huge frame
    return rgb_downscale(image.color, size, size, image.maxval)


def grade_probabilities(logits: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(grade probabilities N x 3: softmax of grade logits / T, flag probabilities N x F: sigmoid)."""
    n = len(GRADES)
    z = logits[:, :n] / temperature
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return p, 1.0 / (1.0 + np.exp(-np.clip(logits[:, n:], -60, 60)))


def decide(pg: np.ndarray, bias: np.ndarray | None) -> int:
    """The grade index of one photograph: the argmax of its probabilities, or, with the weights' decision
    offsets, of its log-probabilities plus the offsets."""
    if bias is None:
        return int(pg.argmax())
    return int((np.log(np.maximum(np.asarray(pg, np.float64), 1e-300)) + bias).argmax())


#: The ``warning`` of a grey photograph (a grey file, or colour channels all equal). Measured 2026-12-03 on the 50
#: clean DRIVE and HRF test photographs made grey: `hemf_4750` grades all 50 reject (luminance or green channel),
#: `hemf_grey` (trained with grey samples) 8 and 23 of 50 good. README, `fundus grade`.
GREY_WARNING = "grey photograph: the graders learned mostly from colour photographs and grade many clean grey (red-free) photographs usable or reject; check this grade by eye"


#: The largest difference between channels of a grey photograph's frame (values in [0, 1]): the resampling can
#: differ by a float32 ulp between them (OpenCV before 4.12 did: 3e-8, and grey photographs lost their warning;
#: campaign 36c M-1); one 16-bit level is 1.5e-5.
GREY_TOLERANCE = 1e-6


def is_grey(frame: np.ndarray) -> bool:
    """Whether the grader's input frame (H x W x 3, values in [0, 1]) has its three channels equal (within
    ``GREY_TOLERANCE``): a grey photograph."""
    c = np.asarray(frame, np.float64)
    return bool(np.abs(c[..., 0] - c[..., 1]).max(initial=0) <= GREY_TOLERANCE and np.abs(c[..., 1] - c[..., 2]).max(initial=0) <= GREY_TOLERANCE)


#: Below this field-of-view diameter (or, without a field of view, shorter side) in pixels a photograph is
#: warned about: the graders learned from EyePACS-256 (fields about 240 px across) and larger photographs, and
#: grade a 32-px thumbnail of DRIVE 01 usable (campaign 28a F2).
MIN_GRADE_DIAMETER = 48

#: Above this aspect ratio a frame without a field of view, squashed into the grader's square, is warned about
#: (a 30000x200 strip was graded good, p 0.80; campaign 28a F2).
MAX_GRADE_ASPECT = 2.0
#: Above this ratio of a found field of view's diameter to the frame's short side the photograph is taken as squashed
#: out of shape (an ellipse fitted with a circle far wider than the frame is tall; campaign 30b F1: 565x200 gave 1.94,
#: 200x565 1.78). The 1,825 photographs of ../shared/data reach 1.40 (HRF's circle cut by the frame's top and bottom).
MAX_FOV_FRAME_RATIO = 1.6


#: How the grader's other warnings begin (each holds no "; ", the separator of a run table's joined warnings).
SMALL_WARNING = "small photograph: "
SQUASHED_WARNING = "squashed frame: "
NO_FOV_WARNING = "no field of view: "


def frame_warning(item: ItemInput, frame: np.ndarray) -> str:
    """The ``warning`` of one graded photograph: grey, too small, squashed or without a field of view ("" when none)."""
    why = [GREY_WARNING] if is_grey(frame) else []
    h, w = item.image.meta.height, item.image.meta.width
    found = item.fov is not None and item.fov.found
    across = float(item.fov.geometry.diameter) if found else float(min(h, w))
    if across < MIN_GRADE_DIAMETER:
        why.append(f"{SMALL_WARNING}{across:.0f} px across, far smaller than the photographs the graders learned from (check this grade by eye)")
    if not found and max(h, w) > MAX_GRADE_ASPECT * min(h, w):
        why.append(f"{SQUASHED_WARNING}{w}x{h} without a field of view, squashed into the grader's square (this may not be a "
                   "fundus photograph: check this grade by eye)")
    elif found and across > MAX_FOV_FRAME_RATIO * min(h, w):
        why.append(f"{SQUASHED_WARNING}{w}x{h} whose field of view, {across:.0f} px across, is {across / min(h, w):.1f} times the frame's "
                   "short side: a photograph resized out of shape? (check this grade by eye, and the photograph's size)")
    elif not found:  # (campaign 28b F1: a checkerboard picture was graded good, p 0.72, in silence)
        why.append(f"{NO_FOV_WARNING}no circular field of view in a dark surround was found (a photograph cropped to the "
                   "retina, a field too faint or noisy at its edge, or not a fundus photograph: check this grade by eye)")
    return "; ".join(why)


class GradeStage(NetworkStage):
    name = "grade"
    task = "grading"
    columns = (
        "grade", *(f"p_{g}" for g in GRADES), "temperature", *(f"p_{f}" for f in FLAGS), "flags", "fov_found", "fov_fraction",
        "fov_diameter", "warning",
    )  # fmt: skip

    def __init__(self, config: GradeConfig):
        super().__init__(config)
        self.batch_size = config.batch_size
        spec = self.spec.spec
        self.size = int(getattr(spec.input.scale_policy, "size", 0) or self._model.input_size) if spec else int(self._model.input_size)
        self.temperature = float(getattr(spec.output, "temperature", 1.0)) if spec else 1.0
        bias = getattr(spec.output, "decision_bias", None) if spec else None
        self.decision_bias = np.asarray(bias, np.float64) if bias is not None else None

    def notes(self) -> list[str]:
        """Weights without a manifest entry (a run's own best.pt) grade uncalibrated, said before the run: the
        calibration.json its run fitted beside them had been passed over in silence (campaign 30a L3)."""
        if self.spec.spec is not None:
            return []
        path = self.spec.path
        note = f"{path.name} has no entry in weights/manifest.json: its probabilities are not calibrated (temperature 1)"
        calibration = path.parent / "calibration.json"
        try:
            fitted = json.loads(calibration.read_text())["temperature"]
        except (OSError, ValueError, KeyError, TypeError):
            return [note]
        return [f"{note}; {calibration} holds the temperature its run fitted ({fitted}): export the run "
                "(scripts/export_weights.py) to grade with it"]

    def config_record(self) -> dict:
        return {
            "weights": self.weights_record(),
            "size": self.size,
            "temperature": self.temperature,
            **({"decision_bias": self.decision_bias.tolist()} if self.decision_bias is not None else {}),
            "flag_threshold": self.cfg.flag_threshold,
            "device": str(self.device),
            **self.precision_record(),
            **({"batch_size": self.batch_size} if self.batch_size > 1 else {}),
        }

    def frame(self, item: ItemInput) -> np.ndarray:
        """The network's input for one photograph (see ``grade_frame``)."""
        return grade_frame_large(item.image, item.fov, self.size) if item.image.large else grade_frame(item.image.rgb, item.fov, self.size)

    def compute(self, item: ItemInput) -> ItemOutput:
        return self.compute_batch([item])[0]

    def compute_batch(self, items: list[ItemInput]) -> list[ItemOutput]:
        """The photographs' frames through one forward pass (``--batch-size``)."""
        import torch

        from fundus_pipeline.device import to_device

        self.setup()
        frames = [self.frame(item) for item in items]
        x = np.stack(frames).transpose(0, 3, 1, 2)
        with torch.inference_mode():
            logits = self._model(to_device(torch.from_numpy(np.ascontiguousarray(x)), self.device)).float().cpu().numpy()
        pg, pf = grade_probabilities(logits, self.temperature)
        return [ItemOutput({}, {**self.fields(item, g, f), "warning": frame_warning(item, fr)}) for item, g, f, fr in zip(items, pg, pf, frames)]

    def fields(self, item: ItemInput, pg: np.ndarray, pf: np.ndarray) -> dict:
        """The results.csv columns of one photograph from its grade and flag probabilities."""
        if not (np.isfinite(pg).all() and np.isfinite(pf).all()):  # argmax of NaN would say "good"
            raise InputError("the grader's output is not a finite number (NaN or infinity); the weights or the photograph are broken")
        fov = item.fov
        found = bool(fov is not None and fov.found)
        fields = {"grade": GRADES[decide(pg, self.decision_bias)], **{f"p_{g}": round(float(p), 6) for g, p in zip(GRADES, pg)}, "temperature": self.temperature}
        fields.update({f"p_{f}": round(float(p), 6) for f, p in zip(FLAGS, pf)})
        fields["flags"] = " ".join(f for f, p in zip(FLAGS, pf) if p >= self.cfg.flag_threshold)
        fields["fov_found"] = found
        fields["fov_fraction"] = round(float(fov.mask.mean()), 6) if found else ""
        fields["fov_diameter"] = round(float(fov.geometry.diameter), 2) if found else ""
        return fields
