"""Session of 2026-12-04 (third part): what campaigns 12a (`fundus degrade`, the report) and 12b (weights,
scripts, benchmarks) found. Each test fails on the code before its mend."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import synthetic_fundus
from tests.test_run import photos, tiny  # noqa: F401  (fixtures)


def _inner_crops(a: np.ndarray):
    h, w = a.shape[:2]
    for frac, dy, dx in ((0.45, 0, 0), (0.35, -0.1, 0.1), (0.3, 0.1, -0.1)):
        s = int(min(h, w) * frac)
        cy, cx = int(h * (0.5 + dy)), int(w * (0.5 + dx))
        yield a[cy - s // 2 : cy + s // 2, cx - s // 2 : cx + s // 2]


def test_a_photograph_cropped_inside_its_fov_keeps_the_whole_frame(data_root):
    """12a D1: on a crop with no dark surround the estimator took the vignetted corners for the surround and
    fitted a circle, and `degrade` blacked out 12-83% of the photograph (27 of 30 DRIVE crops)."""
    from PIL import Image

    from degradation.fov import estimate_fov_geometry

    pictures = [synthetic_fundus(400, 400, 1)]
    drive = data_root / "DRIVE" / "test" / "images"
    if drive.is_dir():
        pictures += [np.array(Image.open(drive / f"{i:02d}_test.tif").convert("RGB")) for i in (1, 4, 7)]
    for a in pictures:
        assert estimate_fov_geometry(a)[0].mean() < 0.9  # the whole photograph has its surround
        for crop in _inner_crops(a):
            mask, geom = estimate_fov_geometry(crop)
            assert mask.all() and geom.radius == min(crop.shape[:2]) / 2  # the documented fallback


def test_a_shipped_file_replaced_by_other_weights_is_refused_and_a_name_is_a_name(tmp_path, monkeypatch):
    """12b F1: msrf_w8.pt copied over imff.pt ran silently as MSRF-Net (the file was matched by its bytes to
    another entry before its own name was checked); F5: a folder `imff` in the working folder made
    `--weights imff` fail (the name was read as a path first)."""
    import shutil

    from fundus_pipeline.errors import WeightsError
    from fundus_pipeline.models.weights import load_model, resolve_weights, weights_dir

    shipped = weights_dir()
    w = tmp_path / "weights"
    w.mkdir()
    for name in ("manifest.json", "imff.pt", "msrf_w8.pt"):
        shutil.copy(shipped / name, w / name)
    monkeypatch.setenv("FUNDUS_WEIGHTS", str(w))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imff").mkdir()
    assert resolve_weights("imff") == w / "imff.pt"  # was: "weights path is a folder"
    assert load_model("imff")[1].spec.name == "imff"
    shutil.copy(w / "msrf_w8.pt", w / "imff.pt")
    with pytest.raises(WeightsError, match="does not match its sha256"):
        load_model("imff")  # was: MSRF-Net at its own threshold, exit 0
    other = tmp_path / "elsewhere.pt"
    shutil.copy(w / "msrf_w8.pt", other)
    assert load_model(other)[1].spec.name == "msrf_w8"  # a copy outside the folder is still known by its bytes


def test_export_refuses_an_existing_name_a_wrong_arch_and_bad_runs_in_one_line(fake_data, tmp_path):
    """12b F2: an export replaced an existing entry (a shipped one too) and its test figures without a word;
    F3: a missing run, a bad summary.json, a bad --name or a plain state dict as --checkpoint ended in a
    traceback; F8: a run exported under another architecture with the same tensors got the wrong rules."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from tests.test_train_segment import _args, _train

    run = tmp_path / "run"
    assert _train(*_args(fake_data, run, "--steps", "1")) == 0
    wdir = tmp_path / "weights"
    script = Path(__file__).resolve().parents[1] / "scripts" / "export_weights.py"

    def export(*args):
        env = {**__import__("os").environ, "FUNDUS_WEIGHTS": str(wdir), "OMP_NUM_THREADS": "1", "FUNDUS_DATA": str(fake_data)}  # the threshold's validation images
        return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env)

    assert export(run, "--name", "tiny", "--arch", "imff_tiny").returncode == 0
    first = (wdir / "tiny.pt").read_bytes()
    p = export(run, "--name", "tiny", "--arch", "imff_tiny")
    assert p.returncode == 2 and "--replace" in p.stderr  # was: replaced without a word
    assert export(run, "--name", "tiny", "--arch", "imff_tiny", "--replace").returncode == 0
    assert (wdir / "tiny.pt").read_bytes() == first
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{")
    torch_sd = tmp_path / "sd.pt"
    import torch

    torch.save(torch.load(run / "best.pt", weights_only=True), torch_sd)
    for args in (
        (tmp_path / "nothing", "--name", "x", "--arch", "imff_tiny"),
        (tmp_path / "broken", "--name", "x", "--arch", "imff_tiny"),
        (run, "--name", "../x", "--arch", "imff_tiny"),
        (run, "--name", "x", "--arch", "imff_tiny", "--checkpoint", torch_sd),
        (run, "--name", "x", "--arch", "imff_tiny", "--test-metrics", f"drive={tmp_path / 'none.json'}"),
        (run, "--name", "x", "--arch", "msrf_tiny"),
    ):
        p = export(*args)
        assert p.returncode in (1, 2) and "Traceback" not in p.stderr and p.stderr.startswith("Error: "), (args, p.stderr)
    assert "trained 'imff_tiny'" in p.stderr  # the wrong architecture is named
    assert [w["name"] for w in json.loads((wdir / "manifest.json").read_text())["weights"]] == ["tiny"]  # nothing else written


def test_the_planning_benchmark_runs(tmp_path):
    """12b F4: benchmarks/plan.py called resumable_rows with its old signature and always ended in a TypeError,
    so the README's planning figures could not be reproduced."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "plan.py"
    p = subprocess.run([sys.executable, str(script), "--n", "300", "--keep", str(tmp_path / "k")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["resume"]["rows"] == 300 and d["folder"]["items"] == d["list"]["items"] == 300


def test_a_grey_pixel_that_nothing_changed_keeps_its_value(tmp_path):
    """12a D2: a grey photograph written back floored its luminance in float32, where 0.299 + 0.587 + 0.114 is
    just under 1: 11 of the 256 8-bit levels (247 -> 246) and 3,842 of the 16-bit ones lost one."""
    import imageio.v3 as iio

    from fundus_pipeline.io import from_float_rgb, read_image, to_float_rgb

    for dtype, n in ((np.uint8, 256), (np.uint16, 65536)):
        v = np.tile(np.arange(n, dtype=dtype).reshape(-1, 256), (16, 1))  # at least 16 rows
        iio.imwrite(tmp_path / "g.png", v)
        arr, meta = read_image(tmp_path / "g.png")
        assert meta.mode == "gray" and np.array_equal(arr, v)
        rgb, alpha = to_float_rgb(arr, meta)
        for truncate in (True, False):
            assert np.array_equal(from_float_rgb(rgb, meta, alpha, truncate=truncate), v), (dtype, truncate)


def test_the_report_leaves_out_an_input_replaced_since_the_run(photos, tmp_path, tiny, capsys):  # noqa: F811
    """12a D3: `fundus report` showed a photograph put in place of an input after the run beside the old
    grade, score and vessel overlay, without a word (only missing files were named)."""
    from PIL import Image

    from tests.test_campaign9 import run
    from tests.test_run import tiny_args

    out = tmp_path / "r"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade,segment")) == 0
    capsys.readouterr()
    assert run("report", out) == 0
    assert "warning" not in capsys.readouterr().err
    before = (out / "report.html").read_text()
    Image.fromarray(synthetic_fundus(96, 112, 9)).save(photos / "p0.png")  # same size, another photograph
    assert run("report", out) == 0
    err = capsys.readouterr().err
    assert "changed since the run" in err and "p0" in err
    assert (out / "report.html").read_text().count("data:image/jpeg") < before.count("data:image/jpeg")


def test_the_report_is_valid_utf8_with_an_odd_file_name_and_says_n_a_for_no_mean(tmp_path, tiny, capsys):  # noqa: F811
    """12a D7: a file name that is not UTF-8 went into report.html as raw bytes under <meta charset="utf-8">
    (shown as bad��name); a card with no value read "(mean )"."""
    import os

    from PIL import Image

    from tests.test_campaign9 import run
    from tests.test_run import tiny_args

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(synthetic_fundus(96, 96, 0)).save(os.fsdecode(os.fsencode(str(src)) + b"/bad\xff.png"))
    (src / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "r"
    assert run("run", src, out, *tiny_args(tiny, "--steps", "grade,segment")) == 3
    page = (out / "report.html").read_bytes().decode("utf-8")  # was: UnicodeDecodeError
    assert "bad\\udcff" in page and "(mean )" not in page


@pytest.mark.parametrize("argv", [
    ["check_disc_locator.py", "--data", "/nonexistent", "--cache", "{tmp}/none.npz"],
    ["contact_sheet.py", "--data", "/nonexistent/CofeNet", "--out", "{tmp}/cs.png"],
    ["eyepacs256_split.py"],
    ["val_fov_margin.py"],
    ["build_enhance_benchmark.py", "{tmp}/bench"],
    ["identical_outputs.py", "/nonexistent", "{tmp}/w"],
    ["run_figures.py"],
])
def test_scripts_without_their_data_end_in_one_line(argv, tmp_path):
    """12b F6, F7, F9: without ../shared/data most scripts ended in a traceback; build_enhance_benchmark.py froze
    an empty benchmark as built (exit 0); identical_outputs.py and run_figures.py passed on nothing (exit 0)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    env = {**os.environ, "FUNDUS_DATA": "/nonexistent", "OMP_NUM_THREADS": "1"}
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    p = subprocess.run([sys.executable, str(scripts / args[0]), *args[1:]], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode in (1, 2) and "Traceback" not in p.stderr and p.stderr.startswith("Error: "), p.stderr
    assert p.stdout == "" and not (tmp_path / "bench" / "benchmark.json").exists()


def test_recipes_refuse_booleans_repeated_keys_and_an_empty_name(tmp_path):
    """12a D5: `"p": true` was read as 1, `"quality_range": [true, true]` as quality 1, a key named twice kept
    its last value, and `--recipe ""` ran Cofe-Net 111 without a word."""
    import json

    from degradation import RecipeError, load_recipe
    from fundus_pipeline.config import DegradeConfig
    from fundus_pipeline.errors import UsageError

    good = {"schema_version": 1, "name": "r", "steps": [{"name": "j", "type": "jpeg", "quality_range": [40, 60]}]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    load_recipe(str(tmp_path / "good.json"))
    for body in (
        json.dumps({**good, "steps": [{"name": "j", "type": "jpeg", "p": True}]}),
        json.dumps({**good, "steps": [{"name": "j", "type": "jpeg", "quality_range": [True, True]}]}),
        '{"schema_version": 1, "name": "x", "name": "y", "steps": [{"name": "j", "type": "jpeg"}]}',
    ):
        (tmp_path / "bad.json").write_text(body)
        with pytest.raises(RecipeError):
            load_recipe(str(tmp_path / "bad.json"))
    with pytest.raises(UsageError, match="--recipe is empty"):
        DegradeConfig.from_options(types=None, preset=None, recipe="", seed=None, replay=None)


def test_a_replay_on_a_photograph_of_another_size_names_it(tmp_path, capsys):
    """12a D4: replaying onto an input of another size under the recorded key failed with the internal
    `ValueError: mask shape (300, 300) does not match the FOV geometry (256, 256)`; one of the same size but
    other content was replayed without a word."""
    import csv

    from PIL import Image

    from tests.test_campaign9 import run

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(synthetic_fundus(96, 96, 0)).save(src / "a.png")
    assert run("degrade", src, tmp_path / "o1", "--seed", "3", "--quiet") == 0
    Image.fromarray(synthetic_fundus(120, 120, 0)).save(src / "a.png")
    assert run("degrade", src, tmp_path / "o2", "--replay", tmp_path / "o1" / "manifest.json", "--quiet") == 3
    row = next(csv.DictReader(open(tmp_path / "o2" / "results.csv")))
    assert row["error"].startswith("the input is 120x120; the replay manifest recorded 96x96")
    Image.fromarray(synthetic_fundus(96, 96, 5)).save(src / "a.png")  # same size, another photograph
    assert run("degrade", src, tmp_path / "o3", "--replay", tmp_path / "o1" / "manifest.json", "--quiet") == 3  # was: 0, silently
    row = next(csv.DictReader(open(tmp_path / "o3" / "results.csv")))
    assert "sha256 differs" in row["error"]
    Image.fromarray(synthetic_fundus(96, 96, 0)).save(src / "a.png")  # the photograph of the run: replayed, same bytes
    assert run("degrade", src, tmp_path / "o4", "--replay", tmp_path / "o1" / "manifest.json", "--quiet") == 0
    assert (tmp_path / "o4" / "a.png").read_bytes() == (tmp_path / "o1" / "a.png").read_bytes()


def test_models_finds_weights_names_marks_defaults_and_missing_files(tmp_path, monkeypatch, capsys):
    """12b F12: `fundus models hemf_4750` (a name --weights takes) printed nothing, an unmatched pattern was
    silent, the defaults (hemf_4750, cofe_add_seg) were not marked and a missing weights file was listed as
    shipped."""
    import json
    import shutil

    from fundus_pipeline.models.weights import weights_dir
    from tests.test_campaign9 import run

    capsys.readouterr()
    assert run("models", "hemf_4750", "--format", "json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["hemf"] and rows[0]["default_for"] == {"hemf_4750": "grade"}
    assert run("models", "zzz") == 0 and "no architecture or weights name matches 'zzz'" in capsys.readouterr().err
    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(weights_dir() / "manifest.json", w / "manifest.json")
    monkeypatch.setenv("FUNDUS_WEIGHTS", str(w))
    assert run("models", "imff") == 0
    out = capsys.readouterr().out
    assert "weights/imff.pt*" in out and "[missing: imff.pt]" in out and "fundus segment (imff)" in out


def test_two_exports_at_once_keep_both_entries(fake_data, tmp_path, monkeypatch):
    """12b F11: two exports into one weights folder read the same manifest and the second rename won: one
    .pt file was left without its entry."""
    import threading
    import time

    from fundus_pipeline.models.weights import load_manifest
    from fundus_pipeline.train import export as ex
    from tests.test_train_segment import _args, _description, _train

    run = tmp_path / "run"
    assert _train(*_args(fake_data, run, "--steps", "1")) == 0
    wdir = tmp_path / "w"
    real = ex.load_manifest

    def slow(directory=None):
        m = real(directory)
        time.sleep(0.3)  # the read-modify-write window, widened
        return m

    monkeypatch.setattr(ex, "load_manifest", slow)
    errors: list = []

    def one(name):
        try:
            ex.export_weights(run, name=name, model_name="imff_tiny", describe=lambda m: _description(m, 0.5), directory=wdir)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in ("ra", "rb")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(load_manifest(wdir).names()) == ["ra", "rb"]  # was: only one of them


@pytest.mark.parametrize("argv", [
    ["large.py", "--size", "foo"], ["run.py", "--only", "scale", "--scale", "200"], ["grade.py", "--reps", "0"],
    ["gpu.py", "--only", "bogus"], ["degrade.py", "--memory-images", "3"], ["segment.py", "--weights", "nosuch", "--skip-accuracy"],
])
def test_benchmarks_refuse_bad_options_before_measuring(argv):
    """12b F10: bad options ended in tracebacks (ZeroDivisionError for --reps 0, ValueError for --size foo, a
    WeightsError traceback), or ran and printed JSON that measured nothing (--only bogus, one --scale size
    compared with itself, a 3-image memory peak labelled 50_images)."""
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    p = subprocess.run([sys.executable, str(bench / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 if argv[0] != "segment.py" else p.returncode == 1
    assert "Traceback" not in p.stderr and p.stdout == "" and p.stderr.strip().splitlines()[-1].split(":")[0] in (argv[0], "Error", "Hint")


# ------------------------------------------------------------------------------------------------ review 13
def test_a_linked_or_aliased_weights_file_is_not_taken_for_another(tmp_path, monkeypatch):
    """Review 13, M1: imff.pt as a symbolic link to msrf_w8.pt ran as msrf_w8 (the folder check followed the
    link); L2: two entries for one file made the whole manifest invalid, every command failing."""
    import json
    import shutil

    from fundus_pipeline.errors import WeightsError
    from fundus_pipeline.models.weights import load_model, lookup_spec, weights_dir

    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(weights_dir() / "manifest.json", w / "manifest.json")
    shutil.copy(weights_dir() / "msrf_w8.pt", w / "msrf_w8.pt")
    (w / "imff.pt").symlink_to(w / "msrf_w8.pt")
    monkeypatch.setenv("FUNDUS_WEIGHTS", str(w))
    with pytest.raises(WeightsError, match="does not match its sha256"):
        load_model("imff")
    m = json.loads((w / "manifest.json").read_text())
    alias = {**next(e for e in m["weights"] if e["name"] == "msrf_w8"), "name": "alias"}
    (w / "manifest.json").write_text(json.dumps({**m, "weights": m["weights"] + [alias]}))
    assert lookup_spec(w / "msrf_w8.pt")[0].name == "msrf_w8"  # the folder's own file: its entry by name
    elsewhere = tmp_path / "copy.pt"
    shutil.copy(w / "msrf_w8.pt", elsewhere)
    with pytest.raises(WeightsError, match="several manifest entries"):
        lookup_spec(elsewhere)


def test_export_replace_with_figures_and_no_trace_of_a_failed_export(fake_data, tmp_path):
    """Review 13, M2: `--replace --test-metrics` blamed the run ("is not the run ... exported from"); L3: a
    failed export (a bad name) created the weights folder and its lock file."""
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.models.weights import load_manifest
    from fundus_pipeline.train.export import export_weights
    from tests.test_train_segment import _args, _description, _train

    runs = [tmp_path / "a", tmp_path / "b"]
    for i, run in enumerate(runs):
        assert _train(*_args(fake_data, run, "--steps", "1", "--seed", str(3 + i))) == 0
    w = tmp_path / "w"

    def export(run, **kw):
        return export_weights(run, name="tiny", model_name="imff_tiny", describe=lambda m: _description(m, 0.5), directory=w, **kw)

    with pytest.raises(UsageError):
        export_weights(runs[0], name="../x", model_name="imff_tiny", describe=lambda m: {}, directory=w)
    assert not w.exists()  # was: the folder and .manifest.lock
    export(runs[0])
    figures = {"drive": {"threshold": 0.5, "n_images": 20, "pooled": {"f1": 0.5}, "mean": {"f1": 0.5}}}
    spec = export(runs[1], replace=True, test_metrics=figures)  # was: WeightsError blaming the run
    assert load_manifest(w).get("tiny") == spec and set(spec.metrics) == {"drive"}


def test_a_script_names_the_data_only_for_the_data_and_an_os_error_without_a_file_is_one_line(tmp_path):
    """Review 13, L4: run_script hinted at ../shared/data whenever a file name held "data", and an OSError
    without a file name (a full disk, a broken pipe) still ended in a traceback."""
    import errno
    import subprocess
    import sys

    code = ("from fundus_pipeline.errors import run_script\n"
            "def main():\n"
            f"    open({str(tmp_path / 'nope' / 'metadata.json')!r}, 'w')\n"
            "run_script(main)\n")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 1 and "Hint" not in p.stderr and p.stderr.startswith("Error: ")
    code = ("import errno\nfrom fundus_pipeline.errors import run_script\n"
            f"def main():\n    raise OSError({errno.ENOSPC}, 'No space left on device')\nrun_script(main)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr == "Error: No space left on device\n"


def test_recipe_and_benchmark_checks_left_by_the_first_mend(tmp_path):
    """Review 13, L5 and L6: `gpu.py --sizes foo` still ended in a traceback; `"schema_version": true` was still
    taken as 1, and a boolean text field was told it needed a number."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from degradation import RecipeError, load_recipe

    base = {"schema_version": 1, "name": "r", "steps": [{"name": "j", "type": "jpeg"}]}
    for body, what in (({**base, "schema_version": True}, "schema_version"), ({**base, "steps": [{"name": True, "type": "jpeg"}]}, "name")):
        (tmp_path / "r.json").write_text(json.dumps(body))
        with pytest.raises(RecipeError, match=what) as e:
            load_recipe(str(tmp_path / "r.json"))
        assert what != "name" or "a number is needed" not in str(e.value)
    gpu = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    p = subprocess.run([sys.executable, str(gpu), "--sizes", "foo"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--sizes" in p.stderr


def test_an_export_whose_manifest_cannot_follow_puts_the_file_back(fake_data, tmp_path, monkeypatch):
    """Review 13, L1: the new NAME.pt replaced the old one before the manifest was written; a manifest write that
    failed (a full disk) left a shipped name whose file no longer matched its entry."""
    from fundus_pipeline.errors import FundusError
    from fundus_pipeline.models.weights import load_model, weights_dir
    from fundus_pipeline.train import export as ex
    from tests.test_train_segment import _args, _description, _train

    runs = [tmp_path / "a", tmp_path / "b"]
    for i, run in enumerate(runs):
        assert _train(*_args(fake_data, run, "--steps", "1", "--seed", str(3 + i))) == 0
    w = tmp_path / "w"
    ex.export_weights(runs[0], name="tiny", model_name="imff_tiny", describe=lambda m: _description(m, 0.5), directory=w)
    before = (w / "tiny.pt").read_bytes()

    def full(directory, spec):
        raise FundusError("cannot write manifest.json: No space left on device")

    monkeypatch.setattr(ex, "_write_manifest", full)
    with pytest.raises(FundusError):
        ex.export_weights(runs[1], name="tiny", model_name="imff_tiny", describe=lambda m: _description(m, 0.5), directory=w, replace=True)
    assert (w / "tiny.pt").read_bytes() == before
    monkeypatch.setenv("FUNDUS_WEIGHTS", str(w))
    assert weights_dir() == w and load_model("tiny")[1].spec.name == "tiny"  # still loads: file and entry agree
