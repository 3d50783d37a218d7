"""Which code made a folder's results: the package version and, run from a git checkout, its commit and whether
its files differ from it. Recorded in the manifests of the stages, of fundus run, of a set and of a training run."""

from __future__ import annotations

import functools
import re
from pathlib import Path


def code_provenance() -> dict:
    """The package version and, when it runs from a git checkout, the commit and whether its files differ
    from it (``dirty``: a tracked file changed, or a module not committed in a code folder, ``_dirty``): what a
    summary and an exported weight record so that a run can be rerun with the same code (campaign 21b M1).
    Without git, or outside a checkout, the version alone."""
    import subprocess

    from fundus_pipeline import __version__

    rec: dict = {"version": __version__}
    root = Path(__file__).resolve().parents[1]
    if not ((root / ".git").exists() and (root / "pyproject.toml").is_file()):  # an installed package: not our checkout
        return rec
    try:
        run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=20, check=True)
        commit = run(["git", "rev-parse", "HEAD"]).stdout.strip()
        dirty = _dirty(run(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=all"]).stdout)
    except (OSError, subprocess.SubprocessError):
        return rec
    if re.fullmatch(r"[0-9a-f]{40,64}", commit):
        rec.update(git_commit=commit, dirty=dirty)
    return rec


#: The checkout's folders whose untracked files are code the run may have imported (a new module): they make it dirty.
CODE_FOLDERS = ("fundus_pipeline/", "degradation/")


def _dirty(porcelain: str) -> bool:
    """Whether ``git status --porcelain --untracked-files=all`` shows a tracked file changed, or an untracked file
    in a code folder (``CODE_FOLDERS``): a module not committed ran as part of the code too (only tracked files
    had counted); untracked files elsewhere (notes, scratch output) do not."""
    for line in porcelain.splitlines():
        if not line.strip():
            continue
        if not line.startswith("?? "):
            return True
        path = line[3:].strip().strip('"')
        if path.startswith(CODE_FOLDERS) and path.endswith(".py"):
            return True
    return False


@functools.lru_cache(maxsize=1)
def code_record() -> tuple[tuple[str, object], ...]:
    """``code_provenance()`` once a process (git is asked once, not at every snapshot of a manifest)."""
    return tuple(code_provenance().items())
