"""Build the frozen enhancement benchmark from the *test* splits (DRIVE 01-20, the 30 HRF test images):
every released Cofe-Net type 001..111 and the mild, moderate and severe recipes, seeded, with the
project's own `fundus degrade` stage (so each folder holds its manifest.json with every parameter).

    python scripts/build_enhance_benchmark.py BENCH [--data ../shared/data] [--seed 2026] [--datasets drive,hrf] [--types all]

``--types`` restricts the released codes (e.g. ``111`` for a quicker HRF part; recorded in benchmark.json).

Layout: BENCH/<dataset>/released/KEY_<code>.png (seven codes per image), BENCH/<dataset>/<recipe>/KEY.png,
BENCH/<dataset>/inputs.txt (the clean test images), BENCH/benchmark.json (seed, data root, lists and the
sha256 of every degraded image). Rebuilding with the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from fundus_pipeline.datasets import DRIVE_TEST, HRF_TEST, default_data_root, drive_paths, hrf_paths

RECIPES = ("mild", "moderate", "severe")
SEED = 2026


def test_images(root: Path, dataset: str) -> list[Path]:
    if dataset == "drive":
        return [drive_paths(root, i)["image"] for i in DRIVE_TEST]
    return [hrf_paths(root, i)["image"] for i in HRF_TEST]


def build(out: Path, root: Path, seed: int, datasets: list[str], types: str = "all") -> dict:
    from fundus_pipeline.config import DegradeConfig
    from fundus_pipeline.runner import run_stage
    from fundus_pipeline.stages.degrade import DegradeStage

    from fundus_pipeline.errors import FundusError, UsageError

    record: dict = {"seed": seed, "data_root": str(root), "datasets": {}}
    for ds in datasets:
        if ds not in ("drive", "hrf"):
            raise UsageError(f"--datasets: unknown dataset {ds!r} (drive, hrf)")
        absent = [p for p in test_images(root, ds) if not p.is_file()]
        if absent:  # before anything is written: a benchmark of no image was frozen as built
            raise UsageError(f"--data {root} lacks {len(absent)} {ds} test photograph(s), e.g. {absent[0]}",
                             "the datasets and their layout: ../shared/data/README.md")
    for ds in datasets:
        d = out / ds
        d.mkdir(parents=True, exist_ok=True)
        listing = d / "inputs.txt"
        listing.write_text("".join(f"{p.resolve()}\n" for p in test_images(root, ds)))
        configs = {"released": DegradeConfig(types=types, preset="released", seed=seed)}
        configs.update({r: DegradeConfig(recipe=r, seed=seed) for r in RECIPES})
        for name, cfg in configs.items():
            target = d / name
            manifest = target / "manifest.json"
            if manifest.is_file():
                m = json.loads(manifest.read_text())
                if m.get("status") == "finished" and not (m.get("counts") or {}).get("error"):
                    continue  # built already (same seed: same bytes)
            res = run_stage(DegradeStage(cfg), listing, target, resume=target.exists(), progress=False)
            if res.failed or res.interrupted:  # never frozen with images missing: a rerun redoes them
                raise FundusError(f"{target}: {len(res.failed)} of the {ds} test photographs failed; see its results.csv",
                                  "rerun the same command once the cause is fixed (finished images are kept)")
        hashes = {
            str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*.png"))
        }
        prior = json.loads((out / "benchmark.json").read_text())["datasets"] if (out / "benchmark.json").is_file() else {}
        record["datasets"].update({k: v for k, v in prior.items() if k not in record["datasets"]})
        record["datasets"][ds] = {"inputs": [str(p) for p in test_images(root, ds)], "released_types": configs["released"].types, "recipes": list(RECIPES), "sha256": hashes}
    (out / "benchmark.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--datasets", default="drive,hrf")
    ap.add_argument("--types", default="all", help="released Cofe-Net codes (comma-separated or 'all')")
    a = ap.parse_args()
    rec = build(a.out, a.data or default_data_root(), a.seed, [s.strip() for s in a.datasets.split(",") if s.strip()], a.types)
    print(json.dumps({ds: len(v["sha256"]) for ds, v in rec["datasets"].items()}))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
