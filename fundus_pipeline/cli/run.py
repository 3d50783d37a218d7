"""``fundus run``: the chained pipeline with its report; ``fundus report``: rebuild the report of a run."""

from __future__ import annotations

import contextlib
import itertools
import json
import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from fundus_pipeline.errors import printable
from fundus_pipeline.cli.app import app, open_engine, say_err
from fundus_pipeline.cli.options import EngineName, Format, flag, path_arg
from fundus_pipeline.config import RunConfig

#: The options ``--replay`` accepts: they change where and how fast a run goes. ``--threads`` (and ``--workers``,
#: whose default thread count follows it) may move a probability by one level: the replay keeps the run's thread
#: count unless ``--threads`` is given, and its check against the recorded run says whether anything moved.
REPLAY_OVERRIDES = ("workers", "threads", "engine", "address", "quiet", "format", "resume", "overwrite")


def _d(name: str) -> str:
    v = RunConfig.model_fields[name].default
    if isinstance(v, list):
        v = ",".join(v)
    return f" [default: {v}]" if v is not None else ""


def _opt(*names: str, help: str, field: str) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help + _d(field), show_default=False)


#: The option that sets each on/off field to False.
_OFF_FLAGS = {"report": "--no-report", "compile": "--no-compile", "keep_outside": "--zero-outside"}


def _option_name(field: str, value: object) -> str:
    """The option as the user typed it: ``--no-report`` for report=False, ``--min-gain`` for min_gain."""
    if value is False and field in _OFF_FLAGS:
        return _OFF_FLAGS[field]
    return "--" + field.replace("_", "-")


def build_config(file: Path | None, options: dict) -> "tuple[RunConfig, dict]":
    """The run's configuration: the TOML file's keys, overridden by the options given on the command line;
    and the values only the file set (a usage error about one of them names the file: ``from_file``)."""
    from fundus_pipeline.config import load_toml_config

    given = {k: v for k, v in options.items() if v is not None}
    values = load_toml_config(file, set(given)) if file is not None else {}
    file_values = {k: v for k, v in values.items() if k not in given}
    with from_file(file, file_values):
        cfg = RunConfig.build(**(values | given))
    # weights given as a file are recorded by absolute path, as the inputs are: --resume and --replay find them
    # from any working folder (a relative path failed there, 'weights not found')
    files = {k: str(Path(v).resolve()) for k in WEIGHT_FIELDS if (v := getattr(cfg, k)) and Path(v).is_file()}
    return (cfg.model_copy(update=files) if files else cfg), file_values


WEIGHT_FIELDS = ("grade_weights", "enhance_weights", "score_weights", "segment_weights")


@contextlib.contextmanager
def from_file(file: Path | None, values: dict):
    """A usage error raised inside that names the option of a value only the ``--config`` file set says so:
    ``--ground-truth ...: it needs --simulate (ground_truth is set by --config run.toml)``; the user never
    typed ``--ground-truth``. A file value equal to the default (``resume = false``) is not named: it cannot
    be what the error is about."""
    from fundus_pipeline.errors import UsageError

    try:
        yield
    except UsageError as e:
        named = [k for k, v in sorted(values.items()) if v != RunConfig.model_fields[k].default
                 and re.search(re.escape(_option_name(k, v)) + r"(?![\w-])", e.message)]
        if file is None or not named:
            raise
        raise UsageError(f"{e.message} ({', '.join(named)} {'is' if len(named) == 1 else 'are'} set by --config {file})", e.hint) from None


def _summary_line(s: dict) -> str:
    c = s["counts"]
    parts = [f"run: {c['total']} photograph{'' if c['total'] == 1 else 's'}, {c.get('ok', 0)} ok, {c.get('error', 0)} failed"]
    if c.get("pending"):
        parts[0] += f", {c['pending']} not processed"
    if any(c.get(g) for g in ("good", "usable", "reject")):
        parts.append(f"graded {c['good']} good, {c['usable']} usable, {c['reject']} reject")
    parts.append(f"{c['enhanced']} enhanced, {c['enhanced_used']} trusted")
    parts.append(f"{c['segmented']} segmented")
    out = "; ".join(parts)
    if s["interrupted"]:
        out += "; interrupted (rerun with --resume)"
    files = "manifest.json, results.csv" + (", report.html" if s["report"] else "")
    return f"{out} -> {s['output']}  ({files})"


@app.command("run")
def run_cmd(
    in_dir: Annotated[Optional[Path], typer.Argument(metavar="IN", parser=path_arg, help="Input: a folder of fundus photographs (searched recursively), one image, or a text file listing image paths. With --replay: omit it.", show_default=False)] = None,
    out_dir: Annotated[Optional[Path], typer.Argument(metavar="OUT", parser=path_arg, help="Output folder: one sub-folder per stage, results.csv, manifest.json, report.html.", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="A TOML file whose keys are these options' names with underscores (min_gain = 0.02); the command line overrides it.", show_default=False, parser=path_arg)] = None,
    replay: Annotated[Optional[Path], typer.Option("--replay", help="Reproduce the run recorded in OLD_OUT/manifest.json into OUT (not OLD_OUT itself) with its inputs, weights, options and thread count, and check the result byte for byte (a difference: exit 3).", show_default=False, parser=path_arg)] = None,
    steps: Annotated[Optional[str], _opt("--steps", help="Steps to run, comma-separated; they always run in the chain's order grade,enhance,score,segment.", field="steps")] = None,
    enhance_if: Annotated[Optional[str], _opt("--enhance-if", help="Enhance the photographs graded as these (the others pass through unchanged).", field="enhance_if")] = None,
    min_gain: Annotated[Optional[float], _opt("--min-gain", help="Trust (segment) an enhanced image when its score minus the input's own score is at least this (-1 to 1).", field="min_gain")] = None,
    min_score: Annotated[Optional[float], _opt("--min-score", help="... and its score is at least this (0 to 1).", field="min_score")] = None,
    simulate: Annotated[Optional[str], typer.Option("--simulate", help="Degrade the (clean) inputs first: Cofe-Net types (111, '001,010', all) or a recipe (mild, moderate, severe, a JSON file); adds PSNR/SSIM and vessel F1 against the clean originals.", show_default=False)] = None,
    seed: Annotated[Optional[int], _opt("--seed", help="Seed of the simulator (>= 0).", field="seed")] = None,
    ground_truth: Annotated[Optional[Path], typer.Option("--ground-truth", parser=path_arg, help="With --simulate: manual vessel annotations of the clean originals (paired by name, as `fundus evaluate segment` pairs).", show_default=False)] = None,
    device: Annotated[Optional[str], _opt("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.", field="device")] = None,
    precision: Annotated[Optional[str], _opt("--precision", help="fp32, or bf16 or fp16 (fp16 needs CUDA) under autocast for every network step.", field="precision")] = None,
    compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile every network step (see `fundus segment --help`) [default: --no-compile].", show_default=False)] = None,
    grade_weights: Annotated[Optional[str], _opt("--grade-weights", help="Grading weights (a name from `fundus models` or a .pt file).", field="grade_weights")] = None,
    grade_arch: Annotated[Optional[str], typer.Option("--grade-arch", help="Architecture of grading weights not in weights/manifest.json.", show_default=False)] = None,
    flag_threshold: Annotated[Optional[float], _opt("--flag-threshold", help="A grading flag is listed from this probability on (strictly between 0 and 1).", field="flag_threshold")] = None,
    grade_batch_size: Annotated[Optional[int], _opt("--grade-batch-size", help="Photographs per forward pass of the grader.", field="grade_batch_size")] = None,
    enhance_weights: Annotated[Optional[str], _opt("--enhance-weights", help="Enhancement weights.", field="enhance_weights")] = None,
    enhance_arch: Annotated[Optional[str], typer.Option("--enhance-arch", help="Architecture of enhancement weights not in the manifest.", show_default=False)] = None,
    enhance_batch_size: Annotated[Optional[int], _opt("--enhance-batch-size", help="Photographs per forward pass of the enhancer.", field="enhance_batch_size")] = None,
    transfer: Annotated[Optional[str], _opt("--transfer", help="How the enhancement returns to native resolution: auto, upsample or residual.", field="transfer")] = None,
    correction_sigma: Annotated[Optional[float], _opt("--correction-sigma", help="Low-pass of the enhancement's correction in its 512-px frame (0: none) [default: the weights' choice].", field="correction_sigma")] = None,
    keep_outside: Annotated[Optional[bool], typer.Option("--keep-outside/--zero-outside", help="Enhanced images keep the input's pixels outside the field of view [default: zero outside].", show_default=False)] = None,
    score_weights: Annotated[Optional[str], _opt("--score-weights", help="Quality-scoring weights.", field="score_weights")] = None,
    score_arch: Annotated[Optional[str], typer.Option("--score-arch", help="Architecture of scoring weights not in the manifest.", show_default=False)] = None,
    score_batch_size: Annotated[Optional[int], _opt("--score-batch-size", help="Pairs per forward pass of the scorer.", field="score_batch_size")] = None,
    segment_weights: Annotated[Optional[str], _opt("--segment-weights", help="Vessel segmentation weights.", field="segment_weights")] = None,
    segment_arch: Annotated[Optional[str], typer.Option("--segment-arch", help="Architecture of segmentation weights not in the manifest.", show_default=False)] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="Vessel decision threshold [default: the weights' own].", show_default=False)] = None,
    report: Annotated[Optional[bool], typer.Option("--report/--no-report", help="Write OUT/report.html [default: --report].", show_default=False)] = None,
    thumbnail: Annotated[Optional[int], _opt("--thumbnail", help="Thumbnail side in the report, pixels (at least 48).", field="thumbnail")] = None,
    workers: Annotated[Optional[int], _opt("--workers", "-j", help="Parallel worker processes per stage, 1-512 (results do not depend on it at a given --threads; the default --threads follows it).", field="workers")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads per worker, 1-1024 [default: available cores / workers; with --replay, the recorded run's].", show_default=False)] = None,
    engine: Annotated[Optional[EngineName], _opt("--engine", help="local: this machine's worker processes; ray: the actors of a Ray cluster, every stage (--workers actors, --threads CPUs each; pip install 'fundus-pipeline[ray]'). Results do not depend on it.", field="engine")] = None,
    address: Annotated[Optional[str], typer.Option("--address", help="With --engine ray: the Ray cluster to use (the address `ray start --head` prints, or auto) [default: start a local Ray instance].", show_default=False)] = None,
    resume: Annotated[Optional[bool], flag("--resume", help="Continue an earlier run in OUT: what is finished is kept, the rest is done.")] = None,
    overwrite: Annotated[Optional[bool], flag("--overwrite", help="Replace an earlier run in OUT (its own folders only).")] = None,
    quiet: Annotated[Optional[bool], flag("--quiet", "-q", help="No progress output on stderr (errors are still printed).")] = None,
    fmt: Annotated[Optional[Format], typer.Option("--format", help="human: short summary; json: one JSON summary on stdout [default: human].", show_default=False)] = None,
):
    """Run the whole chain over a folder: grade -> enhance (the photographs graded --enhance-if) -> score
    (each enhancement against its input) -> segment (the enhanced image where trusted, else the input),
    with one table (OUT/results.csv) and one page (OUT/report.html).

    Each stage writes its own folder (OUT/grade, OUT/enhance, OUT/score, OUT/segment; with
    --simulate also OUT/degrade, OUT/segment_clean, OUT/compare, and OUT/segment_input where an enhanced
    image was segmented) exactly as its own command would. Every decision and its reason is a column of results.csv. Examples:

      fundus run photos/ out/ && xdg-open out/report.html

      fundus run clean/ exp/ --simulate all --ground-truth manual/ --workers 2
    """
    from fundus_pipeline.chain import read_replay, run_chain
    from fundus_pipeline.errors import UsageError

    cli = {
        "steps": steps, "enhance_if": enhance_if, "min_gain": min_gain, "min_score": min_score, "simulate": simulate, "seed": seed,
        "ground_truth": ground_truth, "device": device, "precision": precision, "compile": compile, "grade_weights": grade_weights, "grade_arch": grade_arch,
        "flag_threshold": flag_threshold, "grade_batch_size": grade_batch_size, "enhance_weights": enhance_weights, "enhance_arch": enhance_arch, "enhance_batch_size": enhance_batch_size, "transfer": transfer,
        "correction_sigma": correction_sigma, "keep_outside": keep_outside, "score_weights": score_weights, "score_arch": score_arch, "score_batch_size": score_batch_size, "segment_weights": segment_weights,
        "segment_arch": segment_arch, "threshold": threshold, "report": report, "thumbnail": thumbnail, "workers": workers,
        "threads": threads, "engine": engine.value if engine is not None else None, "address": address, "quiet": quiet, "format": fmt.value if fmt is not None else None, "resume": resume, "overwrite": overwrite,
    }  # fmt: skip
    degrade_replay = expect = expect_weights = None
    file_values: dict = {}
    if replay is not None:
        if out_dir is None and in_dir is not None:
            in_dir, out_dir = None, in_dir
        if in_dir is not None:
            raise UsageError("--replay takes the input from the replayed manifest: give only OUT")
        fixed = [k for k, v in cli.items() if v is not None and k not in REPLAY_OVERRIDES]
        if fixed or config is not None:
            raise UsageError(f"--replay reruns the recorded options; do not combine it with {_option_name(fixed[0], cli[fixed[0]]) if fixed else '--config'}")
        rp = read_replay(Path(replay))
        # the engine is where this replay runs, not what it reproduces: local unless --engine is given
        # how the recorded run was shown (--format, --quiet) is not replayed either: this command's own, or the defaults
        shown = {k: RunConfig.model_fields[k].default for k in ("format", "quiet")}
        cfg = rp.cfg.model_copy(update={"resume": False, "overwrite": False, "engine": "local", "address": None, "threads": rp.threads,
                                        **shown, **{k: v for k, v in cli.items() if v is not None}})
        in_dir, expect, expect_weights = rp.input, rp.inputs_sha256, rp.weights_sha256
        if cfg.simulate and rp.old_out_is_the_run() and (rp.old_out / "degrade" / "manifest.json").is_file():
            degrade_replay = rp.old_out / "degrade" / "manifest.json"  # else degraded again from the recorded seed
    else:
        if in_dir is None or out_dir is None:
            raise UsageError("give IN and OUT (or --replay OLD_OUT/manifest.json OUT)")
        cfg, file_values = build_config(config, cli)
    if out_dir is None:
        raise UsageError("give OUT")
    if replay is not None:
        target = Path(out_dir).resolve()
        if target == rp.old_out.resolve() or (target / "manifest.json").resolve() == rp.manifest.resolve():
            # it would replace the run it is checked against (with --overwrite or --resume: compared with itself)
            raise UsageError(f"--replay: OUT {out_dir} is the folder of the recorded run; replay into another folder")
    with from_file(config, file_values):  # the checks made with the merged configuration
        eng = open_engine(cfg.engine, cfg.address, cfg.workers, cfg.threads)
        try:
            result = run_chain(cfg, in_dir, out_dir, resume=cfg.resume, overwrite=cfg.overwrite, degrade_replay=degrade_replay, expect_inputs=expect,
                               expect_weights=expect_weights, expect_truth=rp.truth_sha256 if replay is not None else None, engine=eng)
        finally:
            if eng is not None:
                eng.close()
    if replay is not None and not result.interrupted:
        from fundus_pipeline.chain import verify_replay

        result.replay = verify_replay(rp, result.out_dir)
        say_err(printable(result.replay["line"]))  # the replay's outcome: one line on stderr, whatever --quiet and --format
    s = result.summary()
    if cfg.format == "json":
        typer.echo(json.dumps(s, indent=2))
    else:
        typer.echo(_summary_line(s))
        if s["counts"].get("error"):
            say_err(f"  the failures are listed in {s['results']} (status=error, error=step: message)")
    if result.exit_code:
        raise typer.Exit(result.exit_code)


@app.command("report")
def report_cmd(
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="The output folder of a `fundus run`.", show_default=False, parser=path_arg)],
):
    """Rebuild OUT/report.html of a `fundus run` from its folders alone (the stages' results and images).

    Example: fundus report out/
    """
    from fundus_pipeline.chain import RowsFile, degraded_sha256, join, read_run, sweep_scratch, unreached_in_manifest
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.report import write_report
    from fundus_pipeline.runner import OutputLock, remove_stale_temporaries

    m, cfg, plan = read_run(out_dir)
    if m.get("status") in ("running", "stopped"):  # its plan is written at the end: a report now would be empty
        why = "is still going or was killed" if m["status"] == "running" else "was stopped by an error"
        raise UsageError(f"{out_dir} holds a run that {why} (manifest status {m['status']!r}); "
                         "finish it with `fundus run ... --resume`, which writes the report")
    out = Path(out_dir).resolve()
    with OutputLock(out, out_dir):
        remove_stale_temporaries(out, recursive=False)  # a killed run's or report's pages
        sweep_scratch()
        rows = RowsFile()
        pending = 0  # counted as the rows are gathered, not in another pass over them
        try:
            unreached = unreached_in_manifest(out / "manifest.json", plan) if m.get("status") == "interrupted" and cfg.simulate else ()  # not reached by the simulator
            for row in itertools.chain(join(out, cfg, plan, finished=m.get("status") == "finished"), unreached):
                rows.add(row)
                pending += row.get("status") == "pending"
            missing: list = []
            recorded = m.get("inputs_sha256") if isinstance(m.get("inputs_sha256"), dict) else None
            if recorded is None:  # a run that ended records its inputs' sha256 (a running one is refused above):
                recorded = {}  # without the record none of its finished rows' inputs is shown (review 19 R1)
            if cfg.simulate:  # the rows' inputs are the degraded images, which the run's degrade stage recorded
                recorded = degraded_sha256(out / "degrade")
            given = m.get("input") if isinstance(m.get("input"), dict) else {}
            run = {"weights": m.get("weights"), "run_sha256": m.get("run_sha256"), "notes": given.get("notes"), "status": m.get("status")}
            path = write_report(out, cfg, rows, missing, recorded, run)  # an input replaced since the run is left out and named
        except (KeyError, ValueError, TypeError, AttributeError) as e:  # rows edited by hand: one line, not a crash
            raise UsageError(f"{out_dir}: its stage results do not read as fundus wrote them ({type(e).__name__}: {str(e)[:120]}); "
                             "were they edited? `fundus run ... --resume` (or --overwrite) writes them again") from None
        finally:
            rows.close()
    from fundus_pipeline.report import PAGE_ROWS

    pages = max(1, -(-len(rows) // PAGE_ROWS))
    if missing:  # the folders changed since the run: say so rather than show empty cells silently
        key, p = sorted(missing)[0]
        say_err(printable(f"warning: {len(missing)} image(s) that the run's rows name are missing, unreadable or changed since the run "
                          f"(e.g. {key}: {p}); their cells in the report say so"))
    if pending:
        say_err(f"warning: {pending} photograph(s) have no result in a stage folder (status pending in the report); "
                "`fundus run ... --resume` redoes what is missing")
    if not (out / "results.csv").is_file():  # the page says that results.csv holds every column (campaign 21a F12)
        say_err(printable(f"warning: {out / 'results.csv'} is missing (the report's rows come from the stage folders); "
                          "`fundus run ... --resume` writes it again"))
    typer.echo(f"wrote {path} ({len(rows)} photographs{f', {pages} pages: report.html, report-2.html, ...' if pages > 1 else ''})")
