"""Small CLI paths: `fundus models` (also with torch blocked), `fundus sample`, `fundus --version`, and the
message for an architecture name given as --weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fundus_pipeline import __version__
from fundus_pipeline.cli import main
from fundus_pipeline.models.catalog import CATALOG
from fundus_pipeline.models.weights import read_manifest
from tests.conftest import synthetic_fundus

ROOT = Path(__file__).resolve().parents[1]


def run(*args) -> int:
    return main([str(a) for a in args])


def test_models_human(capsys):
    assert run("models") == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if not line.startswith("* ")}  # the defaults' footnote
    assert set(lines) == set(CATALOG) and out.splitlines()[-1].startswith("* the default weights of")
    for spec in read_manifest():  # the weights named after the model by file, its other weights by name
        assert (f"weights/{spec.file}" if spec.name == spec.model else spec.name) in lines[spec.model]
    assert "34.68 M" in lines["imff_paper"] and "weights/" not in lines["imff_paper"]


def test_models_json_and_pattern(capsys):
    assert run("models", "msrf*", "--format", "json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == sorted(n for n in CATALOG if n.startswith("msrf"))
    assert run("models", "--format", "json") == 0
    everything = json.loads(capsys.readouterr().out)
    assert [r for r in everything if r["name"].startswith("msrf")] == rows
    for r in everything:
        assert set(r) == {"name", "task", "arch", "width", "params", "weights", "weights_name", "threshold", "other_weights", "description",
                          "default_for", "missing_files"}
        row = CATALOG[r["name"]]
        assert (r["task"], r["arch"], r["width"], r["params"], r["description"]) == (row.task, row.arch, row.width, row.params, row.description)
        # every shipped weights file of the architecture is listed: the one named after it first, the others after
        specs = [s for s in read_manifest() if s.model == r["name"]]
        s = next((w for w in specs if w.name == r["name"]), min(specs, key=lambda w: w.name) if specs else None)
        assert r["weights"] == (s.file if s else None) and r["threshold"] == (s.threshold if s else None)
        assert r["other_weights"] == sorted(w.name for w in specs if w is not s)
    assert run("models", "nothing*", "--format", "json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_models_does_not_import_torch():
    code = "import sys; sys.modules['torch'] = None; from fundus_pipeline.cli import main; raise SystemExit(main(['models']))"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "imff " in p.stdout and "weights/imff.pt" in p.stdout
    assert "msrf_w8 " in p.stdout and "weights/msrf_w8.pt" in p.stdout


def test_sample(tmp_path, capsys):
    out = tmp_path / "samples" / "nested"
    assert run("sample", out, "--clean-only") == 0
    target = out / "retina.png"
    assert f"wrote {target}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["retina.png"]
    with Image.open(target) as im:
        assert im.size == (1411, 1411) and im.mode == "RGB"
    before = target.read_bytes()
    assert run("sample", out, "--clean-only") == 0
    assert "already exists" in capsys.readouterr().out
    assert target.read_bytes() == before


def test_sample_degraded_versions_are_what_degrade_writes(tmp_path, capsys):
    from fundus_pipeline.cli.sample import DEMO_VERSIONS

    out = tmp_path / "demo"
    assert run("sample", out) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["retina.png"] + [f"{n}.png" for n, _ in DEMO_VERSIONS])
    # the moderate version is byte for byte `fundus degrade retina.png OUT --recipe moderate --seed 5`
    assert run("degrade", out / "retina.png", tmp_path / "deg", "--recipe", "moderate", "--seed", "5", "--quiet") == 0
    assert (tmp_path / "deg" / "retina.png").read_bytes() == (out / "retina_moderate.png").read_bytes()
    assert (out / "retina_moderate.png").read_bytes() != (out / "retina.png").read_bytes()
    before = {n: (out / n).read_bytes() for n in names}
    capsys.readouterr()
    assert run("sample", out) == 0
    assert "already exist" in capsys.readouterr().out and {n: (out / n).read_bytes() for n in names} == before


def test_sample_refuses_a_file_as_folder(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert run("sample", f) == 2  # a usage error, as in the stage commands
    err = capsys.readouterr().err
    assert err.startswith("Error: output path exists and is not a folder") and "Traceback" not in err
    assert f.read_text() == "x"


def test_version(capsys):
    assert run("--version") == 0
    assert capsys.readouterr().out.strip() == f"fundus {__version__}"


def test_segment_with_an_architecture_name_as_weights(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(synthetic_fundus(64, 64)).save(d / "a.png")
    assert run("segment", d, tmp_path / "out", "--weights", "imff_paper") == 1
    err = capsys.readouterr().err
    shipped = ", ".join(s.name for s in read_manifest())
    assert f"Error: imff_paper is an architecture without shipped weights; shipped weights: {shipped}" in err
    assert "--arch imff_paper" in err and "Traceback" not in err
    assert run("segment", d, tmp_path / "out2", "--weights", "imfff") == 1
    assert "Error: weights not found: imfff (did you mean imff?)" in capsys.readouterr().err
    assert not np.any([p.name == "a_vessels.png" for p in tmp_path.rglob("*")])
