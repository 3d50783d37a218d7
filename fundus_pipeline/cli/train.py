"""``fundus train ...``: training commands. Options, defaults and help texts come from the task's pydantic
config (``fundus_pipeline.train.config``), which also holds every option check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fundus_pipeline.cli.app import app
from fundus_pipeline.cli.options import flag, path_arg
from fundus_pipeline.train.config import EnhanceConfig, GradeConfig, PretextConfig, ScoreConfig, SegmentConfig

train_app = typer.Typer(help="Train the models on real data (see weights/README.md for the exact commands).", no_args_is_help=True)
app.add_typer(train_app, name="train")

_F = SegmentConfig.model_fields
_E = EnhanceConfig.model_fields
_P = PretextConfig.model_fields
_S = ScoreConfig.model_fields
_G = GradeConfig.model_fields


def _opt(field: str, fields=_F, **kw) -> typer.models.OptionInfo:
    """A typed option named after the config field, with its description as help; a path option refuses an empty
    value (``Path("")`` is the working folder: ``--out "$RUN"`` with ``$RUN`` unset trained there; campaign 30a M1)."""
    ann = fields[field].annotation
    if ann is Path or Path in getattr(ann, "__args__", ()):
        kw.setdefault("parser", path_arg)
    return typer.Option("--" + field.replace("_", "-"), help=fields[field].description, **kw)


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


def _e(field: str, **kw) -> typer.models.OptionInfo:
    return _opt(field, _E, **kw)


@train_app.command("enhance")
def train_enhance(
    out: Annotated[Path, _e("out", show_default=False)],
    arch: Annotated[str, _e("arch")] = _E["arch"].default,
    data: Annotated[Optional[Path], _e("data", show_default=False)] = None,
    steps: Annotated[int, _e("steps")] = _E["steps"].default,
    batch_size: Annotated[int, _e("batch_size")] = _E["batch_size"].default,
    size: Annotated[int, _e("size")] = _E["size"].default,
    crop: Annotated[int, _e("crop")] = _E["crop"].default,
    lr: Annotated[float, _e("lr")] = _E["lr"].default,
    seed: Annotated[int, _e("seed")] = _E["seed"].default,
    val_every: Annotated[int, _e("val_every")] = _E["val_every"].default,
    ckpt_every: Annotated[int, _e("ckpt_every")] = _E["ckpt_every"].default,
    threads: Annotated[int, _e("threads")] = _E["threads"].default,
    device: Annotated[str, _e("device")] = _E["device"].default,
    amp: Annotated[bool, _flag("amp")] = False,
    clean_p: Annotated[float, _e("clean_p")] = _E["clean_p"].default,
    family_weights: Annotated[str, _e("family_weights")] = "1,1,1",
    disc_weight: Annotated[float, _e("disc_weight")] = _E["disc_weight"].default,
    vessel_weight: Annotated[float, _e("vessel_weight")] = _E["vessel_weight"].default,
    rsa_init: Annotated[str, _e("rsa_init")] = _E["rsa_init"].default,
    seg_weight: Annotated[float, _e("seg_weight")] = _E["seg_weight"].default,
    datasets: Annotated[str, _e("datasets")] = ",".join(_E["datasets"].default),
    deploy_sigma: Annotated[float, _e("deploy_sigma")] = _E["deploy_sigma"].default,
    select: Annotated[str, _e("select")] = _E["select"].default,
    cache: Annotated[Optional[Path], _e("cache", show_default=False)] = None,
    init: Annotated[Optional[Path], _e("init", show_default=False)] = None,
    resume: Annotated[bool, _flag("resume")] = False,
):
    """Train a fundus enhancer (Cofe-Net, its ablations, the U-Net baseline) on clean training photographs
    (DRIVE 21-40, HRF 01-05, HEI-MED) degraded on the fly by the degradation library.

    Writes OUT/last.pt (resumable), OUT/best.pt (best validation PSNR, or vessel F1 with --select vessel_f1), OUT/train.log and OUT/summary.json.
    Example: fundus train enhance --arch cofe --out runs/cofe --steps 3000 --threads 2
    """
    cfg = EnhanceConfig.from_options(
        out=out, arch=arch, data=data, steps=steps, batch_size=batch_size, size=size, crop=crop, lr=lr, seed=seed,
        val_every=val_every, ckpt_every=ckpt_every, threads=threads, device=device, amp=amp, clean_p=clean_p,
        family_weights=family_weights, disc_weight=disc_weight, vessel_weight=vessel_weight, rsa_init=rsa_init, seg_weight=seg_weight,
        datasets=datasets, deploy_sigma=deploy_sigma, select=select, cache=cache, init=init, resume=resume,
    )  # fmt: skip
    from fundus_pipeline.train.enhance import train

    train(cfg)


def _p(field: str, **kw) -> typer.models.OptionInfo:
    return _opt(field, _P, **kw)


@train_app.command("pretext")
def train_pretext(
    out: Annotated[Path, _p("out", show_default=False)],
    arch: Annotated[str, _p("arch")] = _P["arch"].default,
    data: Annotated[Optional[Path], _p("data", show_default=False)] = None,
    steps: Annotated[int, _p("steps")] = _P["steps"].default,
    batch_size: Annotated[int, _p("batch_size")] = _P["batch_size"].default,
    size: Annotated[int, _p("size")] = _P["size"].default,
    pool_draws: Annotated[int, _p("pool_draws")] = _P["pool_draws"].default,
    clean_p: Annotated[float, _p("clean_p")] = _P["clean_p"].default,
    lr: Annotated[float, _p("lr")] = _P["lr"].default,
    seed: Annotated[int, _p("seed")] = _P["seed"].default,
    val_every: Annotated[int, _p("val_every")] = _P["val_every"].default,
    ckpt_every: Annotated[int, _p("ckpt_every")] = _P["ckpt_every"].default,
    threads: Annotated[int, _p("threads")] = _P["threads"].default,
    device: Annotated[str, _p("device")] = _P["device"].default,
    amp: Annotated[bool, _flag("amp")] = False,
    cache: Annotated[Optional[Path], _p("cache", show_default=False)] = None,
    init: Annotated[Optional[Path], _p("init", show_default=False)] = None,
    resume: Annotated[bool, _flag("resume")] = False,
):
    """Train the ViT stream of the quality scorer on a self-supervised pretext task: from a 224 crop of a
    training photograph degraded by the simulator, predict which operations were applied and how strongly.

    Writes OUT/last.pt (resumable), OUT/best.pt (lowest validation loss), OUT/train.log and OUT/summary.json.
    Example: fundus train pretext --out runs/vit --steps 1500 --threads 2
    """
    cfg = PretextConfig.from_options(
        out=out, arch=arch, data=data, steps=steps, batch_size=batch_size, size=size, pool_draws=pool_draws, clean_p=clean_p,
        lr=lr, seed=seed, val_every=val_every, ckpt_every=ckpt_every, threads=threads, device=device, amp=amp, cache=cache,
        init=init, resume=resume,
    )  # fmt: skip
    from fundus_pipeline.train.score import train_pretext as run

    run(cfg)


def _s(field: str, **kw) -> typer.models.OptionInfo:
    return _opt(field, _S, **kw)


@train_app.command("score")
def train_score(
    out: Annotated[Path, _s("out", show_default=False)],
    quality_set: Annotated[Path, _s("quality_set", show_default=False)],
    arch: Annotated[str, _s("arch")] = _S["arch"].default,
    steps: Annotated[int, _s("steps")] = _S["steps"].default,
    batch_size: Annotated[int, _s("batch_size")] = _S["batch_size"].default,
    size: Annotated[int, _s("size")] = _S["size"].default,
    lr: Annotated[float, _s("lr")] = _S["lr"].default,
    seed: Annotated[int, _s("seed")] = _S["seed"].default,
    val_every: Annotated[int, _s("val_every")] = _S["val_every"].default,
    val_stride: Annotated[int, _s("val_stride")] = _S["val_stride"].default,
    select: Annotated[str, _s("select")] = _S["select"].default,
    gain_weight: Annotated[float, _s("gain_weight")] = _S["gain_weight"].default,
    ckpt_every: Annotated[int, _s("ckpt_every")] = _S["ckpt_every"].default,
    threads: Annotated[int, _s("threads")] = _S["threads"].default,
    device: Annotated[str, _s("device")] = _S["device"].default,
    amp: Annotated[bool, _flag("amp")] = False,
    cnn_init: Annotated[str, _s("cnn_init")] = _S["cnn_init"].default,
    vit_init: Annotated[str, _s("vit_init")] = _S["vit_init"].default,
    init: Annotated[Optional[Path], _s("init", show_default=False)] = None,
    resume: Annotated[bool, _flag("resume")] = False,
):
    """Train the full-reference quality scorer (SDMP-Net or an ablation) on a quality set's train split.

    The frozen streams come from the shipped segmenter (--cnn-init) and the pretext ViT (--vit-init).
    Writes OUT/last.pt (resumable), OUT/best.pt (best validation SROCC; the mean of the per-camera SROCCs
    with --select srocc_camera_mean; the label the trust gate delivers with --select gate), OUT/train.log and
    OUT/summary.json. --gain-weight W adds W x the MSE of the predicted gain over the input.
    Example: fundus train score --quality-set sets/quality --out runs/sdmp --steps 1500 --threads 2
    """
    cfg = ScoreConfig.from_options(
        out=out, quality_set=quality_set, arch=arch, steps=steps, batch_size=batch_size, size=size, lr=lr, seed=seed,
        val_every=val_every, val_stride=val_stride, select=select, gain_weight=gain_weight, ckpt_every=ckpt_every, threads=threads,
        device=device, amp=amp, cnn_init=cnn_init, vit_init=vit_init, init=init, resume=resume,
    )  # fmt: skip
    from fundus_pipeline.train.score import train_score as run

    run(cfg)


def _g(field: str, **kw) -> typer.models.OptionInfo:
    return _opt(field, _G, **kw)


@train_app.command("grade")
def train_grade(
    out: Annotated[Path, _g("out", show_default=False)],
    grade_set: Annotated[Path, _g("grade_set", show_default=False)],
    arch: Annotated[str, _g("arch")] = _G["arch"].default,
    data: Annotated[Optional[Path], _g("data", show_default=False)] = None,
    steps: Annotated[int, _g("steps")] = _G["steps"].default,
    batch_size: Annotated[int, _g("batch_size")] = _G["batch_size"].default,
    real_p: Annotated[float, _g("real_p")] = _G["real_p"].default,
    natural_p: Annotated[float, _g("natural_p")] = _G["natural_p"].default,
    grey_p: Annotated[float, _g("grey_p")] = _G["grey_p"].default,
    lr: Annotated[float, _g("lr")] = _G["lr"].default,
    seed: Annotated[int, _g("seed")] = _G["seed"].default,
    val_every: Annotated[int, _g("val_every")] = _G["val_every"].default,
    ckpt_every: Annotated[int, _g("ckpt_every")] = _G["ckpt_every"].default,
    threads: Annotated[int, _g("threads")] = _G["threads"].default,
    device: Annotated[str, _g("device")] = _G["device"].default,
    amp: Annotated[bool, _flag("amp")] = False,
    init: Annotated[Optional[Path], _g("init", show_default=False)] = None,
    resume: Annotated[bool, _flag("resume")] = False,
):
    """Train the no-reference grader (HEMF, an ablation or the CNN baseline) on a grade set and EyePACS-256.

    Writes OUT/last.pt (resumable), OUT/best.pt (best validation macro F1), OUT/calibration.json (the
    temperature fitted on the validation images), OUT/train.log and OUT/summary.json.
    Example: fundus train grade --grade-set sets/grade --out runs/hemf --steps 1500 --threads 2
    """
    cfg = GradeConfig.from_options(
        out=out, grade_set=grade_set, arch=arch, data=data, steps=steps, batch_size=batch_size, real_p=real_p,
        natural_p=natural_p, grey_p=grey_p, lr=lr, seed=seed, val_every=val_every, ckpt_every=ckpt_every, threads=threads,
        device=device, amp=amp, init=init, resume=resume,
    )  # fmt: skip
    from fundus_pipeline.train.grade import train_grade as run

    run(cfg)
