"""``fundus train enhance``: Cofe-Net (and its ablations and the U-Net baseline) as a task on the shared
loop (``fundus_pipeline.train.loop``).

Clean sources (training splits only; test images are never read): DRIVE 21-40, HRF 01-05 of each class
and the 169 HEI-MED photographs. Each is mapped once into the canonical frame (the FOV's bounding square
at ``--size``; ``fundus_pipeline.canonical``) with its FOV mask, a vessel target (the manual annotation
for DRIVE and HRF; the shipped ``imff`` segmenter's probability on the clean photograph for HEI-MED) and
an optic-disc centre (hand-marked for HEI-MED; ``fundus_pipeline.disc.locate_disc`` elsewhere). The
prepared sources are cached (``--cache``). Validation (checkpoint choice): DRIVE 37-40, HRF 05_h/g/dr and
every 10th HEI-MED photograph, each degraded twice (released type 111 and the ``moderate`` recipe, from
``VAL_SEED`` whatever ``--seed`` is) and once left clean.

Each training step draws ``--batch-size`` samples as a pure function of (seed, step): a dataset
(uniformly), a source, a rotation by a multiple of 90 degrees and a flip, then a degradation of the
whole canonical frame by the ``degradation`` library: with probability ``--clean-p`` none, else one of
the released Cofe-Net types 001..111, the training-time Cofe-Net types 001..111, or the clinical
recipes mild / moderate / severe (the three families equally likely, or in the ratio
``--family-weights``; a member uniformly within its family); finally a ``--crop`` square at a random place.

Loss (Cofe-Net's, seeds.md 1.7; L1 means the mean over all elements, as nn.L1Loss):
``L1(B.R, O.R) + w_d L1(B.D, O.D)`` at full scale, the same at 1/2 scale for two-scale models, and
``w_v BCE(V.R)`` on the structure branch's vessel map for models with one; B clean, O output, R FOV,
D disc box, V vessel target. Optionally (``--seg-weight`` w_s > 0, not Cofe-Net's) a segmenter term
``w_s BCE(S(O.R), sigmoid(S(B.R))).R``: the frozen shipped segmenter S must read on the output the vessel
map it reads on the clean image.

Validation reports, per kind of pair, the mean PSNR inside the FOV and the mean vessel F1 of the frozen
shipped segmenter (at its threshold) against each source's vessel target, for the outputs and the inputs;
``--select`` says which of the two mean figures over the degraded pairs chooses best.pt.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fundus_pipeline.canonical import CanonicalFrame, canonical_fov_geometry
from fundus_pipeline.datasets import DRIVE_TRAIN, DRIVE_VAL, HRF_TRAIN, HRF_VAL, drive_paths, hrf_paths
from fundus_pipeline.disc import disc_box_mask, locate_disc
from fundus_pipeline.models.cofe import OUTPUT_RULES
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.train.config import EnhanceConfig
from fundus_pipeline.train.loop import Batch, Task, fit

HEIMED_VAL_EVERY = 10  # every 10th HEI-MED photograph (sorted by name) is a validation source
VAL_SEED = 0  # the validation pairs' degradations: fixed, so runs with different --seed are compared on the same pairs
CODES = ("001", "010", "011", "100", "101", "110", "111")
RECIPES = ("mild", "moderate", "severe")
SEGMENTER = "imff"  # the shipped segmenter that makes the vessel targets of photographs without annotations


@dataclass
class Source:
    name: str  # "drive/21", "hrf/01_h", "heimed/00000003"
    rgb: np.ndarray  # float32 S x S x 3 canonical clean image, 0 outside the FOV
    fov: np.ndarray  # bool S x S
    vessels: np.ndarray  # float32 S x S vessel target in [0, 1]
    disc: tuple[float, float]  # (x, y) canonical optic-disc centre
    vessels_kind: str  # "manual" or "segmenter"
    disc_kind: str  # "marked" or "located"


def heimed_table(root: Path) -> list[dict]:
    """HEI-MED's rows (image, on_row, on_col: the hand-marked optic-nerve centre), by image name. The file is
    checked, not trusted (``UsageError``, exit 2): UTF-8 (a byte-order mark and CRLF, as spreadsheets save it,
    are fine), the three columns, each image a plain file name in ``HEI-MED/images`` (a path leaving it could
    name a DRIVE test photograph), named once, and finite disc coordinates. A missing file is an ``OSError``."""
    from fundus_pipeline.errors import UsageError, refuse_repeated_columns

    path = root / "HEI-MED" / "heimed.csv"
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as e:
        raise UsageError(f"cannot read {path}: {e}", "the datasets and their layout: ../shared/data/README.md") from None
    refuse_repeated_columns(columns, "HEI-MED table", path)
    missing = [c for c in ("image", "on_row", "on_col") if c not in columns]
    if missing:
        raise UsageError(f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(columns) or 'none'})")
    seen: set[str] = set()
    for i, r in enumerate(rows, start=1):
        extra = r.pop(None, None)  # fields past the header's: empty ones (a trailing comma) are dropped
        if extra and any(str(v).strip() for v in extra):
            raise UsageError(f"{path} row {i} has more fields than the header names")
        image = (r.get("image") or "").strip()
        if not image or image in (".", "..") or "/" in image or "\\" in image:
            raise UsageError(f"{path} row {i}: image {r.get('image')!r} is not a file name in HEI-MED/images")
        if image in seen:
            raise UsageError(f"{path} row {i}: image {image} is listed twice")
        seen.add(image)
        for c in ("on_row", "on_col"):
            try:
                ok = np.isfinite(float(r[c]))
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise UsageError(f"{path} row {i}: {c} {r[c]!r} is not a number")
        r["image"] = image
    return sorted(rows, key=lambda r: r["image"])


def source_list(root: Path) -> list[tuple[str, dict]]:
    """(name, info) of every clean training source, in a fixed order."""
    out: list[tuple[str, dict]] = []
    for ident in DRIVE_TRAIN:
        out.append((f"drive/{ident}", {"paths": drive_paths(root, ident)}))
    for ident in HRF_TRAIN:
        out.append((f"hrf/{ident}", {"paths": hrf_paths(root, ident)}))
    for row in heimed_table(root):
        out.append((f"heimed/{Path(row['image']).stem}", {"paths": {"image": root / "HEI-MED" / "images" / row["image"]}, "row": row}))
    return out


def is_validation(name: str) -> bool:
    ds, ident = name.split("/")
    if ds == "drive":
        return ident in DRIVE_VAL
    if ds == "hrf":
        return ident in HRF_VAL
    return False  # HEI-MED: decided by position (see split_sources)


def validation_names(names: list[str]) -> set[str]:
    """The validation sources among the training-split source ``names`` (in ``source_list`` order): DRIVE
    37-40, HRF 05_*, and every ``HEIMED_VAL_EVERY``-th HEI-MED photograph by name."""
    heimed = [n for n in names if n.startswith("heimed/")]
    return {n for n in names if is_validation(n)} | set(heimed[::HEIMED_VAL_EVERY])


def split_sources(sources: list[Source]) -> tuple[list[Source], list[Source]]:
    val_names = validation_names([s.name for s in sources])
    return [s for s in sources if s.name not in val_names], [s for s in sources if s.name in val_names]


@dataclass
class CanonicalSource:
    """A clean photograph read from its dataset: native arrays and their canonical-frame versions."""

    frame: CanonicalFrame
    geometry: object  # the native FovGeometry
    rgb: np.ndarray  # native float32 RGB, 0 outside the FOV
    fov: np.ndarray  # native bool FOV (the dataset's mask where it has one, else estimated)
    c_rgb: np.ndarray  # canonical float32 RGB in [0, 1], 0 outside the canonical FOV
    c_fov: np.ndarray  # canonical bool FOV (nearest-neighbour)


#: The smallest field of view (fraction of the frame) a source may have: a fundus photograph's covers half or more.
MIN_FOV_FRACTION = 0.05


def canonical_source(paths: dict[str, Path], size: int) -> CanonicalSource:
    """Read ``paths["image"]`` (and ``paths["fov"]`` when given, ``read_source``) and map it into the canonical frame."""
    rgb, fov, geom = read_source(paths)
    frame = CanonicalFrame.from_fov(geom, size)
    rgb = rgb * fov[..., None]
    c_rgb = np.clip(frame.to_canonical(rgb.astype(np.float32)), 0, 1)
    c_fov = frame.to_canonical(fov.astype(np.uint8), interpolation=0) > 0  # nearest
    return CanonicalSource(frame, geom, rgb, fov, c_rgb * c_fov[..., None], c_fov)


def read_source(paths: dict[str, Path]):
    """(photograph, FOV mask, FOV geometry) of a source: ``paths["image"]`` decoded, its FOV read from
    ``paths["fov"]`` or estimated. A file that cannot be decoded, a FOV mask of another size than the
    photograph, or a field of view under ``MIN_FOV_FRACTION`` of the frame, is an ``InputError`` naming the file."""
    from degradation.fov import estimate_fov_geometry, fov_geometry

    from fundus_pipeline.datasets import _read_rgb
    from fundus_pipeline.evaluation.segment import read_binary

    from fundus_pipeline.errors import InputError

    rgb = _read_rgb(paths["image"])
    if "fov" in paths:
        fov = read_binary(paths["fov"])
        if fov.shape != rgb.shape[:2]:
            raise InputError(f"{paths['fov']}: FOV mask of {fov.shape[1]}x{fov.shape[0]} for the {rgb.shape[1]}x{rgb.shape[0]} photograph {paths['image']}")
        geom = fov_geometry(fov) if fov.any() else None
    else:
        fov, geom = estimate_fov_geometry(rgb)
    if fov.mean() < MIN_FOV_FRACTION:  # an all-black mask made an all-black source, labelled perfect and graded Good
        where = paths["fov"] if "fov" in paths else paths["image"]
        raise InputError(f"{where}: the field of view covers {100 * fov.mean():.2g}% of the frame; an empty or wrong FOV mask?")
    return rgb, fov, geom


def _prepare_one(name: str, info: dict, size: int, segmenter) -> Source:
    from fundus_pipeline.evaluation.segment import read_binary
    from fundus_pipeline.models.inference import predict_native, working_scale

    paths = info["paths"]
    cs = canonical_source(paths, size)
    frame, rgb, fov, c_rgb, c_fov = cs.frame, cs.rgb, cs.fov, cs.c_rgb, cs.c_fov
    if "vessels" in paths:
        ves, kind = read_binary(paths["vessels"]).astype(np.float32), "manual"
    else:
        model, threshold = segmenter
        ves = predict_native(model, rgb, fov, working_scale(cs.geometry.diameter))
        kind = "segmenter"
    c_ves = frame.to_canonical(ves) * c_fov
    row = info.get("row")
    if row is not None:  # HEI-MED: hand-marked optic-nerve centre (row, col in the stored pixels)
        disc = frame.point_to_canonical(float(row["on_col"]), float(row["on_row"]))
        disc_kind = "marked"
    else:
        disc, disc_kind = locate_disc(c_rgb, c_fov, c_ves), "located"
    return Source(name, c_rgb.astype(np.float32), c_fov, c_ves.astype(np.float32), disc, kind, disc_kind)


def prepare_sources(
    root: Path, size: int, segmenter_weights: Path, cache: Path | None, log: Callable[[str], None] = print,
    datasets: tuple[str, ...] | None = None,
) -> list[Source]:
    """The clean training sources of ``datasets`` (default: all three) in the canonical frame.

    With a ``cache`` file: it is loaded when it holds every source of the data as it is now (its digest
    covers the size, the bytes of every source file and the segmenter). Otherwise each source is prepared
    and saved at once in the folder ``.CACHE.parts`` next to it, keyed by that source's own digest, so an
    interrupted preparation loses at most one source and a run on some of the datasets prepares only
    theirs; once every source is there, the cache file is written and the parts folder removed."""
    from fundus_pipeline.models.weights import sha256_file

    listing = source_list(root)
    seg_sha = sha256_file(segmenter_weights)
    file_sha = functools.cache(sha256_file)  # a source's files are hashed once, for the whole cache's digest and its own
    digest = _cache_digest(size, listing, file_sha, seg_sha)
    wanted = [(n, info) for n, info in listing if datasets is None or n.split("/")[0] in datasets]
    if cache is not None and cache.is_file():
        try:
            z = np.load(cache, allow_pickle=False)
            same = str(z["digest"]) == digest
            if same:
                meta = json.loads(str(z["meta"]))
                rgb, fov, ves = z["rgb"], z["fov"], z["vessels"]  # each access of z[...] reads the whole array
                names = {n for n, _ in wanted}
                return [Source(m["name"], rgb[i], fov[i], ves[i], tuple(m["disc"]), m["vessels_kind"], m["disc_kind"]) for i, m in enumerate(meta) if m["name"] in names]
            log(f"{cache} was prepared from other data or options; preparing again")
        except (EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile) as e:  # empty, or a cache whose arrays do not read
            from fundus_pipeline.errors import UsageError
            from fundus_pipeline.train.config import check_cache_path

            try:
                check_cache_path(cache)  # another file at that path is not replaced (the options were checked; it may have come since)
            except ValueError as refused:
                raise UsageError(str(refused)) from None
            log(f"{cache} cannot be read ({type(e).__name__}); preparing again")
    parts = None if cache is None else _SourceParts(cache.parent / f".{cache.name}.parts")
    keys = {n: _cache_digest(size, [(n, info)], file_sha, seg_sha) for n, info in wanted}
    sources: dict[str, Source] = {}
    if parts is not None:
        for n, _ in wanted:
            s = parts.load(n, keys[n])
            if s is not None:
                sources[n] = s
    todo = [(n, info) for n, info in wanted if n not in sources]
    if todo:
        from fundus_pipeline.models.weights import load_model

        with torch.random.fork_rng(devices=[]):  # (as frozen_segmenter: a run's RNG state must not depend on whether the cache existed)
            model, spec = load_model(segmenter_weights)
        done = f" ({len(sources)} prepared before and kept in {parts.folder})" if sources else ""
        heimed = f" (vessel targets of HEI-MED from {spec.name})" if any(n.startswith("heimed/") for n, _ in todo) else ""
        log(f"preparing {len(todo)} clean sources at {size}x{size}{done}{heimed}")  # (campaign 30a L6: said for DRIVE alone too)
        for n, info in todo:
            sources[n] = _prepare_one(n, info, size, (model, spec.threshold))
            if parts is not None:
                with _cache_written(cache):
                    parts.save(sources[n], keys[n])
    out = [sources[n] for n, _ in wanted]
    if cache is not None and len(wanted) == len(listing):  # every source: one file, read in one go next time
        with _cache_written(cache):
            _write_cache(cache, out, digest)
        parts.remove()
    return out


@contextlib.contextmanager
def _cache_written(cache: Path):
    """A --cache (or its parts folder) that cannot be written is one line, exit 1 (it was an internal error to
    report: a FileNotFoundError under /proc; campaign 30a M4); a full disk stops the run as it does elsewhere."""
    from fundus_pipeline.errors import DiskFullError, FundusError, no_space

    try:
        yield
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(cache) else ""
        full = no_space(e.errno)
        raise (DiskFullError if full else FundusError)(
            f"cannot write --cache {cache}{where}: {e.strerror or e}",
            "free space (or raise the file-size limit, ulimit -f), then run the command again (the sources prepared so far are kept)" if full else "choose a --cache in a folder this run can write",
        ) from None


def _write_cache(cache: Path, out: list[Source], digest: str) -> None:
    """Every prepared source in one file, written atomically."""
    meta = [{"name": s.name, "disc": list(s.disc), "vessels_kind": s.vessels_kind, "disc_kind": s.disc_kind} for s in out]
    cache.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temporaries(cache.parent, f".{cache.name}.*.tmp.npz")  # a killed run's (about 4 MB a source at 512)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp.npz")
    np.savez(
        tmp, digest=np.array(digest), meta=np.array(json.dumps(meta)),
        rgb=np.stack([s.rgb for s in out]), fov=np.stack([s.fov for s in out]),
        vessels=np.stack([s.vessels for s in out]),
    )  # fmt: skip
    tmp.replace(cache)


class _SourceParts:
    """One prepared source a file (``NAME.KEY.npz``, written atomically) in a folder next to the cache."""

    def __init__(self, folder: Path):
        self.folder = folder

    def _path(self, name: str, key: str) -> Path:
        return self.folder / f"{name.replace('/', '__')}.{key}.npz"

    def load(self, name: str, key: str) -> Source | None:
        try:
            with np.load(self._path(name, key), allow_pickle=False) as z:
                m = json.loads(str(z["meta"]))
                return Source(name, z["rgb"], z["fov"], z["vessels"], tuple(m["disc"]), m["vessels_kind"], m["disc_kind"])
        except (EOFError, ValueError, KeyError, OSError, zipfile.BadZipFile):  # absent, or cut short: prepared again
            return None

    def save(self, s: Source, key: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = s.name.replace("/", "__")
        for old in self.folder.glob(f"{stem}.*.npz"):  # another key of this source (the data or options changed)
            if not old.name.endswith(".tmp.npz"):
                old.unlink(missing_ok=True)
        _remove_dead_temporaries(self.folder, f"{stem}.*.tmp.npz")
        tmp = self.folder / f"{stem}.{os.getpid()}.tmp.npz"
        meta = {"disc": list(s.disc), "vessels_kind": s.vessels_kind, "disc_kind": s.disc_kind}
        np.savez(tmp, meta=np.array(json.dumps(meta)), rgb=s.rgb, fov=s.fov, vessels=s.vessels)
        tmp.replace(self._path(s.name, key))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _remove_dead_temporaries(folder: Path, pattern: str) -> None:
    """The ``NAME.PID.tmp.npz`` files matching ``pattern`` whose writer is gone (killed while it wrote); a
    live process's (another run sharing the cache) are left alone."""
    from fundus_pipeline.chain import pid_alive

    for old in folder.glob(pattern):
        pid = old.name.split(".")[-3]
        if not (pid.isdigit() and pid_alive(int(pid))):
            old.unlink(missing_ok=True)


def _cache_digest(size: int, listing: list[tuple[str, dict]], file_sha: Callable[[Path], str], seg_sha: str) -> str:
    return hashlib.sha256(json.dumps([size, _sources_fingerprint(listing, file_sha), seg_sha]).encode()).hexdigest()[:16]


def _sources_fingerprint(listing: list[tuple[str, dict]], file_sha: Callable[[Path], str]) -> str:
    """What the prepared sources are made of: each source's name, table row (HEI-MED's disc position) and the
    bytes of every file it reads (photograph, masks). A cache made from another data folder, or from files
    changed since, is prepared again (it was keyed on the names alone and loaded silently)."""
    h = hashlib.sha256()
    for name, info in listing:
        h.update(json.dumps([name, info.get("row")], sort_keys=True, default=str).encode())
        for role, path in sorted(info["paths"].items()):
            if path is not None and Path(path).is_file():
                h.update(f"{role}:{file_sha(path)}".encode())
    return h.hexdigest()


def resolve_segmenter() -> Path:
    from fundus_pipeline.models.weights import resolve_weights

    return resolve_weights(SEGMENTER)


# ------------------------------------------------------------------------------------------- degrading
class DegradationPool:
    """The degradations the enhancer meets in training: released and training-time Cofe-Net types
    001..111 and the clinical recipes, the three families equally likely unless ``weights``
    (relative, one per family) say otherwise; a member is drawn uniformly within its family."""

    def __init__(self, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)):
        from degradation import cofe_degrader, load_recipe

        self.families = [
            [cofe_degrader("released", c) for c in CODES],
            [cofe_degrader("training", c) for c in CODES],
            [load_recipe(r) for r in RECIPES],
        ]
        w = np.asarray(weights, dtype=np.float64)
        self.cumulative = None if np.all(w == w[0]) else np.cumsum(w / w.sum())

    def draw(self, rng: np.random.Generator):
        if self.cumulative is None:  # equal weights: the original draw, so earlier runs replay bit for bit
            fam = self.families[int(rng.integers(len(self.families)))]
        else:
            i = int(np.searchsorted(self.cumulative, rng.random(), side="right"))
            fam = self.families[min(i, len(self.families) - 1)]
        return fam[int(rng.integers(len(fam)))]


def degrade_with_params(degrader, rgb: np.ndarray, fov: np.ndarray, seed: int, key: str) -> tuple[np.ndarray, dict]:
    """``rgb`` (canonical, float32) degraded with parameters drawn from (seed, key), and the parameter record."""
    from degradation import soft_fov_mask

    geom = canonical_fov_geometry(rgb.shape[0])
    params = degrader.sample(seed=seed, key=key, fov=geom)
    return degrader.apply(rgb, params, soft_fov_mask(fov, geom), levels=255).astype(np.float32), params


def degrade(degrader, rgb: np.ndarray, fov: np.ndarray, seed: int, key: str) -> np.ndarray:
    """``rgb`` (canonical, float32) degraded with parameters drawn from (seed, key)."""
    return degrade_with_params(degrader, rgb, fov, seed, key)[0]


def _orient(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    a = np.rot90(a, k, axes=(0, 1))
    return np.ascontiguousarray(a[:, ::-1] if flip else a)


def _orient_point(x: float, y: float, n: int, k: int, flip: bool) -> tuple[float, float]:
    for _ in range(k % 4):  # np.rot90 (counter-clockwise): new[i, j] = old[j, n-1-i]
        x, y = y, n - 1 - x
    if flip:
        x = n - 1 - x
    return x, y


class EnhanceSampler:
    """``batch(step)`` -> (degraded, clean, FOV, disc box, vessels): N x {3,3,1,1,1} x crop x crop float32."""

    def __init__(self, sources: list[Source], cfg: EnhanceConfig):
        self.sources = sources
        self.cfg = cfg
        self.pool = DegradationPool(cfg.family_weights)
        self.by_dataset: dict[str, list[int]] = {}
        for i, s in enumerate(sources):
            self.by_dataset.setdefault(s.name.split("/")[0], []).append(i)

    def sample(self, step: int, b: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        cfg = self.cfg
        datasets = sorted(self.by_dataset)
        ids = self.by_dataset[datasets[int(rng.integers(len(datasets)))]]
        s = self.sources[ids[int(rng.integers(len(ids)))]]
        k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
        n = s.rgb.shape[0]
        clean, fov, ves = _orient(s.rgb, k, flip), _orient(s.fov, k, flip), _orient(s.vessels, k, flip)
        disc = disc_box_mask(*_orient_point(*s.disc, n, k, flip), n)
        if rng.random() < cfg.clean_p:
            deg = clean
        else:
            deg = degrade(self.pool.draw(rng), clean, fov, cfg.seed, f"{step}/{b}")
        c = cfg.crop
        y0, x0 = int(rng.integers(n - c + 1)), int(rng.integers(n - c + 1))
        sl = (slice(y0, y0 + c), slice(x0, x0 + c))
        return deg[sl], clean[sl], fov[sl], disc[sl], ves[sl]

    def batch(self, step: int) -> Batch:
        rng = np.random.default_rng([self.cfg.seed, step])
        parts = [self.sample(step, b, rng) for b in range(self.cfg.batch_size)]
        deg, clean, fov, disc, ves = (np.stack([p[i] for p in parts]) for i in range(5))
        return (
            torch.from_numpy(deg.transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(clean.transpose(0, 3, 1, 2).copy()),
            torch.from_numpy(fov[:, None].astype(np.float32)),
            torch.from_numpy(disc[:, None].astype(np.float32)),
            torch.from_numpy(ves[:, None].astype(np.float32)),
        )


# ------------------------------------------------------------------------------------------------ loss
def segmenter_term(seg: nn.Module, out: torch.Tensor, clean: torch.Tensor, fov: torch.Tensor) -> torch.Tensor:
    """BCE, inside the FOV (mean over all pixels, as the vessel term), between the frozen segmenter's vessel
    logits on ``out`` and its vessel probability on ``clean``; gradients reach ``out`` only."""
    with torch.no_grad():
        target = torch.sigmoid(seg(clean * fov)[:, :1])
    bce = F.binary_cross_entropy_with_logits(seg(out * fov)[:, :1], target, reduction="none")
    return (bce * fov).mean()


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The 1-D Gaussian OpenCV's ``GaussianBlur`` uses for float images (``ksize = round(8 sigma + 1) | 1``)."""
    k = int(round(sigma * 8 + 1)) | 1
    x = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return (g / g.sum()).float()


def smooth_correction_torch(out: torch.Tensor, inp: torch.Tensor, fov: torch.Tensor, sigma: float) -> torch.Tensor:
    """``stages.enhance.smooth_correction`` on N x C x H x W tensors, differentiable: ``inp`` plus the
    correction ``out - inp`` Gaussian-low-passed inside ``fov`` (zero padding, normalised by the blurred FOV)."""
    g = gaussian_kernel(sigma).to(out.device, out.dtype)
    k = g.numel()

    def blur(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), padding=(0, k // 2), groups=c)
        return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), padding=(k // 2, 0), groups=c)

    return inp + blur((out - inp) * fov) / blur(fov).clamp_min(1e-3)


def enhance_loss(
    out: dict,
    batch: Batch,
    disc_weight: float,
    vessel_weight: float,
    seg: nn.Module | None = None,
    seg_weight: float = 0.0,
    deploy_sigma: float = 0.0,
) -> torch.Tensor:
    """Cofe-Net's loss (see the module docstring) on ``forward_train``'s outputs, plus ``seg_weight`` times
    the segmenter term when ``seg`` (the frozen segmenter) is given. With ``deploy_sigma`` > 0 the
    full-scale L1 terms and the segmenter term judge what ``fundus enhance`` writes with that correction
    low-pass (``smooth_correction_torch``) instead of the raw output; the half-scale term stays on the raw one."""
    deg, clean, fov, disc, ves = batch

    def pixel(o, b, r, d):
        return F.l1_loss(o * r, b * r) + disc_weight * F.l1_loss(o * d, b * d)

    full = out["out"] if deploy_sigma <= 0 else smooth_correction_torch(out["out"], deg, fov, deploy_sigma)
    loss = pixel(full, clean, fov, disc)
    if "out_half" in out:
        loss = loss + pixel(out["out_half"], F.avg_pool2d(clean, 2), F.avg_pool2d(fov, 2), F.avg_pool2d(disc, 2))
    if "vessel_logits" in out and vessel_weight > 0:
        bce = F.binary_cross_entropy_with_logits(out["vessel_logits"], ves, reduction="none")
        loss = loss + vessel_weight * (bce * fov).mean()
    if seg is not None and seg_weight > 0:
        loss = loss + seg_weight * segmenter_term(seg, full, clean, fov)
    return loss


# ------------------------------------------------------------------------------------------ validation
def psnr_in(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    mse = float(((a - b) ** 2)[mask].mean())
    return 10 * np.log10(1.0 / max(mse, 1e-12))


def validation_pairs(val: list[Source], seed: int) -> list[tuple[str, np.ndarray, Source]]:
    """(kind, degraded, source) for each validation source: released 111, moderate recipe, clean."""
    from degradation import cofe_degrader, load_recipe

    d111, moderate = cofe_degrader("released", "111"), load_recipe("moderate")
    pairs = []
    for s in val:
        pairs.append(("released111", degrade(d111, s.rgb, s.fov, seed, f"val/{s.name}"), s))
        pairs.append(("moderate", degrade(moderate, s.rgb, s.fov, seed, f"val/{s.name}"), s))
        pairs.append(("clean", s.rgb, s))
    return pairs


@torch.no_grad()
def enhance_canonical(model: nn.Module, rgb: np.ndarray, device) -> np.ndarray:
    """The network's output for one canonical frame (``fundus enhance``'s forward, ``stages.enhance.run_network``)."""
    from fundus_pipeline.stages.enhance import run_network

    return run_network(model, [rgb], device)[0]


def vessel_f1(seg: nn.Module, threshold: float, rgb: np.ndarray, s: Source, device) -> float:
    """F1 inside the FOV of the frozen segmenter's map of ``rgb`` (canonical, at ``threshold``) against the
    source's vessel target (>= 0.5)."""
    from fundus_pipeline.evaluation.metrics import binary_metrics, confusion

    x = torch.from_numpy(np.ascontiguousarray((rgb * s.fov[..., None]).transpose(2, 0, 1)))[None].to(device)
    prob = torch.sigmoid(seg(x)[0, 0].float()).cpu().numpy()
    return binary_metrics(*confusion(prob, s.vessels >= 0.5, s.fov, threshold))["f1"]


def _means(per: dict[str, list[float]], prefix: str) -> dict[str, float]:
    return {f"{prefix}_{k}": round(float(np.mean(v)), 4) for k, v in per.items()}


def validate(
    model: nn.Module, pairs, device, seg: tuple[nn.Module, float] | None = None, input_f1: dict | None = None, sigma: float = 0.0
) -> dict:
    """Mean PSNR per kind of pair (and of the inputs); with ``seg`` (the frozen segmenter and its threshold),
    the mean vessel F1 too (``input_f1``: the inputs' figures, computed once by ``input_vessel_f1``). With
    ``sigma`` > 0 the outputs are what ``fundus enhance`` writes with that correction low-pass."""
    from fundus_pipeline.stages.enhance import smooth_correction

    per: dict[str, list[float]] = {}
    base: dict[str, list[float]] = {}
    f1: dict[str, list[float]] = {}
    for kind, deg, s in pairs:
        out = np.clip(smooth_correction(deg, enhance_canonical(model, deg, device), s.fov, sigma), 0, 1) * s.fov[..., None]
        per.setdefault(kind, []).append(psnr_in(out, s.rgb, s.fov))
        if kind != "clean":
            base.setdefault(kind, []).append(psnr_in(deg, s.rgb, s.fov))
        if seg is not None:
            f1.setdefault(kind, []).append(vessel_f1(*seg, out, s, device))
    res = {f"psnr_{k}": round(float(np.mean(v)), 3) for k, v in per.items()}
    res.update({f"psnr_input_{k}": round(float(np.mean(v)), 3) for k, v in base.items()})
    res["psnr"] = round(float(np.mean([np.mean(v) for k, v in per.items() if k != "clean"])), 3)
    if seg is not None:
        res.update(_means(f1, "f1"))
        res.update(input_f1 or {})
        res["vessel_f1"] = round(float(np.mean([np.mean(v) for k, v in f1.items() if k != "clean"])), 4)
    return res


@torch.no_grad()
def input_vessel_f1(pairs, device, seg: tuple[nn.Module, float]) -> dict[str, float]:
    """The segmenter's mean vessel F1 on the validation inputs, per kind of pair (``f1_input_KIND``)."""
    f1: dict[str, list[float]] = {}
    for kind, deg, s in pairs:
        f1.setdefault(kind, []).append(vessel_f1(*seg, deg, s, device))
    return _means(f1, "f1_input")


def frozen_segmenter(device) -> tuple[nn.Module, float]:
    """The shipped segmenter (``SEGMENTER``) in eval mode with no gradients of its own, and its threshold."""
    from fundus_pipeline.models.weights import load_model

    with torch.random.fork_rng(devices=[]):  # building it draws from torch's RNG: the run's stream stays as seeded
        model, spec = load_model(resolve_segmenter())
    model.eval().requires_grad_(False).to(device)
    return model, float(spec.threshold)


class EnhanceTask(Task):
    """Fundus enhancement; best.pt is chosen on the mean validation PSNR inside the FOV over the degraded pairs,
    or with ``--select vessel_f1`` on the frozen segmenter's mean vessel F1 over them."""

    name = "enhance"
    score_key = "psnr"  # or "vessel_f1" (--select), set per run in __init__
    cfg: EnhanceConfig

    def __init__(self, cfg: EnhanceConfig):
        super().__init__(cfg)
        self.score_key = cfg.select
        self.seg: tuple[nn.Module, float] | None = None

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg.arch)
        rsa = getattr(model, "rsa", None)
        if rsa is not None and self.cfg.rsa_init is not None and self.cfg.init is None and not self.cfg.resume:
            from fundus_pipeline.models.weights import load_weights_checked, resolve_weights

            load_weights_checked(rsa, resolve_weights(self.cfg.rsa_init), "imff", option="--rsa-init")
        return model

    def setup(self, log: Callable[[str], None]) -> None:
        cfg = self.cfg
        sources = prepare_sources(cfg.data_root, cfg.size, resolve_segmenter(), cfg.cache_path, log, cfg.datasets)
        train, val = split_sources(sources)
        located = [s for s in sources if s.disc_kind == "located"]
        log(f"train {len(train)} sources, val {len(val)} ({', '.join(s.name for s in val[:7])}, ...); discs located on {len(located)}")
        self.pairs = validation_pairs(val, VAL_SEED)
        self.sampler = EnhanceSampler(train, cfg)
        self.input_f1: dict | None = None

    def _segmenter(self, device) -> tuple[nn.Module, float]:
        if self.seg is None:
            self.seg = frozen_segmenter(device)
        return self.seg

    def loss(self, out: dict, batch: Batch) -> torch.Tensor:
        seg = self._segmenter(batch[0].device)[0] if self.cfg.seg_weight > 0 else None
        cfg = self.cfg
        return enhance_loss(out, batch, cfg.disc_weight, cfg.vessel_weight, seg, cfg.seg_weight, cfg.deploy_sigma)

    def validate(self, model: nn.Module, device: torch.device) -> dict:
        seg = self._segmenter(device)
        if self.input_f1 is None:
            self.input_f1 = input_vessel_f1(self.pairs, device, seg)
        return validate(model, self.pairs, device, seg, self.input_f1, self.cfg.deploy_sigma)


def train(cfg: EnhanceConfig) -> dict:
    return fit(EnhanceTask(cfg), cfg)


# --------------------------------------------------------------------------------------- weights export
TRAIN_PARTS = {"drive": "DRIVE training 21-36", "hrf": "HRF training 01-04 of each class", "heimed": "HEI-MED (152 of 169 photographs)"}
VAL_PARTS = {"drive": "DRIVE 37-40", "hrf": "HRF 05_h/05_g/05_dr", "heimed": "every 10th HEI-MED photograph (17)"}


def export_description(transfer_selection: dict, config: dict | None = None) -> Callable[[nn.Module], dict]:
    """The enhancement-specific parts of a weights manifest entry (``export_weights``'s ``describe``):
    the canonical-frame input contract, the image output with the transfer rule chosen by
    ``scripts/choose_transfer.py`` (its JSON is ``transfer_selection``), the data split, the loss and the
    checkpoint rule, from the run's ``config`` (summary.json's; defaults where it is not given)."""
    config = {**{k: f.default for k, f in EnhanceConfig.model_fields.items() if not f.is_required()}, **(config or {})}
    size = int(config["size"])
    selection = {"psnr": "best checkpoint by mean PSNR inside the FOV over the degraded pairs", "vessel_f1": "best checkpoint by mean vessel F1 of the frozen imff segmenter over the degraded pairs"}[config["select"]]
    loss = f"FOV-masked L1 at both scales + {config['disc_weight']:g} x L1 in the optic-disc box + {config['vessel_weight']:g} x BCE of the structure branch's vessel map"
    if config["seg_weight"] > 0:
        loss += f" + {config['seg_weight']:g} x BCE between the frozen imff segmenter's vessel maps of the output and of the clean image"
    if float(config.get("deploy_sigma") or 0) > 0:
        loss += f"; the full-scale terms judge the input plus the correction low-passed at sigma {float(config['deploy_sigma']):g} px (what fundus enhance writes)"
        selection += " of that low-passed output"
    if config.get("init"):
        loss += f"; initialised from {Path(config['init']).name}"
    datasets = [d for d in TRAIN_PARTS if d in config["datasets"]]
    weights = [float(w) for w in config["family_weights"]]
    families = "released and training-time Cofe-Net types 001-111 and the mild/moderate/severe recipes"
    if len(set(weights)) > 1:
        families += " (the three families drawn in the ratio " + ":".join(f"{w:g}" for w in weights) + ")"

    def describe(model: nn.Module) -> dict:
        return {
            "input": {
                "channels": 3,
                "color": "rgb",
                "value_range": [0, 1],
                "normalisation": "none (RGB divided by the bit depth's maximum); 0 outside the FOV",
                "size_divisor": int(model.size_divisor),
                "scale_policy": {
                    "type": "canonical_frame",
                    "size": size,
                    "rule": "the FOV's bounding square (side = FOV diameter, centred on the FOV, black where it leaves the photograph) resized to size x size, area averaging when shrinking",
                },
            },
            "output": {"kind": "image", "activation": OUTPUT_RULES[getattr(model, "output", "logit")], "transfer": transfer_selection["choice"], "transfer_selection": transfer_selection},
            "training": {
                "data": "clean sources degraded on the fly: " + ", ".join(TRAIN_PARTS[d] for d in datasets) + "; " + families + f"; {100 * float(config['clean_p']):g}% left clean",
                "validation": ", ".join(VAL_PARTS[d] for d in datasets) + f", each degraded with released 111 and moderate (seed 0) and left clean; {selection}",
                "loss": loss,
                "test_never_used": "DRIVE 01-20, HRF 06-15",
            },
        }

    return describe
