"""The ``degrade`` stage: realistic, seeded low-quality versions of each fundus photograph."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fundus_pipeline.errors import InputError, UsageError
from fundus_pipeline.io import ImageItem, from_float_rgb, read_image, to_float_rgb, write_image_atomic

ALL_CODES = ["001", "010", "011", "100", "101", "110", "111"]
PRESETS = ("released", "training")


def parse_codes(text: str) -> list[str]:
    """'111' -> ['111']; '001,111' -> both; 'all' -> the seven codes. Validated, de-duplicated, ordered."""
    if text.strip().lower() == "all":
        return list(ALL_CODES)
    codes = [c.strip() for c in text.split(",") if c.strip()]
    bad = [c for c in codes if c not in ALL_CODES]
    if not codes or bad:
        raise UsageError(f"invalid --types {text!r}: use codes from {', '.join(ALL_CODES)} (bits: blur, spot, illumination), comma-separated, or 'all'")
    return sorted(set(codes), key=ALL_CODES.index)


def load_replay(path: Path) -> tuple[dict, dict[str, dict[str, dict]], str]:
    """(config, per-item per-variant parameters, sha256) of an earlier run's manifest.json."""
    try:
        data = Path(path).read_bytes()
        manifest = json.loads(data)
    except FileNotFoundError:
        raise UsageError(f"replay manifest not found: {path}") from None
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read replay manifest {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(manifest, dict) or manifest.get("stage") != "degrade" or not isinstance(manifest.get("config"), dict):
        raise UsageError(f"{path} is not a manifest of a `fundus degrade` run")
    out = {}
    for row in manifest.get("items", []):
        if isinstance(row, dict) and row.get("status") == "ok" and isinstance(row.get("params"), dict):
            out[row["key"]] = row["params"]
    return manifest["config"], out, hashlib.sha256(data).hexdigest()


class DegradeStage:
    name = "degrade"
    start_method = "fork"  # torch-free numpy/OpenCV work: forked workers start in milliseconds
    columns = ["variants", "bit_depth", "mode", "fov", "params"]

    def __init__(self, *, preset: str = "released", codes: list[str] | None = None, recipe: str | None = None, seed: int = 0, replay: Path | None = None):
        """With ``replay``, the preset, types, recipe and seed are those recorded in the replay manifest."""
        self.replay_path = str(replay) if replay else None
        self.replay = None
        self.replay_sha256 = None
        if replay:
            cfg, self.replay, self.replay_sha256 = load_replay(replay)
            preset, codes, recipe, seed = cfg.get("preset") or "released", cfg.get("types"), cfg.get("recipe"), cfg.get("seed", 0)
        if preset not in PRESETS:
            raise UsageError(f"unknown --preset {preset!r}: choose released or training")
        self.preset = preset
        self.codes = codes or ["111"]
        self.recipe = recipe
        self.seed = int(seed)
        self._degraders = None
        self._check()

    def _check(self) -> None:
        self.setup_worker()  # validates the recipe / codes early, in the parent process

    def setup_worker(self) -> None:
        if self._degraders is not None:
            return
        from degradation import RecipeError, cofe_degrader, load_recipe

        if self.recipe:
            try:
                self._degraders = {"": load_recipe(self.recipe)}
            except (RecipeError, FileNotFoundError, ValueError) as e:
                raise UsageError(f"invalid --recipe {self.recipe}: {str(e).splitlines()[0]}") from None
        else:
            multi = len(self.codes) > 1
            self._degraders = {(c if multi else ""): cofe_degrader(preset=self.preset, code=c) for c in self.codes}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_degraders"] = None  # rebuilt in each worker
        return state

    def config(self) -> dict:
        """The resolved configuration (hashed for --resume; paths are kept out of it, see info())."""
        self.setup_worker()
        return {
            "seed": self.seed,
            "preset": None if self.recipe else self.preset,
            "types": None if self.recipe else self.codes,
            "recipe": self.recipe,
            "replay_sha256": self.replay_sha256,
            "degraders": {k or "default": d.config() for k, d in self._degraders.items()},
        }

    def info(self) -> dict:
        return {"replay": self.replay_path}

    def output_name(self, key: str, variant: str) -> str:
        return f"{key}_{variant}.png" if variant else f"{key}.png"

    def process(self, item: ImageItem, out_dir: Path) -> tuple[list[str], dict]:
        from degradation.fov import estimate_fov_geometry

        self.setup_worker()
        arr, meta = read_image(item.path)
        rgb, alpha = to_float_rgb(arr, meta)
        levels = 65535 if meta.bit_depth == 16 else 255
        mask, geom = estimate_fov_geometry(rgb)
        outputs, params_out = [], {}
        try:
            self._variants(item, rgb, alpha, meta, levels, mask, geom, out_dir, outputs, params_out)
        except BaseException:
            for name in outputs:  # no half-finished item: remove the variants already written
                (out_dir / name).unlink(missing_ok=True)
            raise
        return outputs, {
            "variants": list(params_out),
            "bit_depth": meta.bit_depth,
            "mode": meta.mode,
            "fov": geom.to_dict(),
            "params": params_out,
        }

    def _variants(self, item, rgb, alpha, meta, levels, mask, geom, out_dir, outputs, params_out) -> None:
        from degradation import Degrader, soft_fov_mask
        from degradation.fov import FovGeometry

        for variant, degrader in self._degraders.items():
            if self.replay is not None:
                rec = self.replay.get(item.key, {}).get(variant or "default")
                if rec is None:
                    raise InputError(f"no recorded parameters for {item.key!r} (variant {variant or 'default'}) in the replay manifest")
                degrader = Degrader.from_params(rec)
                params = rec
                g = FovGeometry.from_dict(rec["fov"]) if "fov" in rec else geom
            else:
                params = degrader.sample(seed=self.seed, key=item.key, fov=geom)
                g = geom
            soft = soft_fov_mask(mask, g)
            out = degrader.apply(rgb, params, soft, levels=levels)
            native = from_float_rgb(out, meta, alpha, truncate=True)
            name = self.output_name(item.key, variant)
            write_image_atomic(out_dir / name, native)
            outputs.append(name)
            params_out[variant or "default"] = params
