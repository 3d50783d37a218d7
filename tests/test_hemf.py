"""HEMF grader (fundus_pipeline.models.hemf): RMT's decay mask and rotation, the decomposed retention
against a direct reference, multi-head external attention, the ablations and the gradient/input
sensitivity of the tiny model. The model contract (shapes, catalogue, round trip) is in
test_models_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fundus_pipeline.models.hemf import (
    EGF,
    ELF,
    HEMF,
    MHEA,
    RetentionRelPos2d,
    VisionRetentionChunk,
    expand_patch_stems,
    rotate_every_two,
    theta_shift,
)
from fundus_pipeline.models.registry import build_model

torch.set_num_threads(1)


def _n(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_decay_mask_and_gammas_follow_the_formula():
    rp = RetentionRelPos2d(dim=96, heads=8)  # initial_value 1, heads_range 3, as in HEMF's EGF blocks
    expected = [math.log(1 - 2 ** (-1 - 3 * h / 8)) for h in range(8)]
    torch.testing.assert_close(rp.decay, torch.tensor(expected), rtol=0, atol=1e-6)
    assert rp.decay[0].item() == pytest.approx(math.log(0.5))
    assert all(g < 0 for g in expected) and expected == sorted(expected)  # later heads decay more slowly
    mask = rp.decay_mask(5)
    assert mask.shape == (8, 5, 5)
    for h in range(8):
        for i in range(5):
            for j in range(5):
                assert mask[h, i, j].item() == pytest.approx(abs(i - j) * expected[h], abs=1e-6)
    # the rotation angles: 1 / 10000^linspace(0, 1, d/2), each repeated twice (d = 96 / 8 = 12)
    angle = 1.0 / 10000 ** torch.linspace(0, 1, 6)
    torch.testing.assert_close(rp.angle, torch.stack([angle, angle], 1).flatten())
    (sin, cos), (mh, mw) = rp(3, 4)
    assert sin.shape == cos.shape == (3, 4, 12) and mh.shape == (8, 3, 3) and mw.shape == (8, 4, 4)
    torch.testing.assert_close(sin[1, 2], torch.sin(6 * rp.angle))  # raster index 1 * 4 + 2
    # the EGF blocks use these rates (the tiny model has 2 heads)
    egf = build_model("hemf_tiny").global_stages[0]
    torch.testing.assert_close(egf.rel_pos.decay, torch.tensor([math.log(1 - 2 ** (-1 - 3 * h / 2)) for h in range(2)]))


def test_rotate_every_two_and_theta_shift():
    x = torch.arange(1.0, 7.0).view(1, 1, 1, 1, 6)
    assert rotate_every_two(x).flatten().tolist() == [-2.0, 1.0, -4.0, 3.0, -6.0, 5.0]
    # a pure rotation of each (even, odd) pair: norms are kept
    x = torch.randn(2, 3, 4, 5, 8)
    phase = torch.rand(4, 5, 4).repeat_interleave(2, -1)
    y = theta_shift(x, phase.sin(), phase.cos())
    torch.testing.assert_close(y.view(2, 3, 4, 5, 4, 2).norm(dim=-1), x.view(2, 3, 4, 5, 4, 2).norm(dim=-1))


def _reference_vrc(m: VisionRetentionChunk, x: torch.Tensor, rel_pos) -> torch.Tensor:
    """RMT's VisionRetentionChunk.forward, written out with its own permutations."""
    b, h, w, _ = x.shape
    (sin, cos), (mask_h, mask_w) = rel_pos
    n, d = m.heads, m.key_dim
    q, k, v = m.q_proj(x), m.k_proj(x) * m.scaling, m.v_proj(x)
    lepe = m.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    q = theta_shift(q.view(b, h, w, n, d).permute(0, 3, 1, 2, 4), sin, cos)
    k = theta_shift(k.view(b, h, w, n, d).permute(0, 3, 1, 2, 4), sin, cos)
    qw, kw = q.transpose(1, 2), k.transpose(1, 2)  # b h n w d
    v = v.reshape(b, h, w, n, -1).permute(0, 1, 3, 2, 4)
    v = torch.softmax(qw @ kw.transpose(-1, -2) + mask_w, -1) @ v
    qh, kh = q.permute(0, 3, 1, 2, 4), k.permute(0, 3, 1, 2, 4)  # b w n h d
    v = v.permute(0, 3, 2, 1, 4)
    out = (torch.softmax(qh @ kh.transpose(-1, -2) + mask_h, -1) @ v).permute(0, 3, 1, 2, 4).flatten(-2, -1)
    return m.out_proj(out + lepe)


def test_retention_matches_the_reference_and_decays():
    torch.manual_seed(0)
    m = VisionRetentionChunk(16, 4)
    for lin in (m.q_proj, m.k_proj):
        torch.nn.init.normal_(lin.weight, std=0.5)  # peaked attention, so a permutation bug shows
    rp = RetentionRelPos2d(16, 4)
    x = torch.randn(2, 6, 6, 16)
    torch.testing.assert_close(m(x, rp(6, 6)), _reference_vrc(m, x, rp(6, 6)), rtol=1e-5, atol=1e-5)
    # non-square maps are fine inside the retention (H then W masks); only MHEA needs squares
    x = torch.randn(1, 3, 5, 16)
    torch.testing.assert_close(m(x, rp(3, 5)), _reference_vrc(m, x, rp(3, 5)), rtol=1e-5, atol=1e-5)
    # the decay mask matters: without it the output differs
    (sin, cos), (mh, mw) = rp(3, 5)
    assert not torch.allclose(m(x, ((sin, cos), (mh, mw))), m(x, ((sin, cos), (0 * mh, 0 * mw))), atol=1e-4)


def test_egf_shares_its_two_layer_norms():
    egf = EGF(16, 2, layers=3)
    assert len(egf.vrc) == len(egf.fc) == 3
    assert sum(isinstance(mod, torch.nn.LayerNorm) for mod in egf.modules()) == 2
    assert egf(torch.randn(2, 16, 4, 4)).shape == (2, 16, 4, 4)


def test_mhea_shapes_and_double_normalisation():
    torch.manual_seed(0)
    m = MHEA(24, heads=4, memory_units=64)
    assert m.mk.weight.shape == (64, 6) and m.mv.weight.shape == (6, 64)  # shared by the heads, no bias
    assert m.mk.bias is None and m.mv.bias is None
    assert m.mk.weight.std().item() == pytest.approx(0.001, rel=0.3)
    torch.nn.init.normal_(m.mk.weight)
    torch.nn.init.normal_(m.mv.weight)
    x = torch.randn(2, 24, 8, 8)
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    attn = m.attention(x)
    assert attn.shape == (2, 4, 64, 64)  # N x heads x S memory units x HW tokens
    torch.testing.assert_close(attn.sum(dim=2), torch.ones(2, 4, 64))  # each token's weights over S sum to 1
    assert (attn >= 0).all()
    # the code's formulation: tokens b (h w) c split into heads, softmax over tokens, renormalise over S
    q = x.flatten(2).transpose(1, 2).reshape(2, 64, 4, 6).permute(0, 2, 1, 3)
    a = torch.softmax(m.mk(q), dim=2)
    a = a / a.sum(dim=3, keepdim=True)
    torch.testing.assert_close(attn, a.transpose(-1, -2))
    ref = m.mv(a).permute(0, 2, 1, 3).reshape(2, 64, 24).transpose(1, 2).reshape(2, 24, 8, 8)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="square"):
        m(torch.randn(1, 24, 4, 8))
    with pytest.raises(ValueError, match="divisible"):
        MHEA(10, heads=4)


def kinds(model, cls) -> int:
    return sum(isinstance(mod, cls) for mod in model.modules())


def _names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def test_ablations_really_differ():
    full, local, glob, nomhea = (build_model(n) for n in ("hemf", "hemf_local", "hemf_global", "hemf_nomhea"))
    # the full model: both branches, MHEA on both sides of every HEF block
    assert kinds(full, EGF) == 4 and kinds(full, ELF) == 8 and kinds(full, MHEA) == 8
    assert all(tuple(f.paths) == ("local", "global") for f in full.fusion)
    # local only: no global-branch parameters anywhere (branch, stem or HEF side)
    assert kinds(local, EGF) == 0 and kinds(local, VisionRetentionChunk) == 0 and kinds(local, MHEA) == 4
    assert not any(n.startswith("global_") or ".global." in n for n in _names(local))
    assert all(tuple(f.paths) == ("local",) for f in local.fusion)
    # global only: no local-branch parameters
    assert kinds(glob, ELF) == 0 and kinds(glob, EGF) == 4
    assert not any(n.startswith("local_") or ".local." in n for n in _names(glob))
    # without MHEA: no MHEA parameters, and exactly their count fewer
    assert kinds(nomhea, MHEA) == 0 and not any("mhea" in n for n in _names(nomhea))
    mhea_params = sum(_n(mod) for mod in full.modules() if isinstance(mod, MHEA))
    assert mhea_params > 0 and _n(full) - _n(nomhea) == mhea_params
    assert _n(full) > _n(local) > 0 and _n(full) > _n(glob) > 0
    # and the ablations compute different functions of the same input
    x = torch.rand(1, 3, 64, 64)
    torch.manual_seed(0)
    a = build_model("hemf_tiny").eval()
    torch.manual_seed(0)
    b = build_model("hemf_tiny", mhea=False).eval()
    b.load_state_dict(a.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x))


def test_gradient_reaches_both_branches():
    torch.manual_seed(0)
    model = build_model("hemf_tiny").train()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = model(x)
    assert out.shape == (2, 12)
    (out[:, :3].logsumexp(1).sum() + out[:, 3:].square().sum()).backward()
    for stem in (model.local_down[0][0], model.global_down[0][0]):
        assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
    assert model.local_stages[0][0].conv.weight.grad.abs().sum() > 0
    assert model.global_stages[0].vrc[0].q_proj.weight.grad.abs().sum() > 0
    assert model.fusion[0].paths["local"].mhea.mk.weight.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient (unused modules?): {missing}"


def test_output_depends_on_the_input_and_not_on_the_batch():
    torch.manual_seed(0)
    model = build_model("hemf_tiny").eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g)
    with torch.no_grad():
        y = model(x)
        x2 = x.clone()
        x2[0, :, 16:48, 16:48] = 1 - x2[0, :, 16:48, 16:48]
        y2 = model(x2)
        assert (y2[0] - y[0]).abs().max() > 1e-4  # the changed image's logits change...
        torch.testing.assert_close(y2[1:], y[1:], rtol=0, atol=1e-5)  # ...the others' do not
        torch.testing.assert_close(model(x[1:2]), y[1:2], rtol=1e-4, atol=1e-5)  # no mixing across the batch
        assert (model(x[:, :, :32, :32]) - y).abs().max() > 1e-4  # any square side divisible by 32 is accepted


@pytest.mark.parametrize("name", ["hemf_tiny", "grade_cnn_tiny"])
def test_input_checks(name):
    model = build_model(name).eval()
    with pytest.raises(ValueError, match="square"):
        model(torch.rand(1, 3, 64, 96))
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.rand(1, 3, 48, 48))
    with pytest.raises(ValueError, match="N x 3"):
        model(torch.rand(1, 1, 64, 64))


def test_constructor_checks():
    with pytest.raises(ValueError, match="branches"):
        HEMF((8, 16, 32, 64), (1, 1, 1, 1), 1, 2, branches="neither")
    with pytest.raises(ValueError, match="even head width"):
        HEMF((12, 24, 48, 96), (1, 1, 1, 1), 1, 4)  # 12 / 4 = 3: the rotation needs (even, odd) pairs
    m = HEMF((8, 16, 32, 64), (1, 2, 1, 1), (1, 2, 1, 3), 2, input_size=64)
    assert [len(s) for s in m.local_stages] == [1, 2, 1, 1] and [len(s.vrc) for s in m.global_stages] == [1, 2, 1, 3]
    # the init: branch convs and linears N(0, 0.02) (trunc-normal cut at +-2, as in the code), zero biases
    conv = m.local_stages[0][0].conv.weight
    assert 0.015 < conv.std() < 0.025 and m.local_stages[0][0].conv.bias.abs().sum() == 0
    assert m.grade_head.bias.abs().sum() == 0


def test_patch_stems_and_their_expansion():
    """A stem patch of 8 (hemf_448): the same token grids at twice the input side; the expanded weights of a
    patch-4 model give on a 2S image what the original gives on its 2x2 average, and only the stems change."""
    kw = {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1), "egf_layers": 1, "heads": 2}
    torch.manual_seed(0)
    small, big = HEMF(**kw, input_size=64).eval(), HEMF(**kw, input_size=128, patch=8).eval()
    assert big.size_divisor == 64 and small.size_divisor == 32
    with pytest.raises(ValueError, match="divisible by 64"):
        big(torch.rand(1, 3, 96, 96))
    with pytest.raises(ValueError, match="divisible by 64"):
        HEMF(**kw, input_size=96, patch=8)
    sd = small.state_dict()
    grown = expand_patch_stems(sd, 2)
    assert grown["local_down.0.0.weight"].shape == (8, 3, 8, 8) and grown["global_down.0.0.weight"].shape == (8, 3, 8, 8)
    assert all(torch.equal(grown[k], v) for k, v in sd.items() if not k.endswith("down.0.0.weight"))
    torch.testing.assert_close(grown["local_down.0.0.weight"].sum(dim=(-2, -1)), sd["local_down.0.0.weight"].sum(dim=(-2, -1)))
    big.load_state_dict(grown)
    x = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_big, y_small = big(x), small(F.avg_pool2d(x, 2))
    torch.testing.assert_close(y_big, y_small, rtol=1e-4, atol=1e-4)
    # and fine detail the average hides now reaches the output: a checkerboard with a zero 2x2 mean
    board = ((torch.arange(128)[:, None] + torch.arange(128)[None, :]) % 2).float().sub(0.5).mul(0.2)
    with torch.no_grad():
        assert (small(F.avg_pool2d(x + board, 2)) - y_small).abs().max() < 1e-5
        big.local_down[0][0].weight.add_(torch.randn_like(big.local_down[0][0].weight) * 0.05)  # a trained stem
        assert (big(x + board) - big(x)).abs().max() > 1e-3
    assert build_model("hemf_448").input_size == 448 and build_model("hemf_448").patch == 8
