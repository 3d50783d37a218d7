"""Weights: plain state dicts, verified by sha256 against ``weights/manifest.json``.

A weights file is accepted when its sha256 is listed in the manifest (the manifest then gives its
architecture, preprocessing and decision threshold), or, for weights you trained yourself, when you
name the architecture with ``--arch`` (threshold 0.5 unless given). Pickled modules are never loaded:
``torch.load(..., weights_only=True)`` only.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import torch

from fundus_pipeline.errors import WeightsError
from fundus_pipeline.models.registry import build_model, get_entry


def weights_dir() -> Path:
    env = os.environ.get("FUNDUS_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "weights"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: Path | None = None) -> list[dict]:
    path = (directory or weights_dir()) / "manifest.json"
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())["weights"]
    except (OSError, ValueError, KeyError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None


def resolve_weights(value: str | Path) -> Path:
    """A registered weights name (``imff``) or a path."""
    p = Path(value)
    if p.is_dir():
        raise WeightsError(f"weights path is a folder, not a file: {value}")
    if p.exists():
        return p
    for spec in read_manifest():
        if spec["name"] == str(value):
            return weights_dir() / spec["file"]
    raise WeightsError(f"weights not found: {value}", "pass a .pt state-dict file or a name from `fundus models`")


def lookup_spec(path: Path) -> tuple[dict | None, str]:
    try:
        digest = sha256_file(path)
    except OSError as e:
        raise WeightsError(f"cannot read weights {path}: {e.strerror or e}") from None
    specs = read_manifest()
    for spec in specs:
        if spec["sha256"] == digest:
            return spec, digest
    for spec in specs:
        if spec["file"] == path.name and path.resolve().parent == weights_dir().resolve():
            raise WeightsError(f"{path} does not match its sha256 in weights/manifest.json (corrupt or modified file)")
    return None, digest


def load_state_dict(path: Path) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise WeightsError(f"{path} is a pickled object, not a plain state dict; pickled modules are refused for safety", "convert it once in a trusted environment: torch.save(model.state_dict(), 'new.pt')") from None
        raise WeightsError(f"cannot read weights {path}: corrupt or not a PyTorch file ({type(e).__name__})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # a training checkpoint (last.pt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return sd


def load_model(weights: str | Path, *, arch: str | None = None, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Build the architecture, load verified weights, return (model in eval mode, spec)."""
    path = resolve_weights(weights)
    spec, digest = lookup_spec(path)
    if spec is None:
        if not arch:
            raise WeightsError(
                f"{path} (sha256 {digest[:12]}...) is not listed in weights/manifest.json",
                "for weights you trained yourself, name the architecture with --arch (e.g. --arch imff)",
            )
        spec = {"name": path.stem, "model": arch, "file": str(path), "sha256": digest, "output": {"threshold": 0.5}, "input": {}}
    elif arch and arch != spec["model"]:
        raise WeightsError(f"{path} holds weights for {spec['model']!r}, not {arch!r}")
    get_entry(spec["model"])  # a clear error for an unknown architecture
    model = build_model(spec["model"])
    sd = load_state_dict(path)
    want, got = set(model.state_dict()), set(sd)
    if want != got:
        missing, unexpected = sorted(want - got), sorted(got - want)
        raise WeightsError(
            f"{path} does not fit architecture {spec['model']!r}: {len(missing)} missing and {len(unexpected)} unexpected tensors"
            + (f" (e.g. missing {missing[0]})" if missing else "")
            + (f" (e.g. unexpected {unexpected[0]})" if unexpected else "")
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not fit architecture {spec['model']!r}: {str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    model.to(device).eval()
    return model, {**spec, "sha256": digest, "path": str(path)}
