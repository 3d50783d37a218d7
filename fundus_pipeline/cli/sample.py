"""``fundus sample``: write the bundled sample fundus photograph (shipped inside scikit-image)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fundus_pipeline.cli.app import app


@app.command()
def sample(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write retina.png into (created).")],
):
    """Write scikit-image's bundled retina photograph (1411x1411 RGB) as OUT_DIR/retina.png.

    Example: fundus sample samples && fundus degrade samples degraded --types all
    """
    import skimage.data

    from fundus_pipeline.errors import FundusError
    from fundus_pipeline.io import write_image_atomic

    target = out_dir / "retina.png"
    if target.exists():
        typer.echo(f"{target} already exists")
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FundusError(f"cannot create {out_dir}: {e.strerror or e}") from None
    write_image_atomic(target, skimage.data.retina())
    typer.echo(f"wrote {target}")
