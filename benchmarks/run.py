"""Speed and memory of `fundus run` (the whole chain). Prints one JSON document.

Four measurements, each a fresh `fundus` child process (wall clock; peak resident memory as
ru_maxrss of the process and of its largest worker):

* ``quickstart``: the README's quick start, `fundus sample demo && fundus run demo out` (five 1411x1411
  photographs, the shipped default weights): the wall clock of both processes. Goal: under a minute.
* ``throughput``: DRIVE-size photographs (565x584) with the shipped weights: the 20 DRIVE test images
  and the same 20 degraded by `fundus degrade` (Cofe-Net released type 111 and the `moderate` recipe,
  seed 0), 60 photographs, so that every step has work (the grader sends the degraded ones to
  enhancement). Photographs per second with ``--workers 1`` and ``--workers 2``, and the seconds spent
  in each stage. Goal: at least 1 photograph/s with --workers 2 on 2 cores. On CUDA as well when present.
* ``scale``: peak memory against the number of photographs: N generated photographs (the 20 DRIVE test
  images reduced to 192x192 and degraded with the seven Cofe-Net types and N/140 seeds) through the whole chain with tiny registered models
  (the models' cost does not matter here, the machinery's does), N = 200 and 2,000. Goal: the 2,000-
  photograph peak within 10% of the 200-photograph peak.
* ``report``: the report of 1,000 of those photographs: its size and, when chromium and chromedriver are
  installed, the time to DOMContentLoaded from a file URL in headless chromium (median of 3 loads).
  Goals: under 60 MB, under 3 s.

Usage: python benchmarks/run.py [--only quickstart,throughput,scale,report] [--scale 200,2000] [--scale-steps grade,segment]
       [--report-n 1000] [--keep DIR]
Needs ../shared/data (DRIVE); prints {"skipped": ...} for a part whose data is missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _args, beside this script

from _args import count, counts, names  # noqa: E402

from fundus_pipeline.config import RunConfig  # noqa: E402
from fundus_pipeline.datasets import default_data_root  # noqa: E402
from fundus_pipeline.runner import environment  # noqa: E402

CHILD = (
    "import json, resource, sys, time\n"
    "from fundus_pipeline.cli import main\n"
    "t = time.perf_counter()\n"
    "code = main(sys.argv[1:])\n"
    "wall = time.perf_counter() - t\n"
    "me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print('@@' + json.dumps({'exit_code': code, 'wall_s': wall, 'peak_rss_mb': me.ru_maxrss / 1024, 'worker_peak_rss_mb': kids.ru_maxrss / 1024}))\n"
)


def fundus(*args: str) -> dict:
    """Run `fundus ARGS` in a fresh process; its exit code, wall time and peak memories."""
    r = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = [x for x in r.stdout.splitlines() if x.startswith("@@")]
    if not line:
        raise SystemExit(f"fundus {' '.join(map(str, args))} failed: {r.stderr[-2000:]}")
    out = json.loads(line[-1][2:])
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def quickstart(tmp: Path) -> dict:
    """The README's first command after the install: `fundus sample demo && fundus run demo out`, each in a
    fresh process (wall clock of the process, interpreter start and imports included)."""
    demo, out, res = tmp / "demo", tmp / "out", {}
    for name, args in (("sample", ("sample", demo)), ("run", ("run", demo, out, "--quiet"))):
        t = time.perf_counter()
        r = fundus(*args)
        if r["exit_code"] != 0:
            raise SystemExit(f"fundus {name} exited {r['exit_code']}")
        res[f"{name}_wall_s"] = round(time.perf_counter() - t, 2)
        res[f"{name}_peak_rss_mb"], res[f"{name}_worker_peak_rss_mb"] = r["peak_rss_mb"], r["worker_peak_rss_mb"]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    stages, _ = stage_seconds(out)
    total, defaults = res["sample_wall_s"] + res["run_wall_s"], RunConfig()
    return {"photographs": len(rows), "size": "1411x1411", "enhanced": sum(r["enhanced"] == "yes" for r in rows),
            "trusted": sum(r["segmented"] == "enhanced" for r in rows), "wall_s": round(total, 2), **res, "stage_seconds": stages,
            "weights": f"shipped defaults ({defaults.grade_weights}, {defaults.enhance_weights})",
            "goal": "under a minute on 2 cores", "meets_goal": total < 60}  # fmt: skip


def drive_test() -> Path | None:
    d = default_data_root() / "DRIVE" / "test" / "images"
    return d if d.is_dir() else None


def degrade(src: Path, dst: Path, *opts: str) -> None:
    r = fundus("degrade", src, dst, "--quiet", *opts)
    if r["exit_code"] != 0:
        raise SystemExit(f"fundus degrade {src} failed")


def throughput_set(tmp: Path) -> Path | None:
    """60 DRIVE-size photographs: the 20 DRIVE test images, and the same degraded two ways."""
    src = drive_test()
    if src is None:
        return None
    inp = tmp / "drive60"
    inp.mkdir()
    for p in sorted(src.iterdir()):
        shutil.copyfile(p, inp / f"clean_{p.name}")
    for name, opts in (("c111", ("--types", "111")), ("moderate", ("--recipe", "moderate"))):
        degrade(src, tmp / name, *opts, "--seed", "0")
        for p in sorted((tmp / name).glob("*.png")):
            shutil.copyfile(p, inp / f"{name}_{p.name}")
    return inp


def stage_seconds(out: Path) -> dict:
    m = json.loads((out / "manifest.json").read_text())
    return {k: v["duration_s"] for k, v in m["stages"].items()}, m["counts"]


def throughput(tmp: Path) -> dict:
    inp = throughput_set(tmp)
    if inp is None:
        return {"skipped": "DRIVE not present"}
    n = len(list(inp.iterdir()))
    c = RunConfig()  # the defaults this run uses
    res: dict = {"photographs": n, "size": "565x584 (DRIVE)", "weights": f"shipped ({c.grade_weights}, {c.enhance_weights}, {c.score_weights}, {c.segment_weights})"}
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for workers in ((1, 2) if dev == "cpu" else (1,)):
            out = tmp / f"run_{dev}_{workers}"
            r = fundus("run", inp, out, "--workers", workers, "--device", dev, "--quiet", "--no-report")
            stages, counts = stage_seconds(out)
            r.update(images_per_s=round(n / r["wall_s"], 3), stage_seconds=stages, counts=counts)
            t = time.perf_counter()
            fundus("report", out)
            r["report_s"] = round(time.perf_counter() - t, 2)
            res[f"{dev}_workers{workers}"] = r
    best = res["cpu_workers2"]["images_per_s"]
    res["goal"] = "at least 1 photograph/s on 2 CPU cores with --workers 2"
    res["meets_goal"] = best >= 1.0
    return res


def generated(tmp: Path, n: int, side: int = 192) -> Path:
    """n generated photographs of ``side`` px: the 20 DRIVE test images reduced and degraded with the seven
    Cofe-Net types, n/140 seeds (small, so that the machinery, not the models, is what is measured)."""
    import cv2

    from fundus_pipeline.io import read_image, write_image_atomic

    small = tmp / f"drive{side}"
    if not small.exists():
        for p in sorted(drive_test().iterdir()):
            arr, _ = read_image(p)
            write_image_atomic(small / f"{p.stem}.png", cv2.resize(arr, (side, side), interpolation=cv2.INTER_AREA))
    out = tmp / f"gen{n}"
    out.mkdir()
    per = -(-n // 140)
    k = 0
    for seed in range(per):
        d = tmp / f"g_{n}_{seed}"
        degrade(small, d, "--types", "all", "--seed", str(seed), "--workers", "2")
        for p in sorted(d.glob("*.png")):
            if k < n:
                os.link(p, out / f"s{seed:03d}_{p.name}")
                k += 1
    return out


def tiny_weights(tmp: Path) -> list[str]:
    import torch

    from fundus_pipeline.models.registry import build_model

    args = []
    for step, name in (("grade", "hemf_tiny"), ("enhance", "cofe_tiny"), ("score", "sdmp_tiny"), ("segment", "imff_tiny")):
        torch.manual_seed(0)
        p = tmp / f"{name}.pt"
        torch.save(build_model(name).state_dict(), p)
        args += [f"--{step}-weights", str(p), f"--{step}-arch", name]
    return args + ["--enhance-if", "good,usable,reject", "--device", "cpu"]


def scale(tmp: Path, sizes: list[int], steps: str = "grade,enhance,score,segment") -> dict:
    if drive_test() is None:
        return {"skipped": "DRIVE not present"}
    tiny = tiny_weights(tmp)
    enhanced = ", every photograph enhanced" if "enhance" in steps.split(",") else ""
    res: dict = {"models": f"tiny (hemf_tiny, cofe_tiny, sdmp_tiny, imff_tiny){enhanced}", "workers": 2, "steps": steps}
    for n in sizes:
        inp = tmp / f"gen{n}" if (tmp / f"gen{n}").exists() else generated(tmp, n)
        r = fundus("run", inp, tmp / f"scale{n}", *tiny, "--steps", steps, "--workers", "2", "--quiet")
        r["images_per_s"] = round(n / r["wall_s"], 3)
        r["report_mb"] = round((tmp / f"scale{n}" / "report.html").stat().st_size / 2**20, 2)
        res[str(n)] = r
    if len(sizes) >= 2:
        a, b = res[str(sizes[0])], res[str(sizes[-1])]
        for k in ("peak_rss_mb", "worker_peak_rss_mb"):
            res[f"{k}_ratio"] = round(b[k] / a[k], 4)
        res["goal"] = f"peak RSS of {sizes[-1]} photographs within 10% of {sizes[0]}"
        res["meets_goal"] = res["peak_rss_mb_ratio"] <= 1.10 and res["worker_peak_rss_mb_ratio"] <= 1.10
    return res


def load_time(page: Path, reps: int = 3) -> dict:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not (chromium and driver_bin):
        return {"skipped": "no chromium/chromedriver"}
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(a)
    opts.binary_location = chromium
    d = webdriver.Chrome(service=Service(driver_bin), options=opts)
    try:
        times = []
        for _ in range(reps):
            d.get("about:blank")
            d.get(page.as_uri())
            t = d.execute_script("const n = performance.getEntriesByType('navigation')[0]; return [n.domContentLoadedEventEnd, n.loadEventEnd];")
            times.append(t)
        rows = d.execute_script("return document.querySelectorAll('#rows tbody tr').length")
    finally:
        d.quit()
    dcl = statistics.median(t[0] for t in times) / 1000
    return {"dom_content_loaded_s": round(dcl, 3), "load_s": round(statistics.median(t[1] for t in times) / 1000, 3), "rows": rows,
            "goal": "DOMContentLoaded under 3 s", "meets_goal": dcl < 3.0}  # fmt: skip


def report(tmp: Path, n: int) -> dict:
    if drive_test() is None:
        return {"skipped": "DRIVE not present"}
    out = tmp / f"report{n}"
    r = fundus("run", generated(tmp, n) if not (tmp / f"gen{n}").exists() else tmp / f"gen{n}", out, *tiny_weights(tmp), "--workers", "2", "--quiet")
    page = out / "report.html"
    mb = page.stat().st_size / 2**20
    return {"photographs": n, "run_wall_s": r["wall_s"], "report_mb": round(mb, 2), "size_goal": "under 60 MB", "size_meets_goal": mb < 60,
            **load_time(page)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", type=names(("quickstart", "throughput", "scale", "report")), default=["quickstart", "throughput", "scale", "report"])
    ap.add_argument("--scale", type=counts, default=[200, 2000], help="two or more photograph counts: the time per photograph is compared between them")
    ap.add_argument("--scale-steps", type=names(("grade", "enhance", "score", "segment")), default="grade,enhance,score,segment", help="the chain's steps in the scale part (grade,segment: 10,000 photographs in about 20 minutes on 2 cores)")
    ap.add_argument("--report-n", type=count(1), default=1000)
    ap.add_argument("--keep", type=Path, help="keep the generated folders here instead of a temporary folder")
    args = ap.parse_args()
    if "scale" in args.only and len(set(args.scale)) < 2:  # one size compared with itself met the goal by construction
        ap.error("--scale: give two or more different counts (e.g. 200,2000)")
    import torch  # noqa: F401  (loaded so that environment() records torch, its CPU capability and CUDA)

    parts = args.only
    result: dict = {"machine": environment(), "date": time.strftime("%Y-%m-%d")}
    tmp_ctx = tempfile.TemporaryDirectory() if args.keep is None else None
    tmp = Path(tmp_ctx.name) if tmp_ctx else args.keep
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        if "quickstart" in parts:
            result["quickstart"] = quickstart(tmp)
        if "throughput" in parts:
            result["throughput"] = throughput(tmp)
        if "scale" in parts:
            result["scale"] = scale(tmp, args.scale, ",".join(args.scale_steps))
        if "report" in parts:
            result["report"] = report(tmp, args.report_n)
    finally:
        if tmp_ctx:
            tmp_ctx.cleanup()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
