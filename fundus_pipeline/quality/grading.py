"""Grades and degradation flags of the no-reference grader (``fundus grade``), torch-free.

Grades follow the EyeQ convention: 0 Good, 1 Usable, 2 Reject. Flags are multi-label: what is wrong
with a photograph, as the simulator applied it (``blur``: defocus or motion; ``illumination``: Cofe-Net
halo/hole/colour or vignetting; ``spots``: artefact spots; ``haze``; ``noise``; ``compression``;
``underexposure``; ``overexposure``) and ``not_fundus`` for inputs that are not fundus photographs.
"""

from __future__ import annotations

import numpy as np

GRADES = ("good", "usable", "reject")  # index = EyeQ quality code
#: Grade of a simulated photograph D from its task-aware quality q(D) (``quality.label``): Good when q >= GOOD_Q,
#: Reject when q < REJECT_Q, Usable between. Chosen once (README, "Quality grading"): the ``mild`` recipe lands
#: mostly Good, ``moderate`` mostly Usable and ``severe`` mostly Reject on the training sources.
GOOD_Q = 0.90
REJECT_Q = 0.70
GRADE_RULE = f"q(D) >= {GOOD_Q}: Good (0); {REJECT_Q} <= q(D) < {GOOD_Q}: Usable (1); q(D) < {REJECT_Q}: Reject (2); the clean photograph: Good"
FLAGS = ("blur", "illumination", "spots", "haze", "noise", "compression", "underexposure", "overexposure", "not_fundus")

COFE_OPS = ("color", "halo", "hole", "spot", "blur")  # the Cofe-Net factors of a cofe_* step
CLINICAL_OPS = ("haze", "defocus", "motion", "vignetting", "underexposure", "overexposure", "noise", "jpeg")
#: which flag each simulated operation raises
OP_FLAG = {
    "color": "illumination", "halo": "illumination", "hole": "illumination", "spot": "spots", "blur": "blur",
    "haze": "haze", "defocus": "blur", "motion": "blur", "vignetting": "illumination", "underexposure": "underexposure",
    "overexposure": "overexposure", "noise": "noise", "jpeg": "compression",
}  # fmt: skip


def applied_ops(params: dict | None) -> np.ndarray:
    """Which of the 13 simulated operations (``COFE_OPS`` then ``CLINICAL_OPS``) a degradation parameter
    record applied, then 1 for "none" (also for ``params`` None: a clean photograph); float32 0/1."""
    t = np.zeros(len(COFE_OPS) + len(CLINICAL_OPS) + 1, np.float32)
    if params is not None:
        for step in params["steps"]:
            if not step.get("applied") or step.get("params") is None:
                continue
            if step["type"].startswith("cofe_"):
                for i, op in enumerate(COFE_OPS):
                    if op in step["params"]:
                        t[i] = 1.0
            elif step["type"] in CLINICAL_OPS:
                t[len(COFE_OPS) + CLINICAL_OPS.index(step["type"])] = 1.0
    t[-1] = float(not t[:-1].any())
    return t


def degradation_flags(params: dict | None) -> dict[str, int]:
    """The flags (0/1 for each of ``FLAGS``) a degradation parameter record raises; all 0 for None."""
    ops = applied_ops(params)
    out = {f: 0 for f in FLAGS}
    for op, on in zip((*COFE_OPS, *CLINICAL_OPS), ops[:-1]):
        if on:
            out[OP_FLAG[op]] = 1
    return out


def grade_of_q(q: float) -> int:
    """The grade code (0 Good, 1 Usable, 2 Reject) of a simulated photograph of quality ``q``."""
    return 0 if q >= GOOD_Q else (1 if q >= REJECT_Q else 2)
