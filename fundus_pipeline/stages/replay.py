"""Strict loading of an earlier ``fundus degrade`` run's ``manifest.json`` for ``--replay``.

Public API::

    from fundus_pipeline.stages.replay import Replay, load_replay

    replay = load_replay(Path("OLD_OUT/manifest.json"))
    replay.seed        # int >= 0, as recorded
    replay.preset      # "released" | "training" | None (None when a recipe was used)
    replay.types       # list of type codes ("001".."111") | None (None when a recipe was used)
    replay.recipe      # the recorded recipe name or path, informational only: never read again
    replay.degraders   # {variant: Degrader}: "" for a single variant, else the type code (as
                       #   DegradeStage.setup() keys its degraders), rebuilt from the RECORDED
                       #   config.degraders content (Degrader.from_config), never from a file or name
    replay.params      # {item key: {label: params record}}, label "default" (single variant) or the code;
                       #   the records are the manifest's own dicts (re-recorded unchanged)
    replay.sha256      # sha256 of the manifest file's bytes
    replay.path        # the manifest path
    replay.label(variant)              # "" -> "default", code -> code
    replay.params_for(key, variant)    # the record for one item and stage variant, or None

Every failure raises :class:`~fundus_pipeline.errors.UsageError` with one line that names the manifest
and the first problem (for schema errors: its location, e.g. ``items.3.params.default.fov.radius``, and
message, plus ``(and N more)``), never a traceback.

What is checked, before anything is decoded or applied:

* the file: it must be a regular file (a FIFO, device or socket is refused from ``os.stat`` before it is
  opened, and again on the opened descriptor, which is opened non-blocking), at most
  ``MAX_MANIFEST_BYTES`` (256 MiB) are read; invalid JSON, invalid UTF-8 and too deep nesting are
  one-line errors;
* the manifest (pydantic v2, unknown top-level fields such as ``environment`` are ignored):
  ``stage == "degrade"``; ``config.seed`` an int >= 0; ``config.preset`` released/training;
  ``config.types`` a list of distinct valid codes; ``config.recipe`` a bounded string;
  ``config.degraders`` keyed exactly like the run's variants (``"default"`` for one variant, else the
  codes) and each a valid recipe (the recipe schema with its size limits) consistent with the preset
  and code; ``items`` a list of rows with a string ``key`` and ``status``;
* each ``ok`` row: unique key; ``params`` holds exactly the run's variant labels; each record passes
  :mod:`degradation.params` (strict types, finite and bounded numbers, sane FOV geometry, step records
  shaped for their type), was produced by the recorded degrader (same ``config``) and has its steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from fundus_pipeline.errors import UsageError

MAX_MANIFEST_BYTES = 256 * 2**20
MAX_KEY_LENGTH = 4096
PRESETS = ("released", "training")
Code = Literal["001", "010", "011", "100", "101", "110", "111"]


# ------------------------------------------------------------------------------------------- schema
class _Config(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    seed: Annotated[int, Field(ge=0)]
    preset: Optional[Literal["released", "training"]] = None
    types: Optional[Annotated[list[Code], Field(min_length=1, max_length=7)]] = None
    recipe: Optional[Annotated[str, Field(min_length=1, max_length=4096)]] = None
    degraders: Annotated[dict[Annotated[str, Field(max_length=16)], dict[str, Any]], Field(min_length=1, max_length=7)]

    @model_validator(mode="after")
    def _consistent(self):
        if self.recipe is not None:
            if self.preset is not None or self.types is not None:
                raise ValueError("preset and types must be null when a recipe was used")
            want = ["default"]
        else:
            if self.preset is None or self.types is None:
                raise ValueError("preset and types are required when no recipe was used")
            if len(set(self.types)) != len(self.types):
                raise ValueError(f"types must be distinct, got {self.types}")
            want = list(self.types) if len(self.types) > 1 else ["default"]
        if sorted(self.degraders) != sorted(want):
            raise ValueError(f"degraders must be keyed {want} for this run, got {sorted(self.degraders)}")
        return self


class _Row(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    key: Annotated[str, Field(min_length=1, max_length=MAX_KEY_LENGTH)]
    status: Annotated[str, Field(max_length=32)]
    params: Any = None  # validated for ok rows only (see _check_rows)


class _Manifest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)
    stage: Literal["degrade"]
    config: _Config
    items: list[_Row]


def _params_adapter() -> TypeAdapter:
    from degradation.params import ParamsRecord

    return TypeAdapter(dict[str, ParamsRecord])


# ------------------------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class Replay:
    """A validated replay manifest; see the module docstring."""

    path: Path
    sha256: str
    seed: int
    preset: str | None
    types: list[str] | None
    recipe: str | None
    degraders: dict[str, Any]  # variant ("" or code) -> degradation.Degrader
    params: dict[str, dict[str, dict]]  # key -> label ("default" or code) -> params record
    input_sha256: dict[str, str] = field(default_factory=dict)  # key -> the sha256 of the input it was run on
    outputs_sha256: dict[str, dict[str, str]] = field(default_factory=dict)  # key -> {output name: the sha256 it was written with}

    @staticmethod
    def label(variant: str) -> str:
        """The manifest label of a stage variant: ``""`` -> ``"default"``, a code -> itself."""
        return variant or "default"

    def params_for(self, key: str, variant: str) -> dict | None:
        return self.params.get(key, {}).get(self.label(variant))


# ------------------------------------------------------------------------------------------- loading
def _short(text: Any, limit: int = 80) -> str:
    s = str(text)
    return s if len(s) <= limit else s[:limit] + f"... ({len(s)} characters)"


def _one_line(text: str, limit: int = 400) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[:limit] + "..."


def _first_error(err: ValidationError, prefix: str = "", extra: int = 0) -> str:
    e = err.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in (prefix, *e["loc"]) if str(x) != "")
    msg = e["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    more = err.error_count() - 1 + extra
    return f"{loc or '<root>'}: {_one_line(msg)}" + (f" (and {more} more)" if more > 0 else "")


def _read_capped(path: Path) -> bytes:
    """The manifest's bytes: a regular file only (checked before opening and on the descriptor), at most
    MAX_MANIFEST_BYTES."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"replay manifest not found: {path}") from None
    except OSError as e:
        raise UsageError(f"cannot read replay manifest {path}: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"replay manifest {path} is a folder without a manifest.json; give the earlier run's folder or its manifest.json")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"replay manifest {path} is not a regular file (a FIFO, device or socket); give OLD_OUT/manifest.json")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise UsageError(f"replay manifest {path} is too large ({st.st_size} bytes; at most {MAX_MANIFEST_BYTES})")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise UsageError(f"cannot read replay manifest {path}: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between stat and open
            raise UsageError(f"replay manifest {path} is not a regular file")
        chunks, total = [], 0
        while total <= MAX_MANIFEST_BYTES:
            chunk = os.read(fd, min(1 << 24, MAX_MANIFEST_BYTES + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as e:
        raise UsageError(f"cannot read replay manifest {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if total > MAX_MANIFEST_BYTES:
        raise UsageError(f"replay manifest {path} is too large (more than {MAX_MANIFEST_BYTES} bytes)")
    return b"".join(chunks)


def _decode(data: bytes, path: Path) -> Any:
    if not data.strip():
        raise UsageError(f"replay manifest {path} is empty")
    try:
        return json.loads(data)
    except json.JSONDecodeError as e:
        raise UsageError(f"replay manifest {path} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"replay manifest {path} is not valid UTF-8 JSON ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise UsageError(f"replay manifest {path} is not a manifest: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer with too many digits
        raise UsageError(f"replay manifest {path} is not valid JSON: {_one_line(e)}") from None


def _rebuild_degraders(cfg: _Config, path: Path) -> dict[str, Any]:
    from degradation import Degrader, RecipeError

    out: dict[str, Any] = {}
    variants = [""] if cfg.recipe is not None or len(cfg.types or []) == 1 else list(cfg.types)
    for variant in variants:
        label = Replay.label(variant)
        where = f"config.degraders.{label}"
        try:
            d = Degrader.from_config(cfg.degraders[label], source=where)
        except RecipeError as e:
            raise UsageError(f"invalid replay manifest {path}: {_one_line(e)}") from None
        if cfg.recipe is None:
            code = variant or cfg.types[0]
            steps = d.recipe.steps
            if len(steps) != 1 or steps[0].type != f"cofe_{cfg.preset}" or list(steps[0].types) != [code]:
                raise UsageError(
                    f"invalid replay manifest {path}: {where} is not the Cofe-Net {cfg.preset} degrader of type {code} "
                    f"recorded in config.preset/config.types"
                )
        out[variant] = d
    return out


def _check_rows(m: _Manifest, raw_items: list, path: Path) -> dict[str, dict[str, dict]]:
    from degradation.params import check_steps_match
    from degradation.recipe import RecipeError

    adapter = _params_adapter()
    labels = sorted(m.config.degraders)
    recorded = m.config.degraders
    out: dict[str, dict[str, dict]] = {}
    first: str | None = None
    extra = 0

    def fail(msg: str) -> None:
        nonlocal first, extra
        if first is None:
            first = msg
        else:
            extra += 1

    for i, row in enumerate(m.items):
        if row.status != "ok":
            continue
        where = f"items.{i} (key {_short(repr(row.key))})"
        if row.key in out:
            fail(f"{where}: the key appears twice")
            continue
        params = raw_items[i].get("params")
        if not isinstance(params, dict):
            fail(f"{where}.params: an ok item needs its recorded parameters, got {type(params).__name__}")
            continue
        if sorted(params) != labels:
            fail(f"{where}.params: expected the variants {labels}, got {_short(sorted(map(str, params)))}")
            continue
        try:
            adapter.validate_python(params)
        except ValidationError as err:
            if first is None:
                first = f"{where}: " + _first_error(err, "params")
                extra += err.error_count() - 1
            else:
                extra += err.error_count()
            continue
        bad = False
        for label in labels:
            rec = params[label]
            if rec["config"] != recorded[label]:
                fail(f"{where}.params.{label}.config: not the recorded config.degraders.{label} (not produced by this run)")
                bad = True
                break
            try:
                check_steps_match(rec, recorded[label])
            except RecipeError as e:
                fail(f"{where}.params.{label}.{_one_line(e)}")
                bad = True
                break
        if not bad:
            out[row.key] = params
    if first is not None:
        raise UsageError(f"invalid replay manifest {path}: {first}" + (f" (and {extra} more)" if extra else ""))
    return out


def load_replay(path: Path) -> Replay:
    """Read and validate an earlier ``fundus degrade`` run's manifest (``OLD_OUT/manifest.json``, a copy of it
    under any name, or the folder OLD_OUT, as ``fundus run --replay`` takes it); see the module docstring."""
    path = Path(path)
    if path.is_dir() and (path / "manifest.json").exists():  # the folder: its manifest (campaign 17a F4)
        path = path / "manifest.json"
    data = _read_capped(path)
    sha = hashlib.sha256(data).hexdigest()
    try:
        raw = _decode(data, path)
        del data
        if not isinstance(raw, dict) or raw.get("stage") != "degrade":
            raise UsageError(f"replay manifest {path} is not a manifest of a `fundus degrade` run (its \"stage\" is not \"degrade\")")
        try:
            m = _Manifest.model_validate(raw)
        except ValidationError as err:
            raise UsageError(f"invalid replay manifest {path}: {_first_error(err)}") from None
        degraders = _rebuild_degraders(m.config, path)
        params = _check_rows(m, raw["items"], path)
    except RecursionError:
        raise UsageError(f"invalid replay manifest {path}: nested too deeply") from None
    except MemoryError:
        raise UsageError(f"replay manifest {path} is too large to load") from None
    cfg = m.config
    return Replay(
        path=path,
        sha256=sha,
        seed=cfg.seed,
        preset=cfg.preset,
        types=list(cfg.types) if cfg.types is not None else None,
        recipe=cfg.recipe,
        degraders=degraders,
        params=params,
        input_sha256={r["key"]: r["input_sha256"] for r in raw["items"]
                      if isinstance(r, dict) and r.get("key") in params and isinstance(r.get("input_sha256"), str)},
        outputs_sha256={r["key"]: {n: d for n, d in r["outputs_sha256"].items() if isinstance(n, str) and isinstance(d, str)}
                        for r in raw["items"] if isinstance(r, dict) and r.get("key") in params and isinstance(r.get("outputs_sha256"), dict)},
    )


__all__ = ["MAX_MANIFEST_BYTES", "Replay", "load_replay"]
