"""``fundus sample``: write the bundled sample fundus photograph (shipped inside scikit-image) and a few
degraded versions of it, the quick start's input for ``fundus run``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fundus_pipeline.cli.app import app
from fundus_pipeline.cli.options import flag, path_arg

#: The degraded versions: (file name, ``fundus degrade`` options). Each is exactly what ``fundus degrade
#: retina.png OUT`` writes with these options (same key, same seed streams). Chosen so that the shipped
#: grader sees the whole range: one it still grades good, one usable, two reject (the shipped hemf_4750).
DEMO_VERSIONS = (
    ("retina_cofe111", {"types": "111", "seed": 2}),
    ("retina_moderate", {"recipe": "moderate", "seed": 5}),
    ("retina_severe_a", {"recipe": "severe", "seed": 2}),
    ("retina_severe_b", {"recipe": "severe", "seed": 7}),
)


def degraded_versions(path: Path) -> dict[str, "object"]:
    """{name: uint8 array} of :data:`DEMO_VERSIONS`, made from the photograph at ``path`` with the degrade stage."""
    from fundus_pipeline.config import DegradeConfig
    from fundus_pipeline.runner import decode, prepare_item
    from fundus_pipeline.stages.degrade import DegradeStage

    image = decode(path)
    out = {}
    for name, opts in DEMO_VERSIONS:
        stage = DegradeStage(DegradeConfig.build(**opts))
        out[name] = stage.compute(prepare_item(stage, "retina", {"image": image})).images_now()[""]
    return out


@app.command()
def sample(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Folder to write the photographs into (created).", parser=path_arg)],
    clean_only: Annotated[bool, flag("--clean-only", help="Write only retina.png, without the degraded versions.")] = False,
):
    """Write scikit-image's bundled retina photograph (1411x1411 RGB) as OUT_DIR/retina.png, and four degraded
    versions of it (retina_cofe111, retina_moderate, retina_severe_a, retina_severe_b: the Cofe-Net type 111
    and the moderate and severe recipes, seeded) unless --clean-only. Existing files are kept.

    Example: fundus sample demo && fundus run demo out && xdg-open out/report.html
    """
    import skimage.data

    from fundus_pipeline.errors import FundusError, UsageError
    from fundus_pipeline.io import write_image_atomic

    def exists(p: Path) -> bool:
        """Whether ``p`` is already there (kept); something that is not a file is refused (exit 2)."""
        if not p.exists() and not p.is_symlink():
            return False
        if not p.is_file():
            raise UsageError(f"{p} exists and is not a file; move it away or choose another folder")
        return True

    target = out_dir / "retina.png"
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output path exists and is not a folder: {out_dir}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FundusError(f"cannot create {out_dir}: {e.strerror or e}") from None
    kept = exists(target)
    if kept:
        typer.echo(f"{target} already exists")
    else:
        write_image_atomic(target, skimage.data.retina())
        typer.echo(f"wrote {target}")
    if clean_only:
        return
    names = [out_dir / f"{name}.png" for name, _ in DEMO_VERSIONS]
    if all([exists(p) for p in names]):
        typer.echo(f"the {len(names)} degraded versions already exist")
        return
    try:
        versions = degraded_versions(target)
    except FundusError as e:
        if not kept:
            raise
        raise UsageError(f"{target} was already there and cannot be degraded ({e.message}); move it away or choose another folder") from None
    for name, arr in versions.items():
        p = out_dir / f"{name}.png"
        if not p.exists():
            write_image_atomic(p, arr)
    typer.echo(f"wrote {len(names)} degraded versions: {', '.join(p.name for p in names)}")
