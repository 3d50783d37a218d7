"""Throughput of every network stage against its network's own forward-pass ceiling. Prints one JSON.

For each stage (segment, enhance, score, grade) and each input size (DRIVE 565x584, and 1024x1024):

* ``ceiling``: the network alone, on synthetic tensors already on the device, at the shape the stage
  feeds it (segment: the padded working-scale image; enhance: the 512x512 canonical frame; score: five
  224x224 crop pairs; grade: one 224x224 frame), timed over ``--reps`` passes after a warm-up: images/s.
* ``stage``: the stage's whole per-item work on a decoded photograph (FOV estimate, frames, host-device
  copies, the network, the results back at native resolution), images/s, and its share of the ceiling.
* ``ceiling_gflop``: the forward pass's GFLOP (``torch.utils.flop_counter``: 2 per multiply-add of the
  convolutions, matrix products and attention); ``ceiling_gflop_per_s`` the rate it runs at, and its share of
  ``matmul_gflop_per_s``, the device's float32 rate on a 2048x2048 matrix product (how close the network
  already is to what the hardware does at best).
* ``decode_s``: decoding the photograph from disk (what worker processes overlap with the device).
* peak device memory (CUDA) or the process's peak resident memory (CPU).

* ``batched``: ``--batch`` photographs through ``compute_batch`` at once, images/s, in each precision of
  ``--precisions`` (fp32; bf16 and fp16 under autocast, fp16 on CUDA only).
* ``agreement`` (the validation photographs DRIVE 37-40, training split, ``--agree N`` of them; never test
  photographs, since the precision to ship is chosen on it): what the low precisions change. Segment: vessel
  F1 against the manual annotations, float32 against each precision (tolerance 0.002). Enhance: PSNR inside the
  FOV against the clean photograph of its Cofe-Net 111 degradation (seed 0), float32 against each precision
  (tolerance 0.05 dB). The precision to ship is the fastest one within both.
* ``fed``: the runner end to end (``run_stage(feed=True)``: ``--decoders`` decoding processes feed one model,
  batches of ``--batch``, outputs written by threads) over ``--fed-n`` copies of the DRIVE photograph, images/s
  with decoding and writing included (and without the start-up: ``steady_images_per_s``), against
  ``stage_images_per_s``: the share the input/output costs; and the GPU's utilisation meanwhile (NVML, sampled every 0.2 s; needs ``nvidia-ml-py``).

Run where a GPU is lent: ``python benchmarks/gpu.py --device cuda --compile > benchmarks/results/gpu.json``.
On a CPU it runs too (``--device cpu``, fewer reps), which checks the script and shows the same split.
Needs ../shared/data (DRIVE 01_test) or falls back to a synthetic fundus image.

Usage: python benchmarks/gpu.py [--device auto|cpu|cuda] [--reps 20] [--sizes drive,1024] [--batch 8]
       [--precisions fp32,bf16,fp16] [--agree 20] [--fed-n 64] [--decoders 4] [--only segment,enhance,score,grade]
       [--compile]

``--compile`` adds ``compiled`` at the first size: each network under ``torch.compile`` (``--compile`` of the
stage commands): the first call's seconds, compilation included; the compiled forward pass's images/s and
speed-up over the uncompiled one; the stage's images/s compiled; the largest output difference.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # _args, beside this script

from _args import count, names, sides  # noqa: E402

from fundus_pipeline.config import EnhanceConfig, GradeConfig, ScoreConfig, SegmentConfig  # noqa: E402
from fundus_pipeline.datasets import default_data_root  # noqa: E402
from fundus_pipeline.device import resolve_device  # noqa: E402
from fundus_pipeline.io import write_image_atomic  # noqa: E402
from fundus_pipeline.runner import decode, environment, prepare_item  # noqa: E402


def photograph(size: str, tmp: Path) -> Path:
    """The DRIVE test image 01 at its size, or resized to ``size`` x ``size`` (a synthetic one without data)."""
    import cv2

    src = default_data_root() / "DRIVE" / "test" / "images" / "01_test.tif"
    if src.exists():
        arr = decode(src).array
    else:
        from tests.conftest import synthetic_fundus

        arr = synthetic_fundus(584, 565)
    if size != "drive":
        n = int(size)
        arr = cv2.resize(arr, (n, n), interpolation=cv2.INTER_AREA if n < max(arr.shape[:2]) else cv2.INTER_CUBIC)
    p = tmp / f"photo_{size}.png"
    write_image_atomic(p, arr)
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, reps: int, device: torch.device) -> float:
    """Seconds per call after one warm-up call."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def _shape(stage_name: str, stage, item) -> tuple[tuple[int, ...], int]:
    """(input shape, number of inputs) the stage feeds its network for ``item``."""
    from fundus_pipeline.models.inference import working_scale

    if stage_name == "segment":
        scale = working_scale(item.fov.geometry.diameter, stage.max_fov)
        h, w = (round(d * scale) for d in (item.image.meta.height, item.image.meta.width))
        h, w = min(h, stage.cfg.tile or h), min(w, stage.cfg.tile or w)
        div = int(getattr(stage._model, "size_divisor", 16))
        return (1, 3, -(-h // div) * div, -(-w // div) * div), 1
    if stage_name == "score":
        return (len(stage.boxes), 3, stage.crop, stage.crop), 2
    return (1, 3, stage.size, stage.size), 1


def _network(stage_name: str, stage):
    return stage._models[0] if stage_name == "enhance" else stage._model


def ceiling(stage_name: str, stage, item, device: torch.device, reps: int) -> tuple[float, float]:
    """(seconds per forward pass of the stage's network on a synthetic tensor of the shape it is fed, the
    pass's GFLOP as ``torch.utils.flop_counter`` counts them: 2 per multiply-add of the convolutions, matrix
    products and attention; element-wise work, normalisation and grid sampling are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    shape, args = _shape(stage_name, stage, item)
    model = _network(stage_name, stage)
    xs = [torch.rand(*shape, device=device) for _ in range(args)]
    with torch.inference_mode():
        fn = (lambda: model.forward_with_identity(*xs)) if stage_name == "score" and stage.cfg.input_score else (lambda: model(*xs))
        with FlopCounterMode(display=False) as counter:
            fn()
        return timed(fn, reps, device), counter.get_total_flops() / 1e9


def matmul_gflop_per_s(device: torch.device, reps: int, n: int = 2048) -> float:
    """The device's float32 rate on a large square matrix product (the practical peak a network could reach)."""
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    return round(2 * n**3 / timed(lambda: a @ b, max(reps, 3), device) / 1e9, 1)


def compiled(name: str, make, stage, images: dict, item, device: torch.device, reps: int) -> dict:
    """``--compile``: the stage's network under ``torch.compile`` (a second stage built with ``compile=True``):
    the first call's seconds (compilation included), the compiled forward pass against the uncompiled
    ``ceiling``, the largest difference of their outputs on the same synthetic input, and the stage's
    per-item seconds compiled."""
    cstage = make(compile=True)
    citem = prepare_item(cstage, "x", images)
    t = time.perf_counter()
    cstage.compute(citem)
    sync(device)
    first = time.perf_counter() - t
    eager = ceiling(name, stage, item, device, reps)
    comp = ceiling(name, cstage, citem, device, reps)
    g = torch.Generator().manual_seed(0)
    model, cmodel = _network(name, stage), _network(name, cstage)
    shape, args = _shape(name, stage, item)
    xs = [torch.rand(*shape, generator=g).to(device) for _ in range(args)]
    with torch.inference_mode():
        call = (lambda m: m.forward_with_identity(*xs)) if name == "score" and stage.cfg.input_score else (lambda m: m(*xs))
        a, b = call(model), call(cmodel)
    a, b = (torch.cat([t.flatten() for t in v]) if isinstance(v, (tuple, list)) else v for v in (a, b))
    return {
        "first_call_s": round(first, 2),
        "ceiling_images_per_s": round(1 / comp, 3),
        "speedup_over_uncompiled": round(eager / comp, 3),
        "stage_images_per_s": round(1 / timed(lambda: cstage.compute(citem), reps, device), 3),
        "max_abs_output_difference": float((a.float() - b.float()).abs().max()),
    }


def batched(name: str, stage, item, device: torch.device, reps: int, batch: int, precisions: list[str]) -> dict:
    """images/s of ``batch`` copies of ``item`` through ``compute_batch``, per precision."""
    from fundus_pipeline.device import autocast

    out = {}
    for p in precisions:
        with autocast(device, p):
            out[p] = round(batch / timed(lambda: stage.compute_batch([item] * batch), max(1, reps // 4), device), 3)
    return out


def agreement(name: str, stage, device: torch.device, precisions: list[str], n: int) -> dict:
    """What each low precision changes in the figures that matter (see the module docstring)."""
    import numpy as np

    from fundus_pipeline.device import autocast
    from fundus_pipeline.io import read_image

    from fundus_pipeline.datasets import DRIVE_VAL, drive_paths

    data = default_data_root()
    photos = [drive_paths(data, ident) for ident in DRIVE_VAL[:n]]  # validation, not test: a precision is chosen on it
    if not all(p["image"].is_file() and p["vessels"].is_file() for p in photos):
        return {"skipped": "DRIVE not present"}
    res: dict = {"photographs": [p["image"].name for p in photos]}
    if name == "segment":
        for p in precisions:
            tp = fp = fn = 0
            for paths in photos:
                item = prepare_item(stage, paths["image"].stem, {"image": decode(paths["image"])})
                with autocast(device, p):
                    out = stage.compute(item)
                pred = out.images_now()["_vessels"] > 0
                gt, _ = read_image(paths["vessels"])
                gt = (gt if gt.ndim == 2 else gt[..., 0]) > 127
                fov = item.fov.mask
                tp += int((pred & gt & fov).sum())
                fp += int((pred & ~gt & fov).sum())
                fn += int((~pred & gt & fov).sum())
            res[p] = {"vessel_f1": round(2 * tp / (2 * tp + fp + fn), 5)}
        for p in precisions[1:]:
            res[p]["f1_change"] = round(res[p]["vessel_f1"] - res["fp32"]["vessel_f1"], 5)
            res[p]["within_tolerance"] = abs(res[p]["f1_change"]) <= 0.002
    elif name == "enhance":
        from fundus_pipeline.config import DegradeConfig
        from fundus_pipeline.stages.base import Image as Img
        from fundus_pipeline.stages.degrade import DegradeStage

        degrader = DegradeStage(DegradeConfig.build(types="111", seed=0))
        pairs = []
        for paths in photos:
            clean, stem = decode(paths["image"]), paths["image"].stem
            low = degrader.compute(prepare_item(degrader, stem, {"image": clean})).images_now()[""]
            pairs.append((clean, prepare_item(stage, stem, {"image": Img(low, clean.meta)})))
        for p in precisions:
            vals = []
            for clean, item in pairs:
                with autocast(device, p):
                    out = stage.compute(item).images_now()[""]
                m = item.fov.mask
                mse = float(np.mean((out[m].astype(np.float64) / 255 - clean.rgb[m]) ** 2))
                vals.append(10 * np.log10(1 / max(mse, 1e-12)))
            res[p] = {"psnr_db": round(float(np.mean(vals)), 4)}
        for p in precisions[1:]:
            res[p]["psnr_change_db"] = round(res[p]["psnr_db"] - res["fp32"]["psnr_db"], 4)
            res[p]["within_tolerance"] = abs(res[p]["psnr_change_db"]) <= 0.05
    else:
        return {"skipped": "no task figure for this stage (scores and grades are compared in `batched` only)"}
    return res


def fed(stage, path: Path, n: int, decoders: int, tmp: Path) -> dict:
    """The runner end to end over ``n`` copies of ``path``, one model fed by ``decoders`` processes; and over two
    copies (the fewest that take the fed path), whose wall time is mostly the start-up (spawning the decoders,
    their imports): ``steady_images_per_s`` = (n - 2) / (wall(n) - wall(2)) leaves it out."""
    import os
    import shutil

    import cv2

    from fundus_pipeline.runner import run_stage

    def one_run(k: int, sample: bool) -> tuple[float, dict, dict | None]:
        src = tmp / f"fed_in_{path.stem}_{k}"
        src.mkdir(exist_ok=True)
        for i in range(k):
            dst = src / f"p{i:04d}{path.suffix}"
            if not dst.exists():
                os.link(path, dst)
        out = tmp / f"fed_out_{path.stem}"
        shutil.rmtree(out, ignore_errors=True)
        sampler = Utilisation(getattr(stage, "device", torch.device("cpu")))
        threads = (torch.get_num_threads(), cv2.getNumThreads())  # run_fed sets this process's threads: restored after
        t = time.perf_counter()
        try:
            with sampler:
                res = run_stage(stage, src, out, workers=decoders, progress=False, feed=True, threads=threads[0])
        finally:
            torch.set_num_threads(threads[0])
            cv2.setNumThreads(threads[1])
        wall = time.perf_counter() - t
        shutil.rmtree(out, ignore_errors=True)
        return wall, res.counts, sampler.result() if sample else None

    wall2, _, _ = one_run(2, False)
    wall, counts, util = one_run(n, True)
    steady = round((n - 2) / (wall - wall2), 3) if n > 2 and wall > wall2 else None
    return {"photographs": n, "decoders": decoders, "batch": stage.batch_size, "ok": counts.get("ok", 0), "images_per_s": round(n / wall, 3),
            "two_photographs_s": round(wall2, 2), "steady_images_per_s": steady, "gpu_utilisation": util,
            "note": "images_per_s includes the start-up; steady_images_per_s = (n - 2) / (wall(n) - wall(2)) does not (GPU utilisation is sampled over the whole n-photograph run)"}


class Utilisation:
    """The GPU's utilisation (percent of time a kernel ran, from NVML through ``torch.cuda.utilization``)
    sampled every 0.2 s while the ``with`` block runs: mean and samples, or why it is unavailable."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self.why = device, [], None
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self.samples.append(int(torch.cuda.utilization(self.device)))
            except Exception as e:  # no NVML (pip install nvidia-ml-py), or not a CUDA device
                self.why = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                return

    def __enter__(self) -> "Utilisation":
        if self.device.type == "cuda":
            self._thread.start()
        else:
            self.why = "not a GPU"
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def result(self) -> dict | str:
        if self.samples:
            return {"mean_percent": round(sum(self.samples) / len(self.samples), 1), "samples": len(self.samples)}
        return self.why or "no sample (the run was shorter than 0.2 s)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reps", type=count(0), default=0, help="timed passes (default: 20 on CUDA, 3 on CPU)")
    ap.add_argument("--sizes", type=sides, default="drive,1024")
    ap.add_argument("--batch", type=count(0), default=0, help="photographs per batch (default: 8 on CUDA, 2 on CPU)")
    ap.add_argument("--precisions", default="", help="default: fp32,bf16,fp16 on CUDA, fp32,bf16 on CPU")
    ap.add_argument("--agree", type=count(0), default=0, help="validation photographs (DRIVE 37-40) for the agreement figures, at most 4 (default: 4 on CUDA, 2 on CPU)")
    ap.add_argument("--fed-n", type=count(0), default=0, help="photographs of the fed run (default: 64 on CUDA, 4 on CPU)")
    ap.add_argument("--decoders", type=count(1), default=4)
    ap.add_argument("--only", type=names(("segment", "enhance", "score", "grade")), default="segment,enhance,score,grade")
    ap.add_argument("--compile", action="store_true", help="also measure each network under torch.compile (at the first size)")
    ap.add_argument("--parts", type=names(("batched", "agreement", "fed"), empty=True), default="batched,agreement,fed", help="the optional parts to measure (the stage and its ceiling always are)")
    args = ap.parse_args()
    parts = set(args.parts)
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    reps = args.reps or (20 if gpu else 3)
    batch = args.batch or (8 if gpu else 2)
    precisions = (args.precisions or ("fp32,bf16,fp16" if gpu else "fp32,bf16")).split(",")
    agree_n, fed_n = min(4, args.agree or (4 if gpu else 2)), args.fed_n or (64 if gpu else 4)
    out: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "machine": environment(), "reps": reps, "date": time.strftime("%Y-%m-%d"),
        "matmul_gflop_per_s": matmul_gflop_per_s(device, reps), "stages": {},
    }  # fmt: skip
    dev = str(device)
    stages = {
        "segment": lambda **kw: __import__("fundus_pipeline.stages.segment", fromlist=["x"]).SegmentStage(SegmentConfig(device=dev, **kw)),
        "enhance": lambda **kw: __import__("fundus_pipeline.stages.enhance", fromlist=["x"]).EnhanceStage(EnhanceConfig(device=dev, vessel_stats=False, **kw)),
        "score": lambda **kw: __import__("fundus_pipeline.stages.score", fromlist=["x"]).ScoreStage(ScoreConfig(device=dev, input_score=True, **kw)),
        "grade": lambda **kw: __import__("fundus_pipeline.stages.grade", fromlist=["x"]).GradeStage(GradeConfig(device=dev, **kw)),
    }
    with tempfile.TemporaryDirectory() as tmp:
        photos = {s: photograph(s, Path(tmp)) for s in args.sizes}
        for name, make in stages.items():
            if name not in args.only:
                continue
            stage = make()
            res = {}
            for size, path in photos.items():
                image = decode(path)
                images = {"image": image, "reference": image} if name == "score" else {"image": image}
                item = prepare_item(stage, "x", images)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    resident = torch.cuda.memory_allocated(device)  # weights of this and earlier stages' models
                dec = timed(lambda: decode(path), reps, torch.device("cpu"))
                prep = timed(lambda: prepare_item(stage, "x", images), reps, torch.device("cpu"))
                comp = timed(lambda: stage.compute(item), reps, device)
                ceil, gflop = ceiling(name, stage, item, device, reps)
                if device.type == "cuda":  # one photograph through the stage (and its ceiling), above what was resident
                    stage_peak = (torch.cuda.max_memory_allocated(device) - resident) / 2**20
                    torch.cuda.reset_peak_memory_stats(device)
                whole = dec + prep + comp
                res[size] = {
                    "shape": [image.meta.height, image.meta.width],
                    "stage_images_per_s": round(1 / comp, 3),
                    "with_decode_images_per_s": round(1 / whole, 3),
                    "ceiling_images_per_s": round(1 / ceil, 3),
                    "ceiling_gflop": round(gflop, 2),
                    "ceiling_gflop_per_s": round(gflop / ceil, 1),
                    "ceiling_share_of_matmul_rate": round(gflop / ceil / out["matmul_gflop_per_s"], 3),
                    "stage_share_of_ceiling": round(ceil / comp, 3),
                    "time_share": {"decode": round(dec / whole, 3), "fov_and_inputs": round(prep / whole, 3), "compute": round(comp / whole, 3)},
                    "network_share_of_compute": round(min(1.0, ceil / comp), 3),
                }
                if ceil > comp:  # a stage faster than its own network: timing noise, said rather than published as a share above 1
                    res[size]["note"] = f"the stage ran faster than its ceiling ({comp:.3f} s < {ceil:.3f} s): timing noise at {reps} repetitions; raise --reps"
                if "batched" in parts:
                    res[size]["batched_images_per_s"] = batched(name, stage, item, device, reps, batch, precisions)
                if device.type == "cuda":
                    res[size]["peak_device_memory_mb"] = {
                        "one_photograph": round(stage_peak, 1),
                        f"batched_{batch}": round((torch.cuda.max_memory_allocated(device) - resident) / 2**20, 1),
                        "resident_weights_before": round(resident / 2**20, 1),
                        "note": "peaks above the memory already allocated when the size's measurement began (the models of this and earlier stages)",
                    }
                if args.compile and size == args.sizes[0]:
                    res[size]["compiled"] = compiled(name, make, stage, images, item, device, reps)
            if "agreement" in parts:
                res["agreement"] = agreement(name, stage, device, precisions, agree_n)
            if name != "score" and "fed" in parts:  # the scorer pairs two folders: its fed figure is the chain's (benchmarks/run.py)
                stage.batch_size = batch
                res["fed"] = fed(stage, photos[args.sizes[0]], fed_n, args.decoders, Path(tmp))
            out["stages"][name] = res
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["targets"] = {
        "segment_images_per_s_at_512_working_resolution": ">= 100 on one data-centre GPU",
        "whole_chain_photographs_per_s": ">= 25 (benchmarks/run.py on the GPU)",
        "stage_share_of_ceiling": ">= 0.70",
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    from fundus_pipeline.errors import run_script

    run_script(main)
