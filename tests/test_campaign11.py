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
