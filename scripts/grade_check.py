"""Record what the shipped grading weights named as the argument say about ten real photographs;
tests/test_grade_shipped.py checks it against the file named after the weights:

    python scripts/grade_check.py hemf_4750 > docs/grade_benchmark/hemf_4750_check.csv   # the default grader
    python scripts/grade_check.py hemf_4k > docs/grade_benchmark/hemf_4k_check.csv

The name is required: without it the check file of one grader could be rewritten with another's output
when the default changes.

The photographs: DRIVE test 01-03, the first three real low-quality CofeNet photographs, the first three
EyePACS-256 test photographs (patient split) and scikit-image's astronaut.
"""

from __future__ import annotations

import contextlib
import csv
import sys
import tempfile
from pathlib import Path

COLUMNS = ("key", "grade", "p_good", "p_usable", "p_reject", "p_blur", "p_illumination", "p_not_fundus")
ROOT = Path(__file__).resolve().parents[1]


def default_weights() -> str:
    """The weights ``fundus grade`` uses by default, and the recorded check that belongs to them."""
    from fundus_pipeline.config import GradeConfig

    return GradeConfig.model_fields["weights"].default


def recorded_check(weights: str) -> Path:
    return ROOT / "docs" / "grade_benchmark" / f"{weights}_check.csv"


def check_inputs(data_root: Path, folder: Path) -> list[Path]:
    """Copies of the check photographs in ``folder`` (flat, so the keys are the file names)."""
    import skimage.data
    from PIL import Image

    from fundus_pipeline.datasets import eyepacs256_split

    folder.mkdir(parents=True, exist_ok=True)
    src = [data_root / "DRIVE" / "test" / "images" / f"{i:02d}_test.tif" for i in (1, 2, 3)]
    src += sorted((data_root / "CofeNet" / "img" / "image").glob("*.png"))[:3]
    src += [data_root / "EyePACS-256" / "images" / r["image"] for r in eyepacs256_split(data_root) if r["split"] == "test"][:3]
    for p in src:
        (folder / p.name).write_bytes(p.read_bytes())
    Image.fromarray(skimage.data.astronaut()).save(folder / "astronaut.png")
    return sorted(folder.iterdir())


def main() -> None:
    from fundus_pipeline.cli import main as cli_main
    from fundus_pipeline.datasets import default_data_root

    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if sys.argv[1:] in (["-h"], ["--help"]) else sys.stderr)
        raise SystemExit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    weights = sys.argv[1]

    with tempfile.TemporaryDirectory() as tmp:
        check_inputs(default_data_root(), Path(tmp) / "in")
        with contextlib.redirect_stdout(sys.stderr):  # the command's summary line is not part of the CSV
            code = cli_main(["grade", str(Path(tmp) / "in"), str(Path(tmp) / "out"), "--weights", weights, "--threads", "2", "--quiet"])
        if code != 0:
            raise SystemExit("fundus grade failed")
        rows = list(csv.DictReader(open(Path(tmp) / "out" / "results.csv")))
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r[c] for c in COLUMNS])


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
