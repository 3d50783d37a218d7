"""IMFF-Net (Liu et al., BSPC 2024): U-Net encoder/decoder with an APF block on the second skip and a
UDFF side path fused with fixed 0.3/0.7 weights. Built from the digest in seeds.md section 2, with a
width parameter (the paper's width is 64 base channels, 34.7 M parameters).

The network returns vessel *logits*; the paper's final sigmoid is applied by the caller.

Deviation from the source, not forced (audit campaign 15a, F1): in the APF block the upsample -> Conv3x3
-> max/avg-pool branch takes the raw skip, ``F.interpolate(skip, ...)``; the authors' ``APF.forward``
(and the digest's chain, seeds.md section 2.1) applies the SE scaling first and feeds the SE output to
that branch. Only the concatenated first half, ``s``, is SE-scaled here. The parameter count is the same
either way (``imff_paper`` has the digest's 34,684,354), but the function differs: on a random
1x32x32x32 skip through the shipped APF the two wirings differ by up to 0.448 (mean |output| 0.384).
``weights/imff.pt`` was trained with this wiring. So was the structure branch of every shipped Cofe-Net
model that has one (``cofe.pt`` and its variants): it is this class, started from ``imff.pt``, and
Cofe-Net's G takes its ``d3``, the APF level. SDMP-Net's frozen CNN stream uses only e1-e3, before the
APF, and is not affected. The source's wiring is left for the next retrain of ``imff.pt``; changing it
now would make the shipped weights compute another function.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fundus_pipeline.models.registry import register_model


class ConvBlock(nn.Sequential):
    """[Conv3x3 -> BN -> ReLU] x 2."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class EncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBlock(cin, cout)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        s = self.conv(x)
        return s, self.pool(s)


class SqueezeExcite(nn.Module):
    """GAP -> FC C->C/4 (no bias) -> ReLU -> FC C/4->C (no bias) -> sigmoid -> channel scale."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, c // reduction)
        self.fc1 = nn.Linear(c, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, c, bias=False)

    def forward(self, x):
        w = x.mean(dim=(2, 3))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return x * w[:, :, None, None]


class APF(nn.Module):
    """Attention Pooling Feature block on a skip connection (channels preserved). The upsample/conv/pool
    branch takes the raw skip, where the source feeds it the SE output (module docstring, F1)."""

    def __init__(self, c: int):
        super().__init__()
        self.se = SqueezeExcite(c)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fuse = nn.Conv2d(2 * c, c, 1)

    def forward(self, skip):
        s = self.se(skip)
        u = self.conv(F.interpolate(skip, scale_factor=2, mode="nearest"))
        p = 0.5 * F.max_pool2d(u, 2) + 0.5 * F.avg_pool2d(u, 2)
        return self.fuse(torch.cat([s, p], dim=1))


class DecoderBlock(nn.Module):
    """ConvT2x2 s2 in->out, concat the skip (optionally through APF), conv_block(2*out -> out)."""

    def __init__(self, cin: int, cout: int, apf: bool = False):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2)
        self.apf = APF(cout) if apf else None
        self.conv = ConvBlock(2 * cout, cout)

    def forward(self, x, skip):
        x = self.up(x)
        if self.apf is not None:
            skip = self.apf(skip)
        return self.conv(torch.cat([x, skip], dim=1))


class IMFFNet(nn.Module):
    """IMFF-Net with base width ``base`` (paper: 64). Input N x 3 x H x W RGB in [0,1], H, W divisible by 16."""

    size_divisor = 16
    in_channels = 3

    def __init__(self, base: int = 64):
        super().__init__()
        c1, c2, c3, c4, c5 = base, 2 * base, 4 * base, 8 * base, 16 * base
        self.base = base
        self.e1 = EncoderBlock(3, c1)
        self.e2 = EncoderBlock(c1, c2)
        self.e3 = EncoderBlock(c2, c3)
        self.e4 = EncoderBlock(c3, c4)
        self.bottleneck = ConvBlock(c4, c5)
        self.d1 = DecoderBlock(c5, c4)
        self.d2 = DecoderBlock(c4, c3)
        self.d3 = DecoderBlock(c3, c2, apf=True)
        self.d4 = DecoderBlock(c2, c1)
        # UDFF side path: 1x1 lifts of the pooled encoder maps and transposed-conv upsamplers.
        self.lift4 = nn.Conv2d(c4, c5, 1)
        self.lift3 = nn.Conv2d(c3, c4, 1)
        self.lift2 = nn.Conv2d(c2, c3, 1)
        self.lift1 = nn.Conv2d(c1, c2, 1)
        self.up1 = nn.ConvTranspose2d(c5, c4, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(c4, c3, 2, stride=2)
        self.up3 = nn.ConvTranspose2d(c3, c2, 2, stride=2)
        self.up4 = nn.ConvTranspose2d(c2, 1, 2, stride=2)
        self.head = nn.Conv2d(c1, 1, 1)

    def forward(self, x):
        return self.forward_features(x)[0]

    def forward_features(self, x, logits: bool = True):
        """(vessel logits, [d3, d2, d1]): the decoder features at 1/2, 1/4 and 1/8 scale (2, 4 and 8 x base
        channels), which Cofe-Net's enhancement network takes from its structure branch. ``logits=False``: (None,
        the features), without the full-resolution decoder block, the UDFF side path and the head, which only the
        logits need (Cofe-Net's inference: 11% of an enhancement's time; campaign 36b B2)."""
        s1, p1 = self.e1(x)
        s2, p2 = self.e2(p1)
        s3, p3 = self.e3(p2)
        s4, p4 = self.e4(p3)
        b = self.bottleneck(p4)
        d1 = self.d1(b, s4)
        d2 = self.d2(d1, s3)
        d3 = self.d3(d2, s2)
        if not logits:
            return None, [d3, d2, d1]
        d4 = self.d4(d3, s1)
        y1 = b + self.lift4(p4)
        u1 = self.up1(y1)
        y2 = 0.3 * u1 + 0.7 * (d1 + self.lift3(p3))
        u2 = self.up2(y2)
        y3 = 0.3 * u2 + 0.7 * (d2 + self.lift2(p2))
        u3 = self.up3(y3)
        y4 = 0.3 * u3 + 0.7 * (d3 + self.lift1(p1))
        u4 = self.up4(y4)
        return 0.3 * u4 + 0.7 * self.head(d4), [d3, d2, d1]

    def forward_train(self, x):
        """Training outputs and the loss weighting the model declares (one output, weight 1; no aux, no edge)."""
        return {"logits": self.forward(x), "aux": [], "edge": None, "main_weight": 1.0, "edge_weight": 0.0}


@register_model("imff_paper", task="segmentation", arch="imff", width=64, description="IMFF-Net at the paper's width (34.7 M parameters)")
def imff_paper(**kw) -> IMFFNet:
    return IMFFNet(base=64, **kw)


@register_model("imff", task="segmentation", arch="imff", width=16, description="IMFF-Net, compact width 16 for CPU (shipped)")
def imff(**kw) -> IMFFNet:
    return IMFFNet(base=16, **kw)


@register_model("imff_w8", task="segmentation", arch="imff", width=8, description="IMFF-Net, width 8")
def imff_w8(**kw) -> IMFFNet:
    return IMFFNet(base=8, **kw)


@register_model("imff_tiny", task="segmentation", arch="imff", width=2, description="IMFF-Net, width 2 (tests only)")
def imff_tiny(**kw) -> IMFFNet:
    return IMFFNet(base=2, **kw)
