"""``fundus evaluate``: score outputs against references (``segment``: vessel maps vs ground truth;
``enhance``: enhanced photographs vs clean references; ``score``: predicted quality scores vs quality labels;
``grade``: predicted quality grades and flags vs quality labels)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from fundus_pipeline.cli.app import app
from fundus_pipeline.cli.options import Format, FormatOpt, flag, path_arg
from fundus_pipeline.errors import UsageError, printable

if TYPE_CHECKING:
    from fundus_pipeline.evaluation.segment import EvalResult

evaluate_app = typer.Typer(
    help="Evaluate pipeline outputs against reference annotations.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(evaluate_app, name="evaluate", help="Evaluate outputs against ground truth.")


#: Every evaluator takes it, so one script can pass it to all four (campaign 17a F5).
OverwriteOpt = Annotated[bool, flag("--overwrite", help="Accepted for compatibility; has no effect (the reports are always replaced).")]


@evaluate_app.command("segment")
def segment(
    pred_dir: Annotated[
        Path,
        typer.Argument(metavar="PRED_DIR",
            help="Predictions: a `fundus segment` output folder (K_prob.png / K_vessels.png) or a folder of "
            "binary masks or probability maps (e.g. DRIVE 2nd_manual for the second observer).",
            show_default=False,
            parser=path_arg,
        ),
    ],
    gt_dir: Annotated[Path, typer.Argument(metavar="GT_DIR", help="Ground-truth vessel masks (e.g. DRIVE 1st_manual, HRF manual1).", show_default=False, parser=path_arg)],
    fov: Annotated[
        Optional[Path],
        typer.Option("--fov", help="FOV masks folder (e.g. DRIVE mask/); without it the FOV is the whole image.", show_default=False, parser=path_arg),
    ] = None,
    threshold: Annotated[
        Optional[float],
        typer.Option(
            "--threshold",
            min=0.0,
            max=1.0,
            metavar="T",
            help="Decision threshold: a pixel is vessel when its probability >= T "
            "[default: config.threshold of PRED_DIR/manifest.json, or of the nearest manifest above it (a `fundus run` folder's segment/manifest.json; predictions written with different thresholds: exit 2), else 0.5].",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Output folder for metrics.csv, summary.json and summary.md; reports of an earlier run there are "
            "replaced, other files are left alone [default: PRED_DIR/eval].",
            show_default=False,
            parser=path_arg,
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = Format.human,
    bootstrap: Annotated[
        int,
        typer.Option(
            "--bootstrap",
            min=0,
            help="Bootstrap resamples over images for the 95% CIs; 0: no CIs (no CI columns, no ci95 in summary.json).",
        ),
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Bootstrap seed (results are identical for the same seed).")] = 0,
    no_cldice: Annotated[bool, flag("--no-cldice", help="Skip clDice (skeletonisation is the slowest part on large images).")] = False,
) -> None:
    """Score vessel predictions against ground truth inside the FOV.

    Files pair by name: lower-cased, without extension and without the suffixes _prob, _vessels, _mask,
    _manual1, _manual2, _test, _training (DRIVE 01_test_prob.png ~ 01_manual1.gif ~ 01_test_mask.gif;
    HRF 01_h_prob.png ~ 01_h.tif ~ 01_h_mask.tif). Writes metrics.csv, summary.json and summary.md.
    Every prediction is scored; ground-truth images without a prediction are only counted (one line on
    stderr, listed in summary.json). Exit 3 when a prediction has no ground truth (or no FOV mask with
    --fov) or an item is unreadable (the others are still scored), 2 when nothing pairs.
    """
    from fundus_pipeline.evaluation.segment import check_out_dir, evaluate_segmentation, summary_human, write_outputs

    del overwrite  # accepted for compatibility only: the reports are always replaced

    _check_folders(("PRED_DIR", pred_dir), ("GT_DIR", gt_dir), ("--fov", fov))
    out_dir = out if out is not None else pred_dir / "eval"
    check_out_dir(out_dir)  # refuse an unusable --out before the (slow) scoring

    result = evaluate_segmentation(
        pred_dir, gt_dir, fov, threshold=threshold, n_boot=bootstrap, seed=seed, out_dir=out_dir, with_cldice=not no_cldice
    )
    _finish(result, out_dir, fmt, write_outputs, summary_human)


def _check_folders(*named: tuple[str, Path | None]) -> None:
    """``UsageError`` for a given path that is not a folder."""
    for what, p in named:
        if p is not None and not p.is_dir():
            raise UsageError(f"{what} is not a folder: {p}")


def _finish(
    result: EvalResult,
    out_dir: Path,
    fmt: Format,
    write: Callable[[EvalResult, Path], object],
    human: Callable[[dict[str, Any]], str],
) -> None:
    """Write the reports (announcing replaced ones), print warnings, notes and the summary; exit 3 on problems."""
    from fundus_pipeline.evaluation.segment import check_out_dir

    if check_out_dir(out_dir):
        typer.echo(f"replacing the earlier reports in {out_dir}", err=True)
    write(result, out_dir)

    for msg in result.messages:
        typer.echo(printable(f"warning: {msg}"), err=True)
    for note in result.notes:
        typer.echo(printable(note), err=True)
    if fmt is Format.json:
        typer.echo(json.dumps(result.summary, indent=2, allow_nan=False))
    else:
        typer.echo(human(result.summary))
        typer.echo(f"reports: {out_dir}/metrics.csv, summary.json, summary.md")
    if result.n_problems:
        raise typer.Exit(3)


@evaluate_app.command("enhance")
def enhance(
    enh_dir: Annotated[
        Path,
        typer.Argument(metavar="ENH_DIR", help="Enhanced photographs: a `fundus enhance` output folder (KEY.png) or any folder of images.", show_default=False, parser=path_arg),
    ],
    ref_dir: Annotated[Path, typer.Argument(metavar="REF_DIR", help="Clean reference photographs (e.g. the originals that were degraded).", show_default=False, parser=path_arg)],
    fov: Annotated[
        Optional[Path],
        typer.Option(
            "--fov",
            help="FOV masks folder (e.g. HRF mask/); without it the FOV is estimated on each reference image.",
            show_default=False,
            parser=path_arg,
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Output folder for metrics.csv, summary.json and summary.md; reports of an earlier run there are "
            "replaced, other files are left alone [default: ENH_DIR/eval].",
            show_default=False,
            parser=path_arg,
        ),
    ] = None,
    fmt: FormatOpt = Format.human,
    bootstrap: Annotated[
        int,
        typer.Option("--bootstrap", min=0, help="Bootstrap resamples over images for the 95% CIs of the means; 0: no CIs."),
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Bootstrap seed (results are identical for the same seed).")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Score enhanced photographs against clean references inside the FOV: PSNR, SSIM, MS-SSIM, CIEDE2000.

    Files pair by name as in `fundus evaluate segment` (01_h.png ~ 01_h.jpg ~ 01_h_mask.tif). Images are
    scored at their native resolution as RGB in [0, 1]; sizes must match. Writes metrics.csv, summary.json
    (with each metric's exact definition) and summary.md. Every enhanced image is scored; references without
    one are only counted (one line on stderr). Exit 3 when an enhanced image has no reference (or no FOV
    mask with --fov) or an item is unreadable or mismatched (the others are still scored), 2 when nothing pairs.
    """
    del overwrite  # accepted for compatibility only: the reports are always replaced
    from fundus_pipeline.evaluation.enhance import evaluate_enhancement, summary_human, write_outputs
    from fundus_pipeline.evaluation.segment import check_out_dir

    _check_folders(("ENH_DIR", enh_dir), ("REF_DIR", ref_dir), ("--fov", fov))
    out_dir = out if out is not None else enh_dir / "eval"
    check_out_dir(out_dir)  # refuse an unusable --out before the (slow) scoring

    result = evaluate_enhancement(enh_dir, ref_dir, fov, n_boot=bootstrap, seed=seed, out_dir=out_dir)
    _finish(result, out_dir, fmt, write_outputs, summary_human)


@evaluate_app.command("score")
def score(
    scores_csv: Annotated[
        Path,
        typer.Argument(metavar="SCORES_CSV", help="Predicted quality scores: a `fundus score` results.csv (key, score, status) or any CSV "
                       "with a key column and a score column.", show_default=False, parser=path_arg),
    ],
    labels: Annotated[
        Path,
        typer.Argument(metavar="LABELS", help="Quality labels: a quality set's pairs.csv (key, part, source, label, grouping columns), "
                       "or the folder holding it.", show_default=False, parser=path_arg),
    ],
    column: Annotated[
        str, typer.Option("--column", help="The score column of SCORES_CSV (higher = better quality).")
    ] = "score",
    part: Annotated[
        str, typer.Option("--part", metavar="PART", help="Label rows of this part only (test, train, ...); all: every row.")
    ] = "test",
    by: Annotated[
        str,
        typer.Option("--by", metavar="COLS", help="Comma-separated label columns to report per group as well; '': none."),
    ] = "enhancer,family",
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Output folder for metrics.csv, summary.json and summary.md; reports of an earlier run there are "
            "replaced, other files are left alone [default: SCORES_CSV's folder/eval_score].",
            show_default=False,
            parser=path_arg,
        ),
    ] = None,
    bootstrap: Annotated[
        int,
        typer.Option("--bootstrap", min=0, help="Bootstrap resamples of source photographs for the 95% CIs; 0: no CIs."),
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Bootstrap seed (results are identical for the same seed).")] = 0,
    fmt: FormatOpt = Format.human,
    overwrite: OverwriteOpt = False,
) -> None:
    """Score predicted image quality against quality labels: SROCC, PLCC, KROCC, RMSE.

    Joins SCORES_CSV and the labels on key (label rows of --part only). SROCC (Spearman) and KROCC (Kendall
    tau-b) use the raw scores; PLCC (Pearson) and RMSE compare the labels with the scores mapped onto the
    label scale by a least-squares 4-parameter logistic (VQEG), fitted per set. Reported for all pairs and
    per group of each --by column, with 95% CIs from a cluster bootstrap that resamples source photographs
    (all pairs of a drawn source together). Writes metrics.csv (one row per group), summary.json (with each
    metric's exact definition) and summary.md. Rows whose status is not ok, with an empty or non-numeric
    score, or whose key is not in the labels are listed and not scored (exit 3; the others are still scored);
    label rows without a score are only counted. Exit 2 for an unreadable file, a missing column or no key in
    common.
    """
    del overwrite  # accepted for compatibility only: the reports are always replaced
    from fundus_pipeline.evaluation.score import evaluate_scores, summary_human, write_outputs
    from fundus_pipeline.evaluation.segment import check_out_dir

    labels_csv = labels / "pairs.csv" if labels.is_dir() else labels
    for what, p in (("SCORES_CSV", scores_csv), ("LABELS", labels_csv)):
        if not p.is_file():
            raise UsageError(f"{what} is not a file: {p}")
    out_dir = out if out is not None else scores_csv.parent / "eval_score"
    check_out_dir(out_dir, (scores_csv, labels_csv))  # refuse an unusable --out before the bootstrap

    groups = [c.strip() for c in by.split(",") if c.strip()]
    result = evaluate_scores(
        scores_csv, labels_csv, column=column, by=groups, part=None if part == "all" else part, n_boot=bootstrap, seed=seed,
        log=lambda m: typer.echo(m, err=True),
    )
    _finish(result, out_dir, fmt, write_outputs, summary_human)


@evaluate_app.command("grade")
def grade(
    results_csv: Annotated[
        Path,
        typer.Argument(metavar="RESULTS_CSV", help="Predicted grades: a `fundus grade` results.csv (key, status, grade, p_good, p_usable, "
                       "p_reject, temperature, p_<flag>).", show_default=False, parser=path_arg),
    ],
    labels: Annotated[
        Path,
        typer.Argument(metavar="LABELS", help="Quality labels: EyeQ's image,quality[,DR_grade] CSV as published, or a CSV with key, "
                       "quality (0 good, 1 usable, 2 reject) and optionally flag_<name>, source and grouping "
                       "columns; or the folder holding it as labels.csv.", show_default=False, parser=path_arg),
    ],
    by: Annotated[
        Optional[list[str]],
        typer.Option("--by", metavar="COL", help="Label column to report per group as well (repeat it, or "
                     "comma-separate: --by family --by DR_grade) [default: none].", show_default=False),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            help="Output folder for metrics.csv, summary.json and summary.md; reports of an earlier run there are "
            "replaced, other files are left alone [default: RESULTS_CSV's folder/eval_grade].",
            show_default=False,
            parser=path_arg,
        ),
    ] = None,
    bootstrap: Annotated[
        int,
        typer.Option("--bootstrap", min=0, help="Cluster-bootstrap resamples for the 95% CIs; 0: no CIs."),
    ] = 1000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Bootstrap seed (results are identical for the same seed).")] = 0,
    fmt: FormatOpt = Format.human,
    overwrite: OverwriteOpt = False,
) -> None:
    """Score predicted quality grades against quality labels: accuracy, macro F1, kappa, flag AUC, ECE.

    Joins RESULTS_CSV and the labels on key (EyeQ labels: the image name without extension). Reports, for
    all images and per group of each --by column: accuracy, macro F1, quadratic-weighted kappa, per-class
    precision and recall, the confusion matrix and the predicted-class fractions (the grade column); the ROC
    AUC of each p_<flag> against the labels' flag_<flag> and their mean; expected calibration error (15 bins)
    and NLL before (softmax(T ln p)) and after temperature scaling. 95% CIs come from a cluster bootstrap over
    the labels' source column, else over patients for EyeQ keys (both eyes together), else over images.
    Writes metrics.csv (one row per group), summary.json (with each metric's exact definition) and
    summary.md. Rows whose status is not ok, with an invalid grade or probability, or whose key is not in the
    labels are listed and not graded (exit 3; the others are still graded); label rows without a result are
    only counted. Exit 2 for an unreadable file, a missing column, a bad label value or no key in common.
    """
    del overwrite  # accepted for compatibility only: the reports are always replaced
    from fundus_pipeline.evaluation.grade import evaluate_grades, summary_human, write_outputs
    from fundus_pipeline.evaluation.segment import check_out_dir

    labels_csv = labels / "labels.csv" if labels.is_dir() else labels
    for what, p in (("RESULTS_CSV", results_csv), ("LABELS", labels_csv)):
        if not p.is_file():
            raise UsageError(f"{what} is not a file: {p}")
    out_dir = out if out is not None else results_csv.parent / "eval_grade"
    check_out_dir(out_dir, (results_csv, labels_csv))  # refuse an unusable --out before the bootstrap

    groups = [c.strip() for v in by or [] for c in v.split(",") if c.strip()]
    result = evaluate_grades(results_csv, labels_csv, by=groups, n_boot=bootstrap, seed=seed)
    _finish(result, out_dir, fmt, write_outputs, summary_human)
