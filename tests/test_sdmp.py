"""SDMP-Net and its parts: the grid_sample deformable convolution (against F.conv2d), the fundus ViT, the
IMFF encoder stream (against IMFF-Net's own encoder) and the full-reference quality network (scores in
(0, 1), frozen streams, ablations, state-dict round trip, catalogue parameter counts)."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from fundus_pipeline.models.catalog import CATALOG
from fundus_pipeline.models.registry import build_model
from fundus_pipeline.models.sdmp import DeformConv2d, FundusViT, IMFFEncoder, SDMPNet

torch.set_num_threads(1)

TINY = dict(width=4, cnn_base=2, vit_dim=16, vit_depth=2, vit_heads=2)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _pair(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    ref = _rand(n, 3, 224, 224, seed=1)
    return (ref * 1.3 + 0.05 * _rand(n, 3, 224, 224, seed=2)).clamp(0, 1), ref


# --- DeformConv2d -----------------------------------------------------------------------------------


def _deform(cin: int = 3, cout: int = 4) -> DeformConv2d:
    torch.manual_seed(0)
    return DeformConv2d(cin, cout)


def _offsets(n: int, h: int, w: int, dy: float, dx: float) -> torch.Tensor:
    off = torch.zeros(n, 18, h, w)
    off[:, 0::2], off[:, 1::2] = dy, dx
    return off


def test_deform_conv_with_zero_offsets_is_conv2d():
    m, x = _deform(), _rand(2, 3, 9, 11)
    y = m(x, torch.zeros(2, 18, 9, 11))
    torch.testing.assert_close(y, F.conv2d(x, m.weight, m.bias, padding=1), rtol=0, atol=1e-5)


def test_deform_conv_integer_offset_shifts_the_input():
    m, x = _deform(), _rand(2, 3, 9, 11)
    y = m(x, _offsets(2, 9, 11, 0.0, 1.0))  # every tap one pixel to the right
    shifted = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], dim=-1)  # x shifted one pixel left
    ref = F.conv2d(shifted, m.weight, m.bias, padding=1)
    torch.testing.assert_close(y[..., 1:-1], ref[..., 1:-1], rtol=0, atol=1e-5)  # interior columns
    y = m(x, _offsets(2, 9, 11, -1.0, 0.0))  # dy = -1: taps one row up
    ref = F.conv2d(torch.cat([torch.zeros_like(x[..., :1, :]), x[..., :-1, :]], dim=-2), m.weight, m.bias, padding=1)
    torch.testing.assert_close(y[..., 1:-1, :], ref[..., 1:-1, :], rtol=0, atol=1e-5)  # interior rows


def test_deform_conv_half_pixel_offset_is_bilinear():
    m, x = _deform(), _rand(1, 3, 8, 8)
    y = m(x, _offsets(1, 8, 8, 0.0, 0.5))
    x1 = torch.cat([x[..., 1:], torch.zeros_like(x[..., :1])], dim=-1)
    ref = F.conv2d(0.5 * (x + x1), m.weight, m.bias, padding=1)
    torch.testing.assert_close(y[..., 1:-1], ref[..., 1:-1], rtol=0, atol=1e-5)


def test_deform_conv_gradient_reaches_the_offsets():
    m, x = _deform(), _rand(1, 3, 7, 7)
    off = (0.3 * _rand(1, 18, 7, 7, seed=3)).requires_grad_()
    m(x, off).square().sum().backward()
    assert off.grad is not None and off.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="offset must be"):
        m(x, torch.zeros(1, 9, 7, 7))


# --- FundusViT --------------------------------------------------------------------------------------


def test_vit_shapes_size_check_and_determinism():
    torch.manual_seed(0)
    vit = FundusViT(dim=16, depth=2, heads=2, n_outputs=5).eval()
    x = _rand(2, 3, 224, 224)
    with torch.no_grad():
        tokens = vit.forward_tokens(x)
        assert len(tokens) == 2 and all(t.shape == (2, 16, 28, 28) for t in tokens)
        assert not torch.equal(tokens[0], tokens[1])
        y = vit(x)
        assert y.shape == (2, 5) and torch.isfinite(y).all()
        assert torch.equal(vit(x), y)
    with pytest.raises(ValueError, match="224 x 224"):
        vit(_rand(1, 3, 256, 256))
    full = build_model("vit_fundus")
    assert (full.in_channels, full.img_size) == (3, 224)
    with torch.no_grad():
        tokens = full.forward_tokens(x[:1])
    assert len(tokens) == 5 and tokens[-1].shape == (1, 96, 28, 28)


def test_vit_normalises_its_input_to_minus_one_one():
    torch.manual_seed(0)
    vit = FundusViT(dim=16, depth=1, heads=2).eval()
    seen = []
    vit.patch_embed.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = _rand(1, 3, 224, 224)
    with torch.no_grad():
        vit(x)
    torch.testing.assert_close(seen[0], 2 * x - 1, rtol=0, atol=1e-6)


# --- IMFFEncoder -------------------------------------------------------------------------------------


def _imff_tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model("imff_tiny")
    for m in net.modules():  # non-trivial BatchNorm statistics, so a missed buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_imff_encoder_loads_imff_keys_and_matches_its_encoder():
    net = _imff_tiny()
    enc = IMFFEncoder(base=2).eval()
    x = _rand(2, 3, 64, 64)
    with torch.no_grad():
        before = enc(x)
        enc.load_from_imff(net.state_dict())
        out = enc(x)
        s1, p1 = net.e1(x)
        s2, p2 = net.e2(p1)
        s3, _ = net.e3(p2)
    assert out.shape == (2, 14, 16, 16) and enc.out_channels == 14
    assert not torch.allclose(before, out)
    torch.testing.assert_close(out[:, 6:], s3, rtol=0, atol=0)
    torch.testing.assert_close(out[:, :2], F.avg_pool2d(s1, 4), rtol=0, atol=0)
    torch.testing.assert_close(out[:, 2:6], F.avg_pool2d(s2, 2), rtol=0, atol=0)
    partial = {k: v for k, v in net.state_dict().items() if not k.startswith("e3.")}
    with pytest.raises(RuntimeError, match="e3"):
        enc.load_from_imff(partial)


# --- SDMPNet -----------------------------------------------------------------------------------------


def _tiny(**kw) -> SDMPNet:
    torch.manual_seed(0)
    return SDMPNet(**{**TINY, **kw})


@pytest.mark.parametrize(
    "kw",
    [{}, {"deform": False}, {"streams": ("cnn",)}, {"streams": ("vit",)}],
    ids=["full", "nodeform", "cnn", "vit"],
)
def test_sdmp_scores_gradients_and_modes(kw):
    model = _tiny(**kw).eval()
    assert hasattr(model, "deform_conv") == (kw == {})
    assert (model.cnn is None, model.vit is None) == (kw.get("streams") == ("vit",), kw.get("streams") == ("cnn",))
    dis, ref = _pair(2)
    with torch.no_grad():
        s = model(dis, ref)
        assert s.shape == (2,) and torch.isfinite(s).all()
        assert float(s.min()) > 0 and float(s.max()) < 1
        assert torch.equal(model(dis, ref), s)
        same = model(ref, ref)
        assert torch.isfinite(same).all()

    model.train()
    assert model.training and model.smooth.training and model.drop.training
    streams = [m for m in (model.cnn, model.vit) if m is not None]
    assert all(not m.training for st in streams for m in st.modules())
    train_s = model.forward_train(dis, ref)
    assert train_s.shape == (2,) and train_s.requires_grad
    train_s.sum().backward()
    trainable = model.trainable_parameters()
    frozen = [p for st in streams for p in st.parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters()} - {id(p) for p in frozen}
    assert all(p.grad is not None for p in trainable)
    assert model.smooth[0].weight.grad.abs().sum() > 0 and model.fc2.weight.grad.abs().sum() > 0
    if kw == {}:
        assert model.offset.weight.grad.abs().sum() > 0  # zero-initialised, still learns


def test_sdmp_head_is_channels_last():
    """fc1 sees one grid cell's smoothed feature vector per row (the seed's view(-1, 512) mixed cells)."""
    model = _tiny().eval()
    seen = {}
    model.smooth.register_forward_hook(lambda _m, _a, out: seen.update(smooth=out))
    model.fc1.register_forward_hook(lambda _m, args, _o: seen.update(fc1=args[0]))
    with torch.no_grad():
        model(*_pair(2))
    assert seen["smooth"].shape == (2, 8, 28, 28) and seen["fc1"].shape == (2, 28, 28, 8)
    torch.testing.assert_close(seen["fc1"][1, 3, 5], seen["smooth"][1, :, 3, 5], rtol=0, atol=0)


def test_sdmp_dropout_is_active_only_in_train_mode():
    model = _tiny()
    dis, ref = _pair(1)
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = model.forward_train(dis, ref)
        torch.manual_seed(2)
        b = model.forward_train(dis, ref)
        model.eval()
        c, d = model(dis, ref), model(dis, ref)
    assert not torch.equal(a, b) and torch.equal(c, d)


def test_sdmp_offsets_move_the_cnn_features():
    model = _tiny().eval()
    dis, ref = _pair(1)
    with torch.no_grad():
        plain = model._features(dis, ref)
        model.offset.bias.fill_(1.0)  # every tap one pixel down-right
        shifted = model._features(dis, ref)
        model.offset.bias.zero_()
        torch.manual_seed(5)
        model.offset.weight.normal_(std=0.5)  # offsets predicted from the reference's ViT features
        moved = model._features(dis, ref)
    for a, b, c in zip(plain, shifted, moved):
        assert (a - b).abs().max() > 1e-4 and (a - c).abs().max() > 1e-4
    with pytest.raises(ValueError, match="streams"):
        SDMPNet(**{**TINY, "streams": ("cnn", "resnet")})
    with pytest.raises(ValueError, match="differ in shape"):
        model(dis, ref[..., :112, :112])


def test_sdmp_load_streams():
    model = _tiny().eval()
    imff = _imff_tiny()
    torch.manual_seed(7)
    vit = build_model("vit_fundus_tiny")
    model.load_streams(imff.state_dict(), vit.state_dict())
    for k, v in vit.state_dict().items():
        assert torch.equal(model.vit.state_dict()[k], v)
    for k, v in model.cnn.state_dict().items():
        assert torch.equal(imff.state_dict()[k], v)
    assert all(not p.requires_grad for p in model.vit.parameters())
    cnn_only = _tiny(streams=("cnn",))
    cnn_only.load_streams(imff.state_dict(), vit.state_dict())  # the absent ViT stream's state is skipped
    assert torch.equal(cnn_only.cnn.e3.conv[0].weight, imff.e3.conv[0].weight)


def test_sdmp_state_dict_round_trip():
    model = build_model("sdmp_tiny").eval()
    dis, ref = _pair(2)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)
    fresh = build_model("sdmp_tiny").eval()
    with torch.no_grad():
        y = model(dis, ref)
        assert not torch.equal(fresh(dis, ref), y)
        fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
        assert torch.equal(fresh(dis, ref), y)


@pytest.mark.parametrize("name", sorted(n for n, e in CATALOG.items() if e.arch in ("sdmp", "vit")))
def test_catalogue_parameter_counts(name):
    model = build_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == CATALOG[name].params, f"update models/catalog.py: {name} has {n:_} parameters"


def test_deform_conv_samples_at_float32_positions_under_autocast(monkeypatch):
    """Under bf16 autocast the sampling grid stays float32 (in bf16, pixel 40 + 0.1 would round to 40.0)."""
    import fundus_pipeline.models.sdmp as sdmp

    seen = []
    real = F.grid_sample

    def spy(x, grid, *a, **kw):
        seen.append((x.dtype, grid.dtype))
        return real(x, grid, *a, **kw)

    monkeypatch.setattr(sdmp.F, "grid_sample", spy)
    torch.manual_seed(0)
    conv = DeformConv2d(4, 4)
    x = torch.rand(1, 4, 56, 56)
    off = torch.full((1, 18, 56, 56), 0.1)
    ref = conv(x, off)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv(x.bfloat16(), off.bfloat16())
    assert seen == [(torch.float32, torch.float32)] * 2
    assert (low.float() - ref).abs().max() < 0.1
