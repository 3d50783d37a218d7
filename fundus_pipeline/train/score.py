"""Training of the quality scorer, two tasks on the shared loop (``fundus_pipeline.train.loop``).

``fundus train pretext``: the ViT stream of SDMP-Net (``vit_fundus``), trained from scratch with a
self-supervised pretext task that needs no human label. The clean training sources of ``fundus train
enhance`` (DRIVE 21-40, HRF 01-05, HEI-MED; the same validation sources held out) are degraded by the
``degradation`` library, ``--pool-draws`` times each (released and training-time Cofe-Net types and the
clinical recipes, parameters drawn from (seed, source, draw)), in the 448 scoring frame. A training sample
is a random 224 crop of a degraded frame (or, with probability ``--clean-p``, of the clean one), rotated by
a multiple of 90 degrees and flipped. Targets (``PRETEXT_TARGETS``): which of the 13 simulated operations
were applied to the photograph (binary cross-entropy), whether none was (clean), and the crop's
severity: PSNR / 50 and SSIM of the degraded crop against its clean crop inside the FOV (mean squared
error). Validation: the held-out sources, each degraded three times with fixed seeds and left clean once,
on the centre crop; best.pt by the negative validation loss.

``fundus train score``: SDMP-Net (``sdmp`` and its ablations) on the ``train`` split of a quality set
(``fundus build quality-set``); its frozen streams are loaded first: the CNN stream from the shipped
segmenter (``--cnn-init``, default ``imff``), the ViT stream from the pretext weights (``--vit-init``).
A sample is a pair (enhanced, degraded reference) in the 448 scoring frame, one random 224 crop at the same
place in both, the same rotation and flip; the loss is the mean squared error to the pair's label.
Validation: the ``val`` split of the set (held-out training sources), the test-time five-crop mean;
best.pt by SROCC.
"""

from __future__ import annotations

import csv
import math
import zlib
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fundus_pipeline.models.registry import build_model
from fundus_pipeline.quality.grading import CLINICAL_OPS, COFE_OPS, applied_ops
from fundus_pipeline.quality.scoring import CROP, SCORE_SIZE, crop_boxes, predict_pair
from fundus_pipeline.train.config import PretextConfig, ScoreConfig
from fundus_pipeline.train.loop import Batch, Task, fit

PRETEXT_TARGETS = (*(f"cofe_{o}" for o in COFE_OPS), *CLINICAL_OPS, "clean", "psnr_over_50", "ssim")
N_BINARY = len(COFE_OPS) + len(CLINICAL_OPS) + 1


def _orient(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    a = np.rot90(a, k, axes=(0, 1))
    return np.ascontiguousarray(a[:, ::-1] if flip else a)


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return a if a.shape[0] == size else cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA)


def severity(deg: np.ndarray, clean: np.ndarray, fov: np.ndarray) -> tuple[float, float]:
    """(PSNR / 50 capped at 1, SSIM) of a degraded crop against its clean crop inside ``fov`` ((1, 1) when empty)."""
    from fundus_pipeline.evaluation.image_metrics import ssim

    if not fov.any():
        return 1.0, 1.0
    mse = float(((deg - clean) ** 2)[fov].mean())
    psnr = 10 * np.log10(1.0 / max(mse, 1e-10))
    return min(psnr / 50.0, 1.0), float(ssim(deg, clean, fov))


# ------------------------------------------------------------------------------------------------ pretext
class PretextPool:
    """Clean sources and their degraded copies in the scoring frame (uint8), with the binary targets."""

    def __init__(self, sources, draws: int, seed: int, size: int, tag: str):
        from fundus_pipeline.train.enhance import DegradationPool, degrade_with_params

        pool = DegradationPool()
        self.clean: list[np.ndarray] = []
        self.fov: list[np.ndarray] = []
        self.items: list[tuple[int, np.ndarray, np.ndarray]] = []  # (source index, degraded frame, targets)
        for i, s in enumerate(sources):
            self.clean.append(_q(_resize(s.rgb, size)))
            self.fov.append(_resize(s.fov.astype(np.uint8), size) > 0)
            for d in range(draws):
                rng = np.random.default_rng([seed, i, d, zlib.crc32(tag.encode())])
                deg, params = degrade_with_params(pool.draw(rng), s.rgb, s.fov, seed, f"{tag}/{s.name}/{d}")
                self.items.append((i, _q(_resize(deg, size)), applied_ops(params)))


def _q(rgb: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def pretext_sample(clean: np.ndarray, deg: np.ndarray, fov: np.ndarray, ops: np.ndarray, y: int, x: int, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """(crop of ``deg`` as float32, the 16 targets) for the crop at (y, x)."""
    sl = (slice(y, y + crop), slice(x, x + crop))
    d = deg[sl].astype(np.float32) / 255
    c = clean[sl].astype(np.float32) / 255
    p, s = severity(d, c, fov[sl])
    return d, np.concatenate([ops, np.array([p, s], np.float32)])


class PretextSampler:
    def __init__(self, pool: PretextPool, cfg: PretextConfig):
        self.pool, self.cfg = pool, cfg

    def batch(self, step: int) -> Batch:
        cfg, pool = self.cfg, self.pool
        rng = np.random.default_rng([cfg.seed, step])
        xs, ts = [], []
        for _ in range(cfg.batch_size):
            i, deg, ops = pool.items[int(rng.integers(len(pool.items)))]
            clean, fov = pool.clean[i], pool.fov[i]
            if rng.random() < cfg.clean_p:
                deg, ops = clean, applied_ops(None)
            k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
            n = cfg.size - cfg.crop
            y, x = int(rng.integers(n + 1)), int(rng.integers(n + 1))
            d, t = pretext_sample(_orient(clean, k, flip), _orient(deg, k, flip), _orient(fov, k, flip), ops, y, x, cfg.crop)
            xs.append(d)
            ts.append(t)
        return torch.from_numpy(np.stack(xs).transpose(0, 3, 1, 2).copy()), torch.from_numpy(np.stack(ts))


def pretext_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE on the binary targets plus 10 x MSE on the two severities (sigmoid outputs)."""
    bce = F.binary_cross_entropy_with_logits(logits[:, :N_BINARY], target[:, :N_BINARY])
    mse = F.mse_loss(torch.sigmoid(logits[:, N_BINARY:]), target[:, N_BINARY:])
    return bce + 10.0 * mse


PRETEXT_VAL_SEED = 1  # the validation degradations: fixed (they were drawn from --seed + 1, i.e. 1 for the shipped vit_fundus run), so runs with different seeds are compared on the same crops


class PretextTask(Task):
    """The ViT stream's pretext task; best.pt by the negative validation loss."""

    name = "pretext"
    score_key = "neg_loss"
    cfg: PretextConfig

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.arch, n_outputs=len(PRETEXT_TARGETS))

    def setup(self, log: Callable[[str], None]) -> None:
        from fundus_pipeline.train.enhance import prepare_sources, resolve_segmenter, split_sources

        cfg = self.cfg
        sources = prepare_sources(cfg.data_root, 512, resolve_segmenter(), cfg.cache_path, log)
        train, val = split_sources(sources)
        log(f"pretext: degrading {len(train)} training sources x {cfg.pool_draws} and {len(val)} validation sources x 3")
        self.sampler = PretextSampler(PretextPool(train, cfg.pool_draws, cfg.seed, cfg.size, "train"), cfg)
        vpool = PretextPool(val, 3, PRETEXT_VAL_SEED, cfg.size, "val")
        c = (cfg.size - cfg.crop) // 2
        items = [(vpool.clean[i], deg, vpool.fov[i], ops) for i, deg, ops in vpool.items]
        items += [(cl, cl, fv, applied_ops(None)) for cl, fv in zip(vpool.clean, vpool.fov)]
        pairs = [pretext_sample(cl, deg, fv, ops, c, c, cfg.crop) for cl, deg, fv, ops in items]
        self.val_x = torch.from_numpy(np.stack([p[0] for p in pairs]).transpose(0, 3, 1, 2).copy())
        self.val_t = torch.from_numpy(np.stack([p[1] for p in pairs]))
        log(f"pretext validation: {len(pairs)} centre crops")

    def forward(self, model: nn.Module, batch: Batch):
        return model(batch[0])

    def loss(self, out: torch.Tensor, batch: Batch) -> torch.Tensor:
        return pretext_loss(out, batch[1])

    def validate(self, model: nn.Module, device: torch.device) -> dict:
        logits = torch.cat([model(self.val_x[i : i + 16].to(device)).float().cpu() for i in range(0, len(self.val_x), 16)])
        t = self.val_t
        loss = float(pretext_loss(logits, t))
        acc = float(((logits[:, :N_BINARY] > 0).float() == t[:, :N_BINARY]).float().mean())
        sev = (torch.sigmoid(logits[:, N_BINARY:]) - t[:, N_BINARY:]).abs().mean(0)
        return {"neg_loss": round(-loss, 5), "bit_accuracy": round(acc, 4), "psnr_mae_db": round(float(sev[0]) * 50, 3), "ssim_mae": round(float(sev[1]), 4)}

    def summary(self) -> dict:
        return {**super().summary(), "targets": list(PRETEXT_TARGETS)}


def train_pretext(cfg: PretextConfig) -> dict:
    return fit(PretextTask(cfg), cfg)


# ------------------------------------------------------------------------------------------------- score
def read_pairs(set_dir: Path, split: str) -> list[dict]:
    """The pairs of one split (``train``, ``val`` or ``test``) of a quality set's pairs.csv (``UsageError``
    for a folder without one)."""
    if not (Path(set_dir) / "pairs.csv").is_file():
        from fundus_pipeline.errors import UsageError

        raise UsageError(f"{set_dir} is not a quality set (no pairs.csv)", "build one with `fundus build quality-set`")
    from fundus_pipeline.errors import UsageError

    path = Path(set_dir) / "pairs.csv"
    rows = []
    with open(path, newline="") as f:
        for n, r in enumerate(csv.DictReader(f), start=2):
            if r.get("split") != split:
                continue
            try:
                if not all(math.isfinite(float(r[c])) for c in ("label", "deg_label")):
                    raise ValueError("not finite")
            except (KeyError, TypeError, ValueError) as e:
                raise UsageError(f"{path} line {n}: not a quality set's row (label and deg_label must be numbers; {type(e).__name__}: {e})",
                                 "rebuild it with `fundus build quality-set`") from None
            rows.append(r)
    return rows


class PairReader:
    """Reads a pair's images from the set as scoring frames (uint8), caching the shared degraded ones."""

    def __init__(self, set_dir: Path, size: int):
        self.set_dir, self.size = set_dir, size
        self._refs: dict[str, np.ndarray] = {}

    def _read(self, path: Path) -> np.ndarray:
        from fundus_pipeline.evaluation.enhance import read_rgb

        return _q(_resize(read_rgb(path), self.size))

    def __call__(self, row: dict) -> tuple[np.ndarray, np.ndarray]:
        part = row["part"]
        ref = self._refs.get(row["degraded_key"])
        if ref is None:
            ref = self._refs[row["degraded_key"]] = self._read(self.set_dir / part / "degraded" / f"{row['degraded_key']}.png")
        return self._read(self.set_dir / part / "enhanced" / f"{row['key']}.png"), ref


class ScoreSampler:
    def __init__(self, rows: list[dict], reader: PairReader, cfg: ScoreConfig):
        self.rows, self.reader, self.cfg = rows, reader, cfg

    def batch(self, step: int) -> Batch:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        es, rs, ls, ds = [], [], [], []
        for _ in range(cfg.batch_size):
            row = self.rows[int(rng.integers(len(self.rows)))]
            e, r = self.reader(row)
            k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
            n = cfg.size - CROP
            y, x = int(rng.integers(n + 1)), int(rng.integers(n + 1))
            sl = (slice(y, y + CROP), slice(x, x + CROP))
            es.append(_orient(e, k, flip)[sl])
            rs.append(_orient(r, k, flip)[sl])
            ls.append(float(row["label"]))
            ds.append(float(row["deg_label"]))

        def t(a: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.stack(a).transpose(0, 3, 1, 2).astype(np.float32) / 255)

        return t(es), t(rs), torch.tensor(ls, dtype=torch.float32), torch.tensor(ds, dtype=torch.float32)


def load_streams(model: nn.Module, cnn_init: str | None, vit_init: str | None) -> None:
    """Load the frozen streams of an SDMP model: the CNN stream from segmenter weights (their e1-e3 keys),
    the ViT stream from pretext weights (each a shipped name or a file; None: left random)."""
    from fundus_pipeline.models.weights import load_state_dict, resolve_weights

    from fundus_pipeline.errors import WeightsError

    cnn = load_state_dict(resolve_weights(cnn_init)) if cnn_init and getattr(model, "cnn", None) is not None else None
    vit = load_state_dict(resolve_weights(vit_init)) if vit_init and getattr(model, "vit", None) is not None else None
    for option, name, states in (("--cnn-init", cnn_init, (cnn, None)), ("--vit-init", vit_init, (None, vit))):
        if states == (None, None):
            continue
        try:  # one stream at a time: the error names the option whose weights do not fit (campaign 30a L5)
            model.load_streams(*states)
        except RuntimeError as e:  # weights of another width or kind: one line naming the option (was an internal error)
            raise WeightsError(f"{option} ({name}): the weights do not fit this architecture's frozen stream ({str(e).splitlines()[0]})",
                               f"pass weights of the matching width (see `fundus models`), or {option} none") from None


MIN_CAMERA_PAIRS = 3  # fewer pairs of a camera give no per-camera validation SROCC


class ScoreTask(Task):
    """SDMP-Net on a quality set; best.pt by the validation SROCC, or with ``--select srocc_camera_mean`` by
    the mean of the per-camera validation SROCCs."""

    name = "score"
    score_key = "srocc"  # or "srocc_camera_mean" (--select), set per run in __init__
    cfg: ScoreConfig

    def __init__(self, cfg: ScoreConfig):
        super().__init__(cfg)
        self.score_key = cfg.select

    def build_model(self) -> nn.Module:
        model = build_model(self.cfg.arch)
        if self.cfg.init is None and not self.cfg.resume:
            load_streams(model, self.cfg.cnn_init, self.cfg.vit_init)
        return model

    def setup(self, log: Callable[[str], None]) -> None:
        cfg = self.cfg
        train, val = read_pairs(cfg.quality_set, "train"), read_pairs(cfg.quality_set, "val")
        if not train or not val:
            from fundus_pipeline.errors import UsageError

            raise UsageError(f"{cfg.quality_set}/pairs.csv has {len(train)} train and {len(val)} val pairs; both are needed")
        reader = PairReader(cfg.quality_set, cfg.size)
        self.sampler = ScoreSampler(train, reader, cfg)
        self.val = val[:: cfg.val_stride]
        self.reader = reader
        if cfg.select == "srocc_camera_mean":
            counts = {c: sum(r["dataset"] == c for r in self.val) for c in sorted({r["dataset"] for r in self.val})}
            if min(counts.values()) < MIN_CAMERA_PAIRS:
                from fundus_pipeline.errors import UsageError

                raise UsageError(f"--select srocc_camera_mean needs at least {MIN_CAMERA_PAIRS} validation pairs of each camera, got {counts} (lower --val-stride)")
        log(f"score: {len(train)} training pairs, {len(self.val)} validation pairs (one in {cfg.val_stride} of {len(val)})")

    def forward(self, model: nn.Module, batch: Batch):
        if self.cfg.gain_weight > 0:  # the reference scored against itself too, its features computed once
            return model.forward_with_identity(batch[0], batch[1])
        return model.forward_train(batch[0], batch[1])

    def loss(self, out, batch: Batch) -> torch.Tensor:
        if self.cfg.gain_weight > 0:
            s, s_in = out
            return F.mse_loss(s, batch[2]) + self.cfg.gain_weight * F.mse_loss(s - s_in, batch[2] - batch[3])
        return F.mse_loss(out, batch[2])

    def validate(self, model: nn.Module, device: torch.device) -> dict:
        from fundus_pipeline.evaluation.score import iqa_metrics

        pred, own = predict_frames(model, (self.reader(row) for row in self.val), device, self.cfg.size, identity=True)
        label = np.array([float(row["label"]) for row in self.val])
        m = iqa_metrics(pred, label)
        out = {k: round(float(m[k]), 4) for k in ("srocc", "plcc", "krocc", "rmse")}
        out.update(gate_figures(pred - own, label, np.array([float(row["deg_label"]) for row in self.val]),
                                np.array([row["enhancer"] != "identity" for row in self.val])))
        cameras = np.array([row["dataset"] for row in self.val])
        per = []
        for cam in sorted(set(cameras)):
            sel = cameras == cam
            v = float(iqa_metrics(pred[sel], label[sel])["srocc"]) if sel.sum() >= MIN_CAMERA_PAIRS else None
            out[f"srocc_{cam}"] = None if v is None else round(v, 4)  # None: too few pairs for a rank correlation
            per += [] if v is None else [v]
        out["srocc_camera_mean"] = round(float(np.mean(per)), 4) if per else None
        return out


def predict_frames(model: nn.Module, frames: Iterable[tuple[np.ndarray, np.ndarray]], device, size: int = SCORE_SIZE, *, identity: bool = False):
    """The test-time score of each (enhanced, reference) pair of uint8 scoring frames (``PairReader``'s),
    one pair a forward pass: the trainer's validation protocol (``scripts/validate_score.py`` uses it too).
    With ``identity``: (scores, the references scored against themselves), from the same passes (the
    ``fundus run`` protocol: ``score_input``)."""
    boxes = crop_boxes(size, CROP)
    preds = [predict_pair(model, e.astype(np.float32) / 255, r.astype(np.float32) / 255, device, boxes, identity=identity) for e, r in frames]
    if identity:
        return np.array([p[0][0] for p in preds]), np.array([p[1][0] for p in preds])
    return np.array([p[0] for p in preds])


def gate_figures(gain: np.ndarray, label: np.ndarray, deg_label: np.ndarray, keep: np.ndarray | None = None, t: float = 0.0) -> dict:
    """What ``fundus run``'s trust gate at ``--min-gain t`` delivers over pairs whose labels are known: the
    mean label of the enhanced image where ``gain >= t`` and of the input elsewhere (``gate``), the share
    trusted, the share of decisions the labels agree with, and the rank correlation of the predicted with the
    true gain (``gain_srocc``). ``keep``: the pairs to count (the trainer drops the identity pairs)."""
    from scipy.stats import spearmanr

    if keep is not None:
        gain, label, deg_label = gain[keep], label[keep], deg_label[keep]
    if len(gain) == 0:
        return {"gate": None, "gate_trusted": None, "gate_right": None, "gain_srocc": None}
    trust = gain >= t
    rho = spearmanr(gain, label - deg_label).statistic if len(gain) >= 3 else float("nan")
    return {
        "gate": round(float(np.where(trust, label, deg_label).mean()), 5),
        "gate_trusted": round(float(trust.mean()), 4),
        "gate_right": round(float((trust == (label > deg_label)).mean()), 4),
        "gain_srocc": round(float(rho), 4) if np.isfinite(rho) else None,
    }


def train_score(cfg: ScoreConfig) -> dict:
    return fit(ScoreTask(cfg), cfg)


# --------------------------------------------------------------------------------------- weights export
def _frame_input(size: int) -> dict:
    return {
        "channels": 3,
        "color": "rgb",
        "value_range": [0, 1],
        "normalisation": "none outside the network (RGB divided by the bit depth's maximum; the ViT stream maps x to (x - 0.5) / 0.5 inside)",
        "size_divisor": CROP,
        "scale_policy": {
            "type": "canonical_frame",
            "size": size,
            "rule": "the FOV's bounding square (side = FOV diameter, centred on the FOV, black where it leaves the photograph) resized to size x size, area averaging when shrinking; 224 x 224 crops of it",
        },
    }


def pretext_description(config: dict) -> Callable[[nn.Module], dict]:
    """The manifest fields of pretext (ViT stream) weights, from the run's recorded config."""

    def describe(model: nn.Module) -> dict:
        return {
            "input": _frame_input(int(config["size"])),
            "output": {"kind": "pretext", "targets": list(PRETEXT_TARGETS), "crop": CROP},
            "training": {
                "data": f"clean training sources (DRIVE 21-36, HRF 01-04 of each class, HEI-MED 152 of 169) each degraded {config['pool_draws']} times (released and training-time Cofe-Net types, clinical recipes); random 224 crops; targets: which simulated operations were applied, clean, and the crop's PSNR/50 and SSIM",
                "validation": "DRIVE 37-40, HRF 05_h/05_g/05_dr, every 10th HEI-MED photograph, each degraded 3 times and left clean once, centre crop; best checkpoint by validation loss",
                "test_never_used": "DRIVE 01-20, HRF 06-15",
            },
        }

    return describe


def score_description(config: dict) -> Callable[[nn.Module], dict]:
    """The manifest fields of quality (SDMP-Net) weights, from the run's recorded config."""
    from fundus_pipeline.quality.label import LABEL_DEFINITION
    from fundus_pipeline.quality.scoring import CROPS_RULE

    def describe(model: nn.Module) -> dict:
        return {
            "input": _frame_input(int(config["size"])),
            "output": {
                "kind": "score",
                "range": [0, 1],
                "reference": "the degraded photograph the enhanced photograph was made from",
                "crop": CROP,
                "crops": CROPS_RULE,
                "label": LABEL_DEFINITION,
            },
            "training": {
                "data": f"quality set {Path(config['quality_set']).name}: pairs of its train split (training sources DRIVE 21-36, HRF 01-04, HEI-MED 152); frozen streams: CNN = {config['cnn_init']} encoder, ViT = {config['vit_init']}",
                "validation": "the set's val split (DRIVE 37-40, HRF 05_*, every 10th HEI-MED source), five-crop test-time protocol; best checkpoint by SROCC",
                "test_never_used": "the set's test part (DRIVE 01-20, HRF 06-15)",
            },
        }

    return describe


__all__ = ["PRETEXT_TARGETS", "PretextTask", "ScoreTask", "SCORE_SIZE", "train_pretext", "train_score"]
