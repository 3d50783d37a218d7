"""MSRF-Net: shapes, training outputs, gradient flow through all 10 DSDF blocks, Canny input.

The generic contract (square input, determinism, state-dict round trip, registry metadata and
parameter counts) is tested for every model in test_models_contract.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fundus_pipeline.models import msrf as msrf_mod
from fundus_pipeline.models.msrf import DSDF, MSRFNet, canny_edges

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny() -> MSRFNet:
    torch.manual_seed(0)
    return MSRFNet(base=4)


def _img(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g)
    # add some structure so Canny finds edges
    x[..., shape[-2] // 4 : shape[-2] // 2, :] *= 0.3
    return x


def test_forward_non_square_batch(tiny: MSRFNet):
    shape = (2, 3, 48, 80)
    tiny.eval()
    with torch.no_grad():
        y = tiny(_img(*shape))
    assert y.shape == (shape[0], 1, shape[2], shape[3])
    assert torch.isfinite(y).all()


def test_forward_train_keys_and_shapes(tiny: MSRFNet):
    tiny.train()
    out = tiny.forward_train(_img(2, 3, 48, 80))
    assert {"logits", "aux", "edge"} <= set(out)
    assert out["logits"].shape == (2, 1, 48, 80)
    assert out["edge"].shape == (2, 1, 48, 80)
    assert len(out["aux"]) == 2
    for logits, weight in out["aux"]:
        assert logits.shape == (2, 1, 48, 80)
        assert weight == 1.0
    assert out["main_weight"] == 2.0 and out["edge_weight"] == 1.0


def test_attributes():
    assert MSRFNet.size_divisor == 8 and MSRFNet.in_channels == 3
    with pytest.raises(ValueError):
        MSRFNet(base=4)(torch.rand(1, 3, 60, 64))


def test_all_parameters_get_gradients_and_all_dsdf_blocks_live():
    torch.manual_seed(1)
    model = MSRFNet(base=4)
    model.train()
    x = _img(2, 3, 64, 64, seed=3)
    target = (torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(4)) > 0.8).float()
    out = model.forward_train(x)
    loss = out["main_weight"] * F.binary_cross_entropy_with_logits(out["logits"], target)
    for logits, w in out["aux"]:
        loss = loss + w * F.binary_cross_entropy_with_logits(logits, target)
    loss = loss + F.binary_cross_entropy_with_logits(out["edge"], target)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [], f"parameters not reached by the loss: {missing}"
    assert len(model.msrf.blocks) == 10
    for i, block in enumerate(model.msrf.blocks):
        assert isinstance(block, DSDF)
        total = sum(p.grad.abs().sum().item() for p in block.parameters())
        assert total > 0, f"DSDF block {i} does not affect the output"
        # every conv of every block (including the cross-scale taps) is live
        for n, p in block.named_parameters():
            assert p.grad.abs().sum().item() > 0, f"block {i} param {n} has zero gradient"


def test_main_output_depends_on_every_dsdf_block():
    # The main logits alone (no aux/edge heads) must see all ten blocks.
    torch.manual_seed(2)
    model = MSRFNet(base=4).eval()
    y = model(_img(1, 3, 32, 32, seed=5))
    y.sum().backward()
    for i, block in enumerate(model.msrf.blocks):
        assert block.hconv[4].weight.grad.abs().sum() > 0, i
        assert block.lconv[4].weight.grad.abs().sum() > 0, i


def test_canny_inside_forward():
    x = torch.zeros(1, 3, 32, 32)
    x[..., :, 16:] = 1.0
    e = canny_edges(x)
    assert e.shape == (1, 1, 32, 32)
    assert set(e.unique().tolist()) <= {0.0, 1.0}
    assert e[0, 0, :, 15:17].sum() > 0 and e[0, 0, :, :10].sum() == 0


def test_factories_accept_overrides():
    m = msrf_mod.msrf_tiny()
    assert isinstance(m, MSRFNet) and m.base == 4
    assert msrf_mod.msrf(base=8).base == 8
