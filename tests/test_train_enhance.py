"""`fundus train enhance` on a synthetic copy of the DRIVE/HRF/HEI-MED layout: outputs, bit-exact resume,
option checks; the canonical frame, the loss and the sampler's determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from degradation.fov import FovGeometry
from fundus_pipeline.canonical import CanonicalFrame
from fundus_pipeline.cli import main as cli_main
from fundus_pipeline.train import enhance as trainer
from fundus_pipeline.train.enhance import _orient, _orient_point, enhance_loss


def _args(data, out, *extra) -> list[str]:
    return [
        "--arch", "cofe_tiny", "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "2",
        "--size", "64", "--crop", "32", "--val-every", "2", "--ckpt-every", "1", "--threads", "1", "--seed", "5",
        "--rsa-init", "none", *extra,
    ]  # fmt: skip


def _train(*args: str) -> int:
    return cli_main(["train", "enhance", *args])


def test_train_enhance_writes_a_run_and_resumes_bit_exactly(fake_data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert _train(*_args(fake_data, straight)) == 0
    for f in ("best.pt", "last.pt", "summary.json", "train.log", "sources.npz"):
        assert (straight / f).is_file(), f
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["arch"] == "cofe_tiny" and summary["argv"][:3] == ["fundus", "train", "enhance"]
    best = summary["best"]
    assert best["step"] in (2, 4) and np.isfinite(best["psnr"]) and {"psnr_released111", "psnr_moderate", "psnr_clean"} <= set(best)
    assert {"vessel_f1", "f1_released111", "f1_input_released111", "f1_clean"} <= set(best) and 0 <= best["vessel_f1"] <= 1
    log = (straight / "train.log").read_text()
    # DRIVE 16 + 4, HRF 12 + 3, HEI-MED 10 + 2 (every 10th); discs located on DRIVE and HRF (marked on HEI-MED)
    assert "train 38 sources, val 9" in log and "discs located on 35" in log

    broken = tmp_path / "broken"
    real = trainer.EnhanceSampler.batch

    def interrupt(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step)

    monkeypatch.setattr(trainer.EnhanceSampler, "batch", interrupt)
    assert _train(*_args(fake_data, broken)) == 130
    monkeypatch.setattr(trainer.EnhanceSampler, "batch", real)
    assert _train(*_args(fake_data, broken, "--resume")) == 0
    a = torch.load(straight / "last.pt", map_location="cpu", weights_only=True)
    b = torch.load(broken / "last.pt", map_location="cpu", weights_only=True)
    assert a["step"] == b["step"] == 4 and a["best"] == b["best"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--arch", "imff"], "not an enhancement model"),
        (["--crop", "128"], "larger than --size"),
        (["--crop", "48"], "multiples of 32"),
        (["--clean-p", "2"], "--clean-p"),
        (["--select", "ssim"], "--select must be psnr or vessel_f1"),
        (["--seg-weight", "-1"], "--seg-weight"),
        (["--family-weights", "1,1"], "--family-weights must be three non-negative numbers"),
        (["--family-weights", "0,0,0"], "--family-weights must be three non-negative numbers"),
        (["--family-weights", "1,-1,1"], "--family-weights must be three non-negative numbers"),
        (["--family-weights", "1,x,1"], "--family-weights must be three comma-separated numbers"),
        (["--datasets", "drive,messidor"], "--datasets must name one or more of drive, hrf, heimed"),
        (["--datasets", ","], "--datasets must name one or more of drive, hrf, heimed"),
        (["--deploy-sigma", "-1"], "--deploy-sigma"),
    ],
)
def test_bad_options_exit_2_with_one_line(fake_data, tmp_path, capsys, extra, message):
    assert _train(*_args(fake_data, tmp_path / "run"), *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_sampler_is_a_pure_function_of_seed_and_step(fake_data, tmp_path):
    from fundus_pipeline.train.config import EnhanceConfig

    cfg = EnhanceConfig(out=tmp_path / "r", data=fake_data, size=64, crop=32, batch_size=3, seed=1, rsa_init=None)
    sources = trainer.prepare_sources(fake_data, 64, trainer.resolve_segmenter(), None, lambda m: None)
    train, _ = trainer.split_sources(sources)
    s1, s2 = trainer.EnhanceSampler(train, cfg), trainer.EnhanceSampler(train, cfg)
    for x, y in zip(s1.batch(7), s2.batch(7)):
        assert torch.equal(x, y)
    assert not torch.equal(s1.batch(7)[0], s1.batch(8)[0])
    deg, clean, fov, disc, ves = s1.batch(3)
    assert deg.shape == clean.shape == (3, 3, 32, 32) and fov.shape == disc.shape == ves.shape == (3, 1, 32, 32)
    assert float(deg.min()) >= 0 and float(deg.max()) <= 1


def test_family_weights_choose_the_degradation_family_and_equal_weights_keep_the_original_draw():
    equal, released_only = trainer.DegradationPool(), trainer.DegradationPool((1, 0, 0))
    released = {id(d) for d in released_only.families[0]}
    # equal weights: one integer for the family, one for the member (the draw earlier runs were trained with)
    rng, ref = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(50):
        fam = equal.families[int(ref.integers(3))]
        assert equal.draw(rng) is fam[int(ref.integers(len(fam)))]
    rng = np.random.default_rng(4)
    assert all(id(released_only.draw(rng)) in released for _ in range(200))
    recipes = trainer.DegradationPool((0, 1, 3))
    rng = np.random.default_rng(5)
    kinds = [next(i for i, f in enumerate(recipes.families) if any(d is m for m in f)) for d in (recipes.draw(rng) for _ in range(2000))]
    counts = np.bincount(kinds, minlength=3)
    assert counts[0] == 0 and 0.70 < counts[2] / 2000 < 0.80, counts


def test_family_weights_are_recorded_as_an_option_and_in_the_export(fake_data, tmp_path):
    from fundus_pipeline.models.registry import build_model
    from fundus_pipeline.train.config import EnhanceConfig

    cfg = EnhanceConfig(out=tmp_path / "r", data=fake_data, family_weights="2,1,1", rsa_init=None)
    assert cfg.family_weights == (2.0, 1.0, 1.0)
    argv = cfg.to_argv()
    assert argv[argv.index("--family-weights") + 1] == "2,1,1"  # a command line that parses back
    assert EnhanceConfig(out=tmp_path / "r", data=fake_data, family_weights=argv[argv.index("--family-weights") + 1], rsa_init=None) == cfg
    model = build_model("cofe_tiny")
    data = trainer.export_description({"choice": "residual"}, cfg.model_dump(mode="json"))(model)["training"]["data"]
    assert "in the ratio 2:1:1" in data and "10% left clean" in data
    plain = trainer.export_description({"choice": "residual"}, {})(model)["training"]["data"]
    assert "ratio" not in plain and "10% left clean" in plain


def test_validation_pairs_do_not_depend_on_the_training_seed(fake_data, tmp_path):
    from fundus_pipeline.train.config import EnhanceConfig

    pairs = []
    for seed in (0, 1):
        task = trainer.EnhanceTask(EnhanceConfig(out=tmp_path / f"r{seed}", data=fake_data, size=64, crop=32, seed=seed, rsa_init=None, cache=tmp_path / "c.npz"))
        task.setup(lambda m: None)
        pairs.append(task.pairs)
    assert [k for k, _, _ in pairs[0]] == [k for k, _, _ in pairs[1]] and {"released111", "moderate", "clean"} == {k for k, _, _ in pairs[0]}
    for (_, a, _), (_, b, _) in zip(*pairs):
        np.testing.assert_array_equal(a, b)
    _, deg, s = pairs[0][0]
    assert not np.array_equal(deg, s.rgb)  # a degraded pair (the assertion above is not about clean copies only)


def test_orientation_moves_the_disc_with_the_image():
    a = np.zeros((9, 9), np.float32)
    a[2, 6] = 1  # (x, y) = (6, 2)
    for k in range(4):
        for flip in (False, True):
            x, y = _orient_point(6, 2, 9, k, flip)
            assert _orient(a, k, flip)[int(y), int(x)] == 1


def test_canonical_frame_round_trip():
    rgb = np.random.default_rng(0).random((60, 80, 3)).astype(np.float32)
    geom = FovGeometry(cx=40, cy=30, radius=35, height=60, width=80)  # the square leaves the image at the top and bottom
    frame = CanonicalFrame.from_fov(geom, 70)  # same size: no resampling
    c = frame.to_canonical(rgb)
    assert c.shape == (70, 70, 3) and c[:5].max() == 0  # padded with black
    back = frame.to_native(c)
    np.testing.assert_array_equal(back[:, 5:75], rgb[:, 5:75])


def test_loss_is_zero_for_a_perfect_output_and_weights_the_disc():
    clean = torch.rand(2, 3, 32, 32)
    fov, disc, ves = torch.ones(2, 1, 32, 32), torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32)
    disc[..., :8, :8] = 1
    batch = (clean, clean, fov, disc, ves)
    perfect = {"out": clean.clone(), "out_half": torch.nn.functional.avg_pool2d(clean, 2)}
    assert float(enhance_loss(perfect, batch, 10.0, 0.1)) == pytest.approx(0.0, abs=1e-7)
    off = clean.clone()
    off[..., :8, :8] += 0.1  # error only inside the disc box
    l1 = float(enhance_loss({"out": off}, batch, 0.0, 0.0))
    l10 = float(enhance_loss({"out": off}, batch, 10.0, 0.0))
    assert l10 == pytest.approx(11 * l1, rel=1e-5)


def test_select_vessel_f1_keeps_the_checkpoint_with_the_best_vessel_f1(fake_data, tmp_path):
    out = tmp_path / "seg"
    assert _train(*_args(fake_data, out, "--seg-weight", "0.5", "--select", "vessel_f1")) == 0
    vals = [json.loads(line.split(": ", 1)[1]) for line in (out / "train.log").read_text().splitlines() if " val step " in line]
    best = json.loads((out / "summary.json").read_text())["best"]
    assert len(vals) == 2 and best["vessel_f1"] == max(v["vessel_f1"] for v in vals)
    assert best == {"step": best["step"], **vals[[2, 4].index(best["step"])]}


class _Seg(torch.nn.Module):
    """A stand-in segmenter: a fixed 3x3 convolution of the green channel (two output channels, as IMFF-Net's)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        torch.nn.init.normal_(self.conv.weight, std=2.0, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.conv(x)


def test_segmenter_term_pulls_the_output_towards_the_clean_reading_inside_the_fov():
    from fundus_pipeline.train.enhance import segmenter_term

    seg = _Seg().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(2, 3, 16, 16, generator=g)
    fov = torch.zeros(2, 1, 16, 16)
    fov[..., 2:14, 2:14] = 1
    at_clean = clean.clone().requires_grad_(True)
    base = segmenter_term(seg, at_clean, clean, fov)
    base.backward()
    assert float(at_clean.grad.abs().max()) < 1e-6  # the soft target is the minimum: no pull at the clean image
    off = (clean + 0.3 * torch.rand(2, 3, 16, 16, generator=g)).requires_grad_(True)
    moved = segmenter_term(seg, off, clean, fov)
    assert moved.item() > base.item() + 1e-3
    moved.backward()
    assert float(off.grad.abs().max()) > 1e-6 and all(p.grad is None for p in seg.parameters())
    outside = off.detach().clone()
    outside[..., :1, :] = 5.0  # far outside the FOV (and the 3x3 reach of its border): the term does not see it
    assert float(segmenter_term(seg, outside, clean, fov)) == pytest.approx(moved.item(), rel=1e-6)
    batch = (clean, clean, fov, torch.zeros_like(fov), torch.zeros_like(fov))
    plain = float(enhance_loss({"out": off.detach()}, batch, 0.0, 0.0))
    assert float(enhance_loss({"out": off.detach()}, batch, 0.0, 0.0, seg, 2.0)) == pytest.approx(plain + 2 * moved.item(), rel=1e-5)


def test_export_description_states_the_runs_loss_and_checkpoint_rule():
    from fundus_pipeline.models.registry import build_model
    from fundus_pipeline.train.enhance import export_description

    selection = {"choice": "residual"}
    plain = export_description(selection)(build_model("cofe_tiny"))
    assert "by mean PSNR" in plain["training"]["validation"] and "segmenter's vessel maps" not in plain["training"]["loss"]
    assert plain["input"]["scale_policy"]["size"] == 512 and plain["output"]["transfer"] == "residual"
    run = {"size": 256, "select": "vessel_f1", "seg_weight": 0.1, "init": "weights/cofe_add.pt"}
    seg = export_description(selection, run)(build_model("cofe_tiny"))
    assert "by mean vessel F1" in seg["training"]["validation"] and seg["input"]["scale_policy"]["size"] == 256
    assert "0.1 x BCE between the frozen imff segmenter's vessel maps" in seg["training"]["loss"] and seg["training"]["loss"].endswith("initialised from cofe_add.pt")
    assert "low-passed" not in seg["training"]["loss"]
    deployed = export_description(selection, {**run, "deploy_sigma": 32.0})(build_model("cofe_tiny"))["training"]
    assert "correction low-passed at sigma 32 px" in deployed["loss"] and deployed["validation"].endswith("of that low-passed output")


def test_record_correction_selection_sets_the_entrys_low_pass_and_refuses_an_unknown_entry(tmp_path):
    import shutil

    from fundus_pipeline.errors import WeightsError
    from fundus_pipeline.models.weights import load_manifest, weights_dir
    from fundus_pipeline.train.export import record_correction_selection

    shutil.copy(weights_dir() / "manifest.json", tmp_path / "manifest.json")
    sel = {"choice": 16.0, "rule": "r", "means": {"0": {"f1": 0.7}, "16": {"f1": 0.71}}, "inputs": {}, "rows": [1, 2]}
    spec = record_correction_selection("cofe_add", sel, "docs/x.json", tmp_path)
    assert spec.output.correction_sigma == 16.0 and spec.output.correction_selection == {"choice": 16.0, "rule": "r", "means": sel["means"], "inputs": {}, "file": "docs/x.json"}
    assert load_manifest(tmp_path).get("cofe_add").output.correction_sigma == 16.0
    assert load_manifest(tmp_path).get("cofe").sha256 == load_manifest().get("cofe").sha256  # the other entries as they were
    with pytest.raises(WeightsError, match="no manifest entry 'nope'"):
        record_correction_selection("nope", sel, "docs/x.json", tmp_path)


def test_the_context_variant_starts_as_the_network_it_grows_from_and_sees_the_whole_frame(tmp_path):
    """``context=True`` (``cofe_add_ctx``): weights of the same network without the context initialise it
    exactly (the loader lets only the declared new tensors be missing), and once trained, G's output at one
    place depends on image content anywhere in the frame (G alone: a theoretical radius of about 420 px)."""
    from fundus_pipeline.models.cofe import CofeNet
    from fundus_pipeline.models.weights import WeightsError, load_weights_checked

    torch.manual_seed(0)
    kw = dict(rsa=False, lqa=False, two_scale=False, output="add")
    base = CofeNet(2, **kw).eval()
    torch.nn.init.normal_(base.g.outc[-1].weight, std=0.1)  # as if trained (it starts at zero: the identity)
    path = tmp_path / "base.pt"
    torch.save(base.state_dict(), path)
    grown = CofeNet(2, context=True, **kw).eval()
    assert grown.new_parameters == ("g.context.",)
    with pytest.raises(WeightsError, match="4 missing"):
        load_weights_checked(grown, path)  # strict by default
    load_weights_checked(grown, path, new=grown.new_parameters)
    x = torch.rand(1, 3, 512, 512) * 0.8
    y = x.clone()
    y[..., 480:, 480:] = 0.0  # a change beyond that radius from the top-left corner
    with torch.no_grad():
        assert torch.equal(grown(x), base(x))
        assert torch.equal(base(x)[..., :16, :16], base(y)[..., :16, :16])  # beyond the plain G's reach
        torch.nn.init.normal_(grown.g.context.mlp[2].weight, std=0.5)  # as if trained
        assert not torch.equal(grown(x)[..., :16, :16], grown(y)[..., :16, :16])
    partial = {k: v for k, v in base.state_dict().items() if not k.startswith("g.outc")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(WeightsError, match="missing"):
        load_weights_checked(grown, tmp_path / "partial.pt", new=grown.new_parameters)  # only the context may be missing


def test_deploy_sigma_trains_what_fundus_enhance_writes():
    """The differentiable low-pass equals the one `fundus enhance` applies (OpenCV), and with --deploy-sigma the
    full-scale terms judge that low-passed image: a correction made only of fine detail costs nothing there."""
    from fundus_pipeline.stages.enhance import smooth_correction
    from fundus_pipeline.train.enhance import smooth_correction_torch

    rng = np.random.default_rng(3)
    inp, out = rng.random((2, 96, 96, 3), dtype=np.float32)
    yy, xx = np.mgrid[:96, :96]
    fov = (yy - 47.5) ** 2 + (xx - 47.5) ** 2 <= 44**2
    for sigma in (4.0, 8.0):
        ref = smooth_correction(inp, out, fov, sigma)

        def t(a):
            return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]

        got = smooth_correction_torch(t(out), t(inp), torch.from_numpy(fov.astype(np.float32))[None, None], sigma)[0].numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(got[fov], ref[fov], atol=2e-5)
    clean = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(1, 1, 64, 64)
    batch = (clean, clean, ones, torch.zeros_like(ones), torch.zeros_like(ones))
    detail = clean + 0.2 * torch.sign(torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))  # white noise
    raw = float(enhance_loss({"out": detail}, batch, 0.0, 0.0))
    deployed = float(enhance_loss({"out": detail}, batch, 0.0, 0.0, deploy_sigma=8.0))
    assert raw == pytest.approx(0.2, rel=1e-5) and deployed < 0.05 * raw
    shifted = clean + 0.1  # a smooth correction survives the low-pass
    assert float(enhance_loss({"out": shifted}, batch, 0.0, 0.0, deploy_sigma=8.0)) == pytest.approx(0.1, rel=1e-3)
    grad = detail.clone().requires_grad_(True)
    enhance_loss({"out": grad}, batch, 0.0, 0.0, deploy_sigma=8.0).backward()
    assert float(grad.grad.abs().sum()) > 0


def test_datasets_restricts_training_and_validation_to_one_camera(fake_data, tmp_path):
    """--datasets drive trains and validates on DRIVE alone (the cache still holds every source, so a later
    run with all three reuses it); the export says which parts were used."""
    from fundus_pipeline.models.registry import build_model
    from fundus_pipeline.train.enhance import export_description

    shared = tmp_path / "sources.npz"
    assert _train(*_args(fake_data, tmp_path / "all", "--cache", str(shared))) == 0
    one = tmp_path / "drive"
    assert _train(*_args(fake_data, one, "--datasets", "Drive", "--cache", str(shared))) == 0
    log = (one / "train.log").read_text()
    assert "train 16 sources, val 4 (drive/37, drive/38, drive/39, drive/40" in log and "preparing" not in log
    config = json.loads((one / "summary.json").read_text())["config"]
    assert config["datasets"] == ["drive"]
    training = export_description({"choice": "residual"}, config)(build_model("cofe_tiny"))["training"]
    assert training["data"].startswith("clean sources degraded on the fly: DRIVE training 21-36; released")
    assert training["validation"].startswith("DRIVE 37-40, each degraded")
