"""SDMP-Net (hhf-99/hhf, derived from AHIQ): full-reference quality of an enhanced fundus image, scored
against the degraded image it was enhanced from. Built from the digest in seeds.md section 3.1.

Design: two frozen feature streams see both images. The CNN stream gives multi-scale features at 1/4
resolution, the ViT stream the tokens of all its blocks at 1/8. A deformable convolution, whose offsets are
predicted from the reference's ViT features, samples the CNN features of both images (shared offsets and
weights). A stride-2 conv path brings them to the ViT grid. A pixel-prediction head then maps
``[f_dis - f_ref, f_dis, f_ref]`` to a patch score ``q`` and a patch weight ``a`` per grid cell, and the
image score is ``sum(q * a) / sum(a)``. "dis" is the enhanced image and "ref" the degraded input, as in
the paper's figure.

Departures from the paper and its code, all forced or stated:
- CNN stream: no ImageNet ResNet-152 (timm is not a dependency and ImageNet weights are out of domain).
  It is the first three encoder blocks of this project's IMFF-Net segmenter (``IMFFEncoder``, loaded
  from ``weights/imff.pt``), concat(avgpool4(s1), avgpool2(s2), s3): 7 x base = 112 channels @56 for base
  16, instead of layer1's 3 x 256 = 768.
- ViT stream: no ImageNet ViT-B/8. It is a small plain ViT (``FundusViT``, patch 8, dim 96, depth 5,
  heads 3), pretrained by the trainer on a self-supervised pretext task (which simulated degradations
  were applied, and how strongly). All 5 blocks are used, so V has 5 x 96 = 480 channels @28 instead of
  3840.
- Widths: the fusion path is Conv3x3 s2 112 -> 2w -> Conv3x3 2w -> 112 (paper 768 -> 512 -> 768). The
  head is 1x1 -> w, smoothing 3w -> 4w -> 2w, fc 2w -> w -> 1, with w = 64 (the paper's w is 256).
- ``DeformConv2d`` is written here with ``grid_sample`` (torchvision is not a dependency). It matches
  torchvision's ``deform_conv2d``: offsets in pixels, (dy, dx) per kernel position, zeros outside.
- Channels-last fc layers. The code's ``view(-1, 512)`` on an N x C x H x W tensor mixes positions; here
  the features are permuted first, as intended.
- ``q = sigmoid(fc2(.))``, so every patch score lies in (0, 1), like the min-max normalised labels (the
  paper's q is unbounded). The weight branch is ``sigmoid(Linear(w -> 1))``, which on channels-last
  features is the paper's Conv1x1. AHIQ's unused ``conv1`` / ``conv`` layers are left out.
- Inputs are both RGB in [0, 1]. The IMFF stream takes them as they are, and the ViT normalises to
  ``(x - 0.5) / 0.5`` (SDMP's convention). The code leaves the reference in BGR, a bug.
- Ablations: ``deform=False`` skips the deformable conv (same stride-2 path). ``streams=("cnn",)`` uses
  only the CNN path before the 1x1 conv, ``streams=("vit",)`` only V.

Parameter counts include the frozen streams. ``trainable_parameters`` gives what the optimiser gets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from fundus_pipeline.models.imff import EncoderBlock
from fundus_pipeline.models.registry import register_model


class DeformConv2d(nn.Module):
    """Deformable k x k convolution (stride 1, dilation 1, one offset group), torchvision's semantics.

    ``forward(x, offset)``: ``offset`` is N x 2*k*k x H x W. For kernel position ``i`` (row-major),
    channel ``2i`` is dy and ``2i + 1`` is dx, in pixels. Sampling is bilinear with zeros outside the image.
    """

    def __init__(self, cin: int, cout: int, k: int = 3, padding: int = 1):
        super().__init__()
        self.k, self.padding = k, padding
        self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
        self.bias = nn.Parameter(torch.empty(cout))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default init
        nn.init.uniform_(self.bias, -1 / math.sqrt(cin * k * k), 1 / math.sqrt(cin * k * k))

    def forward(self, x: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        kk = self.k * self.k
        if offset.shape != (n, 2 * kk, h, w):
            raise ValueError(f"offset must be {(n, 2 * kk, h, w)}, got {tuple(offset.shape)}")
        # sampling positions in float32 whatever the autocast dtype (bf16 would round pixel 32-55 to 0.25 px)
        ky, kx = torch.meshgrid(torch.arange(self.k), torch.arange(self.k), indexing="ij")
        kernel = torch.stack([ky.flatten(), kx.flatten()], dim=1).to(x.device, torch.float32) - self.padding  # kk x 2 (dy, dx)
        base = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=0).to(x.device, torch.float32)  # 2 x H x W
        pos = base[None, None] + kernel[None, :, :, None, None] + offset.float().reshape(n, kk, 2, h, w)  # N x kk x 2 x H x W
        # pixel centres -> [-1, 1] with align_corners=False: (2p + 1) / size - 1
        gy = (2 * pos[:, :, 0] + 1) / h - 1
        gx = (2 * pos[:, :, 1] + 1) / w - 1
        grid = torch.stack([gx, gy], dim=-1).view(n, kk * h, w, 2)
        cols = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False).to(x.dtype)  # N x C x kk*H x W
        cols = cols.view(n, c * kk, h * w)  # channel-major, kernel position minor: weight.view(cout, cin*kk)
        out = torch.matmul(self.weight.reshape(self.weight.shape[0], -1), cols) + self.bias[:, None]
        return out.view(n, -1, h, w)


class _Attention(nn.Module):
    """Multi-head self-attention (fused qkv projection, scaled dot-product attention)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class _Block(nn.Module):
    """Pre-norm transformer block: x + MSA(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FundusViT(nn.Module):
    """A small plain ViT for 224 x 224 fundus crops (RGB in [0, 1], normalised inside to [-1, 1]).

    ``forward_tokens`` gives every block's patch tokens as N x dim x 28 x 28 maps (SDMP's ViT stream);
    ``forward`` is the pretext head: final LayerNorm, then Linear on the CLS token -> N x ``n_outputs``.
    Init: trunc-normal(0.02) for the Linear weights, CLS token and position embedding; zero biases.
    """

    in_channels = 3
    img_size = 224

    def __init__(self, dim: int = 96, depth: int = 5, heads: int = 3, mlp_ratio: int = 4, patch: int = 8, img_size: int = 224, n_outputs: int = 16):
        super().__init__()
        self.dim, self.img_size, self.grid = dim, img_size, img_size // patch
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid + 1, dim))
        self.blocks = nn.ModuleList([_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_outputs)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def _blocks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The token sequences (CLS first) after each block."""
        if x.ndim != 4 or x.shape[1:] != (3, self.img_size, self.img_size):
            raise ValueError(f"FundusViT needs N x 3 x {self.img_size} x {self.img_size} input, got {tuple(x.shape)}")
        t = self.patch_embed((x - 0.5) / 0.5).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        out = []
        for block in self.blocks:
            t = block(t)
            out.append(t)
        return out

    def forward_tokens(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's output without CLS, as N x dim x grid x grid maps (``depth`` of them)."""
        n = x.shape[0]
        return [t[:, 1:].transpose(1, 2).reshape(n, self.dim, self.grid, self.grid) for t in self._blocks(x)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self._blocks(x)[-1][:, 0]))


class IMFFEncoder(nn.Module):
    """The first three encoder blocks of ``IMFFNet(base)`` (same attribute names, so its ``e1``-``e3`` keys
    load). ``forward(x)``, x RGB in [0, 1] with H, W divisible by 4: concat(avgpool4(s1), avgpool2(s2), s3),
    7 x base channels at 1/4 resolution (s_i: the pre-pool output of e_i)."""

    in_channels = 3

    def __init__(self, base: int = 16):
        super().__init__()
        self.base, self.out_channels = base, 7 * base
        self.e1 = EncoderBlock(3, base)
        self.e2 = EncoderBlock(base, 2 * base)
        self.e3 = EncoderBlock(2 * base, 4 * base)

    def load_from_imff(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the ``e1.*``, ``e2.*``, ``e3.*`` entries of an ``IMFFNet(base)`` state dict (strict on them)."""
        self.load_state_dict({k: v for k, v in state_dict.items() if k.split(".", 1)[0] in ("e1", "e2", "e3")}, strict=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1, p1 = self.e1(x)
        s2, p2 = self.e2(p1)
        s3, _ = self.e3(p2)
        return torch.cat([F.avg_pool2d(s1, 4), F.avg_pool2d(s2, 2), s3], dim=1)


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class SDMPNet(nn.Module):
    """SDMP-Net and its ablations. ``forward(dis, ref) -> N`` scores in (0, 1): ``dis`` the enhanced image,
    ``ref`` the degraded input, both N x 3 x 224 x 224 RGB in [0, 1]. The streams (``cnn``, ``vit``) are
    frozen and stay in eval mode; ``load_streams`` fills them, ``trainable_parameters`` is the rest."""

    in_channels = 3
    img_size = 224
    #: Entry points besides ``forward`` that ``weights.compile_model`` compiles (``fundus score --input-score``).
    inference_methods = ("forward_with_identity",)

    def __init__(
        self,
        width: int = 64,
        cnn_base: int = 16,
        vit_dim: int = 96,
        vit_depth: int = 5,
        vit_heads: int = 3,
        deform: bool = True,
        streams: Iterable[str] = ("cnn", "vit"),
        dropout: float = 0.5,
    ):
        super().__init__()
        self.streams = tuple(streams)
        if not self.streams or set(self.streams) - {"cnn", "vit"} or len(set(self.streams)) != len(self.streams):
            raise ValueError(f"streams must be a non-empty subset of ('cnn', 'vit'), got {self.streams}")
        use_cnn, use_vit = "cnn" in self.streams, "vit" in self.streams
        self.width, self.deform = width, deform and use_cnn and use_vit
        self.cnn = _freeze(IMFFEncoder(cnn_base)) if use_cnn else None
        self.vit = _freeze(FundusViT(vit_dim, vit_depth, vit_heads)) if use_vit else None
        c_ch = 7 * cnn_base if use_cnn else 0
        v_ch = vit_depth * vit_dim if use_vit else 0
        if self.deform:
            self.offset = nn.Conv2d(v_ch, 18, 3, padding=1)
            nn.init.zeros_(self.offset.weight)  # starts as a plain 3x3 conv
            nn.init.zeros_(self.offset.bias)
            self.deform_conv = DeformConv2d(c_ch, c_ch)
        if use_cnn:
            self.down = nn.Sequential(nn.Conv2d(c_ch, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=True), nn.Conv2d(2 * width, c_ch, 3, padding=1))
        self.reduce = nn.Conv2d(c_ch + v_ch, width, 1)
        self.smooth = nn.Sequential(nn.Conv2d(3 * width, 4 * width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4 * width, 2 * width, 3, padding=1))
        self.fc1 = nn.Linear(2 * width, width)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(width, 1)
        self.fc_weight = nn.Linear(width, 1)

    def train(self, mode: bool = True) -> SDMPNet:
        """Set the mode of the trainable parts; the frozen streams stay in eval mode."""
        super().train(mode)
        for stream in (self.cnn, self.vit):
            if stream is not None:
                stream.eval()
        return self

    def load_streams(self, imff_state: Mapping[str, torch.Tensor] | None, vit_state: Mapping[str, torch.Tensor] | None) -> None:
        """Load the CNN stream from an ``IMFFNet`` state dict (its e1-e3) and the ViT stream from a
        ``FundusViT`` state dict (strict). None, or a state for a stream this model lacks, is skipped."""
        if imff_state is not None and self.cnn is not None:
            self.cnn.load_from_imff(imff_state)
        if vit_state is not None and self.vit is not None:
            self.vit.load_state_dict(vit_state, strict=True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters outside the frozen streams (what the optimiser gets)."""
        return [p for p in self.parameters() if p.requires_grad]

    def _features(self, dis: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image features after the shared 1x1 conv, N x width x 28 x 28 each."""
        feats: list[list[torch.Tensor]] = [[], []]
        v_ref = None
        if self.vit is not None:
            v = [torch.cat(self.vit.forward_tokens(x), dim=1) for x in (dis, ref)]
            v_ref = v[1]
            for f, vi in zip(feats, v):
                f.append(vi)
        if self.cnn is not None:
            offset = None
            if self.deform:
                c_grid = (dis.shape[-2] // 4, dis.shape[-1] // 4)
                offset = self.offset(F.interpolate(v_ref, size=c_grid, mode="nearest"))
            for f, x in zip(feats, (dis, ref)):
                c = self.cnn(x)
                if offset is not None:
                    c = self.deform_conv(c, offset)
                f.append(self.down(c))
        f_dis, f_ref = (self.reduce(torch.cat(f, dim=1)) for f in feats)
        return f_dis, f_ref

    def _head(self, f_dis: torch.Tensor, f_ref: torch.Tensor) -> torch.Tensor:
        f = self.smooth(torch.cat([f_dis - f_ref, f_dis, f_ref], dim=1)).permute(0, 2, 3, 1)  # N x H x W x 2w
        f1 = F.relu(self.fc1(f))
        q = torch.sigmoid(self.fc2(self.drop(f1)))
        a = torch.sigmoid(self.fc_weight(f1))
        return (q * a).sum(dim=(1, 2, 3)) / a.sum(dim=(1, 2, 3))

    def forward(self, dis: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        if dis.shape != ref.shape:
            raise ValueError(f"dis and ref differ in shape: {tuple(dis.shape)} vs {tuple(ref.shape)}")
        return self._head(*self._features(dis, ref))

    def forward_with_identity(self, dis: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``forward(dis, ref)``, ``forward(ref, ref)``) with the reference's features computed once: the
        features of an image depend only on the reference (the deformation offsets come from its ViT
        tokens), so the identity pair reuses them, and the two scores cost about as much as one."""
        if dis.shape != ref.shape:
            raise ValueError(f"dis and ref differ in shape: {tuple(dis.shape)} vs {tuple(ref.shape)}")
        f_dis, f_ref = self._features(dis, ref)
        return self._head(f_dis, f_ref), self._head(f_ref, f_ref)

    def forward_train(self, dis: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """The scores, as ``forward`` (dropout is active when the model is in train mode)."""
        return self.forward(dis, ref)


_VIT = "Fundus ViT (patch 8, 224 input, pretext head on CLS) for SDMP-Net's ViT stream"
_SDMP = "SDMP-Net full-reference IQA (enhanced vs degraded)"


@register_model("vit_fundus", task="pretext", arch="vit", width=96, description=f"{_VIT}: dim 96, depth 5, heads 3")
def vit_fundus(**kw) -> FundusViT:
    return FundusViT(96, 5, 3, **kw)


@register_model("vit_fundus_tiny", task="pretext", arch="vit", width=16, description=f"{_VIT}: dim 16, depth 2, heads 2 (tests only)")
def vit_fundus_tiny(**kw) -> FundusViT:
    return FundusViT(16, 2, 2, **kw)


@register_model("sdmp", task="quality", arch="sdmp", width=64, description=f"{_SDMP}: frozen IMFF w16 e1-e3 + fundus ViT d96x5 streams, deformable fusion, width 64 (shipped)")
def sdmp(**kw) -> SDMPNet:
    return SDMPNet(64, **kw)


@register_model("sdmp_nodeform", task="quality", arch="sdmp", width=64, description=f"{_SDMP} ablation: without deformable fusion, width 64")
def sdmp_nodeform(**kw) -> SDMPNet:
    return SDMPNet(64, deform=False, **kw)


@register_model("sdmp_cnn", task="quality", arch="sdmp", width=64, description=f"{_SDMP} ablation: CNN stream (IMFF w16 e1-e3) only, width 64")
def sdmp_cnn(**kw) -> SDMPNet:
    return SDMPNet(64, streams=("cnn",), **kw)


@register_model("sdmp_vit", task="quality", arch="sdmp", width=64, description=f"{_SDMP} ablation: ViT stream (fundus ViT d96x5) only, width 64")
def sdmp_vit(**kw) -> SDMPNet:
    return SDMPNet(64, streams=("vit",), **kw)


@register_model("sdmp_tiny", task="quality", arch="sdmp", width=4, description=f"{_SDMP}, width 4 with IMFF w2 + ViT d16x2 streams (tests only)")
def sdmp_tiny(**kw) -> SDMPNet:
    return SDMPNet(4, cnn_base=2, vit_dim=16, vit_depth=2, vit_heads=2, **kw)
