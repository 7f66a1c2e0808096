"""The real command line on tiny data: train -> run folder -> eval -> predict -> neighbors; interrupt with
SIGTERM and resume (only the remaining steps run, same final weights as an uninterrupted run); pretrained
bytes never change; user errors exit 2 with one line; every encoder and sparse optimizer trains."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

FAST = ["--train.threads", "1"]
REQUIRED_TAGS = {
    "loss/train",
    "accuracy/valid",
    "throughput/tokens_per_s",
    "throughput/examples_per_s",
    "lr/dense",
    "lr/sparse",
    "embeddings/pretrained_token_coverage",
}


def cli(*args: str, stdin: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    )
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_dir_of(config: Path) -> Path:
    return Path(tomllib.loads(config.read_text())["run"]["dir"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_glove(path: Path) -> dict[str, np.ndarray]:
    out = {}
    for line in path.read_text().splitlines():
        word, *values = line.split(" ")
        out[word] = np.array([float(v) for v in values], dtype=np.float32)
    return out


def assert_frozen_rows_are_source_rows(model_dir: Path, glove: Path) -> None:
    from trainer.vocab import Vocabulary

    source = read_glove(glove)
    vocab = Vocabulary.load(model_dir / "vocab")
    frozen = np.load(model_dir / "frozen.npy")
    assert frozen.shape == (vocab.num_pretrained, len(next(iter(source.values()))))
    assert vocab.num_pretrained > 0
    for i in range(vocab.num_pretrained):
        np.testing.assert_array_equal(frozen[i], source[vocab.words[i]], err_msg=vocab.words[i])


# ---------------------------------------------------------------- train -> eval -> predict -> neighbors
def test_train_eval_predict_neighbors(tiny_config, tiny_data):
    config = tiny_config("run")
    run = run_dir_of(config)
    result = last_json(ok(cli("train", "--config", config, *FAST)).stdout)
    assert result["step"] == result["steps_this_run"] == 40  # 4 epochs x ceil(300 / 32)
    assert result["valid"]["accuracy"] > 0.5 and result["test"]["accuracy"] > 0.5  # chance is 1/3
    assert json.loads((run / "result.json").read_text()) == result

    # ---- run folder layout
    from trainer.config import load_config

    assert load_config(run / "config.toml") == load_config(config, FAST)
    rows = jsonl((run / "metrics.jsonl").read_text())
    assert rows and all(isinstance(r["step"], int) for r in rows)
    tags = set().union(*rows) - {"step", "time"}
    assert REQUIRED_TAGS <= tags, REQUIRED_TAGS - tags
    assert rows[0]["step"] == 1 and "embeddings/pretrained_token_coverage" in rows[0]
    assert 0 < rows[0]["embeddings/pretrained_token_coverage"] < 1  # the OOV words are not pretrained
    assert max(r["step"] for r in rows) == 40
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # one TensorBoard run: the hparams entry is in the run's own events, not in a subfolder (a second run)
    assert [p.parent for p in (run / "tb").rglob("events.out.tfevents.*")] == [run / "tb"]
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(run / "tb"))
    multiplexer.Reload()
    assert list(multiplexer.Runs()) == ["."]
    assert "_hparams_/experiment" in multiplexer.PluginRunToTagToContent("hparams")["."]

    # ---- the same command again: the run is finished, nothing trains and its result stays
    again = ok(cli("train", "--config", config, *FAST))
    assert "already finished at step 40" in again.stderr
    assert last_json(again.stdout) == result and json.loads((run / "result.json").read_text()) == result
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert steps and steps[-1] == 40 and len(steps) <= 2  # keep_latest_k = 2
    for step in steps:
        folder = run / "checkpoints" / f"step-{step}"
        assert (folder / ".metadata").is_file() and list(folder.glob("*.distcp"))
        state = json.loads((folder / "trainer_state.json").read_text())
        assert state["step"] == step
    model = run / "model"
    for name in ("weights.pt", "frozen.npy", "config.toml", "model.json", "vocab/vocab.json"):
        assert (model / name).is_file(), name
    weights = torch.load(model / "weights.pt", weights_only=True)
    assert "tables.oov" in weights and "tables.pretrained" not in weights  # the frozen table is not saved
    assert_frozen_rows_are_source_rows(model, tiny_data["glove"])

    # ---- eval: JSON on stdout, per-class table on stderr and in RUN_DIR/eval
    proc = ok(cli("eval", "--run", run, "--data", tiny_data["test"]))
    summary = last_json(proc.stdout)
    assert {"accuracy", "macro_f1", "n"} <= set(summary)
    assert summary["n"] == 60
    assert summary["accuracy"] == pytest.approx(result["test"]["accuracy"])
    assert summary["macro_f1"] == pytest.approx(result["test"]["macro_f1"])
    assert "precision" in proc.stderr and "macro_f1" in proc.stderr
    for label in ("food", "sports", "tech"):
        assert any(line.startswith(label) for line in proc.stderr.splitlines()), label
    table = (run / "eval" / "test.csv.per_class.txt").read_text()
    assert table.splitlines()[0].split()[:2] == ["label", "precision"]
    assert table.strip() in proc.stderr
    assert json.loads((run / "eval" / "test.csv.json").read_text())["accuracy"] == summary["accuracy"]
    # by default words unseen in training get their pretrained rows; --no-extend scores the model the run
    # evaluated, so it reproduces the run's own test figures exactly
    assert Path(json.loads((model / "model.json").read_text())["pretrained_source"]).is_absolute()
    assert summary["extended_words"] > 0
    exact = last_json(ok(cli("eval", "--run", run, "--data", tiny_data["test"], "--no-extend")).stdout)
    assert exact["extended_words"] == 0
    assert (exact["accuracy"], exact["macro_f1"]) == (result["test"]["accuracy"], result["test"]["macro_f1"])
    assert exact["loss"] == pytest.approx(result["test"]["loss"], rel=1e-6)
    kept = {name: json.loads((run / "eval" / name).read_text()) for name in ("test.csv.json", "test.csv.no-extend.json")}
    assert kept["test.csv.json"]["extend"] and not kept["test.csv.no-extend.json"]["extend"]  # both kept, apart
    assert kept["test.csv.json"]["data"] == str(Path(tiny_data["test"]).resolve())
    # another folder's test.csv gets a name of its own instead of replacing that result
    other = tiny_data["dir"] / "other" / "test.csv"
    other.parent.mkdir()
    other.write_text("\n".join(Path(tiny_data["test"]).read_text().splitlines()[:11]) + "\n")
    assert last_json(ok(cli("eval", "--run", run, "--data", other)).stdout)["n"] == 10
    assert json.loads((run / "eval" / "test.csv.json").read_text())["n"] == 60
    (renamed,) = [p for p in (run / "eval").glob("test.csv-*.json")]
    assert json.loads(renamed.read_text())["data"] == str(other.resolve())
    # a model folder copied on its own keeps its evaluations inside it, not in the folder that holds it
    alone = tiny_data["dir"] / "deployed" / "model_a"
    shutil.copytree(model, alone)
    ok(cli("eval", "--run", alone, "--data", tiny_data["test"]))
    assert (alone / "eval" / "test.csv.json").is_file() and not (alone.parent / "eval").exists()

    # ---- predict: stdin and --input, top-k 2
    texts = [
        "soccer referee stadium goal tennis",
        "compiler kernel linux python software",
        "garlic soup oven bread",
    ]
    proc = ok(cli("predict", "--run", run, "--top-k", "2", stdin="\n".join(texts) + "\n"))
    preds = jsonl(proc.stdout)
    assert len(preds) == 3
    for p in preds:
        assert set(p) == {"label", "score", "top_k", "known_words", "features"}
        assert len(p["top_k"]) == 2
        assert p["top_k"][0] == {"label": p["label"], "score": p["score"]}
        assert p["top_k"][0]["score"] >= p["top_k"][1]["score"]
        assert p["top_k"][0]["label"] != p["top_k"][1]["label"]
        assert 0 < p["score"] <= 1
    assert [p["label"] for p in preds] == ["sports", "tech", "food"]
    infile = tiny_data["dir"] / "predict.txt"
    infile.write_text("\n".join(texts) + "\n")
    from_file = jsonl(ok(cli("predict", "--run", run, "--top-k", "2", "--input", infile)).stdout)
    assert from_file == preds
    # known_words: tokens in the vocabulary (--no-extend keeps pretrained words unseen in training out); features:
    # the ids looked up, those words and (tiny_config has no hashed n-gram tables) nothing else, so an empty line
    # and a line of unseen words get the biases' label
    lines = ["", "zzqx qqzv", texts[0], "zzqx soccer"]
    counted = jsonl(ok(cli("predict", "--run", run, "--no-extend", stdin="\n".join(lines) + "\n")).stdout)
    assert [(p["known_words"], p["features"]) for p in counted] == [(0, 0), (0, 0), (5, 5), (1, 1)]
    assert preds[0]["known_words"] == preds[0]["features"] == 5
    assert counted[0]["label"] == counted[1]["label"]  # the biases' label

    # ---- neighbors: JSON lines with word, score, kind
    near = jsonl(ok(cli("neighbors", "--run", run, "soccer", "--k", "5")).stdout)
    assert len(near) == 5
    for n in near:
        assert set(n) == {"word", "score", "kind"}
        assert n["kind"] in ("pretrained", "learned")
        assert n["word"] != "soccer" and -1 <= n["score"] <= 1
    assert [n["score"] for n in near] == sorted((n["score"] for n in near), reverse=True)


# ---------------------------------------------------------------- interrupt and resume
def test_sigterm_then_resume_runs_only_the_remaining_steps(tiny_config, tmp_path):
    # long enough that SIGTERM lands mid-run (~2 s of steps): 80 epochs x ceil(300 / 64) = 400 steps, no evaluation
    sections = {
        "train": {"epochs": 80, "batch_size": 64, "threads": 1},
        "checkpoint": {"every_steps": 100, "at_epoch_end": False},
        "metrics": {"log_every_steps": 25, "tensorboard": False, "projector_words": 0},
    }
    config = tiny_config("interrupted", **sections)
    reference = tiny_config("uninterrupted", **sections)
    no_eval = ["--data.valid=", "--data.test="]
    run = run_dir_of(config)
    total = 400

    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "train", "--config", str(config), *no_eval],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (
        metrics.exists() and metrics.read_text().strip()
    ):  # step 1 is logged: the handler is installed
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]  # 143, as a shell reports a SIGTERM'd process
    stopped = last_json(out)
    assert stopped["stopped"] is True and stopped["signal"] == signal.SIGTERM
    k = stopped["step"]
    print(f"SIGTERM stopped the run at step {k} of {total}")
    assert 0 < k < total, f"SIGTERM landed at step {k} of {total}; make the run longer"
    assert (run / "checkpoints" / f"step-{k}" / "trainer_state.json").is_file()
    assert not (run / "model").exists() and not (run / "result.json").exists()
    assert "checkpoint saved" in err

    resumed = last_json(ok(cli("train", "--config", config, *no_eval)).stdout)
    assert resumed["step"] == total
    assert resumed["steps_this_run"] == total - k
    assert json.loads((run / "result.json").read_text())["steps_this_run"] == total - k
    logged = [r["step"] for r in jsonl(metrics.read_text())]
    second_run = logged[logged.index(max(s for s in logged if s <= k)) + 1 :]
    assert second_run and all(s > k for s in second_run) and second_run[-1] == total

    full = last_json(ok(cli("train", "--config", reference, *no_eval)).stdout)
    assert full["steps_this_run"] == total
    a = torch.load(run / "model" / "weights.pt", weights_only=True)
    b = torch.load(run_dir_of(reference) / "model" / "weights.pt", weights_only=True)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------- pretrained bytes
def test_training_never_changes_pretrained_bytes(tiny_config, tiny_data, tmp_path):
    from trainer.vectors import load_vectors

    # full table, trainable correction, masked bag: every path that touches the pretrained rows
    config = tiny_config(
        "full",
        embeddings={"full_pretrained": True, "freeze_pretrained": False},
        model={"encoder": "masked_bag"},
        train={"epochs": 2},
    )
    cache_dir = Path(tomllib.loads(config.read_text())["embeddings"]["vectors_cache_dir"])
    vectors = load_vectors(str(tiny_data["glove"]), cache_dir=cache_dir)  # build the cache the run will map
    cached = list(cache_dir.glob("*/vectors.npy"))
    assert len(cached) == 1
    before = {p: (sha256(p), p.stat().st_mtime_ns) for p in (tiny_data["glove"], cached[0])}
    del vectors

    ok(cli("train", "--config", config, *FAST))
    after = {p: (sha256(p), p.stat().st_mtime_ns) for p in before}
    assert after == before
    assert list(cache_dir.glob("*/vectors.npy")) == cached  # the run used the entry, did not rebuild it

    model = run_dir_of(config) / "model"
    source = read_glove(tiny_data["glove"])
    frozen = np.load(model / "frozen.npy")
    assert frozen.shape[0] == len(source)  # full_pretrained: every source row, id = row
    np.testing.assert_array_equal(frozen, np.stack(list(source.values())))
    assert_frozen_rows_are_source_rows(model, tiny_data["glove"])
    weights = torch.load(model / "weights.pt", weights_only=True)
    # the correction learned instead (zero-initialised: stored whole, or as its nonzero rows when most are zero)
    delta = weights.get("tables.pretrained_delta", weights.get("tables_sparse.pretrained_delta.values"))
    assert delta is not None and delta.abs().sum() > 0


# ---------------------------------------------------------------- user errors
@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--train.nosuch", "1"], "train.nosuch"),
        (["--train.epochs", "abc"], "train.epochs"),
        (["--data.train", "/nonexistent/train.csv"], "/nonexistent/train.csv: file not found (data.train)"),
        # no extension: a path, not a hub name, so no load_dataset (offline, its retries took about 25 s)
        (["--data.train", "/nonexistent/data/train"], "/nonexistent/data/train: file not found (data.train)"),
        (["--data.text_column", "body"], "body"),
        (["--data.text_column", "body", "--data.build_in_background", "false"], "body"),  # found by the Trainer
        (["--embeddings.pretrained", "no/such.txt"], "no/such.txt: no such file (embeddings.pretrained, a path "
                                                       "relative to the working folder"),
        (["--embeddings.pretrained", "glove-6b-100d"], "the only built-in name is glove-6b-50d"),
        (["--run.dir", "/proc/trainer-test/run"], "run.dir: cannot create /proc/trainer-test/run"),
        (["--train.epochs", "--train.seed", "1"], "--train.epochs: missing value (the next argument is the flag"),
        (["--train.device", "cuda"] if not torch.cuda.is_available() else ["--train.bf16", "maybe"],
         "train.device: cuda requested" if not torch.cuda.is_available() else "train.bf16"),
    ],
    ids=["unknown-key", "bad-value", "missing-file", "missing-path", "missing-column", "missing-column-in-process",
         "missing-vectors", "unknown-vectors-name", "run-dir-uncreatable",
         "missing-value", "no-cuda"],
)
def test_user_errors_exit_2_with_one_line(tiny_config, extra, needle):
    config = tiny_config("bad")
    proc = cli("train", "--config", config, *FAST, *extra)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    assert needle in errors[0]
    assert proc.stdout == ""
    if "train.device" not in needle:  # found after the data cache was built beside torch's import: the cache stays
        assert not run_dir_of(config).exists(), "a refused run left its new run.dir behind"


# ---------------------------------------------------------------- every encoder and sparse optimizer
@pytest.mark.parametrize(
    ("encoder", "sparse", "extra"),
    [
        ("bag", "sparse_adam", []),  # the defaults
        ("masked_bag", "rowwise_adagrad", ["--embeddings.ngram_buckets", "256"]),
        ("lstm", "adagrad", ["--embeddings.char_ngrams", "256", "--model.lstm_hidden", "16"]),
        ("bag", "sgd", ["--embeddings.char_ngrams", "256", "--optim.sparse_lr", "0.5"]),
    ],
)
def test_each_encoder_and_sparse_optimizer_trains_one_epoch(tiny_config, encoder, sparse, extra):
    config = tiny_config(
        f"{encoder}-{sparse}", train={"epochs": 1}, metrics={"tensorboard": False, "projector_words": 0}
    )
    result = last_json(
        ok(
            cli(
                "train",
                "--config",
                config,
                *FAST,
                "--model.encoder",
                encoder,
                "--optim.sparse",
                sparse,
                "--data.test=",
                *extra,
            )
        ).stdout
    )
    assert result["steps_this_run"] == 10
    accuracy = result["valid"]["accuracy"]
    assert np.isfinite(result["valid"]["loss"])
    if (encoder, sparse) == ("bag", "sparse_adam"):
        assert accuracy > 0.4, result  # chance is 1/3
    state = json.loads(
        next((run_dir_of(config) / "checkpoints").glob("step-10/trainer_state.json")).read_text()
    )
    assert state["encoder"] == encoder
    expected = {
        "sparse_adam": ("SparseAdam", "FastSparseAdam"),
        "sgd": ("SparseSGD",),
        "adagrad": ("Adagrad",),
        "rowwise_adagrad": ("RowWiseAdagrad",),
    }[sparse]
    assert state["optimizers"]["sparse"] in expected


def test_resuming_with_changed_settings_says_so_and_keeps_the_earlier_ones(tiny_config):
    config = tiny_config("changed", train={"max_steps": 10},
                         metrics={"tensorboard": False, "projector_words": 0}, checkpoint={"at_epoch_end": False})
    run = run_dir_of(config)
    ok(cli("train", "--config", config, *FAST))
    resumed = ok(cli("train", "--config", config, *FAST, "--train.max_steps", "20", "--optim.sparse_lr", "0.01"))
    assert last_json(resumed.stdout)["steps_this_run"] == 10
    warning = next(line for line in resumed.stderr.splitlines() if "changed settings" in line)
    assert "resuming at step 10" in warning and "optim.sparse_lr 0.05 -> 0.01" in warning
    assert "train.max_steps 10 -> 20" in warning and "config.until-step-10.toml" in warning
    assert tomllib.loads((run / "config.until-step-10.toml").read_text())["optim"]["sparse_lr"] == 0.05
    assert tomllib.loads((run / "config.toml").read_text())["optim"]["sparse_lr"] == 0.01


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["neighbors", "--run", "r", "--k", "0", "word"], "--k must be >= 1"),
        (["neighbors", "--run", "r", "two words"], "expected one word, got 'two words'"),
        (["predict", "--run", "r", "--input", "/no/such/lines.txt"], "--input: no such file: /no/such/lines.txt"),
        pytest.param(["eval", "--run", "r", "--data", "d.csv", "--device", "cuda"], "--device cuda: torch.cuda",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
        (["predict", "--run", "r", "--input", "/"], "--input: / is a folder"),
        (["eval", "--run", "r", "--data", "d.csv", "--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
    ],
    ids=["neighbors-k", "neighbors-two-words", "predict-input", "eval-device", "predict-input-folder", "eval-device-name"],
)
def test_inference_flag_errors_exit_2_naming_the_flag(args, needle):
    proc = cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in proc.stderr.strip().splitlines()[-1]


def test_an_earlier_result_json_is_dropped_once_a_run_goes_on(tiny_config):
    """A result.json that a run folder holds from before (an earlier run, or before more steps were asked for) must
    not pass for the result of training that then fails or is killed before writing its own."""
    config = tiny_config("stale", train={"max_steps": 4},
                         metrics={"tensorboard": False, "projector_words": 0}, checkpoint={"at_epoch_end": False})
    run = run_dir_of(config)
    ok(cli("train", "--config", config, *FAST))
    (run / "result.json").write_text(json.dumps({"step": 8, "planted": True}))
    failed = cli("train", "--config", config, *FAST, "--train.max_steps", "8", "--optim.dense_lr", "1e30",
                 "--optim.sparse_lr", "1e30")
    assert failed.returncode == 2 and "non-finite" in failed.stderr, failed.stderr
    assert not (run / "result.json").exists()
    again = ok(cli("train", "--config", config, *FAST, "--train.max_steps", "8"))  # not "already finished"
    assert "already finished" not in again.stderr and last_json(again.stdout)["steps_this_run"] == 4


def test_predict_reads_a_pipe_given_as_input(tiny_config, tmp_path):
    config = tiny_config("piped", train={"max_steps": 2}, metrics={"tensorboard": False, "projector_words": 0})
    ok(cli("train", "--config", config, *FAST))
    fifo = tmp_path / "lines"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "predict", "--run", str(run_dir_of(config)),
                             "--input", str(fifo)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with fifo.open("w") as f:
        f.write("the ball and the goal\n")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert len(jsonl(out)) == 1

    # from a pipe that stays open, each line is answered when it comes, not after 512 lines or the end of input
    import select

    proc = subprocess.Popen([sys.executable, "-m", "trainer", "predict", "--run", str(run_dir_of(config))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for text in ("the ball and the goal", "a kernel in python"):
            proc.stdin.write(text + "\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 120)
            assert ready, "no answer while the input stays open"
            assert set(json.loads(proc.stdout.readline())) >= {"label", "score"}
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()


def test_output_cut_short_by_its_reader_ends_quietly(tiny_config, tmp_path):
    """`trainer predict ... | head -1`: the reader leaves while predictions are still coming; the command ends
    with the shell's SIGPIPE status and no traceback (it printed a BrokenPipeError's before)."""
    config = tiny_config("cut", train={"max_steps": 2}, metrics={"tensorboard": False, "projector_words": 0})
    ok(cli("train", "--config", config, *FAST))
    lines = tmp_path / "lines.txt"
    lines.write_text("the ball and the goal\n" * 5000)  # far more output than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "predict", "--run", str(run_dir_of(config)),
                             "--input", str(lines)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # as `head -1` exits
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert json.loads(first)["label"] and "Traceback" not in err and "BrokenPipe" not in err


def test_stdout_holds_only_the_result_json_when_a_run_is_repeated_in_its_folder(tiny_config):
    """A second run in the same folder (checkpoints off) writes the projector at a step whose folder exists:
    tensorboard printed a warning to stdout, ahead of the JSON result, and `| json.loads` failed."""
    config = tiny_config("again", checkpoint={"enabled": False}, train={"max_steps": 2})
    ok(cli("train", "--config", config, *FAST))
    proc = ok(cli("train", "--config", config, *FAST))
    assert json.loads(proc.stdout)["step"] == 2, proc.stdout
    assert (run_dir_of(config) / "tb" / "00002").is_dir()
