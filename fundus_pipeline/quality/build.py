"""``fundus build quality-set``: an EFID-like set of (degraded, enhanced) pairs, each with a hidden clean
original and a label that means something for the retina (``fundus_pipeline.quality.label``).

Parts and sources (never mixed): ``train`` = DRIVE 21-40, HRF 01-05 of each class and the 169 HEI-MED
photographs (its ``split`` column marks the validation sources used for checkpoint choice: DRIVE 37-40,
HRF 05_*, every 10th HEI-MED photograph, as in ``fundus train enhance``); ``test`` = DRIVE 01-20 and HRF
06-15 of each class.

Every source is mapped once into the canonical frame (the FOV's bounding square resized to ``size``; 512:
DRIVE's own scale) and quantised to 8 bits: that frame is the set's native resolution, where images are
written and labels computed. Per source, ``draws`` degradations, each of one family in turn (released
Cofe-Net types, training-time Cofe-Net types, clinical recipes; the first family rotates with the
source), the type or recipe and all parameters drawn from (seed, source, draw); each degraded image is
enhanced by every enhancer (8-bit output, 0 outside the FOV) and labelled.

Layout of OUT:
    manifest.json         options, label definition, enhancers (weights sha256), segmenter, counts
    pairs.csv             one row per pair: key, part, split, source, dataset, degraded_key, degradation,
                          family, enhancer, enhancer_kind, seed, label, ssim, f1, and the degradation's
                          own severity (deg_ssim, deg_f1, deg_label: the label of the degraded image itself)
    degradations.jsonl    the parameter record of every degraded image (replayable with ``degradation``)
    PART/clean/SRC.png, PART/degraded/DKEY.png, PART/enhanced/KEY.png, PART/reference/KEY.png
                          (a hard link to the degraded image, so ``fundus score PART/enhanced OUT
                          --reference PART/reference`` pairs by key)
    rows/PART/SRC.json    per-source results, the sha256 of the data files the source was read from and the
                          size of every file written for it; a rerun skips finished sources (resume), builds
                          again one whose written files are missing or changed, and refuses one whose data
                          files changed (``--overwrite`` rebuilds the set)

Keys: source ``drive-21``, degraded ``drive-21__d0``, pair ``drive-21__d0__clahe``. The same options and
seed give the same bytes on the same platform and thread count (model enhancers and the segmenter run in
float32 on the CPU).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import time
import zlib
from pathlib import Path
from typing import Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fundus_pipeline.errors import UsageError

PARTS = ("train", "test")
CLASSICAL_ENHANCERS = ("identity", "clahe", "gamma", "unsharp", "denoise", "oversharpen", "blur", "colour_cast")
#: The shipped enhancement weights of the default set (the Cofe-Net, the default enhancer cofe_add_seg, the G-only
#: ablation, the U-Net baseline and the step-250 checkpoints of the last two); each must be listed in
#: weights/manifest.json.
MODEL_ENHANCERS = ("cofe", "cofe_add_seg", "cofe_g", "cofe_g_step250", "unet_enh", "unet_enh_step250")
DEFAULT_ENHANCERS = CLASSICAL_ENHANCERS + MODEL_ENHANCERS
FAMILIES = ("cofe-released", "cofe-training", "recipe")
CODES = ("001", "010", "011", "100", "101", "110", "111")
RECIPES = ("mild", "moderate", "severe")
COLUMNS = (
    "key", "part", "split", "source", "dataset", "degraded_key", "degradation", "family", "enhancer", "enhancer_kind",
    "seed", "label", "ssim", "f1", "deg_label", "deg_ssim", "deg_f1",
)  # fmt: skip


class QualitySetConfig(BaseModel):
    """Options of ``fundus build quality-set`` (recorded in the set's manifest; a resume needs the same)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(512, ge=64, le=2048)
    draws: int = Field(2, ge=1, le=20)
    seed: int = Field(2026, ge=0)
    enhancers: tuple[str, ...] = DEFAULT_ENHANCERS
    parts: tuple[Literal["train", "test"], ...] = PARTS
    limit: int | None = Field(None, ge=1)  # at most this many sources per dataset and part (quick builds, tests)
    segmenter: str = "imff"

    @field_validator("enhancers")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError("give one or more distinct enhancer names")
        return v


# ---------------------------------------------------------------------------------------------- sources
def part_sources(root: Path, part: str) -> list[tuple[str, dict]]:
    """(source name, {"paths": ...}) of a part, in a fixed order."""
    from fundus_pipeline.datasets import DRIVE_TEST, HRF_TEST, drive_paths, hrf_paths
    from fundus_pipeline.train.enhance import source_list

    if part == "train":
        return source_list(root)
    return [(f"drive/{i}", {"paths": drive_paths(root, i)}) for i in DRIVE_TEST] + [(f"hrf/{i}", {"paths": hrf_paths(root, i)}) for i in HRF_TEST]


def _limit(listing: list[tuple[str, dict]], limit: int | None) -> list[tuple[str, dict]]:
    if limit is None:
        return listing
    seen: dict[str, int] = {}
    out = []
    for name, info in listing:
        ds = name.split("/")[0]
        if seen.get(ds, 0) < limit:
            seen[ds] = seen.get(ds, 0) + 1
            out.append((name, info))
    return out


def source_key(name: str) -> str:
    """``drive/21`` -> ``drive-21``."""
    return name.replace("/", "-")


# ---------------------------------------------------------------------------------------------- degrading
def draw_degrader(name: str, draw: int, seed: int):
    """(degrader, degradation label, family) of draw ``draw`` of source ``name``: the family rotates with the
    draw from a per-source start; the type (or recipe) is drawn from (seed, source, draw)."""
    from degradation import cofe_degrader, load_recipe

    h = zlib.crc32(name.encode())
    family = FAMILIES[(h + draw) % len(FAMILIES)]
    rng = np.random.default_rng([seed, h, draw])
    if family == "recipe":
        r = RECIPES[int(rng.integers(len(RECIPES)))]
        return load_recipe(r), f"recipe-{r}", f"recipe-{r}"
    preset = family.split("-")[1]
    code = CODES[int(rng.integers(len(CODES)))]
    return cofe_degrader(preset, code), f"{preset}-{code}", family


# ---------------------------------------------------------------------------------------------- enhancers
class SetEnhancer:
    """An enhancer of the set, in the canonical frame: ``enh(rgb, fov) -> rgb`` (float32, 0 outside the FOV).
    Classical ones from ``fundus_pipeline.classical``; model ones are shipped enhancement weights, run on
    the canonical frame as ``fundus enhance`` runs them there."""

    def __init__(self, name: str, device: str = "cpu"):
        from fundus_pipeline.classical import CLASSICAL, HARMFUL

        self.name = name
        self.fn: Callable | None = CLASSICAL.get(name)
        self.sha256: str | None = None
        self.sigma = 0.0
        if self.fn is not None:
            self.kind = "harmful" if name in HARMFUL else "classical"
            return
        from fundus_pipeline.models.weights import load_manifest, load_model

        if load_manifest().get(name) is None:
            raise UsageError(
                f"unknown enhancer {name!r}: use {', '.join(CLASSICAL_ENHANCERS)} or a shipped enhancement weights name "
                "(see `fundus models`)"
            )
        from fundus_pipeline.stages.enhance import output_rules

        self.model, loaded = load_model(name, task="enhancement", device=device)
        self.sha256 = loaded.sha256
        self.sigma = output_rules(loaded.spec)[2]  # the weights' correction low-pass, as `fundus enhance` applies it
        self.kind = "model"
        self.device = device

    def __call__(self, rgb: np.ndarray, fov: np.ndarray) -> np.ndarray:
        if self.fn is not None:
            return self.fn(rgb, fov)
        from fundus_pipeline.stages.enhance import run_network, smooth_correction

        out = run_network(self.model, [rgb], self.device)[0]
        if self.sigma > 0:
            out = smooth_correction(rgb, out, fov > 0, self.sigma)
        return np.clip(out, 0, 1) * fov[..., None]

    def record(self) -> dict:
        return {"name": self.name, "kind": self.kind, **({"sha256": self.sha256} if self.sha256 else {}), **({"correction_sigma": self.sigma} if self.sigma else {})}


# ---------------------------------------------------------------------------------------------- writing
def quantise(rgb: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 (round half to even, as numpy rounds)."""
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def write_png(path: Path, u8: np.ndarray, written: list[Path] | None = None) -> None:
    """Write ``u8`` to ``path`` atomically; ``written`` (a source's list) records the path, so a rebuild removes
    exactly what the set wrote."""
    from fundus_pipeline.io import write_image_atomic

    if written is not None:  # before the write: a kill after it leaves no file that no record names
        written.append(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image_atomic(path, u8)


def _link(target: Path, link: Path, written: list[Path] | None = None) -> None:
    """``link`` as a hard link to ``target`` (a copy where hard links are not possible), replacing atomically."""
    if written is not None:  # (as write_png)
        written.append(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        tmp.write_bytes(target.read_bytes())
    os.replace(tmp, link)


def write_json_atomic(path: Path, obj) -> None:
    from fundus_pipeline.io import write_bytes_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


# ---------------------------------------------------------------------------------------------- building
def config_digest(cfg: QualitySetConfig, enhancers: list[SetEnhancer], segmenter_sha: str) -> str:
    payload = json.dumps([cfg.model_dump(mode="json"), [e.record() for e in enhancers], segmenter_sha], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_source(
    name: str, info: dict, part: str, split: str, cfg: QualitySetConfig, enhancers: list[SetEnhancer], mapper, out: Path,
    written: list[Path] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Build every pair of one source; returns (pair rows, degradation records). Each file written is appended
    to ``written``."""
    from fundus_pipeline.quality.label import quality_label
    from fundus_pipeline.stages.base import Fov
    from fundus_pipeline.train.enhance import canonical_source, degrade_with_params

    src = source_key(name)
    cs = canonical_source(info["paths"], cfg.size)
    clean_u8 = quantise(cs.c_rgb)
    clean = clean_u8.astype(np.float32) / 255.0
    write_png(out / part / "clean" / f"{src}.png", clean_u8, written)
    fov = Fov.estimate(clean)  # the label's FOV: the clean image's, by the project's FOV code
    ves_clean = mapper(clean, fov)
    rows, records = [], []
    for d in range(cfg.draws):
        degrader, degradation, family = draw_degrader(name, d, cfg.seed)
        dkey = f"{src}__d{d}"
        deg, params = degrade_with_params(degrader, clean, cs.c_fov, cfg.seed, dkey)
        deg_u8 = quantise(deg)
        deg = deg_u8.astype(np.float32) / 255.0
        dpath = out / part / "degraded" / f"{dkey}.png"
        write_png(dpath, deg_u8, written)
        records.append({"degraded_key": dkey, "part": part, "source": name, "degradation": degradation, "params": params})
        deg_q = quality_label(deg, clean, fov.mask, mapper(deg, fov), ves_clean)
        for enh in enhancers:
            key = f"{dkey}__{enh.name}"
            e_u8 = quantise(enh(deg, cs.c_fov))
            e = e_u8.astype(np.float32) / 255.0
            write_png(out / part / "enhanced" / f"{key}.png", e_u8, written)
            _link(dpath, out / part / "reference" / f"{key}.png", written)
            q = quality_label(e, clean, fov.mask, mapper(e, fov), ves_clean)
            rows.append({
                "key": key, "part": part, "split": split, "source": name, "dataset": name.split("/")[0], "degraded_key": dkey,
                "degradation": degradation, "family": family, "enhancer": enh.name, "enhancer_kind": enh.kind, "seed": cfg.seed,
                "label": q["label"], "ssim": q["ssim"], "f1": q["f1"],
                "deg_label": deg_q["label"], "deg_ssim": deg_q["ssim"], "deg_f1": deg_q["f1"],
            })  # fmt: skip
    return rows, records


def csv_text(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    """``rows`` as CSV text with these columns (floats with 6 decimals)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{r[k]:.6f}" if isinstance(r[k], float) else r[k]) for k in columns})
    return buf.getvalue()


#: What a set writes besides its images: the tables and the manifest. Removed before anything is built, so a
#: build cut short is never taken for a finished set (its manifest is written last).
SET_FILES = ("manifest.json", "pairs.csv", "labels.csv", "degradations.jsonl")


def _unfinish(out: Path) -> None:
    for name in SET_FILES:
        (out / name).unlink(missing_ok=True)


def _source_files(res: dict, done: Path) -> dict[str, int]:
    """The files a finished source wrote (path relative to the set: size); a record from before they were kept
    is refused, since a rebuild could not tell the set's files from others."""
    files = res.get("files")
    if not isinstance(files, dict):
        raise UsageError(
            f"{done} was written by an earlier version of fundus (before 2026-12-04), which did not record the files "
            "of each source", "delete the set's folder and build it again (or build into a new folder)",
        )
    return files


def _read_record(done: Path, rows: bool = True) -> dict | None:
    """A source's record (``rows/PART/SRC.json``; with ``rows=False`` also the grade set's list of not-fundus
    pictures, ``rows/natural/PART.json``), or None when it is not one: cut short outside fundus, or not a record
    at all (such a source is built again; its files are rewritten)."""
    try:
        res = json.loads(done.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(res, dict):
        return None
    ok = isinstance(res.get("rows"), list) and isinstance(res.get("records", []), list) if rows else "rows" in res or "files" in res
    return res if ok else None


def _inside(out: Path, rel: str) -> Path | None:
    """``out / rel`` when ``rel`` is a plain relative path (a record naming ``../x`` or ``/x`` is not trusted)."""
    from pathlib import PurePosixPath

    p = PurePosixPath(str(rel))
    if p.is_absolute() or not p.parts or ".." in p.parts:
        return None
    return out / p


def _remove_files(out: Path, rel_paths) -> None:
    """Remove these files of the set (never anything outside ``out``), then the folders they leave empty."""
    from fundus_pipeline.errors import InputError
    from fundus_pipeline.runner import check_inside

    dirs = set()
    for rel in rel_paths:
        path = _inside(out, rel)
        if path is None:
            continue
        # a file of the set's own folders: not one reached through a symbolic link below OUT (the check every
        # output write makes), nor a folder a damaged record names (review 22 L4: the first removed a file
        # elsewhere, the second was an internal error)
        try:
            check_inside(out, rel)
            if not (path.is_dir() and not path.is_symlink()):
                path.unlink(missing_ok=True)
        except (InputError, OSError):
            continue
        dirs.update(p for p in path.parents if out in p.parents)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:  # not empty (files that are not the set's) or gone
            pass


class SourceFiles(list):
    """A source's list of the files it writes (``build_one``'s ``written``), each also appended to
    ``rows/PART/SRC.partial`` before it is written: a source cut short by a kill leaves a record of its files,
    which ``clear_set`` removes (campaign 23a M1: ``--overwrite`` with other options had kept them, and a stray
    pair that no table lists was scored with the set)."""

    def __init__(self, out: Path, journal: Path):
        super().__init__()
        self.out, self.journal = out, journal
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(journal, "a", encoding="utf-8")

    def append(self, path: Path) -> None:
        self.file.write(Path(path).relative_to(self.out).as_posix() + "\n")
        self.file.flush()
        super().append(path)

    def finish(self) -> None:
        """The source's record is written: the journal is no longer needed."""
        self.file.close()
        self.journal.unlink(missing_ok=True)


def clear_set(out: Path) -> None:
    """Remove what a set in ``out`` wrote, and only that: the files each ``rows/PART/SRC.json`` lists, those
    records, the files a source cut short named in its ``rows/PART/SRC.partial``, ``rows/config.json``, the
    tables and the manifest. Other files in ``out`` are left alone."""
    listed = []
    for done in sorted((out / "rows").glob("*/*.json")):  # all checked before anything is removed
        res = _read_record(done, rows=False)
        if res is not None:
            listed.append((done, _source_files(res, done)))
    for partial in sorted((out / "rows").glob("*/*.partial")):
        try:
            names = [line for line in partial.read_text(encoding="utf-8", errors="surrogateescape").splitlines() if line]
        except OSError:
            names = []
        listed.append((partial, names))
    _unfinish(out)
    for done, files in listed:
        _remove_files(out, files)
    _remove_files(out, [done.relative_to(out).as_posix() for done, _ in listed] + ["rows/config.json"])


@contextlib.contextmanager
def claim_set(out: Path, digest: str, cfg: BaseModel, overwrite: bool, what: str, threads: int | None = None):
    """``open_set`` under a lock on ``OUT/.fundus-lock`` held while the block builds the set: a second build into OUT
    (an ``--overwrite`` one among them) while one runs is refused (exit 2), where both ran and left a "finished"
    set naming images the other had removed (campaign 30a H1). OUT is created when missing; a build refused by
    ``open_set`` leaves nothing behind that it made (the lock file, a folder it created)."""
    from fundus_pipeline.errors import FundusError
    from fundus_pipeline.runner import LOCK, OutputLock

    new = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FundusError(f"cannot write the {what} into {out}: {e.strerror or e}") from None
    lock, refused = OutputLock(out, out), False
    try:
        with lock:
            try:
                open_set(out, digest, cfg, overwrite, what, threads)
            except FundusError:
                refused = True
                if lock.created:  # removed while held: a build that opened it meanwhile is refused, never let in
                    (out / LOCK).unlink(missing_ok=True)
                raise
            yield
    except FundusError:
        refused = refused or not (out / "rows" / "config.json").exists()
        raise
    finally:
        if refused and new:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty


def open_set(out: Path, digest: str, cfg: BaseModel, overwrite: bool, what: str, threads: int | None = None) -> None:
    """Claim ``out`` for a set built with ``digest`` on ``threads`` CPU threads: resume one built with the same
    options, refuse one built with others, refuse a non-empty folder that holds no set. With ``overwrite``, what
    an earlier set wrote there is cleared (``clear_set``: only its files) and the set is built again from nothing.
    A set is rebuilt bit for bit only on the thread count it was built with, so a rerun that would finish it on
    another is refused too (its manifest would record one count for sources built on two)."""
    from fundus_pipeline.runner import LOCK

    state = out / "rows" / "config.json"
    if overwrite:
        if out.is_dir():
            clear_set(out)  # also without rows/config.json: its source records would otherwise be kept as finished
    elif state.is_file():
        try:
            recorded = json.loads(state.read_text())
        except (ValueError, UnicodeDecodeError):
            recorded = {}
        recorded = recorded if isinstance(recorded, dict) else {}
        before, was = recorded.get("digest"), recorded.get("threads")
        if before != digest:
            raise UsageError(f"{out} holds a set built with other options or weights, or another kind of set than this {what}; "
                             "pass --overwrite to rebuild it")
        if was is not None and threads is not None and was != threads:
            raise UsageError(f"{out} holds a {what} built (or being built) with --threads {was}; finish it with --threads {was} "
                             "(the thread count changes the bytes of some images), or pass --overwrite to rebuild it")
    elif out.exists() and any(p.name != LOCK for p in out.iterdir()):  # (the lock claim_set holds)
        raise UsageError(f"{out} is not empty and holds no {what}; choose an empty folder or pass --overwrite")
    try:
        write_json_atomic(state, {"digest": digest, "config": cfg.model_dump(mode="json"), "threads": threads})
    except OSError as e:  # a read-only or full OUT: one line, not an internal error to report (campaign 23a L3)
        from fundus_pipeline.errors import FundusError

        raise FundusError(f"cannot write the {what} into {out}: {e.strerror or e}") from None


def source_inputs(root: Path, name: str, info: dict) -> dict[str, str]:
    """What a source is read from: each data file's path (relative to the data root) and sha256, plus its table
    row (HEI-MED). Recorded with the source, so a rerun on other data, or on files changed since, is noticed."""
    from fundus_pipeline.models.weights import sha256_file

    found = {}
    for role, path in sorted(info["paths"].items()):
        if path is not None and Path(path).is_file():
            path = Path(path)
            rel = path.relative_to(root) if root in path.parents else path
            found[role] = f"{rel.as_posix()}:{sha256_file(path)}"
    if info.get("row") is not None:
        found["row"] = json.dumps(info["row"], sort_keys=True, default=str)
    return found


def build_parts(
    root: Path, out: Path, cfg, build_one: Callable[..., tuple[list[dict], list[dict]]], unit: str,
    log: Callable[[str], None],
) -> tuple[list[dict], list[dict], dict, dict]:
    """Run ``build_one(name, info, part, split, written) -> (rows, records)`` over every source of ``cfg.parts``
    (at most ``cfg.limit`` per dataset; ``written``: the list the builder appends each file it writes to).

    A source finished by an earlier run (``rows/PART/SRC.json``) is kept when its data files are the ones it was
    built from, its split is the one the data gives it now and every file it wrote is there with its size; one
    whose written files are missing or changed is built again. Data files that changed (another ``--data``
    holding other files, a photograph replaced), a source whose split changed, or a finished source the data no
    longer lists (a heimed.csv row removed) are refused before anything is built (``--overwrite`` rebuilds the
    set). Returns every row, every record, the counts per part (``unit``: what a row is, e.g. "pairs") and the
    manifest's record of the data (``data_record``)."""
    from fundus_pipeline.runner import outputs_intact
    from fundus_pipeline.train.enhance import validation_names

    def refuse(what: str) -> None:
        raise UsageError(f"{out} holds {what}; pass --overwrite to rebuild the set")

    plan = []
    for part in cfg.parts:
        every = part_sources(root, part)
        listing = _limit(every, cfg.limit)
        val = validation_names([n for n, _ in every]) if part == "train" else set()
        listed = {source_key(name) for name, _ in listing}
        gone = sorted(d.stem for d in (out / "rows" / part).glob("*.json") if d.stem not in listed and _read_record(d) is not None)
        if gone:
            refuse(f"{len(gone)} {part} source(s) that --data {root} no longer lists, e.g. {gone[0]}")
        for i, (name, info) in enumerate(listing):
            done = out / "rows" / part / f"{source_key(name)}.json"
            inputs = source_inputs(root, name, info)
            split = "test" if part == "test" else ("val" if name in val else "train")
            res = _read_record(done) if done.is_file() else None
            if res is not None:
                done.with_suffix(".partial").unlink(missing_ok=True)  # a kill between the record and its journal's removal (review 22 L5)
                files = _source_files(res, done)
                before = res.get("inputs") or {}
                if before != inputs:
                    changed = sorted(k for k in set(inputs) | set(before) if inputs.get(k) != before.get(k))
                    refuse(f"{name} built from other data than --data {root} holds now (changed: {', '.join(changed)})")
                if {r.get("split") for r in res["rows"]} - {split}:
                    refuse(f"{name} in another split than the data gives it now ({split}: the source list changed)")
                if not outputs_intact(out, {"outputs": [f for f in files if _inside(out, f)], "outputs_size": files}):
                    log(f"{part} {name}: some of its images are missing or changed; building it again")
                    res = None
            plan.append((part, i, len(listing), name, info, split, done, inputs, res))
    todo = [(part, name, info) for part, _, _, name, info, *_, res in plan if res is None]
    if todo:
        # every photograph to build is decoded and its FOV checked first: a cut or unreadable one is found now, not
        # after the parts before it were built (most of an hour; campaign 23a L2)
        from fundus_pipeline.train.enhance import read_source

        t0 = time.monotonic()
        for part, name, info in todo:
            read_source(info["paths"])
        log(f"checked the {len(todo)} source photograph(s) to build in {time.monotonic() - t0:.0f} s")
        _unfinish(out)  # the set changes: its tables and manifest are written again at the end
    if todo and len(todo) < len(plan):
        log(f"{len(plan) - len(todo)} of {len(plan)} sources were built by an earlier run and are kept; {len(todo)} to build")
    all_rows: list[dict] = []
    all_records: list[dict] = []
    started, built = time.monotonic(), 0
    for part, i, n, name, info, split, done, inputs, res in plan:
        if res is None:
            written = SourceFiles(out, done.with_suffix(".partial"))
            rows, records = build_one(name, info, part, split, written)
            files = {p.relative_to(out).as_posix(): p.stat().st_size for p in written}
            res = {"rows": rows, "records": records, "inputs": inputs, "files": files}
            write_json_atomic(done, res)
            written.finish()
            built += 1
            took = time.monotonic() - started
            log(f"{part} {i + 1}/{n} {name}: {len(rows)} {unit} ({_minutes(took)} so far, about {_minutes(took / built * (len(todo) - built))} left)")
        all_rows += res["rows"]
        all_records += res.get("records", [])
    counts: dict[str, dict[str, int]] = {}
    for part in cfg.parts:
        c = counts.setdefault(part, {})
        c["sources"] = sum(p[0] == part for p in plan)
        c[unit] = sum(r["part"] == part for r in all_rows)
        for s in ("train", "val", "test"):
            k = sum(r["part"] == part and r["split"] == s for r in all_rows)
            if k:
                c[f"{unit}_{s}"] = k
    data = data_record(root, cfg, {(part, done.name): inputs for part, _, _, _, _, _, done, inputs, _ in plan})
    return all_rows, all_records, counts, data


def provenance() -> dict:
    """What a set's manifest records of the run that finished it: the code (version, git commit, dirty), the
    command line and the environment (versions, CPU); a set resumed across versions records the last (campaign
    23a L5: 0.1.0 covered every commit, so "bit for bit for the same code" could not be checked)."""
    import sys

    from fundus_pipeline.runner import environment
    from fundus_pipeline.train.loop import code_provenance

    return {"code": code_provenance(), "command": list(sys.argv), "environment": environment()}


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def data_record(root: Path, cfg, inputs: dict[tuple[str, str], dict]) -> dict:
    """The data a set was built from, for its manifest: the root and one sha256 over every source's files
    (``inputs``: each source's recorded inputs by part and record name, ``rows/PART/NAME``)."""
    import hashlib

    h = hashlib.sha256()
    for part in cfg.parts:
        for name in sorted(n for p, n in inputs if p == part):
            h.update(json.dumps([part, Path(name).stem, inputs[part, name]], sort_keys=True).encode())
    return {"root": str(root.resolve()), "sha256": h.hexdigest()}


def build_quality_set(
    root: Path, out: Path, cfg: QualitySetConfig, *, overwrite: bool = False, threads: int = 2, log: Callable[[str], None] = print
) -> dict:
    """Build (or resume) the quality set in ``out``; returns the manifest."""
    import torch

    from fundus_pipeline.quality.label import VesselMapper

    torch.set_num_threads(threads)
    enhancers = [SetEnhancer(n) for n in cfg.enhancers]
    mapper = VesselMapper(cfg.segmenter)
    digest = config_digest(cfg, enhancers, mapper.loaded.sha256)
    with claim_set(out, digest, cfg, overwrite, "quality set", threads):
        return _build_quality_set(root, out, cfg, threads, enhancers, mapper, digest, log)


def _build_quality_set(root: Path, out: Path, cfg: QualitySetConfig, threads: int, enhancers: list, mapper, digest: str,
                       log: Callable[[str], None]) -> dict:
    import torch

    from fundus_pipeline import __version__
    from fundus_pipeline.io import write_bytes_atomic
    from fundus_pipeline.quality.label import LABEL_DEFINITION

    def one(name: str, info: dict, part: str, split: str, written: list[Path]) -> tuple[list[dict], list[dict]]:
        return build_source(name, info, part, split, cfg, enhancers, mapper, out, written)

    all_rows, all_records, counts, data = build_parts(root, out, cfg, one, "pairs", log)

    write_bytes_atomic(out / "pairs.csv", csv_text(all_rows).encode())
    write_bytes_atomic(out / "degradations.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in all_records).encode())
    manifest = {
        "schema_version": 1,
        "kind": "fundus quality set",
        "fundus_version": __version__,
        "config": cfg.model_dump(mode="json"),
        "digest": digest,
        "data": data,
        "label": LABEL_DEFINITION,
        "resolution": f"the canonical frame: FOV bounding square resized to {cfg.size}x{cfg.size}, 8-bit RGB",
        "enhancers": [e.record() for e in enhancers],
        "segmenter": {"weights": mapper.loaded.name, "sha256": mapper.loaded.sha256, "threshold": mapper.threshold},
        "counts": counts,
        "torch": torch.__version__,
        "threads": threads,
        **provenance(),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
