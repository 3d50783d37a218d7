"""Weights: plain state dicts, verified by sha256 against ``weights/manifest.json``.

A weights file is accepted when its sha256 is listed in the manifest (the manifest then gives its
architecture, preprocessing and decision threshold), or, for weights you trained yourself, when you
name the architecture with ``--arch`` (threshold 0.5 unless given). Pickled modules are never loaded:
``torch.load(..., weights_only=True)`` only.

The manifest is validated as a whole against ``fundus_pipeline.models.spec.WeightsManifest``.
Torch is imported only by the functions that load weights, so listing them stays cheap.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from fundus_pipeline.errors import UsageError, WeightsError
from fundus_pipeline.models.spec import LoadedWeights, WeightsManifest, WeightsSpec

if TYPE_CHECKING:
    import torch

__all__ = [
    "LoadedWeights",
    "WeightsSpec",
    "load_manifest",
    "load_model",
    "load_state_dict",
    "lookup_spec",
    "read_manifest",
    "resolve_weights",
    "sha256_file",
    "weights_dir",
]


def weights_dir() -> Path:
    """The shipped weights folder: FUNDUS_WEIGHTS, else the repository's ``weights/`` beside the package (an
    install from a checkout, ``pip install -e .``; a wheel does not carry the 227 MB of weights)."""
    env = os.environ.get("FUNDUS_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "weights"


def no_weights_folder() -> str | None:
    """Why no shipped weights can be found, or None: the folder holds no manifest.json (a non-editable install,
    which leaves the repository's weights folder behind; campaign 18b F1)."""
    folder = weights_dir()
    if (folder / "manifest.json").is_file():
        return None
    if os.environ.get("FUNDUS_WEIGHTS"):  # (the hint said to set it, which was done: campaign 33b F2, review 33 R33-6)
        what = "does not exist" if not folder.exists() else "is not a folder" if not folder.is_dir() else "holds no manifest.json"
        inside = " (the checkout's weights/ folder is inside it)" if (folder / "weights" / "manifest.json").is_file() else ""
        return (f"no shipped weights: {folder} (the folder FUNDUS_WEIGHTS names) {what}{inside}; FUNDUS_WEIGHTS must name "
                "the weights/ folder of a checkout of fundus")
    return f"no shipped weights: {folder} (the repository's weights folder, beside the package) holds no manifest.json"


NO_WEIGHTS_HOW = ("install fundus from a checkout of its repository (pip install -e .), which keeps its weights/ folder, "
                  "or set FUNDUS_WEIGHTS to that folder")
NO_WEIGHTS_HINT = NO_WEIGHTS_HOW + ", or pass a .pt file"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_UNION_TAGS = {"output": {"segmentation", "image", "score", "pretext", "grade"}, "scale_policy": {"fov_max_diameter", "canonical_frame"}}


def field_path(loc: list | tuple) -> str:
    """``output.threshold`` from a pydantic error location, leaving out the union member pydantic names
    (``output.segmentation.threshold``)."""
    kept = [p for i, p in enumerate(loc) if not (i > 0 and p in _UNION_TAGS.get(str(loc[i - 1]), ()))]
    return ".".join(str(p) for p in kept)


def _describe(e: ValidationError, data: object) -> str:
    """``entry 'imff': output.threshold: missing field (and 2 more)`` for the first error."""
    errors = e.errors()
    first = errors[0]
    loc = list(first["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "weights" and isinstance(loc[1], int):
        raw = data.get("weights") if isinstance(data, dict) else None
        item = raw[loc[1]] if isinstance(raw, list) and loc[1] < len(raw) else None
        name = item.get("name") if isinstance(item, dict) else None
        where = f"entry {name!r}: " if isinstance(name, str) else f"entry #{loc[1] + 1}: "
        loc = loc[2:]
    field = field_path(loc) or "(top level)"
    kind = first["type"]
    if kind == "missing":
        msg = "missing field"
    elif kind == "extra_forbidden":
        msg = "unknown field (misspelt?)"
    else:
        msg = first["msg"].removeprefix("Value error, ")
        if kind != "value_error" and "input" in first and not isinstance(first["input"], (dict, list)):
            msg += f", got {first['input']!r}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}{field}: {msg}{more}"


def load_manifest(directory: Path | None = None) -> WeightsManifest:
    """The validated manifest of ``directory`` (default ``weights_dir()``); empty when the file is absent.

    A malformed file raises ``WeightsError`` naming the file, the entry and the field of the first error.
    """
    path = (directory or weights_dir()) / "manifest.json"
    if not path.exists():
        return WeightsManifest(schema_version=1, weights=[])
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None
    try:
        return WeightsManifest.model_validate(data)
    except ValidationError as e:
        raise WeightsError(f"invalid {path}: {_describe(e, data)}") from None


def read_manifest(directory: Path | None = None) -> list[WeightsSpec]:
    """The validated entries of the manifest in ``directory`` (a path; default: the shipped weights), ``[]`` when
    there is none."""
    return load_manifest(Path(directory) if directory is not None else None).weights


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or Path(value).suffix in (".pt", ".pth", ".bin", ".ckpt")


def resolve_weights(value: str | Path) -> Path:
    """A shipped weights name (``imff``) or a path to a state-dict file; a bare name (no folder, no ``.pt``)
    that the manifest lists is the shipped weights, even when the working folder holds a file or folder of
    that name (``./imff`` reaches that one)."""
    if not str(value).strip():
        raise UsageError("empty weights name", "give a name from `fundus models` or a .pt state-dict file")
    if not _looks_like_path(str(value)) and not Path(value).exists() and (why := no_weights_folder()):
        raise WeightsError(f"{why}, so {value!r} cannot be found", NO_WEIGHTS_HINT)
    manifest = load_manifest()
    spec = None if _looks_like_path(str(value)) else manifest.get(str(value))
    if spec is not None:  # a bare shipped name is that name, whatever the working folder holds (an output folder `hemf_4750`)
        return weights_dir() / spec.file
    p = Path(value)
    if p.is_dir():
        raise WeightsError(f"weights path is a folder, not a file: {value}")
    if p.exists():
        return p
    shipped = manifest.names()
    shipped_text = ", ".join(shipped) if shipped else f"none in {weights_dir()}" + (" (the folder FUNDUS_WEIGHTS names)" if os.environ.get("FUNDUS_WEIGHTS") else "")
    from fundus_pipeline.models.catalog import CATALOG

    if str(value) in CATALOG:
        raise WeightsError(
            f"{value} is an architecture without shipped weights; shipped weights: {shipped_text}",
            f"for weights you trained yourself, pass the .pt file with --arch {value}",
        )
    if _looks_like_path(str(value)):
        raise WeightsError(f"weights not found: {value}", "pass an existing .pt state-dict file or a name from `fundus models`")
    close = difflib.get_close_matches(str(value), shipped, n=3)
    suggestion = f" (did you mean {' or '.join(close)}?)" if close else ""
    raise WeightsError(f"weights not found: {value}{suggestion}", f"pass a .pt state-dict file or a shipped weights name: {shipped_text}")


def lookup_spec(path: Path) -> tuple[WeightsSpec | None, str]:
    """(the manifest entry whose sha256 matches the file, or None; the file's sha256)."""
    try:
        digest = sha256_file(path)
    except OSError as e:
        listed = isinstance(e, FileNotFoundError) and path.parent.resolve() == weights_dir().resolve()
        raise WeightsError(f"cannot read weights {path}: {e.strerror or e}",
                           "the manifest lists it: restore the file from the checkout (git checkout -- weights/)" if listed else None) from None
    manifest = load_manifest()
    # a file of the weights folder is the entry that names it, or nothing: matched by its bytes first, a shipped
    # file overwritten by another (msrf_w8.pt copied over imff.pt) ran silently as the other weights
    if Path(path).absolute().parent.resolve() == weights_dir().resolve():  # the folder, not a link's target: imff.pt -> msrf_w8.pt
        for spec in manifest.weights:
            if spec.file == path.name:
                if spec.sha256 != digest:
                    raise WeightsError(f"{path} does not match its sha256 in {weights_dir() / 'manifest.json'} (corrupt, modified or replaced file)")
                return spec, digest
    same = [s for s in manifest.weights if s.sha256 == digest]
    if len(same) > 1:  # a hand-made alias: the entries may differ in their rules
        raise WeightsError(f"{path} is the file of several manifest entries ({', '.join(s.name for s in same)}); give one by name")
    return (same[0] if same else None), digest


def _is_torchscript(path: Path) -> bool:
    """A zip file that holds a TorchScript program (``torch.jit.save``: ``constants.pkl`` and ``code/``)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def load_state_dict(path: Path) -> dict:
    import torch

    if _is_torchscript(path):  # torch.load would warn about it on stderr before refusing it (review 43 L2)
        raise WeightsError(f"{path} is a TorchScript archive, not a state dict", "save the model's weights instead: torch.save(model.state_dict(), 'new.pt')")
    try:
        # no warnings filter around it: torch warns nothing here with weights_only given for a state dict, and
        # catch_warnings is not thread-safe: threads loading weights at once left a global "ignore every warning"
        # behind (campaign 43c F4)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {path}") from None
    except Exception as e:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        text = str(e)
        if "Unsupported global" in text or "GLOBAL" in text:  # a pickle that names classes: a saved module or object
            raise WeightsError(f"{path} is a pickled object, not a plain state dict; pickled modules are refused for safety", "convert it once in a trusted environment: torch.save(model.state_dict(), 'new.pt')") from None
        raise WeightsError(f"cannot read weights {path}: corrupt or not a PyTorch file ({type(e).__name__})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # a training checkpoint (last.pt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return sd


def load_weights_checked(model: torch.nn.Module, path: Path, what: str = "", *, new: tuple[str, ...] = (), option: str = "") -> None:
    """Load a state dict (or a training checkpoint's "model") through the checked loader, which refuses
    pickled modules, after a strict check of its tensor names and shapes against ``model`` and of its
    values (NaN or infinite values are refused: such weights give no decision, only NaN). ``new``: name
    prefixes of tensors the model may have that the file lacks (a module added to a trained network that
    starts as the identity, ``--init``); they keep their initial values, and every other name is checked.
    ``option``: the command-line option that named ``path``, put before a refusal's message (campaign 21b L2)."""
    if option:
        try:
            return load_weights_checked(model, path, what, new=new)
        except WeightsError as e:
            if e.message.startswith(option):
                raise
            raise WeightsError(f"{option}: {e.message}", e.hint) from None
    import torch

    sd = load_state_dict(path)
    what = what or type(model).__name__
    want, got = set(model.state_dict()), set(sd)
    if new:
        want = {k for k in want if not k.startswith(new) or k in got}
    if want != got:
        missing, unexpected = sorted(want - got), sorted(got - want)
        raise WeightsError(
            f"{path} does not fit architecture {what!r}: {len(missing)} missing and {len(unexpected)} unexpected tensors"
            + (f" (e.g. missing {missing[0]})" if missing else "")
            + (f" (e.g. unexpected {unexpected[0]})" if unexpected else "")
        )
    for k, v in model.state_dict().items():
        if k in sd and v.shape != sd[k].shape:
            raise WeightsError(f"{path} does not fit architecture {what!r}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(v.shape)}")
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # every output would be NaN, and a NaN probability compares as no decision at all
        raise WeightsError(f"{path} is corrupt: tensor {bad} holds NaN or infinite values")
    model.load_state_dict(sd, strict=not new)


#: An architecture of each task, for the hint of weights not in the manifest (campaign 27a F4: an enhancer's hint
#: named a segmenter's).
_ARCH_EXAMPLE = {"segmentation": "imff", "enhancement": "cofe_add", "quality": "sdmp", "grading": "hemf"}


def load_model(
    weights: str | Path, *, arch: str | None = None, device: str | torch.device = "cpu", task: str | None = None, shared: bool = False,
    compile: bool = False, arch_option: str = "--arch",
) -> tuple[torch.nn.Module, LoadedWeights]:
    """Build the architecture, load verified weights; return (model in eval mode, ``LoadedWeights``).

    ``LoadedWeights.spec`` is the manifest entry (a ``WeightsSpec``), or None for weights not in the
    manifest, which need ``arch`` (their threshold is then ``DEFAULT_THRESHOLD``). ``task``: refuse weights of
    another task (e.g. enhancement weights given to ``fundus segment``). ``shared``: an inference-only caller
    (a stage) gets the model this process already loaded from the same bytes for the same device, if any,
    instead of a new copy; callers that may modify the model (training, the Python API) get their own.
    ``compile``: ``torch.compile`` the model's inference entry points (:func:`compile_model`). ``arch_option``:
    the command-line option that gives ``arch``, named in the hint for weights not in the manifest.
    """
    from fundus_pipeline.models.registry import build_model, get_entry

    if arch:
        get_entry(arch)  # an unknown architecture is a usage error (exit 2), whatever the weights
    path = resolve_weights(weights)
    spec, digest = lookup_spec(path)
    if spec is None:
        if not arch:
            raise WeightsError(
                f"{path} (sha256 {digest[:12]}...) is not listed in {weights_dir() / 'manifest.json'}",
                f"for weights you trained yourself, name the architecture with {arch_option} (e.g. {arch_option} "
                f"{_ARCH_EXAMPLE.get(task or '', 'imff')})",
            )
        model_name = arch
    elif arch and arch != spec.model:
        raise WeightsError(f"{path} holds weights for {spec.model!r}, not {arch!r}")
    else:
        model_name = spec.model
    entry = get_entry(model_name)  # a clear error for an unknown architecture
    if task is not None and entry.task != task:
        an = lambda w: ("an " if w[0] in "aeiou" else "a ") + w  # noqa: E731
        raise WeightsError(f"{weights} is {an(entry.task)} model ({model_name}); this command needs {an(task)} model")
    import torch

    key = (digest, model_name, str(torch.device(device)), compile)
    model = _LOADED.get(key) if shared else None
    if model is None:
        with torch.random.fork_rng(devices=[]):  # the initialisation the weights replace leaves the caller's RNG alone
            model = build_model(model_name)
        load_weights_checked(model, path, model_name)
        model.to(device).eval()
        if shared:
            # Inference only: channels-last weights let oneDNN pick its faster convolutions (measured on this
            # project's 2 CPU cores: IMFF-Net 0.91 -> 0.49 s at 592x576, Cofe-Net 1.28 -> 0.91 s at 512x512,
            # SDMP-Net 1.19 -> 0.88 s for five crop pairs; outputs equal to 1e-5). Inputs stay NCHW.
            model.to(memory_format=torch.channels_last)
            _LOADED[key] = model
        if compile:
            compile_model(model)  # in place: the cached model is the compiled one
    return model, LoadedWeights(path=path, sha256=digest, model=model_name, spec=spec)


#: ``torch.compile``'s backend for ``--compile`` (tests use a cheaper one that traces the same graphs).
COMPILE_BACKEND = "inductor"


def compile_model(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """``torch.compile`` an inference model in place: its ``forward`` and the other entry points its class
    names in ``inference_methods`` (SDMP-Net's ``forward_with_identity``). Compilation happens at the first
    call of each input shape (tens of seconds per model on a CPU; it needs a C++ compiler there); measured by
    ``benchmarks/gpu.py --compile``."""
    import torch

    backend = backend or COMPILE_BACKEND
    model.compile(backend=backend)
    for name in getattr(model, "inference_methods", ()):
        setattr(model, name, torch.compile(getattr(model, name), backend=backend))
    return model


# Models loaded in this process, by (weights sha256, architecture, device, compiled): a chained run's stages (and a
# stage's second use of a segmenter) share one loaded, verified model instead of loading it again. The
# models are in eval mode and only used for inference, so sharing is safe.
_LOADED: dict[tuple[str, str, str, bool], torch.nn.Module] = {}


def clear_cache() -> int:
    """Forget the models this process keeps for the stages (``load_model(shared=True)``: one per weights,
    architecture, device and compile setting, about 9 MB for IMFF-Net): for a long-lived process that loads many
    different weights (campaign 43c F6). Returns how many were dropped; a model a caller still holds stays usable.
    On a GPU, ``torch.cuda.empty_cache()`` then gives their memory back to the device."""
    n = len(_LOADED)
    _LOADED.clear()
    return n
