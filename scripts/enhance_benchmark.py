"""Score enhancers on the frozen enhancement benchmark (built by scripts/build_enhance_benchmark.py).

For every test image, every degradation (released Cofe-Net types 001..111, the mild / moderate / severe
recipes) and the clean photograph itself ("clean": a good photograph must stay good), each method
enhances the photograph exactly as `fundus enhance` does (FOV estimated on its input, native resolution)
and is scored against the clean original inside the dataset's FOV mask: PSNR, SSIM, MS-SSIM, CIEDE2000
(fundus_pipeline.evaluation.enhance.score_pair), and the shipped `imff` segmenter's vessel F1, AUC-ROC
and clDice on the result against the first observer (threshold from the weights' manifest).

    python scripts/enhance_benchmark.py BENCH --methods identity,clahe,cofe,unet_enh=runs/unet/best.pt \
        [--datasets drive,hrf] [--out docs/enhance_benchmark]

A method is ``identity``, ``clahe``, a weights name from the manifest, or ``NAME=FILE`` for a training
run's weights (architecture ``NAME``'s registry name before any ``@``: ``cofe_g@early=runs/x/last.pt``).
Per-image rows are cached in OUT/rows/<method>__<dataset>.json (a rerun only computes what is missing);
OUT/summary.json and OUT/summary.md hold the means per dataset, degradation and method. The default OUT holds
the published rows, so a command into it measures only methods or rows not published yet: to measure every row
again, score into a fresh --out. Each row records the build of BENCH it was measured on (the sha256 of the
images' table in BENCH/benchmark.json); rows of another build are refused, not mixed into one mean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fundus_pipeline.datasets import default_data_root
from fundus_pipeline.errors import UsageError
from fundus_pipeline.evaluation.enhance_bench import (CONDITIONS, Method, Segmenter, bench_build, cached_rows, markdown, run_authors_pairs,
                                                      run_method, summarise)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=Path)
    ap.add_argument("--methods", default="identity,clahe,cofe")
    ap.add_argument("--datasets", default="drive")
    ap.add_argument("--conditions", default=",".join(c for c in CONDITIONS if c != "authors_pairs"))
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("docs/enhance_benchmark"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--authors-pairs", action="store_true", help="also score the Cofe-Net authors' 8 synthetic pairs (CofeNet/img/*_fuse.png)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = a.data or default_data_root()
    if not a.bench.is_dir():  # (with every row cached it had rewritten the summaries all the same; campaign 32b F1)
        raise UsageError(f"BENCH {a.bench} is not a folder", hint="build it first: python scripts/build_enhance_benchmark.py BENCH")
    datasets = [d for d in a.datasets.split(",") if d]
    builds = {ds: bench_build(a.bench, ds) for ds in datasets}
    specs = [m for m in a.methods.split(",") if m]
    for spec in specs:  # rows of another build refused before anything is loaded or measured
        for ds in datasets:
            cached_rows(a.out / "rows" / f"{spec.partition('=')[0]}__{ds}.json", builds[ds])
    (a.out / "rows").mkdir(parents=True, exist_ok=True)
    seg = Segmenter()
    conditions = [c for c in a.conditions.split(",") if c]
    all_rows = {}
    for spec in specs:
        method = Method(spec)
        for ds in datasets:
            rows_path = a.out / "rows" / f"{method.name}__{ds}.json"
            all_rows[(method.name, ds)], measured = run_method(method, seg, a.bench, root, ds, rows_path, conditions, builds[ds])
            rows = all_rows[(method.name, ds)]
            unrecorded = sum("bench" not in r for r in rows)
            print(f"{method.name} {ds}: {len(rows)} rows, {measured} measured now, {len(rows) - measured} read from {rows_path}"
                  + (f" ({unrecorded} measured before rows recorded their build: not checked against this BENCH)" if unrecorded else ""),
                  flush=True)
        if a.authors_pairs:
            pairs = a.out / "rows" / f"{method.name}__authors.json"
            measured = not pairs.is_file()
            if measured:
                pairs.write_text(json.dumps(run_authors_pairs(method, seg, root)))
            all_rows[(method.name, "authors")] = json.loads(pairs.read_text())
            print(f"{method.name} authors' pairs: {'measured now' if measured else f'read from {pairs}'}", flush=True)
    for p in sorted((a.out / "rows").glob("*.json")):  # methods scored in earlier runs too
        m, ds = p.stem.split("__")
        all_rows.setdefault((m, ds), json.loads(p.read_text()))
    summary = summarise(all_rows)
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (a.out / "summary.md").write_text(markdown(summary) + "\n")
    print(markdown(summary))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
