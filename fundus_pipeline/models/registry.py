"""Model registry: ``register_model`` decorates a factory; ``create_model`` builds by name."""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from fundus_pipeline.errors import UsageError


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: Callable[..., nn.Module]
    task: str  # "segmentation", ...
    arch: str  # architecture family, e.g. "imff" or "msrf"
    width: int  # base channel width
    description: str = ""
    default_kwargs: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, *, task: str, arch: str, width: int, description: str = "", **default_kwargs):
    """Register ``factory(**kwargs) -> nn.Module`` under ``name`` (tiny test variants included)."""

    def deco(factory: Callable[..., nn.Module]):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelEntry(name, factory, task, arch, width, description, dict(default_kwargs))
        return factory

    return deco


def _ensure_loaded() -> None:
    # Importing the architecture modules fills the registry.
    from fundus_pipeline.models import imff  # noqa: F401

    try:
        from fundus_pipeline.models import msrf  # noqa: F401
    except ImportError:
        pass


def get_entry(name: str) -> ModelEntry:
    _ensure_loaded()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UsageError(f"unknown model {name!r}.{hint} Run `fundus models` to list them.")
    return _REGISTRY[name]


def list_models(pattern: str = "*", task: str | None = None) -> list[ModelEntry]:
    _ensure_loaded()
    return [
        e
        for n, e in sorted(_REGISTRY.items())
        if fnmatch.fnmatch(n, pattern) and (task is None or e.task == task)
    ]


def build_model(name: str, **kwargs) -> nn.Module:
    """Build an untrained model by registry name (weights are loaded by ``fundus_pipeline.models.weights``)."""
    entry = get_entry(name)
    model = entry.factory(**{**entry.default_kwargs, **kwargs})
    model.registry_name = name  # type: ignore[attr-defined]
    return model
