"""The public vessel datasets as laid out in ``../shared/data`` (DRIVE, HRF) and their standard splits.

Splits (never train, tune or select on the test lists):
- DRIVE: train 21-40, test 01-20 (1st observer is the reference; 2nd observer is the human baseline).
- HRF (Orlando et al. 2017): train = images 01-05 of each class (h, g, dr), test = the rest (06-15;
  11_h, 12_h and 13_h have no manual annotation, so 27 labelled test images).
- Validation (checkpoint selection and the a-priori threshold) is a fixed subset of the *training*
  images: DRIVE 37-40 and HRF 05_h, 05_g, 05_dr.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from fundus_pipeline.evaluation.segment import read_binary
from fundus_pipeline.io import read_image, to_float_rgb

DRIVE_TRAIN = [f"{i:02d}" for i in range(21, 41)]
DRIVE_TEST = [f"{i:02d}" for i in range(1, 21)]
DRIVE_VAL = ["37", "38", "39", "40"]
HRF_CLASSES = ("h", "g", "dr")
HRF_TRAIN = [f"{i:02d}_{c}" for c in HRF_CLASSES for i in range(1, 6)]
HRF_TEST = [f"{i:02d}_{c}" for c in HRF_CLASSES for i in range(6, 16)]
HRF_UNLABELLED = {"11_h", "12_h", "13_h"}
HRF_VAL = ["05_h", "05_g", "05_dr"]


def default_data_root() -> Path:
    """``$FUNDUS_DATA`` if set, else ``../shared/data`` beside the repository checkout."""
    env = os.environ.get("FUNDUS_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class Sample:
    name: str  # e.g. "drive/21" or "hrf/01_h"
    rgb: np.ndarray  # float32 HxWx3 in [0,1] at the model's working scale
    vessels: np.ndarray  # float32 HxW in [0,1] (soft after downscaling)
    fov: np.ndarray  # bool HxW
    scale: float  # working scale relative to the native image


def missing_datasets(root: Path, required: tuple[str, ...], how: str = "pass --data or set FUNDUS_DATA") -> str | None:
    """None when ``root`` holds each of the ``required`` dataset folders, else the sentence that says which it lacks."""
    missing = [d for d in required if not (Path(root) / d).is_dir()]
    if missing:
        return f"dataset root {root} lacks {' and '.join(d + '/' for d in missing)} ({how})"
    return None


def require_datasets(root: Path, *required: str, how: str = "pass --data or set FUNDUS_DATA") -> Path:
    """``root``, refused (``UsageError``, exit 2) when it lacks one of the ``required`` dataset folders: a script
    says so in one line before it starts, not through the first command of its that fails (campaign 32b F6)."""
    message = missing_datasets(root, required, how)
    if message:
        from fundus_pipeline.errors import UsageError

        raise UsageError(message)
    return root


def _read_rgb(path: Path) -> np.ndarray:
    """Photograph as float32 RGB in [0, 1] (divided by the bit depth's maximum)."""
    arr, meta = read_image(path)
    return to_float_rgb(arr, meta)[0]


def _resize(arr: np.ndarray, scale: float, interp=cv2.INTER_AREA) -> np.ndarray:
    if scale == 1.0:
        return arr
    h, w = arr.shape[:2]
    return cv2.resize(arr, (round(w * scale), round(h * scale)), interpolation=interp)


def drive_paths(root: Path, ident: str) -> dict[str, Path]:
    split = "training" if int(ident) >= 21 else "test"
    base = root / "DRIVE" / split
    return {
        "image": base / "images" / f"{ident}_{split}.tif",
        "vessels": base / "1st_manual" / f"{ident}_manual1.gif",
        "fov": base / "mask" / f"{ident}_{split}_mask.gif",
    }


def hrf_paths(root: Path, ident: str) -> dict[str, Path]:
    num, cls = ident.split("_")
    ext = "JPG" if cls == "dr" else "jpg"
    base = root / "HRF"
    return {
        "image": base / "images" / f"{ident}.{ext}",
        "vessels": base / "manual1" / f"{ident}.tif",
        "fov": base / "mask" / f"{ident}_mask.tif",
    }


def load_sample(root: Path, dataset: str, ident: str, scale: float) -> Sample:
    paths = drive_paths(root, ident) if dataset == "drive" else hrf_paths(root, ident)
    rgb = _resize(_read_rgb(paths["image"]), scale)
    # annotations and masks are binarised by the rule `fundus evaluate` applies to ground truth
    ves = _resize(read_binary(paths["vessels"]).astype(np.float32), scale)
    fov = _resize(read_binary(paths["fov"]).astype(np.uint8), scale, cv2.INTER_NEAREST) > 0
    return Sample(f"{dataset}/{ident}", rgb, ves, fov, scale)


# The working scales used in training: DRIVE at native resolution, HRF at half resolution. At
# inference the scale is derived from the FOV diameter (see fundus_pipeline.models.inference.working_scale),
# which gives the same values for these two datasets.
TRAIN_SCALES = {"drive": 1.0, "hrf": 0.5}


def training_sets(root: Path) -> tuple[list[Sample], list[Sample]]:
    """(train, val) samples: DRIVE 21-40 + HRF train split, minus the fixed validation subset."""
    train, val = [], []
    for ident in DRIVE_TRAIN:
        (val if ident in DRIVE_VAL else train).append(load_sample(root, "drive", ident, TRAIN_SCALES["drive"]))
    for ident in HRF_TRAIN:
        (val if ident in HRF_VAL else train).append(load_sample(root, "hrf", ident, TRAIN_SCALES["hrf"]))
    return train, val


# EyePACS-256 (real photographs with EyeQ quality labels): one split by patient, fixed once.
EYEPACS256_SPLIT_SEED = 0
EYEPACS256_FRACTIONS = (0.70, 0.15)  # train, val; the rest is test


def eyepacs256_split(root: Path) -> list[dict]:
    """Rows ``{"image", "key", "patient", "quality", "split"}`` of ``EyePACS-256/labels.csv``, split by patient
    (both eyes of a patient in one part): the sorted patient ids are permuted by numpy's generator seeded
    with ``EYEPACS256_SPLIT_SEED``; the first 70% train, the next 15% val, the rest test."""
    import csv

    with open(root / "EyePACS-256" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    patients = sorted({r["image"].split("_")[0] for r in rows}, key=lambda p: (len(p), p))
    order = np.random.default_rng(EYEPACS256_SPLIT_SEED).permutation(len(patients))
    n_train = round(len(patients) * EYEPACS256_FRACTIONS[0])
    n_val = round(len(patients) * EYEPACS256_FRACTIONS[1])
    part = {}
    for rank, i in enumerate(order):
        part[patients[i]] = "train" if rank < n_train else ("val" if rank < n_train + n_val else "test")
    out = []
    for r in rows:
        p = r["image"].split("_")[0]
        out.append({"image": r["image"], "key": Path(r["image"]).stem, "patient": p, "quality": int(r["quality"]), "split": part[p]})
    return out
