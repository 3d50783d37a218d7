"""Training options as pydantic models: one definition gives the CLI its defaults and help texts and holds
every option check (``fundus train ...`` turns a failed check into a one-line ``UsageError``, exit 2).

``TrainConfig`` holds what the shared loop (``fundus_pipeline.train.loop``) needs; each task subclasses
it with its own options (``SegmentConfig``). This module imports neither torch nor the data code at import
time, so building the CLI stays fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from fundus_pipeline.config import MAX_THREADS
from fundus_pipeline.errors import FundusError, UsageError, WeightsError

C = TypeVar("C", bound="TrainConfig")


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


#: The options a training was started with (OUT/.fundus-train-start.json, written before its data is prepared): a
#: --resume of a run interrupted before its first last.pt starts it again with them (train/loop._restart_config).
START_RECORD = ".fundus-train-start.json"


class TrainConfig(BaseModel):
    """Options of the shared training loop. Checks that touch the file system run once, at construction."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Run folder: last.pt, best.pt, train.log and summary.json are written there.")
    steps: int = Field(5000, ge=1, le=100_000_000, description="Optimiser steps (the cosine learning-rate decay ends there).")
    batch_size: int = Field(8, ge=1, description="Training samples per step.")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="Adam learning rate at step 0 (cosine decay to 2%).")
    seed: int = Field(0, ge=0, le=2**64 - 1, description="Seed of the model initialisation and of every step's samples (0 to 2^64-1).")
    val_every: int = Field(250, ge=1, description="Validate every N steps (and at the last); the best score is kept as best.pt.")
    ckpt_every: int = Field(100, ge=1, description="Write the resumable checkpoint last.pt every N steps (and at the last).")
    threads: int = Field(0, ge=0, le=MAX_THREADS, description="Torch CPU threads (0 = torch's default).")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda or cuda:N.")
    amp: bool = Field(False, description="Mixed precision (float16 autocast + gradient scaling) on CUDA; CPU trains in float32.")
    init: Path | None = Field(None, description="Start from these weights (a state dict or a training checkpoint) instead of a random initialisation.")
    resume: bool = Field(False, description="Continue the run in OUT from its last.pt with the same options (only --threads, --device, --ckpt-every, --out, --cache where the command has it and, off CUDA, --amp may change); bit-exact on the same thread count and device. A run interrupted before its first last.pt starts again from step 0 with the options it was started with.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        from fundus_pipeline.device import resolve_device

        try:
            resolve_device(v)  # invalid names and CUDA requests without a GPU
        except UsageError as e:
            raise ValueError(e.message) from None
        return v

    @field_validator("init")
    @classmethod
    def _init(cls, v: Path | None) -> Path | None:
        if v is None:
            return v
        # missing or unreadable weights are exit 1, as for every command (README, Exit codes), not a usage error
        if not v.is_file():
            raise WeightsError(f"--init: {v}: no such weights file")
        from fundus_pipeline.models.weights import load_state_dict

        try:
            load_state_dict(v)  # refuses pickled modules; the key check against the architecture is the loop's
        except FundusError as e:
            raise WeightsError(f"--init: {e.message}", e.hint) from None
        return v

    @model_validator(mode="after")
    def _run_folder(self):
        last = self.out / "last.pt"
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file, not a folder")
        if self.resume and self.init is not None:
            raise ValueError("--resume continues OUT/last.pt; it cannot be combined with --init")
        if self.resume and not last.is_file():
            if (self.out / "summary.json").exists():  # review 21 L6: "start without --resume" was then refused too
                raise ValueError(f"--resume: {self.out} holds a finished run whose last.pt is gone; it cannot be continued: "
                                 "choose a new --out (--init OUT/best.pt starts from its weights)")
            # a training of fundus interrupted before its first last.pt (its lock file, train.log and start record are
            # there) starts again (train/loop._fit); another tool's train.log is no such run (review 32 R32-3)
            if not ((self.out / "train.log").is_file() and (self.out / ".fundus-lock").is_file()
                    and (self.out / START_RECORD).is_file()):
                raise ValueError(f"--resume: {last} does not exist (start without --resume)")
        # a run: last.pt, or a best.pt that no interrupted run of fundus left (one killed before its first last.pt
        # has train.log beside it, cannot be resumed, and starts again)
        if not self.resume and ((self.out / "last.pt").exists() or ((self.out / "best.pt").exists() and not (self.out / "train.log").exists())):
            raise ValueError(f"{self.out} already holds a training run; pass --resume to continue it or choose a new --out")
        if not self.resume and (self.out / "summary.json").exists():  # only a finished run writes it: its last.pt deleted
            # to save space, a new run had replaced its best.pt and summary.json (campaign 21b H2)
            raise ValueError(f"{self.out} holds a finished training run (summary.json); choose a new --out")
        cache = getattr(self, "cache", None)
        if cache is not None:
            check_cache_path(Path(cache))
        root = getattr(self, "data_root", None)  # the datasets are read, never written
        if root is not None:
            data = Path(root).resolve()
            for name, path in (("--out", self.out), ("--cache", getattr(self, "cache", None))):
                if path is not None and (Path(path).resolve() == data or data in Path(path).resolve().parents):
                    raise ValueError(f"{name} {path} lies inside the dataset root {root}; choose a folder outside it")
        for field in ("quality_set", "grade_set"):  # the set a run reads is read, never written (campaign 30a M2)
            folder = getattr(self, field, None)
            if folder is not None and (self.out.resolve() == Path(folder).resolve() or Path(folder).resolve() in self.out.resolve().parents):
                raise ValueError(f"--out {self.out} lies inside {option_name(field)} {folder}; choose a folder outside it (the set is only read)")
        return self

    @classmethod
    def from_options(cls: type[C], **options: Any) -> C:
        """Build and check the config; a failed check becomes one ``UsageError`` line naming the option."""
        try:
            return cls(**options)
        except ValidationError as e:
            raise config_error(e) from None

    def to_argv(self, always: frozenset[str] = frozenset()) -> list[str]:
        """The options that differ from their defaults, and those named in ``always`` even at their default, as
        command-line arguments (recorded in summary.json; a value of None is not an option)."""
        argv: list[str] = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if field.is_required() or value != field.default or name in always:
                if isinstance(value, bool):
                    argv += [option_name(name)] if value else []
                elif isinstance(value, tuple):
                    argv += [option_name(name), ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in value)]
                elif value is not None:
                    argv += [option_name(name), str(value)]
        return argv


def check_cache_path(cache: Path) -> None:
    """A ``--cache`` that exists is a source cache this project wrote (an .npz holding ``digest`` and ``meta``),
    or an empty file: anything else would be replaced by the cache (campaign 21b H1: ``--cache weights/imff.pt``
    had replaced the weights with 169 MB of prepared sources). Raises ValueError."""
    import zipfile

    if not cache.exists():
        return
    if not cache.is_file():
        raise ValueError(f"--cache {cache} is not a file")
    if cache.stat().st_size == 0:
        return
    try:
        with zipfile.ZipFile(cache) as z:
            names = set(z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        names, why = set(), type(e).__name__
        if _first_member(cache) == "digest.npy":  # a cache of ours cut short (its directory gone): prepared again
            return
    else:
        why = "no digest and meta in it"
    if not {"digest.npy", "meta.npy"} <= names:
        raise ValueError(f"--cache {cache} exists and is not a source cache of fundus ({why}); it would be replaced: "
                         "give another path, or remove the file")


def _first_member(path: Path) -> str | None:
    """The name in a zip file's first local header (``np.savez`` writes ``digest.npy`` first in a source cache):
    readable when the archive's directory at its end is cut off."""
    import struct

    try:
        with open(path, "rb") as f:
            head = f.read(30 + 64)
    except OSError:
        return None
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        return None
    n = struct.unpack("<H", head[26:28])[0]
    return head[30 : 30 + n].decode("utf-8", "replace") if 30 + n <= len(head) else None


def config_error(e: ValidationError) -> UsageError:
    """The first failed check as one line: ``--field: message``."""
    err = e.errors(include_url=False)[0]
    msg = str(err["msg"]).removeprefix("Value error, ").splitlines()[0]
    if err["loc"]:
        opt = option_name(str(err["loc"][0]))
        if not msg.startswith(opt) and not msg.startswith(f"invalid {opt}"):
            msg = f"{opt}: {msg}"
    return UsageError(msg)


class SegmentConfig(TrainConfig):
    """``fundus train segment``: the loop's options plus the vessel data pipeline's."""

    arch: str = Field("imff", description="Registered segmentation model (imff, imff_w8, msrf_w8, ...; see `fundus models`).")
    data: Path | None = Field(None, validate_default=True, description="Dataset root holding DRIVE/ and HRF/ [default: $FUNDUS_DATA, else ../shared/data].")
    patch: int = Field(128, ge=16, description="Training patch side in pixels (random rotation, scale and flip inside the FOV).")
    degrade_p: float = Field(0.0, allow_inf_nan=False, ge=0.0, le=1.0, description="Probability of drawing a patch from a degraded copy of its image.")
    degrade_copies: int = Field(5, ge=1, description="Degraded copies per training image (Cofe-Net presets and clinical recipes), used with --degrade-p.")

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return _check_arch(v, "segmentation")

    @field_validator("data")
    @classmethod
    def _data(cls, v: Path | None) -> Path | None:
        return _check_data(v, ("DRIVE", "HRF"))

    @property
    def data_root(self) -> Path:
        return _data_root(self.data)


def _check_arch(name: str, task: str) -> str:
    """A registered model of ``task`` (unknown names get suggestions)."""
    from fundus_pipeline.models.registry import get_entry

    try:
        entry = get_entry(name)
    except UsageError as e:
        raise ValueError(e.message) from None
    if entry.task != task:
        def article(noun: str) -> str:
            return "an" if noun[0] in "aeiou" else "a"

        raise ValueError(f"{name!r} is {article(entry.task)} {entry.task} model, not {article(task)} {task} model")
    return name


def _check_data(data: Path | None, required: tuple[str, ...]) -> Path | None:
    """The dataset root must hold the ``required`` dataset folders."""
    from fundus_pipeline.datasets import missing_datasets

    message = missing_datasets(_data_root(data), required)
    if message:
        raise ValueError(message)
    return data


def _data_root(data: Path | None) -> Path:
    from fundus_pipeline.datasets import default_data_root

    return data or default_data_root()


SOURCE_DATASETS = ("drive", "hrf", "heimed")  # the datasets of the clean training sources (``--datasets`` picks among them)


class SourcesConfig(TrainConfig):
    """Options of the tasks that read the clean canonical training sources (``train.enhance.prepare_sources``):
    the dataset root and the cache of the prepared sources."""

    data: Path | None = Field(None, validate_default=True, description="Dataset root holding DRIVE/, HRF/ and HEI-MED/ [default: $FUNDUS_DATA, else ../shared/data].")
    cache: Path | None = Field(None, description="File caching the prepared canonical training sources (shared by `fundus train enhance` and `pretext`; prepared again when the data files, the size or the segmenter differ; each source is kept as soon as it is prepared, in .NAME.parts next to it, until every source is there) [default: OUT/sources.npz].")

    @field_validator("data")
    @classmethod
    def _data(cls, v: Path | None) -> Path | None:
        return _check_data(v, ("DRIVE", "HRF", "HEI-MED"))

    @property
    def data_root(self) -> Path:
        return _data_root(self.data)

    @property
    def cache_path(self) -> Path:
        return self.cache or self.out / "sources.npz"


class EnhanceConfig(SourcesConfig):
    """``fundus train enhance``: the loop's options plus the enhancement data pipeline's and the loss weights."""

    arch: str = Field("cofe", description="Registered enhancement model (cofe, cofe_add, cofe_rsa_lqa, cofe_rsa, cofe_g, unet_enh; see `fundus models`).")
    size: int = Field(512, ge=64, description="Canonical frame side: the FOV's bounding square is resized to SIZE x SIZE (Cofe-Net: 512).")
    crop: int = Field(256, ge=32, description="Training crop side inside the canonical frame (a multiple of the model's size divisor).")
    clean_p: float = Field(0.1, allow_inf_nan=False, ge=0.0, le=1.0, description="Probability that a sample is left clean (the model must leave good photographs alone).")
    family_weights: tuple[float, float, float] = Field((1.0, 1.0, 1.0), description="Relative weights of the three degradation families a degraded sample is drawn from: released Cofe-Net types, training-time Cofe-Net types, clinical recipes (e.g. 2,1,1).")
    disc_weight: float = Field(10.0, allow_inf_nan=False, ge=0.0, description="Weight of the L1 term inside the optic-disc box (Cofe-Net: 10).")
    vessel_weight: float = Field(0.1, allow_inf_nan=False, ge=0.0, description="Weight of the structure branch's vessel BCE (Cofe-Net: 0.1).")
    rsa_init: str | None = Field("imff", description="Segmenter weights that initialise the structure branch of models with one: a shipped name or a .pt file ('none': random).")
    seg_weight: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="Weight of the segmenter term: BCE, inside the FOV, between the frozen shipped segmenter's vessel map of the output and its map of the clean image (0: off, Cofe-Net's loss).")
    datasets: tuple[str, ...] = Field(SOURCE_DATASETS, description="Source datasets that train and validate (comma-separated: drive, hrf, heimed; e.g. drive alone adapts the enhancer to one camera).")
    deploy_sigma: float = Field(0.0, ge=0.0, le=128.0, allow_inf_nan=False, description="Train what `fundus enhance` deploys: with S > 0 the full-scale L1 terms and the segmenter term judge the input plus the correction low-passed at sigma S px (the manifest's correction_sigma), and validation scores that image (0: the raw output, Cofe-Net's loss).")
    select: str = Field("psnr", description="Validation figure that chooses best.pt: psnr (mean PSNR over the degraded pairs) or vessel_f1 (mean vessel F1 of the frozen segmenter on the outputs, against each source's vessel target).")

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return _check_arch(v, "enhancement")

    @field_validator("family_weights", mode="before")
    @classmethod
    def _family_weights(cls, v):
        try:
            v = tuple(float(x) for x in (v.split(",") if isinstance(v, str) else v))
        except (TypeError, ValueError):
            raise ValueError(f"--family-weights must be three comma-separated numbers, not {v!r}") from None
        if len(v) != 3 or not all(math.isfinite(x) and x >= 0 for x in v) or sum(v) <= 0:
            raise ValueError(f"--family-weights must be three non-negative numbers with a positive sum, not {','.join(map(str, v))}")
        return v

    @field_validator("datasets", mode="before")
    @classmethod
    def _datasets(cls, v):
        names = tuple(x.strip().lower() for x in (v.split(",") if isinstance(v, str) else v) if x.strip())
        if not names or any(n not in SOURCE_DATASETS for n in names):
            raise ValueError(f"--datasets must name one or more of {', '.join(SOURCE_DATASETS)}, not {v if isinstance(v, str) else ','.join(v)!r}")
        return tuple(sorted(set(names), key=SOURCE_DATASETS.index))

    @field_validator("select")
    @classmethod
    def _select(cls, v: str) -> str:
        if v not in ("psnr", "vessel_f1"):
            raise ValueError(f"--select must be psnr or vessel_f1, not {v!r}")
        return v

    @field_validator("rsa_init")
    @classmethod
    def _rsa_init(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or v.lower() == "none":
            return None
        from fundus_pipeline.models.weights import resolve_weights

        try:
            resolve_weights(v)  # refused here when missing; resolved again where it is loaded
        except FundusError as e:  # exit 1 with its hint, as missing weights are for every command (17a F1)
            raise WeightsError(f"{option_name(info.field_name)}: {e.message}", e.hint) from None
        return v

    @model_validator(mode="after")
    def _crop(self):
        if self.crop > self.size:
            raise ValueError(f"--crop {self.crop} is larger than --size {self.size}")
        if self.crop % 32 or self.size % 32:
            raise ValueError("--crop and --size must be multiples of 32")
        return self


class PretextConfig(SourcesConfig):
    """``fundus train pretext``: the ViT stream of SDMP-Net, trained on a self-supervised pretext task."""

    arch: str = Field("vit_fundus", description="Registered pretext model (vit_fundus; see `fundus models`).")
    size: int = Field(448, ge=224, description="Side of the scoring frame the crops are taken from (the FOV's bounding square resized).")
    crop: int = Field(224, ge=224, le=224, description="Crop side (the ViT's input size, 224).")
    pool_draws: int = Field(6, ge=1, description="Degraded copies of each training source (drawn once, from the seed).")
    clean_p: float = Field(0.1, allow_inf_nan=False, ge=0.0, le=1.0, description="Probability that a sample is the clean source.")

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return _check_arch(v, "pretext")


class ScoreConfig(TrainConfig):
    """``fundus train score``: SDMP-Net (or an ablation) on the train split of a quality set."""

    arch: str = Field("sdmp", description="Registered quality model (sdmp, sdmp_nodeform, sdmp_cnn, sdmp_vit; see `fundus models`).")
    quality_set: Path = Field(description="A quality set folder (`fundus build quality-set`): its pairs.csv train split trains, val split validates.")
    size: int = Field(448, ge=224, description="Side of the scoring frame (the set's images are resized to it).")
    cnn_init: str | None = Field("imff", description="Segmenter weights whose encoder is the frozen CNN stream: a shipped name or a .pt file ('none': random).")
    vit_init: str | None = Field("vit_fundus", description="Pretext weights of the frozen ViT stream: a shipped name or a .pt file ('none': random).")
    val_stride: int = Field(1, ge=1, description="Validate on every N-th validation pair (validation costs five crops a pair).")
    select: str = Field("srocc", description="Validation figure that chooses best.pt: srocc (over all the validation pairs), srocc_camera_mean (the mean of the SROCCs of each camera's pairs, DRIVE, HRF and HEI-MED counting equally; the validation split is mostly HEI-MED pairs) or gate (the mean label that `fundus run`'s trust gate at --min-gain 0 delivers over the validation pairs: the enhanced image where score - score_input >= 0, else the input).")
    gain_weight: float = Field(0.0, ge=0.0, allow_inf_nan=False, description="Weight of a second loss term on the score gain over the input: MSE of (score - score_input) against (label - the input's label), the input scored against itself in the same pass; 0: off (the loss of earlier runs).")

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return _check_arch(v, "quality")

    @field_validator("select")
    @classmethod
    def _select(cls, v: str) -> str:
        if v not in ("srocc", "srocc_camera_mean", "gate"):
            raise ValueError(f"--select must be srocc, srocc_camera_mean or gate, not {v!r}")
        return v

    @field_validator("cnn_init", "vit_init")
    @classmethod
    def _weights(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None or v.lower() == "none":
            return None
        from fundus_pipeline.models.weights import resolve_weights

        try:
            resolve_weights(v)
        except FundusError as e:  # exit 1, as missing weights are for every command
            raise WeightsError(f"{option_name(info.field_name)}: {e.message}", e.hint) from None
        return v

    @field_validator("quality_set")
    @classmethod
    def _set(cls, v: Path) -> Path:
        if not (v / "pairs.csv").is_file():
            raise ValueError(f"{v} holds no pairs.csv (build it with `fundus build quality-set`)")
        return v


class GradeConfig(TrainConfig):
    """``fundus train grade``: the no-reference grader (HEMF, an ablation or the CNN baseline)."""

    arch: str = Field("hemf", description="Registered grading model (hemf, hemf_local, hemf_global, hemf_nomhea, grade_cnn; see `fundus models`).")
    grade_set: Path = Field(description="A grade set folder (`fundus build grade-set`): its labels.csv train split trains, val split validates.")
    data: Path | None = Field(None, validate_default=True, description="Dataset root holding EyePACS-256/ [default: $FUNDUS_DATA, else ../shared/data].")
    real_p: float = Field(0.3, allow_inf_nan=False, ge=0.0, lt=1.0, description="Probability that a sample is a real EyePACS-256 training photograph (0: none are read).")
    natural_p: float = Field(0.1, allow_inf_nan=False, ge=0.0, lt=1.0, description="Probability that a sample is a not-fundus picture.")
    grey_p: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Probability that a fundus photograph sample is shown grey, as a red-free photograph: its luminance or its green channel (half each) in all three channels, labels unchanged (0: never; draws no random numbers, so earlier runs replay).",
    )  # fmt: skip

    @field_validator("arch")
    @classmethod
    def _arch(cls, v: str) -> str:
        return _check_arch(v, "grading")

    @field_validator("grade_set")
    @classmethod
    def _set(cls, v: Path) -> Path:
        if not (v / "labels.csv").is_file():
            raise ValueError(f"{v} holds no labels.csv (build it with `fundus build grade-set`)")
        return v

    @model_validator(mode="after")
    def _mixture(self):
        if self.real_p + self.natural_p >= 1.0:
            raise ValueError("--real-p plus --natural-p must stay below 1 (the rest are the grade set's photographs)")
        if self.real_p > 0:
            _check_data(self.data, ("EyePACS-256",))
        return self

    @property
    def data_root(self) -> Path:
        return _data_root(self.data)
