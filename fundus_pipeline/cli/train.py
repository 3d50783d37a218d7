"""``fundus train ...``: training commands. Options, defaults and help texts come from the task's pydantic
config (``fundus_pipeline.train.config``), which also holds every option check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fundus_pipeline.cli.app import app
from fundus_pipeline.cli.options import flag
from fundus_pipeline.train.config import SegmentConfig

train_app = typer.Typer(help="Train the models on real data (see weights/README.md for the exact commands).", no_args_is_help=True)
app.add_typer(train_app, name="train")

_F = SegmentConfig.model_fields


def _opt(field: str, **kw) -> typer.models.OptionInfo:
    """A typed option named after the config field, with its description as help."""
    return typer.Option("--" + field.replace("_", "-"), help=_F[field].description, **kw)


def _flag(field: str) -> typer.models.OptionInfo:
    return flag("--" + field.replace("_", "-"), help=_F[field].description)


@train_app.command("segment")
def train_segment(
    out: Annotated[Path, _opt("out", show_default=False)],
    arch: Annotated[str, _opt("arch")] = _F["arch"].default,
    data: Annotated[Optional[Path], _opt("data", show_default=False)] = None,
    steps: Annotated[int, _opt("steps")] = _F["steps"].default,
    batch_size: Annotated[int, _opt("batch_size")] = _F["batch_size"].default,
    patch: Annotated[int, _opt("patch")] = _F["patch"].default,
    lr: Annotated[float, _opt("lr")] = _F["lr"].default,
    seed: Annotated[int, _opt("seed")] = _F["seed"].default,
    val_every: Annotated[int, _opt("val_every")] = _F["val_every"].default,
    ckpt_every: Annotated[int, _opt("ckpt_every")] = _F["ckpt_every"].default,
    threads: Annotated[int, _opt("threads")] = _F["threads"].default,
    device: Annotated[str, _opt("device")] = _F["device"].default,
    amp: Annotated[bool, _flag("amp")] = False,
    degrade_p: Annotated[float, _opt("degrade_p")] = _F["degrade_p"].default,
    degrade_copies: Annotated[int, _opt("degrade_copies")] = _F["degrade_copies"].default,
    init: Annotated[Optional[Path], _opt("init", show_default=False)] = None,
    resume: Annotated[bool, _flag("resume")] = False,
):
    """Train a vessel segmenter (IMFF-Net, MSRF-Net) on DRIVE + HRF training images.

    Writes OUT/last.pt (resumable), OUT/best.pt (best validation F1), OUT/train.log and OUT/summary.json;
    export with scripts/export_weights.py. Example:
    fundus train segment --arch imff --out runs/imff --steps 5000 --threads 2
    """
    cfg = SegmentConfig.from_options(
        out=out, arch=arch, data=data, steps=steps, batch_size=batch_size, patch=patch, lr=lr, seed=seed,
        val_every=val_every, ckpt_every=ckpt_every, threads=threads, device=device, amp=amp,
        degrade_p=degrade_p, degrade_copies=degrade_copies, init=init, resume=resume,
    )  # fmt: skip
    from fundus_pipeline.train.segment import train

    train(cfg)
