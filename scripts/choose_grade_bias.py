"""Choose a grader's decision offsets (``decision_bias`` in the weights' manifest) on *validation* images,
as the segmenter's threshold is chosen: the grade ``fundus grade`` writes is the argmax of the
temperature-scaled log-probabilities plus one offset per grade (good's fixed at 0); the probabilities
themselves are unchanged. The images are the ones the grader was validated and calibrated on: the grade
set's ``val`` split and the EyePACS-256 ``val`` part (never a test image). The choice: the offsets on a
grid (step ``--step`` in [-``--range``, ``--range``]) that maximise the mean of the two macro F1s, the
smallest (L1) among equals; all zeros when nothing beats them.

    python scripts/choose_grade_bias.py WEIGHTS [--grade-set sets/grade] [--record docs/grade_bias_WEIGHTS.json]

With ``--record FILE`` the JSON goes to FILE and the choice into the weights' manifest entry
(``output.decision_bias`` and ``decision_selection``; ``fundus_pipeline.train.export.record_decision_selection``);
without it, to stdout only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from fundus_pipeline.datasets import default_data_root
from fundus_pipeline.quality.grading import GRADES
from fundus_pipeline.train.grade import choose_decision_bias, log_probabilities, predict_logits, resize_square, validation_items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--grade-set", type=Path, default=Path("sets/grade"))
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--step", type=float, default=0.1)
    ap.add_argument("--range", type=float, default=2.0, dest="span")
    ap.add_argument("--record", type=Path, help="write the JSON here and the choice into the weights' manifest entry")
    a = ap.parse_args()
    torch.set_num_threads(2)
    from fundus_pipeline.models.weights import load_model

    model, loaded = load_model(a.weights, task="grading")
    temperature = float(loaded.spec.output.temperature)
    size = int(model.input_size)
    items = validation_items(a.grade_set, a.data or default_data_root(), 256)
    parts = {}
    with torch.no_grad():
        for k, v in items.items():
            logits = predict_logits(model, [resize_square(i.image, size) for i in v], torch.device("cpu"))[:, : len(GRADES)].numpy()
            parts[k] = (log_probabilities(logits.astype(np.float64), temperature), np.array([i.grade for i in v]))
    selection = choose_decision_bias(parts, a.step, a.span)
    selection["inputs"] = {
        "weights": a.weights, "sha256": loaded.sha256, "temperature": temperature,
        "parts": {"set": f"the grade set's val split ({a.grade_set})", "real": "the EyePACS-256 val part"},
        "images": {k: len(v) for k, v in items.items()},
    }  # fmt: skip
    text = json.dumps(selection, indent=1)
    if a.record:
        from fundus_pipeline.train.export import record_decision_selection

        a.record.parent.mkdir(parents=True, exist_ok=True)
        a.record.write_text(text + "\n")
        record_decision_selection(a.weights, selection, str(a.record))
    print(text)


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
