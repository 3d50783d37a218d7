"""Export a training run (RUN/best.pt) to the weights folder with its ``weights/manifest.json`` entry.

The run's weights go through the checked loader (no pickles, strict key check against the
architecture); the entry is built as a ``fundus_pipeline.models.spec.WeightsSpec`` before anything is
written, so a wrong or missing field fails the export and leaves the weights folder untouched. The
task supplies what is specific to it (``describe(model)``: the input contract, the output with its
a-priori threshold, the data split); this module adds the generic fields (file, sha256, size,
architecture, parameter count, provenance from RUN/summary.json, license).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from pydantic import ValidationError

from fundus_pipeline.errors import UsageError, WeightsError
from fundus_pipeline.models.registry import build_model, get_entry
from fundus_pipeline.models.spec import WeightsSpec
from fundus_pipeline.models.weights import load_manifest, load_state_dict, sha256_file, weights_dir
from fundus_pipeline.models.weights import field_path, load_weights_checked

LICENSE = "MIT (weights trained by the fundus-pipeline authors; DRIVE and HRF are research datasets, cite them)"


def _validated(entry: dict[str, Any]) -> WeightsSpec:
    try:
        return WeightsSpec.model_validate(entry)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        field = field_path(err["loc"]) or "(entry)"
        raise WeightsError(f"manifest entry {entry.get('name')!r} is invalid: {field}: {err['msg']}") from None


def _write_manifest(directory: Path, spec: WeightsSpec) -> None:
    """Add or replace ``spec`` in the manifest (called under ``_manifest_lock``): a unique temporary file,
    fsynced, then renamed."""
    from fundus_pipeline.io import write_bytes_atomic

    write_bytes_atomic(directory / "manifest.json", load_manifest(directory).with_entry(spec).dumps().encode())


@contextlib.contextmanager
def _manifest_lock(directory: Path):
    """An exclusive lock on ``directory/.manifest.lock`` for a read-modify-write of the manifest: two exports
    at once each keep their entry (one was lost: both read the old manifest, the second rename won). Waits."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".manifest.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _record_in_output(name: str, directory: Path | None, edit: Callable[[dict[str, Any]], None]) -> WeightsSpec:
    """Apply ``edit`` to the output of the manifest entry ``name`` (a JSON dict), validate the entry, then
    write the manifest; nothing is written when the entry is missing or the edited one is invalid."""
    directory = directory or weights_dir()
    with _manifest_lock(directory):
        entry = load_manifest(directory).get(name)
        if entry is None:
            raise WeightsError(f"no manifest entry {name!r} in {directory / 'manifest.json'}")
        d = entry.to_json_dict()
        edit(d["output"])
        spec = _validated(d)
        _write_manifest(directory, spec)
    return spec


def _selection_record(selection: dict[str, Any], file: str) -> dict[str, Any]:
    return {k: selection[k] for k in ("choice", "rule", "means", "inputs")} | {"file": file}


def record_correction_selection(name: str, selection: dict[str, Any], file: str, directory: Path | None = None) -> WeightsSpec:
    """Write the low-pass chosen by ``scripts/choose_correction_sigma.py`` (its JSON ``selection``, saved at
    ``file``) into the output of the manifest entry ``name``: ``correction_sigma`` and ``correction_selection``
    (choice, rule, means, inputs, file). The entry is validated before anything is written."""

    def edit(out: dict[str, Any]) -> None:
        out["correction_sigma"] = selection["choice"]
        out["correction_selection"] = _selection_record(selection, file)

    return _record_in_output(name, directory, edit)


def record_decision_selection(name: str, selection: dict[str, Any], file: str, directory: Path | None = None) -> WeightsSpec:
    """Write the grade offsets chosen by ``scripts/choose_grade_bias.py`` (its JSON ``selection``, saved at
    ``file``) into the output of the grading entry ``name``: ``decision_bias`` and ``decision_selection``
    (choice, rule, means, inputs, file); offsets of all zeros remove both (the plain argmax). The entry is
    validated before anything is written."""

    def edit(out: dict[str, Any]) -> None:
        if out.get("kind") != "grade":
            raise WeightsError(f"{name!r} is not a grader's entry; decision offsets belong to graders")
        out.pop("decision_bias", None)
        out.pop("decision_selection", None)
        if any(selection["choice"]):
            out["decision_bias"] = selection["choice"]
            out["decision_selection"] = _selection_record(selection, file)

    return _record_in_output(name, directory, edit)


def export_weights(run: Path, **kw: Any) -> WeightsSpec:
    """``_export_weights`` under the weights folder's manifest lock (see there for the arguments)."""
    summary = _check_export(run, kw["name"], kw["model_name"], kw.get("checkpoint"))  # before the lock creates anything
    with _manifest_lock(Path(kw.get("directory") or weights_dir())):
        return _export_weights(run, summary=summary, **kw)


def _check_export(run: Path, name: str, model_name: str, checkpoint: Path | None) -> dict:
    """The checks of an export that need no weights folder: NAME a plain name, a known architecture, the run's
    summary.json (when there) readable and recording ``model_name``, the checkpoint present. Returns the summary."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or name.endswith(".pt"):
        raise UsageError(f"--name {name!r}: give a plain weights name (letters, digits, _ . -; no .pt)")
    get_entry(model_name)
    summary_path = Path(run) / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {summary_path}: {e}") from None
    if not isinstance(summary, dict):
        raise UsageError(f"{summary_path} is not a training summary of `fundus train`")
    if summary.get("arch") not in (None, model_name):
        raise UsageError(f"{run} trained {summary['arch']!r}, not --arch {model_name!r}")
    best = Path(checkpoint) if checkpoint is not None else Path(run) / "best.pt"
    if not best.is_file():
        raise WeightsError(f"weights file not found: {best}")
    return summary


def _export_weights(
    run: Path,
    *,
    name: str,
    model_name: str,
    describe: Callable[[nn.Module], dict],
    command: str = "",
    test_metrics: dict[str, dict] | None = None,
    directory: Path | None = None,
    checkpoint: Path | None = None,
    replace: bool = False,
    summary: dict,
) -> WeightsSpec:
    """Export RUN/best.pt (or the training ``checkpoint``, e.g. an early snapshot of RUN/last.pt) as
    ``NAME.pt`` plus its manifest entry; returns the entry.

    ``describe(model)`` (model in eval mode) returns ``{"input": ..., "output": ..., "training": {...}}``,
    the task's fields (``training`` holds the data split; the command, seed, steps and best checkpoint
    are taken from RUN/summary.json). ``test_metrics`` (label -> figures) are recorded in ``metrics``;
    when NAME is already exported they are *added* to its entry and the weights, threshold and
    description stay as exported (RUN/best.pt must still be those weights). A fresh export starts with
    no test metrics other than those given: figures measured on other weights never carry over. A fresh export
    over an existing entry is refused unless ``replace`` (it replaced shipped weights and their test figures
    without a word). NAME must be a plain name (letters, digits, ``_ . -``); RUN/summary.json, when there,
    must record the architecture ``model_name`` (a ``cofe_add`` run exported as ``cofe`` got the wrong
    output rule: the tensors are the same). With ``replace`` and ``test_metrics`` the export is fresh and
    records those figures. ``summary``: RUN/summary.json as ``_check_export`` read it.
    """
    entry = get_entry(model_name)
    model = build_model(model_name)
    best = Path(checkpoint) if checkpoint is not None else Path(run) / "best.pt"
    load_weights_checked(model, best, model_name)
    model.eval()
    wdir = directory or weights_dir()
    wdir.mkdir(parents=True, exist_ok=True)
    target = wdir / f"{name}.pt"
    old = load_manifest(wdir).get(name)
    if old is not None and not test_metrics and not replace:
        raise UsageError(f"{name!r} is already in {wdir / 'manifest.json'}; pass --replace to export over it "
                         "(its file and test figures are replaced), or choose another --name")

    if test_metrics and old is not None and not replace:  # figures added to the entry as exported
        if not target.is_file() or sha256_file(target) != old.sha256:
            raise WeightsError(f"{target} changed since it was exported; export it again before adding test metrics")
        shipped = load_state_dict(target)
        if shipped.keys() != model.state_dict().keys() or not all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items()):
            raise WeightsError(f"{best} is not the run {name!r} was exported from")
        d = old.to_json_dict()
        d["metrics"] = {**d.get("metrics", {}), **test_metrics}
        if command:
            d["training"]["command"] = command
        spec = _validated(d)
        _write_manifest(wdir, spec)
        return spec

    desc = describe(model)
    if checkpoint is not None:  # an early snapshot: its own step, not the run's validation-best
        ck = torch.load(best, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or "step" not in ck:
            raise UsageError(f"--checkpoint {best} is a plain state dict, not a training checkpoint (last.pt) with its step")
        step = int(ck["step"])
        summary = {**summary, "steps": step, "best": {"step": step, "note": f"training checkpoint at step {step} of the run (not its validation-best)"}}
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=wdir))
    try:
        tmp = tmpdir / target.name  # same file name: the bytes of a direct torch.save(sd, target)
        torch.save(model.state_dict(), tmp)
        d = {
            "name": name,
            "file": target.name,
            "format": "pt-state-dict",
            "sha256": sha256_file(tmp),
            "size_bytes": tmp.stat().st_size,
            "model": model_name,
            "arch": entry.arch,
            "width": entry.width,
            "params": sum(p.numel() for p in model.parameters()),
            "input": desc["input"],
            "output": desc["output"],
            "training": {
                **desc.get("training", {}),
                "command": command or shlex.join(summary.get("argv", [])),  # quoted: a path with a space reruns
                "seed": summary.get("seed"),
                "steps": summary.get("steps"),
                "best_checkpoint": summary.get("best"),
                **({"init_validation": summary["init_validation"]} if summary.get("init_validation") else {}),  # the --init weights, same validation
                # the code (version, git commit, whether tracked files differed) and the data root / set tables the run
                # used, as its summary recorded them (runs before 2026-12-05 recorded neither; campaign 21b M1)
                **({"code": summary["code"]} if isinstance(summary.get("code"), dict) else {}),
                **({"code_started": summary["code_started"]} if "code_started" in summary else {}),
                **({"data_identity": summary["data"]} if isinstance(summary.get("data"), dict) and summary["data"] else {}),
                "torch": torch.__version__,
            },
            "metrics": dict(test_metrics or {}),
            "license": LICENSE,
        }
        spec = _validated(d)  # before anything is written
        backup = tmpdir / "previous.pt"
        if target.is_file():
            os.link(target, backup)
        os.replace(tmp, target)
        try:
            _write_manifest(wdir, spec)
        except BaseException:  # the manifest could not follow (a full disk): the file goes back to what it lists
            if backup.exists():
                os.replace(backup, target)
            else:
                target.unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return spec
