"""The ``compare`` stage of a simulated chained run (``fundus run --simulate``): what the restoration
bought, per photograph, against the clean original the degraded input was made from.

Input roles, matched by the chain's item key (planned by ``fundus_pipeline.chain``): ``image``, the
degraded photograph the chain received; ``clean``, its clean original; ``delivered``, the image the chain
delivered (the enhanced image where it was made and trusted, else the degraded input); with the segment
step, the vessel masks of the clean original, of the degraded input and of the delivered image; with
``--ground-truth``, the manual vessel annotation of the clean original.

Columns (inside the clean original's estimated field of view): ``psnr_before`` / ``ssim_before``
(degraded input vs clean), ``psnr_after`` / ``ssim_after`` (delivered vs clean), ``f1_before`` /
``f1_after`` (vessel F1 of the degraded input's and the delivered image's segmentation against the clean
original's segmentation), and ``f1_gt_before`` / ``f1_gt_after`` against the annotation. PSNR and SSIM
are ``fundus evaluate enhance``'s definitions; F1 is 1 when both masks are empty.
"""

from __future__ import annotations

import numpy as np

from fundus_pipeline.errors import InputError
from fundus_pipeline.evaluation.image_metrics import psnr, ssim
from fundus_pipeline.evaluation.segment import require_vessels
from fundus_pipeline.stages.base import Fov, InputSpec, ItemInput, ItemOutput, Stage

VESSEL_ROLES = ("vessels_clean", "vessels_before", "vessels_after")


def binary(image) -> np.ndarray:
    """A mask image (0/255 PNG, a palette GIF converted to RGB, ...) as bool, as ``fundus evaluate segment`` reads
    one (``binarise``: a mask of two grey levels is its brighter level, so a 16-bit 0/255 or an 8-bit 0/1 ground
    truth is not read as empty; review 23 R23-1), over the maximum of its colours."""
    from fundus_pipeline.evaluation.segment import binarise

    a = image.color
    return binarise(a.max(axis=2) if a.ndim == 3 else a)


def f1(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Dice/F1 of two boolean masks over ``mask`` pixels (1 when both are empty there)."""
    p, r = pred & mask, ref & mask
    tp = int((p & r).sum())
    den = int(p.sum()) + int(r.sum())
    return 1.0 if den == 0 else 2.0 * tp / den


class CompareStage(Stage):
    name = "compare"
    fov_policy = "none"  # the clean original's FOV is estimated in compute
    start_method = "fork"  # numpy/OpenCV only

    def __init__(self, *, vessels: bool, truth: bool):
        self.vessels, self.truth = vessels, truth
        roles = [InputSpec("image"), InputSpec("clean"), InputSpec("delivered")]
        cols = ["psnr_before", "psnr_after", "ssim_before", "ssim_after"]
        if vessels:
            roles += [InputSpec(r) for r in VESSEL_ROLES]
            cols += ["f1_before", "f1_after"]
            if truth:
                roles.append(InputSpec("truth"))
                cols += ["f1_gt_before", "f1_gt_after"]
        self.inputs = tuple(roles)
        self.columns = tuple(cols)

    def config_record(self) -> dict:
        return {"vessels": self.vessels, "truth": self.truth, "metrics": list(self.columns)}

    def compute(self, item: ItemInput) -> ItemOutput:
        clean = item.images["clean"]
        shape = (clean.meta.height, clean.meta.width)
        for role, im in item.images.items():
            if (im.meta.height, im.meta.width) != shape:
                raise InputError(f"size mismatch: {role} is {im.meta.width}x{im.meta.height}, the clean original {shape[1]}x{shape[0]}")
        fov = Fov.estimate_image(clean)
        m = fov.mask
        c, before, after = clean.rgb, item.image.rgb, item.images["delivered"].rgb
        fields = {
            "psnr_before": round(psnr(before, c, m), 4), "psnr_after": round(psnr(after, c, m), 4),
            "ssim_before": round(ssim(before, c, m), 5), "ssim_after": round(ssim(after, c, m), 5),
        }  # fmt: skip
        if self.vessels:
            vc, vb, va = (binary(item.images[r]) for r in VESSEL_ROLES)
            fields["f1_before"], fields["f1_after"] = round(f1(vb, vc, m), 5), round(f1(va, vc, m), 5)
            if self.truth:
                gt = binary(item.images["truth"])
                require_vessels(gt, m)  # as evaluate segment refuses it
                fields["f1_gt_before"], fields["f1_gt_after"] = round(f1(vb, gt, m), 5), round(f1(va, gt, m), 5)
        return ItemOutput({}, fields)
