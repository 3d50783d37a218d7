"""Shared fixtures. Tests that need the real datasets use ``data_root`` and skip (with a reason) when
``../shared/data`` (or ``$FUNDUS_DATA``) is absent; when present they run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundus_pipeline.datasets import DRIVE_TRAIN, HRF_TRAIN

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def data_root() -> Path:
    from fundus_pipeline.datasets import default_data_root

    root = default_data_root()
    if not (root / "DRIVE").is_dir():
        pytest.skip(f"datasets not found at {root} (set FUNDUS_DATA or place them in ../shared/data)")
    return root


def pytest_collection_modifyitems(config, items) -> None:
    """Every test that reads the real datasets carries the ``data`` marker (``-m "not data"`` selects the rest):
    those that take ``data_root`` (also through another fixture) and those skipped when the datasets are absent."""
    for item in items:
        reasons = (str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))
        if "data_root" in getattr(item, "fixturenames", ()) or any(r.startswith("datasets not found") for r in reasons):
            item.add_marker(pytest.mark.data)


def synthetic_fundus(h: int = 96, w: int = 96, seed: int = 0) -> np.ndarray:
    """A fundus-like uint8 RGB image: orange disc on black with a bright optic disc and dark vessels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = h / 2, w / 2, 0.46 * min(h, w)
    d = np.hypot(yy - cy, xx - cx)
    img = np.zeros((h, w, 3), np.float32)
    inside = d <= r
    shade = 1.0 - 0.35 * (d / r) ** 2
    img[..., 0] = 0.80 * shade
    img[..., 1] = 0.40 * shade
    img[..., 2] = 0.18 * shade
    od = np.hypot(yy - cy, xx - (cx + 0.45 * r)) < 0.14 * r
    img[od] = [0.98, 0.9, 0.6]
    for k in range(5):
        a = rng.uniform(0, np.pi)
        dist = np.abs((yy - cy) * np.cos(a) - (xx - cx - 0.45 * r) * np.sin(a))
        img[dist < max(1.0, 0.012 * min(h, w))] *= 0.6
    img[~inside] = 0
    img += rng.normal(0, 0.01, img.shape).astype(np.float32) * inside[..., None]
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _fov_and_vessels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fov = rgb.max(axis=2) > 20
    vessels = fov & (rgb[..., 1] < 0.6 * rgb[..., 1][fov].mean())  # the synthetic vessels are dark
    return fov, vessels


def _palette_gif(path: Path, mask: np.ndarray) -> None:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 255, 255, 255])
    im.save(path, optimize=False)


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory) -> Path:
    """DRIVE training (21-40), HRF (01-05 of each class) and 12 HEI-MED photographs with heimed.csv, in the
    datasets' own file layout, tiny."""
    root = tmp_path_factory.mktemp("data")
    d = root / "DRIVE" / "training"
    for sub in ("images", "1st_manual", "mask"):
        (d / sub).mkdir(parents=True)
    for k, ident in enumerate(DRIVE_TRAIN):
        rgb = synthetic_fundus(64, 64, k)
        fov, ves = _fov_and_vessels(rgb)
        Image.fromarray(rgb).save(d / "images" / f"{ident}_training.tif")
        _palette_gif(d / "1st_manual" / f"{ident}_manual1.gif", ves)
        _palette_gif(d / "mask" / f"{ident}_training_mask.gif", fov)
    h = root / "HRF"
    for sub in ("images", "manual1", "mask"):
        (h / sub).mkdir(parents=True)
    for k, ident in enumerate(HRF_TRAIN):
        rgb = synthetic_fundus(128, 128, 100 + k)
        fov, ves = _fov_and_vessels(rgb)
        ext = "JPG" if ident.endswith("_dr") else "jpg"
        Image.fromarray(rgb).save(h / "images" / f"{ident}.{ext}", quality=95)
        Image.fromarray(ves.astype(np.uint8) * 255).save(h / "manual1" / f"{ident}.tif")
        Image.fromarray(fov.astype(np.uint8) * 255).save(h / "mask" / f"{ident}_mask.tif")
    hm = root / "HEI-MED"
    (hm / "images").mkdir(parents=True)
    rows = ["image,orig_width,orig_height,on_row,on_col,elvd_quality"]
    for k in range(12):
        name = f"{k:08d}.jpg"
        Image.fromarray(synthetic_fundus(80, 96, 200 + k)).save(hm / "images" / name, quality=95)
        rows.append(f"{name},192,160,40,66,0.5")  # the synthetic disc sits right of the centre
    (hm / "heimed.csv").write_text("\n".join(rows) + "\n")
    ep = root / "EyePACS-256"
    (ep / "images").mkdir(parents=True)
    rows = ["image,quality,DR_grade"]
    for k in range(10):  # 5 patients, both eyes; grades 0, 1, 2 in turn
        name = f"{10 + k // 2}_{'left' if k % 2 == 0 else 'right'}.jpeg"
        Image.fromarray(synthetic_fundus(64, 64, 300 + k)).save(ep / "images" / name, quality=90)
        rows.append(f"{name},{k % 3},0")
    (ep / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture()
def two(tmp_path) -> Path:
    """Two small synthetic photographs in tmp_path/in (p0.png, p1.png)."""
    from PIL import Image

    d = tmp_path / "in"
    d.mkdir()
    for i in range(2):
        Image.fromarray(synthetic_fundus(48, 48, seed=i)).save(d / f"p{i}.png")
    return d
