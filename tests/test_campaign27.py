"""Session 2026-12-05: review 24's LOW findings left by the last stop, campaigns 27a/27b and their mends.
Each test fails on the code before its mend."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundus_pipeline.cli import main as cli_main
from tests.test_run import photos, rows_of, run, tiny  # noqa: F401  (photos, tiny: fixtures)


def _metrics(out: Path) -> dict[str, dict]:
    with open(out / "metrics.csv", newline="") as f:
        return {r["key"]: r for r in csv.DictReader(f)}


# ------------------------------------------------------------------------------------------------ review 24 R24-4
def test_a_16_bit_map_without_vessel_response_scores_when_all_zero_or_written_by_fundus_segment(photos, tmp_path, tiny):  # noqa: F811
    """R24-4: a 16-bit probability map all zero, or one `fundus segment` wrote whose values stay under 256 (a
    segmenter finding no vessel), was an error row blaming the file format; the same map in 8 bits scored F1 0."""
    rng = np.random.default_rng(2)
    seg = tmp_path / "seg"
    assert run("segment", photos, seg, "--weights", tiny["imff_tiny"], "--arch", "imff_tiny", "--device", "cpu", "--quiet") == 0
    gt = tmp_path / "gt"
    gt.mkdir()
    for p in sorted(photos.glob("*.png")):
        h, w = np.asarray(Image.open(p)).shape[:2]
        Image.fromarray((rng.random((h, w)) < 0.15).astype(np.uint8) * 255).save(gt / p.name)
    h, w = np.asarray(Image.open(photos / "p0.png")).shape[:2]
    Image.fromarray(np.zeros((h, w), np.uint16)).save(seg / "p0_prob.png")  # no response at all
    h, w = np.asarray(Image.open(photos / "p1.png")).shape[:2]
    Image.fromarray(rng.integers(0, 200, (h, w)).astype(np.uint16)).save(seg / "p1_prob.png")  # all under 0.4%
    out = tmp_path / "ev"
    assert cli_main(["evaluate", "segment", str(seg), str(gt), "--bootstrap", "0", "--out", str(out)]) == 0
    rows = _metrics(out)
    assert rows["p0"]["status"] == rows["p1"]["status"] == "ok"
    assert float(rows["p0"]["f1"]) == float(rows["p1"]["f1"]) == 0.0

    # the same low map in a folder no fundus segment wrote is still refused (R23-6), with a message naming both causes
    other = tmp_path / "other"
    other.mkdir()
    for name in ("p0_prob.png", "p1_prob.png"):
        (other / name).write_bytes((seg / name).read_bytes())
    out2 = tmp_path / "ev2"
    assert cli_main(["evaluate", "segment", str(other), str(gt), "--bootstrap", "0", "--out", str(out2)]) == 3
    rows = _metrics(out2)
    assert rows["p0"]["status"] == "ok" and float(rows["p0"]["f1"]) == 0.0
    assert "next to no vessel response" in rows["p1"]["status"]


# ------------------------------------------------------------------------------------------------ review 24 R24-5
def test_a_key_the_sorts_record_does_not_name_loses_an_older_sorts_stale_copy(tmp_path):
    """R24-5: once a record existed, the byte-compare clean-up of copies of an older sort was off for the whole folder:
    a photograph that failed to grade in the first recorded sort and was graded otherwise later sat in two folders."""
    from fundus_pipeline.cli.grade import sort_into
    from tests.test_campaign24 import _sorted_results

    src = tmp_path / "in"
    src.mkdir()
    x, y = src / "x.png", src / "y.png"
    x.write_bytes(b"photo x")
    y.write_bytes(b"photo y")
    out = tmp_path / "out"
    (out / "good").mkdir(parents=True)
    (out / "good" / "x.png").write_bytes(b"photo x")  # an older sort's copies: no record
    (out / "good" / "y.png").write_bytes(b"photo y")
    _sorted_results(out, [("x", x, "good")])  # y failed to grade this time: copied nowhere, not recorded
    sort_into(out)
    _sorted_results(out, [("x", x, "good"), ("y", y, "usable")])
    sort_into(out)
    assert not (out / "good" / "y.png").exists() and (out / "usable" / "y.png").read_bytes() == b"photo y"
    assert (out / "good" / "x.png").read_bytes() == b"photo x"
    # a key the record names keeps a copy the user put in another class folder (R23-3)
    (out / "reject").mkdir()
    (out / "reject" / "y.png").write_bytes(b"photo y")
    sort_into(out)
    assert (out / "reject" / "y.png").read_bytes() == b"photo y" and (out / "usable" / "y.png").is_file()


# ------------------------------------------------------------------------------------------------ review 24 R24-6
def test_a_degrade_replay_that_cannot_compare_bytes_says_so(tmp_path, capsys):
    """R24-6: a replay manifest whose rows record no output sha256 replayed with exit 0 and no word: nothing had been
    compared. Now a note says so (unless quiet) and the manifest counts the rows not compared."""
    from tests.test_campaign8 import _photos

    folder = _photos(tmp_path / "in", 2)
    out = tmp_path / "d"
    assert run("degrade", folder, out, "--quiet") == 0
    capsys.readouterr()
    assert run("degrade", folder, tmp_path / "full", "--replay", out) == 0
    assert "no output sha256" not in capsys.readouterr().err
    assert "replay_unverified" not in json.loads((tmp_path / "full" / "manifest.json").read_text())
    m = json.loads((out / "manifest.json").read_text())
    for r in m["items"]:
        if r["key"] == "p1":
            del r["outputs_sha256"]  # as an older version's manifest
    (out / "manifest.json").write_text(json.dumps(m))
    assert run("degrade", folder, tmp_path / "again", "--replay", out) == 0
    err = capsys.readouterr().err
    assert "note: the replay manifest records no output sha256 for 1 photograph(s) (e.g. 'p1')" in err
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["replay_unverified"] == 1
    assert (tmp_path / "again" / "p1.png").read_bytes() == (out / "p1.png").read_bytes()


# ------------------------------------------------------------------------------------------------ review 24 R24-7
def test_a_stage_whose_dropped_photograph_left_no_file_keeps_no_empty_list_of_left_files(tmp_path, tiny):  # noqa: F811
    """R24-7: a resume that dropped a photograph wrote `.fundus-left.jsonl` in every stage folder, empty in one whose
    row had no output (grade writes none)."""
    from tests.conftest import synthetic_fundus
    from tests.test_run import tiny_args

    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(("x", "z")):
        Image.fromarray(synthetic_fundus(72, 80, i)).save(folder / f"{name}.png")
    out = tmp_path / "r"
    args = tiny_args(tiny, "--steps", "grade,segment")
    assert run("run", folder, out, *args) == 0
    (folder / "z.png").unlink()
    assert run("run", folder, out, *args, "--resume") == 0
    assert not (out / "grade" / ".fundus-left.jsonl").exists()
    lines = (out / "segment" / ".fundus-left.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["z"]


# ------------------------------------------------------------------------------------------------ review 24 R24-8
def test_an_address_with_other_scripts_digits_is_a_usage_error():
    """R24-8: `\\d` took full-width (and other non-ASCII) digits, so `h:１２３` passed the exit-2 check and failed in Ray."""
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.ray_engine import check_address

    check_address("h:123")
    for bad in ("h:\uff11\uff12\uff13", "h:\u0661\u0662", "[fe80::1%\u0665]:6379"):
        with pytest.raises(UsageError):
            check_address(bad)


# ------------------------------------------------------------------------------------------------ review 24 R24-9
def test_a_header_ending_in_a_comma_is_read_as_its_rows_are(tmp_path, capsys):
    """R24-9: a trailing comma on the header only (as some spreadsheets write it) was refused ("2 cell(s) on line 2,
    its header 3") although the mirror case, a trailing comma on the rows, is read."""
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.evaluation.score import read_csv_rows

    lab = tmp_path / "lab.csv"
    lab.write_text("key,quality,\na,0\nb,2\n")
    rows, columns = read_csv_rows(lab, "labels file")
    assert columns == ["key", "quality"] and rows == [{"key": "a", "quality": "0"}, {"key": "b", "quality": "2"}]
    res = tmp_path / "res.csv"
    res.write_text("grade,key,p_good,p_usable,p_reject,,\ngood,a,0.8,0.1,0.1\nreject,b,0.1,0.1,0.8,,\n")
    assert cli_main(["evaluate", "grade", str(res), str(lab), "--bootstrap", "0", "--out", str(tmp_path / "o")]) == 0
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["n_images"] == 2
    # line numbers still count the header's line; a short row is still refused
    lab.write_text('key,quality,\na,0\n"",2\n')
    capsys.readouterr()
    assert cli_main(["evaluate", "grade", str(res), str(lab), "--bootstrap", "0", "--out", str(tmp_path / "o")]) == 2
    assert "has an empty key on line 3" in capsys.readouterr().err
    lab.write_text("key,quality,\na\n")
    assert cli_main(["evaluate", "grade", str(res), str(lab), "--bootstrap", "0", "--out", str(tmp_path / "o")]) == 2
    assert "1 cell(s) on line 2, its header 3" in capsys.readouterr().err  # the header's cells as the file shows them (R27-4)
    # cells under the header's unnamed trailing columns are no column's and are passed over, as before R24-9's mend (R27-4)
    lab.write_text("key,quality,\na,0,note\nb,2\n")
    rows, columns = read_csv_rows(lab, "labels file")
    assert columns == ["key", "quality"] and rows == [{"key": "a", "quality": "0"}, {"key": "b", "quality": "2"}]
    lab.write_text("key,quality,\na,0,note,more\n")
    with pytest.raises(UsageError, match="4 cell\\(s\\) on line 2, its header 3"):
        read_csv_rows(lab, "labels file")


# ------------------------------------------------------------------------------------------------ review 24 R24-10
def test_a_recipe_takes_whole_numbers_as_whole_and_refuses_bytes_and_numpy_booleans():
    """R24-10 (C26a-1, -5 left): `quality_range: [60.0, 70.0]` and `schema_version: 1.0` were taken, so was `p: b"0.5"`
    and a numpy boolean; a numpy integer alone (not in a list) was refused as "not a valid tuple"."""
    import copy

    from degradation.recipe import RecipeError, parse_recipe

    base = {"schema_version": 1, "name": "r", "steps": [{"name": "j", "type": "jpeg", "quality_range": [60, 70]}]}
    for change, message in (
        ({"quality_range": [60.0, 70.0]}, "whole numbers are needed"),
        ({"quality_range": 60.0}, "whole numbers are needed"),
        ({"p": b"0.5"}, "a number is needed, not text"),
        ({"p": np.bool_(True)}, "a number is needed, not true or false"),
        ({"quality_range": [np.bool_(True), 70]}, "a number is needed, not true or false"),
    ):
        recipe = copy.deepcopy(base)
        recipe["steps"][0].update(change)
        with pytest.raises(RecipeError, match=message):
            parse_recipe(recipe, "r")
    with pytest.raises(RecipeError, match="the whole number 1 is needed"):
        parse_recipe({**base, "schema_version": 1.0}, "r")
    recipe = copy.deepcopy(base)
    recipe["steps"][0].update(quality_range=np.int64(60), p=np.float32(0.5))
    step = parse_recipe(recipe, "r").steps[0]
    assert step.quality_range == (60, 60) and step.p == 0.5


# ------------------------------------------------------------------------------------------------ known left: dirty
def test_an_uncommitted_module_makes_the_checkout_dirty_and_untracked_notes_do_not(tmp_path):
    """`dirty` ignored untracked files: a new module in the package, imported by the run, left the record clean."""
    import subprocess

    from fundus_pipeline.train.loop import _dirty

    repo = tmp_path / "repo"
    (repo / "fundus_pipeline").mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    (repo / "fundus_pipeline" / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "a"], check=True)

    def status() -> str:
        return subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=all"], capture_output=True, text=True, check=True).stdout

    assert not _dirty(status())
    (repo / "notes.md").write_text("scratch\n")
    (repo / "fundus_pipeline" / "out.png").write_bytes(b"")
    assert not _dirty(status())
    (repo / "fundus_pipeline" / "new_stage.py").write_text("y = 2\n")
    assert _dirty(status())
    (repo / "fundus_pipeline" / "new_stage.py").unlink()
    (repo / "fundus_pipeline" / "a.py").write_text("x = 2\n")
    assert _dirty(status())


# ------------------------------------------------------------------------------------------------ campaign 27b F1
def test_a_refused_fundus_run_resume_leaves_the_finished_runs_manifest(tmp_path, tiny, capsys):  # noqa: F811
    """27b F1: a --resume the degrade stage refused (the --simulate recipe file edited since) rewrote a finished run's
    manifest.json as an empty "stopped" one: fundus report and --replay then refused the folder."""
    from tests.conftest import synthetic_fundus
    from tests.test_run import tiny_args

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(synthetic_fundus(72, 80, 0)).save(folder / "x.png")
    recipe = tmp_path / "my.json"
    recipe.write_text(json.dumps({"schema_version": 1, "name": "r", "steps": [{"name": "j", "type": "jpeg", "quality_range": 60}]}))
    out = tmp_path / "r"
    args = tiny_args(tiny, "--steps", "grade,segment", "--simulate", recipe)
    assert run("run", folder, out, *args) == 0
    before = (out / "manifest.json").read_bytes()
    recipe.write_text(json.dumps({"schema_version": 1, "name": "r", "steps": [{"name": "j", "type": "jpeg", "quality_range": 30}]}))
    capsys.readouterr()
    assert run("run", folder, out, *args, "--resume") == 2
    assert "was written with a different configuration (degraders differs: the degradations' settings, a recipe file's contents" in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before
    assert json.loads(before)["status"] == "finished"
    assert run("report", out) == 0


# ------------------------------------------------------------------------------------------------ campaign 27b F2-F5
def test_the_library_functions_refuse_wrong_arguments_with_a_clear_type_or_value_error(tmp_path):
    """27b F2-F5: enhance_native let a NaN or negative sigma, a size the network cannot take and a missing geometry
    through (cv2 / torch / attribute errors, or sigma -1 read as 0); predict_native read an enhancer's first channel
    as vessels; from_float_rgb clipped a [0, 255], NaN or channels-first image into a white, black or 3-row one;
    list_models of an unknown task gave [], read_manifest a str failed in pathlib, soft_fov_mask(mask, None) in
    an attribute."""
    import torch

    from degradation import soft_fov_mask
    from degradation.fov import estimate_fov_geometry
    from fundus_pipeline.io import from_float_rgb, read_image
    from fundus_pipeline.models import list_models
    from fundus_pipeline.models.inference import predict_native
    from fundus_pipeline.models.registry import build_model
    from fundus_pipeline.models.weights import read_manifest
    from fundus_pipeline.stages.enhance import enhance_native
    from tests.conftest import synthetic_fundus

    rgb = synthetic_fundus(96, 96, 0).astype(np.float32) / 255
    fov, geometry = estimate_fov_geometry(rgb)
    torch.manual_seed(0)
    enhancer = build_model("cofe_tiny").eval()
    assert enhance_native(enhancer, rgb, fov, geometry, 64, "residual", sigma=2.0).shape == rgb.shape
    for size, sigma, geo, error, text in (
        (64, float("nan"), geometry, ValueError, "sigma must be a number in \\[0, 512\\]"),
        (64, -1.0, geometry, ValueError, "sigma must be a number in \\[0, 512\\]"),
        (0, 0.0, geometry, ValueError, "size must be a whole multiple of the network's 32"),
        (100, 0.0, geometry, ValueError, "size must be a whole multiple of the network's 32"),
        (64, 0.0, None, TypeError, "geometry must be a FovGeometry"),
    ):
        with pytest.raises(error, match=text):
            enhance_native(enhancer, rgb, fov, geo, size, "residual", sigma=sigma)
    with pytest.raises(ValueError, match="the model gives 3 channels: a vessel segmenter gives one"):
        predict_native(enhancer, rgb, fov, 1.0)
    assert predict_native(build_model("imff_tiny").eval(), rgb, fov, 1.0).shape == rgb.shape[:2]

    Image.fromarray((rgb * 255).astype(np.uint8)).save(tmp_path / "x.png")
    meta = read_image(tmp_path / "x.png")[1]
    assert from_float_rgb(rgb, meta, None).dtype == np.uint8
    assert from_float_rgb(rgb[..., 0], meta, None).shape == rgb.shape
    for bad, error, text in (
        (rgb * 255, ValueError, r"must lie in \[0, 1\]"),
        (np.full_like(rgb, np.nan), ValueError, "NaN"),
        (rgb.transpose(2, 0, 1), ValueError, "channels first"),
        ((rgb * 255).astype(np.uint8), TypeError, "must be a float array"),
    ):
        with pytest.raises(error, match=text):
            from_float_rgb(bad, meta, None)
    with pytest.raises(ValueError, match="no architecture has the task 'nope'"):
        list_models(task="nope")
    assert [e.name for e in read_manifest(str(Path(__file__).resolve().parents[1] / "weights"))] == [e.name for e in read_manifest()]
    with pytest.raises(TypeError, match="fov must be a FovGeometry"):
        soft_fov_mask(fov, None)
    from fundus_pipeline.stages.enhance import output_rules

    with pytest.raises(ValueError, match="output_rules takes an enhancement weights' entry; 'imff' is not one"):
        output_rules(next(w for w in read_manifest() if w.name == "imff"))
    with pytest.raises(TypeError, match="output_rules takes a weights manifest entry"):  # a name (review 29 R29-6)
        output_rules("cofe")


# ------------------------------------------------------------------------------------------------ campaign 27b F7
def test_run_chain_checks_a_configuration_changed_with_model_copy(photos, tmp_path, tiny):  # noqa: F811
    """27b F7: `run_chain(cfg.model_copy(update={"min_gain": 99}), ...)` ran to the end and recorded min_gain 99."""
    from fundus_pipeline.chain import run_chain
    from fundus_pipeline.config import RunConfig
    from fundus_pipeline.errors import UsageError

    cfg = RunConfig(steps=["grade"], grade_weights=str(tiny["hemf_tiny"]), grade_arch="hemf_tiny", device="cpu", quiet=True)
    with pytest.raises(UsageError, match="--min-gain 99"):
        run_chain(cfg.model_copy(update={"min_gain": 99}), photos, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert run_chain(cfg, photos, tmp_path / "o2").exit_code == 0


# ------------------------------------------------------------------------------------------------ campaign 26a C26a-6
def test_a_recipe_none_of_whose_steps_can_apply_is_noted(tmp_path, capsys):
    """C26a-6: a recipe whose every step has p = 0 ran without a word (each output its input, masked to the FOV)."""
    from tests.test_campaign8 import _photos

    folder = _photos(tmp_path / "in", 1)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"schema_version": 1, "name": "x", "steps": [{"name": "a", "type": "defocus", "p": 0},
                                                                               {"name": "b", "type": "jpeg", "p": 0}]}))
    capsys.readouterr()
    assert run("degrade", folder, tmp_path / "o", "--recipe", recipe) == 0
    assert "note: the recipe 'x' applies none of its steps (every step's p is 0)" in capsys.readouterr().err
    recipe.write_text(json.dumps({"schema_version": 1, "name": "x", "steps": [{"name": "a", "type": "defocus", "p": 0},
                                                                               {"name": "b", "type": "jpeg", "p": 0.5}]}))
    assert run("degrade", folder, tmp_path / "o2", "--recipe", recipe) == 0
    assert "applies none of its steps" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ campaign 27a F2
def test_a_stage_does_not_resume_or_overwrite_a_folder_another_stage_wrote(photos, tmp_path, tiny, capsys):  # noqa: F811
    """27a F2: `fundus score --overwrite` into an enhance folder replaced its manifest and table with score's (the
    enhanced photographs left without a record); a --resume there compared the two stages' settings."""
    out = tmp_path / "g"
    grade = ("--weights", tiny["hemf_tiny"], "--arch", "hemf_tiny", "--device", "cpu", "--quiet")
    assert run("degrade", photos, out, "--quiet") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for flag in ("--overwrite", "--resume"):
        capsys.readouterr()
        assert run("grade", photos, out, *grade, flag) == 2
        assert f"{flag}: {out} holds the outputs of `fundus degrade` (its manifest.json), not of `fundus grade`" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert run("degrade", photos, out, "--quiet", "--overwrite") == 0  # its own folder: replaced as before
    capsys.readouterr()
    assert run("run", photos, out, *tiny_args_for_run(tiny), "--overwrite") == 2
    assert "holds the outputs of `fundus degrade`" in capsys.readouterr().err


def tiny_args_for_run(weights):
    from tests.test_run import tiny_args

    return tiny_args(weights, "--steps", "grade")


# ------------------------------------------------------------------------------------------------ campaign 27a F1
def test_a_correction_sigma_beyond_the_frame_is_a_usage_error(photos, tmp_path, tiny, capsys):  # noqa: F811
    """27a F1: --correction-sigma had no upper bound: 1e9 had OpenCV build a kernel of gigabytes (killed for memory,
    no message), 1e5 took minutes for two small photographs."""
    from fundus_pipeline.stages.enhance import smooth_correction

    for argv in (["enhance", photos, tmp_path / "e", "--weights", tiny["cofe_tiny"], "--arch", "cofe_tiny", "--no-vessel-stats"],
                 ["run", photos, tmp_path / "r", *tiny_args_for_run(tiny)]):
        capsys.readouterr()
        assert run(*argv, "--correction-sigma", "1e9") == 2
        assert "correction-sigma" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and not (tmp_path / "r").exists()
    c = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="at most 512"):
        smooth_correction(c, c, np.ones((8, 8), bool), 1e9)


# ------------------------------------------------------------------------------------------------ campaign 27a F3
def test_a_photograph_too_dark_for_a_field_of_view_is_told_so(tmp_path, tiny, capsys):  # noqa: F811
    """27a F3: a photograph under-exposed to 5% of its levels (its surround pure black) failed with "no dark surround"."""
    from tests.conftest import synthetic_fundus

    folder = tmp_path / "in"
    folder.mkdir()
    a = synthetic_fundus(96, 96, 0).astype(np.float64)
    Image.fromarray(np.round(a * 0.05).astype(np.uint8)).save(folder / "dim.png")
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(folder / "flat.png")
    Image.fromarray(a.astype(np.uint8)).resize((900, 40), Image.BOX).save(folder / "strip.png")  # review 27 R27-5
    out = tmp_path / "e"
    assert run("enhance", folder, out, "--weights", tiny["cofe_tiny"], "--arch", "cofe_tiny", "--no-vessel-stats", "--quiet") == 3
    rows = rows_of(out / "results.csv")
    assert "too dark to tell its field of view from the surround" in rows["dim"]["error"], rows["dim"]["error"]
    assert "no dark surround" in rows["flat"]["error"]
    assert "no circular field of view could be traced in its dark surround: a squashed, stretched or cut picture" in rows["strip"]["error"]


# ------------------------------------------------------------------------------------------------ campaign 27a F4, F13
def test_enhance_takes_a_segmenter_of_ones_own_with_its_architecture(photos, tmp_path, tiny, capsys):  # noqa: F811
    """27a F4: a --segmenter file not in the manifest could not be used: the hint said --arch, which names the
    enhancer's architecture. F13: --segmenter was not checked, unused, with --no-vessel-stats."""
    enh = ("--weights", tiny["cofe_tiny"], "--arch", "cofe_tiny", "--device", "cpu", "--quiet")
    capsys.readouterr()
    assert run("enhance", photos, tmp_path / "a", *enh, "--segmenter", tiny["imff_tiny"]) == 1
    assert "name the architecture with --segmenter-arch (e.g. --segmenter-arch imff)" in capsys.readouterr().err
    assert run("enhance", photos, tmp_path / "b", *enh, "--segmenter", tiny["imff_tiny"], "--segmenter-arch", "imff_tiny") == 0
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["config"]["segmenter"]["sha256"] and all(r["status"] == "ok" for r in rows_of(tmp_path / "b" / "results.csv").values())
    assert run("enhance", photos, tmp_path / "c", *enh, "--no-vessel-stats", "--segmenter", "sdmp") == 2
    assert "drop them with --no-vessel-stats" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    capsys.readouterr()
    assert run("enhance", photos, tmp_path / "d", "--weights", tiny["cofe_tiny"], "--no-vessel-stats") == 1
    assert "(e.g. --arch cofe_add)" in capsys.readouterr().err  # an enhancer's example, not a segmenter's


# ------------------------------------------------------------------------------------------------ campaign 27a F5
def test_score_refuses_a_reference_that_cannot_be_the_enhanced_photographs(tmp_path, tiny):  # noqa: F811
    """27a F5: an all-black reference scored 0.27, a reference shifted by 40 px 0.818 and a grey enhanced photograph
    against a colour reference 0.739, with status ok: only the sizes were compared."""
    from tests.conftest import synthetic_fundus

    enh, ref = tmp_path / "e", tmp_path / "r"
    enh.mkdir()
    ref.mkdir()
    photo = synthetic_fundus(128, 128, 3)
    for name in ("good", "black", "shifted", "grey"):
        Image.fromarray(photo).save(enh / f"{name}.png")
    Image.fromarray(photo).save(ref / "good.png")
    Image.fromarray(np.zeros_like(photo)).save(ref / "black.png")
    shifted = np.roll(photo, 30, axis=1)
    shifted[:, :30] = 0
    Image.fromarray(shifted).save(ref / "shifted.png")
    Image.fromarray(photo).convert("L").save(enh / "grey.png")
    Image.fromarray(photo).save(ref / "grey.png")
    out = tmp_path / "s"
    assert run("score", enh, out, "--reference", ref, "--weights", tiny["sdmp_tiny"], "--arch", "sdmp_tiny", "--device", "cpu", "--quiet") == 3
    rows = rows_of(out / "results.csv")
    assert rows["good"]["status"] == "ok"
    assert "the reference is blank inside the field of view" in rows["black"]["error"]
    assert "the reference's field of view is not where the enhanced photograph's is (centres 30 px apart" in rows["shifted"]["error"]
    assert "the enhanced photograph is grey and its reference in colour" in rows["grey"]["error"]


# ------------------------------------------------------------------------------------------------ campaign 27a F6
def test_a_partner_whose_name_differs_only_in_case_or_unicode_form_is_named(tmp_path, tiny):  # noqa: F811
    """27a F6: "no reference image with the key 'café'" beside a reference café.png written in NFD (as macOS names
    files), or 'Case' beside case.png: the message read as if it named a file that is there."""
    import unicodedata

    from tests.conftest import synthetic_fundus

    enh, ref = tmp_path / "e", tmp_path / "r"
    enh.mkdir()
    ref.mkdir()
    photo = Image.fromarray(synthetic_fundus(96, 96, 1))
    photo.save(enh / "caf\u00e9.png")
    photo.save(ref / (unicodedata.normalize("NFD", "caf\u00e9") + ".png"))
    photo.save(enh / "Case.png")
    photo.save(ref / "case.png")
    out = tmp_path / "s"
    assert run("score", enh, out, "--reference", ref, "--weights", tiny["sdmp_tiny"], "--arch", "sdmp_tiny", "--device", "cpu", "--quiet") == 3
    rows = rows_of(out / "results.csv")
    nfd = unicodedata.normalize("NFD", "caf\u00e9")
    assert rows["caf\u00e9"]["error"] == f"no reference image with the key 'caf\u00e9'; its key {nfd!r} differs from it only in case or Unicode form (rename one of them)"
    assert rows["Case"]["error"].endswith("its key 'case' differs from it only in case or Unicode form (rename one of them)")


# ------------------------------------------------------------------------------------------------ campaign 27a F10, F12
def test_an_output_that_is_the_input_file_and_a_stage_folders_own_tables_as_input(photos, tmp_path, tiny, capsys):  # noqa: F811
    """27a F10: `enhance x.png x.png` said the input lies inside the output folder (it is a file, no folder). F12: scoring
    an enhance folder noted its own manifest.json and results.csv as files not read, every time."""
    enh = ("--weights", tiny["cofe_tiny"], "--arch", "cofe_tiny", "--device", "cpu", "--no-vessel-stats")
    capsys.readouterr()
    assert run("enhance", photos / "p0.png", photos / "p0.png", *enh, "--quiet") == 2
    assert f"output path exists and is not a folder: {photos / 'p0.png'}" in capsys.readouterr().err
    out = tmp_path / "e"
    assert run("enhance", photos, out, *enh, "--quiet") == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert run("score", out, tmp_path / "s", "--reference", photos, "--weights", tiny["sdmp_tiny"], "--arch", "sdmp_tiny", "--device", "cpu") == 0
    err = capsys.readouterr().err
    assert "note: 1 file with other extensions not read (.txt 1)" in err, err


# ------------------------------------------------------------------------------------------------ campaign 27a F11
def test_a_refused_resume_says_the_default_where_one_side_records_none(photos, tmp_path, tiny, capsys):  # noqa: F811
    """27a F11: a setting recorded only when not at its default read "null there" (input_score: null there, true now)."""
    args = ("--reference", photos, "--weights", tiny["sdmp_tiny"], "--arch", "sdmp_tiny", "--device", "cpu", "--quiet")
    out = tmp_path / "s"
    assert run("score", photos, out, *args) == 0
    capsys.readouterr()
    assert run("score", photos, out, *args, "--input-score", "--resume") == 2
    err = capsys.readouterr().err
    assert "(input_score: the default there, true now)" in err and "null" not in err, err


# ------------------------------------------------------------------------------------------------ campaign 27a F14
def test_a_stop_signal_after_the_command_ended_keeps_its_exit_status(tmp_path):
    """27a F14: a SIGTERM arriving after a finished run had printed its summary (while the interpreter shut down) made
    the exit status 143. Simulated deterministically: the signal is sent as the command exits."""
    import subprocess
    import sys

    script = tmp_path / "t.py"
    script.write_text(
        "import os, signal, sys\n"
        "real = sys.exit\n"
        "def exit_with_a_stop(code):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    real(code)\n"
        "sys.exit = exit_with_a_stop\n"
        "sys.argv = ['fundus', '--version']\n"
        "from fundus_pipeline.cli.app import main\n"
        "main()\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.strip()  # what it printed is kept


# ------------------------------------------------------------------------------------------------ campaign 28a F1, F5
def test_segment_warns_when_fov_full_meets_a_dark_surround_and_refuses_a_threshold_single_precision_loses(photos, tmp_path, tiny, capsys):  # noqa: F811
    """28a F1: `--fov full` on an uncropped photograph segmented the black surround (44% of DRIVE 01's "vessel" pixels)
    with no warning. F5: `--threshold 1e-300` rounded to 0 in the float32 maps and painted every pixel a vessel."""
    seg = ("--weights", tiny["imff_tiny"], "--arch", "imff_tiny", "--device", "cpu", "--quiet")
    cropped = tmp_path / "cropped"
    cropped.mkdir()
    photo = np.asarray(Image.open(photos / "p0.png"))
    Image.fromarray(photo[28:68, 36:76]).save(cropped / "c.png")  # inside the field only
    assert run("segment", photos, tmp_path / "full", "--fov", "full", *seg) == 0
    rows = rows_of(tmp_path / "full" / "results.csv")
    assert all("a circular field of view in a dark surround was found" in r["warning"] for r in rows.values()), rows
    assert run("segment", cropped, tmp_path / "cfull", "--fov", "full", *seg) == 0
    assert "dark surround" not in rows_of(tmp_path / "cfull" / "results.csv")["c"]["warning"]
    for t in ("1e-300", "0.9999999999"):
        capsys.readouterr()
        assert run("segment", photos, tmp_path / f"t{t}", "--threshold", t, *seg) == 2
        assert "rounds to 0 or 1 in the probability maps' single precision" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ campaign 28a F2
def test_a_small_or_squashed_photograph_is_graded_with_a_warning_a_run_keeps_apart(tmp_path, tiny):  # noqa: F811
    """28a F2: a 32x32 thumbnail of DRIVE 01 was graded usable and a 30000x200 strip good (p 0.80), with no warning."""
    from fundus_pipeline.report import split_warning, summary
    from fundus_pipeline.stages.grade import GREY_WARNING
    from tests.conftest import synthetic_fundus
    from tests.test_run import tiny_args

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(synthetic_fundus(96, 112, 0)).save(folder / "normal.png")
    Image.fromarray(synthetic_fundus(96, 112, 1)).resize((32, 32), Image.BOX).save(folder / "thumb.png")
    Image.fromarray(synthetic_fundus(96, 112, 2)).resize((900, 60), Image.BOX).save(folder / "strip.png")
    out = tmp_path / "g"
    assert run("grade", folder, out, "--weights", tiny["hemf_tiny"], "--arch", "hemf_tiny", "--device", "cpu", "--quiet") == 0
    rows = rows_of(out / "results.csv")
    assert rows["normal"]["warning"] == ""
    assert rows["thumb"]["warning"].startswith("small photograph: 29 px across")  # its field of view
    assert rows["strip"]["warning"].startswith("squashed frame: 900x60 without a field of view")
    # in a run's joined table the grader's warnings stay apart from the segmenter's, and are counted apart from grey ones
    seg = "implausible vessel fraction 0.394 (expected 0.03-0.25)"
    joined = f"{GREY_WARNING}; {rows['thumb']['warning']}; {seg}"
    assert split_warning(joined) == (f"{GREY_WARNING}; {rows['thumb']['warning']}", seg)
    assert split_warning(f"{rows['strip']['warning']}; {seg}") == (rows["strip"]["warning"], seg)
    page = summary([{"status": "ok", "warning": w} for w in (joined, rows["strip"]["warning"], seg, "")], False, False)
    assert (page["grey"], page["unsure"], page["warnings"]) == (1, 2, 2)
    assert run("run", folder, tmp_path / "r", *tiny_args(tiny, "--steps", "grade")) == 0
    assert "2 small, squashed or without a field of view: grade to check by eye" in (tmp_path / "r" / "report.html").read_text()


# ------------------------------------------------------------------------------------------------ campaign 28b F1, F3
def test_a_picture_without_a_field_of_view_is_graded_with_a_warning_and_the_report_names_segmenter_warnings_as_such(tmp_path, tiny):  # noqa: F811
    """28b F1: a checkerboard picture, no field of view found, was graded good (p 0.72) with no warning. F3: the report's
    vessel card called every segmenter warning "implausible", a no-dark-surround one too."""
    from fundus_pipeline.report import split_warning
    from tests.conftest import synthetic_fundus
    from tests.test_run import tiny_args

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(synthetic_fundus(96, 112, 0)).save(folder / "fundus.png")
    board = (np.indices((96, 112)).sum(axis=0) // 8 % 2 * 200 + 30).astype(np.uint8)
    Image.fromarray(np.stack([board, board // 2, board // 3], axis=2)).save(folder / "board.png")
    out = tmp_path / "g"
    assert run("grade", folder, out, "--weights", tiny["hemf_tiny"], "--arch", "hemf_tiny", "--device", "cpu", "--quiet") == 0
    rows = rows_of(out / "results.csv")
    assert rows["fundus"]["warning"] == ""
    assert rows["board"]["warning"].startswith("no field of view: no circular field of view in a dark surround was found")
    assert split_warning(rows["board"]["warning"] + "; implausible vessel fraction 0.3") == (rows["board"]["warning"], "implausible vessel fraction 0.3")
    assert run("run", folder, tmp_path / "r", *tiny_args(tiny, "--steps", "grade,segment")) == 3  # the board: no field to segment
    page = (tmp_path / "r" / "report.html").read_text()
    assert "implausible</span>" not in page


# ------------------------------------------------------------------------------------------------ review 27 R27-1
def test_a_resume_refused_after_a_stage_made_rows_is_recorded_stopped(tmp_path, tiny, monkeypatch):  # noqa: F811
    """R27-1: the manifest of the resumed run was put back whatever the error, also after the grade step had graded
    new photographs: the folder then read finished with the old counts, and fundus report made a page of it."""
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.stages import segment
    from tests.conftest import synthetic_fundus
    from tests.test_run import tiny_args

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(synthetic_fundus(72, 80, 0)).save(folder / "a.png")
    out = tmp_path / "r"
    args = tiny_args(tiny, "--steps", "grade,segment")
    assert run("run", folder, out, *args) == 0
    Image.fromarray(synthetic_fundus(72, 80, 1)).save(folder / "b.png")

    def refused(self, cfg):
        raise UsageError("refused for the test")

    monkeypatch.setattr(segment.SegmentStage, "__init__", refused)
    assert run("run", folder, out, *args, "--resume") == 2
    assert json.loads((out / "manifest.json").read_text())["status"] == "stopped"  # b was graded: not the old record
    assert run("report", out) == 2


# ------------------------------------------------------------------------------------------------ review 27 R27-2
def test_fundus_runs_hint_for_unlisted_weights_names_its_own_option(photos, tmp_path, tiny, capsys):  # noqa: F811
    """R27-2: fundus run's hint for weights not in the manifest said --arch, an option it does not have."""
    capsys.readouterr()
    assert run("run", photos, tmp_path / "r", "--steps", "segment", "--segment-weights", tiny["imff_tiny"], "--device", "cpu", "--quiet") == 1
    err = capsys.readouterr().err
    assert "name the architecture with --segment-arch (e.g. --segment-arch imff)" in err, err


# ------------------------------------------------------------------------------------------------ review 27 R27-3
def test_a_weights_manifests_correction_sigma_keeps_to_the_options_range():
    """R27-3: a manifest entry's correction_sigma had no upper bound: 1000 loaded, then every photograph was an error row."""
    from pydantic import ValidationError

    from fundus_pipeline.config import MAX_CORRECTION_SIGMA
    from fundus_pipeline.models.spec import ImageOutputSpec

    base = {"kind": "image", "activation": "sigmoid", "transfer": "residual", "transfer_selection": {}}
    assert ImageOutputSpec(**base, correction_sigma=MAX_CORRECTION_SIGMA).correction_sigma == MAX_CORRECTION_SIGMA
    with pytest.raises(ValidationError):
        ImageOutputSpec(**base, correction_sigma=1000.0)


# ------------------------------------------------------------------------------------------------ campaign 27b F5
def test_image_metrics_refuse_an_empty_mask():
    """27b F5: score_pair (and psnr, ssim, ...) of an empty mask returned NaN for every figure, with no error."""
    from fundus_pipeline.evaluation.image_metrics import psnr, score_pair

    a = np.full((32, 32, 3), 0.5, np.float32)
    empty = np.zeros((32, 32), bool)
    for fn in (score_pair, psnr):
        with pytest.raises(ValueError, match="mask is empty"):
            fn(a, a, empty)
    assert score_pair(a, a * 0.9, ~empty)["psnr"] > 0


# ------------------------------------------------------------------------------------------------ review 28 R28-3
def test_a_weights_manifests_vessel_threshold_is_one_single_precision_holds():
    """R28-3: the float32 rule of --threshold did not cover the weights manifest: a threshold of 1e-300 there still
    made every pixel a vessel."""
    from pydantic import ValidationError

    from fundus_pipeline.models.spec import OutputSpec
    from fundus_pipeline.models.weights import read_manifest

    shipped = next(w for w in read_manifest() if w.name == "imff").output.model_dump()
    assert OutputSpec.model_validate(shipped).threshold == shipped["threshold"]
    for t in (1e-300, 0.9999999999):
        with pytest.raises(ValidationError, match="single precision"):
            OutputSpec.model_validate({**shipped, "threshold": t, "threshold_selection": {**shipped["threshold_selection"], "threshold": t}})


# ------------------------------------------------------------------------------------------------ campaign 29a F1
def test_a_stderr_that_cannot_be_written_leaves_the_exit_status_and_the_json(tmp_path, tiny):  # noqa: F811
    """29a F1: with stderr closed or full, the lines said after a run (the failures' table, a replay's outcome) failed
    to write and the command exited 1: a run with a failed photograph (3), and `fundus run --replay --format json`
    (0, and no JSON at all on stdout)."""
    import os
    import subprocess
    import sys

    from tests.conftest import synthetic_fundus
    from tests.test_run import tiny_args

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(synthetic_fundus(72, 80, 0)).save(folder / "a.png")
    (folder / "bad.png").write_text("not an image")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def fundus(args: list, redirect: str) -> subprocess.CompletedProcess:
        cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "fundus_pipeline", *map(str, args)])
        return subprocess.run(["bash", "-c", f"{cmd} {redirect}"], capture_output=True, text=True, env=env, timeout=600)

    assert fundus(["degrade", folder, tmp_path / "d"], "2>&-").returncode == 3
    assert fundus(["degrade", folder, tmp_path / "d2"], "2>/dev/full").returncode == 3
    good = tmp_path / "good"
    good.mkdir()
    (good / "a.png").write_bytes((folder / "a.png").read_bytes())
    assert run("run", good, tmp_path / "r", *tiny_args(tiny, "--steps", "grade")) == 0
    r = fundus(["run", "--replay", tmp_path / "r", tmp_path / "r2", "--format", "json", "--quiet"], "2>/dev/full")
    assert r.returncode == 0, r
    assert json.loads(r.stdout)["exit_code"] == 0
