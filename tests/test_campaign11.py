"""Session of 2026-12-04 (second part): what campaign 10a left (D15) and what campaign 11 found.

Each test fails on the code before its mend."""

from __future__ import annotations

import numpy as np
import pytest


def _same(a, b) -> bool:
    return [s.name for s in a] == [s.name for s in b] and all(
        np.array_equal(x.rgb, y.rgb) and np.array_equal(x.fov, y.fov) and np.array_equal(x.vessels, y.vessels) and x.disc == y.disc
        for x, y in zip(a, b)
    )


def test_sources_of_one_dataset_are_prepared_alone_and_kept_for_a_later_full_run(fake_data, tmp_path, monkeypatch):
    """10a D15: `--datasets drive` prepared all three datasets (16 minutes for HEI-MED) before its first step."""
    from fundus_pipeline.train import enhance as trainer

    seg = trainer.resolve_segmenter()
    reference = trainer.prepare_sources(fake_data, 64, seg, None, lambda m: None)  # no cache at all
    prepared: list[str] = []
    real = trainer._prepare_one
    monkeypatch.setattr(trainer, "_prepare_one", lambda n, *a: prepared.append(n) or real(n, *a))
    cache = tmp_path / "c" / "sources.npz"
    drive = trainer.prepare_sources(fake_data, 64, seg, cache, lambda m: None, ("drive",))
    assert [s.name for s in drive] == [s.name for s in reference if s.name.startswith("drive/")]
    assert prepared == [s.name for s in drive]  # was: every source of the three datasets
    assert not cache.exists() and (tmp_path / "c" / ".sources.npz.parts").is_dir()
    assert _same(drive, [s for s in reference if s.name.startswith("drive/")])
    prepared.clear()
    said: list[str] = []
    every = trainer.prepare_sources(fake_data, 64, seg, cache, said.append)
    assert prepared == [s.name for s in reference if not s.name.startswith("drive/")]  # DRIVE's were kept
    assert any(f"({len(drive)} prepared before" in m for m in said)
    assert _same(every, reference) and cache.is_file() and not (tmp_path / "c" / ".sources.npz.parts").exists()
    prepared.clear()
    hrf = trainer.prepare_sources(fake_data, 64, seg, cache, lambda m: None, ("hrf",))  # from the one file now
    assert prepared == [] and _same(hrf, [s for s in reference if s.name.startswith("hrf/")])


def test_an_interrupted_preparation_keeps_what_it_prepared(fake_data, tmp_path, monkeypatch):
    """10a D15: the cache was written only at the end, so a Ctrl-C during the preparation lost all of it."""
    from fundus_pipeline.train import enhance as trainer

    seg = trainer.resolve_segmenter()
    real = trainer._prepare_one
    prepared: list[str] = []

    def stop_at_the_fifth(n, *a):
        if len(prepared) == 4:
            raise KeyboardInterrupt
        prepared.append(n)
        return real(n, *a)

    monkeypatch.setattr(trainer, "_prepare_one", stop_at_the_fifth)
    cache = tmp_path / "sources.npz"
    with pytest.raises(KeyboardInterrupt):
        trainer.prepare_sources(fake_data, 64, seg, cache, lambda m: None)
    first = list(prepared)
    prepared.clear()
    monkeypatch.setattr(trainer, "_prepare_one", lambda n, *a: prepared.append(n) or real(n, *a))
    again = trainer.prepare_sources(fake_data, 64, seg, cache, lambda m: None)
    assert len(first) == 4 and not set(first) & set(prepared) and len(prepared) == len(again) - 4
    monkeypatch.setattr(trainer, "_prepare_one", real)
    assert _same(again, trainer.prepare_sources(fake_data, 64, seg, None, lambda m: None))


def test_a_part_prepared_from_other_bytes_is_not_used(fake_data, tmp_path):
    import shutil

    from PIL import Image

    from fundus_pipeline.train import enhance as trainer

    other = tmp_path / "data"
    shutil.copytree(fake_data, other)
    seg = trainer.resolve_segmenter()
    cache = tmp_path / "sources.npz"
    a = trainer.prepare_sources(fake_data, 64, seg, cache, lambda m: None, ("drive",))
    photo = other / "DRIVE" / "training" / "images" / "21_training.tif"
    Image.fromarray((np.asarray(Image.open(photo)) * 0.6).astype(np.uint8)).save(photo)
    b = trainer.prepare_sources(other, 64, seg, cache, lambda m: None, ("drive",))
    assert not np.array_equal(a[0].rgb, b[0].rgb) and _same(a[1:], b[1:])
    assert len(list((tmp_path / ".sources.npz.parts").glob("drive__21.*"))) == 1  # the stale part is gone


# ------------------------------------------------------------------------------------------------ campaign 11a
def _qbuild(data, out, *extra: str) -> int:
    from fundus_pipeline.cli import main as cli_main

    return cli_main([
        "build", "quality-set", str(out), "--data", str(data), "--parts", "train", "--limit", "1", "--draws", "1",
        "--size", "128", "--enhancers", "identity,blur", "--threads", "1", *extra,
    ])  # fmt: skip


def _files(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "rows" not in p.parts}


@pytest.fixture(scope="module")
def built(fake_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("c11") / "set"
    assert _qbuild(fake_data, out) == 0
    return out


def test_a_set_is_never_written_into_the_data_and_a_rebuild_removes_only_its_own_files(fake_data, built, tmp_path):
    """11a D1: OUT inside --data was accepted, and a rebuild with other options rmtree'd OUT/train and OUT/test:
    the whole DRIVE test split when OUT was DRIVE, any user folder called train/ elsewhere."""
    import shutil

    before = sorted(p.relative_to(fake_data) for p in fake_data.rglob("*"))
    for out in (fake_data / "sets", fake_data / "DRIVE", fake_data):
        assert _qbuild(fake_data, out, "--overwrite") == 2
    assert _qbuild(fake_data, fake_data.parent) == 2  # OUT holding the data root
    assert sorted(p.relative_to(fake_data) for p in fake_data.rglob("*")) == before
    out = tmp_path / "set"
    shutil.copytree(built, out)
    (out / "train" / "mine").mkdir()
    (out / "train" / "mine" / "notes.txt").write_text("mine")
    (out / "train" / "enhanced" / "mine.png").write_bytes(b"mine")
    assert _qbuild(fake_data, out, "--seed", "7", "--overwrite") == 0  # was: train/ removed with everything in it
    assert (out / "train" / "mine" / "notes.txt").read_text() == "mine" and (out / "train" / "enhanced" / "mine.png").read_bytes() == b"mine"
    fresh = tmp_path / "fresh"
    assert _qbuild(fake_data, fresh, "--seed", "7") == 0
    got = _files(out)
    assert {k: v for k, v in got.items() if "mine" not in k and k != "manifest.json"} == {k: v for k, v in _files(fresh).items() if k != "manifest.json"}


def test_a_rerun_on_other_data_is_refused_and_overwrite_rebuilds(fake_data, built, tmp_path):
    """11a D2: a rerun reused the finished sources whatever --data held (a set mixing two datasets, exit 0), the
    manifest recorded no data, and `--overwrite` with the same options rebuilt nothing."""
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(fake_data, data)
    out = tmp_path / "set"
    shutil.copytree(built, out)
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["data"]["root"] == str(fake_data.resolve()) and len(manifest["data"]["sha256"]) == 64
    assert _qbuild(data, out) == 0  # the same files elsewhere: a finished set, nothing rebuilt
    assert _files(out) .keys() == _files(built).keys()
    assert json.loads((out / "manifest.json").read_text())["data"]["sha256"] == manifest["data"]["sha256"]
    photo = data / "DRIVE" / "training" / "images" / "21_training.tif"
    photo.write_bytes((data / "DRIVE" / "training" / "images" / "22_training.tif").read_bytes())
    assert _qbuild(data, out) == 2  # was: 0, drive/21 kept from the other photograph
    assert _qbuild(data, out, "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert _qbuild(data, fresh) == 0
    got, want = _files(out), _files(fresh)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in got if k != "manifest.json")
    assert got["train/clean/drive-21.png"] != _files(built)["train/clean/drive-21.png"]


def test_a_cut_short_rebuild_leaves_no_finished_looking_set(fake_data, built, tmp_path, monkeypatch):
    """11a D3: an `--overwrite` rebuild stopped after one source left the old pairs.csv and manifest.json,
    listing images that were gone or replaced (their labels wrong)."""
    import shutil

    from fundus_pipeline.quality import build as qb

    out = tmp_path / "set"
    shutil.copytree(built, out)
    real, calls = qb.build_source, []

    def stop_at_the_second(*a, **k):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(qb, "build_source", stop_at_the_second)
    assert _qbuild(fake_data, out, "--seed", "7", "--overwrite") == 130
    for name in ("manifest.json", "pairs.csv", "degradations.jsonl"):
        assert not (out / name).exists(), name
    monkeypatch.setattr(qb, "build_source", real)
    assert _qbuild(fake_data, out, "--seed", "7") == 0 and (out / "manifest.json").is_file()  # the rerun finishes it


def test_a_rerun_builds_again_a_source_whose_images_are_missing_or_cut(fake_data, built, tmp_path):
    """11a D11: a rerun of a finished set decided "done" by rows/*.json alone: a deleted image stayed missing
    and a truncated one stayed truncated, exit 0."""
    import shutil

    out = tmp_path / "set"
    shutil.copytree(built, out)
    (out / "train" / "enhanced" / "drive-21__d0__blur.png").unlink()
    clean = out / "train" / "clean" / "hrf-01_h.png"
    clean.write_bytes(clean.read_bytes()[:100])
    assert _qbuild(fake_data, out) == 0
    got, want = _files(out), _files(built)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in got if k != "manifest.json")


def test_a_grade_set_rebuild_removes_its_own_pictures_only(fake_data, tmp_path):
    """11a D1 for the grade set: its photographs and not-fundus pictures share PART/images with whatever else is
    there; `--overwrite` with other options removed the whole train/ tree."""
    from fundus_pipeline.cli import main as cli_main

    def build(out, *extra):
        return cli_main(["build", "grade-set", str(out), "--data", str(fake_data), "--limit", "1", "--draws", "1", "--size", "128",
                         "--store-size", "64", "--threads", "1", "--parts", "train", *extra])  # fmt: skip

    out = tmp_path / "set"
    assert build(out) == 0
    (out / "train" / "images" / "mine.png").write_bytes(b"mine")
    assert build(out, "--seed", "9") == 2
    assert build(out, "--seed", "9", "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert build(fresh, "--seed", "9") == 0
    got = _files(out)
    assert got.pop("train/images/mine.png") == b"mine"
    want = _files(fresh)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in got if k != "manifest.json")


def _png(path, a) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _seg_case(tmp_path):
    rng = np.random.default_rng(0)
    gt = (rng.random((16, 16)) > 0.6).astype(np.uint8) * 255
    prob = np.clip(gt.astype(np.int16) + rng.integers(-150, 150, gt.shape), 0, 255).astype(np.uint8)
    for k in ("a", "b"):
        _png(tmp_path / "p" / f"{k}.png", prob)
        _png(tmp_path / "g" / f"{k}.png", gt)
    return gt


def test_evaluate_segment_refuses_an_empty_fov_and_an_empty_prediction_folder(tmp_path):
    """11a D4: an all-black FOV mask scored its image 1.0 on every metric (0/0) and raised the means; D7: a
    PRED_DIR without an image ended as an internal StopIteration (exit 1), not the documented exit 2."""
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.evaluation.segment import evaluate_segmentation

    gt = _seg_case(tmp_path)
    _png(tmp_path / "f" / "a.png", np.full(gt.shape, 255, np.uint8))
    _png(tmp_path / "f" / "b.png", np.zeros(gt.shape, np.uint8))
    res = evaluate_segmentation(tmp_path / "p", tmp_path / "g", tmp_path / "f", threshold=0.5, n_boot=0)
    assert res.n_problems == 1 and "empty FOV" in res.summary["problems"][0]["status"] and res.summary["n_images"] == 1
    (tmp_path / "p" / "b.png").unlink()
    alone = evaluate_segmentation(tmp_path / "p", tmp_path / "g", tmp_path / "f", threshold=0.5, n_boot=0)
    assert res.summary["mean"]["f1"] == alone.summary["mean"]["f1"] < 1  # was: the mean of a and a perfect b
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no prediction"):
        evaluate_segmentation(tmp_path / "empty", tmp_path / "g")


def test_a_non_utf8_file_name_is_reported_not_an_internal_error(tmp_path):
    """11a D9: a file name that is not UTF-8 (Linux allows it) crashed every evaluator while writing its reports
    (UnicodeEncodeError, exit 1), score and grade after metrics.csv and summary.json: half a report set."""
    import json
    import os

    from fundus_pipeline.cli import main as cli_main

    _seg_case(tmp_path)
    for sub in ("p", "g"):
        os.rename(tmp_path / sub / "a.png", os.fsdecode(os.fsencode(str(tmp_path / sub)) + b"/caf\xe9.png"))
    out = tmp_path / "out"
    assert cli_main(["evaluate", "segment", str(tmp_path / "p"), str(tmp_path / "g"), "--bootstrap", "0", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "summary.json", "summary.md"]
    assert "caf\\udce9" in (out / "metrics.csv").read_text(encoding="utf-8")
    assert json.loads((out / "summary.json").read_text())["n_images"] == 2
    odd = tmp_path / os.fsdecode(b"dir\xe9")
    odd.mkdir()
    (odd / "scores.csv").write_text("key,score\nk0,1\nk1,2\nk2,3\n")
    (odd / "labels.csv").write_text("key,part,source,label\nk0,test,a,0.1\nk1,test,b,0.5\nk2,test,c,0.3\n")
    assert cli_main(["evaluate", "score", str(odd / "scores.csv"), str(odd / "labels.csv"), "--by", "", "--bootstrap", "0"]) == 0
    assert sorted(p.name for p in (odd / "eval_score").iterdir()) == ["metrics.csv", "summary.json", "summary.md"]


def test_a_bootstrap_over_one_cluster_gives_no_interval(tmp_path):
    """11a D10: with one source photograph (or one image) every resample is the same, and the zero-width
    "95% CI" was reported as such, without a note."""
    import json

    from fundus_pipeline.evaluation.metrics import segmentation_report
    from fundus_pipeline.evaluation.score import evaluate_scores

    rep = segmentation_report([{"key": "a", "tp": 5, "fp": 1, "tn": 9, "fn": 2}], n_boot=50)
    assert all(np.isnan(v).all() for v in rep["ci95"]["mean"].values()) and np.isnan(rep["ci95"]["pooled"]["f1"]).all()
    (tmp_path / "s.csv").write_text("key,score\n" + "".join(f"k{i},{x}\n" for i, x in enumerate((1, 2, 3, 4, 5))))
    for sources, single in (("sssss", True), ("sstuu", False)):
        (tmp_path / "l.csv").write_text("key,part,source,label\n" + "".join(f"k{i},test,{s},{y}\n" for i, (s, y) in enumerate(zip(sources, (0.1, 0.4, 0.2, 0.9, 0.5)))))
        res = evaluate_scores(tmp_path / "s.csv", tmp_path / "l.csv", by=(), n_boot=50)
        ci = json.loads(json.dumps(res.summary))["overall"]["ci95"]
        assert (ci["srocc"] == [None, None]) is single and any("single source photograph" in n for n in res.notes) is single


def test_a_csv_naming_a_column_twice_is_refused(tmp_path):
    """11a D12: `key,score,score` was read with the last `score` column, silently."""
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.evaluation.score import evaluate_scores

    (tmp_path / "s.csv").write_text("key,score,score\nk0,9,1\nk1,9,2\nk2,9,3\n")
    (tmp_path / "l.csv").write_text("key,part,source,label\nk0,test,a,0.1\nk1,test,b,0.5\nk2,test,c,0.3\n")
    with pytest.raises(UsageError, match="'score' more than once"):
        evaluate_scores(tmp_path / "s.csv", tmp_path / "l.csv", by=(), n_boot=0)


def test_heimed_table_is_checked_not_trusted(fake_data, tmp_path):
    """11a D5 and D8: a repeated heimed.csv row gave the set duplicate keys, a row naming ../../DRIVE/test/...
    made a test photograph a training source, and a missing column, a byte-order mark (as spreadsheets save the
    file) or a Latin-1 byte ended as internal errors."""
    import shutil

    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.train.enhance import heimed_table, source_list

    data = tmp_path / "data"
    shutil.copytree(fake_data / "HEI-MED", data / "HEI-MED")
    table = data / "HEI-MED" / "heimed.csv"
    text = table.read_text()
    want = heimed_table(data)
    table.write_text("\ufeff" + text.replace("\n", "\r\n"), newline="")
    assert heimed_table(data) == want  # was: KeyError 'image'
    lines = text.splitlines(keepends=True)
    first = lines[1].split(",")[0]
    cases = {
        "listed twice": text + lines[1],
        "not a file name": text.replace(first, "../../DRIVE/test/images/01_test.tif", 1),
        "no column 'image'": text.replace("image", "img", 1),
        "cannot read": text + "caf\xe9.jpg,1,1,1,1,1\n",
        "is not a number": text.replace(f"{first},192,160,40,", f"{first},192,160,abc,", 1),
    }
    for what, body in cases.items():
        table.write_bytes(body.encode("latin-1"))
        with pytest.raises(UsageError, match=what):
            source_list(data)


def test_a_source_with_an_empty_or_mismatched_fov_mask_is_refused(fake_data, tmp_path):
    """11a D6 and D8: an all-black DRIVE mask made an all-black source, labelled q = 1 and graded Good; a mask of
    another size ended as an internal broadcasting error."""
    from PIL import Image

    from fundus_pipeline.datasets import drive_paths
    from fundus_pipeline.errors import InputError
    from fundus_pipeline.train.enhance import canonical_source

    paths = drive_paths(fake_data, "21")
    canonical_source(paths, 64)
    for name, mask in (("empty", np.zeros((64, 64), np.uint8)), ("small", np.full((50, 50), 255, np.uint8))):
        Image.fromarray(mask).save(tmp_path / f"{name}.png")
        with pytest.raises(InputError, match="covers 0%" if name == "empty" else "FOV mask of 50x50"):
            canonical_source({**paths, "fov": tmp_path / f"{name}.png"}, 64)


# ------------------------------------------------------------------------------------------------ audit 11b
def test_a_full_disk_while_an_image_is_written_stops_the_stage(tmp_path, monkeypatch, capsys):
    """11b F1: ENOSPC while an output image was written made that photograph an error row, and every later one
    too: exit 3, manifest `finished`, no hint (the README promised exit 1, `stopped` and the --resume hint)."""
    import errno
    import json

    from PIL import Image

    from fundus_pipeline import io as fio
    from fundus_pipeline import runner
    from fundus_pipeline.cli import main as cli_main
    from tests.conftest import synthetic_fundus

    (tmp_path / "in").mkdir()
    for k in range(4):
        Image.fromarray(synthetic_fundus(64, 64, k)).save(tmp_path / "in" / f"p{k}.png")
    real, calls = runner.write_image_atomic, []

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def second_is_full(path, arr):
        calls.append(path)
        if len(calls) < 2:
            return real(path, arr)
        with monkeypatch.context() as m:
            m.setattr(fio.os, "fsync", full)
            return real(path, arr)

    monkeypatch.setattr(runner, "write_image_atomic", second_is_full)
    out = tmp_path / "out"
    args = ["degrade", str(tmp_path / "in"), str(out), "--recipe", "mild", "--workers", "1"]
    capsys.readouterr()
    assert cli_main(args) == 1  # was: 3
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Hint: free space" in err
    assert err.count("No space left on device") == 1, err  # said once (campaign 27a F9: the row's error line, then the same again)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "stopped" and len(calls) == 2  # was: finished, every later photograph tried
    monkeypatch.setattr(runner, "write_image_atomic", real)
    assert cli_main([*args, "--resume"]) == 0
    assert json.loads((out / "manifest.json").read_text())["counts"]["ok"] == 4


def test_a_checkpoint_that_cannot_be_written_hints_resume_only_when_there_is_one(fake_data, tmp_path, monkeypatch, capsys):
    """11b F3: the first last.pt failing to save (a full disk: torch raises RuntimeError "unexpected pos ...")
    hinted "rerun with --resume (the previous checkpoint is intact)": there was none, and that rerun is refused."""
    import torch

    from tests.test_train_segment import _args, _train

    real, saves = torch.save, []

    def fail_from(n):
        def save(obj, f, *a, **k):
            saves.append(f)
            if len(saves) >= n:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 427264 vs 427216")
            return real(obj, f, *a, **k)
        return save

    for n, hint in ((1, "start the run again"), (3, "rerun with --resume")):
        saves.clear()
        monkeypatch.setattr(torch, "save", fail_from(n))
        capsys.readouterr()
        assert _train(*_args(fake_data, tmp_path / f"r{n}")) == 1
        err = capsys.readouterr().err
        assert "MiB free on that disk" in err and hint in err and ("--resume" in err) is (n == 3), err
    monkeypatch.setattr(torch, "save", real)


def test_a_resumed_runs_recorded_command_can_be_run(fake_data, tmp_path, monkeypatch, capsys):
    """11b F4 and F5: a resumed run recorded its last resume's command (`--resume`, with `--init` for a
    fine-tune), which fundus refuses; the refusal of a changed option did not list --cache and --amp."""
    import json

    from tests.test_campaign10a import _interrupted_at_step_2
    from tests.test_train_segment import _args, _train

    base = tmp_path / "base"
    assert _train(*_args(fake_data, base, "--steps", "1")) == 0
    out = tmp_path / "ft"
    _interrupted_at_step_2(monkeypatch, *_args(fake_data, out, "--init", str(base / "last.pt")))
    capsys.readouterr()
    assert _train(*_args(fake_data, out, "--resume", "--seed", "4")) == 2
    assert "--cache" in capsys.readouterr().err
    assert _train(*_args(fake_data, out, "--resume")) == 0
    argv = json.loads((out / "summary.json").read_text())["argv"]
    assert "--resume" not in argv and "--init" in argv  # was: both, refused together
    again = tmp_path / "again"
    argv[argv.index("--out") + 1] = str(again)
    assert _train(*argv[3:]) == 0  # the recorded command reproduces the run
    a = torch_load(out / "last.pt")
    b = torch_load(again / "last.pt")
    assert all((a["model"][k] == b["model"][k]).all() for k in a["model"])


def torch_load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_checkpoint_torch_reads_as_invalid_argument_is_damaged_not_an_io_error(fake_data, tmp_path, monkeypatch, capsys):
    """11b F7: a last.pt cut at some lengths made torch raise OSError(EINVAL), reported as "cannot read ...:
    Invalid argument" (an I/O error) without the hint that it cannot be continued."""
    import errno

    import torch

    from tests.test_train_segment import _args, _train

    out = tmp_path / "r"
    assert _train(*_args(fake_data, out, "--steps", "1")) == 0

    def einval(*a, **k):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(torch, "load", einval)
    capsys.readouterr()
    assert _train(*_args(fake_data, out, "--steps", "1", "--resume")) == 1
    err = capsys.readouterr().err
    assert "is not a readable checkpoint" in err and "start again in a new --out" in err


def test_a_library_that_cannot_be_mapped_at_start_up_is_out_of_memory_in_one_line(monkeypatch, capsys):
    """11b F2: under `ulimit -v` of 200-600 MB the import of OpenCV or torch fails with an ImportError "failed to
    map segment from shared object": a raw traceback from the console script's import (200-300 MB) or an
    "internal error" (400-600 MB), where the README promises "out of memory" (exit 1)."""
    import sys
    import types

    from fundus_pipeline import console, errors

    class Unmappable(types.ModuleType):
        def __getattr__(self, name):
            raise ImportError("libtorch_cpu.so: failed to map segment from shared object")

    monkeypatch.setattr(errors, "address_space_limit", lambda: 400 * 2**20)
    monkeypatch.setitem(sys.modules, "fundus_pipeline.cli", Unmappable("fundus_pipeline.cli"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        console.main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.startswith("Error: out of memory (the address space is limited to 400 MiB")
    assert "Traceback" not in err and len(err.splitlines()) == 2  # the line and its hint
    monkeypatch.setattr(errors, "address_space_limit", lambda: None)  # no limit: a broken install, said as such
    with pytest.raises(SystemExit):
        console.main()
    assert capsys.readouterr().err.startswith("Error: internal error: ImportError")


def test_a_long_score_bootstrap_says_how_far_it_is(tmp_path, monkeypatch):
    """11a (noted): `evaluate score` on 100,000 pairs took 212 s without a word; it now says its progress."""
    from fundus_pipeline.evaluation import score as sc

    # scores that follow the labels, 8 sources: no degenerate resample (a near-constant mapped score gave a
    # correlation of rounding noise, which moved with the arrays' memory alignment between two calls)
    rng = np.random.default_rng(0)
    label = rng.random(40)
    (tmp_path / "s.csv").write_text("key,score\n" + "".join(f"k{i},{v + 0.2 * rng.random():.6f}\n" for i, v in enumerate(label)))
    (tmp_path / "l.csv").write_text("key,part,source,label\n" + "".join(f"k{i},test,s{i % 8},{v:.6f}\n" for i, v in enumerate(label)))
    monkeypatch.setattr(sc, "PROGRESS_EVERY_S", 0.0)
    said: list[str] = []
    quiet = sc.evaluate_scores(tmp_path / "s.csv", tmp_path / "l.csv", by=(), n_boot=20)
    loud = sc.evaluate_scores(tmp_path / "s.csv", tmp_path / "l.csv", by=(), n_boot=20, log=said.append)

    def rounded(v):  # the figures, to 9 digits: the last bits of a sum may differ between two calls
        if isinstance(v, dict):
            return {k: rounded(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rounded(x) for x in v]
        return float(f"{v:.9g}") if isinstance(v, float) else v

    assert said and said[-1].startswith("bootstrap: 19/20 resamples") and rounded(loud.summary) == rounded(quiet.summary)


# ------------------------------------------------------------------------------------------------ review 12
def test_a_set_notices_a_changed_source_list_and_trusts_no_record(fake_data, built, tmp_path):
    """Review 12: M1, a heimed.csv row removed (or added) was not noticed: finished sources kept their old
    train/val split and a removed source stayed in the set; L2, a record's `files` naming ../x deleted outside
    OUT; L3, `--overwrite` without rows/config.json kept the old images as finished; L4, a record that is JSON
    but not a record was an internal error."""
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(fake_data, data)
    out = tmp_path / "set"
    assert _qbuild(data, out, "--limit", "2") == 0
    table = data / "HEI-MED" / "heimed.csv"
    lines = table.read_text().splitlines(keepends=True)
    table.write_text("".join(lines[:1] + lines[2:]))  # the first photograph (a val source) is gone
    assert _qbuild(data, out, "--limit", "2") == 2  # was: 0, heimed-00000001 kept as train
    assert _qbuild(data, out, "--limit", "2", "--overwrite") == 0
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    record = next((out / "rows" / "train").glob("drive-*.json"))
    res = json.loads(record.read_text())
    res["files"]["../precious.txt"] = 4
    record.write_text(json.dumps(res))
    (out / "rows" / "train" / "odd.json").write_text("[]")
    assert _qbuild(data, out, "--limit", "2", "--seed", "5", "--overwrite") == 0  # was: internal error on odd.json
    assert outside.read_text() == "keep"  # was: deleted
    (out / "rows" / "config.json").unlink()
    assert _qbuild(data, out, "--limit", "2", "--seed", "6", "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert _qbuild(data, fresh, "--limit", "2", "--seed", "6") == 0
    got, want = _files(out), _files(fresh)
    assert got.keys() == want.keys() and all(got[k] == want[k] for k in got if k != "manifest.json")  # was: seed-5 images kept


def linked_drive(fake_data, tmp_path):
    """(big, data): a data root whose DRIVE/ is a link to a copy in ``big``, outside the root."""
    import shutil

    big = tmp_path / "big"
    shutil.copytree(fake_data / "DRIVE", big / "DRIVE")
    data = tmp_path / "data"
    data.mkdir()
    for name in ("HRF", "HEI-MED"):
        (data / name).symlink_to(fake_data / name)
    (data / "DRIVE").symlink_to(big / "DRIVE")
    return big, data


def test_a_dataset_folder_reached_through_a_link_is_not_an_out(fake_data, tmp_path):
    """Review 12, M2: with DRIVE a symbolic link to a folder outside the data root, `build ... OUT=that folder`
    passed the inside-the-root check and wrote among the DRIVE photographs."""
    big, data = linked_drive(fake_data, tmp_path)
    for out in (big / "DRIVE", big / "DRIVE" / "training" / "images" / "sets", big):
        assert _qbuild(data, out, "--overwrite") == 2, out
    assert sorted(p.name for p in (big / "DRIVE" / "training" / "images").iterdir()) == sorted(
        p.name for p in (fake_data / "DRIVE" / "training" / "images").iterdir()
    )


def test_heimed_rows_with_a_trailing_comma_still_build(fake_data, tmp_path):
    """Review 12, M4: a heimed.csv row with an extra empty field (a trailing comma) built before the table was
    checked and became an internal TypeError after; a non-empty extra field or a repeated column is refused."""
    import shutil

    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.quality.build import source_inputs
    from fundus_pipeline.train.enhance import heimed_table, source_list

    data = tmp_path / "data"
    shutil.copytree(fake_data / "HEI-MED", data / "HEI-MED")
    table = data / "HEI-MED" / "heimed.csv"
    text = table.read_text()
    want = heimed_table(data)
    table.write_text(text.replace("0.5\n", "0.5,\n"))
    assert heimed_table(data) == want
    assert all(source_inputs(data, n, info) for n, info in source_list(data) if n.startswith("heimed/"))
    for body, what in ((text.replace("0.5\n", "0.5,x\n", 1), "more fields"), (text.replace("on_col", "on_row", 1), "more than once")):
        table.write_text(body)
        with pytest.raises(UsageError, match=what):
            heimed_table(data)
