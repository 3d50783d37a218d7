"""Campaign 17 (2026-12-04, sixth part): real-world image files and names (17b).

Each test fails on the code before its mend."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from fundus_pipeline import io as fio


def _fundus_like(h: int = 160, w: int = 200, seed: int = 0) -> np.ndarray:
    """An 8-bit RGB photograph-like image: a textured orange disc on a black surround."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.45 * h) ** 2
    img = np.zeros((h, w, 3), np.float64)
    img[disc] = [0.75, 0.38, 0.15]
    img += rng.normal(0, 0.03, img.shape) * disc[..., None]
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------------------------- 17b F1
@pytest.mark.parametrize("mode,photometric,tol", [("CMYK", "separated", 0.0), ("YCbCr", "ycbcr", 2.0), ("LAB", "cielab", 2.0)])
def test_a_cmyk_ycbcr_or_lab_tiff_is_read_as_its_rgb(tmp_path, mode, photometric, tol):
    """17b F1: an uncompressed CMYK TIFF came back as RGBA (C, M, Y for R, G, B and K for alpha: an invisible
    image that degrade wrote out and the grader rejected), YCbCr and CIELab ones as unconverted 'RGB'."""
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    rgb = _fundus_like()
    kw = {"subsampling": (1, 1)} if photometric == "ycbcr" else {}
    path = tmp_path / f"p_{mode}.tif"
    tifffile.imwrite(path, np.asarray(Image.fromarray(rgb).convert(mode)), photometric=photometric, **kw)
    import PIL

    if mode == "YCbCr" and int(PIL.__version__.split(".")[0]) < 13:  # (pyproject allows Pillow 10: campaign 36c M-2)
        with pytest.raises(fio.InputError, match=r"8-bit YCbCr TIFF that Pillow .* cannot decode .*Pillow 13 or later reads it; or export it as RGB$"):
            fio.read_image(path)
        return
    arr, meta = fio.read_image(path)
    assert meta.mode == "rgb" and arr.shape == rgb.shape
    assert np.abs(arr.astype(int) - rgb.astype(int)).mean() <= tol + 1e-9


def test_a_16_bit_cmyk_tiff_is_refused_in_one_line(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    path = tmp_path / "c16.tif"
    tifffile.imwrite(path, np.full((40, 40, 4), 1000, np.uint16), photometric="separated")
    with pytest.raises(fio.InputError, match="16-bit TIFF in the CMYK colour space with 4 samples is not supported"):
        fio.read_image(path)


# --------------------------------------------------------------------------------------------- 17b F2
def test_a_transparent_surround_is_read_as_black_whatever_lies_under_it(tmp_path):
    """17b F2: an RGBA photograph whose surround is transparent with white under it was analysed with the white
    (no FOV found: segment and enhance failed, grade said reject / not_fundus); alpha 0 is now read as black,
    partly transparent pixels and the alpha plane are kept."""
    from PIL import Image

    from fundus_pipeline.stages.base import Fov

    rgb = _fundus_like()
    inside = rgb.max(axis=2) > 0
    alpha = np.where(inside, 255, 0).astype(np.uint8)
    alpha[:3, :3] = 128  # partly transparent: kept as it is
    white = np.dstack([rgb, alpha])
    white[~inside, :3] = 255
    white[:3, :3, :3] = 200
    Image.fromarray(white).save(tmp_path / "w.png")
    arr, meta = fio.read_image(tmp_path / "w.png")
    assert meta.mode == "rgba" and np.array_equal(arr[..., 3], alpha)
    assert arr[~inside & (alpha == 0), :3].max() == 0 and np.array_equal(arr[inside], white[inside])
    assert (arr[:3, :3, :3] == 200).all()
    fov = Fov.estimate(fio.to_float_rgb(arr)[0])
    assert fov.found and fov.mask[inside].mean() > 0.95
    opaque = np.dstack([rgb, np.full(inside.shape, 255, np.uint8)])
    assert fio.clear_transparent(opaque) is opaque  # nothing transparent: no copy


# --------------------------------------------------------------------------------------------- 17b F3
def _matrix_icc(description: str) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix and gamma curves): Adobe RGB (1998)'s primaries, gamma 2.2."""
    def s15(x):
        return struct.pack(">i", int(round(x * 65536)))

    def xyz(x, y, z):
        return b"XYZ " + b"\0" * 4 + s15(x) + s15(y) + s15(z)

    def curve(g):
        return b"curv" + b"\0" * 4 + struct.pack(">IH", 1, int(round(g * 256))) + b"\0\0"

    text = description.encode() + b"\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(text)) + text + struct.pack(">IIHB", 0, 0, 0, 0) + b"\0" * 67
    tags = [(b"desc", desc), (b"cprt", b"text" + b"\0" * 4 + b"none\0"), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
            (b"rXYZ", xyz(0.6097, 0.3111, 0.0195)), (b"gXYZ", xyz(0.2053, 0.6257, 0.0609)),
            (b"bXYZ", xyz(0.1492, 0.0632, 0.7446))] + [(t, curve(2.19921875)) for t in (b"rTRC", b"gTRC", b"bTRC")]
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for sig, d in tags:
        d += b"\0" * (-len(d) % 4)
        table += sig + struct.pack(">II", offset + len(data), len(d))
        data += d
    body = struct.pack(">I", len(tags)) + table + data
    header = (struct.pack(">I", 128 + len(body)) + b"none" + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + b"\0" * 12
              + b"acspAPPL" + b"\0" * 24 + s15(0.9642) + s15(1.0) + s15(0.8249) + b"none" + b"\0" * 44)
    assert len(header) == 128
    return header + body


def test_an_embedded_colour_profile_is_converted_to_srgb(tmp_path):
    """17b F3: an Adobe RGB photograph was read as if it were sRGB (red 13-22 levels off) and its outputs shown
    that far from it. It is now converted as a colour-managed viewer shows it, and the manifest says from what."""
    from PIL import Image, ImageCms

    rgb = _fundus_like()
    icc = _matrix_icc("Adobe RGB (1998) test")
    adobe = ImageCms.ImageCmsProfile(__import__("io").BytesIO(icc))
    encoded = ImageCms.profileToProfile(Image.fromarray(rgb), ImageCms.createProfile("sRGB"), adobe, outputMode="RGB")
    encoded.save(tmp_path / "a.png", icc_profile=icc)
    raw = np.asarray(encoded).astype(int)
    assert np.abs(raw - rgb.astype(int)).max() > 10  # the stored values are not the sRGB ones
    arr, meta = fio.read_image(tmp_path / "a.png")
    assert meta.colour_profile == "Adobe RGB (1998) test"
    assert np.abs(arr.astype(int) - rgb.astype(int)).mean() < 1.5
    Image.fromarray(rgb).save(tmp_path / "s.png", icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    arr, meta = fio.read_image(tmp_path / "s.png")  # an sRGB profile: read as stored
    assert meta.colour_profile is None and np.array_equal(arr, rgb)


# --------------------------------------------------------------------------------------------- 17b F4, F6, F12
def test_folder_search_is_in_name_order_prefers_the_real_folder_and_says_what_it_passed_over(tmp_path):
    """17b F6: a folder reached as itself and through a link was read under whichever name the (unsorted)
    listing gave first, so keys, outputs and degrade's seeds changed from copy to copy; F4: other extensions
    were skipped without a word; F12: keys differing only in case collide on a case-insensitive disk."""
    from PIL import Image

    img = Image.fromarray(_fundus_like(40, 40))
    for n in range(6):  # the link's name sorts before the folder's, and the listing order varies
        (tmp_path / f"t{n}" / f"zz_real{n}").mkdir(parents=True)
        img.save(tmp_path / f"t{n}" / f"zz_real{n}" / "p.png")
        os.symlink(f"zz_real{n}", tmp_path / f"t{n}" / f"aa_link{n}")
        notes: list[str] = []
        assert [i.key for i in fio.discover_images(tmp_path / f"t{n}", notes)] == [f"zz_real{n}/p"]
        assert any(f"aa_link{n} (reached through a symbolic link) not read again" in note for note in notes)
    root = tmp_path / "mixed"
    root.mkdir()
    for name in ("A.png", "a.png", "b.png"):
        img.save(root / name)
    for name in ("x.webp", "y.json", "z.json"):
        (root / name).write_bytes(b"0")
    notes = []
    assert [i.key for i in fio.discover_images(root, notes)] == ["A", "a", "b"]
    assert notes[0].startswith("3 files with other extensions not read (.json 2, .webp 1)")
    assert any("'A', 'a' differ only in letter case" in note for note in notes)


def test_a_stage_prints_the_search_notes_and_records_them(tmp_path):
    """The notes reach the user (one `note:` line each on stderr) and the manifest (`input.notes`)."""
    import json

    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_fundus_like(64, 64)).save(src / "a.png")
    (src / "a.webp").write_bytes(b"0")
    r = subprocess.run([sys.executable, "-m", "fundus_pipeline", "degrade", str(src), str(tmp_path / "out"), "--threads", "1"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "note: 1 file with other extensions not read (.webp 1)" in r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input"]["notes"][0].startswith("1 file with other extensions not read")


# --------------------------------------------------------------------------------------------- 17b F7
def test_a_file_name_cannot_break_the_error_line_or_drive_the_terminal(tmp_path):
    """17b F7: a newline or an escape sequence in a file name was printed raw in the one-line item error."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "bad\nINJECTED \x1b[31mline.png").write_bytes(b"not a png")
    r = subprocess.run([sys.executable, "-m", "fundus_pipeline", "degrade", str(src), str(tmp_path / "out"), "--threads", "1"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 3
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad\\nINJECTED \\x1b[31mline" in errors[0], r.stderr
    assert "\x1b" not in r.stderr and not any(line.startswith("INJECTED") for line in r.stderr.splitlines())
    from fundus_pipeline.errors import printable

    assert printable("bad\nINJECTED \x1b[2J\udce9 é 中") == "bad\\nINJECTED \\x1b[2J\\udce9 é 中"


# --------------------------------------------------------------------------------------------- 17a (options vs docs)
def _fundus(*args, cwd=None, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "fundus_pipeline", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


def test_missing_rsa_init_weights_are_exit_1_and_an_arch_of_another_task_reads_well(tmp_path):
    """17a F1: `train enhance --rsa-init nope.pt` was exit 2 without a hint (every other missing weights file is
    exit 1); F9: "'cofe' is a enhancement model"."""
    r = _fundus("train", "enhance", "--out", tmp_path / "tr", "--rsa-init", tmp_path / "nope.pt", "--steps", "1",
                env_extra={"FUNDUS_DATA": str(tmp_path)})
    assert r.returncode == 1 and "--rsa-init: weights not found" in r.stderr and "Hint:" in r.stderr, r.stderr
    r = _fundus("train", "segment", "--out", tmp_path / "tr2", "--arch", "cofe", "--steps", "1", env_extra={"FUNDUS_DATA": str(tmp_path)})
    assert r.returncode == 2 and "'cofe' is an enhancement model, not a segmentation model" in r.stderr, r.stderr


def test_a_tile_too_small_for_its_overlaps_is_refused_not_silently_enlarged(tmp_path):
    """17a F2: `segment --tile 10` ran with 144-px tiles while the manifest recorded 10 (a resume with the tile that
    ran was then refused); --tile 100 --overlap 200 was accepted."""
    from fundus_pipeline.config import SegmentConfig
    from fundus_pipeline.errors import UsageError

    for tile, overlap in ((10, 64), (100, 200), (143, 64)):
        with pytest.raises(UsageError, match=r"^--tile \d+ is smaller than 2 x --overlap \+ 16"):
            SegmentConfig.build(tile=tile, overlap=overlap)
    assert SegmentConfig.build(tile=144, overlap=64).tile == 144 and SegmentConfig.build(tile=0, overlap=500).tile == 0
    r = _fundus("segment", tmp_path / "missing.png", tmp_path / "out", "--tile", "10")
    assert r.returncode == 2 and r.stderr.startswith("Error: --tile 10 is smaller than 2 x --overlap + 16 = 144"), r.stderr


def test_degrade_replay_takes_the_earlier_runs_folder_as_fundus_run_does(tmp_path):
    """17a F4: `degrade --replay OLD_OUT` was refused ("is a folder") while `run --replay OLD_OUT` was accepted."""
    from PIL import Image

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_fundus_like(64, 64)).save(src / "a.png")
    assert _fundus("degrade", src, tmp_path / "d1", "--threads", "1", "-q", "--seed", "5").returncode == 0
    r = _fundus("degrade", src, tmp_path / "d2", "--threads", "1", "-q", "--replay", tmp_path / "d1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d2" / "a.png").read_bytes() == (tmp_path / "d1" / "a.png").read_bytes()
    (tmp_path / "empty").mkdir()
    r = _fundus("degrade", src, tmp_path / "d3", "--replay", tmp_path / "empty")
    assert r.returncode == 2 and "is a folder without a manifest.json" in r.stderr


def test_every_evaluator_takes_overwrite_and_the_help_states_the_ranges():
    """17a F5: only `evaluate segment` took the no-op --overwrite (a script passing it to all four failed on three);
    F6: ranges enforced but not in --help; F8: help copied where it does not apply; F10: lower-case placeholders."""
    from typer.testing import CliRunner

    from fundus_pipeline.cli import app

    def help_of(*cmd: str) -> str:
        r = CliRunner().invoke(app, [*cmd, "--help"], terminal_width=400, env={"COLUMNS": "400"})
        assert r.exit_code == 0, r.output
        return " ".join(r.output.split())

    for cmd in ("segment", "enhance", "score", "grade"):
        assert "--overwrite" in help_of("evaluate", cmd)
    assert "Usage: fundus evaluate segment [OPTIONS] {PRED_DIR} {GT_DIR}" in help_of("evaluate", "segment")
    degrade = help_of("degrade")
    assert "1-512" in degrade and "1-1024" in degrade and "16-bit probability" not in degrade
    run = help_of("run")
    assert "(-1 to 1)" in run and "(0 to 1)" in run and "(at least 48)" in run and "(strictly between 0 and 1)" in run
    assert "Seed of the simulator (>= 0)" in run
    grade = help_of("grade")
    assert "segment: vessel F1 0.002" in grade and "segment's IMFF-Net" in grade


# --------------------------------------------------------------------------------------------- review 18
def test_a_cmyk_tiff_with_an_extra_sample_is_refused_in_a_reproducible_line(tmp_path):
    """Review 18 R2: an 8-bit CMYK TIFF with alpha went to Pillow, which cannot open it, and was called
    "truncated or corrupt" with a BytesIO address that changed on every run."""
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    c = np.asarray(Image.fromarray(_fundus_like()).convert("CMYK"))
    path = tmp_path / "cmyka.tif"
    tifffile.imwrite(path, np.dstack([c, np.full(c.shape[:2], 255, np.uint8)]), photometric="separated", extrasamples=["unassalpha"])
    with pytest.raises(fio.InputError, match="8-bit TIFF in the CMYK colour space with 5 samples is not supported") as e:
        fio.read_image(path)
    assert "0x" not in str(e.value) and "corrupt" not in str(e.value)


def test_a_transparent_surround_is_cleared_in_the_readers_own_array():
    """Review 18 R3: clearing copied the reader's array and built index arrays (12000 x 9000 RGBA: peak 0.9 ->
    2.2 GB); the reader's own writable array is now cleared in place, a caller's is copied."""
    a = np.full((40, 40, 4), 200, np.uint8)
    a[:10, :, 3] = 0
    b = fio.clear_transparent(a)
    assert b is not a and (a[0, 0, :3] == 200).all() and (b[:10, :, :3] == 0).all() and (b[10:] == 200).all()
    c = fio.clear_transparent(a, in_place=True)
    assert c is a and (a[:10, :, :3] == 0).all() and (a[:10, :, 3] == 0).all()


# --------------------------------------------------------------------------------------------- 18b (install)
def test_an_install_without_the_weights_folder_says_how_to_get_it(tmp_path, monkeypatch):
    """18b F1: a non-editable install (a wheel) leaves the repository's weights/ behind; segment and score then
    called imff and sdmp "an architecture without shipped weights", and `fundus models` showed '-' in silence."""
    from fundus_pipeline.errors import WeightsError
    from fundus_pipeline.models import weights

    monkeypatch.delenv("FUNDUS_WEIGHTS", raising=False)
    monkeypatch.setattr(weights, "__file__", str(tmp_path / "site-packages" / "fundus_pipeline" / "models" / "weights.py"))
    assert weights.weights_dir() == tmp_path / "site-packages" / "weights"
    for name in ("imff", "sdmp", "hemf_4750"):
        with pytest.raises(WeightsError, match=r"no shipped weights: .*site-packages/weights \(the repository's weights "
                           r"folder, beside the package\) holds no manifest.json, so '" + name + "' cannot be found") as e:
            weights.resolve_weights(name)
        assert "pip install -e ." in e.value.hint
    r = _fundus("models", env_extra={"FUNDUS_WEIGHTS": str(tmp_path / "nowhere")})
    assert r.returncode == 0 and r.stderr.startswith("warning: no shipped weights:") and "pip install -e ." in r.stderr
