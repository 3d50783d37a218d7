"""Train a vessel segmenter on DRIVE 21-40 + the HRF training split (see fundus_pipeline.datasets).

Patch training: each step draws ``batch`` patches; a patch is a random rotation (0-360 deg), scale
(0.75-1.33) and flip of a window centred inside the FOV, followed by colour, gamma, blur and noise
jitter and, with ``--degrade-p``, a pre-computed whole-image degradation from the ``degradation``
library (Cofe-Net released/training presets and the clinical recipes), so the model learns to see
vessels in poor photographs. Loss: BCE + soft Dice inside the FOV (plus deep supervision and edge
BCE for models that provide them). Adam with cosine decay. Every ``--val-every`` steps the whole
validation images are segmented at the working scale; the checkpoint with the best validation F1 (at
its best threshold) is kept, and that threshold is the model's a-priori decision threshold.
Checkpoints (``last.pt``) are written every ``--ckpt-every`` steps and ``--resume`` continues from one.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from fundus_pipeline.device import resolve_device
from fundus_pipeline.datasets import Sample, default_data_root, training_sets
from fundus_pipeline.metrics import pooled_f1_curve
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.segmentation import predict_logits, sigmoid


def _affine_patch(sample_arrays, rng: np.random.Generator, patch: int, fov: np.ndarray, fov_pts: np.ndarray):
    """Random rotation/scale/flip patch centred on a random FOV pixel."""
    cy, cx = fov_pts[rng.integers(len(fov_pts))]
    angle = rng.uniform(0, 360)
    scale = math.exp(rng.uniform(math.log(0.75), math.log(1.33)))
    m = cv2.getRotationMatrix2D((float(cx), float(cy)), angle, scale)
    m[0, 2] += patch / 2 - cx
    m[1, 2] += patch / 2 - cy
    out = []
    for arr, interp in sample_arrays:
        out.append(cv2.warpAffine(arr, m, (patch, patch), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=0))
    if rng.random() < 0.5:
        out = [o[:, ::-1] for o in out]
    return out


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = img * rng.uniform(0.7, 1.3)  # brightness
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.7, 1.3) + mean  # contrast
    grey = img.mean(axis=2, keepdims=True)
    img = (img - grey) * rng.uniform(0.7, 1.3) + grey  # saturation
    img = np.clip(img, 0, 1) ** rng.uniform(0.7, 1.4)  # gamma
    if rng.random() < 0.2:
        s = rng.uniform(0.3, 1.2)
        img = cv2.GaussianBlur(img, (0, 0), s)
    if rng.random() < 0.2:
        img = img + rng.normal(0, rng.uniform(0.005, 0.03), img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


class PatchSampler:
    def __init__(self, samples: list[Sample], patch: int, seed: int, degraded: dict[str, list[np.ndarray]] | None, degrade_p: float):
        self.samples = samples
        self.patch = patch
        self.degraded = degraded or {}
        self.degrade_p = degrade_p
        self.fov_pts = [np.argwhere(s.fov) for s in samples]
        self.by_dataset: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            self.by_dataset.setdefault(s.name.split("/")[0], []).append(i)
        self.seed = seed

    def batch(self, step: int, batch: int):
        rng = np.random.default_rng([self.seed, step])
        xs, ys, ms = [], [], []
        datasets = sorted(self.by_dataset)
        for _ in range(batch):
            ds = datasets[rng.integers(len(datasets))]  # balance the datasets
            i = self.by_dataset[ds][rng.integers(len(self.by_dataset[ds]))]
            s = self.samples[i]
            rgb = s.rgb
            pool = self.degraded.get(s.name)
            if pool and rng.random() < self.degrade_p:
                rgb = pool[rng.integers(len(pool))]
            img, ves, fov = _affine_patch(
                [(rgb, cv2.INTER_LINEAR), (s.vessels, cv2.INTER_LINEAR), (s.fov.astype(np.uint8), cv2.INTER_NEAREST)],
                rng,
                self.patch,
                s.fov,
                self.fov_pts[i],
            )
            xs.append(_photometric(np.ascontiguousarray(img), rng).transpose(2, 0, 1))
            ys.append(np.ascontiguousarray(ves)[None])
            ms.append(np.ascontiguousarray(fov)[None].astype(np.float32))
        return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), torch.from_numpy(np.stack(ms)))


def seg_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (bce * mask).sum() / mask.sum().clamp_min(1.0)
    p = torch.sigmoid(logits) * mask
    t = target * mask
    dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    return bce + dice


def edge_target(target: torch.Tensor) -> torch.Tensor:
    t = (target.detach().cpu().numpy() > 0.5).astype(np.uint8) * 255
    edges = np.stack([cv2.Canny(t[i, 0], 10, 100)[None] for i in range(t.shape[0])]).astype(np.float32) / 255.0
    return torch.from_numpy(edges).to(target.device)


def total_loss(out: dict, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    main_w = 2.0 if out.get("aux") else 1.0
    loss = main_w * seg_loss(out["logits"], y, m)
    for aux, w in out.get("aux") or []:
        loss = loss + w * seg_loss(aux, y, m)
    if out.get("edge") is not None:
        e = F.binary_cross_entropy_with_logits(out["edge"], edge_target(y), reduction="none")
        loss = loss + (e * m).sum() / m.sum().clamp_min(1.0)
    return loss


def f1_curve(probs: list[np.ndarray], gts: list[np.ndarray], fovs: list[np.ndarray]):
    """(best pooled F1 over thresholds 0.01..0.989, its threshold, pooled AUC-ROC), inside the FOV."""
    thr, f1, auc = pooled_f1_curve(probs, gts, fovs)
    k = int(np.argmax(f1[10:990])) + 10
    return float(f1[k]), float(thr[k]), auc


def validate(model, val: list[Sample], device) -> dict:
    model.eval()
    probs = [sigmoid(predict_logits(model, s.rgb, device=device, tile=512, overlap=64)) for s in val]
    model.train()
    out = {}
    for ds in sorted({s.name.split("/")[0] for s in val}):
        idx = [i for i, s in enumerate(val) if s.name.startswith(ds + "/")]
        f1, thr, auc = f1_curve([probs[i] for i in idx], [val[i].vessels for i in idx], [val[i].fov for i in idx])
        out[ds] = {"f1": f1, "threshold": thr, "auc_roc": auc}
    f1, thr, auc = f1_curve(probs, [s.vessels for s in val], [s.fov for s in val])
    out["all"] = {"f1": f1, "threshold": thr, "auc_roc": auc}
    return out


def build_degraded_pool(samples: list[Sample], per_image: int, seed: int) -> dict[str, list[np.ndarray]]:
    """Whole-image degraded copies of each training image (Cofe-Net presets + clinical recipes)."""
    from degradation import cofe_degrader, load_recipe, soft_fov_mask
    from degradation.fov import fov_geometry

    makers = [
        lambda: cofe_degrader(preset="released", code="111"),
        lambda: cofe_degrader(preset="training", code="111"),
        lambda: load_recipe("mild"),
        lambda: load_recipe("moderate"),
        lambda: load_recipe("severe"),
    ]
    pool: dict[str, list[np.ndarray]] = {}
    for s in samples:
        geom = fov_geometry(s.fov)
        soft = soft_fov_mask(s.fov, geom)
        copies = []
        for k in range(per_image):
            d = makers[k % len(makers)]()
            params = d.sample(seed=seed, key=f"{s.name}#{k}", fov=geom)
            copies.append(d.apply(s.rgb, params, soft, levels=255).astype(np.float32))
        pool[s.name] = copies
    return pool


def _check_args(args) -> tuple[torch.device, Path]:
    """Refuse bad arguments before any data is loaded (UsageError, exit code 2); (device, data root)."""
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.models.registry import get_entry

    get_entry(args.arch)  # unknown names: a one-line error with suggestions
    for name in ("steps", "batch_size", "val_every", "ckpt_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.patch < 16:
        raise UsageError(f"--patch must be at least 16 pixels, got {args.patch}")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")
    if not 0.0 <= args.degrade_p <= 1.0:
        raise UsageError(f"--degrade-p must be between 0 and 1, got {args.degrade_p}")
    if args.init is not None and not args.init.is_file():
        raise UsageError(f"--init {args.init}: no such weights file")
    if args.resume and args.init is not None:
        raise UsageError("--resume continues OUT/last.pt; it cannot be combined with --init")
    if args.resume and not (args.out / "last.pt").is_file():
        raise UsageError(f"--resume: {args.out / 'last.pt'} does not exist (start without --resume)")
    if not args.resume and any((args.out / f).exists() for f in ("last.pt", "best.pt")):
        raise UsageError(f"{args.out} already holds a training run; pass --resume to continue it or choose a new --out")
    device = resolve_device(args.device)  # invalid names and CUDA requests without a GPU
    root = args.data or default_data_root()
    missing = [d for d in ("DRIVE", "HRF") if not (root / d).is_dir()]
    if missing:
        raise UsageError(f"dataset root {root} lacks {' and '.join(d + '/' for d in missing)} (pass --data or set FUNDUS_DATA)")
    return device, root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fundus train segment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="imff", help="registered model name (imff, imff_w8, msrf, ...)")
    ap.add_argument("--data", type=Path, default=None, help="dataset root holding DRIVE/ and HRF/ (default ../shared/data)")
    ap.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log, best weights)")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--device", default="auto", help="auto|cpu|cuda")
    ap.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    ap.add_argument("--degrade-p", type=float, default=0.0, help="probability of drawing a patch from a degraded copy")
    ap.add_argument("--degrade-copies", type=int, default=5, help="degraded copies per training image")
    ap.add_argument("--init", type=Path, default=None, help="start from these weights (state dict) instead of random init")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    args = ap.parse_args(argv)
    device, root = _check_args(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "train.log", "a", buffering=1)

    def say(msg: str):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, file=log)
        print(line, file=sys.stderr, flush=True)

    train, val = training_sets(root)
    say(f"train {len(train)} images, val {[s.name for s in val]}, device {device}")
    if args.amp and device.type != "cuda":
        say("--amp has an effect on CUDA only; training in float32")
    degraded = build_degraded_pool(train, args.degrade_copies, args.seed) if args.degrade_p > 0 else None
    sampler = PatchSampler(train, args.patch, args.seed, degraded, args.degrade_p)

    model = build_model(args.arch).to(device)
    if args.init:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)) * 0.98 + 0.02)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    step, best = 0, {"f1": -1.0}
    if args.resume:
        ck = torch.load(args.out / "last.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        step, best = ck["step"], json.loads(ck["best"])
        say(f"resumed at step {step}, best {best}")

    def checkpoint():
        tmp = args.out / "last.pt.tmp"
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step, "best": json.dumps(best)}, tmp)
        tmp.replace(args.out / "last.pt")

    model.train()
    t0, run_loss = time.time(), 0.0
    while step < args.steps:
        x, y, m = (t.to(device) for t in sampler.batch(step, args.batch_size))
        with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp and device.type == "cuda"):
            out = model.forward_train(x)
        out = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
        if out.get("aux"):
            out["aux"] = [(a.float(), w) for a, w in out["aux"]]
        loss = total_loss(out, y, m)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        run_loss += loss.item()
        if step % 50 == 0:
            say(f"step {step} loss {run_loss / 50:.4f} lr {sched.get_last_lr()[0]:.2e} {(time.time() - t0) / 50:.2f}s/step")
            run_loss, t0 = 0.0, time.time()
        if step % args.val_every == 0 or step == args.steps:
            v = validate(model, val, device)
            say(f"val step {step}: {json.dumps(v)}")
            if v["all"]["f1"] > best["f1"]:
                best = {"step": step, **v["all"], "per_dataset": {k: v[k] for k in v if k != "all"}}
                tmp = args.out / "best.pt.tmp"
                torch.save(model.state_dict(), tmp)
                tmp.replace(args.out / "best.pt")
                say(f"new best {best}")
        if step % args.ckpt_every == 0 or step == args.steps:
            checkpoint()
    info = {
        "arch": args.arch,
        "argv": sys.argv if argv is None else ["fundus", "train", "segment", *argv],
        "steps": args.steps,
        "seed": args.seed,
        "best": best,
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    (args.out / "summary.json").write_text(json.dumps(info, indent=2))
    say(f"done: {json.dumps(best)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
