"""``fundus run``: the stages chained over one folder of photographs, with every decision stated.

The chain is stage after stage (each over all photographs, by the shared runner), so each stage writes
its own folder under OUT exactly as its own command would, with its own journal, manifest and
``results.csv``; a stage's decisions are read back from the folder it wrote, and the final table is a
join of those folders by item key (``join``: ``fundus report`` calls it again on the folders alone)::

    [simulate]  IN --degrade--> OUT/degrade                       (clean originals -> degraded inputs)
    grade       inputs -> OUT/grade                               (grade, probabilities, flags)
    enhance     inputs graded in --enhance-if -> OUT/enhance      (others pass through unchanged)
    score       OUT/enhance vs its input -> OUT/score             (SDMP-Net: the enhancement's quality, and
                                                                   the input scored against itself, same pass)
    segment     the enhanced image where it was made and trusted, else the input -> OUT/segment
    [simulate]  clean originals -> OUT/segment_clean; the inputs whose enhanced image was segmented ->
                OUT/segment_input; figures against the clean originals -> OUT/compare

An enhanced image is trusted (segmented instead of its input) when its score minus the input's own score
is at least ``min_gain`` and its score at least ``min_score``: the scorer was trained on pairs that
include the identity "enhancement", so the input scored against itself is the scorer's estimate of the
unenhanced photograph's quality.

Resume: each stage resumes from its journal, the decisions are recomputed from the stages' results
(deterministic), so a run killed anywhere and rerun with ``--resume`` redoes only what is missing and
writes the same bytes. ``OUT/manifest.json`` holds the run's configuration (written first, so a resume
can check it), the weights' sha256, the inputs' sha256 and the joined rows; ``--replay`` reruns it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from fundus_pipeline import __version__
from fundus_pipeline.config import DegradeConfig, EnhanceConfig, GradeConfig, RunConfig, ScoreConfig, SegmentConfig, simulate_kind, usage_error
from fundus_pipeline.errors import EXIT_ITEMS_FAILED, FundusError, UsageError, WeightsError
from fundus_pipeline.io import ImageItem, SUPPORTED_EXTENSIONS, open_atomic, read_manifest_head, write_bytes_atomic
from fundus_pipeline.provenance import code_record
from fundus_pipeline.runner import (
    JOURNAL, LOCK, Engine, OutputLock, WorkerPool, _create_output, check_run_paths, config_sha256, default_threads, environment, exit_code_of,
    config_change, input_state, interrupts_deferred, left_outputs, is_empty, manifest_stage, own_file, _previous_lines, probe_lock, remove_stale_temporaries, resolve_inputs, run_stage, say_note, stage_lines, stage_rows, stage_texts, threads_record, write_json_streamed,
)
from fundus_pipeline.models.weights import sha256_file

#: The segment step's addition to "no fundus field of view found" inside `fundus run` (which has no --fov).
RUN_NO_FOV_HINT = "; `fundus run` works inside a circular field of view with a dark surround (for photographs cropped to the retina: `fundus segment --fov full`)"
#: The folders a run owns under OUT, in the order they are written.
STAGE_DIRS = ("degrade", "grade", "enhance", "score", "segment", "segment_clean", "segment_input", "compare")
TOP_FILES = ("manifest.json", "results.csv", "report.html")
GRADE_NAMES = ("good", "usable", "reject")


def _foreign_file(stage_dir: Path) -> Path | None:
    """The first file or link in a sub-folder of a stage folder that no row of the stage lists as its output
    (None: every sub-folder holds the stage's own outputs, the keys' sub-folders of an input with sub-folders)."""
    subs = [p for p in sorted(stage_dir.iterdir()) if p.is_dir()]  # a link to a folder too
    if not subs:
        return None
    rows = stage_rows(stage_dir)
    own = {n for key in rows for n in [*(rows[key].get("outputs") or []), *(rows[key].get("earlier_outputs") or [])] if isinstance(n, str)}
    own |= {n for names in left_outputs(stage_dir).values() for n in names}  # rows that dropped out of the journal (review 23 R23-9)
    for sub in subs:
        if sub.is_symlink():
            return sub
        for path in sorted(sub.rglob("*")):
            rel = path.relative_to(stage_dir).as_posix()
            if path.is_symlink() or (not path.is_dir() and rel not in own and not own_file(path.name)):
                return path
    return None


@dataclass(frozen=True)
class ChainItem:
    """One photograph through the chain: its key and input file; in a simulated run also the clean original
    it was degraded from (key and file) and the degradation (type code or recipe)."""

    key: str
    input: str
    clean_key: str = ""
    clean_input: str = ""
    degradation: str = ""
    error: str = ""  # the simulator failed on the clean original: nothing else runs for this item

    def record(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v != "" or k in ("key", "input")}


@dataclass
class ChainResult:
    out_dir: Path
    failed: list[dict]  # {key, error} of each photograph that failed
    counts: dict
    interrupted: bool
    duration_s: float
    report: Path | None = None
    stages: dict[str, dict] = field(default_factory=dict)
    replay: dict | None = None  # --replay: verify_replay's comparison with the recorded run

    @property
    def exit_code(self) -> int:
        if self.replay is not None and self.replay["differs"]:
            return EXIT_ITEMS_FAILED  # the replay did not reproduce the recorded run
        if not self.interrupted and self.counts.get("pending"):
            # a run that was not interrupted left photographs without their results (a stage folder changed under
            # it, e.g. by another command): not "every item succeeded"
            return EXIT_ITEMS_FAILED
        return exit_code_of(self.interrupted, self.counts)

    def summary(self) -> dict:
        return {
            "stage": "run",
            "output": str(self.out_dir),
            "counts": self.counts,
            "failed": self.failed,
            "stages": self.stages,
            "manifest": str(self.out_dir / "manifest.json"),
            "results": str(self.out_dir / "results.csv"),
            "report": str(self.report) if self.report else None,
            "duration_s": round(self.duration_s, 3),
            "interrupted": self.interrupted,
            **({"replay": {k: v for k, v in self.replay.items() if k != "line"}} if self.replay is not None else {}),
            "exit_code": self.exit_code,
        }


# ------------------------------------------------------------------------------------------- decisions
def enhance_decision(cfg: RunConfig, grade_row: dict | None) -> tuple[bool, str]:
    """(enhance this photograph?, why)."""
    if "enhance" not in cfg.steps:
        return False, "no enhance step"
    if "grade" not in cfg.steps:
        return True, "no grade step: every photograph is enhanced"
    if grade_row is None:
        return False, "not graded (the run stopped before): not enhanced"
    if grade_row.get("status") != "ok":
        return False, "grading failed: not enhanced"
    g = grade_row["grade"]
    p = float(grade_row[f"p_{g}"])
    if g in cfg.enhance_if:
        return True, f"graded {g} (p={p:.2f}); enhance-if {','.join(cfg.enhance_if)}: enhanced"
    return False, f"graded {g} (p={p:.2f}): passed through unchanged"


def score_gain(score: float, score_input: float) -> float:
    """The enhancement's score gain, as the trust decision compares it: to 6 decimals, a rounded -0.0 written
    0.0 (it is not below a min-gain of 0, and "-0.000" read as a refused gain; campaign 21a F2)."""
    return round(score - score_input, 6) + 0.0


def decisive(value: float, against: float, sign: bool = False) -> str:
    """``value`` to 3 decimals, or to up to 6 where at 3 it would read as ``against``, the threshold it is
    compared with, without being equal to it: ``+0.000432`` against 0, ``0.0098`` against 0.01 (at 3 decimals a
    trusted and a refused figure read the same; campaign 21a F2, review 21 M2)."""
    fmt = "+" if sign else ""
    value += 0.0  # -0.0 is 0
    text = f"{value:{fmt}.3f}"
    if value != against and (float(text) == round(against, 3) or float(text) == 0 != value):
        text = f"{value:{fmt}.6f}"
        text = text[: max(len(text) - 3, len(text.rstrip("0")))]  # trailing zeros dropped, 3 decimals kept (review 22 L1)
    return text


def format_gain(gain: float, min_gain: float = 0.0) -> str:
    """A gain with its sign and the digits that decide against ``min_gain`` (see ``decisive``)."""
    return decisive(gain, min_gain, sign=True)


def segment_decision(cfg: RunConfig, enhanced: bool, enhance_row: dict | None, score_row: dict | None) -> tuple[str, str]:
    """(which image is segmented, "enhanced" or "input"; why). ``score_row`` holds ``score`` and ``score_input``."""
    if not enhanced:
        return "input", "not enhanced: the input is segmented"
    if enhance_row is None:
        return "", "not decided: the run stopped before this enhancement"
    if enhance_row.get("status") != "ok":
        return "input", "enhancement failed: the input is segmented"
    if "score" not in cfg.steps:
        return "enhanced", "no score step: the enhanced image is segmented"
    if score_row is None:
        return "", "not decided: the run stopped before this enhancement was scored"
    if score_row.get("status") != "ok":
        return "input", "the enhancement could not be scored: the input is segmented"
    s, si = float(score_row["score"]), float(score_row["score_input"])
    gain = score_gain(s, si)
    figures = f"score {decisive(s, cfg.min_score)}, input's own {si:.3f} (gain {format_gain(gain, cfg.min_gain)})"
    if gain < cfg.min_gain:
        return "input", f"{figures} < min-gain {cfg.min_gain:g}: enhancement not trusted, the input is segmented"
    if s < cfg.min_score:
        return "input", f"{figures}; score < min-score {cfg.min_score:g}: enhancement not trusted, the input is segmented"
    return "enhanced", f"{figures} >= min-gain {cfg.min_gain:g}: the enhanced image is segmented"


def _ok(row: dict | None) -> bool:
    return row is not None and row.get("status") == "ok"


def _output(folder: Path, row: dict | None, suffix: str = "") -> Path | None:
    """The output file of ``row`` whose name ends with ``suffix + .png`` (the first one for ``""``)."""
    if not _ok(row):
        return None
    for name in row.get("outputs", []):
        if name.endswith(f"{suffix}.png") and (suffix or name == f"{row['key']}.png"):
            return folder / name
    return None


# ------------------------------------------------------------------------------------------------ join
#: results.csv columns, in order; the simulate-only ones are added when the run simulated.
COLUMNS = (
    "key", "input", "status", "error", "grade", "p_good", "p_usable", "p_reject", "flags", "enhanced", "enhance_reason",
    "score", "score_input", "score_gain", "segmented", "segment_reason", "vessel_fraction", "fov_fraction", "warning",
    "enhanced_image", "vessels_image",
)  # fmt: skip
SIM_COLUMNS = ("clean_key", "clean_input", "degradation", "psnr_before", "psnr_after", "ssim_before", "ssim_after", "f1_before", "f1_after")
GT_COLUMNS = ("f1_gt_before", "f1_gt_after")


_IDENTITY = ("key", "input", "clean_key", "clean_input", "degradation")  # what a row says of its photograph, not of a result


def columns(cfg: RunConfig) -> tuple[str, ...]:
    cols = COLUMNS
    if cfg.simulate:
        cols = cols[:2] + SIM_COLUMNS[:3] + cols[2:] + SIM_COLUMNS[3:]
        if cfg.ground_truth is not None:
            cols += GT_COLUMNS
    return cols


def _temp_error(e: Exception) -> FundusError:
    return FundusError(f"cannot write the join's temporary files in {tempfile.gettempdir()}: {getattr(e, 'strerror', None) or e}",
                       hint="free space there, or point TMPDIR at a folder with room, then rerun with --resume")


def _b(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


_SCRATCH = re.compile(r"fundus-(?:rows|join)-(\d+)-[^/]+")
#: A scratch folder of a dead process is removed once nothing in it changed for this long.
SCRATCH_STALE_S = 600.0


class _Scratch(tempfile.TemporaryDirectory):
    """A scratch folder holding ``.alive``, a file this process keeps locked (flock) until the folder is
    removed: a sweep in another process, also one in another container on this host, sees it is in use."""

    def __init__(self, prefix: str):
        import fcntl

        super().__init__(prefix=prefix)
        self._alive: int | None = os.open(os.path.join(self.name, ALIVE), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._alive, fcntl.LOCK_EX)

    def cleanup(self) -> None:
        if self._alive is not None:
            os.close(self._alive)
            self._alive = None
        super().cleanup()


ALIVE = ".alive"


def scratch_dir(kind: str) -> tempfile.TemporaryDirectory:
    """A scratch folder in TMPDIR named with this process's pid (``fundus-KIND-PID-...``) and kept locked while
    in use: one that a killed run left is recognised and removed by a later run (:func:`sweep_scratch`)."""
    return _Scratch(f"fundus-{kind}-{os.getpid()}-")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _in_use(d: Path) -> bool:
    """Whether a process holds ``d``'s ``.alive`` lock (a folder without one, from an older version: unknown, False)."""
    fd, busy = probe_lock(d / ALIVE, exclusive=True)
    if fd is not None:
        os.close(fd)
    return busy


def sweep_scratch(root: Path | None = None, stale_s: float = SCRATCH_STALE_S) -> list[Path]:
    """Remove the scratch folders (:func:`scratch_dir`) that killed runs of this user left in TMPDIR: those
    whose lock no process holds, whose process is gone, and in which nothing changed for ``stale_s`` seconds
    (the lock covers other containers on this host, where the pid means another process; the age, a folder
    of an older version without the lock). Returns the folders removed."""
    root = Path(tempfile.gettempdir()) if root is None else root
    removed = []
    for d in root.glob("fundus-*-*-*"):
        m = _SCRATCH.fullmatch(d.name)
        try:
            if not m or d.is_symlink() or not d.is_dir() or d.stat().st_uid != os.getuid():
                continue
            if int(m[1]) == os.getpid() or pid_alive(int(m[1])) or _in_use(d):
                continue
            newest = max([d.stat().st_mtime] + [p.stat().st_mtime for p in d.iterdir()])
        except (OSError, ValueError):
            continue
        if time.time() - newest >= stale_s:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


@contextlib.contextmanager
def stage_locks(dirs: list[Path], shown: Path):
    """Hold each stage folder's lock (``.fundus-lock``) while the block removes them: one that another process
    holds (a stage command writing there) is refused, exit 2, before anything is removed."""
    held = []
    try:
        for d in dirs:
            fd, busy = probe_lock(d / LOCK, exclusive=True)  # no lock file: no fundus process has written there
            if fd is not None:
                held.append(fd)
            if busy:
                raise UsageError(f"--overwrite: another fundus command is writing to {shown / d.name}; nothing was removed: "
                                 "wait for it to finish or choose another output folder")
        yield
    finally:
        for fd in held:
            os.close(fd)


class FolderRows:
    """The rows of the stage folders under ``out``, looked up by (folder, key), kept in a temporary SQLite
    file instead of memory: joining 100,000 photographs across its folders holds a few megabytes."""

    FOLDERS = ("grade", "enhance", "score", "segment", "compare", "degrade", "segment_clean")  # the ones the table reads

    def __init__(self, out: Path):
        self._tmp = scratch_dir("join")
        self.db = sqlite3.connect(os.path.join(self._tmp.name, "rows.sqlite"))
        # keys and rows as bytes: a file name that is not UTF-8 reaches Python as lone surrogates, which SQLite's
        # TEXT refuses; surrogateescape gives those exact bytes back
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; CREATE TABLE rows (folder TEXT, key BLOB, row BLOB, PRIMARY KEY (folder, key));")
        for name in self.FOLDERS:
            self.db.executemany("INSERT OR REPLACE INTO rows VALUES (?, ?, ?)", ((name, _b(key), _b(text)) for key, text in stage_texts(out / name)))
        self.db.commit()

    def get(self, folder: str, key: str) -> dict | None:
        hit = self.db.execute("SELECT row FROM rows WHERE folder = ? AND key = ?", (folder, _b(key))).fetchone()
        return json.loads(hit[0].decode("utf-8", "surrogateescape")) if hit else None

    def close(self) -> None:
        self.db.close()
        self._tmp.cleanup()


def join(out: Path, cfg: RunConfig, items: Iterable[ChainItem], finished: bool = False) -> Iterator[dict]:
    """One row per chain item (yielded in the items' order) from the stage folders under ``out``: the
    stages' figures, each decision and its reason, paths relative to ``out``, and every failure as
    ``step: message`` in ``error``. ``finished``: the run was not interrupted, so a result missing from a
    stage folder was not "not run yet" but removed since."""
    index = FolderRows(out)
    try:
        yield from _join(out, cfg, items, index, " (no result in its stage folder)" if finished else " (not run yet: the run stopped before)")
    finally:
        index.close()


def _join(out: Path, cfg: RunConfig, items: Iterable[ChainItem], index: FolderRows, missing: str) -> Iterator[dict]:
    steps = set(cfg.steps)
    for it in items:
        row: dict[str, Any] = {c: "" for c in columns(cfg)}
        row.update(key=it.key, input=_shown(it.input, out))
        if cfg.simulate:
            row.update(clean_key=it.clean_key, clean_input=_shown(it.clean_input, out), degradation=it.degradation)
        errors: list[str] = []
        pending = False

        def take(step: str, r: dict | None, expected: bool = True) -> dict | None:
            nonlocal pending
            if r is None:
                pending |= expected
            elif r.get("status") != "ok":
                errors.append(f"{step}: {r.get('error', '')}")
            return r

        if it.error:
            errors.append(f"degrade: {it.error}")
            row.update(status="error", error="; ".join(errors), enhanced="no", segmented="none")
            yield row
            continue
        g = take("grade", index.get("grade", it.key), "grade" in steps)
        if _ok(g):
            row.update(grade=g["grade"], flags=g.get("flags", ""), **{f"p_{n}": g.get(f"p_{n}", "") for n in GRADE_NAMES})
            if g.get("warning"):
                row["warning"] = g["warning"]
        enh, why = enhance_decision(cfg, g)
        row["enhanced"], row["enhance_reason"] = ("yes" if enh else "no"), why
        e = take("enhance", index.get("enhance", it.key), enh) if enh else None
        s = None
        if enh and _ok(e) and "score" in steps:
            s = take("score", index.get("score", it.key))
            if _ok(s):
                row.update(score=s["score"], score_input=s["score_input"], score_gain=score_gain(float(s["score"]), float(s["score_input"])))
        if _ok(e):
            p = _output(out / "enhance", e)
            row["enhanced_image"] = p.relative_to(out).as_posix() if p else ""
        if enh and not _ok(e):
            row["enhance_reason"] += " (failed)" if e is not None else missing
        source, why = segment_decision(cfg, enh, e, s)
        if "segment" in steps:
            seg = take("segment", index.get("segment", it.key))
            after = " (failed)" if seg is not None and not _ok(seg) else missing if seg is None and source else ""
            row["segmented"], row["segment_reason"] = source, why + after
            if _ok(seg):
                row.update(vessel_fraction=seg["vessel_fraction"], fov_fraction=seg["fov_fraction"])
                row["warning"] = "; ".join(w for w in (row.get("warning", ""), seg.get("warning", "")) if w)  # the grader's, then the segmenter's
                p = _output(out / "segment", seg, "_vessels")
                row["vessels_image"] = p.relative_to(out).as_posix() if p else ""
        else:
            row["segmented"], row["segment_reason"] = "none", "no segment step"
        # every step that read the photograph itself must have read the same bytes: one replaced between the
        # steps would join the grade of one version with the vessels of another
        read = {step: r.get("input_sha256") for step, r in (("grade", g), ("enhance", e), ("segment", seg if source == "input" and "segment" in steps else None))
                if _ok(r) and r.get("input_sha256")}  # fmt: skip
        if _ok(s) and isinstance(s.get("inputs_sha256"), dict) and s["inputs_sha256"].get("reference"):
            read["score"] = s["inputs_sha256"]["reference"]  # the scorer reads the photograph as its reference (campaign 23b HIGH-1)
        mixed = False
        if (why := _two_versions(read)) is not None:
            mixed = True
            errors.append(f"input: the photograph changed during the run ({why}); its results mix two versions: "
                          "rerun it (--overwrite, or into a new OUT)")
        if cfg.simulate:
            # the clean original is read by the simulator, its segmentation and the comparison: one replaced between
            # them would compare the degraded version of one photograph with another (review 22 M1)
            c = index.get("compare", it.key)
            clean = {step: r.get("input_sha256") for step, r in (("degrade", index.get("degrade", it.clean_key)),
                     ("segment_clean", index.get("segment_clean", it.clean_key) if "segment" in steps else None)) if _ok(r) and r.get("input_sha256")}
            if _ok(c) and isinstance(c.get("inputs_sha256"), dict) and c["inputs_sha256"].get("clean"):
                clean["compare"] = c["inputs_sha256"]["clean"]
            if (why := _two_versions(clean)) is not None:
                mixed = True
                errors.append(f"clean original: the photograph changed during the run ({why}); its before/after figures would mix "
                              "two versions: rerun it (--overwrite, or into a new OUT)")
            c = take("compare", c, not errors)
            if _ok(c):
                row.update({k: c[k] for k in SIM_COLUMNS[3:] + GT_COLUMNS if k in c and k in row})
        if mixed:
            # no figure, decision or output of a row whose photograph changed under the run is to be read: the table,
            # the page and the summary counts carry none of them (review 22 L6)
            row.update({k: "" for k in row if k not in _IDENTITY})
        row["status"] = "error" if errors else ("pending" if pending else "ok")
        row["error"] = _joined_errors(errors)
        yield row


def _joined_errors(errors: list[str]) -> str:
    """The ``error`` cell: ``step: message`` entries joined by "; ", the steps that failed with the same message
    named once together (``grade, segment: cannot read ...``: a file that cannot be read fails every step that
    reads it; campaign 28b F4)."""
    steps: dict[str, list[str]] = {}
    for e in errors:
        step, sep, message = e.partition(": ")
        if sep and " " not in step:
            steps.setdefault(message, []).append(step)
        else:
            steps.setdefault(e, [])
    return "; ".join(f"{', '.join(s)}: {m}" if s else m for m, s in steps.items())


def _two_versions(read: dict[str, str]) -> str | None:
    """``step read SHA, ...`` when the steps of ``read`` (step: the sha256 of the bytes it read) read more than
    one version of a file; else None."""
    if len(set(read.values())) < 2:
        return None
    return ", ".join(f"{step} read {sha[:12]}" for step, sha in read.items())


def _at(out: Path, path: str) -> Path:
    """A planned input as a file: the plan names a file inside OUT relative to OUT (so a moved or replayed
    output folder still finds its own files), any other absolute."""
    return Path(path) if os.path.isabs(path) else out / path


def _shown(path: str, out: Path) -> str:
    """A planned input as the table shows it: inside OUT relative to it (a replay into another folder writes
    the same table), else absolute (an input given relative to the working folder stays findable from the
    table and by ``fundus report``)."""
    p = _at(out, path)
    try:
        return p.relative_to(out).as_posix()
    except ValueError:
        return str(p)


def simulate_codes(cfg: RunConfig) -> list[str]:
    """The type codes of a simulated run that gives an item per code (``KEY_<code>``); [] when one item a photograph."""
    sim = cfg.simulate or ""
    return sim.split(",") if simulate_kind(sim) == "types" and "," in sim else []


def unreached_rows(cfg: RunConfig, plan: list[ChainItem], inputs: Iterable[ImageItem]) -> Iterator[dict]:
    """Pending rows of the photographs an interrupted simulated run had not degraded yet (not in its plan), one
    per item each would give (keys never collide); the run's table, manifest and report end with them."""
    seen = {it.clean_key or it.key for it in plan}
    blank = dict.fromkeys(columns(cfg), "")
    codes = simulate_codes(cfg)
    for it in inputs:
        if it.key not in seen:
            for code in codes or [""]:
                yield {**blank, "key": f"{it.key}_{code}" if code else it.key, "input": str(it.path), "clean_key": it.key,
                       "clean_input": str(it.path), "degradation": code or cfg.simulate, "status": "pending"}  # fmt: skip


def _results_revision(step: str) -> int:
    """The ``results_revision`` of the stage that a run's ``step`` (or "degrade") runs."""
    from fundus_pipeline.stages.degrade import DegradeStage
    from fundus_pipeline.stages.enhance import EnhanceStage
    from fundus_pipeline.stages.grade import GradeStage
    from fundus_pipeline.stages.score import ScoreStage
    from fundus_pipeline.stages.segment import SegmentStage

    return {c.name: c for c in (DegradeStage, GradeStage, EnhanceStage, ScoreStage, SegmentStage)}[step].results_revision


def unreached_in_manifest(manifest: Path, plan: list[ChainItem]) -> Iterator[dict]:
    """Those rows again, from a finished manifest's items, read a line at a time (`fundus report` needs no input folder)."""
    seen = {it.clean_key or it.key for it in plan}
    for r in manifest_items(manifest):
        if isinstance(r, dict) and r.get("status") == "pending" and (r.get("clean_key") or r.get("key")) not in seen:
            yield r


def count(rows: Iterable[dict]) -> dict:
    c = {"total": 0, "ok": 0, "error": 0, "pending": 0, **dict.fromkeys(GRADE_NAMES, 0), "enhanced": 0, "enhanced_used": 0, "segmented": 0}
    for r in rows:
        _count(c, r)
    return c


def _count(c: dict, r: dict) -> None:
    c["total"] += 1
    c[r["status"]] = c.get(r["status"], 0) + 1
    if r.get("grade") in GRADE_NAMES:
        c[r["grade"]] += 1
    c["enhanced"] += r.get("enhanced") == "yes" and bool(r.get("enhanced_image"))
    c["enhanced_used"] += r.get("segmented") == "enhanced" and bool(r.get("vessels_image"))
    c["segmented"] += bool(r.get("vessels_image"))


class RowsFile:
    """The joined rows of a run as JSON lines in a temporary file: iterable any number of times (the
    report reads them twice) without holding them in memory."""

    def __init__(self) -> None:
        self._tmp = scratch_dir("rows")  # not in OUT: a killed run leaves nothing there (sweep_scratch)
        self.path = Path(self._tmp.name) / "rows.jsonl"
        self._f = open(self.path, "w", encoding="utf-8", errors="surrogateescape")
        self.n = 0

    def add(self, row: dict) -> str:
        text = json.dumps(row, default=str)
        self._f.write(text + "\n")
        self.n += 1
        return text

    def texts(self) -> Iterator[str]:
        self._f.flush()
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                yield line.rstrip("\n")

    def __iter__(self) -> Iterator[dict]:
        return (json.loads(t) for t in self.texts())

    def __len__(self) -> int:
        return self.n

    def close(self) -> None:
        self._f.close()
        self._tmp.cleanup()


# ------------------------------------------------------------------------------------------- the run
def input_hashes(items: list[ImageItem]) -> dict[str, str]:
    """{key: sha256} of the input files that exist (a missing one fails later, as an item), read by a few
    threads at once (hashlib releases the GIL: reading and hashing overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(it: ImageItem) -> tuple[str, str | None]:
        try:
            return it.key, sha256_file(it.path)
        except OSError:
            return it.key, None

    with ThreadPoolExecutor(max_workers=4) as ex:
        return {k: h for k, h in ex.map(one, items) if h is not None}


def weights_used(cfg: RunConfig) -> dict[str, dict]:
    """Each step's weights, loaded and verified once now (a bad name or file fails the run before any work,
    exit 1; the stages then share the loaded models): {step: {name, model, sha256}}."""
    from fundus_pipeline.device import resolve_device
    from fundus_pipeline.models.weights import load_model

    need = {"grade": (cfg.grade_weights, cfg.grade_arch, "grading"), "enhance": (cfg.enhance_weights, cfg.enhance_arch, "enhancement"),
            "score": (cfg.score_weights, cfg.score_arch, "quality"), "segment": (cfg.segment_weights, cfg.segment_arch, "segmentation")}
    device = resolve_device(cfg.device)
    out = {}
    for step in cfg.steps:
        weights, arch, task = need[step]
        try:
            _, spec = load_model(weights, arch=arch, device=device, task=task, shared=True, compile=cfg.compile,  # the stages' model
                                 arch_option=f"--{step}-arch")  # (review 27 R27-2: fundus run has no --arch)
        except WeightsError as e:
            raise WeightsError(f"{step} step: {e.message}", e.hint) from None
        out[step] = {"name": spec.name, "model": spec.model, "sha256": spec.sha256}
    return out


class Chain:
    """One ``fundus run`` into ``out`` (see the module docstring)."""

    def __init__(self, cfg: RunConfig, in_path: Path, out_dir: Path, *, resume: bool, overwrite: bool, command: list[str] | None,
                 degrade_replay: Path | None = None, expect_inputs: dict[str, str] | None = None, engine: "Engine | None" = None,
                 expect_weights: dict[str, str] | None = None, expect_truth: dict[str, str] | None = None):
        self.cfg, self.in_path, self.shown = cfg, Path(in_path), Path(out_dir)
        self.expect_truth = expect_truth  # --replay: {key: sha256} of the --ground-truth files the run compared with
        self.truth_hashes: dict[str, str] = {}
        self.truth_items: list[ImageItem] = []  # the --ground-truth files, found once (check) for their sha256 and pairing
        self.truth_index: dict[str, Path] = {}  # pairing key -> file, as `fundus evaluate segment` pairs
        self.resume, self.overwrite = resume, overwrite
        self.command = command or sys.argv
        self.degrade_replay = degrade_replay
        self.expect_inputs = expect_inputs
        self.expect_weights = expect_weights  # --replay: {step: sha256} of the weights the run used
        self.started = time.time()
        self.stages: dict[str, dict] = {}
        self.said: set[str] = set()  # the notes the stages' resumes have said
        self.checked: dict | None = None  # a resume's findings on the first stage's inputs (_prepare_folder)
        self.interrupted = False
        self.pool: WorkerPool | None = None
        self.engine = engine  # processes every stage's items instead of this machine's workers (e.g. Ray)

    # -- checks before any work -------------------------------------------------------------------------
    def check(self) -> None:
        cfg = self.cfg
        check_run_paths(self.in_path, self.shown, overwrite=self.overwrite, resume=self.resume, stage="run")
        if cfg.ground_truth is not None:
            if not cfg.simulate:
                raise UsageError("--ground-truth gives the vessel annotations of clean originals: it needs --simulate")
            if not Path(cfg.ground_truth).is_dir():
                raise UsageError(f"--ground-truth is not a folder: {cfg.ground_truth}")
            from fundus_pipeline.evaluation.segment import _index
            from fundus_pipeline.io import discover_images

            self.truth_items = discover_images(Path(cfg.ground_truth))
            # two files of one key (DRIVE/test: 1st_manual, mask) are refused
            self.truth_index = _index([(g.key, g.path) for g in self.truth_items], "--ground-truth")
            if "segment" not in cfg.steps:
                raise UsageError("--ground-truth compares vessel segmentations: it needs the segment step")
        self.inputs = resolve_inputs(self.in_path)
        if not cfg.quiet and cfg.format == "human":
            self.inputs.say_notes()
        if not self.inputs.items:
            raise UsageError(f"no images found in {self.in_path} (supported: {', '.join(e.lstrip('.') for e in SUPPORTED_EXTENSIONS)})")
        _, self.out = check_run_paths(self.in_path, self.shown, overwrite=self.overwrite, resume=self.resume, inputs=self.inputs, stage="run")
        if cfg.simulate:
            from fundus_pipeline.stages.degrade import DegradeStage

            try:
                self.degrade_stage = DegradeStage(self._degrade_config())  # a bad recipe fails now (exit 2)
            except UsageError as e:  # the stage names its own option; here the recipe came from --simulate
                raise UsageError(e.message.replace("invalid --recipe", "invalid --simulate", 1), e.hint) from None
        from fundus_pipeline.device import autocast, resolve_device

        autocast(resolve_device(cfg.device), cfg.precision)  # fp16 without a GPU: refused now, not after a stage
        self.weights = weights_used(cfg)

    def _degrade_config(self) -> DegradeConfig:
        if self.degrade_replay is not None:
            return DegradeConfig.build(replay=self.degrade_replay)
        return DegradeConfig.build(seed=self.cfg.seed, **self.cfg.simulate_options())

    def record(self) -> dict:
        """The run's identity (hashed for --resume): the chain configuration and the weights' sha256."""
        return {"config": self.cfg.chain_record(), "weights": self.weights}

    # -- folder handling ---------------------------------------------------------------------------------
    def _same_run_other_spelling(self, old: dict) -> bool:
        """Whether the run in OUT differs from this one only in how its weights files were written (a relative
        path, as versions before the absolute recording kept it): the same weights by sha256 (they are part of
        the record), so ``--resume`` continues it."""
        cfg = old.get("config")
        if not isinstance(cfg, dict):
            return False
        fields = ("grade_weights", "enhance_weights", "score_weights", "segment_weights")
        spelled = {k: cfg[k] for k in fields if isinstance(cfg.get(k), str) and cfg[k] != getattr(self.cfg, k)}
        if not spelled:
            return False
        rec = self.record()
        rec["config"] = {**rec["config"], **spelled}
        return old.get("run_sha256") == config_sha256(rec)

    def _change(self, old: dict) -> str:
        """What differs from the recorded run ``old`` (a manifest): options of the chain, then each step's weights."""
        cfg = old.get("config") if isinstance(old.get("config"), dict) else {}
        now = self.cfg.model_dump(mode="json")
        keys = set(self.cfg.chain_record()) | {"precision", "compile"}  # (left out of the record at their defaults; review 40 M-1)
        weights = old.get("weights") if isinstance(old.get("weights"), dict) else {}
        # a step's weights by sha256, where both runs ran it and name the same file (a step not run is said by
        # `steps`, a file named otherwise by its <step>_weights option; review 23 R23-7)
        both = [step for step in self.weights if isinstance(weights.get(step), dict) and cfg.get(f"{step}_weights") == now.get(f"{step}_weights")]
        sha = {f"{step} weights (sha256)": weights[step].get("sha256") for step in both}
        sha_now = {f"{step} weights (sha256)": self.weights[step]["sha256"] for step in both}
        # precision and compile, which the record leaves out at their defaults, are their defaults where the recorded
        # configuration lacks them (review 41 F3: "precision: null there"); any other key it lacks was added since: a
        # record of another version, which no option repeated resumes ("" makes the refusal say so; review 42 F1:
        # "rerun with the same options" naming the default weights, then refused again)
        if any(k not in cfg for k in keys - {"precision", "compile"}):
            return ""
        default = RunConfig().model_dump(mode="json")
        then = {k: cfg[k] if k in cfg else default.get(k) for k in keys}
        return config_change({**then, **sha}, {**{k: now.get(k) for k in keys}, **sha_now})

    def _prepare_folder(self) -> None:
        out = self.out
        manifest = out / "manifest.json"
        if self.resume and manifest.is_file():
            try:
                old = read_manifest_head(manifest)  # not its rows (a 100,000-photograph run's are tens of MB)
            except (OSError, ValueError):
                old = {}
            if not isinstance(old, dict) or old.get("stage") != "run":
                raise UsageError(f"--resume: {self.shown} holds no earlier `fundus run` (its manifest.json is not a run's)")
            if old.get("run_sha256") != config_sha256(self.record()) and not self._same_run_other_spelling(old):
                if not (change := self._change(old)):  # no option differs: the record itself does (campaign 39b F2: "rerun
                    # with the same options" to a user who had, for a run of a version before 2026-12-02)
                    raise UsageError(f"{self.shown} was written by another version of fundus, whose record of the run differs where no "
                                     "option does; it cannot be resumed by this one: run into a new folder, or use --overwrite")
                raise UsageError(f"{self.shown} was written by a run with another configuration or other weights{change}; "
                                 "rerun with the same options, run into a new folder, or use --overwrite")
            # only inputs of this run matter: one no longer listed (or now another file) drops out of the table
            planned = {it.key: str(it.path) for it in self.inputs.items}
            self.checked = {}  # key: (input_state, refreshed stat fields), for the first stage's resume (review 37 M-1, M-2)
            revision = _results_revision(self._first_folder())
            for r, _ in _previous_lines(out / self._first_folder()):
                if r.get("results_revision") != revision:
                    self.checked.pop(r["key"], None)  # (its newest row decides; review 42 F2)
                    continue  # made by other code: computed again anyway, its input not read first (review 41 F1)
                if r.get("status") == "ok" and planned.get(r["key"]) == r.get("input"):
                    fresh: dict = {}
                    self.checked[r["key"]] = (input_state(r, fresh), fresh)
            changed = sorted(k for k, (state, _) in self.checked.items() if state == "changed")
            if changed:  # every one named at once (campaign 36d F2: one a try; "since the run started" of a run finished weeks ago)
                shown = ", ".join(repr(k) for k in changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
                raise UsageError(f"--resume: {len(changed)} input(s) changed since the run computed them ({shown}); their results would "
                                 "mix two versions: run into a new folder, or use --overwrite (every photograph again)")
        elif self.resume and not is_empty(out):
            raise UsageError(f"--resume: {self.shown} holds no earlier `fundus run` (no manifest.json); choose an empty folder or pass --overwrite")
        if self.overwrite or self.resume:
            linked = next((out / name for name in STAGE_DIRS if (out / name).is_symlink()), None)
            if linked is not None:  # --resume would write into it, --overwrite remove through it (campaign 19a F1)
                flag = "--overwrite" if self.overwrite else "--resume"
                raise UsageError(f"{flag}: {linked} is a symbolic link; fundus writes and removes nothing through a link: remove the link first")
        if self.overwrite:
            # Everything is checked before anything is removed: a refusal leaves the folder as it was.
            tops = [out / name for name in TOP_FILES if (out / name).exists()] + sorted(out.glob("report-*.html"))
            if tops and manifest_stage(out / "manifest.json") != "run":
                raise UsageError(f"--overwrite: {self.shown} holds {tops[0].name} but no manifest.json of a `fundus run`; "
                                 "it was not written by fundus run, so nothing is replaced: move it away or choose another folder")
            dirs = [out / name for name in STAGE_DIRS if (out / name).is_dir()]
            for d in dirs:
                if not ((d / "manifest.json").exists() or (d / JOURNAL).exists() or not any(d.iterdir())):
                    raise UsageError(f"--overwrite: {d} was not written by fundus (no manifest.json); move it away first")
                # a stage writes its outputs only, in the keys' sub-folders: any other file below it is somebody
                # else's (the default output of `fundus evaluate enhance|grade|segment` on that stage folder),
                # which rmtree would take with it (an input with sub-folders was refused too; campaign 19a F7)
                foreign = _foreign_file(d)
                if foreign is not None:
                    raise UsageError(f"--overwrite: {foreign} is not an output that a row of {d.name} lists (an evaluation report, a "
                                     "file of your own, a link, or an output a kill left unrecorded); move it away or delete it first: "
                                     "--overwrite removes the run's stage folders")
            with stage_locks(dirs, self.shown):  # none is another process's live output folder
                for d in dirs:
                    shutil.rmtree(d)
            for name in TOP_FILES:
                (out / name).unlink(missing_ok=True)
            for page in out.glob("report-*.html"):  # the further pages of a long report
                page.unlink()

    def _first_folder(self) -> str:
        """The stage folder whose stage reads every original input (its rows record their sha256)."""
        return "degrade" if self.cfg.simulate else self.cfg.steps[0]

    def _input_hashes(self) -> dict[str, str]:
        """{key: sha256} of the inputs, as the first stage read them (each worker hashes the bytes it decodes,
        so planning never reads the whole archive first)."""
        if self.expect_inputs is not None:
            return self.input_hashes
        return {r["key"]: r["input_sha256"] for r in stage_lines(self.out / self._first_folder()) if r.get("input_sha256")}

    def _threads_used(self) -> int | list[int]:
        """The CPU threads a worker used in every stage: one count, or the counts when a ``--resume`` ran on
        another ``--threads`` (a replay then cannot take one count and says so when its bytes differ)."""
        used: set[int] = set()
        for st in self.stages.values():
            t = st.get("threads_used")
            used.update(t if isinstance(t, list) else [t] if isinstance(t, int) else [])
        return threads_record(used, self.cfg.threads or default_threads(self.cfg.workers))

    def _previous_manifest(self) -> Path | bytes | None:
        """OUT/manifest.json as a run before this one left it: a hard link to it in OUT under a temporary's name (the
        manifest is replaced by renames, so the link keeps the old file; a killed run's is swept as a temporary), or
        its bytes where the file system has no hard links (they were held for the whole run: 80 MB for a
        100,000-photograph run, review 39 F7); None when there is none."""
        import uuid

        from fundus_pipeline.io import _temp_name

        src = self.out / "manifest.json"
        keep = src.with_name(_temp_name(src.name, uuid.uuid4().hex[:12]))
        try:
            os.link(src, keep)
            return keep
        except FileNotFoundError:
            return None
        except OSError:
            try:
                return src.read_bytes()
            except OSError:
                return None

    def _write_manifest(self, rows: RowsFile | None, status: str, counts: dict | None = None) -> None:
        """OUT/manifest.json, its plan and items streamed a line each (``write_json_streamed``)."""
        rec = self.record()
        m = {
            "schema_version": 1,
            "tool": {"name": "fundus-pipeline", "version": __version__, **dict(code_record())},  # which code (campaign 39b F9)
            "stage": "run",
            "status": status,
            "command": self.command,
            "config": self.cfg.model_dump(mode="json"),
            "run_sha256": config_sha256(rec),
            "weights": self.weights,
            "seed": self.cfg.seed,
            "input": {"dir": str(self.inputs.path), **self.inputs.record()},
            "inputs_sha256": self._input_hashes() if status != "running" else {},
            **({"ground_truth_sha256": self.truth_hashes} if self.cfg.ground_truth is not None else {}),
            "threads_used": self._threads_used(),
            "output": {"dir": str(self.out)},
            "stages": self.stages,
            "environment": environment(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z") if status != "running" else None,
            "duration_s": round(time.time() - self.started, 3),
            "interrupted": self.interrupted,
            "counts": counts or {},
        }
        write_json_streamed(self.out / "manifest.json", m, {
            "plan": (json.dumps(it.record()) for it in self.plan),
            "items": rows.texts() if rows is not None else (),
        })

    # -- stages ------------------------------------------------------------------------------------------
    def _stage(self, name: str, stage, items: list[ImageItem], extra: dict | None = None) -> Mapping[str, dict]:
        """Run ``stage`` over ``items`` into OUT/name (resumable) and return its rows by key."""
        folder = self.out / name
        if not items or self.interrupted:
            return stage_rows(folder)
        res = run_stage(
            stage, self.inputs.path, folder, resume=self.resume, workers=self.cfg.workers, threads=self.cfg.threads,
            progress=not self.cfg.quiet and self.cfg.format == "human", command=self.command, extra_dirs=extra, items=items,
            pool=self.pool if stage.uses_torch else None,  # torch-free stages fork their own workers in milliseconds
            engine=self.engine,  # _prepare_folder checked the first stage's inputs: its findings
            checked_inputs=self.checked if name == self._first_folder() else None,
            said=self.said,  # every stage of a resume notes the same renamed keys: said once (review 22 L3)
        )  # fmt: skip
        self.stages[name] = {"counts": res.counts, "duration_s": round(res.duration_s, 3), "threads_used": res.threads_used,
                             **({"resume_notes": res.notes} if res.notes else {})}
        self.worked |= res.counts.get("total", 0) > res.counts.get("skipped", 0)  # a row made now, not resumed
        self.interrupted |= res.interrupted  # (a Ctrl-C while its tables were written too: the chain stops there)
        return res.store  # the rows just written (and the resumed ones), without reading them back

    def _simulate(self) -> list[ChainItem]:
        folder = self.out / "degrade"
        rows = self._stage("degrade", self.degrade_stage, self.inputs.items)
        codes = simulate_codes(self.cfg)  # several types: an item per type
        plan = []
        for it in self.inputs.items:
            r = rows.get(it.key)
            if r is None:
                continue  # interrupted before this photograph
            if r["status"] != "ok":  # one error row per item the photograph would have given (keys never collide)
                for code in codes or [""]:
                    plan.append(ChainItem(f"{it.key}_{code}" if code else it.key, str(it.path), it.key, str(it.path), code or self.cfg.simulate,
                                          r["error"] or "failed"))  # fmt: skip
                continue
            for variant, name in zip(r["variants"], r["outputs"]):
                label = self.cfg.simulate if variant == "default" else variant
                plan.append(ChainItem(name[: -len(".png")], f"{folder.name}/{name}", it.key, str(it.path), label))
        return plan

    def run(self) -> ChainResult:
        self.check()
        self.plan: list[ChainItem] = []
        if self.expect_weights is not None:  # --replay: the same weights, byte for byte, before any work
            for step, w in self.weights.items():
                if self.expect_weights.get(step) != w["sha256"]:
                    raise UsageError(f"--replay: the {step} step's weights ({w['name']}) are not the ones the run used: sha256 {w['sha256'][:12]}..., "
                                     f"recorded {str(self.expect_weights.get(step))[:12]}...; replay needs the same weights")
        if self.expect_inputs is not None:  # --replay: every input checked before any work
            self.input_hashes = input_hashes(self.inputs.items)
            changed = sorted(k for k, v in self.expect_inputs.items() if self.input_hashes.get(k) != v)
            extra = sorted(set(self.input_hashes) - set(self.expect_inputs))
            if changed or extra:
                what = f"input {changed[0]!r} is missing or has changed since the run" if changed else f"input {extra[0]!r} was not part of the run"
                raise UsageError(f"--replay: {what} (its manifest records every input's sha256); replay needs the same inputs")
        if self.cfg.ground_truth is not None:
            self.truth_hashes = input_hashes(self.truth_items)
            if self.expect_truth is not None:  # --replay: the annotations the recorded figures were measured against
                changed = sorted(k for k in set(self.expect_truth) | set(self.truth_hashes) if self.expect_truth.get(k) != self.truth_hashes.get(k))
                if changed:
                    raise UsageError(f"--replay: ground-truth image {changed[0]!r} is missing, new or has changed since the run "
                                     "(its manifest records every one's sha256); replay needs the same annotations")
        _create_output(self.out, self.shown)
        with OutputLock(self.out, self.shown):
            check_run_paths(self.in_path, self.shown, overwrite=self.overwrite, resume=self.resume, inputs=self.inputs, stage="run")
            self._prepare_folder()
            remove_stale_temporaries(self.out, recursive=False)  # a killed run's tables (the stages sweep their folders)
            sweep_scratch()
            # the record of the run this one resumes: put back if this one is refused before any stage made a row (a
            # stage refusing to resume, weights not found), since the joined table and the report it describes stay
            # as they were (campaign 27b F1: a refused --resume left an empty "stopped" manifest in place of a finished
            # run's); once a row was made, "stopped" says what happened (review 27 R27-1)
            previous = self._previous_manifest() if self.resume else None
            self.worked = False
            self._write_manifest(None, "running")
            if self.cfg.workers > 1 and self.engine is None:
                self.pool = WorkerPool(self.cfg.workers, self.cfg.threads or default_threads(self.cfg.workers))
            try:
                self._run_steps()
            except KeyboardInterrupt:
                self.interrupted = True
            except Exception as e:  # a full disk, say, or a fault (campaign 43c F9): the manifest says the run stopped (not "running")
                with contextlib.suppress(Exception):
                    if previous is not None and not self.worked and isinstance(e, (UsageError, WeightsError)):
                        if isinstance(previous, Path):
                            os.replace(previous, self.out / "manifest.json")
                        else:
                            write_bytes_atomic(self.out / "manifest.json", previous)
                    else:
                        self._write_manifest(None, "stopped")
                raise
            finally:
                if self.pool is not None:
                    self.pool.close()
                if isinstance(previous, Path):
                    previous.unlink(missing_ok=True)
            with interrupts_deferred(held := []):  # the joined table, the manifest and the report are finished first
                result = self._finish()
            result.interrupted |= bool(held)  # then the command ends as interrupted (exit 130), as a stage's does (review 43 L1)
            return result

    def _run_steps(self) -> None:
        cfg = self.cfg
        if cfg.simulate:
            self.plan = self._simulate()
        else:
            self.plan = [ChainItem(it.key, str(it.path)) for it in self.inputs.items]  # absolute (resolve_inputs)
        live = [it for it in self.plan if not it.error]
        if cfg.simulate:
            items = [ImageItem(it.key, _at(self.out, it.input)) for it in live]
        else:
            items = list(self.inputs.items)  # the plan is the inputs: their paths are reused (100,000 Path objects are not free)
        path_of = {it.key: it.path for it in items}
        grades: Mapping[str, dict] = {}
        if "grade" in cfg.steps:
            from fundus_pipeline.stages.grade import GradeStage

            grades = self._stage("grade", GradeStage(GradeConfig.build(weights=cfg.grade_weights, arch=cfg.grade_arch, device=cfg.device, precision=cfg.precision, compile=cfg.compile,
                                                                       flag_threshold=cfg.flag_threshold, batch_size=cfg.grade_batch_size)), items)
        chosen = {it.key: "input" for it in live}
        if "enhance" in cfg.steps and not self.interrupted:
            from fundus_pipeline.stages.enhance import EnhanceStage

            todo = [it for it in items if enhance_decision(cfg, grades.get(it.key))[0]]
            grades = {}  # each stage's rows are dropped once decided on (a 100,000-photograph run holds one stage's at a time)
            stage = EnhanceStage(EnhanceConfig.build(weights=cfg.enhance_weights, arch=cfg.enhance_arch, device=cfg.device, precision=cfg.precision, compile=cfg.compile, transfer=cfg.transfer,
                                                     correction_sigma=cfg.correction_sigma, keep_outside=cfg.keep_outside, vessel_stats=False, batch_size=cfg.enhance_batch_size)) if todo else None
            enhanced = self._stage("enhance", stage, todo)
            made = [ImageItem(it.key, p) for it in todo if (p := _output(self.out / "enhance", enhanced.get(it.key)))]
            scores = {}
            if "score" in cfg.steps and made:
                from fundus_pipeline.stages.score import ScoreStage

                scorer = ScoreStage(ScoreConfig.build(weights=cfg.score_weights, arch=cfg.score_arch, device=cfg.device, precision=cfg.precision, compile=cfg.compile, input_score=True,
                                                      batch_size=cfg.score_batch_size))
                scorer.check_pairs = False  # each pair is the enhanced photograph and the one this run made it from
                scores = self._stage("score", scorer, made, {"reference": {it.key: path_of[it.key] for it in made}})
            for it in todo:
                chosen[it.key] = segment_decision(cfg, True, enhanced.get(it.key), scores.get(it.key))[0]
            del enhanced, scores
        grades = {}
        enhanced_path = {it.key: self.out / "enhance" / f"{it.key}.png" for it in live if chosen[it.key] == "enhanced"}
        if "segment" in cfg.steps and not self.interrupted:
            from fundus_pipeline.stages.segment import SegmentStage

            seg_cfg = SegmentConfig.build(weights=cfg.segment_weights, arch=cfg.segment_arch, device=cfg.device, precision=cfg.precision, compile=cfg.compile, threshold=cfg.threshold)
            segmenter = SegmentStage(seg_cfg)
            if (note := segmenter.threshold_note()) and not cfg.quiet and cfg.format == "human":  # as the input folder's notes
                say_note(note)
            segmenter.no_fov_hint = RUN_NO_FOV_HINT  # `fundus run` has no --fov: the whole chain works inside the field of view
            self._stage("segment", segmenter, [ImageItem(k, enhanced_path.get(k, p)) for k, p in path_of.items()])
            if cfg.simulate:
                clean = {it.clean_key: Path(it.clean_input) for it in live}
                self._stage("segment_clean", segmenter, [ImageItem(k, p) for k, p in sorted(clean.items())])
                self._stage("segment_input", segmenter, [ImageItem(k, path_of[k]) for k in sorted(enhanced_path)])
        if cfg.simulate and not self.interrupted:
            self._compare(live, enhanced_path)

    def _compare(self, live: list[ChainItem], enhanced_path: dict[str, Path]) -> None:
        from fundus_pipeline.stages.compare import CompareStage

        cfg = self.cfg
        vessels = "segment" in cfg.steps
        truth = vessels and cfg.ground_truth is not None
        stage = CompareStage(vessels=vessels, truth=truth)
        out = self.out
        extra: dict[str, dict[str, Path | None]] = {
            "clean": {it.key: Path(it.clean_input) for it in live},
            "delivered": {it.key: enhanced_path.get(it.key, _at(self.out, it.input)) for it in live},
        }
        if vessels:
            def vessel_file(folder: str, key: str) -> Path | None:
                p = out / folder / f"{key}_vessels.png"
                return p if p.is_file() else None

            extra["vessels_clean"] = {it.key: vessel_file("segment_clean", it.clean_key) for it in live}
            extra["vessels_before"] = {it.key: vessel_file("segment_input" if it.key in enhanced_path else "segment", it.key) for it in live}
            extra["vessels_after"] = {it.key: vessel_file("segment", it.key) for it in live}
        if truth:
            from fundus_pipeline.evaluation.segment import pairing_key

            extra["truth"] = {it.key: self.truth_index.get(pairing_key(it.clean_key)) for it in live}
        self._stage("compare", stage, [ImageItem(it.key, _at(self.out, it.input)) for it in live], extra)

    def _finish(self) -> ChainResult:
        """results.csv, report.html and manifest.json from the stage folders, a row at a time (the joined rows
        go to a temporary JSON-lines file, never all in memory)."""
        cols = columns(self.cfg)
        counts = count(())
        failed: list[dict] = []
        rows = RowsFile()
        try:
            with open_atomic(self.out / "results.csv") as f:
                w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore", lineterminator="\n")
                w.writeheader()
                for row in self._rows():
                    rows.add(row)
                    _count(counts, row)
                    if row["status"] == "error":
                        failed.append({"key": row["key"], "error": row["error"]})
                    w.writerow(row)
            report = None
            if self.cfg.report and self.plan:
                from fundus_pipeline.report import write_report

                report = write_report(self.out, self.cfg, rows, run={
                    "weights": self.weights, "run_sha256": config_sha256(self.record()), "notes": list(self.inputs.notes),
                    "status": "interrupted" if self.interrupted else "finished"})
            self._write_manifest(rows, "interrupted" if self.interrupted else "finished", counts)
        except sqlite3.Error as e:  # the join's index lives in TMPDIR, not in OUT
            raise _temp_error(e) from None
        except OSError as e:
            if e.filename and str(e.filename).startswith(tempfile.gettempdir()):
                raise _temp_error(e) from None
            raise
        finally:
            rows.close()
        return ChainResult(self.out, failed, counts, self.interrupted, time.time() - self.started, report, self.stages)

    def _rows(self) -> Iterator[dict]:
        yield from join(self.out, self.cfg, self.plan, finished=not self.interrupted)
        if self.interrupted:
            yield from unreached_rows(self.cfg, self.plan, self.inputs.items)


def run_chain(cfg: RunConfig, in_path: Path, out_dir: Path, *, resume: bool | None = None, overwrite: bool | None = None,
              command: list[str] | None = None, degrade_replay: Path | None = None, expect_inputs: dict[str, str] | None = None,
              expect_weights: dict[str, str] | None = None, expect_truth: dict[str, str] | None = None,
              engine: "Engine | None" = None) -> ChainResult:
    """Run the chain of ``cfg`` over ``in_path`` into ``out_dir`` (see the module docstring). ``resume``,
    ``overwrite``: default ``cfg.resume``, ``cfg.overwrite``. ``engine``: where the stages' items are processed
    (default: this machine, ``cfg.workers`` processes)."""
    if not isinstance(cfg, RunConfig):
        raise TypeError(f"cfg must be a RunConfig (RunConfig(**options) or RunConfig.build(...)), got {type(cfg).__name__}")
    from pydantic import ValidationError

    try:  # checked again: pydantic's model_copy(update=...) checks nothing (campaign 27b F7: min_gain 99 ran and was recorded)
        cfg = RunConfig.model_validate(cfg.model_dump())
    except ValidationError as e:
        raise usage_error(e) from None
    resume = cfg.resume if resume is None else resume
    overwrite = cfg.overwrite if overwrite is None else overwrite
    if overwrite and resume:
        raise UsageError("--overwrite and --resume cannot be used together")
    return Chain(cfg, in_path, out_dir, resume=resume, overwrite=overwrite, command=command, degrade_replay=degrade_replay,
                 expect_inputs=expect_inputs, expect_weights=expect_weights, expect_truth=expect_truth, engine=engine).run()


# ------------------------------------------------------------------------------------------- reading back
def _run_manifest_json(file: Path, prefix: str, missing: str, *, head: bool = False) -> dict:
    """The JSON object of a run's manifest (``head``: without its plan and items, ``io.read_manifest_head``), or a
    UsageError starting with ``prefix`` (``missing``: the message when the file is not there)."""
    try:
        m = read_manifest_head(file) if head else json.loads(file.read_text())
        if head and isinstance(m, dict) and "stage" not in m:  # laid out otherwise (its keys sorted by a tool): whole
            m = json.loads(file.read_text())
    except FileNotFoundError:
        raise UsageError(prefix + missing) from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{prefix}cannot read {file}: {e}") from None
    except ValueError as e:
        raise UsageError(f"{prefix}{file} is not JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(m, dict) or m.get("stage") != "run":
        raise UsageError(f"{prefix}{file} is not the manifest of a `fundus run`")
    return m


def _manifest_config(config: Any, where: str) -> RunConfig:
    """The configuration recorded in a run's manifest, or a UsageError starting with ``where`` that names
    the bad key."""
    from pydantic import ValidationError

    from fundus_pipeline.config import error_line

    if not isinstance(config, dict):
        raise UsageError(f"{where}: invalid run manifest (config: missing or not an object)")
    try:
        return RunConfig(**config)
    except ValidationError as e:
        raise UsageError(f"{where}: invalid run manifest ({error_line(e, prefix='config.')})") from None


@dataclass(frozen=True)
class Replay:
    """What ``fundus run --replay`` reproduces, read from a finished run's manifest."""

    manifest: Path
    cfg: RunConfig
    input: Path
    old_out: Path
    inputs_sha256: dict[str, str]
    weights_sha256: dict[str, str]  # {step: sha256}
    threads: int | None = None  # the thread count the run used (older manifests: only what --threads said)
    truth_sha256: dict[str, str] | None = None  # {key: sha256} of the --ground-truth files (older manifests: none)
    identity: tuple = ()  # (run_sha256, started_at, finished_at): which run this is
    rows: dict[str, str] = field(default_factory=dict)  # {key: digest of the recorded joined row}, read with the manifest
    manifest_sha256: str = ""  # of the manifest file as read (its rows are shown again only while it is unchanged)

    def old_out_is_the_run(self) -> bool:
        """Whether OLD_OUT (the folder the manifest names) still holds this run, not one written there since."""
        try:
            m = read_manifest_head(self.old_out / "manifest.json")
        except (OSError, ValueError):
            return False
        return isinstance(m, dict) and (m.get("run_sha256"), m.get("started_at"), m.get("finished_at")) == self.identity


def read_replay(path: Path) -> Replay:
    """A finished run's manifest (``OLD_OUT/manifest.json``, a copy of it under any name, or the folder
    OLD_OUT), checked field by field: a UsageError (exit 2) names what is missing or wrong."""
    from pydantic import BaseModel, ConfigDict, ValidationError

    from fundus_pipeline.config import error_line

    class _In(BaseModel):
        path: str

    class _Out(BaseModel):
        dir: str

    class _Weights(BaseModel):
        sha256: str

    class _Manifest(BaseModel):  # the parts of a run's manifest that a replay reads
        model_config = ConfigDict(extra="ignore")
        schema_version: int
        stage: str
        status: str
        config: dict
        input: _In
        output: _Out
        inputs_sha256: dict[str, str]
        weights: dict[str, _Weights]

    path = Path(path)
    file = path / "manifest.json" if path.is_dir() else path
    raw = _run_manifest_json(file, "--replay: ", f"{file} not found (give OLD_OUT/manifest.json of a finished `fundus run`)")
    try:
        m = _Manifest(**raw)
    except ValidationError as e:
        raise UsageError(f"--replay: {file}: invalid run manifest ({error_line(e, prefix='')})") from None
    if m.schema_version != 1:
        raise UsageError(f"--replay: {file}: manifest schema_version {m.schema_version} is not one this version reads (1)")
    if m.status != "finished":
        raise UsageError(f"--replay: {file} records a run that did not finish (status {m.status!r}); finish it with --resume, then replay it")
    cfg = _manifest_config(m.config, f"--replay: {file}")
    missing = [step for step in cfg.steps if step not in m.weights]
    if missing:
        raise UsageError(f"--replay: {file}: invalid run manifest (no weights recorded for the {missing[0]} step)")
    threads = raw.get("threads_used", cfg.threads)
    truth = raw.get("ground_truth_sha256")
    items = raw.get("items")
    rows = {r["key"]: _row_digest(r) for r in items if isinstance(r, dict) and isinstance(r.get("key"), str)} if isinstance(items, list) else {}
    return Replay(file, cfg, Path(m.input.path), Path(m.output.dir), dict(m.inputs_sha256), {k: w.sha256 for k, w in m.weights.items()},
                  threads if isinstance(threads, int) and not isinstance(threads, bool) and threads > 0 else None,
                  dict(truth) if isinstance(truth, dict) else None, (raw.get("run_sha256"), raw.get("started_at"), raw.get("finished_at")),
                  rows, sha256_file(file))


def _row_digest(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, default=str).encode("utf-8", "surrogateescape")).hexdigest()


def degraded_sha256(folder: Path) -> dict[str, str]:
    """{key of a degraded image: the sha256 its bytes had when the degrade stage in ``folder`` wrote it}: what
    a simulated run's rows take as their input (the key is the image's path in the folder, without suffix)."""
    found = {}
    for r in stage_lines(folder):
        for name, digest in (r.get("outputs_sha256") or {}).items():
            found[PurePosixPath(name).with_suffix("").as_posix()] = digest
    return found


def manifest_items(path: Path, name: str = "items") -> Iterator[dict]:
    """The ``items`` (or another list ``write_json_streamed`` wrote, such as ``plan``) of a run manifest, one at a
    time: it writes one a line, so a manifest of 100,000 rows is not loaded whole (a manifest laid out otherwise is
    read whole)."""
    opening = f'  "{name}": ['
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        inside, yielded = False, 0
        for line in f:
            if not inside:
                inside = line.rstrip() == opening
                continue
            text = line.strip()
            if text in ("]", "],"):  # (a list followed by another: the plan)
                return
            try:
                row = json.loads(text.rstrip(","))
            except ValueError:
                if yielded:
                    raise
                break
            if isinstance(row, dict) or name != "items":  # (a plan's entry that is not an object is refused by its reader)
                yielded += 1
                yield row
        else:
            if inside:
                return
    m = json.loads(Path(path).read_text(encoding="utf-8", errors="surrogateescape"))  # not laid out one item a line
    yield from (r for r in (m.get(name) if isinstance(m, dict) else None) or [] if isinstance(r, dict) or name != "items")


def sha256_file_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _row_of(path: Path, key: str) -> dict | None:
    try:
        return next((r for r in manifest_items(path) if r.get("key") == key), None)
    except (OSError, ValueError):
        return None


REPLAYED_FILES = (".png", "results.csv", "report.html")  # what a replay reproduces byte for byte (manifests hold times)
_PAGE = re.compile(r"report(-[1-9][0-9]*)?\.html")  # the report's pages: report.html, report-2.html, ... (past 1,000 photographs)


def verify_replay(rp: Replay, out: Path) -> dict:
    """Compare a replay in ``out`` with the run it reproduces: every joined row against the replayed manifest's
    rows, and, where OLD_OUT still holds that run, every image, ``results.csv`` and ``report.html`` byte for
    byte. {"rows", "rows_differing", "files", "files_differing", "differs", "line"} (``line``: what to say)."""

    old = rp.rows  # read with the manifest, before the replay ran
    new: dict[str, str] = {}
    try:
        for r in manifest_items(out / "manifest.json"):
            if isinstance(r.get("key"), str):
                new[r["key"]] = _row_digest(r)
    except (OSError, ValueError):
        pass
    rows_diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    first = ""
    if rows_diff:
        k = rows_diff[0]
        first = f"; first: {k}"
        a = _row_of(rp.manifest, k) if sha256_file_or_none(rp.manifest) == rp.manifest_sha256 else None
        b = _row_of(out / "manifest.json", k)
        if a is not None and b is not None:
            # the row's own order (the table's), not the alphabet's: score_gain had been named before score_input (campaign 35a F3)
            col = next((c for c in [*a, *(c for c in b if c not in a)] if a.get(c) != b.get(c)), "the row")
            first += f" {col} {a.get(col, '(none)')!r} -> {b.get(col, '(none)')!r}"
        elif k not in new or k not in old:
            first += " (missing from the " + ("replay" if k not in new else "recorded run") + ")"
    files = files_diff = 0
    file_first, pages_diff = "", []
    if rp.old_out_is_the_run():
        for p in sorted(out.rglob("*")):
            rel = p.relative_to(out).as_posix()
            page = _PAGE.fullmatch(rel) is not None  # every page: report-2.html, ... were not compared (known left of 39b)
            if not (p.is_file() and (p.suffix == ".png" or rel in REPLAYED_FILES or page)):
                continue
            files += 1
            q = rp.old_out / rel
            if not q.is_file() or sha256_file(q) != sha256_file(p):
                if page and q.is_file():
                    pages_diff.append(rel)  # decided below: with every row and image the same, only the page's code differs
                    continue
                files_diff += 1
                file_first = file_first or rel
    differs = bool(rows_diff or files_diff)
    pages_diff.sort(key=lambda name: int(name[len("report-"):-len(".html")] or 1))  # report.html, report-2.html, ...
    if pages_diff and differs:
        files_diff += len(pages_diff)
        file_first = file_first or pages_diff[0]
    checked = f"{len(new)} rows" + (f" and {files} files of {rp.old_out}" if files else " (the recorded run's folder is gone or holds another run: rows only)")
    if differs:
        line = (f"--replay: the results differ from the recorded run: {len(rows_diff)} of {len(set(old) | set(new))} rows{first}"
                + (f"; {files_diff} of {files} files (first: {file_first})" if files_diff else "") + " (exit 3)")
    elif pages_diff:  # campaign 39b F5: a replay after an upgrade said "the results differ" (exit 3) for the page alone
        which = f"{pages_diff[0]} differs" if len(pages_diff) == 1 else f"{len(pages_diff)} report pages differ (first: {pages_diff[0]})"
        line = (f"--replay: identical results ({checked}), but {which}: the page is drawn by another version's code from "
                "the same rows and images")
    else:
        line = f"--replay: identical to the recorded run ({checked})"
    return {"rows": len(new), "rows_differing": len(rows_diff), "files": files, "files_differing": files_diff, "differs": differs,
            "page_differs": bool(pages_diff) and not differs, "line": line}


def read_run(out_dir: Path) -> tuple[dict, RunConfig, list[ChainItem]]:
    """(the manifest's head: all but its plan and items, its configuration, the planned items) of a run folder; a
    UsageError when it holds none."""
    path = Path(out_dir) / "manifest.json"
    # its head, and the plan a line at a time: parsed whole, a 10,000-photograph run's manifest had been 19 MB held
    # through the whole report (review 39 F6); its items are read only where needed (``unreached_in_manifest``)
    m = _run_manifest_json(path, "", f"{out_dir} holds no `fundus run` output (no manifest.json)", head=True)
    cfg = _manifest_config(m.get("config"), str(path))
    try:
        plan = [ChainItem(**it) for it in manifest_items(path, "plan")]
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}: invalid run manifest (plan: {str(e).splitlines()[0]})") from None
    return m, cfg, plan
