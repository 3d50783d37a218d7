"""Score pretext (ViT stream) weights on the fixed validation crops of ``fundus train pretext``
(``PRETEXT_VAL_SEED``: the held-out training sources, three degradations each and the clean frame, centre
crops), so that weights from runs with different seeds are compared on the same crops.

    python scripts/validate_pretext.py weights/vit_fundus.pt weights/vit_fundus_2400.pt [--cache runs/enh_sources_512.npz]

One JSON line per weights file on stdout.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from fundus_pipeline.models.registry import build_model
from fundus_pipeline.train.config import PretextConfig
from fundus_pipeline.train.score import PRETEXT_TARGETS, PretextTask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+", type=Path)
    ap.add_argument("--arch", default="vit_fundus")
    ap.add_argument("--cache", type=Path, default=None, help="the prepared training sources (as --cache of the trainers)")
    ap.add_argument("--data", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        task = PretextTask(PretextConfig(out=Path(tmp), arch=a.arch, data=a.data, cache=a.cache or Path(tmp) / "sources.npz"))
        task.setup(lambda m: None)
        for w in a.weights:
            model = build_model(a.arch, n_outputs=len(PRETEXT_TARGETS))
            model.load_state_dict(torch.load(w, map_location="cpu", weights_only=True))
            model.eval()
            with torch.no_grad():
                print(json.dumps({"weights": str(w), **task.validate(model, torch.device("cpu"))}), flush=True)


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
