"""Model registry: ``register_model`` decorates a factory; ``build_model`` builds by name.

Registration is explicit: ``_ensure_loaded`` imports the architecture modules (an ImportError there is
a real error and propagates). Each registered name must match its row in the torch-free catalogue
(``fundus_pipeline.models.catalog``), which ``fundus models`` reads without importing torch.
This module itself does not import torch.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from fundus_pipeline.errors import UsageError
from fundus_pipeline.models.catalog import CATALOG

if TYPE_CHECKING:
    import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    task: str  # "segmentation", ...
    arch: str  # architecture family, e.g. "imff" or "msrf"
    width: int  # base channel width
    description: str = ""

    @property
    def factory_path(self) -> str:
        """``"module:function"``, as written in the catalogue."""
        return f"{self.factory.__module__}:{self.factory.__qualname__}"


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, task: str, arch: str, width: int, description: str = ""):
    """Register ``factory(**kwargs) -> nn.Module`` under ``name`` (tiny test variants included).

    A name listed in the catalogue must agree with its row (task, arch, width, description, factory).
    """

    def deco(factory: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        entry = ModelEntry(name, factory, task, arch, width, description)
        row = CATALOG.get(name)
        if row is not None:
            diff = [
                f"{f}={getattr(entry, a)!r} (catalogue: {getattr(row, f)!r})"
                for f, a in (("task", "task"), ("arch", "arch"), ("width", "width"), ("description", "description"), ("factory", "factory_path"))
                if getattr(entry, a) != getattr(row, f)
            ]
            if diff:
                raise ValueError(f"model {name!r} disagrees with fundus_pipeline/models/catalog.py: {'; '.join(diff)}")
        _REGISTRY[name] = entry
        return factory

    return deco


def _ensure_loaded() -> None:
    # Importing the architecture modules fills the registry (no-op after the first call).
    from fundus_pipeline.models import cofe, hemf, imff, msrf, sdmp  # noqa: F401


def get_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown model {name!r}.{hint} Run `fundus models` to list them.")
    return _REGISTRY[name]


def list_models(pattern: str = "*", task: str | None = None) -> list[ModelEntry]:
    """The registered architectures whose name matches ``pattern`` (fnmatch), of ``task`` when given (a task no
    architecture has is a ``ValueError`` naming those there are, not an empty list)."""
    _ensure_loaded()
    if task is not None and task not in {e.task for e in _REGISTRY.values()}:
        raise ValueError(f"no architecture has the task {task!r}; the tasks: {', '.join(sorted({e.task for e in _REGISTRY.values()}))}")
    return [e for n, e in sorted(_REGISTRY.items()) if fnmatch.fnmatch(n, pattern) and (task is None or e.task == task)]


def build_model(name: str, **kwargs) -> nn.Module:
    """Build an untrained model by registry name (weights are loaded by ``fundus_pipeline.models.weights``)."""
    return get_entry(name).factory(**kwargs)
