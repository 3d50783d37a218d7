"""The stage runner: crash isolation, resume safety, odd file names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from fundus_pipeline.cli import main
from fundus_pipeline.runner import JOURNAL, run_stage
from fundus_pipeline.stages.base import InputSpec, ItemOutput, Stage
from tests.conftest import synthetic_fundus


class CopyStage(Stage):
    """Copies each image; the process dies on the key 'boom' (a stand-in for an out-of-memory kill)."""

    name = "copy"
    fov_policy = "none"

    def config_record(self) -> dict:
        return {"copy": 1}

    def compute(self, item):
        if item.key == "boom":
            os._exit(9)
        return ItemOutput({"": item.image.array})


def _folder(tmp_path: Path, names: list[str]) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for i, n in enumerate(names):
        Image.fromarray(synthetic_fundus(48, 48, seed=i)).save(d / f"{n}.png")
    return d


def test_a_dying_worker_does_not_end_the_run(tmp_path):
    d = _folder(tmp_path, ["a", "b", "boom", "c", "d", "e"])
    res = run_stage(CopyStage(), d, tmp_path / "out", workers=2, progress=False)
    assert res.exit_code == 3
    by_key = {r["key"]: r for r in res.rows}
    assert set(by_key) == {"a", "b", "boom", "c", "d", "e"}
    assert by_key["boom"]["status"] == "error" and "worker process died" in by_key["boom"]["error"]
    # Only the item that kills its process fails; the ones in flight beside it are retried.
    assert sorted(k for k, r in by_key.items() if r["status"] == "ok") == ["a", "b", "c", "d", "e"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert (tmp_path / "out" / "results.csv").exists()


def test_non_utf8_file_names(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(synthetic_fundus(48, 48)).save(os.fsdecode(bytes(d) + b"/x\xff.png"))
    out = tmp_path / "out"
    assert main(["degrade", str(d), str(out)]) == 0
    assert (out / "results.csv").exists() and (out / "manifest.json").exists()
    assert any(p.suffix == ".png" for p in out.iterdir())


def test_resume_never_mixes_configurations(tmp_path):
    d = _folder(tmp_path, [f"i{k}" for k in range(4)])
    out = tmp_path / "out"
    assert main(["degrade", str(d), str(out), "--seed", "1"]) == 0
    # An --overwrite run with another seed that was killed after two items: its journal has 2 rows.
    assert main(["degrade", str(d), str(out), "--seed", "2", "--overwrite"]) == 0
    journal = (out / JOURNAL).read_text().splitlines()
    (out / JOURNAL).write_text("\n".join(journal[:2]) + "\n")
    (out / "manifest.json").unlink()
    (out / "results.csv").unlink()
    # The folder now holds seed-2 work: resuming it with seed 1 is refused, never mixed.
    assert main(["degrade", str(d), str(out), "--seed", "1", "--resume"]) == 2
    assert main(["degrade", str(d), str(out), "--seed", "2", "--resume", "--format", "json"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["seed"] == 2 and m["counts"]["skipped"] == 2 and m["counts"]["ok"] == 4
    assert all(r["params"]["default"]["seed"] == 2 for r in m["items"])
    ref = tmp_path / "ref"
    assert main(["degrade", str(d), str(ref), "--seed", "2"]) == 0
    for k in range(4):
        assert np.array_equal(np.asarray(Image.open(out / f"i{k}.png")), np.asarray(Image.open(ref / f"i{k}.png")))


def test_resume_refuses_a_folder_that_is_not_a_fundus_run(tmp_path):
    d = _folder(tmp_path, ["a"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["degrade", str(d), str(out), "--resume"]) == 2
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["degrade", str(tmp_path / "empty_missing"), str(tmp_path / "never")]) == 2
    assert not (tmp_path / "never").exists()  # nothing created for a failed start


def test_a_persistent_pool_survives_a_dying_worker_and_serves_the_next_stage(tmp_path):
    """The pool `fundus run` keeps across stages: a worker killed mid-stage loses and duplicates no row (the
    items in flight are retried, only the culprit fails), and the next stage runs in a fresh pool."""
    from fundus_pipeline.runner import WorkerPool

    d = _folder(tmp_path, ["a", "b", "boom", "c", "d", "e"])
    with WorkerPool(2, 1) as pool:
        first = run_stage(CopyStage(), d, tmp_path / "one", workers=2, progress=False, pool=pool)
        second = run_stage(CopyStage(), d, tmp_path / "two", workers=2, progress=False, pool=pool)
    for res, out in ((first, tmp_path / "one"), (second, tmp_path / "two")):
        assert res.exit_code == 3
        keys = [r["key"] for r in res.rows]
        assert sorted(keys) == ["a", "b", "boom", "c", "d", "e"]  # each once
        assert [r["key"] for r in res.rows if r["status"] == "error"] == ["boom"]
        assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
        journal = [json.loads(x)["key"] for x in (out / JOURNAL).read_text().splitlines()]
        assert sorted(journal) == sorted(keys)


class BatchStage(CopyStage):
    """Copies; records the batch sizes it saw; its batch call fails when the item 'bad' is in it."""

    name = "batchcopy"
    batch_size = 3
    seen: list[int] = []

    def compute_batch(self, items):
        type(self).seen.append(len(items))
        if any(it.key == "bad" for it in items):
            raise RuntimeError("a batch with a bad item")
        return [self.compute(it) for it in items]

    def compute(self, item):
        if item.key == "bad":
            raise ValueError("bad item")
        return super().compute(item)


def test_batches_isolate_failures_and_write_what_one_at_a_time_writes(tmp_path):
    d = _folder(tmp_path, ["a", "b", "bad", "c", "d", "e", "f"])
    (d / "unreadable.png").write_text("not an image")
    BatchStage.seen = []
    res = run_stage(BatchStage(), d, tmp_path / "batched", progress=False)
    by_key = {r["key"]: r for r in res.rows}
    assert sorted(by_key) == ["a", "b", "bad", "c", "d", "e", "f", "unreadable"]
    assert {k for k, r in by_key.items() if r["status"] == "error"} == {"bad", "unreadable"}
    assert by_key["bad"]["error"] == "ValueError: bad item"  # the batch failed, then each item alone: only the culprit fails
    assert max(BatchStage.seen) == 3  # the items went in batches
    one = run_stage(CopyStage(), d, tmp_path / "one", progress=False)
    written = sorted((tmp_path / "batched").glob("*.png"))
    assert [p.name for p in written] == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    for p in written:
        assert (tmp_path / "one" / p.name).read_bytes() == p.read_bytes()
    assert res.exit_code == 3 and one.exit_code == 3
    # in worker processes: batches are the pool's tasks, the same rows and bytes
    pooled = run_stage(BatchStage(), d, tmp_path / "pooled", workers=2, progress=False)
    assert {r["key"]: r["status"] for r in pooled.rows} == {r["key"]: r["status"] for r in res.rows}
    for p in written:
        assert (tmp_path / "pooled" / p.name).read_bytes() == p.read_bytes()


# ------------------------------------------------------------------------------- large runs, provenance
def test_rows_record_the_sha256_of_the_bytes_read_and_a_replaced_input_is_redone_on_resume(tmp_path):
    import hashlib

    d = _folder(tmp_path, ["a", "b", "c"])
    out = tmp_path / "out"
    first = run_stage(CopyStage(), d, out, progress=False)
    rows = {r["key"]: r for r in first.rows}
    for k in "abc":
        assert rows[k]["input_sha256"] == hashlib.sha256((d / f"{k}.png").read_bytes()).hexdigest()
    m = json.loads((out / "manifest.json").read_text())  # streamed one item a line, still one JSON document
    assert [r["key"] for r in m["items"]] == ["a", "b", "c"] and m["counts"]["ok"] == 3
    # b is replaced by another image (same name); a is only touched (same bytes, newer mtime)
    Image.fromarray(synthetic_fundus(48, 48, seed=99)).save(d / "b.png")
    os.utime(d / "a.png", ns=(1, 1))
    again = run_stage(CopyStage(), d, out, resume=True, progress=False)
    assert again.counts["skipped"] == 2  # a (re-hashed: unchanged) and c
    assert again.store["b"]["input_sha256"] == hashlib.sha256((d / "b.png").read_bytes()).hexdigest() != rows["b"]["input_sha256"]
    assert np.array_equal(np.asarray(Image.open(out / "b.png")), np.asarray(Image.open(d / "b.png")))


def test_rows_record_their_outputs_and_a_truncated_or_removed_output_is_redone_on_resume(tmp_path):
    import hashlib

    d = _folder(tmp_path, ["a", "b", "c", "d"])
    out = tmp_path / "out"
    first = run_stage(CopyStage(), d, out, progress=False)
    rows = {r["key"]: r for r in first.rows}
    for k in "abcd":
        data = (out / f"{k}.png").read_bytes()
        assert rows[k]["outputs_sha256"] == {f"{k}.png": hashlib.sha256(data).hexdigest()}
        assert rows[k]["outputs_size"] == {f"{k}.png": len(data)}
    m = json.loads((out / "manifest.json").read_text())
    assert m["items"][1]["outputs_sha256"] == rows["b"]["outputs_sha256"]
    good = {k: (out / f"{k}.png").read_bytes() for k in "abcd"}
    (out / "b.png").write_bytes(good["b"][: len(good["b"]) // 2])  # truncated (a copy cut short, a full disk elsewhere)
    (out / "c.png").write_bytes(good["c"] + b"\0")  # replaced by a file of another size
    (out / "d.png").unlink()
    os.utime(out / "a.png", ns=(1, 1))  # only touched: the same bytes, kept
    again = run_stage(CopyStage(), d, out, resume=True, progress=False)
    assert again.counts["skipped"] == 1 and again.counts["ok"] == 4
    assert {k: (out / f"{k}.png").read_bytes() for k in "abcd"} == good
    assert again.store["b"]["outputs_sha256"] == rows["b"]["outputs_sha256"]


def test_resume_computes_again_a_key_that_now_names_another_file(tmp_path):
    """The same key from another file (a list now naming b/p.png where it named a/p.png; in `fundus run`,
    the enhanced image where the input was segmented before) is not taken from the earlier row."""
    for sub, seed in (("a", 1), ("b", 2)):
        (tmp_path / sub).mkdir()
        Image.fromarray(synthetic_fundus(48, 48, seed=seed)).save(tmp_path / sub / "p.png")
        (tmp_path / f"{sub}.txt").write_text(f"{tmp_path / sub / 'p.png'}\n")
    out = tmp_path / "out"
    assert run_stage(CopyStage(), tmp_path / "a.txt", out, progress=False).counts["ok"] == 1
    again = run_stage(CopyStage(), tmp_path / "b.txt", out, resume=True, progress=False)
    assert again.counts["skipped"] == 0 and again.store["p"]["input"] == str(tmp_path / "b" / "p.png")
    assert np.array_equal(np.asarray(Image.open(out / "p.png")), np.asarray(Image.open(tmp_path / "b" / "p.png")))
    journal = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]
    assert [r["input"] for r in journal] == [str(tmp_path / "b" / "p.png")]


class PairStage(Stage):
    """The image with its `other` input pasted on the left half: the output depends on both files."""

    name = "pair"
    fov_policy = "none"
    inputs = (InputSpec("image"), InputSpec("other", "--other"))

    def config_record(self) -> dict:
        return {"pair": 1}

    def compute(self, item):
        out = item.image.array.copy()
        other = item.images["other"].array
        out[:, : out.shape[1] // 2] = other[: out.shape[0], : out.shape[1] // 2]
        return ItemOutput({"": out})


def test_resume_computes_again_a_row_whose_other_input_now_names_another_file(tmp_path):
    """In `fundus run --simulate`, the comparison's delivered image becomes the enhanced one once an
    enhancement that had failed succeeds on resume: its row must not be kept."""
    d = _folder(tmp_path, ["p"])
    for sub, seed in (("x", 5), ("y", 6)):
        (tmp_path / sub).mkdir()
        Image.fromarray(synthetic_fundus(48, 48, seed=seed)).save(tmp_path / sub / "p.png")
    out = tmp_path / "out"
    run_stage(PairStage(), d, out, extra_dirs={"other": tmp_path / "x"}, progress=False)
    again = run_stage(PairStage(), d, out, extra_dirs={"other": tmp_path / "y"}, resume=True, progress=False)
    assert again.counts["skipped"] == 0 and again.store["p"]["inputs"] == {"other": str(tmp_path / "y" / "p.png")}
    left = np.asarray(Image.open(out / "p.png"))[:, :24]
    assert np.array_equal(left, np.asarray(Image.open(tmp_path / "y" / "p.png"))[:, :24])
    assert run_stage(PairStage(), d, out, extra_dirs={"other": tmp_path / "y"}, resume=True, progress=False).counts["skipped"] == 1


def test_resume_lists_only_the_inputs_still_listed(tmp_path):
    d = _folder(tmp_path, ["a", "b", "c"])
    lst = tmp_path / "list.txt"
    lst.write_text("a.png\nb.png\nc.png\n".replace("a.png", str(d / "a.png")).replace("b.png", str(d / "b.png")).replace("c.png", str(d / "c.png")))
    out = tmp_path / "out"
    run_stage(CopyStage(), lst, out, progress=False)
    lst.write_text(f"{d / 'a.png'}\n{d / 'b.png'}\n")  # c is still on disk, but no longer an input
    again = run_stage(CopyStage(), lst, out, resume=True, progress=False)
    assert again.counts["skipped"] == 2 and set(again.store) == {"a", "b"}
    assert [line.split(",")[0] for line in (out / "results.csv").read_text().splitlines()[1:]] == ["a", "b"]
    assert (out / "c.png").is_file()  # its output is left in place, only no longer listed


def test_an_unreadable_image_still_records_the_hash_of_its_bytes(tmp_path):
    import hashlib

    d = _folder(tmp_path, ["a"])
    (d / "bad.png").write_bytes(b"not an image at all")
    res = run_stage(CopyStage(), d, tmp_path / "out", progress=False)
    assert res.store["bad"]["status"] == "error"
    assert res.store["bad"]["input_sha256"] == hashlib.sha256(b"not an image at all").hexdigest()


def test_streamed_json_equals_the_whole_document(tmp_path):
    from fundus_pipeline.runner import write_json_streamed

    head = {"a": 1, "nested": {"x": [1, 2]}, "s": "é\u2028"}
    items = [{"key": "k1", "v": 0.1}, {"key": "k2", "v": [1, {"z": None}]}]
    write_json_streamed(tmp_path / "m.json", head, {"plan": (json.dumps(i) for i in items), "items": iter(())})
    assert json.loads((tmp_path / "m.json").read_text()) == {**head, "plan": items, "items": []}
    write_json_streamed(tmp_path / "e.json", {}, {"items": (json.dumps(i) for i in items)})
    assert json.loads((tmp_path / "e.json").read_text()) == {"items": items}


class PeekStage(CopyStage):
    """Copies; records how many rows OUT/results.csv held when each item was computed."""

    name = "peek"

    def __init__(self, out: Path):
        self.out = out

    def compute(self, item):
        res = super().compute(item)
        csv_path = self.out / "results.csv"
        seen = len(csv_path.read_text().splitlines()) - 1 if csv_path.exists() else -1
        status = json.loads((self.out / "manifest.json").read_text())["status"] if (self.out / "manifest.json").exists() else ""
        res.fields.update(seen=seen, manifest_status=status)
        return res


def test_results_and_manifest_are_written_while_the_run_goes_on(tmp_path, monkeypatch):
    import fundus_pipeline.runner as runner

    monkeypatch.setattr(runner, "SNAPSHOT_S", 0.0)  # a snapshot after every row (60 s in a real run)
    monkeypatch.setattr(runner, "SNAPSHOT_SHARE", float("inf"))
    d = _folder(tmp_path, ["a", "b", "c", "d"])
    out = tmp_path / "out"
    res = run_stage(PeekStage(out), d, out, progress=False)
    assert [res.store[k]["seen"] for k in "abcd"] == [-1, 1, 2, 3]  # each item saw the rows before it
    assert [res.store[k]["manifest_status"] for k in "abcd"] == ["", "running", "running", "running"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "finished" and m["finished_at"] and len(m["items"]) == 4
