"""Turn 224-input HEMF weights (stems of 4x4 patches) into the starting weights of a 448-input variant with
8x8 stem patches (``hemf_448``): each stem tap is spread over a 2x2 block and divided by 4, so the new model
on a 448 image gives what the old one gives on its 2x2 average (checked here before writing).

    python scripts/expand_hemf_stems.py weights/hemf_4k.pt runs/hemf_448_init.pt [--from hemf --to hemf_448]

The output is a plain state dict for ``fundus train grade --arch hemf_448 --init``, written to a temporary
name and renamed; an existing OUT is refused unless ``--overwrite`` (never the input itself, nor a file in
``weights/`` or in ``$FUNDUS_WEIGHTS``). WEIGHTS: a file or a shipped name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fundus_pipeline.models.hemf import expand_patch_stems
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.errors import UsageError
from fundus_pipeline.models.weights import load_weights_checked, resolve_weights, weights_dir
from fundus_pipeline.train.loop import save_atomic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("out", type=Path)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    ap.add_argument("--from", dest="src", default="hemf", help="the registered architecture of WEIGHTS")
    ap.add_argument("--to", dest="dst", default="hemf_448", help="the registered architecture to initialise")
    a = ap.parse_args()
    src = resolve_weights(a.weights)
    shipped = {weights_dir().resolve(), (Path(__file__).resolve().parents[1] / "weights").resolve()}  # $FUNDUS_WEIGHTS and the repo's
    if a.out.resolve() == src.resolve() or a.out.resolve().parent in shipped:
        raise UsageError(f"refusing to write {a.out}: it is the input or a file in a weights folder ({', '.join(sorted(map(str, shipped)))})",
                         "write the expanded weights elsewhere, e.g. runs/")
    if a.out.exists() and not a.overwrite:
        raise UsageError(f"{a.out} exists", "pass --overwrite to replace it")
    old, new = build_model(a.src).eval(), build_model(a.dst).eval()
    if not (hasattr(old, "patch") and hasattr(new, "patch")):
        raise UsageError(f"--from {a.src} and --to {a.dst} must both be HEMF architectures (hemf, hemf_448, ...)")
    if new.patch % old.patch:
        raise UsageError(f"{a.dst}'s stem patch {new.patch} is not a multiple of {a.src}'s {old.patch}")
    factor = new.patch // old.patch
    load_weights_checked(old, src, a.src)
    state = expand_patch_stems(old.state_dict(), factor)
    try:
        new.load_state_dict(state)
    except RuntimeError:
        raise UsageError(f"--to {a.dst} does not have {a.src}'s widths and depths: only the stem patch may differ") from None
    x = torch.rand(2, 3, new.input_size, new.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = float((new(x) - old(F.avg_pool2d(x, factor))).abs().max())
    if gap > 1e-4:
        raise SystemExit(f"error: the expanded weights differ from the original by {gap:.2e} (expected float rounding only)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(new.state_dict(), a.out)
    print(json.dumps({"weights": str(src), "out": str(a.out), "from": a.src, "to": a.dst, "factor": factor, "max_logit_gap": gap}))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
