"""Typed schema of ``weights/manifest.json`` (pydantic v2) and of the weights a model was loaded from.

Torch-free on purpose: ``fundus models`` reads the manifest without importing torch.

* ``WeightsManifest`` is the whole file: ``{"schema_version": 1, "weights": [WeightsSpec, ...]}``.
* ``WeightsSpec`` is one shipped weights file. Every model is ``extra="forbid"`` (a misspelt key is an
  error, never silently ignored) and every field is required unless documented below with its default:
  ``WeightsSpec.metrics`` (``{}``: a fresh export has no test figures yet), ``TrainingSpec.best_checkpoint``
  (``None``) and ``TestMetrics.ci95`` (``None``). ``TrainingSpec`` also accepts extra provenance keys.
* ``LoadedWeights`` is what ``load_model`` returns next to the model: the manifest entry (``None`` for
  weights you trained yourself, given with ``--arch``), the verified path and sha256, and the decision
  threshold / scale policy to use.

Writers (``scripts/export_weights.py``): build a dict, ``WeightsSpec.model_validate(d)``, then
``manifest.with_entry(spec).dumps()`` gives the file's text (``to_json_dict()`` gives the JSON dict).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_serializer, field_validator, model_serializer, model_validator

from fundus_pipeline.config import MAX_CORRECTION_SIGMA, single_precision_threshold

DEFAULT_THRESHOLD = 0.5  # decision threshold for weights without a manifest entry (``--arch``)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_json_dict(self) -> dict[str, Any]:
        """The JSON-compatible dict, keys in the file's order (``model_validate`` of it round-trips)."""
        return self.model_dump(mode="json")


class ScalePolicy(_Strict):
    type: Literal["fov_max_diameter"]
    max_fov_diameter: float = Field(gt=0)  # pixels; images with a larger FOV are downscaled by an integer factor
    rule: str


class CanonicalPolicy(_Strict):
    """Enhancement networks work in a canonical frame: the FOV's bounding square resized to size x size."""

    type: Literal["canonical_frame"]
    size: int = Field(ge=32)
    rule: str


class InputSpec(_Strict):
    channels: Literal[3]
    color: Literal["rgb"]
    value_range: tuple[float, float]
    normalisation: str
    size_divisor: int = Field(ge=1)  # H and W of the network input must be multiples of it
    scale_policy: Annotated[ScalePolicy | CanonicalPolicy, Field(discriminator="type")]

    @field_serializer("value_range")
    def _plain_numbers(self, v: tuple[float, float]) -> list[int | float]:
        return [int(x) if float(x).is_integer() else x for x in v]


class ThresholdSelection(_Strict):
    threshold: float = Field(gt=0, lt=1)
    rule: str
    val_f1: dict[str, float]
    val_auc_roc: dict[str, float]


class OutputSpec(_Strict):
    activation: Literal["sigmoid"]
    threshold: float = Field(gt=0, lt=1)  # the a-priori decision threshold on the sigmoid output

    @field_validator("threshold")
    @classmethod
    def _single_precision(cls, t: float) -> float:  # as --threshold (review 28 R28-3)
        return single_precision_threshold(t)
    threshold_selection: ThresholdSelection

    @model_validator(mode="after")
    def _same_threshold(self) -> OutputSpec:
        if self.threshold_selection.threshold != self.threshold:
            raise ValueError(f"threshold {self.threshold} differs from threshold_selection.threshold {self.threshold_selection.threshold}")
        return self


class ImageOutputSpec(_Strict):
    """The output of an image-to-image network (enhancement): an RGB image in [0, 1] in the canonical frame,
    brought back to native resolution by ``transfer`` (``upsample`` the output, or add the upsampled
    correction ``output - input`` to the native photograph), chosen by the measurement in ``transfer_selection``."""

    kind: Literal["image"]
    activation: Literal["sigmoid", "clip(input + correction, 0, 1)"]  # the logit rule (cofe) or the additive rule (cofe_add)
    transfer: Literal["upsample", "residual"]
    transfer_selection: dict[str, Any]
    # the correction (output - input) is low-passed in the canonical frame before it returns to native
    # resolution: a Gaussian of this standard deviation (canonical pixels), normalised inside the FOV; 0: not
    correction_sigma: float = Field(0.0, ge=0.0, le=MAX_CORRECTION_SIGMA)  # the option's own range (review 27 R27-3)
    correction_selection: dict[str, Any] | None = None  # the validation measurement that chose correction_sigma

    @model_serializer(mode="wrap")
    def _leave_out_no_smoothing(self, handler) -> dict[str, Any]:
        """Entries without a low-pass keep the manifest's earlier form (no ``correction_*`` keys)."""
        d = handler(self)
        if self.correction_sigma == 0 and self.correction_selection is None:
            d.pop("correction_sigma", None)
            d.pop("correction_selection", None)
        return d


class ScoreOutputSpec(_Strict):
    """The output of a full-reference quality network (``fundus score``): one score in ``range`` (higher is
    better) for an (enhanced, reference) pair, the mean over the deterministic test-time ``crops`` (each
    ``crop`` x ``crop`` in the canonical frame of the input spec)."""

    kind: Literal["score"]
    range: tuple[float, float]
    reference: str  # what the reference image of a pair is
    crop: int = Field(ge=8)
    crops: str  # the test-time crop protocol, in words
    label: str  # what the score was trained to predict


class PretextOutputSpec(_Strict):
    """A feature network trained on a self-supervised pretext task (the frozen ViT stream of ``sdmp``):
    ``targets`` names its head's outputs in order."""

    kind: Literal["pretext"]
    targets: list[str]
    crop: int = Field(ge=8)


class GradeOutputSpec(_Strict):
    """The output of a no-reference grader (``fundus grade``): logits of the ``grades`` (softmax after dividing
    by ``temperature``, fitted on validation images) followed by one logit per flag of ``flags`` (sigmoid)."""

    kind: Literal["grade"]
    grades: list[str]
    flags: list[str]
    temperature: float = Field(gt=0)
    grade_rule: str  # how the training grades were made
    # the grade written is the argmax of the temperature-scaled log-probabilities plus these offsets (one per
    # grade), chosen on validation images (``decision_selection``); None: the plain argmax
    decision_bias: list[float] | None = None
    decision_selection: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_offset_per_grade(self) -> GradeOutputSpec:
        if self.decision_bias is not None:
            if len(self.decision_bias) != len(self.grades) or not all(math.isfinite(b) for b in self.decision_bias):
                raise ValueError(f"decision_bias needs one finite offset per grade ({len(self.grades)}), not {self.decision_bias}")
            if self.decision_selection is None or self.decision_selection.get("choice") != self.decision_bias:
                raise ValueError("decision_bias differs from decision_selection.choice (the validation measurement that chose it)")
        return self

    @model_serializer(mode="wrap")
    def _leave_out_no_offsets(self, handler) -> dict[str, Any]:
        """Entries without offsets keep the manifest's earlier form (no ``decision_*`` keys)."""
        d = handler(self)
        if self.decision_bias is None:
            d.pop("decision_bias", None)
            d.pop("decision_selection", None)
        return d


_KINDS = ("image", "score", "pretext", "grade")


def _output_kind(v: Any) -> str:
    kind = v.get("kind") if isinstance(v, dict) else getattr(v, "kind", None)
    return kind if kind in _KINDS else "segmentation"


# Segmentation entries have no ``kind`` (the manifest predates enhancement); the others say ``"kind": ...``.
AnyOutputSpec = Annotated[
    Annotated[OutputSpec, Tag("segmentation")]
    | Annotated[ImageOutputSpec, Tag("image")]
    | Annotated[ScoreOutputSpec, Tag("score")]
    | Annotated[PretextOutputSpec, Tag("pretext")]
    | Annotated[GradeOutputSpec, Tag("grade")],
    Discriminator(_output_kind),
]


class TrainingSpec(BaseModel):
    """Provenance of the weights. The listed keys are required and typed; further keys are kept as given."""

    model_config = ConfigDict(extra="allow", frozen=True)

    data: str
    validation: str
    test_never_used: str
    command: str
    seed: int | None
    steps: int | None
    best_checkpoint: dict[str, Any] | None = None  # the trainer's summary["best"], recorded as is
    torch: str

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class TestMetrics(_Strict):
    __test__ = False  # not a pytest class

    threshold: float = Field(gt=0, lt=1)
    n_images: int = Field(ge=1)
    pooled: dict[str, float]
    mean: dict[str, float]
    ci95: dict[str, dict[str, tuple[float, float]]] | None = None


class WeightsSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # the --weights name
    file: str  # file name inside the weights folder
    format: Literal["pt-state-dict"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=1)
    model: str  # registry name of the architecture (``--arch``), e.g. "msrf_w8"
    arch: str  # architecture family, e.g. "msrf"
    width: int = Field(ge=1)
    params: int = Field(ge=1)
    input: InputSpec
    output: AnyOutputSpec
    training: TrainingSpec
    metrics: dict[str, TestMetrics] = Field(default_factory=dict)  # test-split figures, label -> metrics
    license: str

    @field_validator("file")
    @classmethod
    def _plain_file_name(cls, v: str) -> str:
        if not v or Path(v).name != v or v in (".", ".."):
            raise ValueError(f"must be a file name inside the weights folder, got {v!r}")
        return v

    @property
    def threshold(self) -> float | None:
        """The segmentation decision threshold (None for image-output weights)."""
        return getattr(self.output, "threshold", None)

    @property
    def max_fov_diameter(self) -> float | None:
        return getattr(self.input.scale_policy, "max_fov_diameter", None)


class WeightsManifest(_Strict):
    schema_version: Literal[1]
    weights: list[WeightsSpec]

    @field_validator("weights")
    @classmethod
    def _unique_names(cls, v: list[WeightsSpec]) -> list[WeightsSpec]:
        seen: set[str] = set()
        for s in v:
            if s.name in seen:
                raise ValueError(f"weights name {s.name!r} listed twice")
            seen.add(s.name)
        return v

    def get(self, name: str) -> WeightsSpec | None:
        return next((s for s in self.weights if s.name == name), None)

    def by_sha256(self, digest: str) -> WeightsSpec | None:
        return next((s for s in self.weights if s.sha256 == digest), None)

    def names(self) -> list[str]:
        return [s.name for s in self.weights]

    def with_entry(self, spec: WeightsSpec) -> WeightsManifest:
        """A copy with ``spec`` added or replacing the entry of the same name, sorted by name."""
        weights = sorted([s for s in self.weights if s.name != spec.name] + [spec], key=lambda s: s.name)
        return WeightsManifest(schema_version=self.schema_version, weights=weights)

    def dumps(self) -> str:
        """The manifest file's text."""
        return json.dumps(self.to_json_dict(), indent=2) + "\n"


@dataclass(frozen=True)
class LoadedWeights:
    """The verified weights a model was built from (returned by ``load_model``)."""

    path: Path
    sha256: str
    model: str  # registry name of the architecture the weights were loaded into
    spec: WeightsSpec | None  # the manifest entry; None for your own weights given with --arch

    @property
    def name(self) -> str:
        return self.spec.name if self.spec else self.path.stem

    @property
    def threshold(self) -> float | None:
        """The a-priori decision threshold: the manifest's (None for image-output weights), or
        ``DEFAULT_THRESHOLD`` for weights without an entry."""
        return self.spec.threshold if self.spec else DEFAULT_THRESHOLD

    @property
    def threshold_source(self) -> Literal["manifest", "default"]:
        return "manifest" if self.spec else "default"

    @property
    def max_fov_diameter(self) -> float:
        if self.spec and self.spec.max_fov_diameter is not None:
            return self.spec.max_fov_diameter
        from fundus_pipeline.models.inference import DEFAULT_MAX_FOV_DIAMETER

        return float(DEFAULT_MAX_FOV_DIAMETER)

