"""Campaign 21a (the HTML report as its reader sees it) and 21b (the training commands), and their reviews."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from fundus_pipeline.config import RunConfig
from tests.conftest import synthetic_fundus
from tests.test_run import photos, run, tiny, tiny_args  # noqa: F401  (fixtures)

TEMPLATE = Path(__file__).resolve().parents[1] / "fundus_pipeline" / "report" / "report.html.j2"


def _row(key: str, **extra) -> dict:
    row = {"key": key, "input": f"in/{key}.png", "status": "ok", "error": "", "grade": "usable", "p_good": 0.2, "p_usable": 0.7,
           "p_reject": 0.1, "flags": "blur", "enhanced": "no", "enhance_reason": "graded usable", "score": "", "score_input": "",
           "score_gain": "", "segmented": "input", "segment_reason": "not enhanced: the input is segmented", "vessel_fraction": 0.1,
           "fov_fraction": 0.7, "warning": "", "enhanced_image": "", "vessels_image": f"segment/{key}_vessels.png"}
    row.update(extra)
    return row


def _run_folder(out: Path, keys=("a", "b")) -> list[dict]:
    (out / "in").mkdir(parents=True)
    (out / "segment").mkdir()
    rows = []
    for i, key in enumerate(keys):
        img = synthetic_fundus(64, 72, i)
        Image.fromarray(img).save(out / "in" / f"{key}.png")
        Image.fromarray(((img[..., 1] < 60) & (img.max(2) > 20)).astype(np.uint8) * 255).save(out / "segment" / f"{key}_vessels.png")
        rows.append(_row(key))
    return rows


# ------------------------------------------------------------------------------------------------ 21a F2
def test_a_gain_is_shown_with_the_digits_that_decide_and_never_as_minus_zero():
    """F2: at 3 decimals a trusted gain of +0.000432 and a refused one of -0.00032 both read 0.000, and a gain in
    (-5e-7, 0) rounded to -0.0 was trusted but shown "-0.000"."""
    from fundus_pipeline.chain import format_gain, score_gain, segment_decision

    assert score_gain(0.5, 0.5000004) == 0.0 and str(score_gain(0.5, 0.5000004)) == "0.0"
    assert format_gain(score_gain(0.5, 0.5000004)) == "+0.000"
    assert format_gain(0.000432) == "+0.000432" and format_gain(-0.00032) == "-0.00032" and format_gain(0.0123) == "+0.012"
    cfg = RunConfig()
    ok = {"status": "ok"}
    used, why = segment_decision(cfg, True, ok, {"status": "ok", "score": 0.752432, "score_input": 0.752})
    assert used == "enhanced" and "(gain +0.000432) >= min-gain 0" in why
    used, why = segment_decision(cfg, True, ok, {"status": "ok", "score": 0.75168, "score_input": 0.752})
    assert used == "input" and "(gain -0.00032) < min-gain 0" in why
    used, why = segment_decision(cfg, True, ok, {"status": "ok", "score": 0.7519996, "score_input": 0.752})
    assert used == "enhanced" and "(gain +0.000)" in why and "-0.000" not in why

    # review 21 M2: against a min-gain or min-score other than 0 the figures read the same at 3 decimals
    for min_gain, score, word in ((0.01, 0.7596, "+0.0096) < min-gain 0.01"), (0.01, 0.7604, "+0.0104) >= min-gain 0.01"),
                                  (0.0012, 0.7514, "+0.0014) >= min-gain 0.0012"), (-0.001, 0.7486, "-0.0014) < min-gain -0.001")):
        assert word in segment_decision(RunConfig(min_gain=min_gain), True, ok, {"status": "ok", "score": score, "score_input": 0.75})[1]
    why = segment_decision(RunConfig(min_score=0.76), True, ok, {"status": "ok", "score": 0.7598, "score_input": 0.75})[1]
    assert why.startswith("score 0.7598, input's own 0.750") and "score < min-score 0.76" in why

    from fundus_pipeline.report import _environment

    g = _environment().from_string("{{ v|gain }}|{{ w|gain }}|{{ n|gain }}|{{ v2|gain(0.01) }}")
    assert g.render(v="0.000432", w="-0.0", n="", v2="0.0096") == "+0.000432|+0.000||+0.0096"


# ------------------------------------------------------------------------------------------------ 21a F3, F10, F11
def test_the_header_states_the_settings_and_weights_of_the_steps_that_ran(photos, tmp_path, tiny, capsys):  # noqa: F811
    """F3: the header named the grader, the scorer, enhance-if and min-gain of a run without those steps, and did
    not state min-score, flag-threshold, the vessel threshold or the weights' sha256."""
    out = tmp_path / "r"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "enhance,segment", "--threshold", "0.3")) == 0
    page = (out / "report.html").read_text()
    head = re.search(r"<header>(.*?)</header>", page, re.S).group(1)
    m = json.loads((out / "manifest.json").read_text())
    assert "grade " not in head and "score " not in head and "min-gain" not in head and "enhance-if" not in head
    assert "vessel threshold 0.3" in head and "transfer auto" in head
    for step in ("enhance", "segment"):
        assert f"(sha256 {m['weights'][step]['sha256'][:12]})" in head
    assert f"run_sha256 {m['run_sha256'][:16]}" in head and "are in manifest.json" in head
    assert f"<title>fundus run report {m['run_sha256'][:8]} (3 photographs)</title>" in page

    out2 = tmp_path / "r2"
    assert run("run", photos, out2, *tiny_args(tiny, "--min-score", "0.9", "--flag-threshold", "0.7")) == 0
    head = re.search(r"<header>(.*?)</header>", (out2 / "report.html").read_text(), re.S).group(1)
    assert "min-score 0.9" in head and "flag-threshold 0.7" in head and "min-gain 0" in head and "grade hemf_tiny (sha256 " in head
    # fundus report writes the same page from the folders
    before = (out2 / "report.html").read_bytes()
    assert run("report", out2) == 0
    assert (out2 / "report.html").read_bytes() == before


def test_the_page_shows_the_input_folders_notes_and_an_unfinished_run(tmp_path):
    """F10, F11: what the run passed over in the input folder (manifest input.notes) was not on the page, nor that
    the run was interrupted."""
    from fundus_pipeline.report import write_report

    out = tmp_path / "run"
    rows = _run_folder(out)
    rows[1].update(status="pending", vessels_image="", segment_reason="")
    note = "2 file(s) with other extensions not read: x.webp, y.dcm"
    page = write_report(out, RunConfig(steps=["grade", "segment"]), rows, run={"notes": [note], "status": "interrupted"}).read_text()
    assert note in page and 'id="interrupted"' in page and "1 photograph(s) not processed (the run was interrupted)" in page
    page = write_report(out, RunConfig(steps=["grade", "segment"]), rows[:1]).read_text()
    assert 'id="interrupted"' not in page and 'id="notes"' not in page


# ------------------------------------------------------------------------------------------------ 21a F4
def test_an_image_missing_since_the_run_is_marked_in_its_cell_and_its_mask_still_shown(tmp_path):
    """F4: a deleted or changed image left an empty cell that read as "not made", and a vessel mask whose
    photograph was gone was left out though intact."""
    from fundus_pipeline.report import thumbnails, write_report

    out = tmp_path / "run"
    rows = _run_folder(out)
    (out / "in" / "a.png").unlink()
    missing: list = []
    t = thumbnails(out, rows[0], 48, missing)
    assert t["input"] == "" and t["lost"] == ["input"] and t["vessels"].startswith("data:image/jpeg;base64,")
    assert [k for k, _ in missing] == ["a"]
    (out / "segment" / "b_vessels.png").unlink()
    page = write_report(out, RunConfig(steps=["grade", "segment"]), rows).read_text()
    assert page.count('<span class="lost">image missing or changed since the run</span>') == 2
    assert "2 image(s) on this page that the run wrote or read are missing or changed since the run" in page
    assert 'alt="vessels of a (its photograph is missing or changed since the run)"' in page  # review 21 L4
    # a failed row's unreadable input is in its error, not marked twice
    failed = {**rows[0], "status": "error", "error": "grade: cannot read"}
    assert thumbnails(out, failed, 48, [])["lost"] == []


# ------------------------------------------------------------------------------------------------ 21a F5
def test_a_bidirectional_override_in_a_name_is_shown_as_its_escape(tmp_path):
    """F5: "safe\\u202egnp.exe" was rendered live and read "safeexe.png"."""
    from fundus_pipeline.report import _environment, write_report

    out = tmp_path / "run"
    rows = _run_folder(out, keys=("a",))
    rows[0]["key"] = "safe\u202egnp.exe"
    page = write_report(out, RunConfig(steps=["grade", "segment"]), rows).read_text()
    assert "\u202e" not in page and page.count("safe\\u202egnp.exe") >= 3  # the cell, data-key and the alt texts
    assert _environment().from_string("{{ v }}").render(v="a\u2066b\u200fc") == "a\\u2066b\\u200fc"
    # review 21 M3: invisible characters too (a zero-width space, U+FEFF, a soft hyphen, a line separator)
    assert _environment().from_string("{{ v }}").render(v="a\u200bb\ufeff\xad\u2028\t\né") == "a\\u200bb\\ufeff\\xad\\u2028\t\né"


# ------------------------------------------------------------------------------------------------ 21a F7, F14, F15
def test_the_charts_say_their_figures_in_words_and_name_what_falls_outside():
    """F7: role="img" charts without a label hid the grade and flag counts from a screen reader. F14: values
    outside a histogram's range were counted in its end bins without a word. F15: reject's bar was green."""
    from fundus_pipeline.report import GRADE_COLOURS, summary

    rows = [_row("a", grade="good", vessel_fraction=0.31), _row("b", grade="reject", vessel_fraction=0.1),
            _row("c", grade="reject", vessel_fraction=0.12, flags="")]
    plots = summary(rows, False, False)["plots"]
    assert 'aria-label="photographs per grade: good 1, usable 0, reject 2"' in plots["grades"]
    assert 'aria-label="photographs per flag: blur 2"' in plots["flags"]
    assert f'fill="{GRADE_COLOURS["reject"]}"' in plots["grades"] and f'fill="{GRADE_COLOURS["good"]}"' in plots["grades"]
    assert "1 above 0.25 (in the end bins)" in plots["vessels"]
    assert 'aria-label="vessel fraction in the FOV: 3 values from 0 to 0.25, median 0.120 (1 above 0.25, counted in the end bins)"' in plots["vessels"]
    assert "above" not in summary(rows[1:], False, False)["plots"]["vessels"]


# ------------------------------------------------------------------------------------------------ 21a F8
def _luminance(hex_colour: str) -> float:
    c = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    c = [v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4 for v in c]
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]


def _contrast(a: str, b: str) -> float:
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def test_every_text_colour_of_the_page_meets_wcag_aa_on_its_backgrounds():
    """F8: usable's text (#b26a00, 4.24:1) and the muted text (#7a8592, 3.75:1 and 3.50:1) were below 4.5:1."""
    css = re.search(r"<style>(.*?)</style>", TEMPLATE.read_text(), re.S).group(1)
    screen = css.split("@media print")[0]
    colours = {sel.strip(): col for sel, col in re.findall(r"([.#\w\- ,]+)\{[^}]*?(?<![-\w])color:(#[0-9a-fA-F]{6})", screen)}
    for sel in (".muted", ".why", ".probs", ".err", ".card h2"):
        assert sel in colours, sel
    for sel in ("g-good", "g-usable", "g-reject"):
        colour = re.search(rf"\.{sel}\{{color:(#[0-9a-fA-F]{{6}})", screen).group(1)
        assert _contrast(colour, "#ffffff") >= 4.5, (sel, colour)
    for sel, colour in colours.items():
        if sel.startswith(("header", ".flag")):
            continue  # on the dark header; the flag on its own pale red (below)
        for background in ("#ffffff", "#f6f7f9", "#eef1f5"):
            assert _contrast(colour, background) >= 4.5, (sel, colour, background)
    assert _contrast("#a12a1f", "#fdecea") >= 4.5 and _contrast("#c9d1dc", "#1d2430") >= 4.5


# ------------------------------------------------------------------------------------------------ 21a F6, F13, F16
def test_the_rows_table_has_a_caption_column_scopes_and_row_headers(tmp_path):
    """F16: no caption, no scope, the key a plain cell; F6/F13: a long key widened its column off the screen
    and runs of spaces collapsed (the key's cell now wraps anywhere and keeps its spaces)."""
    from fundus_pipeline.report import write_report

    out = tmp_path / "run"
    rows = _run_folder(out, keys=("a",))
    page = write_report(out, RunConfig(steps=["grade", "segment"]), rows).read_text()
    table = page[page.index('<table id="rows">') :]
    assert "<caption>One row per photograph</caption>" in table
    heads = re.findall(r"<th ([^>]*)>", table[: table.index("</thead>")])
    assert heads and all('scope="col"' in h for h in heads)
    assert all("tabindex" in h and 'aria-sort="none"' in h for h in heads if 'data-type="none"' not in h)
    assert '<th scope="row" class="key">a</th>' in table
    assert re.search(r"#rows th\.key\{[^}]*max-width[^}]*overflow-wrap:anywhere[^}]*white-space:pre-wrap", page)
    assert 'alt="vessels of a over its input"' in table and "<noscript>" in page


# ------------------------------------------------------------------------------------------------ 21a F9
def test_the_page_says_what_its_figures_mean(tmp_path):
    from fundus_pipeline.report import write_report

    out = tmp_path / "run"
    rows = _run_folder(out, keys=("a",))
    page = write_report(out, RunConfig(), rows).read_text()
    legend = page[page.index('<details id="legend" open>') : page.index("</details>")]  # open: printed too (review 21 L2)
    for term in ("<dt>score</dt>", "<dt>gain</dt>", "<dt>vessel fraction</dt>", "field of view (FOV", "calibrated probabilities"):
        assert term in legend


def test_fundus_report_says_when_results_csv_is_missing(photos, tmp_path, tiny, capsys):  # noqa: F811
    """F12: with results.csv deleted `fundus report` said nothing (exit 0), and the page says it holds every column."""
    out = tmp_path / "r"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade")) == 0
    capsys.readouterr()
    assert run("report", out) == 0
    assert "results.csv" not in capsys.readouterr().err
    (out / "results.csv").unlink()
    assert run("report", out) == 0
    err = capsys.readouterr().err
    assert "results.csv is missing" in err and "--resume` writes it again" in err


# ------------------------------------------------------------------------------------------------ 21b H1
def test_a_cache_path_that_holds_another_file_is_refused_not_replaced(fake_data, tmp_path, capsys):
    """H1: `--cache weights/imff.pt` (any file that is not a source cache) was replaced by 169 MB of prepared
    sources, with a log line; an empty file, or a cache of other data, is still prepared again."""
    import torch

    from fundus_pipeline.cli import main as cli_main
    from fundus_pipeline.errors import UsageError
    from fundus_pipeline.train.enhance import prepare_sources

    victim = tmp_path / "victim.pt"
    torch.save({"w": torch.zeros(3)}, victim)  # a zip archive, as every torch checkpoint is
    before = victim.read_bytes()
    for cmd in ("enhance", "pretext"):
        out = tmp_path / f"o_{cmd}"
        assert cli_main(["train", cmd, "--data", str(fake_data), "--out", str(out), "--steps", "1", "--cache", str(victim)]) == 2
        err = capsys.readouterr().err
        assert "exists and is not a source cache of fundus (no digest and meta in it)" in err and len(err.splitlines()) == 1
        assert victim.read_bytes() == before and not out.exists()
    # review 21 L5: a cache of ours cut short (its zip directory gone) is prepared again, not refused
    import zipfile

    import numpy as np

    from fundus_pipeline.train.config import check_cache_path

    ours = tmp_path / "cut.npz"
    np.savez(ours, digest=np.array("x"), meta=np.array("[]"), rgb=np.zeros((2, 8, 8, 3), np.float32))
    ours.write_bytes(ours.read_bytes()[:300])
    try:
        zipfile.ZipFile(ours)
    except zipfile.BadZipFile:
        pass
    else:
        raise AssertionError("the cut cache still reads")
    check_cache_path(ours)  # accepted
    text = tmp_path / "notes.txt"
    text.write_text("my notes")
    seg = Path(__file__).resolve().parents[1] / "weights" / "imff.pt"
    try:
        prepare_sources(fake_data, 64, seg, text, log=lambda m: None)  # a file that came after the options were checked
    except UsageError as e:
        assert "(BadZipFile)" in e.message
    else:
        raise AssertionError("a file that is not a cache was replaced")
    assert text.read_text() == "my notes"


# ------------------------------------------------------------------------------------------------ 21b H2
def test_a_finished_run_whose_last_checkpoint_was_deleted_is_not_overwritten(fake_data, tmp_path, capsys):
    """H2: with last.pt deleted (to save space) a finished run's folder was accepted, and a new run replaced its
    best.pt and summary.json and appended to its train.log."""
    from tests.test_train_segment import _args, _train

    out = tmp_path / "run"
    assert _train(*_args(fake_data, out)) == 0
    (out / "last.pt").unlink()
    kept = {f: (out / f).read_bytes() for f in ("best.pt", "summary.json", "train.log")}
    capsys.readouterr()
    assert _train(*_args(fake_data, out, "--seed", "7")) == 2
    assert "holds a finished training run (summary.json); choose a new --out" in capsys.readouterr().err
    assert {f: (out / f).read_bytes() for f in kept} == kept
    # review 21 L6: --resume says why it cannot continue (it had said "start without --resume", then refused)
    assert _train(*_args(fake_data, out, "--resume")) == 2
    assert "holds a finished run whose last.pt is gone; it cannot be continued" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 21b M1, L5
def test_a_summary_records_the_whole_command_the_code_and_the_data_and_its_command_reruns_the_weights(fake_data, tmp_path):
    """M1: the recorded command dropped every option at its default (--seed 0, --lr, --arch), so it depended on the
    defaults of the code that reran it; neither the commit nor the dataset root was recorded. L5: a resumed run's
    summary recorded resume: true."""
    import shlex
    import subprocess

    from fundus_pipeline.cli import main as cli_main
    from tests.test_train_segment import _args, _train

    out = tmp_path / "run"
    assert _train(*_args(fake_data, out, "--seed", "0")) == 0
    summary = json.loads((out / "summary.json").read_text())
    argv = summary["argv"]
    for opt in ("--seed", "--lr", "--arch", "--patch", "--degrade-p", "--val-every", "--steps"):
        assert opt in argv, opt
    for opt in ("--device", "--resume", "--init", "--cache"):  # where it runs and how it saves: only as given
        assert opt not in argv, opt
    assert summary["data"] == {"data": str(fake_data.resolve())}
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        assert summary["code"]["git_commit"] == head and isinstance(summary["code"]["dirty"], bool)
    assert summary["code"]["version"]
    # the recorded command, with another --out, trains the same weights byte for byte
    words = list(argv[3:])
    words[words.index("--out") + 1] = str(tmp_path / "again")
    assert cli_main(["train", "segment", *words]) == 0
    assert (tmp_path / "again" / "best.pt").read_bytes() == (out / "best.pt").read_bytes()
    assert shlex.split(shlex.join(argv)) == argv
    # the export carries them into the weights' manifest entry
    from fundus_pipeline.train.export import export_weights
    from tests.test_train_segment import _description

    spec = export_weights(out, name="tiny", model_name="imff_tiny", describe=lambda m: _description(m, 0.4), directory=tmp_path / "w")
    rec = spec.training.to_json_dict()
    assert rec["code"] == summary["code"] and rec["data_identity"] == summary["data"] and "--lr" in rec["command"]
    # a resume records the run's own options, not resume: true; and the code that started the run where it differs
    # from the code that resumed it (review 21 L7)
    import torch

    ck = torch.load(out / "last.pt", weights_only=True)
    ck["config"] = json.dumps({**json.loads(ck["config"]), "code": {"version": "0.0.9", "git_commit": "0" * 40, "dirty": False}})
    torch.save(ck, out / "last.pt")
    assert _train(*_args(fake_data, out, "--seed", "0", "--resume")) == 0
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["config"]["resume"] is False and resumed["code_started"]["version"] == "0.0.9" and resumed["code"] == summary["code"]


# ------------------------------------------------------------------------------------------------ 21b L1, L4
def test_an_undefined_validation_figure_is_never_the_best_and_summary_json_is_strict(tmp_path, monkeypatch):
    """L1: a first validation of NaN (too few pairs) stayed the best for good (NaN compares False) and summary.json
    held a bare NaN, which strict JSON readers refuse. L4: the loss lines gave no total and no time left."""
    from fundus_pipeline.train import loop
    from fundus_pipeline.train.config import TrainConfig
    from tests.test_train_segment import _ToyTask

    monkeypatch.setattr(loop, "LOG_EVERY", 2)
    figures = iter([float("nan"), -0.5, float("nan"), -0.7])

    class Undefined(_ToyTask):
        def validate(self, model, device):
            return {"neg_mse": next(figures), "other": float("inf")}

    cfg = TrainConfig(out=tmp_path / "a", steps=8, batch_size=4, lr=1e-2, seed=5, val_every=2, ckpt_every=2)
    summary = loop.fit(Undefined(cfg), cfg)
    lines = [ln.split(" ", 1)[1] for ln in (tmp_path / "a" / "train.log").read_text().splitlines()]  # without the time
    assert summary["best"]["step"] == 4 and summary["best"]["neg_mse"] == -0.5
    text = (tmp_path / "a" / "summary.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["best"] == {"step": 4, "neg_mse": -0.5, "other": None}
    steps = [ln for ln in lines if re.match(r"step \d+/8 loss ", ln)]
    assert len(steps) == 4 and all(re.search(r"s/step, about \d+ s of training left$", ln) for ln in steps), steps


# ------------------------------------------------------------------------------------------------ 21b L2, L3
def test_training_messages_name_the_option_and_say_what_is_wrong_in_a_line(fake_data, tmp_path, capsys):
    """L2: weights of another model given to --init did not name the option; a truncated last.pt gave 418
    characters of torch's "internal miniz error" text. L3: --threads above the cores was taken without a word."""
    import os

    import torch

    from fundus_pipeline.models.registry import build_model
    from tests.test_train_segment import _args, _train

    other = tmp_path / "hemf.pt"
    torch.save(build_model("hemf_tiny").state_dict(), other)
    assert _train(*_args(fake_data, tmp_path / "a", "--init", str(other))) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: --init: ") and "does not fit architecture 'imff_tiny'" in err

    out = tmp_path / "b"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # review 21 L10
    threads = str(cores + 1)
    assert _train(*_args(fake_data, out)[:-4], "--threads", threads, "--seed", "3") == 0
    assert f"note: --threads {threads} is more than the {cores} CPU cores here" in (out / "train.log").read_text()
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert _train(*_args(fake_data, out, "--resume")) == 1
    line = capsys.readouterr().err.splitlines()[0]
    assert "is not a readable checkpoint" in line and "miniz" not in line and len(line) < 250, line


# ------------------------------------------------------------------------------------------------ 21b L6
def test_segment_says_when_weights_without_an_entry_are_thresholded_at_the_default(photos, tmp_path, tiny, capsys):  # noqa: F811
    """L6: a run's own best.pt (no manifest entry) was thresholded at 0.5 without a word; review 21 L1: by
    `fundus run` too. Not with --threshold, nor with listed weights; --quiet keeps it quiet, as other notes."""
    args = ("--weights", tiny["imff_tiny"], "--arch", "imff_tiny", "--device", "cpu")
    note = "note: imff_tiny.pt has no entry in weights/manifest.json: its vessel masks are thresholded at 0.5"
    assert run("segment", photos, tmp_path / "s", *args) == 0
    assert note in capsys.readouterr().err
    assert run("segment", photos, tmp_path / "t", *args, "--threshold", "0.4") == 0
    assert run("segment", photos, tmp_path / "q", *args, "--quiet") == 0
    assert run("segment", photos, tmp_path / "listed", "--device", "cpu") == 0  # the shipped imff
    assert "no entry in weights/manifest.json" not in capsys.readouterr().err
    chain = [a for a in tiny_args(tiny, "--steps", "segment") if a != "--quiet"]
    assert run("run", photos, tmp_path / "r", *chain) == 0
    assert note in capsys.readouterr().err
