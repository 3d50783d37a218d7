"""Real low-quality photographs (no reference): the 100 EyePACS images the Cofe-Net authors graded
"Usable" (../shared/data/CofeNet/img/image, 512x512). Runs `fundus enhance` on all of them (vessel
fractions before and after in its results.csv), and `fundus segment` on the inputs and on the results,
then writes a contact sheet (input | enhanced | vessels before | vessels after) of ROWS photographs
chosen at evenly spaced ranks of input luminance, and writes the mean reference-free figures as JSON
(``--json``, and on stdout after the sub-commands' summary lines).

    python scripts/enhance_real.py WORK [--weights cofe] [--arch ARCH] [--rows 6] [--sheet docs/enhance_real_contact_sheet.jpg]
        [--json docs/enhance_real.json] [--threads N]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import cv2
import numpy as np

from fundus_pipeline.cli import main as cli
from fundus_pipeline.datasets import default_data_root, require_datasets

COLUMNS = ("luminance_before", "luminance_after", "contrast_before", "contrast_after", "vessel_fraction_before", "vessel_fraction_after")
TILE = 256


def _run(*args: str) -> None:
    code = cli([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"fundus {' '.join(map(str, args))} exited with {code}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--weights", default="cofe")
    ap.add_argument("--arch", default=None)
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--sheet", type=Path, default=Path("docs/enhance_real_contact_sheet.jpg"))
    ap.add_argument("--json", type=Path, default=Path("docs/enhance_real.json"))
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the enhance and segment commands [default: theirs, the available cores]")
    a = ap.parse_args()
    src = require_datasets(default_data_root(), "CofeNet", how="set FUNDUS_DATA") / "CofeNet" / "img" / "image"
    enh, v0, v1 = a.work / "enhanced", a.work / "vessels_before", a.work / "vessels_after"
    arch = ["--arch", a.arch] if a.arch else []
    for cmd, inp, out in (("enhance", src, enh), ("segment", src, v0), ("segment", enh, v1)):
        if not (out / "manifest.json").is_file():
            extra = ["--weights", a.weights, *arch] if cmd == "enhance" else []
            threads = ["--threads", str(a.threads)] if a.threads is not None else []
            _run(cmd, inp, out, *extra, *threads, "--quiet", *(["--resume"] if out.exists() else []))
    with open(enh / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    summary = {"n": len(rows), "weights": a.weights, **{c: round(float(np.mean([float(r[c]) for r in rows])), 5) for c in COLUMNS}}
    summary["vessel_fraction_up"] = int(sum(float(r["vessel_fraction_after"]) > float(r["vessel_fraction_before"]) for r in rows))
    order = sorted(rows, key=lambda r: float(r["luminance_before"]))
    picks = [order[round(i * (len(order) - 1) / max(1, a.rows - 1))] for i in range(a.rows)]
    sheet = []
    for r in picks:
        k = r["key"]
        tiles = [cv2.imread(str(p)) for p in (src / f"{k}.png", enh / f"{k}.png", v0 / f"{k}_vessels.png", v1 / f"{k}_vessels.png")]
        sheet.append(np.hstack([cv2.resize(t, (TILE, TILE), interpolation=cv2.INTER_AREA) for t in tiles]))
    a.sheet.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(a.sheet), np.vstack(sheet), [cv2.IMWRITE_JPEG_QUALITY, 88])
    summary["contact_sheet"] = {"file": str(a.sheet), "rows": [r["key"] for r in picks], "columns": ["input", "enhanced", "vessels before", "vessels after"]}
    text = json.dumps(summary, indent=1)
    a.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
