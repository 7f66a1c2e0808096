"""`python -m trainer report`: the summary agrees with the run folder's own files, plots are real PNGs, and odd
run folders (interrupted, a cut last metrics line, no matplotlib, not a run at all) are handled."""

import importlib.util
import json
import shutil
import statistics
import sys

import pytest
from reliability_support import World, last_json, make_world, ok, user_error

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("report"))


def metric_rows(world: World) -> list[dict]:
    return [json.loads(line) for line in (world.run / "metrics.jsonl").read_text().splitlines()]


def test_report_text_and_plots(world):
    proc = ok(world.cli("report", "--run", world.run))
    text = proc.stdout
    print(text)
    result = json.loads((world.run / "result.json").read_text())
    assert text.startswith(f"run {world.run}: step 10, checkpoints at steps 5, 10")
    for split in ("valid", "test"):
        assert f"{split:<6} accuracy {result[split]['accuracy']:.4f}" in text
    for heading in (
        "final metrics",
        "best on validation",
        "throughput",
        "where step time went",
        "pretrained coverage",
        "peak memory",
    ):
        assert heading in text, heading
    for phase in ("forward", "backward", "optimizer", "data"):
        assert f"  {phase} " in text, phase
    if importlib.util.find_spec("matplotlib") is None:
        assert "plots skipped: matplotlib is not installed" in proc.stderr
        return
    for name in ("loss", "accuracy"):
        png = world.run / "report" / f"{name}.png"
        assert f"plot: {png}" in text
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert not [p for p in (world.run / "report").iterdir() if p.name.startswith(".")]  # no temp files left


def test_report_json_matches_the_run_files(world):
    report = last_json(ok(world.cli("report", "--run", world.run, "--json", "--no-plots")).stdout)
    rows = metric_rows(world)
    result = json.loads((world.run / "result.json").read_text())
    assert report["result"] == result and report["last_step"] == 10 and report["checkpoints"] == [5, 10]
    tokens = [r["throughput/tokens_per_s"] for r in rows if "throughput/tokens_per_s" in r]
    assert tokens and report["throughput"]["tokens_per_s"]["median"] == pytest.approx(
        statistics.median(tokens)
    )
    examples = [r["throughput/examples_per_s"] for r in rows if "throughput/examples_per_s" in r]
    assert report["throughput"]["examples_per_s"]["median"] == pytest.approx(statistics.median(examples))
    assert sum(report["time_share"].values()) == pytest.approx(1.0)
    assert {"forward", "backward", "optimizer", "data"} <= set(report["time_share"])
    assert report["coverage"]["pretrained_token_coverage"] == rows[0]["embeddings/pretrained_token_coverage"]
    valid = [(r["step"], r["accuracy/valid"]) for r in rows if "accuracy/valid" in r]
    best_step, best = max(valid, key=lambda sv: sv[1])
    assert report["best"]["accuracy/valid"] == {"step": best_step, "value": best}
    assert report["final"]["loss/train"] == [r["loss/train"] for r in rows if "loss/train" in r][-1]
    assert report["eval"]["test"]["accuracy"] == result["test"]["accuracy"]
    assert report["plots"] == [] and report["bad_metric_lines"] == 0


def test_interrupted_run_with_a_cut_metrics_line(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world.run, run)
    (run / "result.json").unlink()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "loss/tr')  # a crash in the middle of a line
    proc = ok(world.cli("report", "--run", run, "--no-plots"))
    assert "no result.json: training has not completed" in proc.stdout
    assert "note: 1 unreadable line(s) in metrics.jsonl skipped" in proc.stdout
    assert "throughput" in proc.stdout


def test_without_matplotlib_plots_are_skipped_with_a_message(world, tmp_path, monkeypatch, capsys):
    from trainer.report import main

    run = tmp_path / "run"
    shutil.copytree(world.run, run, ignore=shutil.ignore_patterns("report"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(["--run", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "plots skipped: matplotlib is not installed" in err
    assert "final metrics" in out and not (run / "report").exists()


def test_not_a_run_folder_is_a_one_line_error(world, tmp_path):
    user_error(world.cli("report", "--run", tmp_path / "nowhere"), "nowhere", "no such folder")
    user_error(world.cli("report", "--run", tmp_path), str(tmp_path), "not a run folder")


def test_replayed_steps_keep_the_resumed_runs_rows(tmp_path):
    """A restart from the checkpoint at step 2 logs steps 3-4 again: the report reads each step once, the later row."""
    from trainer.report import read_metrics

    path = tmp_path / "metrics.jsonl"
    steps = [1, 2, 3, 4, 3, 4, 5]
    path.write_text("".join(json.dumps({"step": s, "loss/train": float(i)}) + "\n" for i, s in enumerate(steps)))
    rows, bad = read_metrics(path)
    assert bad == 0
    assert [(r["step"], r["loss/train"]) for r in rows] == [(1, 0.0), (2, 1.0), (3, 4.0), (4, 5.0), (5, 6.0)]


def test_a_resume_marker_drops_the_rows_logged_after_its_checkpoint(tmp_path):
    """An attempt killed right after logging its first step (3) leaves a row at exactly the step the next attempt,
    resumed from the checkpoint at 2, logs first: without the marker both rows were kept."""
    from trainer.metrics import RESUMED_AT_STEP
    from trainer.report import read_metrics

    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss/train": 0.0}, {"step": 2, "loss/train": 1.0}, {"step": 2, "loss/valid": 9.0},
             {"step": 3, "loss/train": 2.0}, {"step": 2, RESUMED_AT_STEP: 2}, {"step": 3, "loss/train": 3.0},
             {"step": 4, "loss/train": 4.0}]
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    rows, bad = read_metrics(path)
    assert bad == 0
    # the rows of step 2 (logged before its checkpoint was saved) stay; the marker itself is not a row
    assert [(r["step"], r.get("loss/train", r.get("loss/valid"))) for r in rows] == [
        (1, 0.0), (2, 1.0), (2, 9.0), (3, 3.0), (4, 4.0)]



def test_a_resumed_runs_report_reads_its_last_segment_and_furthest_step(tmp_path):
    """Throughput and step-time shares from segments at other world sizes were mixed into one median; the step shown
    was the last logged one although a checkpoint was later; the world size was not said."""
    from trainer.metrics import RESUMED_AT_STEP
    from trainer.report import build_report, format_report

    rows = [{"step": 10, "throughput/tokens_per_s": 600.0, "time/communication_share": 0.2, "time/compute_share": 0.8},
            {"step": 20, "throughput/tokens_per_s": 600.0, "time/communication_share": 0.2, "time/compute_share": 0.8},
            {"step": 20, RESUMED_AT_STEP: 20},
            {"step": 30, "throughput/tokens_per_s": 250.0, "time/communication_share": 0.0, "time/compute_share": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step, world in ((20, 2), (37, 1)):
        folder = tmp_path / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world,
                                                                "sharding": "replicated"}))
    report = build_report(tmp_path)
    assert report["last_step"] == 37 and report["world_size"] == 1 and report["segment_from_step"] == 20
    assert report["throughput"]["tokens_per_s"]["median"] == 250.0
    text = format_report(report)
    assert "step 37, checkpoints at steps 20, 37 (world size 1, replicated tables)" in text
    assert "since the resume at step 20" in text and "communication" not in text
