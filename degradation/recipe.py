"""Validated, composable degradation recipes and the :class:`Degrader` that samples and applies them.

Size limits (enforced when a recipe is loaded or validated, each failure a one-line ``RecipeError``):

* recipe file or text: at most ``MAX_RECIPE_BYTES`` (1 MiB); the file must be a regular file (a FIFO or
  device such as ``/dev/zero`` is refused before it is opened);
* JSON nesting: at most ``MAX_NESTING`` levels (a recipe needs 4), at most ``MAX_NODES`` values in all;
* ``name``: 1..``MAX_NAME_LENGTH`` (200) characters; ``description``: at most ``MAX_DESCRIPTION_LENGTH``
  (2000); step ``name``: 1..``MAX_STEP_NAME_LENGTH`` (64) characters of ``[A-Za-z0-9_.-]``;
* ``steps``: 1..``MAX_STEPS`` (64); a Cofe step's ``types``: 1..``MAX_TYPES`` (64) codes.
"""

from __future__ import annotations

import json
import math
import os
import stat
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import numpy as np
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import clinical
from .checks import unit_image, unit_mask
from .cofe import CODES, apply_cofe, sample_cofe, validate_code
from .fov import FovGeometry
from .functional import CANONICAL, Frame
from .rng import item_rng

SCHEMA_VERSION = 1
BUILTIN_RECIPES = ("mild", "moderate", "severe")

MAX_RECIPE_BYTES = 1 << 20
MAX_NESTING = 32
MAX_NODES = 100_000
MAX_NAME_LENGTH = 200
MAX_DESCRIPTION_LENGTH = 2000
MAX_STEP_NAME_LENGTH = 64
MAX_STEPS = 64
MAX_TYPES = 64


class RecipeError(ValueError):
    """A recipe (built-in name, JSON file or dict) that cannot be loaded or validated."""


# ---------------------------------------------------------------------------------------------------
# Field types
# ---------------------------------------------------------------------------------------------------


def _pair(v: Any) -> Any:
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)):
        return (v, v)  # a scalar means a fixed value (a numpy scalar too, as a list of them is taken)
    return v


def _range(lo: float, hi: float, integer: bool = False):
    def whole(v: Any) -> Any:  # pydantic takes 60.0 for an int (review 24 R24-10): a whole number is written as one
        if isinstance(v, (list, tuple)) and any(isinstance(x, (float, np.floating)) for x in v):
            raise ValueError("whole numbers are needed (write 60, not 60.0)")
        return v

    def check(v: tuple) -> tuple:
        a, b = v
        if not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError("range bounds must be finite")
        if a > b:
            raise ValueError(f"range must be nondecreasing, got [{a}, {b}]")
        if a < lo or b > hi:
            raise ValueError(f"range [{a}, {b}] must lie within [{lo}, {hi}]")
        return v

    base = tuple[int, int] if integer else tuple[float, float]
    if integer:  # (validators run from the last BeforeValidator to the first: the pair is made, then checked)
        return Annotated[base, BeforeValidator(whole), BeforeValidator(_pair), AfterValidator(check)]
    return Annotated[base, BeforeValidator(_pair), AfterValidator(check)]


Prob = Annotated[float, Field(ge=0.0, le=1.0)]
Code = Literal["001", "010", "011", "100", "101", "110", "111"]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=MAX_STEP_NAME_LENGTH, pattern=r"^[A-Za-z0-9_.\-]+$")
    p: Prob = 1.0

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data: Any) -> Any:
        """``true`` / ``false`` or text where a number belongs is refused (pydantic would read ``"p": true`` as 1 and
        ``"p": "0.5"`` as 0.5; campaign 26a C26a-1)."""
        if isinstance(data, dict):
            for key, value in data.items():
                if key in ("name", "type", "types"):  # text fields: their own checks say what they need
                    continue
                values = value if isinstance(value, (list, tuple)) else [value]
                if any(isinstance(v, (bool, np.bool_)) for v in values):
                    raise ValueError(f"{key}: a number is needed, not true or false")
                if any(isinstance(v, (str, bytes, bytearray)) for v in values):
                    raise ValueError(f"{key}: a number is needed, not text (write 0.5, not \"0.5\")")
        return data


class _CofeStep(_Step):
    types: list[Code] = Field(default_factory=lambda: ["111"], min_length=1, max_length=MAX_TYPES)

    @field_validator("types", mode="before")
    @classmethod
    def _one_code(cls, v):
        return [v] if isinstance(v, str) else v


class CofeReleasedStep(_CofeStep):
    """The released Cofe-Net generator; ``types`` are the codes to draw from (uniformly)."""

    type: Literal["cofe_released"]


class CofeTrainingStep(_CofeStep):
    """The Cofe-Net training-time degradation (stronger; different order, ranges and colours)."""

    type: Literal["cofe_training"]


class CofeExamplesStep(_CofeStep):
    """The earlier generator behind the authors' example parameter files."""

    type: Literal["cofe_examples"]


class NoiseStep(_Step):
    type: Literal["noise"]
    a_range: _range(0.0, 1.0) = (0.0, 0.005)
    b_range: _range(0.0, 1.0) = (0.0, 5e-5)


class JpegStep(_Step):
    type: Literal["jpeg"]
    quality_range: _range(1, 100, integer=True) = (40, 90)


class DefocusStep(_Step):
    type: Literal["defocus"]
    radius_range: _range(0.0, 64.0) = (0.0, 4.0)


class MotionStep(_Step):
    type: Literal["motion"]
    length_range: _range(0.0, 128.0) = (0.0, 10.0)
    angle_range: _range(0.0, 360.0) = (0.0, 180.0)


class VignettingStep(_Step):
    type: Literal["vignetting"]
    strength_range: _range(0.0, 1.0) = (0.0, 0.5)
    power_range: _range(0.5, 10.0) = (2.0, 3.0)
    offset_range: _range(0.0, 1.0) = (0.0, 0.1)


class HazeStep(_Step):
    type: Literal["haze"]
    t_range: _range(0.0, 1.0) = (0.6, 0.95)
    airlight_range: _range(0.0, 1.0) = (0.3, 0.7)
    glare_sigma_range: _range(0.0, 256.0) = (10.0, 30.0)
    glare_mix_range: _range(0.0, 1.0) = (0.2, 0.6)
    tint: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = (
        1.0,
        0.92,
        0.72,
    )


class OverexposureStep(_Step):
    type: Literal["overexposure"]
    gain_range: _range(1.0, 4.0) = (1.1, 1.6)
    gamma_range: _range(0.2, 1.0) = (0.75, 1.0)


class UnderexposureStep(_Step):
    type: Literal["underexposure"]
    gain_range: _range(0.05, 1.0) = (0.4, 0.8)
    gamma_range: _range(1.0, 3.0) = (1.0, 1.5)


Step = Annotated[
    Union[
        CofeReleasedStep,
        CofeTrainingStep,
        CofeExamplesStep,
        NoiseStep,
        JpegStep,
        DefocusStep,
        MotionStep,
        VignettingStep,
        HazeStep,
        OverexposureStep,
        UnderexposureStep,
    ],
    Field(discriminator="type"),
]
STEP_TYPES = ("cofe_released", "cofe_training", "cofe_examples", *clinical.OPS)


class Recipe(BaseModel):
    """``{"schema_version": 1, "name": ..., "steps": [{"name", "type", "p", ...ranges}, ...]}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: Literal[1]
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    description: str = Field(default="", max_length=MAX_DESCRIPTION_LENGTH)
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)

    @field_validator("name", "description")
    @classmethod
    def _printable(cls, v: str, info) -> str:
        """No control characters (a NUL; in the name also a line break) and no bidirectional controls (U+202E): the
        name is copied into every item's record and shown on the console and the report (campaign 26a C26a-9). A
        description may hold line breaks (recipes written before this check did, and their runs replay; review 24)."""
        allowed = "\t\n\r" if info.field_name == "description" else ""
        bidi = {*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C}
        seps = {0x2028, 0x2029} if info.field_name == "name" else set()
        bad = next((c for c in v if (ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or ord(c) in bidi | seps) and c not in allowed), None)
        if bad is not None:
            raise ValueError(f"holds the control character U+{ord(bad):04X}; write it without")
        return v

    @field_validator("schema_version", mode="before")
    @classmethod
    def _version_is_a_number(cls, v):
        if isinstance(v, (bool, np.bool_)):  # Literal[1] takes true
            raise ValueError("a number is needed, not true or false")
        if not isinstance(v, (int, np.integer)):  # it takes 1.0 and 1.5 is refused with a bare "Input should be 1"
            raise ValueError("the whole number 1 is needed (write 1)")
        return v

    @field_validator("steps")
    @classmethod
    def _unique_names(cls, v):
        names = [s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"step names must be unique, repeated: {', '.join(dup)}")
        return v


def _format_errors(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


def check_json_shape(data: Any, source: str = "recipe", max_depth: int = MAX_NESTING, max_nodes: int = MAX_NODES) -> None:
    """Refuse (``RecipeError``) decoded JSON nested deeper than ``max_depth`` or holding more than
    ``max_nodes`` values. Iterative: never recurses, whatever the input."""
    stack = [(data, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > max_nodes:
            raise RecipeError(f"invalid {source}: too large (more than {max_nodes} JSON values)")
        if isinstance(value, (dict, list, tuple)):
            if depth > max_depth:
                raise RecipeError(f"invalid {source}: nested too deeply (more than {max_depth} levels)")
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object naming a key twice is refused (``json`` keeps the last value silently)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _RepeatedKey(f"key {k!r} appears twice in one object")
        out[k] = v
    return out


def parse_json_text(text: str | bytes, source: str = "recipe", max_bytes: int = MAX_RECIPE_BYTES) -> Any:
    """``json.loads`` with the size and nesting limits; every failure is a one-line ``RecipeError``."""
    if len(text) > max_bytes:
        raise RecipeError(f"{source} is too large ({len(text)} bytes; at most {max_bytes})")
    try:
        data = json.loads(text, object_pairs_hook=_no_repeated_keys)
    except _RepeatedKey as err:
        raise RecipeError(f"invalid {source}: {err}") from None
    except json.JSONDecodeError as err:
        raise RecipeError(f"{source} is not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except RecursionError:
        raise RecipeError(f"invalid {source}: nested too deeply (more than {MAX_NESTING} levels)") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise RecipeError(f"{source} is not valid JSON: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    check_json_shape(data, source)
    return data


def _short_repr(s: str, limit: int = 60) -> str:
    return repr(s) if len(s) <= limit else repr(s[:limit]) + f"... ({len(s)} characters)"


def read_recipe_file(path: Path, source: str, max_bytes: int = MAX_RECIPE_BYTES) -> bytes:
    """The bytes of a recipe file: a regular file (FIFOs and devices are refused before opening), at
    most ``max_bytes``."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise RecipeError(f"cannot read {source}: not a regular file")
        if st.st_size > max_bytes:
            raise RecipeError(f"{source} is too large ({st.st_size} bytes; at most {max_bytes})")
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as err:
        raise RecipeError(f"cannot read {source}: {err.strerror or err}") from None
    if len(data) > max_bytes:
        raise RecipeError(f"{source} is too large (more than {max_bytes} bytes)")
    return data


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate decoded recipe data (a dict, e.g. a recorded ``Degrader.config()``) into a :class:`Recipe`."""
    if isinstance(data, Recipe):
        return data
    check_json_shape(data, source)
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(f"invalid {source}: {_format_errors(err)}") from None
    except RecursionError:  # pragma: no cover - check_json_shape bounds the nesting first
        raise RecipeError(f"invalid {source}: nested too deeply") from None


def load_recipe(name_or_path: str | Path) -> "Degrader":
    """A built-in recipe name (``mild``, ``moderate``, ``severe``) or a path to a JSON recipe file."""
    s = str(name_or_path)
    if isinstance(name_or_path, Path) or s.endswith(".json") or "/" in s or "\\" in s:
        path = Path(s)
        if len(s) > 4096:
            raise RecipeError(f"cannot read recipe file {_short_repr(s)}: path too long")
        text = read_recipe_file(path, f"recipe file {s}")
        source = f"recipe file {path.name}"
    else:
        if s not in BUILTIN_RECIPES:
            raise RecipeError(f"unknown recipe {_short_repr(s)}: built-in recipes are {', '.join(BUILTIN_RECIPES)}, or give a .json path")
        text = resources.files("degradation").joinpath("recipes", f"{s}.json").read_text(encoding="utf-8")
        source = f"built-in recipe {s}"
    return Degrader(parse_recipe(parse_json_text(text, source), source))


def loads_recipe(text: str | bytes, source: str = "recipe") -> "Degrader":
    """A recipe given as JSON text (same limits as a recipe file)."""
    return Degrader(parse_recipe(parse_json_text(text, source), source))


def cofe_degrader(preset: str = "released", code: str = "111") -> "Degrader":
    """A degrader running exactly one Cofe-Net variant (``released``, ``training`` or ``examples``)
    with one type code (bits [blur, spot, illumination])."""
    preset = {"paper-examples": "examples"}.get(preset, preset)
    if preset not in ("released", "training", "examples"):
        raise ValueError(f"unknown Cofe-Net preset {preset!r}: expected released, training or examples")
    code = validate_code(code)
    recipe = Recipe(
        schema_version=1,
        name=f"cofe-{preset}-{code}",
        description=f"Cofe-Net {preset} degradation, type {code} (bits blur, spot, illumination)",
        steps=[{"name": preset, "type": f"cofe_{preset}", "types": [code], "p": 1.0}],
    )
    return Degrader(recipe)


# ---------------------------------------------------------------------------------------------------
# Degrader
# ---------------------------------------------------------------------------------------------------


def _fov(fov: FovGeometry | dict) -> FovGeometry:
    """``fov`` as a FovGeometry, checked by the rule a replay checks a recorded one with (``params.FovRecord``: a
    finite centre within two image sizes of the frame's middle, a radius above 0 and at most twice the larger side,
    a size of at least 1x1; a NaN centre or a radius of 0 had failed in ``apply`` with ZeroDivisionError, a negative
    radius made the image black; campaign 26a C26a-3)."""
    from .params import FovRecord

    if isinstance(fov, dict):
        fov = FovGeometry.from_dict(fov)
    elif not isinstance(fov, FovGeometry):
        raise TypeError(f"fov must be a FovGeometry or its dict, got {type(fov).__name__}")
    try:
        FovRecord.model_validate(FovGeometry.from_dict(fov.to_dict()).to_dict())  # as plain numbers (numpy scalars are fine)
    except ValidationError as err:
        raise ValueError(f"not a FOV of a {fov.width}x{fov.height} image: {_format_errors(err)}") from None
    return fov


def _check_levels(levels: Any) -> None:
    """``levels``, the output's maximum code value, is an integer >= 1 (255 or 65535)."""
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1 (255 or 65535), got {levels!r}")

class Degrader:
    """Samples JSON-able parameter records and applies them with a pure function.

    >>> d = cofe_degrader("released", "111")
    >>> params = d.sample(seed=7, key="01_test", fov=fov)      # doctest: +SKIP
    >>> out = d.apply(img, params, fov_soft, levels=255)          # doctest: +SKIP
    """

    def __init__(self, recipe: Recipe | dict):
        self.recipe = recipe if isinstance(recipe, Recipe) else parse_recipe(recipe)

    @property
    def name(self) -> str:
        return self.recipe.name

    def config(self) -> dict:
        """The full resolved configuration (defaults filled in), JSON-able."""
        return self.recipe.model_dump(mode="json")

    def __repr__(self) -> str:
        steps = ", ".join(f"{s.name}:{s.type}(p={s.p:g})" for s in self.recipe.steps)
        return f"Degrader(name={self.name!r}, steps=[{steps}])"

    @classmethod
    def from_config(cls, config: dict, source: str = "recorded recipe") -> "Degrader":
        """Rebuild a degrader from its recorded :meth:`config` output (e.g. a manifest's ``degraders``).

        The result has an identical ``config()`` and, for the same parameters, identical output pixels
        as the degrader that recorded it; nothing is re-read from a recipe file or name."""
        if not isinstance(config, dict):
            raise RecipeError(f"invalid {source}: expected an object, got {type(config).__name__}")
        return cls(parse_recipe(config, source))

    @classmethod
    def from_params(cls, params: dict) -> "Degrader":
        """Rebuild the degrader that produced ``params`` (for replay)."""
        if not isinstance(params, dict) or "config" not in params:
            raise RecipeError("parameter record has no 'config': not produced by Degrader.sample")
        return cls.from_config(params["config"], "recorded recipe")

    # -- sampling ------------------------------------------------------------------------------------

    def sample(self, seed: int, key: str, fov: FovGeometry | dict) -> dict:
        """Draw all parameters for one item. Depends only on (seed, key, recipe), never on the image
        or on the other items. Each step (and each Cofe op) has its own stream keyed by its name."""
        fov = FovGeometry.from_dict(_fov(fov).to_dict())  # plain Python numbers, JSON-able
        steps = []
        for st in self.recipe.steps:
            applied = True
            if st.p < 1.0:
                applied = bool(st.p > 0.0 and item_rng(seed, key, f"{st.name}/p").random() < st.p)
            rec: dict[str, Any] = {"name": st.name, "type": st.type, "applied": applied, "params": None}
            if applied:
                if st.type.startswith("cofe_"):
                    code = st.types[0]
                    if len(st.types) > 1:
                        code = st.types[int(item_rng(seed, key, f"{st.name}/types").integers(len(st.types)))]
                    variant = st.type[len("cofe_") :]
                    rec["params"] = sample_cofe(variant, code, lambda op, n=st.name: item_rng(seed, key, f"{n}/{op}"))
                else:
                    sampler = clinical.OPS[st.type][0]
                    rec["params"] = sampler(item_rng(seed, key, f"{st.name}/params"), st.model_dump())
            steps.append(rec)
        return {
            "schema_version": SCHEMA_VERSION,
            "degrader": self.name,
            "seed": int(seed),
            "key": str(key),
            "fov": fov.to_dict(),
            "canonical_size": CANONICAL,
            "config": self.config(),
            "steps": steps,
        }

    # -- application ---------------------------------------------------------------------------------

    def apply(
        self,
        img: np.ndarray,
        params: dict,
        fov_soft: np.ndarray,
        levels: int = 255,
        *,
        exact: bool | None = None,
        details: dict | None = None,
        consume: bool = False,
    ) -> np.ndarray:
        """Apply recorded ``params`` to ``img`` (float32 H×W×3 in [0,1], not modified unless ``consume``).

        ``consume=True``: ``img`` (C-contiguous float32) is a copy the caller no longer needs; it becomes the
        working buffer and every op runs in place where it can, so a large photograph holds one full-size
        float image instead of several. The result is the same, bit for bit.

        ``fov_soft`` is the float32 H×W soft FOV mask; pixels where it is 0 are treated as the black
        background of the released pre-processing, and the result is multiplied by it last.
        ``levels`` is the output's maximum code value (255 or 65535): the PIL-like colour ops quantise to
        it. ``exact`` forces full-resolution blurs of the large smooth fields (default: only when the
        image is the canonical 512 frame). ``details``, if a dict, receives image-dependent values
        (halo mean, hole strength, ...), keyed by step name.
        """
        img = unit_image(img, "img")  # float H×W×3 in [0, 1]: a [0, 255] float image is refused, not clipped to white
        fov = _fov(params["fov"])
        if img.shape[:2] != (fov.height, fov.width):
            raise ValueError(f"img shape {img.shape[:2]} does not match the recorded FOV frame {(fov.height, fov.width)}")
        fov_soft = unit_mask(fov_soft, img.shape[:2], "fov_soft")  # a 0/255 mask would scale the result
        _check_levels(levels)
        region = fov_soft > 0
        if consume and img.dtype == np.float32 and img.flags.c_contiguous and img.flags.writeable:
            x = np.clip(img, 0.0, 1.0, out=img)
        else:
            x = np.clip(img.astype(np.float32, copy=True), 0.0, 1.0)
        del img
        x *= region[..., None]
        frame = Frame(fov)
        ctx = clinical.OpCtx(frame, region, levels, owned=True)  # x is this call's own working copy
        for rec in params["steps"]:
            if not rec.get("applied") or rec.get("params") is None:
                continue
            if rec["type"].startswith("cofe_"):
                sub = {} if details is not None else None
                x = apply_cofe(x, rec["params"], frame, region, levels, exact, sub, consume=True)
                if details is not None:
                    details[rec["name"]] = sub
            else:
                x = clinical.OPS[rec["type"]][1](x, rec["params"], ctx)
        x = np.clip(x, 0.0, 1.0, out=x) if x.dtype == np.float32 else np.clip(x, 0.0, 1.0)
        x *= fov_soft[..., None]
        return x.astype(np.float32, copy=False)


    def apply_banded(
        self,
        params: dict,
        read_rows,
        binary: np.ndarray,
        write_rows,
        levels: int = 255,
        *,
        exact: bool | None = None,
        details: dict | None = None,
        band_rows: int | None = None,
    ) -> None:
        """:meth:`apply` a band of rows at a time, for photographs too large to hold as float (see
        :func:`degradation.banded.apply_banded`: the same operations; a pixel can differ by one code value, a few
        after a later JPEG step)."""
        from .banded import apply_banded

        _check_levels(levels)
        apply_banded(params, read_rows, binary, write_rows, levels, exact=exact, details=details, band_rows=band_rows)


__all__ = [
    "CODES",
    "Degrader",
    "MAX_RECIPE_BYTES",
    "Recipe",
    "RecipeError",
    "STEP_TYPES",
    "cofe_degrader",
    "load_recipe",
    "loads_recipe",
    "parse_recipe",
]
