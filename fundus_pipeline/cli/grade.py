"""``fundus grade``: a no-reference grade (Good / Usable / Reject) of each photograph and what is wrong with it."""

from __future__ import annotations

import csv
import filecmp
import os
import uuid
from pathlib import Path
from typing import Annotated, Optional

import typer

from fundus_pipeline.cli.app import app, run_stage_command
from fundus_pipeline.cli.options import Address, Compile, Device, Precision, Engine, EngineName, Format, FormatOpt, InPath, OutDir, Overwrite, Quiet, Resume, Threads, Workers, flag
from fundus_pipeline.config import GradeConfig, default
from fundus_pipeline.errors import UsageError
from fundus_pipeline.io import _temp_name
from fundus_pipeline.quality.grading import GRADES


#: The sort's own record of the copies it wrote (``{"key", "path", "sha256"}`` a line, the newest last): a copy is
#: removed from another class folder only when it is one of them, unchanged since (or, for copies of an older
#: sort, when its bytes are the input's).
SORTED = ".fundus-sorted.jsonl"


def sort_into(out_dir: Path) -> dict[str, int]:
    """Copy (never move) each input graded in ``OUT/results.csv`` into ``OUT/<grade>/KEY<suffix>``, with its
    original bytes; each copy is written to a temporary name and renamed, so a rerun replaces it whole. A copy
    of the same key left in another grade's folder by an earlier sort (a regraded item, or one whose photograph
    was retaken under the same name) is removed when the sort's record (``SORTED``) says it wrote those bytes
    there, or, for a key the record does not name, when its bytes are the input's: a file the sort did not write,
    or one changed since, is left alone."""
    import hashlib
    import json

    from fundus_pipeline.io import open_atomic
    from fundus_pipeline.runner import check_inside, json_lines, plain_name

    check_sort_folders(out_dir)
    counts = {g: 0 for g in GRADES}
    written: dict[str, dict] = {}  # path: its record, the newest
    for r in json_lines(out_dir / SORTED):
        if isinstance(r.get("key"), str) and plain_name(r.get("path")) and isinstance(r.get("sha256"), str):
            written[r["path"]] = r
    by_key: dict[str, list[str]] = {}
    for path, r in written.items():
        by_key.setdefault(r["key"], []).append(path)
    # the table is UTF-8 with surrogate escapes, as it was written (campaign 24b F4: it was read in the locale's
    # encoding); each name is turned back into the one the file system gave (``_fs_name``)
    with open(out_dir / "results.csv", newline="", encoding="utf-8", errors="surrogateescape") as f, \
            open(out_dir / SORTED, "a", encoding="utf-8", errors="surrogateescape") as record:
        for row in csv.DictReader(f):
            if row.get("status") != "ok" or row.get("grade") not in counts:
                continue
            src = Path(_fs_name(row["input"]))
            rel = f"{_fs_name(row['key'])}{src.suffix}"  # below the class folder
            dst = out_dir / row["grade"] / rel
            check_inside(out_dir, dst.relative_to(out_dir).as_posix())  # a linked sub-folder of a class folder (review 19 R2)
            dst.parent.mkdir(parents=True, exist_ok=True)
            # a key the record names: only the record says what the sort wrote (a copy the user put elsewhere is
            # kept, review 23 R23-3); a key it does not name may have a copy of an older sort, which kept no record
            # (or one of a sort this key failed in): removed when its bytes are the input's (review 24 R24-5: the
            # rule was per folder, so a key first sorted after the record began kept its older stale copy)
            for g in GRADES if row["key"] not in by_key else ():
                stale = out_dir / g / rel
                if g != row["grade"] and _removable(out_dir, stale, src) and filecmp.cmp(stale, src, shallow=False):
                    stale.unlink()
            for path in by_key.get(row["key"], ()):  # one this sort wrote, unchanged since (campaign 24b F1)
                stale = out_dir / path
                if path != dst.relative_to(out_dir).as_posix() and _removable(out_dir, stale, src) and _sha256(stale) == written[path]["sha256"]:
                    stale.unlink()
            tmp = dst.with_name(_temp_name(dst.name, uuid.uuid4().hex[:12]))  # the name a later run's clean-up knows
            h = hashlib.sha256()
            with open(src, "rb") as a, open(tmp, "wb") as b:
                for chunk in iter(lambda: a.read(1 << 20), b""):
                    h.update(chunk)
                    b.write(chunk)
            os.replace(tmp, dst)
            entry = {"key": row["key"], "path": dst.relative_to(out_dir).as_posix(), "sha256": h.hexdigest()}
            record.write(json.dumps(entry) + "\n")
            record.flush()
            written[entry["path"]] = entry
            counts[row["grade"]] += 1
    with open_atomic(out_dir / SORTED) as f:  # the record of the copies still in place, once each
        for path, r in sorted(written.items()):
            if (out_dir / path).is_file():
                f.write(json.dumps(r) + "\n")
    return counts


def _fs_name(text: str) -> str:
    """A name read back from results.csv as the file system gave it: the table holds it UTF-8 encoded (with surrogate
    escapes), which reads back as the same name wherever the file system's encoding can write it (UTF-8, Latin-1);
    under an ASCII locale (``LC_ALL=C`` without UTF-8 mode) a non-ASCII name came as escaped bytes, and is so again."""
    try:
        os.fsencode(text)
        return text
    except UnicodeEncodeError:
        return os.fsdecode(text.encode("utf-8", "surrogateescape"))


def _removable(out_dir: Path, stale: Path, src: Path) -> bool:
    """A file of a class folder that a sort may remove: a plain file (no link, not through one) that is not the input itself."""
    from fundus_pipeline.errors import InputError
    from fundus_pipeline.runner import check_inside

    if not stale.is_file() or stale.is_symlink() or _same_file(stale, src):
        return False
    try:
        check_inside(out_dir, stale.relative_to(out_dir).as_posix())
    except (InputError, ValueError):
        return False
    return stale.relative_to(out_dir).parts[0] in GRADES


def _sha256(path: Path) -> str | None:
    from fundus_pipeline.models.weights import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_sort_folders(out_dir: Path) -> None:
    """``--sort-into`` copies into OUT/good, OUT/usable and OUT/reject: each must be a folder of OUT's own or
    absent, never a symbolic link (one to the input folder made the clean-up of stale copies delete an input,
    and copies replace files there; campaign 19a F2)."""
    for g in GRADES:
        p = out_dir / g
        if p.is_symlink():
            raise UsageError(f"{p} is a symbolic link: --sort-into writes its copies only into OUT's own folders",
                             hint="remove the link or choose another OUT")
        if p.exists() and not p.is_dir():
            raise UsageError(f"{p} exists and is not a folder: --sort-into copies the photographs into OUT/{g}/", hint="move it away or choose another OUT")
        for folder, dirs, files in os.walk(p):  # a link below one too, before grading (review 20 R1)
            link = next((os.path.join(folder, n) for n in sorted(dirs + files) if os.path.islink(os.path.join(folder, n))), None)
            if link is not None:
                raise UsageError(f"{link} is a symbolic link: --sort-into writes its copies only into OUT's own folders",
                                 hint="remove the link or choose another OUT")


@app.command()
def grade(
    in_dir: InPath,
    out_dir: OutDir,
    weights: Annotated[str, typer.Option("--weights", "-w", help="Grading weights: a name from `fundus models` or a .pt state-dict file.")] = default(GradeConfig, "weights"),
    arch: Annotated[Optional[str], typer.Option("--arch", help="Architecture, required for weights not listed in weights/manifest.json.", show_default=False)] = None,
    flag_threshold: Annotated[float, typer.Option("--flag-threshold", help="A flag is listed in the 'flags' column from this probability on (strictly between 0 and 1).")] = default(GradeConfig, "flag_threshold"),
    sort: Annotated[bool, flag("--sort-into", help="After grading, copy (never move) each input into OUT/good, OUT/usable or OUT/reject.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Photographs per forward pass (more is faster on a GPU; probabilities may move in the 6th decimal).")] = default(GradeConfig, "batch_size"),
    device: Device = default(GradeConfig, "device"),
    precision: Precision = default(GradeConfig, "precision"),
    compile: Compile = default(GradeConfig, "compile"),
    threads: Threads = None,
    workers: Workers = 1,
    engine: Engine = EngineName.local,
    address: Address = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    fmt: FormatOpt = Format.human,
):
    """Grade photographs as Good, Usable or Reject (EyeQ's classes) and say what is wrong (HEMF, no reference).

    results.csv: grade, the three calibrated probabilities, the temperature, one probability per flag (blur,
    illumination, spots, haze, noise, compression, underexposure, overexposure, not_fundus), the flags at or
    above --flag-threshold, and the FOV figures. No images are written unless --sort-into. An image without a
    circular field of view is graded on the whole frame. Example: fundus grade photos/ graded/ --sort-into
    """
    from fundus_pipeline.stages.grade import GradeStage

    cfg = GradeConfig.build(weights=weights, arch=arch, device=device, precision=precision, compile=compile, flag_threshold=flag_threshold, batch_size=batch_size)
    if sort:
        check_sort_folders(out_dir)  # before grading, not after it
    after = (lambda: sort_into(out_dir)) if sort else None
    run_stage_command(lambda: GradeStage(cfg), in_dir, out_dir, overwrite=overwrite, resume=resume, workers=workers, threads=threads,
                      quiet=quiet, fmt=fmt, after=after, engine=engine, address=address)
