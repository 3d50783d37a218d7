"""MSRF-Net (Srivastava et al., IEEE JBHI 2021) in PyTorch, with a width parameter.

Written from the description in ``shared/reference/seeds.md`` section 4 (the paper's Fig. 2 and the
older ``msrf.py`` wiring), with the released code's bugs fixed:

* DSDF block: ``y1`` is the LeakyReLU of the 3x3 conv output (the Keras code discarded the conv);
  the cross-scale taps are ``x_k -> x_kc`` and ``y_k -> y_kt`` for k = 1..4 (the Keras code was off
  by one for the first two).
* MSRF sub-network: all 10 DSDF blocks are chained as in Fig. 2b (HEAD ``model.py`` restarted the last
  two calls from stale tensors, leaving blocks 6-8 dead).
* Shape-stream residual block applies its two convs in sequence.
* Gated shape convolution (``gsc``) returns ``features * gate`` (the Keras code returned the gate).

Interface (shared by all segmentation models of the pipeline):

* ``model(x)``: ``x`` is N x 3 x H x W RGB in [0, 1], H and W multiples of ``size_divisor`` (8);
  returns vessel *logits* N x 1 x H x W.
* ``model.forward_train(x)`` returns ``{"logits", "aux", "edge", "main_weight", "edge_weight"}``:
  ``aux`` = ``[(pred2_logits, 1.0), (pred4_logits, 1.0)]`` at H x W, ``edge`` = shape-stream edge
  logits N x 1 x H x W; the released recipe weights the main output 2, pred2 1, pred4 1, edge BCE 1.

The Canny edge map of the input (grey, thresholds 10/100, /255) is computed inside ``forward`` with
OpenCV on a detached uint8 CPU copy, so the model works on any device and callers pass RGB only.
The thresholds 10/100 are those of HEAD ``model.py``'s (broken) Canny line and of the unofficial PyTorch
port; the source's data loader (``utils.py`` ``get_image``, used by ``train.py``; seeds.md section 4.2)
uses 10/1000, for the input edge map and for the edge target alike. The trainer's edge target (``train/segment.py``, ``edge_target``) also
uses 10/100. The difference matters for the input: on the grey DRIVE ``21_training.tif`` the edge fraction
is 0.0766 at 10/100 and 0.0000 at 10/1000 at native size; resized to 256, 0.0953 and 0.0535 (area
interpolation) or 0.1211 and 0.0133 (PIL Lanczos, the source's ANTIALIAS) (audit campaign 15a and its
check). For a binary mask target both give nearly the same edges. ``msrf_w8.pt`` was trained with 10/100.

Width: ``base`` (paper 32) sets the level widths base x {1, 2, 4, 8}; the dense growth rates of the
three DSDF scale pairs are base x {1/2, 1, 2} (paper 16/32/64); the shape stream uses
base x {1, 1/2, 1/4, 1/8} (paper 32/16/8/4), each at least 1.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fundus_pipeline.models.registry import register_model

_LRELU = 0.25  # LeakyReLU slope inside DSDF blocks
_RES = 0.4  # residual scaling of the DSDF blocks and of the MSRF sub-network output


def canny_edges(x: torch.Tensor, low: int = 10, high: int = 100) -> torch.Tensor:
    """Canny edge map of an RGB batch in [0, 1] (N x 3 x H x W) as N x 1 x H x W in {0, 1}.

    Computed with OpenCV on a detached uint8 CPU copy (no gradient), returned on ``x``'s device/dtype.
    """
    arr = (x.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    out = np.empty((arr.shape[0], 1, arr.shape[2], arr.shape[3]), dtype=np.float32)
    for i in range(arr.shape[0]):
        rgb = np.ascontiguousarray(arr[i].transpose(1, 2, 0))
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        out[i, 0] = cv2.Canny(grey, low, high).astype(np.float32) / 255.0
    return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)


class SE(nn.Module):
    """Squeeze-and-excitation: GAP, FC ch/r (ReLU), FC ch (sigmoid), channel scale."""

    def __init__(self, ch: int, ratio: int = 16):
        super().__init__()
        hidden = max(1, ch // ratio)
        self.fc1 = nn.Linear(ch, hidden)
        self.fc2 = nn.Linear(hidden, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return x * w[:, :, None, None]


class EncoderLevel(nn.Module):
    """[MaxPool2, Dropout 0.2,] [Conv3x3, ReLU] x2, BN, [SE]."""

    def __init__(self, cin: int, cout: int, pool: bool, se: bool, dropout: float = 0.2):
        super().__init__()
        self.pool = pool
        self.drop = nn.Dropout(dropout) if pool else nn.Identity()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.se = SE(cout) if se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool:
            x = self.drop(F.max_pool2d(x, 2))
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.se(self.bn(x))


class DSDF(nn.Module):
    """Dual-scale dense fusion block (RDDB): 5 dense steps per scale with cross-scale exchange.

    ``x`` is the high-resolution input (nf1 channels), ``y`` the low-resolution one (nf2, half size).
    Step k (1..4) produces gc channels on each scale; from step 2 on each conv also sees the other
    scale's previous step through a stride-2 conv (high->low) or a stride-2 transposed conv
    (low->high). Step 5 outputs nf1/nf2 channels; ``out = in + 0.4 * step5``.
    """

    def __init__(self, nf1: int, nf2: int, gc: int):
        super().__init__()
        self.hconv = nn.ModuleList()
        self.lconv = nn.ModuleList()
        self.down = nn.ModuleList()  # x_k -> x_kc (high -> low)
        self.up = nn.ModuleList()  # y_k -> y_kt (low -> high)
        for k in range(5):
            hin = nf1 + k * gc + (gc if k > 0 else 0)
            lin = nf2 + k * gc + (gc if k > 0 else 0)
            self.hconv.append(nn.Conv2d(hin, gc if k < 4 else nf1, 3, padding=1))
            self.lconv.append(nn.Conv2d(lin, gc if k < 4 else nf2, 3, padding=1))
            if k < 4:
                self.down.append(nn.Conv2d(gc, gc, 3, stride=2, padding=1))
                self.up.append(nn.ConvTranspose2d(gc, gc, 3, stride=2, padding=1, output_padding=1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hs, ls = [x], [y]
        xc = yt = None
        for k in range(5):
            hin = torch.cat(hs + ([yt] if yt is not None else []), dim=1)
            lin = torch.cat(ls + ([xc] if xc is not None else []), dim=1)
            xk = F.leaky_relu(self.hconv[k](hin), _LRELU)
            yk = F.leaky_relu(self.lconv[k](lin), _LRELU)
            if k == 4:
                return x + _RES * xk, y + _RES * yk
            hs.append(xk)
            ls.append(yk)
            xc = F.leaky_relu(self.down[k](xk), _LRELU)
            yt = F.leaky_relu(self.up[k](yk), _LRELU)
        raise AssertionError("unreachable")


class MSRFSubNet(nn.Module):
    """Ten DSDF blocks over the four encoder scales, wired as in Fig. 2b."""

    def __init__(self, c: tuple[int, int, int, int], g: tuple[int, int, int]):
        super().__init__()
        c1, c2, c3, c4 = c
        g1, g2, g3 = g
        self.blocks = nn.ModuleList(
            [
                DSDF(c1, c2, g1),  # 0: (n11, n21) -> (n12, n22)
                DSDF(c3, c4, g3),  # 1: (n31, n41) -> (n32, n42)
                DSDF(c1, c2, g1),  # 2: (n12, n22)
                DSDF(c3, c4, g3),  # 3: (n32, n42)
                DSDF(c2, c3, g2),  # 4: (n22, n32)
                DSDF(c1, c2, g1),  # 5: (n12, n22) -> (n13, n23)
                DSDF(c3, c4, g3),  # 6: (n32, n42) -> (n33, n43)
                DSDF(c2, c3, g2),  # 7: (n23, n33)
                DSDF(c1, c2, g1),  # 8: (n13, n23)
                DSDF(c3, c4, g3),  # 9: (n33, n43)
            ]
        )

    def forward(self, n11, n21, n31, n41):
        b = self.blocks
        n12, n22 = b[0](n11, n21)
        n32, n42 = b[1](n31, n41)
        n12, n22 = b[2](n12, n22)
        n32, n42 = b[3](n32, n42)
        n22, n32 = b[4](n22, n32)
        n13, n23 = b[5](n12, n22)
        n33, n43 = b[6](n32, n42)
        n23, n33 = b[7](n23, n33)
        n13, n23 = b[8](n13, n23)
        n33, n43 = b[9](n33, n43)
        return n11 + _RES * n13, n21 + _RES * n23, n31 + _RES * n33, n41 + _RES * n43


class ResBlock(nn.Module):
    """Conv3x3, BN, ReLU, Conv3x3, BN, + input, ReLU (the two convs in sequence)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class GatedShapeConv(nn.Module):
    """Gate = sigmoid(BN(conv1x1(ReLU(conv1x1(BN(cat(f, g))))))); returns f * gate."""

    def __init__(self, ch: int):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(ch + 1)
        self.conv1 = nn.Conv2d(ch + 1, ch + 1, 1)
        self.conv2 = nn.Conv2d(ch + 1, 1, 1)
        self.bn_out = nn.BatchNorm2d(1)

    def forward(self, feats: torch.Tensor, gating: torch.Tensor) -> torch.Tensor:
        a = self.bn_in(torch.cat([feats, gating], dim=1))
        a = torch.sigmoid(self.bn_out(self.conv2(F.relu(self.conv1(a)))))
        return feats * a


class ShapeStream(nn.Module):
    """Gated shape stream: n23, n33, n43 -> edge logits at H x W."""

    def __init__(self, c2: int, c3: int, c4: int, s: tuple[int, int, int, int]):
        super().__init__()
        s1, s2, s3, s4 = s
        self.d0 = nn.Conv2d(c2, s1, 1)
        self.res1 = ResBlock(s1)
        self.c3 = nn.Conv2d(c3, 1, 1)
        self.red1 = nn.Conv2d(s1, s2, 1)
        self.gate1 = GatedShapeConv(s2)
        self.res2 = ResBlock(s2)
        self.red2 = nn.Conv2d(s2, s3, 1)
        self.c4 = nn.Conv2d(c4, 1, 1)
        self.gate2 = GatedShapeConv(s3)
        self.res3 = ResBlock(s3)
        self.red3 = nn.Conv2d(s3, s4, 1)
        self.out = nn.Conv2d(s4, 1, 1)

    def forward(self, n23, n33, n43, size):
        ss = F.interpolate(self.d0(n23), size=size, mode="bilinear", align_corners=False)
        ss = self.res1(ss)
        g3 = F.interpolate(self.c3(n33), size=size, mode="bilinear", align_corners=False)
        ss = self.res2(self.gate1(self.red1(ss), g3))
        g4 = F.interpolate(self.c4(n43), size=size, mode="bilinear", align_corners=False)
        ss = self.res3(self.gate2(self.red2(ss), g4))
        return self.out(self.red3(ss))  # edge logits


class AttentionB(nn.Module):
    """Additive attention gate: X (skip, 2x res) gated by G (coarser), then BN."""

    def __init__(self, cx: int, cg: int, k: int):
        super().__init__()
        self.theta = nn.Conv2d(cx, k, 2, stride=2)
        self.phi = nn.Conv2d(cg, k, 1)
        self.psi = nn.Conv2d(k, 1, 1)
        self.up = nn.ConvTranspose2d(1, 1, 2, stride=2)
        self.bn = nn.BatchNorm2d(cx)

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.psi(F.relu(self.theta(x) + self.phi(g))))
        return self.bn(x * self.up(a))


class SpatialAttention(nn.Module):
    def __init__(self, ch: int, mid: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, mid, 1)
        self.bn = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv2(F.relu(self.bn(self.conv1(x)))))


class DualAttention(nn.Module):
    """Up (ConvT4x4 s2, BN, ReLU), concat skip, Conv3x3 BN ReLU; SE(f) * (1 + spatial(f))."""

    def __init__(self, c_skip: int, c_prev: int, c: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_prev, c, 4, stride=2, padding=1)
        self.bn_up = nn.BatchNorm2d(c)
        self.conv = nn.Conv2d(c_skip + c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.se = SE(c)
        self.sab = SpatialAttention(c, max(1, c // 4))

    def forward(self, skip: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        up = F.relu(self.bn_up(self.up(prev)))
        f = F.relu(self.bn(self.conv(torch.cat([skip, up], dim=1))))
        return self.se(f) * (1.0 + self.sab(f))


class DecoderLevel(nn.Module):
    """Attention_B + Up3 + dual attention, 1x1 fusion, pre-activation residual, 1x1 prediction head."""

    def __init__(self, c_skip: int, c_prev: int, c: int):
        super().__init__()
        self.att = AttentionB(c_skip, c_prev, c)
        self.up3 = nn.ConvTranspose2d(c_prev, c_skip, 1, stride=2, output_padding=1)
        self.dual = DualAttention(c_skip, c_prev, c)
        self.fuse = nn.Conv2d(2 * c_skip + c, c, 1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, skip: torch.Tensor, prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.cat([self.up3(prev), self.att(skip, prev)], dim=1)
        t = self.fuse(torch.cat([a, self.dual(skip, prev)], dim=1))
        r = self.conv1(F.relu(self.bn1(t)))
        r = self.conv2(F.relu(self.bn2(r)))
        n = r + t
        return n, self.head(n)


class MSRFNet(nn.Module):
    """MSRF-Net vessel segmenter. ``base`` = level-1 width (paper 32)."""

    size_divisor = 8
    in_channels = 3
    loss_weights = {"main": 2.0, "pred2": 1.0, "pred4": 1.0, "edge": 1.0}

    def __init__(self, base: int = 32, dropout: float = 0.2, canny_low: int = 10, canny_high: int = 100):
        super().__init__()
        if base < 2:
            raise ValueError("MSRFNet base width must be >= 2")
        self.base = base
        self.canny_thresholds = (canny_low, canny_high)
        c1, c2, c3, c4 = base, 2 * base, 4 * base, 8 * base
        g = (max(1, base // 2), base, 2 * base)
        s = (base, max(1, base // 2), max(1, base // 4), max(1, base // 8))
        self.enc1 = EncoderLevel(3, c1, pool=False, se=True, dropout=dropout)
        self.enc2 = EncoderLevel(c1, c2, pool=True, se=True, dropout=dropout)
        self.enc3 = EncoderLevel(c2, c3, pool=True, se=True, dropout=dropout)
        self.enc4 = EncoderLevel(c3, c4, pool=True, se=False, dropout=dropout)
        self.msrf = MSRFSubNet((c1, c2, c3, c4), g)
        self.shape = ShapeStream(c2, c3, c4, s)
        # edge fusion: cat(sigmoid(edge logits), canny) -> 1x1 -> sigmoid -> 1x1 -> BN -> ReLU
        self.fuse_cw = nn.Conv2d(2, 1, 1)
        self.fuse_edge = nn.Conv2d(1, 1, 1)
        self.fuse_bn = nn.BatchNorm2d(1)
        self.dec3 = DecoderLevel(c3, c4, c3)
        self.dec2 = DecoderLevel(c2, c3, c2)
        self.up1 = nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1)
        self.l1_in = nn.Conv2d(2 * c1, c1, 1)
        self.l1_conv = nn.Conv2d(c1, c1, 3, padding=1)
        self.l1_bn = nn.BatchNorm2d(c1)
        self.l1_out = nn.Conv2d(c1 + 1, c1, 3, padding=1)
        self.head = nn.Conv2d(c1, 1, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            # he_normal for the spatial convs (as in the Keras encoder); 1x1 convs keep PyTorch's default
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                if m.weight.shape[-1] > 1 or m.weight.shape[-2] > 1:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, AttentionB):
                nn.init.normal_(m.psi.weight, std=0.02)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"MSRFNet expects N x 3 x H x W input, got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(f"MSRFNet input H, W must be multiples of {self.size_divisor}, got {h}x{w}")

    def _forward_all(self, x: torch.Tensor, canny: torch.Tensor | None = None):
        self._check(x)
        size = x.shape[-2:]
        if canny is None:
            canny = canny_edges(x, *self.canny_thresholds)
        n11 = self.enc1(x)
        n21 = self.enc2(n11)
        n31 = self.enc3(n21)
        n41 = self.enc4(n31)
        n13, n23, n33, n43 = self.msrf(n11, n21, n31, n41)

        edge_logits = self.shape(n23, n33, n43, size)
        cw = torch.sigmoid(self.fuse_cw(torch.cat([torch.sigmoid(edge_logits), canny], dim=1)))
        edge = F.relu(self.fuse_bn(self.fuse_edge(cw)))

        n34, p4 = self.dec3(n33, n43)
        n24, p2 = self.dec2(n23, n34)
        t = F.relu(self.l1_in(torch.cat([self.up1(n24), n13], dim=1)))
        n14 = self.l1_bn(F.relu(self.l1_conv(t))) + t
        n14 = F.relu(self.l1_out(torch.cat([n14, edge], dim=1)))
        logits = self.head(n14)
        pred2 = F.interpolate(p2, size=size, mode="bilinear", align_corners=False)
        pred4 = F.interpolate(p4, size=size, mode="bilinear", align_corners=False)
        return logits, pred2, pred4, edge_logits

    def forward(self, x: torch.Tensor, canny: torch.Tensor | None = None) -> torch.Tensor:
        """Vessel logits N x 1 x H x W (``canny``: optional precomputed N x 1 x H x W edge map in [0,1])."""
        return self._forward_all(x, canny)[0]

    def forward_train(self, x: torch.Tensor, canny: torch.Tensor | None = None) -> dict:
        logits, pred2, pred4, edge = self._forward_all(x, canny)
        w = self.loss_weights
        return {
            "logits": logits,
            "aux": [(pred2, w["pred2"]), (pred4, w["pred4"])],
            "edge": edge,
            "main_weight": w["main"],
            "edge_weight": w["edge"],
        }


@register_model(
    "msrf",
    task="segmentation",
    arch="msrf",
    width=16,
    description="MSRF-Net (multi-scale residual fusion, 10 DSDF blocks, gated shape stream), compact width 16 for CPU",
)
def msrf(**kwargs) -> nn.Module:
    return MSRFNet(**{"base": 16, **kwargs})


@register_model(
    "msrf_paper",
    task="segmentation",
    arch="msrf",
    width=32,
    description="MSRF-Net at the paper width (32/64/128/256)",
)
def msrf_paper(**kwargs) -> nn.Module:
    return MSRFNet(**{"base": 32, **kwargs})


@register_model(
    "msrf_tiny",
    task="segmentation",
    arch="msrf",
    width=4,
    description="MSRF-Net width 4, for fast tests",
)
def msrf_tiny(**kwargs) -> nn.Module:
    return MSRFNet(**{"base": 4, **kwargs})


@register_model(
    "msrf_w8",
    task="segmentation",
    arch="msrf",
    width=8,
    description="MSRF-Net width 8 (8/16/32/64), the variant trained on CPU and shipped",
)
def msrf_w8(**kwargs) -> nn.Module:
    return MSRFNet(**{"base": 8, **kwargs})
