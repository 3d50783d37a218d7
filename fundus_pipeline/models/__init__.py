"""Model architectures, registry and weights handling.

>>> from fundus_pipeline.models import create_model, list_models
>>> model = create_model("imff", weights="imff")          # shipped, sha256-verified weights, eval mode
>>> tiny = create_model("imff_tiny")                       # untrained architecture (e.g. for tests)

Importing this package does not import torch (``fundus models`` lists the catalogue without it);
building a model does.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fundus_pipeline.models.registry import build_model, get_entry, list_models, register_model

if TYPE_CHECKING:
    import torch

__all__ = ["create_model", "list_models", "register_model"]


def create_model(name: str, *, weights: str | Path | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Build the registered architecture ``name``; with ``weights`` (a shipped weights name or a
    state-dict file) load them after verifying their sha256 / architecture. Returns the model in eval
    mode on ``device``."""
    get_entry(name)
    if weights is None:
        return build_model(name).to(device).eval()
    from fundus_pipeline.models.weights import load_model

    model, _ = load_model(weights, arch=name, device=device)
    return model
