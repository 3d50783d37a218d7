"""IMFF-Net matches the digest's layer-by-layer description (seeds.md section 2.1)."""

from __future__ import annotations

import torch

from fundus_pipeline.models.imff import IMFFNet
from fundus_pipeline.models.registry import build_model


def count(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def test_paper_width_parameter_counts():
    m = IMFFNet(base=64)
    assert count(m) == 34_684_354  # the digest's count after deleting the undefined `sp` line
    assert round(count(m.bottleneck) / 1e6, 2) == 14.16
    assert round(count(m.d1) / 1e6, 2) == 9.18
    assert round(count(m.e1, m.e2, m.e3, m.e4) / 1e6, 2) == 4.69
    assert round(count(m.lift1, m.lift2, m.lift3, m.lift4, m.up1, m.up2, m.up3, m.up4) / 1e6, 2) == 3.45
    assert round(count(m.d2) / 1e6, 2) == 2.30
    assert round(count(m.d3) / 1e6, 2) == 0.76
    assert m.d3.apf is not None and m.d1.apf is None and m.d2.apf is None and m.d4.apf is None


def test_forward_non_square_batch_and_train_outputs():
    # the generic contract (square input, forward_train keys, state dict) is in test_models_contract.py
    shape = (2, 3, 64, 96)
    torch.manual_seed(0)
    m = build_model("imff_tiny").eval()
    x = torch.rand(shape)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (shape[0], 1, shape[2], shape[3])
    assert torch.isfinite(y).all()
    out = m.forward_train(x)
    assert torch.equal(out["logits"], m(x)) and out["aux"] == [] and out["edge"] is None
    assert out["main_weight"] == 1.0 and out["edge_weight"] == 0.0


def test_udff_side_path_and_apf_receive_gradients():
    torch.manual_seed(0)
    m = build_model("imff_w8").train()  # width 8: the tiny model's 1-unit SE layer can be a dead ReLU
    m(torch.rand(2, 3, 32, 32)).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
