"""Campaign 36a (do the published figures reproduce from the documented commands?): mends and their tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_campaign32 import ROOT, _script
from tests.test_run import tiny  # noqa: F401  (tiny: a fixture, the tiny models of fundus run)


def _bench(folder: Path, table: dict) -> Path:
    """A BENCH whose drive part lists the images' sha256 ``table`` (what build_enhance_benchmark.py records)."""
    folder.mkdir(parents=True)
    (folder / "benchmark.json").write_text(json.dumps({"seed": 2026, "datasets": {"drive": {"inputs": [str(folder)], "sha256": table}}}))
    return folder


def test_the_enhancement_benchmark_refuses_rows_measured_on_another_build(tmp_path):
    """36a M-1: rows cached under --out were read back whatever BENCH they had been measured on (the documented
    command, run in a checkout, printed the published table again without measuring anything, and rows of two builds
    would have been averaged together). Each row now records its build; rows of another build are refused."""
    from fundus_pipeline.evaluation.enhance_bench import bench_build, cached_rows

    a = _bench(tmp_path / "a", {"drive/moderate/01_test.png": "0" * 64, "drive/mild/01_test.png": "2" * 64})
    b = _bench(tmp_path / "b", {"drive/moderate/01_test.png": "1" * 64, "drive/mild/01_test.png": "2" * 64})
    again = _bench(tmp_path / "elsewhere" / "a", dict(reversed(json.loads((a / "benchmark.json").read_text())["datasets"]["drive"]["sha256"].items())))
    assert len(bench_build(a, "drive")) == 16 and bench_build(a, "drive") != bench_build(b, "drive")
    assert bench_build(again, "drive") == bench_build(a, "drive")  # the images' bytes decide, not the folder or the order
    rows_dir = tmp_path / "out" / "rows"
    rows_dir.mkdir(parents=True)
    rows = [{"key": "01_test", "condition": "moderate", "psnr": 20.0, "bench": bench_build(a, "drive")},
            {"key": "02_test", "condition": "moderate", "psnr": 21.0}]  # (a row measured before builds were recorded)
    (rows_dir / "identity__drive.json").write_text(json.dumps(rows))
    assert cached_rows(rows_dir / "identity__drive.json", bench_build(a, "drive")) == rows
    r = _script("enhance_benchmark.py", b, "--methods", "identity", "--out", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.startswith("Error: ") and "another build of the benchmark" in r.stderr, r.stderr
    assert bench_build(a, "drive") in r.stderr and bench_build(b, "drive") in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["rows"]  # no summary rewritten
    r = _script("enhance_benchmark.py", b, "--methods", "identity", "--datasets", "hrf", "--out", tmp_path / "out")
    assert r.returncode == 2 and "holds no built hrf part" in r.stderr and "build_enhance_benchmark.py" in r.stderr, r.stderr


def test_the_enhancement_benchmark_says_which_rows_it_read_back_and_which_it_measured(tmp_path, data_root):
    """36a M-1: 'identity drive: 220 rows' did not say that none of them was measured by that command."""
    published = ROOT / "docs" / "enhance_benchmark" / "rows" / "identity__drive.json"
    rows_dir = tmp_path / "out" / "rows"
    rows_dir.mkdir(parents=True)
    (rows_dir / published.name).write_bytes(published.read_bytes())
    bench = _bench(tmp_path / "bench", {"drive/moderate/01_test.png": "0" * 64})
    r = _script("enhance_benchmark.py", bench, "--methods", "identity", "--out", tmp_path / "out", data=str(data_root), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (f"identity drive: 220 rows, 0 measured now, 220 read from {rows_dir / published.name} "
            "(220 measured before rows recorded their build: not checked against this BENCH)") in r.stdout, r.stdout
    assert (rows_dir / published.name).read_bytes() == published.read_bytes()


def test_the_grade_benchmark_scores_the_real_sets_without_a_grade_set(tmp_path):
    """36a L-2: GRADE_SET was required with --sets leaving the synthetic part out (a placeholder was passed); it is
    required only for the synthetic set now."""
    r = _script("grade_benchmark.py", "--sets", "synthetic", "--out", tmp_path / "out", "--work", tmp_path / "work")
    assert r.returncode == 2 and "give GRADE_SET, or --sets without synthetic" in r.stderr, r.stderr
    r = _script("grade_benchmark.py", "--sets", "clean_test", "--out", tmp_path / "out", "--work", tmp_path / "work")
    assert r.returncode == 1 and r.stderr.startswith("Error: /nonexistent/"), r.stderr  # past the arguments: the data root
    assert not (tmp_path / "out").exists()


def test_cofe_nets_inference_leaves_out_the_structure_branchs_vessel_logits():
    """36b B2: CofeNet.forward ran the whole IMFF-Net structure branch, its full-resolution decoder block, UDFF side
    path and head included, for vessel logits that only the training loss reads (11% of an enhancement's time).
    The enhancement is the same; the training outputs still hold the logits."""
    import torch

    from fundus_pipeline.models.registry import build_model

    torch.manual_seed(0)
    for name in ("cofe", "cofe_add", "cofe_rsa"):  # two-scale (both output rules) and single-scale
        model = build_model(name).eval()
        for p in model.parameters():  # (the residual output starts as the identity: make the branches count)
            p.data.add_(torch.randn_like(p) * 0.02)
        calls = []
        for part in (model.rsa.d4, model.rsa.head, model.rsa.up4):
            part.register_forward_hook(lambda *_: calls.append(1))
        x = torch.rand(1, 3, 64, 64)
        with torch.inference_mode():
            y = model(x)
            assert calls == []  # the logits' modules were not run
            train = model.forward_train(x)
        assert len(calls) == 3 and train["vessel_logits"].shape == (1, 1, 64, 64)
        assert torch.equal(y, train["out"]), name


def test_the_fov_estimates_channel_maximum_is_numpys():
    """36b B3: the FOV estimate's channel maximum is taken plane by plane (numpy's reduction over a last axis of 3
    was 30 times slower): the same values and dtype as ``max(axis=2)``, NaN included (the estimate refuses it)."""
    import numpy as np

    from degradation.fov import _channel_max, estimate_fov_geometry

    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.uint16, np.float32, np.float64):
        a = (rng.random((37, 41, 3)) * 200).astype(dtype)
        if a.dtype.kind == "f":
            a[3, 4, 1] = np.nan
        m = _channel_max(a)
        assert m.dtype == a.dtype and np.array_equal(m, a.max(axis=2), equal_nan=a.dtype.kind == "f"), dtype
    rgb = np.zeros((300, 320, 3), np.float32)
    rgb[5, 7, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        estimate_fov_geometry(rgb)


_FAULTS = """
import ctypes, resource, sys
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KB pages whatever the host's huge page setting (review 36 L-2)
import numpy as np
if sys.argv[1] == "1":
    from fundus_pipeline.runner import _set_threads
    _set_threads(None, 1)  # as a worker that runs a network starts
elif sys.argv[1] == "fit":  # a training (the toy one of the trainer's tests)
    from pathlib import Path
    from fundus_pipeline.train.config import TrainConfig
    from fundus_pipeline.train.loop import fit
    from tests.test_train_segment import _ToyTask
    cfg = TrainConfig(out=Path(sys.argv[2]), steps=2, batch_size=2, lr=1e-2, seed=5, val_every=2, ckpt_every=2)
    fit(_ToyTask(cfg), cfg)
def forward_pass():  # a forward pass's pattern: 40 buffers of 1-1.8 MB (under a huge page), written, then freed together
    buffers = []
    for k in range(40):
        a = np.empty((1 << 20) + (k % 5) * (200 << 10), np.uint8)
        a[::4096] = 1
        buffers.append(a)
for _ in range(3):
    forward_pass()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    forward_pass()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_a_process_that_runs_a_network_keeps_its_freed_memory_for_the_next_pass(tmp_path):
    """36b B1: glibc gave the buffers of each forward pass back to the kernel and faulted fresh pages in for the
    next (50,000 page faults, 0.1 s of system time per DRIVE-size segmentation; the chain 12% slower). Glibc's
    own settings in the environment still decide where they are given."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"):
        pytest.skip("not glibc")
    (tmp_path / "faults.py").write_text(_FAULTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = str(ROOT)

    def faults(tuned: str, **extra) -> int:
        r = subprocess.run([sys.executable, str(tmp_path / "faults.py"), tuned, str(tmp_path / "run")], capture_output=True,
                           text=True, timeout=300, env={**env, **extra}, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split()[-1])

    assert faults("0") > 10_000  # glibc's defaults: each pass's pages faulted in again (about 70,000 here)
    assert faults("1") < 1_000
    assert faults("1", MALLOC_TRIM_THRESHOLD_="131072") > 10_000  # the user's setting kept
    assert faults("1", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072") > 10_000
    assert faults("1", GLIBC_TUNABLES="glibc.rtld.nns=4") < 1_000  # another tunable leaves malloc to fundus (review 36 L-3)
    assert faults("fit") < 1_000  # a training keeps its freed memory too (a step 7-12% faster)


def test_a_grey_frame_is_grey_when_its_resampled_channels_differ_by_an_ulp():
    """36c M-1: with OpenCV before 4.12 (pyproject allows 4.8) the resized frame's channels of a grey photograph
    differed by 3e-8 (one float32 ulp) and the grader's grey warning was lost; a level of difference is colour."""
    import numpy as np

    from fundus_pipeline.stages.grade import is_grey

    rng = np.random.default_rng(0)
    grey = np.repeat(rng.random((16, 16, 1), dtype=np.float32), 3, axis=2)
    assert is_grey(grey)
    off = grey.copy()
    off[..., 1] = np.nextafter(off[..., 1], np.float32(1))  # one ulp up, as OpenCV 4.8-4.11 resampled it
    assert not np.array_equal(off[..., 0], off[..., 1]) and is_grey(off)
    for level in (1 / 255, 1 / 65535):
        tinted = grey.copy()
        tinted[3, 4, 2] += np.float32(level)
        assert not is_grey(tinted), level


def test_a_ycbcr_tiff_that_this_pillow_cannot_decode_is_not_called_corrupt(tmp_path, monkeypatch):
    """36c M-2: with Pillow 10-12 (pyproject allows 10) an uncompressed YCbCr TIFF was refused as a 'truncated or
    corrupt TIFF'; its extent is checked first, so it is the Pillow that cannot decode it, and the line says so. A
    file Pillow 13 cannot decode, or one of another colour space, stays 'corrupt' (review 36 L-1)."""
    import numpy as np
    import PIL
    import tifffile
    from PIL import Image

    from fundus_pipeline import io as fio

    rgb = np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)
    ycbcr, cmyk = tmp_path / "y.tif", tmp_path / "c.tif"
    tifffile.imwrite(ycbcr, np.asarray(Image.fromarray(rgb).convert("YCbCr")), photometric="ycbcr", subsampling=(1, 1))
    tifffile.imwrite(cmyk, np.asarray(Image.fromarray(rgb).convert("CMYK")), photometric="separated")
    real = Image.Image.load

    def failing(self):  # what Pillow 10.0-12.3 did with the YCbCr file (and a corrupt file does)
        if self.mode in ("YCbCr", "CMYK"):
            raise OSError("image file is truncated (0 bytes not processed)")
        return real(self)

    monkeypatch.setattr(Image.Image, "load", failing)
    monkeypatch.setattr(PIL, "__version__", "12.3.0")
    with pytest.raises(fio.InputError) as e:
        fio.read_image(ycbcr)
    assert str(e.value) == (f"{ycbcr}: 8-bit YCbCr TIFF that Pillow 12.3.0 cannot decode (image file is truncated (0 bytes not "
                            "processed)); Pillow 13 or later reads it; or export it as RGB")
    with pytest.raises(fio.InputError, match="truncated or corrupt TIFF"):
        fio.read_image(cmyk)
    monkeypatch.setattr(PIL, "__version__", "13.0.0")
    with pytest.raises(fio.InputError, match="truncated or corrupt TIFF"):
        fio.read_image(ycbcr)


def test_ray_that_is_installed_but_cannot_be_imported_is_not_said_to_be_missing(tmp_path, monkeypatch, capsys):
    """36c L-2: every ImportError was 'Ray, which is not installed' (pyarrow built for NumPy 2, under NumPy 1.26,
    stops `import ray.data`); the line now gives the import's own words."""
    import types

    from fundus_pipeline.cli import main

    class _Broken:  # `import ray.data` fails as pyarrow did under NumPy 1.26
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "ray.data":
                raise ImportError("pyarrow requires NumPy 2.0 or newer\nsecond line")
            return None

    fake = types.ModuleType("ray")
    fake.__path__ = []
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.delitem(sys.modules, "ray.data", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Broken, *sys.meta_path])
    photos = tmp_path / "in"
    photos.mkdir()
    from PIL import Image

    from tests.conftest import synthetic_fundus

    Image.fromarray(synthetic_fundus(96, 104, 0)).save(photos / "p.png")
    assert main(["degrade", str(photos), str(tmp_path / "out"), "--engine", "ray"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Error: --engine ray: Ray is installed but cannot be imported (pyarrow requires NumPy 2.0 or newer)", err
    assert "not installed" not in "\n".join(err) and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------- campaign 36d: a growing archive
def _bmp(path: Path, seed: int) -> Path:
    """An uncompressed photograph: every one of a size has the same number of bytes (one size per camera)."""
    from PIL import Image

    from tests.conftest import synthetic_fundus

    Image.fromarray(synthetic_fundus(96, 104, seed)).save(path, format="BMP")
    return path


def _rows(out: Path) -> dict[str, dict]:
    """The items of ``out``'s manifest by key (their provenance: input_sha256, input_stat)."""
    return {r["key"]: r for r in json.loads((out / "manifest.json").read_text())["items"]}


def test_a_photograph_replaced_by_one_of_the_same_size_and_time_is_processed_again(tmp_path, capsys):
    """36d F1: `cp -p` (rsync -a, tar) of another photograph of the same size over one done before kept the old one's
    results (exit 0, no word): --resume compared size and modification time only. The status-change time and the
    inode, which no copy can set, are recorded too; a record of an older run (size and time) still reads."""
    from fundus_pipeline.cli import main
    from fundus_pipeline.runner import input_state

    src = tmp_path / "in"
    src.mkdir()
    a, b = _bmp(src / "a.bmp", 1), _bmp(src / "b.bmp", 2)
    other = _bmp(tmp_path / "other.bmp", 3)
    assert a.stat().st_size == other.stat().st_size and a.read_bytes() != other.read_bytes()
    out = tmp_path / "out"
    assert main(["degrade", str(src), str(out), "--types", "111", "--quiet"]) == 0
    before = _rows(out)
    st = a.stat()
    a.write_bytes(other.read_bytes())  # another photograph, given a's size and times (what cp -p does)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert [a.stat().st_size, a.stat().st_mtime_ns] == [st.st_size, st.st_mtime_ns]
    if [a.stat().st_ctime_ns, a.stat().st_ino] == [st.st_ctime_ns, st.st_ino]:
        pytest.skip("this file system's status-change time is too coarse to tell the two writes apart")  # (review 37 L-3)
    capsys.readouterr()
    assert main(["degrade", str(src), str(out), "--types", "111", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "1 photograph(s) done before changed since" in err and "'a'" in err, err
    after = _rows(out)
    assert after["a"]["input_sha256"] != before["a"]["input_sha256"] and after["b"] == before["b"]
    import hashlib

    assert after["a"]["input_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()
    # a row of an older run records size and modification time only: compared as far as it goes
    assert after["a"]["input_stat"][2:] != before["a"]["input_stat"][2:]  # (status-change time, inode)
    row = {"input": str(b), "input_sha256": before["b"]["input_sha256"], "input_stat": [b.stat().st_size, b.stat().st_mtime_ns]}
    assert input_state(row) == "same"
    fresh: dict = {}
    assert input_state(row, fresh) == "same"  # ... read once, and recorded with the four figures since (review 37 L-1)
    st = b.stat()
    assert fresh == {"input_stat": [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]}
    row["input_stat"] = [b.stat().st_size, b.stat().st_mtime_ns, 1, 1]  # a status change or another inode: the bytes decide
    assert input_state(row) == "same"
    row["input_sha256"] = "0" * 64
    assert input_state(row) == "changed"


def test_a_resume_reads_an_input_whose_status_changed_once_and_records_it(tmp_path, monkeypatch, tiny):  # noqa: F811
    """Review 37 M-2: a kept row's record was not refreshed, so after one chmod -R (a hard link, a share remounted with
    other inode numbers) every later resume read every input again (three times in fundus run). M-3: an input that is
    there but cannot be read is changed (processed again, its error saying why), not away."""
    from fundus_pipeline import runner
    from fundus_pipeline.cli import main
    from fundus_pipeline.models import weights
    from fundus_pipeline.runner import input_state
    from tests.test_run import tiny_args

    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        _bmp(src / f"p{k}.bmp", k)
    reads = []
    real = weights.sha256_file

    def counting(path, *a, **kw):
        if Path(path).parent == src:
            reads.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(weights, "sha256_file", counting)
    out, chain = tmp_path / "out", tmp_path / "chain"
    assert main(["degrade", str(src), str(out), "--types", "111", "--quiet"]) == 0
    assert main(["run", str(src), str(chain), *map(str, tiny_args(tiny, "--steps", "grade,segment")), "--quiet"]) == 0
    for p in src.iterdir():
        p.chmod(0o600)  # the status-change time moves, the bytes stay
    for folder, argv in ((out, ["degrade", str(src), str(out), "--types", "111"]),
                         (chain, ["run", str(src), str(chain), *map(str, tiny_args(tiny, "--steps", "grade,segment"))])):
        reads.clear()
        runner._DIGESTS_READ.clear()  # (a new process)
        assert main([*argv, "--resume", "--quiet"]) == 0
        # once each: in fundus run grade's check and segment's share what was read (review 38 M-2: read 2-4 times)
        assert sorted(reads) == ["p0.bmp", "p1.bmp", "p2.bmp"], reads
        reads.clear()
        runner._DIGESTS_READ.clear()
        assert main([*argv, "--resume", "--quiet"]) == 0
        assert reads == [], reads  # recorded with the stat of now: not read again
    row = next(r for r in _rows(out).values() if r["key"] == "p0")
    row["input_stat"] = [0, 0, 0, 0]

    def unreadable(path, *a, **kw):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(weights, "sha256_file", unreadable)
    runner._DIGESTS_READ.clear()
    assert input_state(row) == "unreadable"  # processed again, not refused in fundus run as changed (review 38 M-1)
    fifo = tmp_path / "fifo.bmp"
    os.mkfifo(fifo)  # a FIFO in a photograph's place: changed, without a read that would block for good (review 38 L-2)
    assert input_state({**row, "input": str(fifo)}) == "changed"


def _share(tmp_path: Path, n: int, listed: int) -> tuple[Path, Path]:
    """A share of ``n`` photographs p0.bmp ... and a list file naming the first ``listed`` of them."""
    share = tmp_path / "share"
    share.mkdir()
    for k in range(n):
        _bmp(share / f"p{k}.bmp", k)
    listing = tmp_path / "week.txt"
    listing.write_text("".join(f"{share / f'p{k}.bmp'}\n" for k in range(listed)))
    return share, listing


def test_a_listed_photograph_that_is_away_keeps_its_finished_row(tmp_path, capsys):
    """36d F3: with a list file on shared storage that was briefly away (unmounted), every finished row became an
    error row (exit 3) and the remount redid everything. A finished row whose input cannot be found now is kept as it
    was, and the resume says so; a key never done still fails as an item."""
    from fundus_pipeline.cli import main

    share, listing = _share(tmp_path, 3, listed=2)
    out = tmp_path / "out"
    assert main(["degrade", str(listing), str(out), "--types", "111", "--quiet"]) == 0
    before = (out / "results.csv").read_bytes(), _rows(out)
    share.rename(tmp_path / "away")  # the share unmounted
    capsys.readouterr()
    assert main(["degrade", str(listing), str(out), "--types", "111", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "2 photograph(s) done before are listed but cannot be found now (e.g. 'p0')" in err, err
    assert ((out / "results.csv").read_bytes(), _rows(out)) == before
    (tmp_path / "away").rename(share)
    listing.write_text(listing.read_text() + f"{share / 'p2.bmp'}\n")
    (share / "p2.bmp").rename(tmp_path / "p2.bmp")  # a new key that is away: an item error, as before
    assert main(["degrade", str(listing), str(out), "--types", "111", "--resume", "--quiet"]) == 3
    rows = _rows(out)
    assert rows["p0"]["status"] == rows["p1"]["status"] == "ok" and rows["p2"]["status"] == "error"
    (tmp_path / "p2.bmp").rename(share / "p2.bmp")
    capsys.readouterr()
    assert main(["degrade", str(listing), str(out), "--types", "111", "--resume", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["skipped"] == 2  # the two done before are not done again


def test_fundus_run_names_every_changed_input_and_a_new_folder_as_a_way_out(tmp_path, tiny, capsys):  # noqa: F811
    """36d F2: a resume refused over one changed photograph named the first only ('changed since the run started', of a
    run finished weeks ago), so a site learnt them one per try, and offered --overwrite (every photograph again) alone."""
    from fundus_pipeline.cli import main
    from tests.test_run import tiny_args

    src = tmp_path / "in"
    src.mkdir()
    for k in range(3):
        _bmp(src / f"p{k}.bmp", k)
    out = tmp_path / "out"
    args = [str(a) for a in tiny_args(tiny, "--steps", "grade")]
    assert main(["run", str(src), str(out), *args, "--quiet"]) == 0
    for k, seed in ((0, 7), (2, 8)):
        _bmp(src / f"p{k}.bmp", seed)
    capsys.readouterr()
    assert main(["run", str(src), str(out), *args, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == ("Error: --resume: 2 input(s) changed since the run computed them ('p0', 'p2'); their results would mix two "
                      "versions: run into a new folder, or use --overwrite (every photograph again)"), err


def test_fundus_run_says_which_photographs_done_before_are_away(tmp_path, tiny):  # noqa: F811
    """Review 37 M-1: in fundus run a finished row whose listed input was away was kept by its first stage without a
    word (--steps grade: exit 0, silent); the first stage now says it, as a stage alone does."""
    from fundus_pipeline.cli import main
    from tests.test_run import tiny_args

    share, listing = _share(tmp_path, 2, listed=2)
    out = tmp_path / "out"
    args = [str(a) for a in tiny_args(tiny, "--steps", "grade")]
    assert main(["run", str(listing), str(out), *args, "--quiet"]) == 0
    before = (out / "results.csv").read_bytes()
    (share / "p1.bmp").rename(tmp_path / "p1.bmp")
    assert main(["run", str(listing), str(out), *args, "--resume"]) == 0  # (--quiet: the notes are in the manifest)
    notes = json.loads((out / "manifest.json").read_text())["stages"]["grade"].get("resume_notes", [])
    assert any(n.startswith("1 photograph(s) done before are listed but cannot be found now (e.g. 'p1')") for n in notes), notes
    assert (out / "results.csv").read_bytes() == before
