"""The ``degrade`` stage: realistic, seeded low-quality versions of each fundus photograph."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fundus_pipeline.config import DegradeConfig
from fundus_pipeline.errors import InputError, UsageError
from fundus_pipeline.io import from_float_rgb, to_float_rgb
from fundus_pipeline.stages.base import ItemInput, ItemOutput, Stage
from fundus_pipeline.runner import REPLAYED
from fundus_pipeline.stages.replay import load_replay


class DegradeStage(Stage):
    name = "degrade"
    start_method: ClassVar = "fork"  # torch-free numpy/OpenCV work: forked workers start in milliseconds
    columns = ("variants", "bit_depth", "mode", "fov", "params")

    def __init__(self, config: DegradeConfig):
        """With ``config.replay``, the preset, types, recipe and seed are those recorded in the replay manifest."""
        self.replay_path = str(config.replay) if config.replay else None
        self.replay = None
        self.replay_sha256 = None
        preset, codes, recipe, seed = config.preset, config.types, config.recipe, config.seed
        self._degraders = None
        if config.replay:
            # Everything comes from the manifest's recorded, validated content (never from files it names).
            self.replay = load_replay(config.replay)
            self.replay_sha256 = self.replay.sha256
            preset, codes, recipe, seed = self.replay.preset or "released", self.replay.types, self.replay.recipe, self.replay.seed
            self._degraders = dict(self.replay.degraders)
        self.preset = preset
        self.codes = codes or ["111"]
        self.recipe = recipe
        self.seed = int(seed)
        self.setup()  # validates the recipe / codes early, in the parent process

    def setup(self) -> None:
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
        if self.replay is None:
            state["_degraders"] = None  # rebuilt in each worker
        return state

    def config_record(self) -> dict:
        """The resolved configuration (hashed for --resume; paths are kept out of it, see info())."""
        self.setup()
        return {
            "seed": self.seed,
            "preset": None if self.recipe else self.preset,
            "types": None if self.recipe else self.codes,
            "recipe": self.recipe,
            "replay_sha256": self.replay_sha256,
            "degraders": {k or "default": d.config() for k, d in self._degraders.items()},
        }

    def info(self) -> dict:
        unverified = self._unverified()
        return {"replay": self.replay_path, **({"replay_unverified": len(unverified)} if unverified else {})}

    def _unverified(self) -> list[str]:
        """The replayed keys whose manifest row records no output sha256 (a manifest of an older version, or edited):
        their bytes are written, not compared (review 24 R24-6: this had passed in silence)."""
        if self.replay is None:
            return []
        return sorted(k for k in self.replay.params if not self.replay.outputs_sha256.get(k))

    def notes(self) -> list[str]:
        self.setup()
        out = []
        for d in self._degraders.values():  # a recipe none of whose steps can apply: more likely a slip than meant (campaign 26a C26a-6)
            steps = getattr(getattr(d, "recipe", None), "steps", None)
            if steps and all(st.p == 0 for st in steps):
                out.append(f"the recipe {d.name!r} applies none of its steps (every step's p is 0): each output is its input, "
                           "masked to the FOV")
        missing = self._unverified()
        if missing:
            out.append(f"the replay manifest records no output sha256 for {len(missing)} photograph(s) (e.g. {missing[0]!r}): "
                       "their bytes are written again but not compared with the recorded run's")
        return out

    def compute(self, item: ItemInput) -> ItemOutput:
        from degradation import Degrader, soft_fov_mask
        from degradation.fov import FovGeometry

        self.setup()
        image, fov = item.image, item.fov
        levels = 65535 if image.meta.bit_depth == 16 else 255
        images, params_out = {}, {}
        for variant, degrader in self._degraders.items():
            if self.replay is not None:
                rec = self.replay.params_for(item.key, variant)
                if rec is None:
                    raise InputError(f"no recorded parameters for {item.key!r} (variant {variant or 'default'}) in the replay manifest")
                degrader = Degrader.from_params(rec)
                params = rec
                g = FovGeometry.from_dict(rec["fov"]) if "fov" in rec else fov.geometry
                if (g.height, g.width) != fov.mask.shape:  # another photograph under the recorded key
                    raise InputError(f"the input is {fov.mask.shape[1]}x{fov.mask.shape[0]}; the replay manifest recorded "
                                     f"{g.width}x{g.height} for {item.key!r}: not the photograph it was run on")
                recorded = self.replay.input_sha256.get(item.key)
                if recorded and image.sha256 and image.sha256 != recorded:  # same size, other bytes: no replay of the run
                    raise InputError(f"the input's bytes are not those the replay manifest recorded for {item.key!r} "
                                     "(sha256 differs): a replay reproduces a run on its own photographs")
            else:
                params = degrader.sample(seed=self.seed, key=item.key, fov=fov.geometry)
                g = fov.geometry

            def render(degrader=degrader, params=params, g=g) -> np.ndarray:  # deferred: one variant in memory at a time
                if image.large:  # a band of rows at a time: no full-size float array
                    return _render_banded(degrader, params, image, fov.mask, levels)
                soft = soft_fov_mask(fov.mask, g)
                out = degrader.apply(image.rgb, params, soft, levels=levels)
                return from_float_rgb(out, image.meta, image.alpha, truncate=True)

            images[f"_{variant}" if variant else ""] = render
            params_out[variant or "default"] = params
        expected = self.replay.outputs_sha256.get(item.key) if self.replay is not None else None
        return ItemOutput(images, {
            **({REPLAYED: expected} if expected else {}),  # compared with what is written (runner._finish), then dropped
            "variants": list(params_out),
            "bit_depth": image.meta.bit_depth,
            "mode": image.meta.mode,
            "fov": fov.geometry.to_dict(),
            "params": params_out,
        })


def _render_banded(degrader, params: dict, image, binary: np.ndarray, levels: int) -> np.ndarray:
    """The degraded photograph in its native layout, computed a band of rows at a time (above
    ``bands.LARGE_PIXELS``): besides the decoded input and this output, only bands of rows are held."""
    out: list[np.ndarray] = []
    arr = image.array
    has_alpha = arr.ndim == 3 and arr.shape[2] in (2, 4)

    def read_rows(a: int, b: int) -> np.ndarray:
        return to_float_rgb(arr[a:b], image.meta)[0]

    def write_rows(a: int, x: np.ndarray) -> None:
        alpha = arr[a : a + len(x), :, arr.shape[2] - 1] if has_alpha else None
        rows = from_float_rgb(x, image.meta, alpha, truncate=True, consume=True)
        if not out:
            out.append(np.empty((arr.shape[0],) + rows.shape[1:], rows.dtype))
        out[0][a : a + len(rows)] = rows

    degrader.apply_banded(params, read_rows, binary, write_rows, levels=levels)
    return out[0]
