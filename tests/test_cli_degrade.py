"""End-to-end tests of `fundus degrade` and the shared stage machinery (runner, IO, exit codes)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fundus_pipeline.cli import main
from tests.conftest import synthetic_fundus


def run(*args: str) -> int:
    return main([str(a) for a in args])


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def pngs(root: Path) -> dict[str, str]:
    return {k: v for k, v in digest_tree(root).items() if k.endswith(".png")}


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate([(96, 96), (80, 112), (128, 96)]):
        Image.fromarray(synthetic_fundus(h, w, seed=i)).save(d / f"img{i}.png")
    Image.fromarray(synthetic_fundus(90, 90, seed=9)).save(d / "sub" / "deep.jpg", quality=95)
    return d


def rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", newline="") as f:
        return {r["key"]: r for r in csv.DictReader(f)}


def test_degrade_writes_images_manifest_and_csv(photos, tmp_path, capsys):
    before = digest_tree(photos)
    out = tmp_path / "out"
    assert run("degrade", photos, out, "--seed", "7", "--format", "json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["ok"] == 4 and summary["exit_code"] == 0
    for key in ("img0", "img1", "img2", "sub/deep"):
        src = next(photos.glob(key + ".*"))
        a = np.asarray(Image.open(src).convert("RGB"))
        b = np.asarray(Image.open(out / f"{key}.png"))
        assert b.shape == a.shape and b.dtype == np.uint8
        assert not np.array_equal(a, b)
    r = rows(out)
    assert list(r) == sorted(r) and r["img0"]["status"] == "ok"
    params = json.loads(r["img0"]["params"])["default"]
    assert {"fov"} <= set(params)
    m = json.loads((out / "manifest.json").read_text())
    assert m["stage"] == "degrade" and m["config"]["seed"] == 7 and m["counts"]["ok"] == 4
    assert digest_tree(photos) == before  # inputs never modified


def test_degrade_is_reproducible_across_reruns_workers_subsets_and_replay(photos, tmp_path):
    a, b, c, d, e = (tmp_path / n for n in "abcde")
    assert run("degrade", photos, a, "--seed", "7", "--types", "001,111") == 0
    assert run("degrade", photos, b, "--seed", "7", "--types", "001,111") == 0
    assert run("degrade", photos, c, "--seed", "7", "--types", "001,111", "--workers", "2") == 0
    assert run("degrade", photos, tmp_path / "e2", "--replay", a / "manifest.json", "--types", "111") == 2
    assert run("degrade", photos, e, "--replay", a / "manifest.json") == 0
    ref = pngs(a)
    assert set(ref) == {f"{k}_{c}.png" for k in ("img0", "img1", "img2", "sub/deep") for c in ("001", "111")}
    assert pngs(b) == ref and pngs(c) == ref and pngs(e) == ref
    sub = tmp_path / "subset"
    sub.mkdir()
    (sub / "img1.png").write_bytes((photos / "img1.png").read_bytes())
    assert run("degrade", sub, d, "--seed", "7", "--types", "001,111") == 0
    assert pngs(d) == {k: v for k, v in ref.items() if k.startswith("img1_")}
    f = tmp_path / "f"
    assert run("degrade", photos, f, "--seed", "8", "--types", "001,111") == 0
    assert pngs(f) != ref


def test_recipes(photos, tmp_path):
    """Each recipe is the one used (manifest and per-image parameters name it) and gives other images."""
    outs = {}
    for recipe in ("mild", "moderate", "severe"):
        assert run("degrade", photos, tmp_path / recipe, "--recipe", recipe) == 0
        outs[recipe] = pngs(tmp_path / recipe)
        assert len(outs[recipe]) == 4
        m = json.loads((tmp_path / recipe / "manifest.json").read_text())
        assert m["config"]["recipe"] == recipe and m["config"]["degraders"]["default"]["name"] == recipe
        with open(tmp_path / recipe / "results.csv", newline="") as f:
            for row in csv.DictReader(f):
                assert json.loads(row["params"])["default"]["config"]["name"] == recipe
    assert run("degrade", photos, tmp_path / "default") == 0
    digests = [set(outs[r].values()) for r in outs] + [set(pngs(tmp_path / "default").values())]
    assert all(a.isdisjoint(b) for i, a in enumerate(digests) for b in digests[i + 1 :])


def test_training_preset(photos, tmp_path):
    assert run("degrade", photos, tmp_path / "t", "--preset", "training", "--types", "all") == 0
    assert len(pngs(tmp_path / "t")) == 28
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["config"]["preset"] == "training"
    assert run("degrade", photos, tmp_path / "r", "--types", "all") == 0  # the released preset: other images
    # (blur alone, type 100, is a no-op in both at this size: its kernel of at most 7 px at 512 scales to 1 px)
    t, r = ({k: v for k, v in pngs(tmp_path / d).items() if "_100" not in k} for d in ("t", "r"))
    assert len(t) == 24 and set(t.values()).isdisjoint(r.values())


def test_bad_inputs_are_recorded_and_the_run_goes_on(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    good = synthetic_fundus(96, 96)
    Image.fromarray(good).save(d / "good.png")
    buf = cv2.imencode(".jpg", good)[1].tobytes()
    (d / "truncated.jpg").write_bytes(buf[: len(buf) // 2])
    (d / "text.png").write_text("this is not an image\n")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(d / "tiny.png")
    rgb16 = (synthetic_fundus(96, 96, 3).astype(np.uint16) * 257)
    cv2.imwrite(str(d / "deep16.png"), rgb16[..., ::-1])
    rgba = np.dstack([synthetic_fundus(96, 96, 4), np.full((96, 96), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    Image.fromarray(synthetic_fundus(96, 96, 5)[..., 1]).save(d / "grey.png")
    before = digest_tree(d)
    out = tmp_path / "out"
    assert run("degrade", d, out, "--format", "json") == 3
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"total": 7, "ok": 4, "error": 3, "skipped": 0}
    r = rows(out)
    for bad in ("truncated", "text", "tiny"):
        assert r[bad]["status"] == "error" and r[bad]["error"] and "\n" not in r[bad]["error"]
        assert not (out / f"{bad}.png").exists()
    o16 = cv2.imread(str(out / "deep16.png"), cv2.IMREAD_UNCHANGED)
    assert o16.dtype == np.uint16 and o16.shape == (96, 96, 3)
    assert len(np.unique(o16)) > 256  # real 16-bit content, not upcast 8-bit
    oa = np.asarray(Image.open(out / "alpha.png"))
    assert oa.shape == (96, 96, 4) and np.array_equal(oa[..., 3], rgba[..., 3])
    og = np.asarray(Image.open(out / "grey.png"))
    assert og.ndim == 2
    assert digest_tree(d) == before
    assert not [p for p in out.rglob("*.tmp")]


def test_usage_errors(tmp_path, photos, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("degrade", empty, tmp_path / "o1") == 2
    assert run("degrade", tmp_path / "missing", tmp_path / "o2") == 2
    assert run("degrade", photos, photos / "inside") == 2
    assert run("degrade", photos, photos) == 2
    assert run("degrade", photos, tmp_path / "o3", "--types", "112") == 2
    assert run("degrade", photos, tmp_path / "o4", "--preset", "nope") == 2
    assert run("degrade", photos, tmp_path / "o5", "--recipe", "nope") == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1, "name": "x", "steps": [], "surprise": 1}))
    assert run("degrade", photos, tmp_path / "o6", "--recipe", bad) == 2
    assert run("degrade", photos, tmp_path / "o7", "--bogus-flag") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert all(line.startswith(("Error:", "Hint:")) for line in err.strip().splitlines())
    assert not (photos / "inside").exists()


def test_unwritable_output_is_fatal(photos, tmp_path, capsys):
    target = Path("/proc/fundus-out") if os.geteuid() == 0 else tmp_path / "ro" / "out"
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o500)
    assert run("degrade", photos, target) == 1
    assert "cannot write to output folder" in capsys.readouterr().err


def test_refuses_non_empty_output_then_resume_and_overwrite(photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("degrade", photos, out, "--seed", "3") == 0
    first = pngs(out)
    assert run("degrade", photos, out, "--seed", "3") == 2
    (out / "img1.png").unlink()
    capsys.readouterr()
    assert run("degrade", photos, out, "--seed", "3", "--resume", "--format", "json") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["counts"]["skipped"] == 3 and s["counts"]["ok"] == 4
    assert pngs(out) == first
    assert run("degrade", photos, out, "--seed", "4", "--resume") == 2  # different config
    assert run("degrade", photos, out, "--seed", "4", "--overwrite") == 0
    assert pngs(out) != first


def test_ctrl_c_writes_partial_manifest_and_resume_finishes(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for i in range(40):
        Image.fromarray(synthetic_fundus(256, 256, seed=i)).save(d / f"im{i:02d}.png")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # SIGINT back to its default in the child: a pytest started in the background by a non-interactive shell
    # ignores SIGINT, the child would inherit that, and Python then leaves Ctrl-C ignored
    p = subprocess.Popen([sys.executable, "-m", "fundus_pipeline", "degrade", str(d), str(out), "--types", "all"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.png"))) < 10:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err.decode()
    m = json.loads((out / "manifest.json").read_text())
    assert m["interrupted"] is True and 0 < m["counts"]["ok"] < 40
    assert b"Traceback" not in err
    assert run("degrade", d, out, "--types", "all", "--resume") == 0
    assert len(pngs(out)) == 280


def test_drive_reproducible_repeat_workers_replay(data_root, tmp_path):
    """`fundus degrade DRIVE/test/images OUT --seed 7` is byte-identical when repeated, with --workers 2
    and with --replay (on 4 of the 20 images to keep the suite fast; the README reports all 20)."""
    src = tmp_path / "drive"
    src.mkdir()
    for i in (1, 2, 3, 4):
        name = f"{i:02d}_test.tif"
        (src / name).write_bytes((data_root / "DRIVE" / "test" / "images" / name).read_bytes())
    outs = [tmp_path / n for n in ("a", "b", "c", "d")]
    assert run("degrade", src, outs[0], "--seed", "7") == 0
    assert run("degrade", src, outs[1], "--seed", "7") == 0
    assert run("degrade", src, outs[2], "--seed", "7", "--workers", "2") == 0
    assert run("degrade", src, outs[3], "--replay", outs[0] / "manifest.json") == 0
    ref = pngs(outs[0])
    assert len(ref) == 4
    assert all(pngs(o) == ref for o in outs[1:])
    img = np.asarray(Image.open(outs[0] / "01_test.png"))
    assert img.shape == (584, 565, 3)
