"""Schema of the parameter records that :meth:`Degrader.sample` writes (validation for replay).

``Degrader.apply`` trusts its ``params``: that is right for records it has just sampled, but a record
read back from a manifest may have been edited or corrupted, and then a wrong type, a NaN, a negative
or even kernel size or a huge blur would surface as a ``KeyError``, a raw OpenCV assertion or a very
long computation. :func:`validate_params` checks a record before it is applied:

* the structure is exactly what ``sample`` writes (unknown keys are refused, every type is strict:
  no strings for numbers, no floats for integers, no booleans for numbers);
* every number is finite and lies in a bounded envelope around what the samplers can produce
  (the clinical ops use the recipe schema's validation bounds; Cofe-Net values, which are not
  configurable, get a few times the released/training maxima, e.g. Gaussian kernel sides are odd
  integers in [1, 65] for spots and image blur, [1, 1025] for the canonical-grid halo and hole);
* the FOV record is sane: positive integer ``height``/``width``, a finite centre within two image
  sizes of the frame, a radius in (0, 2·max(height, width)];
* each step record has the shape its ``type`` needs, parameters present exactly when ``applied``;
  a Cofe record holds exactly the ops its type code selects.

Consistency with a recipe (same step names and types, in order) is checked by :func:`check_steps_match`.
Failures are pydantic ``ValidationError`` (:class:`ParamsRecord`) or ``RecipeError`` (the helpers), each
naming the offending field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from .cofe import code_bits
from .functional import CANONICAL

Code = Literal["001", "010", "011", "100", "101", "110", "111"]

_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True)


def _num(lo: float, hi: float):
    return Annotated[float, Field(ge=lo, le=hi, allow_inf_nan=False)]


def _int(lo: int, hi: int):
    return Annotated[int, Field(ge=lo, le=hi)]


def _odd(hi: int):
    def check(v: int) -> int:
        if v % 2 != 1:
            raise ValueError(f"kernel side must be odd, got {v}")
        return v

    return Annotated[int, Field(ge=1, le=hi), AfterValidator(check)]


_C = CANONICAL
Coord = _num(-_C, 2 * _C)  # canonical-frame coordinate (samplers: within [0, 512])
Point = Annotated[list[Coord], Field(min_length=2, max_length=2)]
Unit = _num(0.0, 1.0)
SmallKernel = _odd(65)  # spots, image blur (samplers: <= 13)
FieldKernel = _odd(2 * _C + 1)  # halo / hole fields on the canonical grid (samplers: <= ~270)
MAX_SPOTS = 100  # samplers: <= 23


# ------------------------------------------------------------------------------------------ Cofe-Net
class _Color(BaseModel):
    model_config = _STRICT
    brightness_factor: _num(0.0, 4.0)
    contrast_factor: _num(0.0, 4.0)
    saturation_factor: _num(0.0, 4.0)


class _Halo(BaseModel):
    model_config = _STRICT
    num: _int(0, 2)
    center_a: Point
    dia_a: _num(0.0, 8 * _C)
    center_b: Point
    dia_b: _num(0.0, 8 * _C)
    gauss_rad: FieldKernel
    sigma: _num(0.0, 2 * _C)
    weights: Annotated[list[Unit], Field(min_length=3, max_length=3)]


class _Hole(BaseModel):
    model_config = _STRICT
    center: Point
    diameter_circle: _num(0.0, 4 * _C)
    brightness_factor: Optional[_num(-1.0, 1.0)]
    beta0: Optional[_num(-1.0, 1.0)] = None
    u: Optional[Unit] = None
    rad_w: FieldKernel
    rad_h: FieldKernel
    sigma: _num(0.0, 2 * _C)

    @model_validator(mode="after")
    def _resolvable(self):
        if self.brightness_factor is None and (self.beta0 is None or self.u is None):
            raise ValueError("a hole without brightness_factor needs beta0 and u")
        return self


class _Spot(BaseModel):
    model_config = _STRICT
    radius: _num(0.0, _C / 4)
    center: Point
    rad_w: SmallKernel
    rad_h: SmallKernel
    sigma: _num(0.0, 256.0)
    value: Unit


class _Blur(BaseModel):
    model_config = _STRICT
    sigma: _num(0.0, 64.0)
    rad_w: SmallKernel
    rad_h: SmallKernel


class CofeParams(BaseModel):
    """One Cofe-Net record (``sample_cofe``): the ops present are exactly those the type code selects."""

    model_config = _STRICT
    variant: Literal["released", "training", "examples"]
    type: Code
    color: Optional[_Color] = None
    halo: Optional[_Halo] = None
    hole: Optional[_Hole] = None
    spot: Optional[Annotated[list[_Spot], Field(max_length=MAX_SPOTS)]] = None
    blur: Optional[_Blur] = None

    @model_validator(mode="after")
    def _ops_match_code(self):
        bits = code_bits(self.type)
        want = {
            "color": bits["illumination"],
            "halo": bits["illumination"],
            "hole": bits["illumination"],
            "spot": bits["spot"],
            "blur": bits["blur"],
        }
        for op, needed in want.items():
            present = getattr(self, op) is not None
            if present != needed:
                raise ValueError(f"type {self.type} {'needs' if needed else 'has no'} '{op}' parameters")
        return self


# ------------------------------------------------------------------------------------------ clinical
# bounds: the recipe schema's validation bounds of the corresponding *_range fields (recipe.py)
class NoiseParams(BaseModel):
    model_config = _STRICT
    a: Unit
    b: Unit
    seed: _int(0, 2**64 - 1)


class JpegParams(BaseModel):
    model_config = _STRICT
    quality: _int(1, 100)


class DefocusParams(BaseModel):
    model_config = _STRICT
    radius: _num(0.0, 64.0)


class MotionParams(BaseModel):
    model_config = _STRICT
    length: _num(0.0, 128.0)
    angle: _num(0.0, 360.0)


class VignettingParams(BaseModel):
    model_config = _STRICT
    strength: Unit
    power: _num(0.5, 10.0)
    offset: Unit
    direction: _num(0.0, 360.0)


class HazeParams(BaseModel):
    model_config = _STRICT
    t: Unit
    airlight: Unit
    glare_sigma: _num(0.0, 256.0)
    glare_mix: Unit
    tint: Annotated[list[Unit], Field(min_length=3, max_length=3)]


class ExposureParams(BaseModel):
    model_config = _STRICT
    gain: _num(0.05, 4.0)
    gamma: _num(0.2, 3.0)


_STEP_PARAMS: dict[str, type[BaseModel]] = {
    "cofe_released": CofeParams,
    "cofe_training": CofeParams,
    "cofe_examples": CofeParams,
    "noise": NoiseParams,
    "jpeg": JpegParams,
    "defocus": DefocusParams,
    "motion": MotionParams,
    "vignetting": VignettingParams,
    "haze": HazeParams,
    "overexposure": ExposureParams,
    "underexposure": ExposureParams,
}
StepType = Literal[
    "cofe_released",
    "cofe_training",
    "cofe_examples",
    "noise",
    "jpeg",
    "defocus",
    "motion",
    "vignetting",
    "haze",
    "overexposure",
    "underexposure",
]


class StepRecord(BaseModel):
    """``{"name", "type", "applied", "params"}``; ``params`` is validated against the model of ``type``."""

    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=64)]
    type: StepType
    applied: bool
    params: Optional[dict[str, Any]]

    @model_validator(mode="after")
    def _params_fit_type(self):
        if not self.applied:
            if self.params is not None:
                raise ValueError("a step that was not applied has no params")
            return self
        if self.params is None:
            raise ValueError("an applied step needs params")
        try:
            rec = _STEP_PARAMS[self.type].model_validate(self.params)
        except ValidationError as err:
            e = err.errors(include_url=False)[0]
            loc = ".".join(str(x) for x in e["loc"])
            msg = e["msg"][len("Value error, ") :] if e["msg"].startswith("Value error, ") else e["msg"]
            more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
            raise ValueError(f"{self.type} step {self.name!r}: params{'.' + loc if loc else ''}: {msg}{more}") from None
        if isinstance(rec, CofeParams) and rec.variant != self.type[len("cofe_") :]:
            raise ValueError(f"params.variant {rec.variant!r} does not match step type {self.type!r}")
        return self


class FovRecord(BaseModel):
    """``FovGeometry.to_dict()``: centre and radius in native pixels, frame size."""

    model_config = _STRICT
    cx: _num(-(2.0**31), 2.0**31)
    cy: _num(-(2.0**31), 2.0**31)
    radius: Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
    height: _int(1, 1 << 20)
    width: _int(1, 1 << 20)

    @model_validator(mode="after")
    def _sane(self):
        side = max(self.height, self.width)
        if self.radius > 2 * side:
            raise ValueError(f"radius {self.radius} is implausible for a {self.width}x{self.height} frame")
        if abs(self.cx - self.width / 2) > 2 * side or abs(self.cy - self.height / 2) > 2 * side:
            raise ValueError(f"centre ({self.cx}, {self.cy}) lies too far outside the {self.width}x{self.height} frame")
        return self


class ParamsRecord(BaseModel):
    """A whole ``Degrader.sample`` record. ``config`` is checked by the recipe schema separately
    (``Degrader.from_config``), since a manifest records it once per degrader."""

    model_config = _STRICT
    schema_version: Literal[1]
    degrader: Annotated[str, Field(min_length=1, max_length=200)]
    seed: Annotated[int, Field(ge=0)]
    key: Annotated[str, Field(max_length=4096)]
    fov: FovRecord
    canonical_size: Literal[512]
    config: dict[str, Any]
    steps: Annotated[list[StepRecord], Field(min_length=1, max_length=64)]


def check_steps_match(params: dict, config: dict) -> None:
    """Raise ``RecipeError`` unless the record's steps are the recipe's steps (names and types, in order)
    and each Cofe record's type code is one the step may draw."""
    from .recipe import RecipeError

    steps, cfg_steps = params["steps"], config["steps"]
    if len(steps) != len(cfg_steps):
        raise RecipeError(f"steps: {len(steps)} step records for a recipe of {len(cfg_steps)} steps")
    for i, (rec, st) in enumerate(zip(steps, cfg_steps)):
        if rec["name"] != st["name"] or rec["type"] != st["type"]:
            raise RecipeError(
                f"steps.{i}: record {rec['name']!r} ({rec['type']}) does not match recipe step {st['name']!r} ({st['type']})"
            )
        if rec["applied"] and rec["type"].startswith("cofe_") and rec["params"]["type"] not in st["types"]:
            raise RecipeError(f"steps.{i}.params.type: {rec['params']['type']!r} is not among the step's types {st['types']}")


def validate_params(params: Any) -> ParamsRecord:
    """Validate one parameter record (see the module docstring); raises pydantic ``ValidationError``."""
    return ParamsRecord.model_validate(params)


__all__ = ["CofeParams", "FovRecord", "ParamsRecord", "StepRecord", "check_steps_match", "validate_params"]
