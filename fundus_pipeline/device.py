"""Device selection: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""

from __future__ import annotations

import torch

from fundus_pipeline.errors import UsageError


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} requested but no CUDA GPU is available; use --device cpu or auto")
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise UsageError(f"invalid --device {name!r}") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    raise UsageError(f"invalid --device {name!r}: use auto, cpu, cuda or cuda:N")


PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(device: torch.device | str, precision: str = "fp32"):
    """The context the forward passes run in: nothing for ``fp32``; ``torch.autocast`` to bfloat16 or float16
    otherwise (convolutions and matrix products in the low precision, reductions in float32). float16 is
    CUDA-only; bfloat16 works on CPU too (slower there than float32 on most CPUs: for checks only). The
    stages convert every network output to float32 before using it, so the precision changes numbers within
    the tolerance measured by ``benchmarks/gpu.py``, never the code path."""
    import contextlib

    if precision not in PRECISIONS:
        raise UsageError(f"invalid precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``: from pinned (page-locked) memory with a non-blocking copy when the device is a
    GPU, so that the copy of the next batch overlaps the computation of this one; unchanged on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return t if t.device == device else t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
