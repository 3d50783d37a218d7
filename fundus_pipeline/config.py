"""Typed stage configurations (pydantic v2). Every option check of a stage lives here, once.

The commands build these from their options (``from_options``); a bad value becomes one
``UsageError`` line (exit 2) naming the option. The CLI takes its defaults from these models, so a
default exists in one place only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fundus_pipeline.errors import UsageError

COFE_CODES = ("001", "010", "011", "100", "101", "110", "111")
MAX_WORKERS = 512  # --workers of every command (a value past a C int would fail inside the pools, after OUT was made)
MAX_THREADS = 1024  # --threads of every command, fundus train and fundus build


def _field_parts(e: ValidationError) -> list[str]:
    """The first error's field path without list positions (empty for a check of several fields together)."""
    return [str(x) for x in e.errors()[0]["loc"] if not isinstance(x, int)]


def error_line(e: ValidationError, prefix: str = "--") -> str:
    """``name 'value': message`` from a pydantic error's first error, and how many more. ``name`` is the
    field as an option (``prefix`` "--": ``--min-gain``) or as a key path (``prefix`` "": ``config.min_gain``);
    list positions are left out of it and the offending value is named instead."""
    errs = e.errors()
    first = errs[0]
    parts = _field_parts(e)
    name = "--" + "-".join(parts).replace("_", "-") if prefix == "--" else prefix + ".".join(parts)
    value = first.get("input")
    shown = f" {value!r}" if isinstance(value, (str, int, float)) and not isinstance(value, bool) and len(repr(value)) <= 80 else ""
    if first["type"] in ("missing", "extra_forbidden", "unexpected_keyword_argument"):
        shown = ""
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    if not parts:  # a check of several options together: its message names them
        return f"{msg}{more}"
    return f"{name}{shown}: {msg}{more}"


def usage_error(e: ValidationError) -> UsageError:
    """One line from a pydantic error: ``invalid --option 'value': message`` (first error, and how many more;
    a check of several options together gives its own message, which names them)."""
    line = error_line(e)
    return UsageError(f"invalid {line}" if _field_parts(e) else line)


#: The largest ``--correction-sigma``: the side of the network's frame (512 px); a wider Gaussian is a mean over the
#: FOV already, and one of 1e9 px had OpenCV build a kernel of gigabytes (campaign 27a F1: killed for memory).
MAX_CORRECTION_SIGMA = 512.0


def single_precision_threshold(t: float | None) -> float | None:
    """A vessel threshold the probability maps (single precision) can tell from 0 and 1: 1e-300 rounded to 0 and
    painted every pixel a vessel, outside the field of view too (campaign 28a F5)."""
    if t is not None and not (0.0 < float(np.float32(t)) < 1.0):
        raise ValueError("rounds to 0 or 1 in the probability maps' single precision (float32), which would make every pixel "
                         "a vessel or none: give a value float32 holds, such as 1e-6 or 0.999999")
    return t


class StageConfig(BaseModel):
    # NaN and infinities are refused with "Input should be a finite number" (a NaN passes no bound check)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def build(cls, **values: Any):
        """Validate ``values`` (None means: the default), raising ``UsageError`` on a bad one."""
        try:
            return cls(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as e:
            raise usage_error(e) from None


def parse_codes(text: str) -> list[str]:
    """'111' -> ['111']; '001,111' -> both; 'all' -> the seven codes. Validated, de-duplicated, ordered."""
    if text.strip().lower() == "all":
        return list(COFE_CODES)
    codes = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in codes if c not in COFE_CODES]
    if not codes or bad:
        raise ValueError(f"{text!r}: use codes from {', '.join(COFE_CODES)} (bits: blur, spot, illumination), comma-separated, or 'all'")
    return sorted(set(codes), key=COFE_CODES.index)


class DegradeConfig(StageConfig):
    """``fundus degrade``: Cofe-Net types of a preset, or a recipe; or the parameters of a replay manifest."""

    types: list[str] = ["111"]
    preset: Literal["released", "training"] = "released"
    recipe: str | None = None
    seed: int = Field(0, ge=0)
    replay: Path | None = None

    @field_validator("types", mode="before")
    @classmethod
    def _codes(cls, v: Any) -> Any:
        return parse_codes(v) if isinstance(v, str) else v

    @field_validator("types")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        return parse_codes(",".join(v))

    @classmethod
    def from_options(cls, *, types: str | None, preset: str | None, recipe: str | None, seed: int | None, replay: Path | None) -> "DegradeConfig":
        if replay and any(v is not None for v in (types, preset, recipe, seed)):
            raise UsageError("--replay takes the types, preset, recipe and seed from the replay manifest; do not combine it with them")
        if recipe is not None and not recipe.strip():  # `--recipe ""` ran Cofe 111 without a word
            raise UsageError("--recipe is empty: give mild, moderate, severe or a recipe JSON file, or leave the option out")
        if recipe and (types is not None or preset is not None):
            raise UsageError("--recipe cannot be combined with --types or --preset")
        return cls.build(types=types, preset=preset, recipe=recipe, seed=seed, replay=replay)


def _device_name(v: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v.lower()):
        raise ValueError("use auto, cpu, cuda or cuda:N")
    return v


#: ``--device``: checked when the configuration is built (whether CUDA is there, when the device is opened).
DeviceName = Annotated[str, AfterValidator(_device_name)]


class NetworkStageConfig(StageConfig):
    """The options every network stage shares: device, the forward passes' precision, ``torch.compile``."""

    device: DeviceName = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the networks (recorded: compiled kernels may round differently)


class SegmentConfig(NetworkStageConfig):
    """``fundus segment``: weights, decision threshold, device and tiling, FOV handling, outputs."""

    weights: str = "imff"
    arch: str | None = None
    threshold: Annotated[float | None, AfterValidator(single_precision_threshold)] = Field(None, gt=0.0, lt=1.0, allow_inf_nan=False, description="default: the weights' a-priori threshold")
    tile: int = Field(1024, ge=0, description="tile side at the working scale; 0 = the whole image at once")
    overlap: int = Field(64, ge=0)
    overlay: bool = False
    fov: Literal["estimate", "full"] = "estimate"
    # Probabilities are kept this far outside the estimated FOV edge (a fraction of its diameter). 0 by
    # default: a margin recovers the ~1-px ring by which the datasets' own masks exceed the estimate
    # (DRIVE validation AUC-ROC +0.0009 at 1.5%), but the model also fires on the bright-to-black rim,
    # so on photographs with a wide dark border it draws false vessels along the edge
    # (scripts/val_fov_margin.py counts them on the validation images).
    fov_margin: float = Field(0.0, allow_inf_nan=False, ge=0.0, le=0.5)
    batch_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _tile_holds_its_overlaps(self) -> "SegmentConfig":
        # a smaller tile ran at this size while the manifest recorded the one asked for (campaign 17a F2);
        # 16 is the segmenters' largest size divisor (IMFF-Net; MSRF-Net 8)
        if self.tile and self.tile < 2 * self.overlap + 16:
            raise ValueError(f"--tile {self.tile} is smaller than 2 x --overlap + 16 = {2 * self.overlap + 16}: "
                             "give 0 (the whole image) or a larger tile, or a smaller --overlap")
        return self


def default(model: type[BaseModel], name: str) -> Any:
    """The default of a config field (for the CLI's option defaults)."""
    return model.model_fields[name].default


class EnhanceConfig(NetworkStageConfig):
    """``fundus enhance``: enhancement weights, device, how the result returns to native resolution, the
    surround, and the segmenter behind the vessel-fraction columns."""

    weights: str = "cofe_add_seg"
    arch: str | None = None
    transfer: Literal["auto", "upsample", "residual"] = "auto"  # auto: the weights' manifest choice
    correction_sigma: float | None = Field(None, ge=0.0, le=MAX_CORRECTION_SIGMA, allow_inf_nan=False)  # None: the weights' manifest choice
    keep_outside: bool = False
    vessel_stats: bool = True
    segmenter: str = "imff"
    segmenter_arch: str | None = None  # for segmenter weights not in the manifest (campaign 27a F4: none could be used)
    batch_size: int = Field(1, ge=1, le=256, description="photographs per forward pass")

    @model_validator(mode="after")
    def _segmenter_used(self):
        if not self.vessel_stats and (self.segmenter != "imff" or self.segmenter_arch is not None):  # (27a F13: not checked, unused)
            raise ValueError("--segmenter and --segmenter-arch choose the vessel-fraction columns' segmenter: drop them with --no-vessel-stats")
        return self


class ScoreConfig(NetworkStageConfig):
    """``fundus score``: quality weights and device (the crops are the weights' fixed test-time protocol)."""

    weights: str = "sdmp"
    arch: str | None = None
    input_score: bool = False  # also score the reference against itself (``score_input``)
    batch_size: int = Field(1, ge=1, le=256, description="pairs per forward pass")


class GradeConfig(NetworkStageConfig):
    """``fundus grade``: grading weights, device, and the probability at which a flag is listed."""

    weights: str = "hemf_4750"
    arch: str | None = None
    flag_threshold: float = Field(0.5, allow_inf_nan=False, gt=0.0, lt=1.0)
    batch_size: int = Field(1, ge=1, le=1024, description="photographs per forward pass")


RUN_STEPS = ("grade", "enhance", "score", "segment")


def _parse_list(v: Any) -> Any:
    """'a,b' -> ['a', 'b'] (a TOML list or a Python list passes through)."""
    if isinstance(v, str):
        return [x.strip() for x in v.split(",") if x.strip()]
    return v


class RunConfig(StageConfig):
    """``fundus run``: the chain (grade -> enhance -> score -> segment), its decisions, the simulator and
    the models of each step. Every field is a key of the ``--config`` TOML file and a ``--option`` of the
    command (``min_gain`` <-> ``--min-gain``); the command line overrides the file.

    The hashed part (``chain_record``) is everything that changes an output byte: steps, decisions,
    simulation, seed, weights and their options, device. ``workers``, ``threads``, ``engine``, ``address``,
    ``format``, ``quiet``, ``resume`` and ``overwrite`` change nothing in the outputs and are kept out of it.
    """

    steps: list[Literal["grade", "enhance", "score", "segment"]] = list(RUN_STEPS)
    enhance_if: list[Literal["good", "usable", "reject"]] = ["usable", "reject"]
    min_gain: float = Field(0.0, allow_inf_nan=False, ge=-1.0, le=1.0, description="use the enhanced image when score - score_input >= this")
    min_score: float = Field(0.0, allow_inf_nan=False, ge=0.0, le=1.0, description="... and its score >= this")
    simulate: str | None = None
    seed: int = Field(0, ge=0)
    ground_truth: Path | None = None
    device: DeviceName = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False  # torch.compile the networks (recorded: compiled kernels may round differently)
    grade_weights: str = "hemf_4750"
    grade_arch: str | None = None
    flag_threshold: float = Field(0.5, allow_inf_nan=False, gt=0.0, lt=1.0)
    grade_batch_size: int = Field(1, ge=1, le=1024, description="photographs per forward pass of the grader")
    enhance_weights: str = "cofe_add_seg"
    enhance_arch: str | None = None
    enhance_batch_size: int = Field(1, ge=1, le=256, description="photographs per forward pass of the enhancer")
    transfer: Literal["auto", "upsample", "residual"] = "auto"
    correction_sigma: float | None = Field(None, ge=0.0, le=MAX_CORRECTION_SIGMA, allow_inf_nan=False)  # None: the enhancement weights' manifest choice
    keep_outside: bool = False
    score_weights: str = "sdmp"
    score_arch: str | None = None
    score_batch_size: int = Field(1, ge=1, le=256, description="pairs per forward pass of the scorer")
    segment_weights: str = "imff"
    segment_arch: str | None = None
    threshold: Annotated[float | None, AfterValidator(single_precision_threshold)] = Field(None, gt=0.0, lt=1.0, allow_inf_nan=False, description="vessel threshold (default: the weights' own)")
    report: bool = True
    thumbnail: int = Field(160, ge=48, le=512, description="thumbnail side in the report, pixels")
    workers: int = Field(1, ge=1, le=MAX_WORKERS)
    threads: int | None = Field(None, ge=1, le=MAX_THREADS)
    engine: Literal["local", "ray"] = "local"
    address: str | None = None
    format: Literal["human", "json"] = "human"
    quiet: bool = False
    resume: bool = False
    overwrite: bool = False

    @field_validator("steps", "enhance_if", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _parse_list(v)

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError(f"name at least one of {', '.join(RUN_STEPS)}")
        v = [s for s in RUN_STEPS if s in v]  # the chain's order, de-duplicated
        if "score" in v and "enhance" not in v:
            raise ValueError("the score step scores enhanced images: it needs the enhance step")
        return v

    @field_validator("enhance_if")
    @classmethod
    def _grades(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one of good, usable, reject (to enhance nothing, leave enhance out of --steps)")
        return [g for g in ("good", "usable", "reject") if g in v]

    @field_validator("ground_truth", mode="before")
    @classmethod
    def _truth_given(cls, v: Any) -> Any:
        if isinstance(v, str) and not v.strip():  # "" would be the working folder
            raise ValueError("empty: give the folder of the clean originals' vessel annotations, or leave it out")
        return v

    @field_validator("ground_truth")
    @classmethod
    def _truth_absolute(cls, v: Path | None) -> Path | None:
        """Absolute (recorded and hashed so): a resume with other annotations is refused, and a replay finds
        them from any working folder."""
        return None if v is None else Path(os.path.abspath(v))

    @field_validator("simulate")
    @classmethod
    def _simulate(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.strip():
            raise ValueError("empty: give Cofe-Net type codes (111, '001,010', all) or a recipe (mild, moderate, severe, a JSON file), or leave the option out")
        v = v.strip()
        if simulate_kind(v) == "types":
            return ",".join(parse_codes(v))
        return v

    def simulate_options(self) -> dict:
        """The degrade stage's options for ``simulate``: Cofe-Net types or a recipe."""
        if self.simulate is None:
            return {}
        if simulate_kind(self.simulate) == "types":
            return {"types": self.simulate, "recipe": None}
        return {"types": None, "recipe": self.simulate}

    def chain_record(self) -> dict:
        """The fields that decide the outputs (hashed: ``--resume`` never mixes two configurations)."""
        skip = {"workers", "threads", "engine", "address", "format", "quiet", "resume", "overwrite", "ground_truth"}
        rec = self.model_dump(mode="json", exclude=skip)
        rec["ground_truth"] = str(self.ground_truth) if self.ground_truth is not None else False  # False: the hash earlier versions wrote
        if rec.get("precision") == "fp32":
            del rec["precision"]  # the default: the hash of a float32 run is the one earlier versions wrote
        if not rec.get("compile"):
            rec.pop("compile", None)  # likewise
        return rec


def simulate_kind(text: str) -> Literal["types", "recipe"]:
    """``--simulate``: Cofe-Net type codes ('111', '001,010', 'all') or a recipe (a name or a JSON file)."""
    t = text.strip().lower()
    if t == "all":
        return "types"
    if t.replace(",", "").replace(" ", "").isdigit() and not Path(text.strip()).is_file():
        return "types"  # digits and commas are type codes (parse_codes names a bad one), unless a file of that name exists
    return "recipe"


_QUOTES = "\"'"  # around a quoted TOML key


def _toml_error(msg: str, text: str) -> str:
    """tomllib's message, with the key named when it is set twice ("Cannot overwrite a value (at line 2,
    column 6)" names neither the key nor what was overwritten): the key of the line tomllib points at, a
    ``key = ...`` line or a ``[key]`` / ``[[key]]`` header; tomllib's own words where it is neither."""
    if not msg.startswith("Cannot overwrite a value"):
        return msg
    lines = text.splitlines()
    m = re.search(r"at line (\d+)", msg)
    if m:
        n = int(m.group(1))
    elif "end of document" in msg:  # the last line, without a line end
        n = max((i + 1 for i, ln in enumerate(lines) if ln.strip()), default=0)
    else:
        return msg
    line = lines[n - 1].strip() if 0 < n <= len(lines) else ""
    header = re.fullmatch(r"\[\[?\s*([^\[\]]+?)\s*\]\]?(\s*#.*)?", line)
    bare = re.match(r"\s*([A-Za-z0-9_.-]+|\"[^\"]*\"|'[^']*')\s*=", line)
    key = header.group(1) if header else bare.group(1) if bare else None
    return f"key {key.strip(_QUOTES)!r} is set twice (line {n})" if key else msg


def load_toml_config(path: Path, given: "set[str] | frozenset[str]" = frozenset()) -> dict:
    """The keys of a ``--config`` TOML file (a UsageError naming the file on a syntax error or an unknown key).
    ``given``: the keys the command line sets: they replace the file's, whose values are then not checked
    (the merged configuration is; a file value the command line overrides cannot abort the run)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # a leading byte-order mark is allowed
        data = tomllib.loads(text)
    except OSError as e:
        raise UsageError(f"cannot read --config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"invalid --config {path}: {str(e).splitlines()[0]}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"invalid --config {path}: {_toml_error(str(e).splitlines()[0], text)}") from None
    unknown = sorted(set(data) - set(RunConfig.model_fields))
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], list(RunConfig.model_fields), n=1)
        raise UsageError(f"invalid --config {path}: unknown key {unknown[0]!r}" + (f" (did you mean {near[0]!r}?)" if near else ""),
                         "the keys are the options of `fundus run --help` with underscores for dashes (examples/run.toml shows each)")
    if "ground_truth" in data and "ground_truth" not in given and not isinstance(data["ground_truth"], str):
        raise UsageError(f"invalid --config {path}: ground_truth must be a string (a folder of annotations), got {type(data['ground_truth']).__name__}")
    # TOML has types, so the file's values must have the key's type: `workers = true` or `keep_outside = "yes"`
    # is an error, not 1 or True (the command line's strings are converted by its options, as usual)
    typed = {k: Path(v) if k == "ground_truth" and isinstance(v, str) else v for k, v in data.items() if k not in given}
    try:
        RunConfig.model_validate(typed, strict=True)
    except ValidationError as e:
        raise UsageError(f"invalid --config {path}: {error_line(e, prefix='')}") from None
    return data
