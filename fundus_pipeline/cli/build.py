"""``fundus build ...``: build the project's derived datasets: the quality set of ``fundus score`` and the grade set of ``fundus grade``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from fundus_pipeline.config import MAX_THREADS
from fundus_pipeline.cli.app import app
from fundus_pipeline.cli.options import Format, FormatOpt, Overwrite, path_arg
from fundus_pipeline.quality.build import DEFAULT_ENHANCERS, PARTS, QualitySetConfig
from fundus_pipeline.quality.grade_set import GradeSetConfig

build_app = typer.Typer(help="Build derived datasets from ../shared/data (seeded, rebuilt bit for bit).", no_args_is_help=True)
app.add_typer(build_app, name="build")

_Q = QualitySetConfig.model_fields
_G = GradeSetConfig.model_fields


def _range(field) -> str:
    """`` (64-2048)`` / `` (>= 0)``: the bounds the configuration's field checks, for its option's help (each
    option states its range alike; campaign 23a L8)."""
    lo = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
    hi = next((m.le for m in field.metadata if hasattr(m, "le")), None)
    return f" ({lo}-{hi})" if lo is not None and hi is not None else f" (>= {lo})" if lo is not None else ""


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def _root_named(data: Path | None) -> str:
    """How the dataset root was given, for a message about it: ``--data``, ``$FUNDUS_DATA`` or the default (an
    incomplete $FUNDUS_DATA was reported as --data, given or not; campaign 30a L7)."""
    return "--data" if data is not None else "$FUNDUS_DATA" if os.environ.get("FUNDUS_DATA") else "the default dataset root"


def _check_build(root: Path, out: Path, parts: tuple[str, ...], limit: int | None, named: str = "--data") -> None:
    """Refuse, before anything is written, an OUT that is a file or that is, lies inside or holds the --data root
    (the datasets are read, never written: a rebuild there removed dataset folders), an empty or repeated
    --parts, and a --data root that lacks a file the chosen parts read (``UsageError``: exit 2)."""
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.quality.build import _limit, part_sources

    from fundus_pipeline.runner import _first_inside

    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT exists and is not a folder: {out}")
    o, r = out.resolve(), root.resolve()
    if _first_inside([out], r) is not None:
        raise UsageError(f"OUT {out} lies inside the dataset root {root}; choose a folder outside it (the datasets are only read)")
    if o in r.parents:
        raise UsageError(f"OUT {out} holds the dataset root {root}; choose a folder outside it (the datasets are only read)")
    if not parts:
        raise UsageError("--parts names no part: give train, test or train,test")
    twice = sorted({p for p in parts if parts.count(p) > 1})
    if twice:
        raise UsageError(f"--parts lists {', '.join(twice)} more than once")
    hint = "the datasets and their layout: ../shared/data/README.md"
    for part in parts:
        try:
            listing = _limit(part_sources(root, part), limit)
        except OSError as e:
            raise UsageError(f"{named} {root} lacks what the {part} part reads: {e.filename or e}", hint) from None
        # only what the builders read: the photograph and its FOV mask (a source's vessel annotation is not read:
        # HRF 11_h, 12_h and 13_h have none, and the test part was refused for it)
        read = [Path(path) for _, info in listing for role, path in info["paths"].items() if role in ("image", "fov")]
        missing = [path for path in read if not path.is_file()]
        if missing:
            raise UsageError(f"{named} {root} lacks {len(missing)} file(s) the {part} part reads, e.g. {missing[0]}", hint)
        # a dataset folder reached through a symbolic link lies outside the resolved root: compare with its files
        held = _first_inside(read, o)
        if held is not None:
            raise UsageError(f"OUT {out} holds {held}, which the {part} part reads; choose a folder outside the datasets")
        # each dataset's own folder (root/DRIVE, ...) as it resolves, not only the folders holding the files read:
        # OUT elsewhere in a linked DRIVE/ had been written into the dataset (campaign 23a M2)
        tops = {os.path.realpath(root / Path(os.path.relpath(path, root)).parts[0]) for path in read
                if not os.path.relpath(path, root).startswith(os.pardir)}
        for folder in sorted(tops | {os.path.realpath(path.parent) for path in read}):
            if _first_inside([out], Path(folder)) is not None:
                raise UsageError(f"OUT {out} lies inside {folder}, a dataset folder the {part} part reads; choose a folder outside it")


@build_app.command("quality-set")
def quality_set(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder (created; an earlier build there is resumed).", show_default=False, parser=path_arg)],
    data: Annotated[
        Optional[Path], typer.Option("--data", help="Dataset root [default: $FUNDUS_DATA or ../shared/data].", show_default=False, parser=path_arg)
    ] = None,
    size: Annotated[int, typer.Option("--size", help="Side of the canonical frame the set lives in (the FOV diameter in pixels)" + _range(_Q["size"]) + ".")] = _Q["size"].default,
    draws: Annotated[int, typer.Option("--draws", help="Degradations per source photograph" + _range(_Q["draws"]) + ".")] = _Q["draws"].default,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every degradation draw" + _range(_Q["seed"]) + ".")] = _Q["seed"].default,
    enhancers: Annotated[
        str, typer.Option("--enhancers", help="Comma-separated enhancers: classical names and shipped enhancement weights names.")
    ] = ",".join(DEFAULT_ENHANCERS),
    parts: Annotated[str, typer.Option("--parts", help="Comma-separated parts to build: train, test.")] = ",".join(PARTS),
    limit: Annotated[
        Optional[int], typer.Option("--limit", help="At most this many sources per dataset and part (quick builds; >= 1).", show_default=False)
    ] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, max=MAX_THREADS, help="CPU threads for the networks (bytes are reproducible for a fixed value).")] = 2,
    overwrite: Overwrite = False,
    fmt: FormatOpt = Format.human,
) -> None:
    """Build the quality set: (degraded, enhanced) pairs of clean photographs with a task-aware label.

    Label of an enhanced image E whose clean original is C: q = (SSIM(E, C) + F1(vessels(E), vessels(C))) / 2
    inside C's FOV (see README, "Quality scoring"). Train part: DRIVE 21-40, HRF 01-05, HEI-MED; test part:
    DRIVE 01-20, HRF 06-15. Writes OUT/pairs.csv, OUT/manifest.json, OUT/degradations.jsonl and the images;
    a rerun resumes. Example: fundus build quality-set sets/quality --draws 2
    """
    from pydantic import ValidationError

    from fundus_pipeline.config import usage_error
    from fundus_pipeline.datasets import default_data_root
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.quality.build import build_quality_set

    root = data or default_data_root()
    if not root.is_dir():
        raise UsageError(f"dataset root not found: {root} (pass --data or set FUNDUS_DATA)")
    try:
        cfg = QualitySetConfig(size=size, draws=draws, seed=seed, enhancers=_names(enhancers), parts=_names(parts), limit=limit)
    except ValidationError as e:
        raise usage_error(e) from None
    _check_build(root, out, cfg.parts, cfg.limit, _root_named(data))
    manifest = build_quality_set(root, out, cfg, overwrite=overwrite, threads=threads, log=lambda m: typer.echo(m, err=True))
    if fmt is Format.json:
        typer.echo(json.dumps(manifest, indent=2))
    else:
        c = manifest["counts"]
        typer.echo("quality set: " + ", ".join(f"{p} {c[p]['sources']} sources / {c[p]['pairs']} pairs" for p in c) + f" -> {out}/pairs.csv")


@build_app.command("grade-set")
def grade_set(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output folder (created; an earlier build there is resumed).", show_default=False, parser=path_arg)],
    data: Annotated[
        Optional[Path], typer.Option("--data", help="Dataset root [default: $FUNDUS_DATA or ../shared/data].", show_default=False, parser=path_arg)
    ] = None,
    size: Annotated[int, typer.Option("--size", help="Side of the canonical frame where labels are computed" + _range(_G["size"]) + ".")] = _G["size"].default,
    store_size: Annotated[int, typer.Option("--store-size", help="Side of the images written" + _range(_G["store_size"]) + ".")] = _G["store_size"].default,
    draws: Annotated[int, typer.Option("--draws", help="Degradations per source photograph" + _range(_G["draws"]) + ".")] = _G["draws"].default,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every degradation draw" + _range(_G["seed"]) + ".")] = _G["seed"].default,
    parts: Annotated[str, typer.Option("--parts", help="Comma-separated parts to build: train, test.")] = ",".join(PARTS),
    limit: Annotated[
        Optional[int], typer.Option("--limit", help="At most this many sources per dataset and part (quick builds; >= 1).", show_default=False)
    ] = None,
    threads: Annotated[int, typer.Option("--threads", min=1, max=MAX_THREADS, help="CPU threads for the segmenter (bytes are reproducible for a fixed value).")] = 2,
    overwrite: Overwrite = False,
    fmt: FormatOpt = Format.human,
) -> None:
    """Build the grade set: clean and degraded photographs with a grade and flags, plus not-fundus pictures.

    Grade of a degraded photograph D of clean C: from q(D) = (SSIM(D, C) + F1(vessels(D), vessels(C))) / 2,
    Good q >= 0.90, Reject q < 0.70, Usable between; flags: what the simulator applied (see README, "Quality
    grading"). Same parts and sources as the quality set. Writes OUT/labels.csv, OUT/manifest.json,
    OUT/degradations.jsonl and OUT/PART/images; a rerun resumes. Example: fundus build grade-set sets/grade
    """
    from pydantic import ValidationError

    from fundus_pipeline.config import usage_error
    from fundus_pipeline.datasets import default_data_root
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.quality.grade_set import build_grade_set

    root = data or default_data_root()
    if not root.is_dir():
        raise UsageError(f"dataset root not found: {root} (pass --data or set FUNDUS_DATA)")
    try:
        cfg = GradeSetConfig(size=size, store_size=store_size, draws=draws, seed=seed, parts=_names(parts), limit=limit)
    except ValidationError as e:
        raise usage_error(e) from None
    _check_build(root, out, cfg.parts, cfg.limit, _root_named(data))
    manifest = build_grade_set(root, out, cfg, overwrite=overwrite, threads=threads, log=lambda m: typer.echo(m, err=True))
    if fmt is Format.json:
        typer.echo(json.dumps(manifest, indent=2))
    else:
        c = manifest["counts"]
        typer.echo("grade set: " + ", ".join(f"{p} {c[p]['sources']} sources / {c[p]['images']} images (" + ", ".join(f"{n} {g}" for g, n in c[p]['grades'].items()) + ")" for p in c) + f" -> {out}/labels.csv")
