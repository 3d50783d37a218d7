"""Cofe-Net (Shen et al., IEEE TMI 2021): fundus enhancement by an encoder-decoder G guided by a retinal
structure branch (RSA) and a low-quality attention map (LQA), run at two scales with shared weights.
Built from the digest in seeds.md section 1.6, with a width parameter ``w`` (the paper's G is
32/64/64/128 channels, i.e. ``w = 32``; LQA 64/128/256 = 2w/4w/8w).

Differences from the paper, all forced or stated:
- RSA: the paper's CE-Net weights were never published; the RSA here is this project's IMFF-Net
  segmenter (``imff``), whose decoder gives features at exactly the scales G needs (1/2, 1/4, 1/8:
  its d3, d2, d1), initialised from the shipped ``weights/imff.pt`` by the trainer and fine-tuned
  jointly. Its input is RGB in [0, 1] (IMFF's convention) instead of CE-Net's ``I*3.2-1.6``. It keeps
  ``imff.py``'s APF wiring (the pooling branch takes the raw skip, not the SE output as in IMFF-Net's
  source), and its ``d3`` is the APF level, so every shipped model with this branch was trained that way.
- The 1/2-scale input is a 2x2 average (area) downsample of the full-scale input (paper: bicubic).
- ``cofe_g`` is G alone, one pass (the paper's G-only wrapper applies G twice).
- Output rule: ``sigmoid(logit(I) + G(.))``, a learned correction of the input that starts as the
  identity (the released code has a ``learn_residual`` switch for this, broken: it adds Python's builtin
  ``input``). With the paper's plain sigmoid output and N(0, 0.02) init, a compact G trained on CPU was
  still a near-constant image after 250 steps (validation PSNR 15.2 dB vs 17.0 dB for the degraded
  input); ``residual=False`` restores the paper's rule.
- ``cofe_add``: the same network with an additive output rule, ``clip(I + G(.), 0, 1)`` (``output="add"``;
  unclipped while training, so the L1 gradient reaches every pixel). Measured reason: through the logit
  rule the gradient of a near-black channel is ``s(1 - s)``, about 0.01 where a Cofe-Net "hole" darkens
  green and blue to a few code values, so those channels are barely lifted and the red one overshoots
  (the shipped ``cofe`` paints a saturated red blob over a deep hole: validation DRIVE 39, released 111,
  output mean blue 0.06 against the clean 0.20). A U-Net trained on released 111 alone (batch 8, lr 1e-3)
  with either rule: validation PSNR on 111 at step 100 18.05 dB (logit) against 18.39 dB (additive).
- Init: He-normal with each ResBlock's second conv scaled by 1/4 (see ``reset_parameters``).
- ``cofe_add_ctx`` (an extension, not in the paper): ``cofe_add`` with an image-level context at G's
  bottleneck (:class:`GlobalContext`). Measured reason: the error the shipped enhancer leaves is smooth
  colour and illumination over the whole photograph (README, "Where the remaining PSNR gap lies"), while
  G sees the frame only through its convolutions (a theoretical radius of about 420 px through the
  bottleneck, an effective one far smaller) and the structure branch's squeeze-excitation gates, trained
  for vessels. It starts as the identity, so ``cofe_add`` weights initialise it exactly
  (``new_parameters``).

The forward pass returns the enhanced image in [0, 1]; ``forward_train`` returns every output the loss
needs: ``out`` (full scale), ``out_half`` (the coarse pass, two-scale models only), ``vessel_logits``
(RSA models) and ``attention`` (LQA models; no loss is put on it, as in the paper).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fundus_pipeline.models.imff import IMFFNet
from fundus_pipeline.models.registry import register_model


def residual_output(r: torch.Tensor, x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``sigmoid(logit(x) + r)``: the learned correction ``r`` acts on the input's logit, so ``r = 0`` returns
    the input (clipped to [eps, 1 - eps]) and the output stays in (0, 1)."""
    return torch.sigmoid(torch.logit(x.clamp(eps, 1 - eps)) + r)


def additive_output(r: torch.Tensor, x: torch.Tensor, training: bool) -> torch.Tensor:
    """``x + r``, clipped to [0, 1] except while training (the clip would stop the gradient of every pixel
    it touches; the L1 loss pulls the unclipped output into range by itself)."""
    y = x + r
    return y if training else y.clamp(0.0, 1.0)


# output rule -> the manifest's name of the output activation (``ImageOutputSpec.activation``)
OUTPUT_RULES = {"logit": "sigmoid", "add": "clip(input + correction, 0, 1)"}


def _checked_rule(output: str) -> str:
    if output not in OUTPUT_RULES:
        raise ValueError(f"output must be one of {tuple(OUTPUT_RULES)}, got {output!r}")
    return output


def _output(rule: str, r: torch.Tensor, x: torch.Tensor, training: bool) -> torch.Tensor:
    return additive_output(r, x, training) if rule == "add" else residual_output(r, x)


def _conv(cin: int, cout: int, k: int = 5, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class ResBlock(nn.Module):
    """``t = conv_a(x); out = relu(t + conv_b(relu(t)))``: the identity path is conv_a's output (5x5 convs)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv_a = _conv(c, c)
        self.conv_b = _conv(c, c)

    def forward(self, x):
        t = self.conv_a(x)
        return F.relu(t + self.conv_b(F.relu(t)))


def _res(c: int, n: int = 3) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(c) for _ in range(n)])


class LQA(nn.Module):
    """Low-quality attention: a map ``a`` at 1/2 of the input's resolution (no activation)."""

    def __init__(self, w: int):
        super().__init__()
        c1, c2, c3 = 2 * w, 4 * w, 8 * w
        self.down = nn.Sequential(
            nn.MaxPool2d(2),
            nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.up = nn.Sequential(
            nn.Conv2d(c3, c3, 3, padding=1), nn.ReLU(inplace=True), nn.ConvTranspose2d(c3, c3, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c2, 3, padding=1), nn.ReLU(inplace=True), nn.ConvTranspose2d(c2, c2, 4, 2, 1), nn.ReLU(inplace=True),
            nn.Conv2d(c2, c1, 3, padding=1), nn.ReLU(inplace=True), nn.ConvTranspose2d(c1, c1, 4, 2, 1), nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(c1, 1, 1)

    def forward(self, x):
        return self.head(self.up(self.down(x)))


class GlobalContext(nn.Module):
    """Image-level context (FiLM): the mean and maximum of each bottleneck channel over the whole frame, an
    MLP, and a per-channel scale and shift of the bottleneck, ``y * (1 + g) + b``. The MLP's last layer
    starts at zero, so the module starts as the identity. The frame is the FOV's bounding square, seen whole
    by ``fundus enhance`` (one pass per photograph), so train it on whole frames (``--crop`` = the frame)."""

    def __init__(self, c: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * c, 2 * c), nn.ReLU(inplace=True), nn.Linear(2 * c, 2 * c))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.mlp[0].weight, nonlinearity="relu")
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, y):
        g, b = self.mlp(torch.cat([y.mean((2, 3)), y.amax((2, 3))], dim=1)).chunk(2, dim=1)
        return y * (1 + g[..., None, None]) + b[..., None, None]


class EnhanceG(nn.Module):
    """The enhancement encoder-decoder G (24 ResBlocks, three strided levels, ConvT decoder with additive
    skips; returns the pre-activation of the sigmoid output). ``rsa_ch``: channels of the structure features concatenated at 1/2, 1/4 and
    1/8 scale (None: no concatenation, the fuse convs are c->c); ``context``: a :class:`GlobalContext` on the
    bottleneck."""

    def __init__(self, in_ch: int, w: int, rsa_ch: tuple[int, int, int] | None, context: bool = False):
        super().__init__()
        c1, c2, c3 = w, 2 * w, 4 * w
        r1, r2, r3 = rsa_ch or (0, 0, 0)
        self.inc = nn.Sequential(_conv(in_ch, c1), nn.ReLU(inplace=True), _res(c1))
        self.down1 = nn.Sequential(_conv(c1, c2, stride=2), nn.ReLU(inplace=True))
        self.fuse1 = nn.Sequential(_conv(c2 + r1, c2), nn.ReLU(inplace=True), _res(c2))
        self.down2 = nn.Sequential(_conv(c2, c2, stride=2), nn.ReLU(inplace=True))
        self.fuse2 = nn.Sequential(_conv(c2 + r2, c2), nn.ReLU(inplace=True), _res(c2))
        self.down3 = nn.Sequential(_conv(c2, c3, stride=2), nn.ReLU(inplace=True))
        self.fuse3 = nn.Sequential(_conv(c3 + r3, c3), nn.ReLU(inplace=True), _res(c3))
        self.up3 = nn.Sequential(_res(c3), nn.ConvTranspose2d(c3, c2, 4, 2, 1))
        self.up2 = nn.Sequential(_res(c2), nn.ConvTranspose2d(c2, c2, 4, 2, 1))
        self.up1 = nn.Sequential(_res(c2), nn.ConvTranspose2d(c2, c1, 4, 2, 1))
        self.outc = nn.Sequential(_res(c1), _conv(c1, 3))
        self.context = GlobalContext(c3) if context else None

    def forward(self, x, feats=None, attention=None):
        def cat(t, i):
            return t if feats is None else torch.cat([t, feats[i]], dim=1)

        x1 = self.inc(x)
        t = self.down1(x1)
        if attention is not None:
            t = t * attention + t
        x2 = self.fuse1(cat(t, 0))
        x3 = self.fuse2(cat(self.down2(x2), 1))
        y = self.fuse3(cat(self.down3(x3), 2))
        if self.context is not None:
            y = self.context(y)
        y = self.up3(y) + x3
        y = self.up2(y) + x2
        y = self.up1(y) + x1
        return self.outc(y)  # pre-activation; CofeNet applies the output rule


class CofeNet(nn.Module):
    """Cofe-Net and its ablations. Input N x 3 x H x W RGB in [0, 1] (H, W divisible by ``size_divisor``)
    in the canonical frame (the FOV's bounding square); output the enhanced image, same shape."""

    in_channels = 3

    def __init__(self, w: int = 32, *, rsa: bool = True, lqa: bool = True, two_scale: bool = True, rsa_width: int = 16, residual: bool = True,
                 output: str = "logit", context: bool = False):
        super().__init__()
        self.w, self.has_rsa, self.has_lqa, self.two_scale, self.residual, self.output = w, rsa, lqa, two_scale, residual, _checked_rule(output)
        # two-scale: 1/2-scale pass, G needs /8 there and IMFF /16 at full scale -> /16 (x2 for the coarse pass)
        self.size_divisor = 32 if two_scale else 16
        self.rsa = IMFFNet(base=rsa_width) if rsa else None
        rsa_ch = (2 * rsa_width, 4 * rsa_width, 8 * rsa_width) if rsa else None
        self.lqa = LQA(w) if lqa else None
        self.g = EnhanceG(6 if two_scale else 3, w, rsa_ch, context)
        # tensors the model has beyond the same network without the context, which start as the identity:
        # weights of that network initialise this one exactly (``--init``; the rest is checked strictly)
        self.new_parameters = ("g.context.",) if context else ()
        self.upsample = nn.ConvTranspose2d(3, 3, 4, 2, 1) if two_scale else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal init of every conv (bias 0), the second conv of each ResBlock scaled by 1/4.

        Not the paper's N(0, 0.02): with it the 24 unnormalised ResBlocks start as a constant (feature
        standard deviation measured at 1e-6 after the second level at width 8, 2e-4 at the paper's width
        32, output 0.5 everywhere). Plain He init explodes instead (pre-sigmoid std 49, the output
        saturates); scaling the residual branch by 1/4 keeps every level's std at 0.1-0.3. The structure
        branch is then loaded from the shipped segmenter by the trainer (its BatchNorm starts at 1, 0)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                with torch.no_grad():
                    m.conv_b.weight.mul_(0.25)
        if self.residual:  # the network starts as the identity
            nn.init.zeros_(self.g.outc[-1].weight)
        if self.g.context is not None:
            self.g.context.reset_parameters()

    def forward_train(self, x: torch.Tensor, vessel_logits: bool = True) -> dict:
        """The outputs the losses read; ``vessel_logits=False`` leaves out the structure branch's vessel logits (a
        training term only), which ``forward`` does not return."""
        out: dict = {}
        feats = None
        if self.rsa is not None:
            logits, feats = self.rsa.forward_features(x, logits=vessel_logits)
            if vessel_logits:
                out["vessel_logits"] = logits
        a = self.lqa(x) if self.lqa is not None else None
        if a is not None:
            out["attention"] = a
        if not self.two_scale:
            out["out"] = self._finish(self.g(x, feats, a), x)
            return out
        xh = F.avg_pool2d(x, 2)
        fh = [F.max_pool2d(f, 2) for f in feats] if feats is not None else None
        ah = F.max_pool2d(a, 2) if a is not None else None
        oh = self._finish(self.g(torch.cat([xh, xh], dim=1), fh, ah), xh)
        out["out_half"] = oh
        out["out"] = self._finish(self.g(torch.cat([x, self.upsample(oh)], dim=1), feats, a), x)
        return out

    def _finish(self, r: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _output(self.output, r, x, self.training) if self.residual else torch.sigmoid(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_train(x, vessel_logits=False)["out"]


class EnhanceUNet(nn.Module):
    """The learned baseline: a plain U-Net (4 levels of [Conv3x3, ReLU] x 2, max-pool down, ConvT up,
    concatenated skips) with the same output rule as Cofe-Net (``residual_output``: a correction of the
    input's logit, starting as the identity), about Cofe-Net's compact parameter count at width ``w``."""

    in_channels = 3
    size_divisor = 16

    def __init__(self, w: int = 16, output: str = "logit"):
        super().__init__()
        self.output = _checked_rule(output)
        chs = [w, 2 * w, 4 * w, 8 * w, 16 * w]

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True))

        self.enc = nn.ModuleList([block(3, chs[0])] + [block(chs[i], chs[i + 1]) for i in range(4)])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(chs[i + 1], chs[i], 2, 2) for i in reversed(range(4))])
        self.dec = nn.ModuleList([block(2 * chs[i], chs[i]) for i in reversed(range(4))])
        self.head = nn.Conv2d(chs[0], 3, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward_train(self, x: torch.Tensor) -> dict:
        skips = []
        y = x
        for i, enc in enumerate(self.enc):
            y = enc(y if i == 0 else F.max_pool2d(y, 2))
            skips.append(y)
        skips.pop()
        for up, dec in zip(self.ups, self.dec):
            y = dec(torch.cat([up(y), skips.pop()], dim=1))
        return {"out": _output(self.output, self.head(y), x, self.training)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_train(x)["out"]


_DESC = "Cofe-Net enhancement"


@register_model("cofe", task="enhancement", arch="cofe", width=8, description=f"{_DESC}: two-scale G + RSA (IMFF w16) + LQA, compact width 8 (shipped)")
def cofe(**kw) -> CofeNet:
    return CofeNet(8, **kw)


@register_model("cofe_add", task="enhancement", arch="cofe", width=8, description=f"{_DESC}: as cofe, with the additive output rule clip(I + G)")
def cofe_add(**kw) -> CofeNet:
    return CofeNet(8, output="add", **kw)


@register_model("cofe_add_ctx", task="enhancement", arch="cofe", width=8,
                description=f"{_DESC}: as cofe_add, with an image-level context (FiLM from global pooling) at G's bottleneck")
def cofe_add_ctx(**kw) -> CofeNet:
    return CofeNet(8, output="add", context=True, **kw)


@register_model("cofe_paper", task="enhancement", arch="cofe", width=32, description=f"{_DESC} at the paper's G width 32 (RSA IMFF w16)")
def cofe_paper(**kw) -> CofeNet:
    return CofeNet(32, **kw)


@register_model("cofe_rsa_lqa", task="enhancement", arch="cofe", width=8, description=f"{_DESC} ablation: single-scale G + RSA + LQA, width 8")
def cofe_rsa_lqa(**kw) -> CofeNet:
    return CofeNet(8, two_scale=False, **kw)


@register_model("cofe_rsa", task="enhancement", arch="cofe", width=8, description=f"{_DESC} ablation: single-scale G + RSA, width 8")
def cofe_rsa(**kw) -> CofeNet:
    return CofeNet(8, lqa=False, two_scale=False, **kw)


@register_model("cofe_g", task="enhancement", arch="cofe", width=8, description=f"{_DESC} ablation: G alone (one pass), width 8")
def cofe_g(**kw) -> CofeNet:
    return CofeNet(8, rsa=False, lqa=False, two_scale=False, **kw)


@register_model("cofe_tiny", task="enhancement", arch="cofe", width=2, description=f"{_DESC}, width 2 with an IMFF w2 RSA (tests only)")
def cofe_tiny(**kw) -> CofeNet:
    return CofeNet(2, rsa_width=2, **kw)


@register_model("unet_enh", task="enhancement", arch="unet", width=20, description="Plain U-Net enhancement baseline, width 20 (about the compact Cofe-Net's parameter count)")
def unet_enh(**kw) -> EnhanceUNet:
    return EnhanceUNet(20, **kw)


@register_model("unet_enh_tiny", task="enhancement", arch="unet", width=2, description="Plain U-Net enhancement baseline, width 2 (tests only)")
def unet_enh_tiny(**kw) -> EnhanceUNet:
    return EnhanceUNet(2, **kw)
