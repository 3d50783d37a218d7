"""``fundus build grade-set``: photographs with a grade (Good / Usable / Reject) and the flags of what is
wrong with them, for the no-reference grader (``fundus grade``).

Built by the quality set's machinery (``fundus_pipeline.quality.build``): the same parts and sources
(``train`` = DRIVE 21-40, HRF 01-05 of each class and the 169 HEI-MED photographs, with the same ``val``
sources; ``test`` = DRIVE 01-20 and HRF 06-15), the same canonical frame, the same degradation draws
(families rotating per source: released Cofe-Net types, training-time Cofe-Net types, clinical recipes)
and the same label. For each source C:

* C itself (grade Good, no flag);
* ``draws`` degraded versions D, each with the task-aware quality of D itself,
  ``q(D) = (SSIM(D, C) + F1(vessels(D), vessels(C))) / 2`` inside C's FOV (``quality.label``), the grade
  by the two thresholds of ``quality.grading`` (Good q >= 0.90, Reject q < 0.70) and the flags the
  simulator applied (``quality.grading.degradation_flags``).

Plus the ``not_fundus`` examples: natural images and textures that scikit-image bundles (never
downloaded), split by image into train / val / test, each as the plain square picture and inside a
circular field of view with a black surround (so a dark circle alone does not make a fundus photograph);
grade Reject, flag ``not_fundus``.

Labels are computed at the canonical ``size`` (512); images are written at ``store_size`` (256, 8-bit
RGB, area averaging), enough for a grader that works at 224.

Layout of OUT:
    manifest.json         options, grade thresholds, flags, segmenter, counts
    labels.csv            key, part, split, source, dataset, kind (clean, degraded, natural), degradation,
                          family, seed, q, ssim, f1, quality (0 Good, 1 Usable, 2 Reject: EyeQ's codes), and a
                          0/1 column flag_<name> per flag
    degradations.jsonl    the parameter record of every degraded image
    PART/images/KEY.png   the photographs
    rows/PART/SRC.json    per-source results, as in the quality set (resume; what the source was read from and
                          wrote); rows/natural/PART.json lists the not-fundus pictures written
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fundus_pipeline.quality.build import (
    PARTS, SourceFiles, build_parts, csv_text, draw_degrader, claim_set, provenance, quantise, source_key, write_json_atomic, write_png,
)
from fundus_pipeline.quality.grading import FLAGS, GRADE_RULE, GRADES, grade_of_q

COLUMNS = (
    "key", "part", "split", "source", "dataset", "kind", "degradation", "family", "seed", "q", "ssim", "f1", "quality",
    *(f"flag_{f}" for f in FLAGS),
)  # fmt: skip

#: scikit-image's bundled pictures used as not-fundus examples, split by picture. ``retina`` and
#: ``microaneurysms`` are left out (they are fundus pictures); ``cat`` is ``chelsea``.
NATURAL = {
    "train": (
        "camera", "chelsea", "checkerboard", "clock", "colorwheel", "gravel", "horse", "immunohistochemistry", "logo",
        "moon", "page", "text", "cell", "shepp_logan_phantom", "binary_blobs", "stereo_motorcycle",
    ),
    "val": ("rocket", "grass"),
    "test": ("astronaut", "coffee", "brick", "coins", "hubble_deep_field"),
}  # fmt: skip


class GradeSetConfig(BaseModel):
    """Options of ``fundus build grade-set`` (recorded in the set's manifest; a resume needs the same)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(512, ge=64, le=2048)
    store_size: int = Field(256, ge=32, le=2048)
    draws: int = Field(6, ge=1, le=50)
    seed: int = Field(2027, ge=0)
    parts: tuple[Literal["train", "test"], ...] = PARTS
    limit: int | None = Field(None, ge=1)
    segmenter: str = "imff"


def natural_image(name: str) -> np.ndarray:
    """One of scikit-image's bundled pictures as uint8 RGB (gray replicated, alpha dropped)."""
    import skimage.data
    from skimage.util import img_as_ubyte

    if name == "binary_blobs":
        a = skimage.data.binary_blobs(length=512, rng=0)
    elif name == "stereo_motorcycle":
        a = skimage.data.stereo_motorcycle()[0]
    else:
        a = getattr(skimage.data, name)()
    a = img_as_ubyte(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


def natural_views(rgb: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """The picture's two views at ``size``: ``plain`` (centre square, area-resized) and ``circle`` (the same
    inside a centred disc of diameter ``size`` with a black surround)."""
    import cv2

    h, w = rgb.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    sq = cv2.resize(rgb[y0 : y0 + s, x0 : x0 + s], (size, size), interpolation=cv2.INTER_AREA if s > size else cv2.INTER_LINEAR)
    yy, xx = np.mgrid[:size, :size]
    c = (size - 1) / 2
    disc = (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    return {"plain": sq, "circle": sq * disc[..., None].astype(np.uint8)}


def _store(rgb01: np.ndarray, size: int) -> np.ndarray:
    import cv2

    u8 = quantise(rgb01)
    return u8 if u8.shape[0] == size else cv2.resize(u8, (size, size), interpolation=cv2.INTER_AREA)


def _row(key: str, part: str, split: str, source: str, kind: str, seed: int, **kw) -> dict:
    row = {"key": key, "part": part, "split": split, "source": source, "dataset": source.split("/")[0], "kind": kind,
           "degradation": "", "family": "", "seed": seed, "q": "", "ssim": "", "f1": ""}  # fmt: skip
    row.update({f"flag_{f}": 0 for f in FLAGS})
    row.update(kw)
    return row


def build_grade_source(
    name: str, info: dict, part: str, split: str, cfg: GradeSetConfig, mapper, out: Path, written: list[Path] | None = None
) -> tuple[list[dict], list[dict]]:
    """The clean photograph and its ``draws`` degraded versions for one source: (label rows, degradation records).
    Each file written is appended to ``written``."""
    from fundus_pipeline.quality.grading import degradation_flags
    from fundus_pipeline.quality.label import quality_label
    from fundus_pipeline.stages.base import Fov
    from fundus_pipeline.train.enhance import canonical_source, degrade_with_params

    src = source_key(name)
    images = out / part / "images"
    cs = canonical_source(info["paths"], cfg.size)
    clean = quantise(cs.c_rgb).astype(np.float32) / 255.0
    write_png(images / f"{src}.png", _store(clean, cfg.store_size), written)
    fov = Fov.estimate(clean)
    ves_clean = mapper(clean, fov)
    rows = [_row(src, part, split, name, "clean", cfg.seed, q=1.0, ssim=1.0, f1=1.0, quality=0)]
    records = []
    for d in range(cfg.draws):
        degrader, degradation, family = draw_degrader(name, d, cfg.seed)
        key = f"{src}__d{d}"
        deg, params = degrade_with_params(degrader, clean, cs.c_fov, cfg.seed, key)
        deg = quantise(deg).astype(np.float32) / 255.0
        write_png(images / f"{key}.png", _store(deg, cfg.store_size), written)
        q = quality_label(deg, clean, fov.mask, mapper(deg, fov), ves_clean)
        flags = degradation_flags(params)
        rows.append(_row(key, part, split, name, "degraded", cfg.seed, degradation=degradation, family=family, q=q["label"],
                         ssim=q["ssim"], f1=q["f1"], quality=grade_of_q(q["label"]), **{f"flag_{f}": v for f, v in flags.items()}))  # fmt: skip
        records.append({"key": key, "part": part, "source": name, "degradation": degradation, "params": params})
    return rows, records


def natural_rows(part: str, cfg: GradeSetConfig, out: Path) -> list[dict]:
    """Write the not-fundus pictures of a part (train: its train and val pictures) and return their rows; the
    files are listed in ``rows/natural/PART.json`` (so ``--overwrite`` removes them with the set's other files)."""
    splits = ("train", "val") if part == "train" else ("test",)
    rows: list[dict] = []
    written = SourceFiles(out, out / "rows" / "natural" / f"{part}.partial")  # a kill meanwhile leaves their names for --overwrite
    for split in splits:
        for name in NATURAL[split]:
            for view, img in natural_views(natural_image(name), cfg.store_size).items():
                key = f"natural-{name}__{view}"
                write_png(out / part / "images" / f"{key}.png", img, written)
                rows.append(_row(key, part, split, f"natural/{name}", "natural", cfg.seed, quality=2, flag_not_fundus=1))
    write_json_atomic(out / "rows" / "natural" / f"{part}.json", {"files": {p.relative_to(out).as_posix(): p.stat().st_size for p in written}})
    written.finish()
    return rows


def build_grade_set(
    root: Path, out: Path, cfg: GradeSetConfig, *, overwrite: bool = False, threads: int = 2, log: Callable[[str], None] = print
) -> dict:
    """Build (or resume) the grade set in ``out``; returns the manifest."""
    import hashlib

    import torch

    from fundus_pipeline.quality.label import VesselMapper

    torch.set_num_threads(threads)
    mapper = VesselMapper(cfg.segmenter)
    digest = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), mapper.loaded.sha256, "grade"], sort_keys=True).encode()).hexdigest()[:16]
    with claim_set(out, digest, cfg, overwrite, "grade set", threads):
        return _build_grade_set(root, out, cfg, threads, mapper, digest, log)


def _build_grade_set(root: Path, out: Path, cfg: GradeSetConfig, threads: int, mapper, digest: str, log: Callable[[str], None]) -> dict:
    import torch

    from fundus_pipeline import __version__
    from fundus_pipeline.io import write_bytes_atomic
    from fundus_pipeline.quality.label import LABEL_DEFINITION

    def one(name: str, info: dict, part: str, split: str, written: list[Path]) -> tuple[list[dict], list[dict]]:
        return build_grade_source(name, info, part, split, cfg, mapper, out, written)

    rows, records, counts, data = build_parts(root, out, cfg, one, "images", log)
    for part in cfg.parts:
        nat = natural_rows(part, cfg, out)
        rows += nat
        counts[part]["images"] += len(nat)
        counts[part]["natural"] = len(nat)
    for part in cfg.parts:
        counts[part]["grades"] = {g: sum(r["part"] == part and int(r["quality"]) == i for r in rows) for i, g in enumerate(GRADES)}
    write_bytes_atomic(out / "labels.csv", csv_text(rows, COLUMNS).encode())
    write_bytes_atomic(out / "degradations.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())
    manifest = {
        "schema_version": 1,
        "kind": "fundus grade set",
        "fundus_version": __version__,
        "config": cfg.model_dump(mode="json"),
        "digest": digest,
        "data": data,
        "q": LABEL_DEFINITION + " (here E is the degraded photograph D itself)",
        "grades": GRADE_RULE,
        "flags": list(FLAGS),
        "natural": {k: list(v) for k, v in NATURAL.items()},
        "resolution": f"labels in the canonical frame ({cfg.size}x{cfg.size}); images stored at {cfg.store_size}x{cfg.store_size}, 8-bit RGB",
        "segmenter": {"weights": mapper.loaded.name, "sha256": mapper.loaded.sha256, "threshold": mapper.threshold},
        "counts": counts,
        "torch": torch.__version__,
        "threads": threads,
        **provenance(),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
