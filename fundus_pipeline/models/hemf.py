"""HEMF (He et al., "Hierarchical Enhanced Multi-scale Feature Extraction and Fusion Network for Medical
Image Classification", code Esgjgd/HEMF) as a no-reference fundus quality grader, and a plain CNN
baseline of about the same cost. Built from the digest in seeds.md section 5.1.

Layout (all four stages, output stride 32):
- Local branch: stem Conv4x4 s4 + channels-first LayerNorm, then per stage LN + Conv2x2 s2 downsampling
  (stages 2-4) and ``depths[i]`` ELF blocks (Conv3x3 -> LN -> depthwise Conv3x3 -> pointwise Linear ->
  GELU, plus the shortcut).
- Global branch: its own stem and downsampling, then per stage one EGF block of ``egf_layers`` layers
  ``x <- LN1(x + VRC(x)); x <- LN2(x + Linear(x))`` (LN1 and LN2 shared by the layers). VRC is RMT's
  VisionRetentionChunk: q, k, v, out Linear; k scaled by d^-1/2 (d = dim / heads); RMT's ``theta_shift``
  rotation of q and k (angles ``1 / 10000^linspace(0, 1, d/2)`` repeated twice, applied at the raster
  index of each position); softmax attention along W, then along H, each with the additive Manhattan
  decay mask ``|i - j| * gamma_h``, ``gamma_h = log(1 - 2^(-1 - 3h / heads))``; LePE (a depthwise 5x5
  conv of v) added before ``out_proj``.
- HEF fusion, one block per stage, fed by both branches and the previous HEF output ``f``:
  ``W_l = BN(Conv1x1(l))``, ``W_g = BN(Conv1x1(g))``; with ``f``: ``W_f = AvgPool2(ReLU(BN(Conv1x1(f))))``
  (also the block's shortcut) and ``X_f = GELU(BN(Conv1x1(LN([W_f, W_l, W_g]))))``; at stage 1 no
  shortcut and ``X_f = GELU(BN(Conv1x1(LN([W_l, W_g]))))``. Each branch feature ``t`` is enhanced by
  ``t = LN(t); t = t * MHEA(t); t = LN(t)`` (the same LN twice), then ``t = t * SA(t); t = t * CA(t)``.
  The block returns ``shortcut + SIRMLP(LN([g, l, X_f]))``.
  MHEA: multi-head external attention, ``heads`` heads sharing one Linear d->64 (no bias) and one Linear
  64->d (no bias), softmax over the tokens then renormalised over the 64 memory units, no shortcut,
  N(0, 0.001) init. SA: Conv7x7 (2->1, no bias) of the channel mean and max, sigmoid. CA: shared
  Conv1x1 C -> max(1, C // 16) -> C (no bias, ReLU) of the avg- and max-pooled features, summed, sigmoid.
  SIRMLP: ``r = BN(Conv1x1 3C->C)``; ``BN(GELU(Conv3x3(r)) + r)`` -> Conv1x1 C->4C -> GELU -> Conv1x1
  4C->C -> BN (the 1x1/3x3 convs after ``r`` have no bias).
- Head: global average pool of the stage-4 HEF output -> LayerNorm -> two Linear heads, concatenated:
  ``n_grades`` grade logits (``GRADES``) then ``n_flags`` multi-label flag logits (``FLAGS``).

Departures from the paper's code, all forced or stated:
- Output: two linear heads (grade logits, flag logits) instead of one ``Linear(768, num_classes)``.
- Input: RGB in [0, 1], normalised inside the model to ``(x - 0.5) / 0.5`` (the paper's transform).
  Inputs must be square (MHEA asserts H == W in the paper's code) with a side divisible by 32 (8 times
  the stem patch: 64 for ``hemf_448``).
- ``patch`` (default 4, the paper's): the stems' kernel and stride. ``hemf_448`` uses 8 at a 448 input, so
  the stages run on the same token grids as the 224 model (56, 28, 14, 7) while the stems see the
  photograph at twice the resolution (noise, JPEG blocks and slight blur are averaged away at 224).
  :func:`expand_patch_stems` turns 224-input weights into 448-input ones that give the same output on a
  448 image as the original weights on its 2x2 average (the starting point of ``hemf_448``'s training).
- Conv init: trunc-normal std 0.02; the code's ``std=0.2`` is taken for a typo of 0.02. As in the code,
  the init (Linear trunc-normal 0.02 with zero bias, LayerNorm 1/0, Conv 0.02 with zero bias) covers the
  branches and the head only, and is applied before the HEF blocks are created, so HEF keeps PyTorch's
  default init (MHEA its own N(0, 0.001)). VRC's xavier ``reset_parameters`` is overridden by it as in
  the code.
- Unused modules are not built: the code creates both the stage-1 (``norm2``, ``W``) and the later-stage
  (``Updim``, ``norm1``, ``W3``) previous-stage paths in every HEF block and uses one of them. The code's
  68,269,367 parameters (7 classes) are 1,591,104 unused ones plus the 66,678,263 built here for 7 classes
  (``hemf_paper``, with the 3 + 9 heads: 66,682,108).
- Ablations (the paper's ELF-only / EGF-only / without MHEA rows): ``branches="local"`` or ``"global"``
  builds only that branch, and its HEF blocks drop the missing branch's inputs: no ``W_g`` (or ``W_l``)
  and no enhanced ``g`` (or ``l``), so ``X_f = GELU(BN(Conv1x1(LN([W_f, W_l]))))`` (``LN([W_l])`` at
  stage 1) and the block returns ``shortcut + SIRMLP(LN([l, X_f]))`` with a 2C -> C SIRMLP.
  ``mhea=False`` replaces ``t = LN(t); t = t * MHEA(t); t = LN(t)`` by a single ``t = LN(t)``.
- MHEA's renormalisation over the memory units adds 1e-9 to the denominator; heads = the VRC heads (8 in
  the paper for both).
- Stochastic depth (``drop_path``, 0 by default as in the paper) is linear over the ELF blocks and
  constant in the HEF blocks.
- MHEA is computed in an N x heads x S x HW layout with batched matmuls, and the per-token
  renormalisation is applied after the S -> d map (d < S); the same function as the code's
  ``mv(attn / attn.sum(S))`` (tests/test_hemf.py checks it), about 3x faster on CPU at stage 1.

Compact width (``hemf``): dims 24/48/96/192 (a quarter of the paper's), ELF depths 2, the paper's 3 EGF
layers, and 2 heads, so the head widths (12 ... 96), hence the rotary angles and MHEA's per-head width, are
the paper's. At stage 1 (56 x 56 tokens) the retention and MHEA cost grows with the number of heads: 4
heads took 1.8 s (forward + backward, batch 16 at 224, one CPU thread) against 1.3 s for 2. About 1.18
GFLOPs (2 x MACs of the convs and matmuls) per 224 image, 3.28 M parameters; ``grade_cnn`` is sized to
about the same FLOPs (1.06 G) but, being all dense convolutions, runs 4-5x faster on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fundus_pipeline.models.registry import register_model
from fundus_pipeline.quality.grading import FLAGS, GRADES

BRANCHES = ("both", "local", "global")


def _check_input(model: nn.Module, x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"{type(model).__name__} needs N x 3 x S x S input, got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h != w:
        raise ValueError(f"{type(model).__name__} needs a square input, got {h} x {w}")
    if h % model.size_divisor:
        raise ValueError(f"{type(model).__name__} needs a side divisible by {model.size_divisor}, got {h}")


class DropPath(nn.Module):
    """Stochastic depth per sample (identity when ``p == 0`` or in eval mode)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an N x C x H x W tensor (ConvNeXt's ``channels_first``)."""

    def __init__(self, c: int, eps: float = 1e-6):
        super().__init__(c, eps=eps)

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


def _conv_bn(cin: int, cout: int, k: int = 1, relu: bool = False, bias: bool = True) -> nn.Sequential:
    """The code's ``Conv(..., bn=True)``: Conv (padding (k-1)//2) -> BN (-> ReLU)."""
    layers = [nn.Conv2d(cin, cout, k, padding=(k - 1) // 2, bias=bias), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# --- local branch ------------------------------------------------------------------------------------


class ELF(nn.Module):
    """Enhanced local feature block: ``x + GELU(Linear(DWConv3x3(LN(Conv3x3(x)))))``."""

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm = LayerNorm2d(dim)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pwconv = nn.Linear(dim, dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        y = self.dwconv(self.norm(self.conv(x)))
        y = F.gelu(self.pwconv(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


# --- global branch (RMT's decomposed Manhattan self-attention) ---------------------------------------


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) along the last axis."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def theta_shift(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_every_two(x) * sin


class RetentionRelPos2d(nn.Module):
    """RMT's ``RetNetRelPos2d`` (chunkwise form): rotary angles and per-head Manhattan decay rates."""

    def __init__(self, dim: int, heads: int, initial_value: float = 1.0, heads_range: float = 3.0):
        super().__init__()
        key_dim = dim // heads
        angle = 1.0 / (10000 ** torch.linspace(0, 1, key_dim // 2))
        self.register_buffer("angle", angle.repeat_interleave(2), persistent=False)  # (a0, a0, a1, a1, ...)
        gamma = torch.log(1 - 2 ** (-initial_value - heads_range * torch.arange(heads, dtype=torch.float) / heads))
        self.register_buffer("decay", gamma, persistent=False)

    def decay_mask(self, length: int) -> torch.Tensor:
        """``heads x L x L`` additive mask ``|i - j| * gamma_h`` (gamma_h < 0)."""
        idx = torch.arange(length, device=self.decay.device, dtype=self.decay.dtype)
        return (idx[:, None] - idx[None, :]).abs() * self.decay[:, None, None]

    def forward(self, h: int, w: int):
        idx = torch.arange(h * w, device=self.angle.device, dtype=self.angle.dtype)
        phase = (idx[:, None] * self.angle[None, :]).reshape(h, w, -1)
        return (phase.sin(), phase.cos()), (self.decay_mask(h), self.decay_mask(w))


class VisionRetentionChunk(nn.Module):
    """Decomposed Manhattan self-attention on N x H x W x C: along W, then along H, plus LePE."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.key_dim = heads, dim // heads
        self.scaling = self.key_dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, rel_pos):
        b, h, w, c = x.shape
        (sin, cos), (mask_h, mask_w) = rel_pos
        n, d = self.heads, self.key_dim
        q = self.q_proj(x)
        k = self.k_proj(x) * self.scaling
        v = self.v_proj(x)
        lepe = self.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        q = theta_shift(q.view(b, h, w, n, d).permute(0, 3, 1, 2, 4), sin, cos)  # b n h w d
        k = theta_shift(k.view(b, h, w, n, d).permute(0, 3, 1, 2, 4), sin, cos)
        v = v.view(b, h, w, n, d).permute(0, 3, 1, 2, 4)
        attn_w = torch.softmax(q @ k.transpose(-1, -2) + mask_w[:, None], dim=-1)  # b n h w w
        v = attn_w @ v
        qh, kh, vh = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)  # b n w h d
        attn_h = torch.softmax(qh @ kh.transpose(-1, -2) + mask_h[:, None], dim=-1)  # b n w h h
        out = (attn_h @ vh).permute(0, 3, 2, 1, 4).reshape(b, h, w, c)  # b h w (n d)
        return self.out_proj(out + lepe)


class EGF(nn.Module):
    """Enhanced global feature block: ``layers`` x (``x <- LN1(x + VRC(x)); x <- LN2(x + Linear(x))``),
    LN1 and LN2 shared across the layers. N x C x H x W in and out."""

    def __init__(self, dim: int, heads: int, layers: int, initial_value: float = 1.0, heads_range: float = 3.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.rel_pos = RetentionRelPos2d(dim, heads, initial_value, heads_range)
        self.vrc = nn.ModuleList([VisionRetentionChunk(dim, heads) for _ in range(layers)])
        self.fc = nn.ModuleList([nn.Linear(dim, dim) for _ in range(layers)])

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        rel_pos = self.rel_pos(x.shape[1], x.shape[2])
        for vrc, fc in zip(self.vrc, self.fc):
            x = self.norm1(x + vrc(x, rel_pos))
            x = self.norm2(x + fc(x))
        return x.permute(0, 3, 1, 2)


# --- HEF fusion --------------------------------------------------------------------------------------


class MHEA(nn.Module):
    """Multi-head external attention (FightingCV's, no shortcut): per head, a Linear d -> S shared by the
    heads, softmax over the N tokens, renormalised over the S memory units, and a Linear S -> d."""

    def __init__(self, channels: int, heads: int = 8, memory_units: int = 64):
        super().__init__()
        if channels % heads:
            raise ValueError(f"MHEA: {channels} channels are not divisible by {heads} heads")
        self.heads = heads
        self.mk = nn.Linear(channels // heads, memory_units, bias=False)
        self.mv = nn.Linear(memory_units, channels // heads, bias=False)
        nn.init.normal_(self.mk.weight, std=0.001)
        nn.init.normal_(self.mv.weight, std=0.001)

    def _logits(self, x):  # N x C x H x W -> N x heads x S x HW (channel = head * d + j, as the code's view)
        b, c, h, w = x.shape
        t = x.reshape(b * self.heads, c // self.heads, h * w)
        return torch.bmm(self.mk.weight.expand(t.shape[0], -1, -1), t).view(b, self.heads, -1, h * w)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The N x heads x S x HW attention map: softmax over the HW tokens, then each token's weights
        renormalised to sum to 1 over the S memory units."""
        attn = torch.softmax(self._logits(x), dim=-1)  # over the tokens
        return attn / (attn.sum(dim=2, keepdim=True) + 1e-9)  # over the memory units

    def forward(self, x):
        b, c, h, w = x.shape
        if h != w:
            raise ValueError(f"MHEA needs square feature maps, got {h} x {w}")
        attn = torch.softmax(self._logits(x), dim=-1)
        # mv(attn / sum_S attn): the per-token renormalisation is applied after the S -> d map (d < S, fewer
        # elements to divide); mathematically the same as ``mv(self.attention(x))``.
        norm = attn.sum(dim=2, keepdim=True) + 1e-9
        attn = attn.flatten(0, 1)
        out = torch.bmm(self.mv.weight.expand(attn.shape[0], -1, -1), attn).view(b, self.heads, -1, h * w) / norm  # N x heads x d x HW
        return out.reshape(b, c, h, w)


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x):
        return torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))


class ChannelAttention(nn.Module):
    def __init__(self, channels: int, ratio: int = 16):
        super().__init__()
        hidden = max(1, channels // ratio)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x):
        avg = self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        mx = self.fc2(F.relu(self.fc1(F.adaptive_max_pool2d(x, 1))))
        return torch.sigmoid(avg + mx)


class SIRMLP(nn.Module):
    """Squeezed inverted residual MLP: ``r = BN(Conv1x1(x))``; ``BN(GELU(Conv3x3(r)) + r)`` -> 1x1 up x4 ->
    GELU -> 1x1 down -> BN."""

    def __init__(self, cin: int, ch: int, cout: int):
        super().__init__()
        self.conv_s = _conv_bn(cin, ch, 1)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, 4 * ch, 1, bias=False)
        self.conv3 = _conv_bn(4 * ch, cout, 1, bias=False)

    def forward(self, x):
        r = self.conv_s(x)
        out = self.bn1(F.gelu(self.conv1(r)) + r)
        return self.conv3(F.gelu(self.conv2(out)))


class HEFPath(nn.Module):
    """One branch's side of a HEF block: its projection ``W_l`` / ``W_g`` and its enhancement
    ``t = LN(t); t = t * MHEA(t); t = LN(t); t = t * SA(t); t = t * CA(t)``."""

    def __init__(self, ch: int, heads: int, mhea: bool, memory_units: int = 64):
        super().__init__()
        self.proj = _conv_bn(ch, ch, 1)
        self.norm = LayerNorm2d(ch)
        self.mhea = MHEA(ch, heads, memory_units) if mhea else None
        self.sa = SpatialAttention(7)
        self.ca = ChannelAttention(ch, 16)

    def enhance(self, t):
        t = self.norm(t)
        if self.mhea is not None:
            t = self.norm(t * self.mhea(t))
        t = t * self.sa(t)
        return t * self.ca(t)


class HEF(nn.Module):
    """Hierarchical enhanced feature fusion of the branch features at one stage and the previous HEF
    output (``prev_ch`` channels, at twice the resolution; None at stage 1)."""

    def __init__(self, ch: int, branches: Sequence[str], prev_ch: int | None, heads: int, mhea: bool, drop_path: float = 0.0, memory_units: int = 64):
        super().__init__()
        self.branches = tuple(branches)  # ("local", "global"), or one of them
        nb = len(self.branches)
        self.paths = nn.ModuleDict({b: HEFPath(ch, heads, mhea, memory_units) for b in self.branches})
        if prev_ch is None:  # the code's norm2 / W
            self.updim = None
            n_x = nb
        else:  # the code's Updim (+ AvgPool2) / norm1 / W3
            self.updim = _conv_bn(prev_ch, ch, 1, relu=True)
            n_x = nb + 1
        self.norm_x = LayerNorm2d(n_x * ch)
        self.w_x = _conv_bn(n_x * ch, ch, 1)
        self.norm_fuse = LayerNorm2d((nb + 1) * ch)
        self.sirmlp = SIRMLP((nb + 1) * ch, ch, ch)
        self.drop_path = DropPath(drop_path)

    def forward(self, feats: dict[str, torch.Tensor], prev: torch.Tensor | None):
        projs = [self.paths[b].proj(feats[b]) for b in self.branches]  # [W_l, W_g]
        if prev is None:
            shortcut = 0.0
            x_f = torch.cat(projs, 1)
        else:
            shortcut = F.avg_pool2d(self.updim(prev), 2)  # W_f
            x_f = torch.cat([shortcut, *projs], 1)
        x_f = F.gelu(self.w_x(self.norm_x(x_f)))
        enhanced = [self.paths[b].enhance(feats[b]) for b in reversed(self.branches)]  # [g, l]
        fuse = self.sirmlp(self.norm_fuse(torch.cat([*enhanced, x_f], 1)))
        return shortcut + self.drop_path(fuse)


# --- the grader --------------------------------------------------------------------------------------


def _stem(dim: int, patch: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, dim, patch, stride=patch), LayerNorm2d(dim))


STEM_WEIGHTS = ("local_down.0.0.weight", "global_down.0.0.weight")


def expand_patch_stems(state: dict[str, torch.Tensor], factor: int = 2) -> dict[str, torch.Tensor]:
    """HEMF weights with their stems' patch grown ``factor`` times: each kernel tap repeated over a
    ``factor`` x ``factor`` block and divided by ``factor``^2. A stem with the new kernel on an image
    ``factor`` times larger gives exactly what the old stem gives on that image's ``factor`` x ``factor``
    block average (the area-resized image), so the whole network starts where the old one was."""
    if factor < 1:
        raise ValueError(f"factor must be at least 1, got {factor}")
    out = dict(state)
    for k in STEM_WEIGHTS:
        if k in out:
            w = out[k]
            out[k] = w.repeat_interleave(factor, dim=-1).repeat_interleave(factor, dim=-2) / float(factor * factor)
    return out


def _down(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(LayerNorm2d(cin), nn.Conv2d(cin, cout, 2, stride=2))


class HEMF(nn.Module):
    """HEMF grader: N x 3 x S x S RGB in [0, 1] -> N x (n_grades + n_flags) logits (grades first)."""

    in_channels = 3
    size_divisor = 32

    def __init__(
        self,
        dims: Sequence[int] = (96, 192, 384, 768),
        depths: Sequence[int] = (4, 4, 4, 4),
        egf_layers: int | Sequence[int] = 3,
        heads: int = 8,
        mhea: bool = True,
        branches: str = "both",
        input_size: int = 224,
        n_grades: int = len(GRADES),
        n_flags: int = len(FLAGS),
        drop_path: float = 0.0,
        memory_units: int = 64,
        patch: int = 4,
    ):
        super().__init__()
        dims, depths = tuple(dims), tuple(depths)
        layers = (egf_layers,) * 4 if isinstance(egf_layers, int) else tuple(egf_layers)
        if len(dims) != 4 or len(depths) != 4 or len(layers) != 4:
            raise ValueError("HEMF needs 4 stage widths, 4 ELF depths and 4 EGF layer counts")
        if branches not in BRANCHES:
            raise ValueError(f"branches must be one of {BRANCHES}, got {branches!r}")
        for d in dims:
            if d % heads or (d // heads) % 2:
                raise ValueError(f"HEMF: width {d} must be divisible by {heads} heads into an even head width")
        if patch < 1:
            raise ValueError(f"patch must be at least 1, got {patch}")
        self.patch = int(patch)
        self.size_divisor = 8 * self.patch  # the stem, then three 2x downsamplings
        if input_size % self.size_divisor:
            raise ValueError(f"input_size must be divisible by {self.size_divisor}, got {input_size}")
        self.dims, self.depths, self.egf_layers, self.heads = dims, depths, layers, heads
        self.branches, self.mhea = branches, bool(mhea)
        self.input_size, self.n_grades, self.n_flags = int(input_size), int(n_grades), int(n_flags)
        self.active = ("local", "global") if branches == "both" else (branches,)

        if "local" in self.active:
            self.local_down = nn.ModuleList([_stem(dims[0], self.patch)] + [_down(dims[i - 1], dims[i]) for i in range(1, 4)])
            rates = torch.linspace(0, drop_path, sum(depths)).tolist()
            starts = [sum(depths[:i]) for i in range(4)]
            self.local_stages = nn.ModuleList(
                [nn.Sequential(*[ELF(dims[i], rates[starts[i] + j]) for j in range(depths[i])]) for i in range(4)]
            )
        if "global" in self.active:
            self.global_down = nn.ModuleList([_stem(dims[0], self.patch)] + [_down(dims[i - 1], dims[i]) for i in range(1, 4)])
            self.global_stages = nn.ModuleList([EGF(dims[i], heads, layers[i]) for i in range(4)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.grade_head = nn.Linear(dims[-1], self.n_grades)
        self.flag_head = nn.Linear(dims[-1], self.n_flags)
        self.apply(self._init_weights)  # before the HEF blocks exist, as in the paper's code
        self.fusion = nn.ModuleList(
            [HEF(dims[i], self.active, dims[i - 1] if i else None, heads, self.mhea, drop_path, memory_units) for i in range(4)]
        )

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02)  # the code's std=0.2 taken for a typo
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The stage-4 HEF output (N x dims[-1] x S/32 x S/32) of a normalised input."""
        xs = {}
        if "local" in self.active:
            t, out = x, []
            for down, stage in zip(self.local_down, self.local_stages):
                t = stage(down(t))
                out.append(t)
            xs["local"] = out
        if "global" in self.active:
            t, out = x, []
            for down, stage in zip(self.global_down, self.global_stages):
                t = stage(down(t))
                out.append(t)
            xs["global"] = out
        f = None
        for i, hef in enumerate(self.fusion):
            f = hef({b: xs[b][i] for b in self.active}, f)
        return f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        f = self.features(x * 2.0 - 1.0)  # (x - 0.5) / 0.5
        z = self.norm(f.mean(dim=(-2, -1)))
        return torch.cat([self.grade_head(z), self.flag_head(z)], dim=1)


class GradeCNN(nn.Module):
    """Plain CNN grader baseline: Conv3x3 s2 stem, four stages of Conv-BN-ReLU (the first of each stride 2),
    global average pool -> LayerNorm -> the same two heads as HEMF."""

    in_channels = 3
    size_divisor = 32

    def __init__(
        self,
        widths: Sequence[int] = (48, 96, 192, 384),
        depths: Sequence[int] = (2, 3, 3, 2),
        input_size: int = 224,
        n_grades: int = len(GRADES),
        n_flags: int = len(FLAGS),
    ):
        super().__init__()
        widths, depths = tuple(widths), tuple(depths)
        if len(widths) != 4 or len(depths) != 4 or min(depths) < 1:
            raise ValueError("GradeCNN needs 4 stage widths and 4 depths >= 1")
        if input_size % self.size_divisor:
            raise ValueError(f"input_size must be divisible by {self.size_divisor}, got {input_size}")
        self.widths, self.depths = widths, depths
        self.input_size, self.n_grades, self.n_flags = int(input_size), int(n_grades), int(n_flags)

        def cbr(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        stem_w = max(8, widths[0] // 2)
        layers = cbr(3, stem_w, 2)
        cin = stem_w
        for w, n in zip(widths, depths):
            layers += cbr(cin, w, 2)
            for _ in range(n - 1):
                layers += cbr(w, w, 1)
            cin = w
        self.body = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(widths[-1], eps=1e-6)
        self.grade_head = nn.Linear(widths[-1], self.n_grades)
        self.flag_head = nn.Linear(widths[-1], self.n_flags)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(self, x)
        z = self.norm(self.body(x * 2.0 - 1.0).mean(dim=(-2, -1)))
        return torch.cat([self.grade_head(z), self.flag_head(z)], dim=1)


# --- registered variants -----------------------------------------------------------------------------

_HEMF = "HEMF no-reference grader (3 grades + 9 flags)"
_COMPACT = {"dims": (24, 48, 96, 192), "depths": (2, 2, 2, 2), "egf_layers": 3, "heads": 2}
_C = "compact dims 24/48/96/192, depths 2, EGF 3 layers, 2 heads, 224 input"
_TINY = {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "egf_layers": 1, "heads": 2, "input_size": 64}
_CNN = "Plain CNN grader baseline (3 grades + 9 flags)"


@register_model("hemf", task="grading", arch="hemf", width=24, description=f"{_HEMF}: ELF + EGF branches, HEF fusion with MHEA, {_C} (shipped)")
def hemf(**kw) -> HEMF:
    return HEMF(**{**_COMPACT, **kw})


@register_model("hemf_448", task="grading", arch="hemf", width=24, description=f"{_HEMF}: ELF + EGF branches, HEF fusion with MHEA, compact dims 24/48/96/192, depths 2, EGF 3 layers, 2 heads, 448 input with 8x8 stem patches (the 224 model's token grids)")
def hemf_448(**kw) -> HEMF:
    return HEMF(**{**_COMPACT, "input_size": 448, "patch": 8, **kw})


@register_model("hemf_local", task="grading", arch="hemf", width=24, description=f"{_HEMF} ablation: local (ELF) branch only, HEF fusion with MHEA, {_C}")
def hemf_local(**kw) -> HEMF:
    return HEMF(**{**_COMPACT, "branches": "local", **kw})


@register_model("hemf_global", task="grading", arch="hemf", width=24, description=f"{_HEMF} ablation: global (EGF) branch only, HEF fusion with MHEA, {_C}")
def hemf_global(**kw) -> HEMF:
    return HEMF(**{**_COMPACT, "branches": "global", **kw})


@register_model("hemf_nomhea", task="grading", arch="hemf", width=24, description=f"{_HEMF} ablation: ELF + EGF branches, HEF fusion without MHEA, {_C}")
def hemf_nomhea(**kw) -> HEMF:
    return HEMF(**{**_COMPACT, "mhea": False, **kw})


@register_model("hemf_paper", task="grading", arch="hemf", width=96, description=f"{_HEMF}: ELF + EGF branches, HEF fusion with MHEA, the paper's dims 96/192/384/768, depths 4, EGF 3 layers, 8 heads, 224 input")
def hemf_paper(**kw) -> HEMF:
    return HEMF(**{"dims": (96, 192, 384, 768), "depths": (4, 4, 4, 4), "egf_layers": 3, "heads": 8, **kw})


@register_model("hemf_tiny", task="grading", arch="hemf", width=8, description=f"{_HEMF}: ELF + EGF branches, HEF fusion with MHEA, dims 8/16/32/64, depths 1, EGF 1 layer, 2 heads, 64 input (tests only)")
def hemf_tiny(**kw) -> HEMF:
    return HEMF(**{**_TINY, **kw})


@register_model("grade_cnn", task="grading", arch="cnn", width=48, description=f"{_CNN}, widths 48/96/192/384, depths 2/3/3/2, 224 input, about the compact HEMF's FLOPs")
def grade_cnn(**kw) -> GradeCNN:
    return GradeCNN(**{"widths": (48, 96, 192, 384), "depths": (2, 3, 3, 2), **kw})


@register_model("grade_cnn_tiny", task="grading", arch="cnn", width=8, description=f"{_CNN}, widths 8/16/32/64, depths 1, 64 input (tests only)")
def grade_cnn_tiny(**kw) -> GradeCNN:
    return GradeCNN(**{"widths": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "input_size": 64, **kw})

