"""Write the EyePACS-256 patient split (``fundus_pipeline.datasets.eyepacs256_split``) to a CSV.

    python scripts/eyepacs256_split.py > docs/grade/eyepacs256_split.csv

The split is a pure function of the labels file and a fixed seed; the committed CSV records it, and
``tests/test_grade.py`` checks that the function still reproduces it.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from fundus_pipeline.datasets import default_data_root, eyepacs256_split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])  # --help and a mistyped option (campaign 32b F5)
    ap.add_argument("--data", type=Path, default=None, help="the datasets' root (default: $FUNDUS_DATA, else ../shared/data)")
    a = ap.parse_args()
    rows = eyepacs256_split(a.data or default_data_root())  # before the header: a missing dataset prints nothing on stdout
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(["image", "patient", "quality", "split"])
    for r in rows:
        w.writerow([r["image"], r["patient"], r["quality"], r["split"]])


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
