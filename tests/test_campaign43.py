"""Session of 2026-12-05 (night): known-left items of campaign 39b, and campaign 43's findings."""

from __future__ import annotations

from tests.test_run import photos, tiny  # noqa: F401  (fixtures)


def test_report_of_an_older_run_finds_its_inputs_recorded_relative_to_its_working_folder(tmp_path, photos, tiny, monkeypatch, capsys):  # noqa: F811
    """39b F4: a version before 2026-12-02 recorded a run's inputs as given (``in/p0.png``, relative to the folder it
    was run in); `fundus report` looked for them in OUT only and called intact inputs "missing or changed". They are
    now found in the working folder, shown when their bytes are the recorded ones, and where they are not found the
    warning says why and where to run the command."""
    from tests.test_run import run, tiny_args

    monkeypatch.chdir(tmp_path)
    assert run("run", "in", "out", *tiny_args(tiny, "--steps", "grade")) == 0
    for f in (tmp_path / "out").rglob("*"):  # as the older version wrote them
        if f.is_file() and f.suffix in (".json", ".csv", ".jsonl"):
            f.write_text(f.read_text().replace(f"{photos}/", "in/"))
    capsys.readouterr()
    assert run("report", "out") == 0
    assert "missing" not in capsys.readouterr().err
    assert (tmp_path / "out" / "report.html").read_text().count("data:image") >= 3

    monkeypatch.chdir(tmp_path / "out")  # another working folder: not found, and said why
    assert run("report", tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "3 image(s)" in err and "relative path" in err and "run `fundus report` there" in err, err

    monkeypatch.chdir(tmp_path)  # found there but with other bytes: not shown
    (photos / "p0.png").write_bytes((photos / "p1.png").read_bytes())
    assert run("report", "out") == 0
    err = capsys.readouterr().err
    assert "1 image(s)" in err and "in/p0.png (changed since the run)" in err, err


def test_a_replay_compares_every_page_of_the_report(tmp_path, photos, tiny, monkeypatch, capsys):  # noqa: F811
    """Known left of 39b: a replay compared report.html and not report-2.html, ... (a run past 1,000 photographs):
    a later page that differed was "identical to the recorded run". Every page is compared now; pages alone
    differing are said (exit 0), as report.html alone was."""
    from fundus_pipeline import report
    from tests.test_run import run, tiny_args

    monkeypatch.setattr(report, "PAGE_ROWS", 2)  # 3 photographs: two pages
    x = tmp_path / "x"
    assert run("run", photos, x, *tiny_args(tiny, "--steps", "grade")) == 0
    assert (x / "report-2.html").is_file()
    capsys.readouterr()
    assert run("run", "--replay", x, tmp_path / "r0") == 0
    assert "--replay: identical to the recorded run (3 rows and" in capsys.readouterr().err
    page = x / "report-2.html"
    page.write_text(page.read_text().replace("<title>", "<title>old page code: "))  # as an earlier version drew it
    assert run("run", "--replay", x, tmp_path / "r1") == 0
    err = capsys.readouterr().err
    assert "--replay: identical results (3 rows and" in err and "but report-2.html differs" in err, err
    for name in ("report.html", "report-2.html"):
        (x / name).write_text((x / name).read_text().replace("<title>", "<title>old: "))
    assert run("run", "--replay", x, tmp_path / "r2", "--format", "json") == 0
    assert "but 2 report pages differ (first: report.html)" in capsys.readouterr().err  # in page order (review 43 L6)


def test_the_enhancer_default_validation_intervals_come_back_from_the_committed_rows(tmp_path):
    """Campaign 43b F1/F4: the README gives the validation comparison behind the default enhancer with paired
    intervals; they are recomputed from the committed per-photograph rows by the documented command, and the
    script fails as the others do (one line, exit 2) on a file that is not such a record."""
    import json

    from tests.test_scripts_errors import ROOT, _one_error, _script

    docs = ROOT / "docs"
    r = _script("compare_choices.py", str(docs / "correction_cofe.json") + ":0", str(docs / "correction_cofe_add_seg.json") + ":32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got == json.loads((docs / "validation_cofe_vs_cofe_add_seg.json").read_text())
    assert got["photographs"] == 7 and got["f1"]["ci"][0] > 0 > got["psnr"]["ci"][0]  # what the README says of them
    (tmp_path / "x.json").write_text("[1]")
    _one_error(_script("compare_choices.py", str(tmp_path / "x.json"), str(docs / "correction_cofe.json"), cwd=tmp_path), 2, "is not a record")
    _one_error(_script("compare_choices.py", str(tmp_path / "none.json"), str(docs / "correction_cofe.json"), cwd=tmp_path), 2, "cannot read")


def _export_4x3(a, corners: int, size: float = 0.025):
    """``a`` (square uint8 RGB) as a camera exports it: padded to 4:3 with black bands, and the same with a date in
    ``corners`` (2: the bottom ones; 4) of the frame, white text ``size`` of the height tall, clear of the field."""
    import cv2

    h, w = a.shape[:2]
    full = h * 4 // 3
    left = (full - w) // 2
    plain = cv2.copyMakeBorder(a, 0, 0, left, full - w - left, cv2.BORDER_CONSTANT, value=0)
    stamped = plain.copy()
    scale, text = size * h / 22, "2024-03-12 OD"
    thick = max(1, int(scale * 1.5))
    (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    for x, y in [(3, th + 3), (full - tw - 3, th + 3), (3, h - 5), (full - tw - 3, h - 5)][4 - corners:]:
        cv2.putText(stamped, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return plain, stamped


def _iou(a, b) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_a_date_stamped_in_the_corners_leaves_the_field_of_view_as_it_is():
    """Campaign 43a F1 (HIGH): text burned into two or four corners of the frame (a date, a name), clear of the field,
    raised the surround level (the median of the corners): the field's dim rim was cut off in silence (IoU 0.88
    here) or no field was found; and the text outside counted as a bright surround, "not a fundus photograph".
    A corner with text is read by its darkest tenth, the surround by its 75th percentile."""
    import numpy as np

    from degradation.fov import estimate_fov_geometry
    from fundus_pipeline.stages.base import Fov
    from tests.conftest import synthetic_fundus

    h = 480
    yy, xx = np.mgrid[:h, :h]
    falloff = np.clip(1.15 - 0.9 * (np.hypot(yy - h / 2, xx - h / 2) / (0.46 * h)) ** 3, 0.12, 1)  # a dim, vignetted rim
    for seed in range(2):
        photo = np.clip(synthetic_fundus(h, h, seed) * falloff[..., None], 0, 255).astype(np.uint8)
        for corners in (2, 4):
            plain, stamped = _export_4x3(photo, corners)
            m0, _ = estimate_fov_geometry(plain.astype(np.float32) / 255)
            m1, g1 = estimate_fov_geometry(stamped.astype(np.float32) / 255)
            assert not m1.all() and _iou(m0, m1) >= 0.99, (seed, corners, _iou(m0, m1))
            assert Fov(m1, g1, True).surround_level(stamped) < 0.05


def test_a_stamped_export_of_a_real_photograph_keeps_its_field_of_view(data_root):
    """Campaign 43a F1 on a real photograph (its repro: HEI-MED 00000003 exported 4:3 with a date in the four
    corners): no field of view was found, and segment, enhance and run failed it blaming the circle."""
    from degradation.fov import estimate_fov_geometry
    from fundus_pipeline.io import read_image

    photo, _ = read_image(data_root / "HEI-MED" / "images" / "00000003.jpg")
    side = min(photo.shape[:2])
    plain, stamped = _export_4x3(photo[:side, :side], 4)
    m0, _ = estimate_fov_geometry(plain.astype("float32") / 255)
    m1, _ = estimate_fov_geometry(stamped.astype("float32") / 255)
    assert not m0.all() and not m1.all() and _iou(m0, m1) >= 0.99, _iou(m0, m1)


def test_a_ctrl_c_while_a_stage_writes_its_tables_stops_the_chain_there(tmp_path, photos, tiny, monkeypatch, capsys):  # noqa: F811
    """Campaign 43c F2: a Ctrl-C that came while the grade stage wrote its tables was held until they were complete
    ("finishing results.csv and manifest.json first") and then forgotten: the chain ran every later stage and
    exited 0. The tables are still completed; the chain stops there, as interrupted (exit 130), and a resume
    finishes it."""
    import json
    import os
    import signal

    from fundus_pipeline import runner
    from tests.test_run import run, tiny_args

    real, calls = runner.write_reports, []

    def write_reports(*a, **kw):
        calls.append(kw.get("running"))
        if len(calls) == 1 and not kw.get("running"):
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered while the grade stage finishes its tables
        return real(*a, **kw)

    monkeypatch.setattr(runner, "write_reports", write_reports)
    out = tmp_path / "out"
    args = tiny_args(tiny, "--enhance-if", "good,usable,reject")
    assert run("run", photos, out, *args) == 130
    assert "finishing results.csv and manifest.json first" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["interrupted"] is True and sorted(m["stages"]) == ["grade"], (m["interrupted"], m["stages"])
    assert json.loads((out / "grade" / "manifest.json").read_text())["status"] == "finished"  # its tables completed first
    assert not (out / "enhance").exists()
    monkeypatch.setattr(runner, "write_reports", real)
    assert run("run", photos, out, *args, "--resume") == 0
    assert sorted(json.loads((out / "manifest.json").read_text())["stages"]) == ["enhance", "grade", "score", "segment"]


def test_the_python_api_under_a_stderr_without_isatty_or_none(tmp_path, photos, tiny, monkeypatch, capsys):  # noqa: F811
    """Campaign 43c F9: a host whose sys.stderr is a stream without ``isatty`` (a logging proxy) got an AttributeError
    from run_chain, not a FundusError, and the run's manifest stayed "running"; with ``sys.stderr = None`` (pythonw,
    some daemons) the notes went to stdout. Both run now; the progress and notes go nowhere when there is no stderr."""
    import json
    import sys

    from fundus_pipeline.chain import run_chain
    from fundus_pipeline.config import RunConfig

    class Proxy:  # write and flush only, as a stream-to-logger adapter
        def __init__(self):
            self.text = []

        def write(self, s):
            self.text.append(s)

        def flush(self):
            pass

    cfg = RunConfig(steps=["grade", "segment"], grade_weights=str(tiny["hemf_tiny"]), grade_arch="hemf_tiny",
                    segment_weights=str(tiny["imff_tiny"]), segment_arch="imff_tiny", device="cpu", thumbnail=64)
    proxy = Proxy()
    monkeypatch.setattr(sys, "stderr", proxy)
    res = run_chain(cfg, photos, tmp_path / "a")
    assert not res.interrupted and json.loads((tmp_path / "a" / "manifest.json").read_text())["status"] == "finished"
    assert any("grade: 3/3" in t for t in proxy.text)  # the progress lines went to the caller's stream
    monkeypatch.setattr(sys, "stderr", None)
    capsys.readouterr()
    (photos / "p0.png").write_bytes(b"not an image")  # an error row: said nowhere, but in the tables
    res = run_chain(cfg, photos, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["status"] == "finished"
    assert "error" not in capsys.readouterr().out  # nothing meant for stderr went to stdout


def test_threads_sharing_a_model_in_train_mode_get_the_eval_maps_and_leave_it_as_it_was():
    """Campaign 43c F1: threads calling predict_native on one model that the caller keeps in train mode (a training
    loop validating from another thread) got maps up to 0.84 off, and BatchNorm's running statistics were changed for
    good: each call restored the modes it had found, putting the model back in train mode under another thread's
    forward pass. The model now stays in eval mode until the last overlapping call leaves."""
    import threading

    import numpy as np
    import torch

    from fundus_pipeline.models.inference import predict_native
    from fundus_pipeline.models.registry import build_model
    from tests.conftest import synthetic_fundus

    torch.manual_seed(0)
    model = build_model("imff_tiny")
    rgb = synthetic_fundus(160, 160, 1).astype(np.float32) / 255
    fov = rgb.max(axis=2) > 0.05
    model.eval()
    ref = predict_native(model, rgb, fov, 1.0)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    for trial in range(6):
        out, barrier = [None] * 3, threading.Barrier(3)

        def call(i):
            barrier.wait()
            for _ in range(4):
                out[i] = predict_native(model, rgb, fov, 1.0)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(np.abs(o - ref).max() < 1e-5 for o in out), (trial, [float(np.abs(o - ref).max()) for o in out])
        assert model.training and all(m.training for m in model.modules()), trial
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items()), trial


def test_the_model_cache_can_be_emptied(tmp_path):
    """Campaign 43c F6: the models a process keeps for the stages grew with every distinct weights file, with no
    public way to drop them."""
    import torch

    from fundus_pipeline.models import weights
    from fundus_pipeline.models.registry import build_model

    weights.clear_cache()
    for seed in range(2):
        torch.manual_seed(seed)
        torch.save(build_model("imff_tiny").state_dict(), tmp_path / f"w{seed}.pt")
        weights.load_model(str(tmp_path / f"w{seed}.pt"), arch="imff_tiny", shared=True)
    assert weights.clear_cache() == 2 and weights.clear_cache() == 0


def test_a_ctrl_c_held_while_a_stage_command_writes_its_tables_ends_it_as_interrupted(tmp_path, photos, tiny, monkeypatch):  # noqa: F811
    """Review 43 M3: outside `fundus run` the held Ctrl-C was still forgotten: `fundus grade --sort-into` made every copy
    and exited 0, and the Python API returned interrupted=False to a caller's loop. The tables are completed, then the
    command ends as interrupted (exit 130) without the copies, which a resume makes."""
    import os
    import signal

    from fundus_pipeline import runner
    from tests.test_run import run

    real, calls = runner.write_reports, []

    def write_reports(*a, **kw):
        calls.append(kw.get("running"))
        if len(calls) == 1 and not kw.get("running"):
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **kw)

    monkeypatch.setattr(runner, "write_reports", write_reports)
    out = tmp_path / "g"
    args = ("grade", photos, out, "--weights", tiny["hemf_tiny"], "--arch", "hemf_tiny", "--device", "cpu", "--sort-into", "--quiet")
    assert run(*args) == 130
    assert (out / "results.csv").is_file() and not any((out / c).exists() for c in ("good", "usable", "reject"))
    monkeypatch.setattr(runner, "write_reports", real)
    assert run(*args, "--resume") == 0
    assert sum(len(list((out / c).glob("*"))) for c in ("good", "usable", "reject") if (out / c).is_dir()) == 3


def test_a_thin_black_line_along_a_grey_surround_is_not_taken_for_text():
    """Review 43 M2: the first rule for text in the corners (a dark tenth under a brighter median) also took a thin
    black line along the frame of a grey surround for text, and no FOV was found where one had been."""
    import numpy as np

    from degradation.fov import estimate_fov_geometry
    from tests.conftest import synthetic_fundus

    h = 600
    yy, xx = np.mgrid[:h, :h]
    disc = np.hypot(yy - h / 2, xx - h / 2) < 0.46 * h
    for grey in (0.12, 0.2, 0.3):
        img = np.where(disc[..., None], synthetic_fundus(h, h, 3).astype(np.float32) / 255, grey).astype(np.float32)
        img[:4], img[-4:], img[:, :4], img[:, -4:] = 0, 0, 0, 0
        mask, _ = estimate_fov_geometry(img)
        assert _iou(mask, disc) >= 0.99, (grey, _iou(mask, disc))


def test_the_surround_warning_reads_fundus_photographs_as_dark_and_a_picture_as_not(data_root):
    """Review 43 M1 and review 44 H1: the 75th percentile (so that a date burned into the surround no longer counts)
    had lost the warning on scikit-image's phantom; a grey opening before the 95th, tried instead, flagged CofeNet
    and EyePACS-256 photographs whose cut field leaves bright strips outside the fitted circle (9 of 100 CofeNet).
    The 75th it is: those read dark, and a picture (scikit-image's rocket as a JPEG) still reads bright."""
    import io

    import numpy as np
    import skimage.data
    from PIL import Image

    from degradation.fov import estimate_fov_geometry
    from fundus_pipeline.io import read_image, to_float_rgb
    from fundus_pipeline.stages.base import Fov
    from fundus_pipeline.stages.segment import MAX_SURROUND_LEVEL

    def level(rgb, image):
        mask, geometry = estimate_fov_geometry(rgb)
        assert not mask.all()  # a "field" is found
        return Fov(mask, geometry, True).surround_level(image)

    for path in (data_root / "CofeNet" / "img" / "image" / "28709_right.png", data_root / "EyePACS-256" / "images" / "14992_right.jpeg"):
        arr, meta = read_image(path)
        assert level(to_float_rgb(arr, meta)[0], arr) < MAX_SURROUND_LEVEL, path.name
    data = io.BytesIO()
    Image.fromarray(skimage.data.rocket()).save(data, "JPEG", quality=90)
    rgb = np.asarray(Image.open(data).convert("RGB")).astype(np.float32) / 255
    assert level(rgb, rgb) > MAX_SURROUND_LEVEL


def test_review43_lows(tmp_path):
    """Review 43: a TorchScript file given as weights printed torch's two-line warning before the refusal (the blanket
    warnings filter around torch.load was gone), and the new scripts ended bad arguments in tracebacks."""
    import subprocess
    import sys

    import torch

    from tests.test_scripts_errors import ROOT, _one_error, _script

    from PIL import Image

    from tests.conftest import synthetic_fundus

    (tmp_path / "in").mkdir()
    Image.fromarray(synthetic_fundus(96, 96, 0)).save(tmp_path / "in" / "p.png")
    import warnings

    with warnings.catch_warnings():  # (torch.jit is deprecated: users still have such files)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "ts.pt")
    r = subprocess.run([sys.executable, "-m", "fundus_pipeline", "segment", str(tmp_path / "in"), str(tmp_path / "o"), "--weights", str(tmp_path / "ts.pt"),
                        "--arch", "imff_tiny"], capture_output=True, text=True, cwd=tmp_path, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.stderr.startswith("Error: ") and "TorchScript archive" in r.stderr and "Warning" not in r.stderr, r.stderr
    docs = ROOT / "docs"
    _one_error(_script("compare_choices.py", str(docs / "correction_cofe.json"), str(docs / "correction_cofe.json"), "--resamples", "0", cwd=tmp_path), 2, "--resamples")
    _one_error(_script("segment_scale_sweep.py", "--diameters", "abc", cwd=tmp_path), 2, "--diameters")
