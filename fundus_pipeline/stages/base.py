"""The stage contract: what a stage declares and what the runner does for it.

A stage is a pure per-item computation, ``compute(item) -> ItemOutput``, on decoded arrays. Everything
around it belongs to the runner (``fundus_pipeline.runner``): discovering and pairing the inputs,
decoding them, estimating the field of view once per item, writing the outputs atomically, recording
per-item failures, the resume journal, ``manifest.json`` and ``results.csv``. Because ``compute`` never
reads or writes files, a chained run can hand one stage's output arrays to the next stage in memory,
while each stage command still writes its own folder.

A stage declares:

* ``name`` and ``columns`` (its own ``results.csv`` columns, after the common ones);
* ``inputs``: the input roles it needs, each an :class:`InputSpec`. The first is the primary input (the
  command's ``IN``); the others are found in other folders and matched by item key (e.g. the coming
  ``score`` stage pairs an enhanced image with its degraded reference);
* ``fov_policy``: ``"estimate"`` (the runner estimates the circular field of view of the primary image),
  ``"full"`` (the whole frame) or ``"none"`` (no FOV needed);
* ``start_method``: how parallel workers start (``"spawn"`` is safe with torch and CUDA; a torch-free
  stage may use ``"fork"``, which starts workers in milliseconds);
* ``uses_torch``: whether workers should set torch's CPU thread count;
* ``config_record()``: the resolved configuration (hashed, so ``--resume`` never mixes configurations);
  ``info()``: manifest fields kept out of the hash (paths); ``setup()``: per-worker setup (load a model
  once per process; the stage object is pickled to spawned workers: the attributes named in
  ``transient`` (loaded models) are sent as None and rebuilt by ``setup`` in each worker).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, ClassVar, Literal

import numpy as np

from degradation.fov import FovGeometry
from fundus_pipeline.errors import InputError
from fundus_pipeline.io import ImageMeta, to_float_rgb

FovPolicy = Literal["estimate", "full", "none"]


@dataclass(frozen=True)
class InputSpec:
    """One input role of a stage. ``option`` is the command-line option that names its folder (None for
    the primary input, which is the command's IN argument)."""

    role: str
    option: str | None = None
    help: str = ""


@dataclass(frozen=True)
class Image:
    """A decoded image: the native array (uint8/uint16, gray/graya/rgb/rgba) and what was read."""

    array: np.ndarray
    meta: ImageMeta
    sha256: str | None = None  # of the file's bytes, when the runner read it (a replay checks it is the recorded input)

    @cached_property
    def _float(self) -> tuple[np.ndarray, np.ndarray | None]:
        return to_float_rgb(self.array, self.meta)

    @property
    def rgb(self) -> np.ndarray:
        """float32 HxWx3 RGB in [0, 1] (gray replicated); computed once."""
        return self._float[0]

    @property
    def alpha(self) -> np.ndarray | None:
        """The alpha plane in the native dtype, or None (read from the integer array: no float conversion)."""
        if "_float" in self.__dict__:
            return self._float[1]
        a = self.array
        return a[..., a.shape[2] - 1].copy() if a.ndim == 3 and a.shape[2] in (2, 4) else None

    def fresh_rgb(self) -> np.ndarray:
        """A new float32 RGB copy that the caller owns (``rgb`` when it is cached, else not cached): a very large
        photograph's stages convert it when needed instead of holding it."""
        return to_float_rgb(self.array, self.meta)[0]

    @property
    def color(self) -> np.ndarray:
        """The colour planes of the native integer array, without alpha (HxW gray or HxWx3 RGB; a view)."""
        a = self.array
        if a.ndim == 2:
            return a
        return a[..., 0] if a.shape[2] == 2 else a[..., :3]

    @property
    def maxval(self) -> int:
        """The largest code value of the native dtype (255 or 65535)."""
        return int(np.iinfo(self.array.dtype).max)

    @property
    def large(self) -> bool:
        """Above ``bands.LARGE_PIXELS``: stages take their banded paths (no full-size float copies)."""
        from fundus_pipeline.bands import is_large

        return is_large(self.meta.height, self.meta.width)


@dataclass(frozen=True)
class Fov:
    """The field of view of an item's primary image: boolean mask, circle geometry, and whether a
    circular FOV with a dark surround was found (False: the mask is the full frame)."""

    mask: np.ndarray
    geometry: FovGeometry
    found: bool

    @classmethod
    def estimate(cls, rgb: np.ndarray) -> "Fov":
        from degradation.fov import estimate_fov_geometry

        mask, geom = estimate_fov_geometry(rgb)
        return cls(mask, geom, not bool(mask.all()))

    @classmethod
    def estimate_image(cls, image: "Image") -> "Fov":
        """``estimate(image.rgb)``; for a very large photograph from its integer array, reduced to the FOV's
        working size in row bands (``fundus_pipeline.bands``), with no full-size float copy."""
        if not image.large:
            return cls.estimate(image.rgb)
        from degradation.fov import estimate_fov_geometry_work, fov_work_size

        from fundus_pipeline.bands import area_downscale_float

        h, w = image.meta.height, image.meta.width
        ws, hs = fov_work_size(h, w)
        mask, geom = estimate_fov_geometry_work(area_downscale_float(image.color, ws, hs, image.maxval), h, w)
        return cls(mask, geom, not bool(mask.all()))

    def surround_level(self, image: np.ndarray) -> float:
        """The 75th percentile of the mean colour value outside the FOV, in [0, 1], read at a working size of at
        most 512 px (0 when there is no outside): near 0 for a fundus photograph's black surround, with a date or
        name burned into it too, far above it when the "FOV" was fitted to a picture that has none. Until 2026-12-05
        the 95th percentile of every 7th pixel: a date in the surround read 1.0, and the photograph was called "not a
        fundus photograph" (campaign 43a F1); it also flagged CofeNet photographs whose cut field leaves bright strips
        outside the fitted circle (9 of 100; now 0, review 44). A 5-px opening before the 95th, tried in between,
        flagged them again. ``image``: the float RGB in [0, 1] or the decoded integer array (gray or colour, no alpha)."""
        outside = ~self.mask
        if not outside.any():
            return 0.0
        step = max(1, -(-max(outside.shape) // 512))  # (every 7th pixel of a 12000x9000 photograph: 2.1 s and 1.2 GB)
        v = image[::step, ::step]
        vals = v[outside[::step, ::step]]
        if vals.ndim == 2:
            vals = vals.mean(axis=1)
        vals = vals.astype(np.float32)
        if image.dtype.kind in "ui":
            vals /= float(np.iinfo(image.dtype).max)
        return float(np.percentile(vals, 75)) if vals.size else 0.0

    @classmethod
    def full(cls, height: int, width: int) -> "Fov":
        return cls(np.ones((height, width), bool), FovGeometry(width / 2, height / 2, min(height, width) / 2, height, width), True)


@dataclass(frozen=True)
class ItemInput:
    """What ``compute`` receives: the item key, its decoded images by role, and the FOV (None when the
    stage's ``fov_policy`` is ``"none"``)."""

    key: str
    images: dict[str, Image]
    fov: Fov | None

    @property
    def image(self) -> Image:
        """The primary image."""
        return self.images["image"]


@dataclass
class ItemOutput:
    """What ``compute`` returns.

    ``images`` maps an output-name suffix to a native array (uint8/uint16, or bool written as 0/255):
    suffix ``""`` is written as ``OUT/KEY.png``, ``"_vessels"`` as ``OUT/KEY_vessels.png``, in this
    order. A value may also be a function returning the array: it is called when the output is written
    (``images_now`` calls it), so a stage with several large outputs holds one at a time. ``fields``
    are the stage's ``results.csv`` columns for this item.
    """

    images: dict[str, np.ndarray | Callable[[], np.ndarray]] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    def images_now(self) -> dict[str, np.ndarray]:
        """Every output array, deferred ones computed (for in-memory chaining and tests)."""
        return {k: v() if callable(v) else v for k, v in self.images.items()}


class Stage(ABC):
    """Base class of every folder-in/folder-out stage (see the module docstring)."""

    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]] = ()
    inputs: ClassVar[tuple[InputSpec, ...]] = (InputSpec("image"),)
    start_method: ClassVar[Literal["spawn", "fork"]] = "spawn"
    uses_torch: ClassVar[bool] = False
    fov_policy: FovPolicy = "estimate"
    transient: ClassVar[tuple[str, ...]] = ()  # attributes sent to spawned workers as None (``setup`` rebuilds them)
    #: The revision of what this stage computes: raised with every change of the code that changes a row or an output
    #: for the same input and options (a new warning, another FOV rule). ``--resume`` processes again the rows of
    #: another revision, those of a version before the record (2026-12-05) included: their results were made by other
    #: code (campaign 39b F1: a resume after an upgrade kept rows without the warnings the code gives now).
    #: 2 (2026-12-05): the FOV rule that reads a corner with text burned into it by its darkest tenth, and the
    #: surround level of the plausibility warning as its 75th percentile (campaign 43a F1); every stage estimates a FOV.
    results_revision: ClassVar[int] = 2

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self.transient:
            state[name] = None
        return state

    @abstractmethod
    def config_record(self) -> dict:
        """The resolved configuration, hashed for ``--resume`` (no paths; see ``info``)."""

    def info(self) -> dict:
        """Manifest fields kept out of the configuration hash (e.g. the weights path)."""
        return {}

    def notes(self) -> list[str]:
        """What the run says before it starts (``note: ...`` on stderr unless quiet): a limit of what it can check,
        e.g. a replay manifest that records no output sha256 to compare with."""
        return []

    def setup(self) -> None:
        """Per-process setup (load models). Called once in each worker before its first item."""

    @abstractmethod
    def compute(self, item: ItemInput) -> ItemOutput:
        """The pure per-item computation. Raise ``InputError`` for a bad item (recorded, the run goes on)."""

    #: Items the runner hands to ``compute_batch`` together (a network stage's ``--batch-size``).
    batch_size: int = 1

    def compute_batch(self, items: list[ItemInput]) -> list[ItemOutput]:
        """``compute`` of several items at once (a network stage runs them through one forward pass). The
        default computes them one by one. If it raises, the runner computes the items one at a time, so
        only a bad item fails."""
        return [self.compute(item) for item in items]

    @property
    def precision(self) -> str:
        """The forward passes' precision: ``fp32``, or autocast to ``bf16``/``fp16`` (a network stage's
        ``--precision``, part of its configuration record)."""
        return str(getattr(getattr(self, "cfg", None), "precision", "fp32"))

    def precision_record(self) -> dict:
        """The precision and ``--compile`` for the configuration record: nothing at fp32 and uncompiled (the
        records of earlier versions)."""
        rec = {} if self.precision == "fp32" else {"precision": self.precision}
        if getattr(getattr(self, "cfg", None), "compile", False):
            rec["compile"] = True
        return rec

    def check_precision(self) -> None:
        """Refuse a precision the device cannot run now (fp16 on the CPU), before any item: building the
        context checks it."""
        self.forward_context()

    def forward_context(self):
        """The context the runner computes this stage's items in (``device.autocast``; nothing for a
        torch-free stage or at fp32)."""
        import contextlib

        if not self.uses_torch or self.precision == "fp32":
            return contextlib.nullcontext()
        from fundus_pipeline.device import autocast

        return autocast(getattr(self, "device", "cpu"), self.precision)

    #: Whether the runner should feed this stage from decoding processes into this process's device (one model
    #: on a GPU, batches formed across items) instead of giving each worker a model of its own.
    @property
    def feeds_device(self) -> bool:
        device = getattr(self, "device", None)
        return self.uses_torch and device is not None and getattr(device, "type", "cpu") == "cuda"

    @staticmethod
    def output_name(key: str, suffix: str) -> str:
        return f"{key}{suffix}.png"

    #: Added to the no-FOV error of ``require_fov`` (a stage that can work on the whole frame says how).
    no_fov_hint: ClassVar[str] = ""

    def require_fov(self, item: ItemInput) -> Fov:
        """The item's FOV, refusing photographs without a circular field of view."""
        if item.fov is None or not item.fov.found:
            raise InputError(f"no fundus field of view found ({_no_fov_reason(item.image.array)}){self.no_fov_hint}")
        return item.fov


def _no_fov_reason(array: np.ndarray) -> str:
    """Why no FOV was found, as far as the photograph shows it: too dark to tell the field from its surround (a
    badly under-exposed photograph had been told it has no dark surround; campaign 27a F3), or no dark surround."""
    a = array[..., :3] if array.ndim == 3 and array.shape[2] >= 3 else (array[..., 0] if array.ndim == 3 else array)
    if a.size == 0:
        return "no dark surround"
    small = a[:: max(1, a.shape[0] // 512), :: max(1, a.shape[1] // 512)]
    full = 65535 if a.dtype == np.uint16 else 255
    top = float(np.percentile(small, 99)) / full
    if top < 0.1:
        return (f"the photograph is too dark to tell its field of view from the surround: its brightest 1% lies at "
                f"{top:.1%} of full scale")
    from degradation.fov import corner_level

    corners = corner_level(small, least=1) / full
    if corners < 0.1 * top:  # a dark surround it has, but no circle in it (a squashed or cut picture; review 27 R27-5)
        return ("no circular field of view could be traced in its dark surround: a squashed, stretched or cut picture, "
                "or a field too faint or noisy at its edge?")
    return "no dark surround"


class NetworkStage(Stage):
    """A stage around one network: weights ``cfg.weights`` (a shipped name or a file; ``cfg.arch`` for files
    not in the manifest) of ``task``, on ``cfg.device``, loaded and verified once per process (the model is
    sent to spawned workers as None and ``setup`` reloads it there)."""

    task: ClassVar[str]  # the weights' task, checked by the loader ("segmentation", "quality", ...)
    uses_torch: ClassVar[bool] = True
    transient: ClassVar[tuple[str, ...]] = ("_model",)

    def __init__(self, config):
        from fundus_pipeline.device import resolve_device

        self.cfg = config
        self.device = resolve_device(config.device)
        self.check_precision()
        self._model = None
        self.setup()

    def setup(self) -> None:
        if self._model is None:
            from fundus_pipeline.models.weights import load_model

            self._model, self.spec = load_model(self.cfg.weights, arch=self.cfg.arch, device=self.device, task=self.task, shared=True,
                                                compile=self.cfg.compile)

    def weights_record(self) -> dict:
        """The weights' identity for the configuration record (hashed for ``--resume``)."""
        return {"name": self.spec.name, "model": self.spec.model, "sha256": self.spec.sha256}

    def info(self) -> dict:
        return {"weights_path": str(self.spec.path)}
