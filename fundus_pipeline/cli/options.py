"""Option types shared by the commands (defined once, as Typer ``Annotated`` aliases)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class EngineName(str, Enum):
    """Where a stage's items are processed: this machine's processes, or the actors of a Ray cluster."""

    local = "local"
    ray = "ray"


class Format(str, Enum):
    """What a command prints on stdout: a human summary, or exactly one JSON document."""

    human = "human"
    json = "json"


def path_arg(text: str) -> Path:
    """A path argument; an empty one is refused (``Path("")`` would be the working folder: ``fundus degrade
    "$IN" out`` with an unset ``$IN`` must not read or write ``.``)."""
    if not text:
        raise typer.BadParameter("empty; give a folder or file name")
    return Path(text)


def flag(*names: str, help: str) -> typer.models.OptionInfo:
    """A boolean on/off flag (``--overlay``); shown without a value in ``--help``."""
    return typer.Option(*names, help=help, metavar="")


InPath = Annotated[
    Path,
    typer.Argument(
        metavar="IN",
        parser=path_arg,
        help="Input: a folder of fundus images (searched recursively), one image file, or a text file listing image paths (one a line, relative to the list's folder).",
        show_default=False,
    ),
]
OutDir = Annotated[Path, typer.Argument(metavar="OUT", parser=path_arg, help="Output folder (created; must not be inside the input folder).", show_default=False)]
Workers = Annotated[
    int,
    typer.Option(
        "--workers",
        "-j",
        help="Parallel worker processes, 1-512; each gets cores/workers CPU threads unless --threads is given. Results do not depend on "
        "it at a given --threads (in a network stage the thread count can move a 16-bit output by one level; the manifest records "
        "threads_used).",
    ),
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", help="CPU threads per worker, 1-1024 [default: available cores / workers].", show_default=False),
]
Resume = Annotated[bool, flag("--resume", help="Continue an earlier run in OUT: finished items are skipped.")]
Overwrite = Annotated[bool, flag("--overwrite", help="Allow a non-empty OUT and replace outputs of the same name.")]
FormatOpt = Annotated[Format, typer.Option("--format", help="human: short summary; json: one JSON summary on stdout.")]
Quiet = Annotated[bool, flag("--quiet", "-q", help="No progress output on stderr (errors are still printed).")]
Device = Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")]
Precision = Annotated[
    str,
    typer.Option(
        "--precision",
        help="Forward passes in fp32, or under autocast in bf16 or fp16 (fp16 needs CUDA; bf16 also runs on a CPU): faster on a GPU, results within the tolerance "
        "benchmarks/gpu.py measures for each stage (segment: vessel F1 0.002; enhance: PSNR 0.05 dB); slower on most CPUs.",
    ),
]
COMPILE_HELP = (
    "torch.compile the network(s): compiled at the first batch in each worker, and again when a batch or image shape first "
    "differs (a smaller last batch, another photograph size: torch.compile then makes the shape dynamic; 0.5-1.5 minutes per "
    "compile and model on 2 CPU cores; later runs reuse the compile cache), then faster forward passes (measured on 2 CPU cores for segment's IMFF-Net "
    "1.06x and enhance's Cofe-Net 1.26x; benchmarks/gpu.py --compile measures a stage); "
    "outputs agree with the uncompiled ones to float rounding, so it is recorded in the manifest."
)
Compile = Annotated[bool, flag("--compile", help=COMPILE_HELP)]
Engine = Annotated[
    EngineName,
    typer.Option(
        "--engine",
        help="local: this machine's worker processes; ray: the actors of a Ray cluster (--workers actors per stage, --threads CPUs each; "
        "pip install 'fundus-pipeline[ray]'). Results do not depend on it.",
    ),
]
Address = Annotated[
    str | None,
    typer.Option("--address", help="With --engine ray: the Ray cluster to use (the address `ray start --head` prints, or auto) [default: start a local Ray instance].", show_default=False),
]
