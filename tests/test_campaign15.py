"""Session of 2026-12-04 (fifth part): what campaigns 14a/14b left, and what campaigns 15a (the networks
against their sources) and 15b (fundus as a Python library) found. Each test fails on the code before its
mend."""

from __future__ import annotations

from tests.test_run import photos, tiny  # noqa: F401  (fixtures)


def test_a_refused_config_value_names_the_file_and_its_key(photos, tmp_path, capsys):  # noqa: F811
    """Campaign 14a E9: a value the --config file set and a check after the merge refused was named as the
    option (`invalid --device 'tpu'`), which the user never typed; now the line says which file set it. A value
    given on the command line is still named as the option alone."""
    from tests.test_campaign9 import run

    cfg = tmp_path / "c.toml"
    cfg.write_text('device = "tpu"\n')
    assert run("run", photos, tmp_path / "o", "--config", cfg) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid --device 'tpu'" in err and f"device is set by --config {cfg}" in err and len(err.splitlines()) == 1
    cfg.write_text('ground_truth = "nowhere"\nsteps = ["grade", "segment"]\n')
    assert run("run", photos, tmp_path / "o", "--config", cfg) == 2
    err = capsys.readouterr().err
    assert "needs --simulate" in err and f"ground_truth is set by --config {cfg}" in err
    # the same value on the command line: the option is what the user typed, and the file is not named
    cfg.write_text("seed = 1\n")
    assert run("run", photos, tmp_path / "o", "--config", cfg, "--device", "tpu") == 2
    err = capsys.readouterr().err
    assert "invalid --device 'tpu'" in err and "set by --config" not in err
    assert not (tmp_path / "o").exists()


def test_a_key_set_twice_in_the_config_is_named(photos, tmp_path, capsys):  # noqa: F811
    """Campaign 14a E9: tomllib's "Cannot overwrite a value (at line 2, column 6)" named neither the key nor
    that it was set twice."""
    from tests.test_campaign9 import run

    cfg = tmp_path / "c.toml"
    for text in ("seed = 1\nworkers = 1\nworkers = 2\n", 'seed = 1\r\nworkers = 1\r\n"workers" = 2'):
        cfg.write_bytes(text.encode())
        assert run("run", photos, tmp_path / "o", "--config", cfg) == 2
        err = capsys.readouterr().err
        assert "key 'workers' is set twice (line 3)" in err, err
    cfg.write_text("[a]\n[a]\n")  # other syntax errors keep tomllib's words
    assert run("run", photos, tmp_path / "o", "--config", cfg) == 2
    assert "Cannot declare ('a',) twice" in capsys.readouterr().err


def test_the_report_of_a_finished_run_does_not_say_a_lost_result_was_not_run_yet(photos, tmp_path, tiny):  # noqa: F811
    """Review 14 R5: `fundus report` of a finished run whose segment folder was deleted said "(not run yet: the
    run stopped before)" on every row, which only an interrupted run may say."""
    import shutil

    from tests.test_campaign9 import run
    from tests.test_run import rows_of, tiny_args

    out = tmp_path / "out"
    assert run("run", photos, out, *tiny_args(tiny, "--steps", "grade,segment", "--workers", "1")) == 0
    assert not any("(" in r["segment_reason"] for r in rows_of(out / "results.csv").values())
    shutil.rmtree(out / "segment")
    run("report", out)
    page = (out / "report.html").read_text()
    assert "not run yet" not in page and "(no result in its stage folder)" in page
