"""``OUT/report.html``: one self-contained page of a ``fundus run`` (no network, no external file).

Built from the joined table (``fundus_pipeline.chain.join``) and the images in the run's folders:
a summary (counts per grade and flag, enhancement and trust decisions, score and vessel-fraction
distributions as inline SVG, and in a simulated run the before/after figures per degradation type), then
one row per photograph with JPEG thumbnails inlined as data URIs (input, enhanced image, vessel overlay),
sortable by any column and filterable by grade, flag and status with a few lines of plain JavaScript.

The page is streamed to a temporary file row by row (thumbnails are made by a small thread pool a bounded
window ahead), so memory does not grow with the number of photographs, and renamed into place. The bytes
depend only on the run's outputs: no times or absolute paths of OUT, so a replay writes the same page.
"""

from __future__ import annotations

import base64
import functools
import html
import math
import os
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from fundus_pipeline import __version__
from fundus_pipeline.quality.grading import FLAGS, GRADES

THUMB_QUALITY = 80
GREEN = np.array([0, 255, 64], np.float32)
#: The grade's colour, as the rows print it (the bars had all been green, reject's too; campaign 21a F15).
GRADE_COLOURS = {"good": "#2e7d32", "usable": "#995c00", "reject": "#c62828"}


# ------------------------------------------------------------------------------------------- thumbnails
def thumb_array(path: Path, side: int, info: dict | None = None) -> np.ndarray:
    """An 8-bit RGB thumbnail (longer side ``side``) of an image file, from its integer array (no float
    copy of a large photograph): 16-bit scaled to 8, gray replicated, alpha dropped, area-averaged. ``info``
    receives the file's sha256 (``read_image``'s, from the bytes it read)."""
    import cv2

    from fundus_pipeline.io import read_image

    arr, _ = read_image(path, info=info)
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[2]
    arr = arr[..., :1] if c in (1, 2) else arr[..., :3]
    h, w = arr.shape[:2]
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = cv2.resize(np.ascontiguousarray(arr), size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    if small.ndim == 2:
        small = small[..., None]
    return np.repeat(small, 3, axis=2) if small.shape[2] == 1 else small


def data_uri(rgb: np.ndarray) -> str:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, THUMB_QUALITY])
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii") if ok else ""


def overlay_thumb(image: np.ndarray | None, vessels_path: Path, side: int = 0) -> np.ndarray:
    """The thumbnail ``image`` with the vessel mask (area-averaged to its size) blended in green; without
    ``image`` (the photograph it was made on is missing or changed since the run) the mask alone on dark grey,
    ``side`` pixels on its longer side (campaign 21a F4: the intact mask had been left out with it)."""
    import cv2

    from fundus_pipeline.io import read_image

    mask, _ = read_image(vessels_path)
    if mask.ndim == 3:
        mask = mask.max(axis=2)
    if image is None:
        h, w = mask.shape[:2]
        s = side / max(h, w)
        image = np.full((max(1, round(h * s)), max(1, round(w * s)), 3), 48, np.uint8)
    frac = cv2.resize((mask > (np.iinfo(mask.dtype).max // 2)).astype(np.float32), image.shape[1::-1], interpolation=cv2.INTER_AREA)
    a = np.clip(frac * 1.6, 0, 0.85)[..., None]
    return np.round(image * (1 - a) + GREEN * a).astype(np.uint8)


def _unreadable() -> tuple[type[BaseException], ...]:
    """What reading or shrinking an image raises when the file is missing, unreadable or not an image (a
    thumbnail left empty and named in the report); anything else is a bug in this code and propagates."""
    import cv2

    from fundus_pipeline.errors import FundusError

    return (FundusError, OSError, ValueError, MemoryError, cv2.error)


def thumbnails(out: Path, row: dict, side: int, missing: list | None = None, inputs_sha256: dict | None = None) -> dict[str, Any]:
    """The row's thumbnails as data URIs: input, enhanced, vessels (each "" when absent or unreadable), and
    ``lost``: the names of those the row names but that are not shown. For a row whose status is ok, each
    image it names that cannot be read is appended to ``missing`` as (key, path) and its cell is in ``lost``
    (the page marks it; an unreadable input of a failed row is already reported in its error).
    ``inputs_sha256`` (key: the sha256 the run recorded): an input whose bytes differ now is left out and named
    too, since its picture would sit beside another photograph's grade, score and vessels. A vessel mask whose
    photograph is not shown is drawn alone."""
    t: dict[str, Any] = {"input": "", "enhanced": "", "vessels": "", "vessels_alone": False}
    base: dict[str, np.ndarray] = {}
    ok = row.get("status") == "ok"
    named: list = []
    lost = _Lost(missing if missing is not None and ok else [], named, ok)
    unreadable = _unreadable()
    key = row.get("key")
    for name, rel in (("input", row.get("input")), ("enhanced", row.get("enhanced_image"))):
        if not rel:
            continue
        p = Path(rel)
        if not p.is_absolute():
            # OUT-relative (--simulate's degraded images, the enhanced ones); a version before 2026-12-02 recorded
            # its inputs as given, relative to the working folder (campaign 39b F4): there when not in OUT, and
            # shown only when its bytes are the recorded ones (checked below)
            p = out / p if name != "input" or (out / p).exists() or not p.exists() else p.absolute()
        if name == "enhanced" and not _inside(out, rel):
            lost.add(name, key, f"{p} (not a file of the run's folder)")
            continue
        try:
            recorded = (inputs_sha256 or {}).get(key) if name == "input" else None
            if name == "input" and inputs_sha256 is not None and recorded is None and ok:
                # a run records the sha256 of every input it finished: a finished row's path without one was
                # not its input (campaign 19a F3: an edited manifest could show any image file on the page; a
                # pending row of an interrupted --simulate run has no degraded image recorded yet)
                lost.add(name, key, f"{p} (no sha256 recorded by the run)")
                continue
            info: dict = {}
            thumb = thumb_array(p, side, info)  # the file read once: its sha256 comes with the decoding
            if recorded is not None and info.get("sha256") != recorded:
                lost.add(name, key, f"{p} (changed since the run)")
                continue
            base[name] = thumb
            t[name] = data_uri(base[name])
        except unreadable:
            older = (name == "input" and not Path(rel).is_absolute() and not (out / Path(rel).parts[0]).exists()
                     and not Path(rel).exists())  # (a file there that cannot be read is named as it is)
            lost.add(name, key, f"{rel} (a relative path, in neither {out} nor the working folder: a version before 2026-12-02 "
                                "recorded the inputs relative to the folder it was run in; run `fundus report` there)" if older else str(p))
    if row.get("vessels_image"):
        seg = base.get("enhanced" if row.get("segmented") == "enhanced" else "input")
        if not _inside(out, row["vessels_image"]):
            lost.add("vessels", key, f"{out / row['vessels_image']} (not a file of the run's folder)")
        else:
            try:
                t["vessels"] = data_uri(overlay_thumb(seg, out / row["vessels_image"], side))
                t["vessels_alone"] = seg is None
            except unreadable:
                lost.add("vessels", key, str(out / row["vessels_image"]))
    t["lost"] = named
    return t


class _Lost:
    """Where ``thumbnails`` puts an image it does not show: the run-wide ``missing`` list (key, path), and the
    row's own list of cells to mark (ok rows only, as ``missing``)."""

    def __init__(self, missing: list, named: list, ok: bool):
        self.missing, self.named, self.ok = missing, named, ok

    def add(self, cell: str, key: Any, what: str) -> None:
        self.missing.append((key, what))
        if self.ok:
            self.named.append(cell)


def _inside(out: Path, rel: object) -> bool:
    """``rel`` names a file of the run's folder: relative, of plain parts, and not reached through a symbolic
    link out of it (a hand-edited row or a link in OUT could show any image file on the page; campaign 19a F3)."""
    from fundus_pipeline.runner import plain_name

    if not plain_name(str(rel).replace("\\", "/")):
        return False
    real_out = os.path.realpath(out)
    return os.path.realpath(os.path.join(out, str(rel))).startswith(real_out + os.sep)


def _bounded_map(fn, items: Iterable, workers: int, window: int) -> Iterator:
    """``map(fn, items)`` in order on a thread pool, at most ``window`` results ahead (bounded memory)."""
    from collections import deque

    it = iter(items)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        pending: deque = deque()
        for x in it:
            pending.append(ex.submit(fn, x))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ------------------------------------------------------------------------------------------- figures
def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def svg_bars(pairs: list[tuple[str, float]], *, width: int = 300, bar: int = 16, fmt: str = "{:g}", color: str | dict = "#3b7dd8",
             label: str = "") -> str:
    """A horizontal bar chart (label, value) as inline SVG; ``color`` one for all bars or one per label. Its
    ``aria-label`` gives the figures in words (``role="img"`` hides the drawn text from a screen reader)."""
    if not pairs:
        return ""
    top = max((v for _, v in pairs), default=0) or 1
    lw = 96
    h = bar * len(pairs) + 4
    words = ", ".join(f"{name} {fmt.format(v)}" for name, v in pairs)
    parts = [f'<svg class="chart" width="{width}" height="{h}" viewBox="0 0 {width} {h}" role="img" '
             f'aria-label="{html.escape(f"{label}: {words}" if label else words)}">']
    for i, (name, v) in enumerate(pairs):
        y = i * bar + 2
        w = (width - lw - 48) * v / top
        fill = color.get(name, "#3b7dd8") if isinstance(color, dict) else color
        parts.append(f'<text x="0" y="{y + bar - 4}">{html.escape(str(name))}</text>')
        parts.append(f'<rect x="{lw}" y="{y + 2}" width="{w:.1f}" height="{bar - 4}" fill="{fill}"/>')
        parts.append(f'<text x="{lw + w + 4:.1f}" y="{y + bar - 4}">{fmt.format(v)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_histogram(values: list[float], lo: float, hi: float, *, bins: int = 20, width: int = 300, height: int = 90, color: str = "#3b7dd8",
                  label: str = "") -> str:
    """A histogram of ``values`` over [lo, hi] as inline SVG (axis labels at both ends). Values outside the
    range are counted in the end bins, and the chart says how many (campaign 21a F14); its ``aria-label``
    gives the range, the count and the median in words."""
    if not values or hi <= lo:
        return ""
    below, above = sum(v < lo for v in values), sum(v > hi for v in values)
    counts = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))[0]
    top = int(counts.max()) or 1
    outside = "; ".join(t for t in (f"{below} below {lo:g}" if below else "", f"{above} above {hi:g}" if above else "") if t)
    if outside:
        height += 14
    ph = height - 16 - (14 if outside else 0)
    bw = width / bins
    words = f"{label + ': ' if label else ''}{len(values)} values from {lo:g} to {hi:g}, median {float(np.median(values)):.3f}"
    words += f" ({outside}, counted in the end bins)" if outside else ""
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(words)}">']
    for i, c in enumerate(counts):
        bh = ph * int(c) / top
        parts.append(f'<rect x="{i * bw + 0.5:.1f}" y="{ph - bh:.1f}" width="{bw - 1:.1f}" height="{bh:.1f}" fill="{color}"><title>{int(c)}</title></rect>')
    y = ph + 14
    parts.append(f'<text x="0" y="{y}">{lo:g}</text><text x="{width}" y="{y}" text-anchor="end">{hi:g}</text>')
    parts.append(f'<text x="{width / 2}" y="{y}" text-anchor="middle">n={len(values)}, max bin {top}</text>')
    if outside:
        parts.append(f'<text x="0" y="{y + 14}">{outside} (in the end bins)</text>')
    parts.append("</svg>")
    return "".join(parts)


def split_warning(text: Any) -> tuple[str, str]:
    """A run table's ``warning`` cell as (the grader's warnings, the segmenter's): the grader's come first (the
    grey-photograph warning ``stages.grade.GREY_WARNING``, then a small, squashed or field-less photograph's, each
    beginning as ``SMALL_WARNING`` / ``SQUASHED_WARNING`` / ``NO_FOV_WARNING`` does and holding no "; "), the rest
    is the segmenter's plausibility warning."""
    from fundus_pipeline.stages.grade import GREY_WARNING, NO_FOV_WARNING, SMALL_WARNING, SQUASHED_WARNING

    rest, grade = str(text or ""), []
    while True:
        if rest.startswith(GREY_WARNING):
            part = GREY_WARNING
        elif rest.startswith((SMALL_WARNING, SQUASHED_WARNING, NO_FOV_WARNING)):
            part = rest.split("; ", 1)[0]
        else:
            break
        grade.append(part)
        rest = rest[len(part) :].removeprefix("; ")
    return "; ".join(grade), rest


def summary(rows: Iterable[dict], simulate: bool, truth: bool) -> dict:
    """Counts and figures for the top of the page (no thumbnails), in one pass over the rows."""
    from fundus_pipeline.stages.grade import GREY_WARNING

    grades: Counter = Counter()
    flags: Counter = Counter()
    status: Counter = Counter()
    scores, gains, vf = [], [], []
    n = enhanced = enhance_failed = used = segmented = warnings = grey = unsure = 0
    metrics = ["psnr", "ssim", "f1"] + (["f1_gt"] if truth else [])
    groups: dict[str, dict[str, Any]] = {}  # per degradation: counts and each metric's values
    for r in rows:
        n += 1
        if r.get("grade"):
            grades[r["grade"]] += 1
        flags.update(str(r.get("flags") or "").split())
        status[r["status"]] += 1
        for vals, col in ((scores, "score"), (gains, "score_gain"), (vf, "vessel_fraction")):
            if (v := _num(r.get(col))) is not None:
                vals.append(v)
        enhanced += bool(r.get("enhanced_image"))
        # the enhance step failed: its reason says so (the error cell names steps failing alike together, "enhance,
        # segment: ...", where this had looked for "enhance: "; review 30 M1)
        enhance_failed += r.get("enhanced") == "yes" and not r.get("enhanced_image") and str(r.get("enhance_reason") or "").endswith("(failed)")
        used += r.get("segmented") == "enhanced" and bool(r.get("vessels_image"))
        segmented += bool(r.get("vessels_image"))
        grade_warning, segment_warning = split_warning(r.get("warning"))
        warnings += bool(segment_warning)
        grey += grade_warning.startswith(GREY_WARNING)
        unsure += grade_warning.removeprefix(GREY_WARNING) != ""  # a small, squashed or field-less photograph's, besides or instead
        if simulate and r["status"] == "ok":
            g = groups.setdefault(r.get("degradation") or "?", {"n": 0, "enhanced": 0, "used": 0, "values": {}})
            g["n"] += 1
            g["enhanced"] += bool(r.get("enhanced_image"))
            g["used"] += r.get("segmented") == "enhanced"
            for m in metrics:
                for when in ("before", "after"):
                    if (v := _num(r.get(f"{m}_{when}"))) is not None:
                        g["values"].setdefault(f"{m}_{when}", []).append(v)
    s = {
        "total": n,
        "status": dict(status),
        "grades": [(g, grades.get(g, 0)) for g in GRADES],
        "flags": [(f, flags[f]) for f in FLAGS if flags.get(f)],
        "enhanced": enhanced,
        "enhance_failed": enhance_failed,
        "used": used,
        "segmented": segmented,
        "warnings": warnings,
        "grey": grey,
        "unsure": unsure,  # graded though small, squashed or without a field of view (stages.grade.frame_warning)
        "score_mean": _mean(scores),
        "gain_mean": _mean(gains),
        "vf_mean": _mean(vf),
        "plots": {
            "grades": svg_bars([(g, grades.get(g, 0)) for g in GRADES], color=GRADE_COLOURS, label="photographs per grade"),
            "flags": svg_bars([(f, flags[f]) for f in FLAGS if flags.get(f)], color="#c0392b", label="photographs per flag"),
            "scores": svg_histogram(scores, 0.0, 1.0, label="score of the enhanced images"),
            "gains": svg_histogram(gains, -0.3, 0.3, label="score gain over the input"),
            "vessels": svg_histogram(vf, 0.0, 0.25, label="vessel fraction in the FOV"),
        },
    }
    if simulate:
        table = []
        for name in sorted(groups) + (["all"] if len(groups) > 1 else []):
            gs = list(groups.values()) if name == "all" else [groups[name]]
            line: dict[str, Any] = {"degradation": name, **{k: sum(g[k] for g in gs) for k in ("n", "enhanced", "used")}}
            for m in metrics:
                for when in ("before", "after"):
                    col = f"{m}_{when}"
                    line[col] = _mean([v for g in gs for v in g["values"].get(col, [])])
            table.append(line)
        s["by_degradation"] = table
        s["metrics"] = metrics
    return s


# ------------------------------------------------------------------------------------------- page
_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _no_controls(value: Any) -> Any:
    """A text value with its control characters (a NUL, an ESC; not tab or newline) as U+FFFD: HTML has no
    place for them, and a NUL in a hand-edited row made the page a parse error (campaign 19a F8); and every
    other character that is not printable (a bidirectional override such as U+202E, which made
    "safe\u202egnp.exe" read "safeexe.png"; a zero-width space, U+FEFF, a soft hyphen, a line separator: Python's
    ``str.isprintable``) written as its escape (``\u202e``), as the console's lines write them, so a name reads as
    what it is and two names that look the same are told apart (campaign 21a F5, review 21 M3). Tab, newline and
    carriage return stay. Markup the template marked safe is left as it is."""
    import markupsafe

    if not isinstance(value, str) or isinstance(value, markupsafe.Markup):
        return value
    if _CONTROLS.search(value):
        value = _CONTROLS.sub("\ufffd", value)
    if not value.isprintable():
        value = "".join(c if c.isprintable() or c in "\t\n\r" else repr(c)[1:-1] for c in value)
    return value


@functools.lru_cache(maxsize=1)
def _environment():  # one a process: each page of a 10,000-row report had compiled the template again
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).parent)),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        finalize=_no_controls,
    )

    def fmt(v: Any, nd: int = 3) -> str:
        f = _num(v)
        return "" if f is None else f"{f:.{nd}f}"

    def gain(v: Any, min_gain: float = 0.0) -> str:
        from fundus_pipeline.chain import format_gain

        f = _num(v)
        return "" if f is None else format_gain(f, min_gain)

    env.filters["fmt"] = fmt
    env.filters["gain"] = gain  # signed, with the digits that decide against min-gain (campaign 21a F2)
    return env


#: Rows per page: a report of more photographs is split into report.html, report-2.html, ... (a browser
#: opens 1,000 rows with their thumbnails in about 1.5 s, 10,000 in one page took 17 s).
PAGE_ROWS = 1000


def page_name(page: int) -> str:
    return "report.html" if page == 1 else f"report-{page}.html"


def _segment_threshold(out: Path) -> float | None:
    """The threshold the run's vessel masks were written with (its segment folder's manifest, read as
    `fundus evaluate segment` reads it), if it reads."""
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.evaluation.segment import _threshold_from_manifest

    try:
        return _threshold_from_manifest(out / "segment")
    except UsageError:
        return None


def header(cfg, run: dict | None, threshold: float | None) -> dict[str, Any]:
    """What the page's header states (campaign 21a F3): the settings of the steps that ran and nothing of those
    that did not, each step's weights with the start of their sha256, and the run's ``run_sha256``. No date,
    path or command: a replay writes the same page (they are in manifest.json, and the page says so)."""
    run = run or {}
    steps = list(cfg.steps)
    settings: list[str] = []
    if "grade" in steps:
        settings.append(f"flag-threshold {cfg.flag_threshold:g}")
        if "enhance" in steps:
            settings.append(f"enhance-if {','.join(cfg.enhance_if)}")
    if "enhance" in steps:
        settings.append(f"transfer {cfg.transfer}")
        if cfg.correction_sigma is not None:
            settings.append(f"correction-sigma {cfg.correction_sigma:g}")
    if "score" in steps and "enhance" in steps:
        settings.append(f"min-gain {cfg.min_gain:g}")
        settings.append(f"min-score {cfg.min_score:g}")
    if "segment" in steps:
        t = cfg.threshold if cfg.threshold is not None else threshold
        settings.append(f"vessel threshold {t:g}" if t is not None else "vessel threshold: the weights' own")
    recorded = run.get("weights") if isinstance(run.get("weights"), dict) else {}
    weights = []
    for step in steps:
        name = getattr(cfg, f"{step}_weights", None)
        if name is None:
            continue
        rec = recorded.get(step) if isinstance(recorded.get(step), dict) else {}
        sha = rec.get("sha256")
        if isinstance(rec.get("name"), str) and rec["name"]:
            name = rec["name"]  # a weights file given by its path is named as the run recorded it, not by the path
        weights.append(f"{step} {name}" + (f" (sha256 {sha[:12]})" if isinstance(sha, str) and sha else ""))
    notes = run.get("notes") if isinstance(run.get("notes"), list) else []
    sha = run.get("run_sha256") if isinstance(run.get("run_sha256"), str) else ""
    return {"settings": settings, "weights": weights, "run_sha256": sha, "notes": [str(n) for n in notes],
            "interrupted": run.get("status") == "interrupted"}


def render_chunks(out: Path, cfg, rows: Iterable[dict], *, workers: int | None = None, summary_: dict | None = None,
                  page: int = 1, pages: int = 1, first: int = 1, last: int = 0, missing: list | None = None,
                  inputs_sha256: dict | None = None, run: dict | None = None, threshold: Any = "read") -> Iterator[str]:
    """One page as a stream of text chunks (thumbnails made a bounded window ahead of the rows). ``rows``:
    the page's rows; ``summary_``: the figures of the whole run (default: computed from ``rows``, which is
    then read twice: a list, or a re-iterable such as ``chain.RowsFile``); ``page`` of ``pages``, whose first
    row is the run's row number ``first`` and last ``last``; ``run``: what the run's manifest records beside
    its configuration (``weights``, ``run_sha256``, the input folder's ``notes``, ``status``), for the header;
    ``threshold``: the one the vessel masks were written with, None when not known (default: read from the segment
    folder's manifest)."""
    truth = cfg.ground_truth is not None and "segment" in cfg.steps
    simulate = bool(cfg.simulate)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    tally = {"lost": 0}  # images this page's rows name and does not show (read by the template after the rows)

    def with_thumbs(row: dict) -> dict:
        grade_warning, segment_warning = split_warning(row.get("warning"))
        thumbs = thumbnails(out, row, cfg.thumbnail, missing, inputs_sha256)
        tally["lost"] += len(thumbs["lost"])
        return {**row, "thumbs": thumbs, "flag_list": str(row.get("flags") or "").split(),
                "grade_warning": grade_warning, "segment_warning": segment_warning}

    figures = summary_ if summary_ is not None else summary(rows, simulate, truth)
    if threshold == "read":
        threshold = _segment_threshold(out) if "segment" in cfg.steps else None
    head = header(cfg, run, threshold)
    name = "fundus run report" + (f" {head['run_sha256'][:8]}" if head["run_sha256"] else "")
    template = _environment().get_template("report.html.j2")
    return template.generate(
        version=__version__,
        title=f"{name} ({figures['total']} photographs" + (f", page {page} of {pages})" if pages > 1 else ")"),
        head=head,
        tally=tally,
        cfg=cfg,
        steps=cfg.steps,
        simulate=simulate,
        truth=truth,
        summary=figures,
        grades=GRADES,
        flags=FLAGS,
        rows=_bounded_map(with_thumbs, rows, workers, 4 * workers),
        page=page,
        pages=[(k, page_name(k)) for k in range(1, pages + 1)],
        first=first,
        last=last,
    )


def write_report(out: Path, cfg, rows: Iterable[dict], missing: list | None = None, inputs_sha256: dict | None = None,
                 run: dict | None = None) -> Path:
    """Write ``out/report.html`` (and, past ``PAGE_ROWS`` photographs, ``report-2.html``, ... each with the
    whole run's summary and links to the others), each page streamed to a temporary file and renamed.
    ``rows`` is read twice (a list or ``chain.RowsFile``); pages of an earlier, longer report are removed.
    ``missing`` collects (key, path) of the images that ok rows name and that could not be read (or, given the
    run's ``inputs_sha256``, whose bytes changed since). ``run``: see ``render_chunks``."""
    import itertools
    import re

    from fundus_pipeline.io import open_atomic

    out = Path(out)
    simulate = bool(cfg.simulate)
    figures = summary(rows, simulate, cfg.ground_truth is not None and "segment" in cfg.steps)
    pages = max(1, -(-figures["total"] // PAGE_ROWS))
    threshold = _segment_threshold(out) if "segment" in cfg.steps else None  # once, not once a page
    it = iter(rows)
    for page in range(1, pages + 1):
        with open_atomic(out / page_name(page), errors="backslashreplace") as f:  # a page is valid UTF-8: an odd byte of a name shows as \udcXX
            for chunk in render_chunks(out, cfg, itertools.islice(it, PAGE_ROWS), summary_=figures, page=page, pages=pages,
                                       first=(page - 1) * PAGE_ROWS + 1, last=min(page * PAGE_ROWS, figures["total"]), missing=missing,
                                       inputs_sha256=inputs_sha256, run=run, threshold=threshold):
                f.write(chunk)
    for stale in out.glob("report-*.html"):
        m = re.fullmatch(r"report-(\d+)\.html", stale.name)
        if m and int(m.group(1)) > pages:
            stale.unlink()
    return out / "report.html"
