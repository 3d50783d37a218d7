"""The shipped Cofe-Net weights (``cofe``, ``cofe_add`` and ``cofe_add_seg``) on four DRIVE *test* images degraded as in the
frozen benchmark (released type 111, seed 2026): the enhancement raises PSNR inside the FOV and costs at
most a bounded part of the shipped segmenter's vessel F1, guarding the figures measured for the README
(``GUARDS``); runs when ../shared/data is present."""

from __future__ import annotations

import numpy as np
import pytest

from fundus_pipeline.config import DegradeConfig
from fundus_pipeline.datasets import drive_paths
from fundus_pipeline.evaluation.enhance_bench import Method, Segmenter, vessel_scores
from fundus_pipeline.evaluation.image_metrics import psnr
from fundus_pipeline.evaluation.segment import read_binary
from fundus_pipeline.io import from_float_rgb, read_image, to_float_rgb
from fundus_pipeline.models.weights import weights_dir
from fundus_pipeline.stages.base import Fov, Image, ItemInput
from fundus_pipeline.stages.degrade import DegradeStage

pytestmark = pytest.mark.data
IDS = ("01", "02", "03", "04")


# name: (least mean PSNR gain in dB, largest mean vessel-F1 loss) over the four images, below what all 20 measured:
# cofe +1.66 dB, F1 0.7663 -> 0.7569; cofe_add +2.52 dB, F1 0.7663 -> 0.7422; cofe_add_seg (its correction
# low-passed, sigma 32) +2.32 dB, F1 0.7663 -> 0.7612 (the issue asks for no F1 loss: all miss it).
# On these four images: cofe_add +2.43 dB and an F1 loss of 0.0213; cofe_add_seg +2.02 dB and 0.0062, and
# 0.0123 without the low-pass, so its bound (0.01) fails if the manifest's correction_sigma is lost.
GUARDS = {"cofe": (1.0, 0.02), "cofe_add": (1.5, 0.04), "cofe_add_seg": (1.5, 0.01)}


@pytest.mark.parametrize("name", sorted(GUARDS))
def test_shipped_cofe_on_degraded_drive_test_images(data_root, name):
    if not (weights_dir() / f"{name}.pt").is_file():
        pytest.skip(f"weights/{name}.pt not present")
    stage = DegradeStage(DegradeConfig(types=["111"], preset="released", seed=2026))
    method, seg = Method(name), Segmenter()
    gains, f1_deg, f1_enh = [], [], []
    for i in IDS:
        p = drive_paths(data_root, i)
        arr, meta = read_image(p["image"])
        clean = to_float_rgb(arr, meta)[0]
        out = stage.compute(ItemInput(p["image"].stem, {"image": Image(arr, meta)}, Fov.estimate(clean))).images_now()[""]
        degraded = to_float_rgb(out, meta)[0]
        fov, gt = read_binary(p["fov"]), read_binary(p["vessels"])
        enhanced = to_float_rgb(from_float_rgb(method(degraded), meta, None), meta)[0]  # as written to disk
        gains.append(psnr(enhanced, clean, fov) - psnr(degraded, clean, fov))
        f1_deg.append(vessel_scores(seg(degraded), gt, fov, seg.spec.threshold)["f1"])
        f1_enh.append(vessel_scores(seg(enhanced), gt, fov, seg.spec.threshold)["f1"])
    min_gain, max_f1_loss = GUARDS[name]
    assert np.mean(gains) >= min_gain, gains
    assert np.mean(f1_enh) >= np.mean(f1_deg) - max_f1_loss, (f1_deg, f1_enh)
