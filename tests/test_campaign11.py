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
