"""Bad input, fed to the real CLI: every case exits non-zero with one line `error: ...` naming the file, line,
column or flag, prints no traceback, and leaves an existing run folder and its checkpoints as they were. Inputs
that look odd but are usable (duplicate words, a word2vec binary named .txt, invalid UTF-8 in a word, empty texts,
unseen labels, one enormous document) train, and what was skipped is reported.

One completed tiny run (10 steps, checkpoints at steps 5 and 10) is made per module. Every scenario gets its own
byte-identical copy of it as run.dir (or an empty folder), so the scenarios can run side by side: the module
starts all selected ones on a small pool when it begins (each is a subprocess that mostly imports torch), and each
test then checks its own outcome. A change to a run folder is attributed to the scenario that made it.
"""

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from reliability_support import World, clean_env, debris, last_json, make_world, ok, snapshot, user_error


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("bad-input"))


# ------------------------------------------------------------------------------------------ input builders
def glove_lines(w: World) -> list[str]:
    return w.data["glove"].read_text().splitlines()


def glove_with(w: World, name: str, line_index: int, value_index: int, value: str) -> Path:
    lines = glove_lines(w)
    parts = lines[line_index].split(" ")
    parts[value_index] = value
    lines[line_index] = " ".join(parts)
    return w.file(name, "\n".join(lines) + "\n")


def word2vec_bytes(w: World, header_rows: int | None = None) -> bytes:
    """The shared GloVe table as a word2vec binary (word2vec.c layout: a newline after each record)."""
    rows = [line.split(" ") for line in glove_lines(w)]
    out = [f"{header_rows if header_rows is not None else len(rows)} {len(rows[0]) - 1}\n".encode()]
    for word, *values in rows:
        out.append(word.encode() + b" " + struct.pack(f"<{len(values)}f", *map(float, values)) + b"\n")
    return b"".join(out)


def csv_rows(w: World, split: str = "train") -> list[list[str]]:
    import csv

    with w.data[split].open(newline="") as f:
        return list(csv.reader(f))


def write_rows(w: World, name: str, rows: list[list[str]]) -> Path:
    import csv
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return w.file(name, buf.getvalue())


# Each case: (id, function(world) -> extra flags for `train --config SHARED --run.dir RUN`, needles that the
# error line must contain). A case starting with "--config" replaces the shared config file.
VECTOR_CASES = [
    (
        "vectors-empty",
        lambda w: ["--embeddings.pretrained", w.file("empty.txt", "")],
        ["empty.txt", "empty file"],
    ),
    (
        "vectors-blank-lines-only",
        lambda w: ["--embeddings.pretrained", w.file("blank.txt", "\n \n\t\n")],
        ["blank.txt", "empty file"],
    ),
    (
        "vectors-wrong-width",
        lambda w: [
            "--embeddings.pretrained",
            w.file(
                "width.txt",
                "\n".join(glove_lines(w)[:2] + [glove_lines(w)[2].rsplit(" ", 1)[0]] + glove_lines(w)[3:]),
            ),
        ],
        ["width.txt line 3", "expected 8 values (the width of line 1, the first vector), found 7"],
    ),
    (
        "vectors-non-numeric",
        lambda w: ["--embeddings.pretrained", glove_with(w, "nonnum.txt", 3, 4, "abc")],
        ["nonnum.txt line 4", "'abc' is not a number"],
    ),
    (
        "vectors-nan",
        lambda w: ["--embeddings.pretrained", glove_with(w, "nan.txt", 4, 2, "nan")],
        ["nan.txt line 5", "is NaN"],
    ),
    (
        "vectors-inf",
        lambda w: ["--embeddings.pretrained", glove_with(w, "inf.txt", 5, 8, "-inf")],
        ["inf.txt line 6", "infinite"],
    ),
    (
        "vectors-float32-overflow",
        lambda w: ["--embeddings.pretrained", glove_with(w, "big.txt", 6, 1, "1e39")],
        ["big.txt line 7", "out of float32 range"],
    ),
    (
        "vectors-truncated-word2vec",
        lambda w: [
            "--embeddings.pretrained",
            w.file("cut.bin", word2vec_bytes(w)[: len(word2vec_bytes(w)) // 2]),
        ],
        ["cut.bin record", "truncated"],
    ),
    (
        "vectors-header-count-too-high",
        lambda w: [
            "--embeddings.pretrained",
            w.file("header.vec", f"{len(glove_lines(w)) + 5} 8\n" + "\n".join(glove_lines(w)) + "\n"),
        ],
        ["header.vec line 1", "header says", "rows, file has"],
    ),
    (
        "vectors-word2vec-header-count-too-low",
        lambda w: ["--embeddings.pretrained", w.file("low.bin", word2vec_bytes(w, header_rows=90))],
        ["low.bin record 91", "header says 90 rows, but more data follows"],
    ),
    (
        "vectors-missing",
        lambda w: ["--embeddings.pretrained", w.root / "nowhere.txt"],
        ["nowhere.txt", "no such file"],
    ),
]

DATA_CASES = [
    (
        "data-missing-text-column",
        lambda w: ["--data.text_column", "body"],
        ["train.csv", "no text column 'body'"],
    ),
    (
        "data-missing-label-column",
        lambda w: ["--data.label_column", "topic"],
        ["train.csv", "no label column 'topic'"],
    ),
    (
        "data-valid-missing-label-column",
        lambda w: [
            "--data.valid",
            write_rows(w, "nolabel.csv", [["text", "category"]] + [r for r in csv_rows(w, "valid")[1:]]),
        ],
        ["nolabel.csv", "no label column 'label'", "'category'"],
    ),
    ("data-empty-file", lambda w: ["--data.train", w.file("empty.csv", "")], ["empty.csv", "empty file"]),
    (
        "data-header-only",
        lambda w: ["--data.train", w.file("header.csv", "text,label\n")],
        ["header.csv", "no data rows"],
    ),
    (
        "data-only-empty-texts",
        lambda w: ["--data.train", w.file("blank.csv", 'text,label\n"  ",a\n,b\n')],
        ["blank.csv", "no rows with text", "all 2 texts in column 'text' are null, empty or whitespace"],
    ),
    (
        "data-single-class",
        lambda w: [
            "--data.train",
            write_rows(w, "single.csv", [["text", "label"]] + [[r[0], "sports"] for r in csv_rows(w)[1:]]),
        ],
        ["single.csv", "single class", "'sports'", "need at least 2"],
    ),
    (
        "data-garbage-bytes-csv",
        lambda w: ["--data.train", w.file("noise.csv", bytes(range(256)) * 20)],
        ["noise.csv", "line 2", "not valid UTF-8"],
    ),
    (
        "data-garbage-bytes-jsonl",
        lambda w: ["--data.train", w.file("noise.jsonl", b"\x89PNG\r\n\x1a\n" + bytes(200))],
        ["noise.jsonl", "line 1"],
    ),
    (
        "data-garbage-parquet",
        lambda w: ["--data.train", w.file("noise.parquet", b"PAR1" + os.urandom(500))],
        ["noise.parquet", "not a valid Parquet file"],
    ),
    (
        "data-ragged-csv",
        lambda w: [
            "--data.train",
            w.file("ragged.csv", "text,label\nhello there,a\nsome,more,fields,here\nbye,b\n"),
        ],
        ["ragged.csv", "line 3"],
    ),
    (
        "data-broken-jsonl-line",
        lambda w: [
            "--data.train",
            w.file(
                "broken.jsonl",
                '{"text": "a b", "label": "x"}\n{"text": "c d", "label": "y"}\n{"text": "e f", label}\n',
            ),
        ],
        ["broken.jsonl", "line 3", "not valid JSON"],
    ),
    (
        "data-empty-label",
        lambda w: ["--data.train", w.file("nolabel2.csv", "text,label\nhello,a\nworld,\nbye,b\n")],
        ["nolabel2.csv", "data row 2", "null or empty label"],
    ),
    (
        "data-unsupported-type",
        lambda w: ["--data.train", w.file("table.xlsx", b"PK\x03\x04" + bytes(100))],
        ["table.xlsx", "unsupported file type"],
    ),
]

CONFIG_CASES = [
    ("config-unknown-key", lambda w: ["--train.nosuch", "1"], ["train.nosuch", "unknown key"]),
    ("config-unknown-section", lambda w: ["--trian.epochs", "1"], ["trian.epochs", "unknown section"]),
    (
        "config-unknown-key-in-file",
        lambda w: ["--config", w.file("bogus.toml", "[train]\nbogus = 1\n")],
        ["train.bogus", "bogus.toml"],
    ),
    (
        "config-wrong-type",
        lambda w: ["--train.epochs", "abc"],
        ["train.epochs", "expected an integer", "'abc'"],
    ),
    (
        "config-wrong-type-in-file",
        lambda w: ["--config", w.file("type.toml", '[optim]\ndense_lr = "fast"\n')],
        ["optim.dense_lr", "expected a number"],
    ),
    ("config-zero-lr", lambda w: ["--optim.sparse_lr", "0"], ["optim.sparse_lr", "must be > 0"]),
    (
        "config-negative-lr",
        lambda w: ["--optim.dense_lr", "-0.1"],
        ["optim.dense_lr", "must be > 0, got -0.1"],
    ),
    (
        "config-lstm-with-bigrams",
        lambda w: ["--model.encoder", "lstm", "--embeddings.ngram_buckets", "64"],
        ["embeddings.ngram_buckets", "lstm"],
    ),
    (
        "config-unfreeze-with-unfrozen",
        lambda w: ["--embeddings.freeze_pretrained", "false", "--embeddings.unfreeze_after_steps", "3"],
        ["embeddings.unfreeze_after_steps", "freeze_pretrained"],
    ),
    (
        "config-invalid-toml",
        lambda w: ["--config", w.file("broken.toml", "[train\nepochs = 2\n")],
        ["broken.toml", "invalid TOML", "line 1"],
    ),
    ("config-file-missing", lambda w: ["--config", w.root / "nope.toml"], ["nope.toml", "file not found"]),
    ("config-flag-without-value", lambda w: ["--train.epochs"], ["--train.epochs", "missing value"]),
    (
        "run-dir-other-vocabulary",
        lambda w: ["--embeddings.max_vocab", "20"],
        ["run.dir", "cannot resume", "vocabulary"],
    ),
    (
        "run-dir-other-pretrained-table",
        lambda w: ["--embeddings.pretrained", glove_with(w, "other.txt", 0, 1, "0.125")],
        ["run.dir", "cannot resume", "pretrained table differs", "other.txt"],
    ),
    (
        "run-dir-other-tables",
        lambda w: ["--model.encoder", "masked_bag"],
        ["run.dir", "cannot resume", "embedding tables differ"],
    ),
    ("run-dir-resume-never", lambda w: ["--train.resume", "never"], ["run.dir", "train.resume = never"]),
]


# ------------------------------------------------------------------------------------------ scenarios
RUN = "<run>"  # stands for the scenario's run folder in an argv


@dataclass(frozen=True)
class Scenario:
    argv: Callable[[World], list]  # CLI arguments after `python -m trainer`
    start: str = "copy"  # "copy": a copy of the completed run; "empty": an empty folder
    damage: Callable[[Path], None] | None = None  # applied to the run folder before the command
    stdin: str | None = None


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    run: Path
    before: dict[str, str]  # snapshot of the run folder (all but its data cache) just before the command


def train(*flags) -> Callable[[World], list]:
    return lambda w: ["train", "--config", w.config, "--run.dir", RUN, *flags]


def train_case(make_flags) -> Callable[[World], list]:
    def argv(w: World) -> list:
        flags = make_flags(w)
        if str(flags[0]) == "--config":  # a config file of its own, pointed at the run and the good data
            return ["train", *flags, "--run.dir", RUN, "--data.train", w.data["train"]]
        return ["train", "--config", w.config, "--run.dir", RUN, *flags]

    return argv


ERROR_CASES: dict[str, tuple[Scenario, list[str]]] = {
    i: (Scenario(train_case(f)), needles) for i, f, needles in VECTOR_CASES + DATA_CASES + CONFIG_CASES
}
ERROR_CASES |= {
    "eval-no-model": (
        Scenario(lambda w: ["eval", "--run", RUN, "--data", w.data["test"]], start="empty"),
        ["--run", "no exported model"],
    ),
    "predict-no-model": (
        Scenario(lambda w: ["predict", "--run", RUN], start="empty", stdin="goal team\n"),
        ["--run", "no exported model"],
    ),
    "neighbors-no-model": (
        Scenario(lambda w: ["neighbors", "--run", RUN, "goal"], start="empty"),
        ["--run", "no exported model"],
    ),
    "eval-bad-data": (
        Scenario(lambda w: ["eval", "--run", RUN, "--data", w.file("e.jsonl", '{"text": 1}\n')]),
        ["e.jsonl", "no label column 'label'"],
    ),
    # a model folder copied incompletely: model.json's recorded sizes name the file (_truncate is defined below)
    "predict-truncated-weights": (
        Scenario(lambda w: ["predict", "--run", RUN], stdin="goal team\n",
                 damage=lambda run: _truncate(run / "model" / "weights.pt")),
        ["weights.pt", "bytes, the export wrote", "the model folder is incomplete"],
    ),
    "eval-missing-frozen-rows": (
        Scenario(lambda w: ["eval", "--run", RUN, "--data", w.data["test"]],
                 damage=lambda run: (run / "model" / "frozen.npy").unlink()),
        ["frozen.npy: missing", "the model folder is incomplete"],
    ),
    "neighbors-unknown-word": (
        Scenario(lambda w: ["neighbors", "--run", RUN, "qqqzzz"]),
        ["'qqqzzz' is not in the vocabulary"],
    ),
}


def _unseen_test_file(w: World) -> Path:
    return write_rows(
        w, "unseen.csv", csv_rows(w, "test") + [["engine wheels motor", "autos"], ["truck", "autos"]]
    )


def _oddities(w: World) -> list:
    """One fresh run over every usable oddity at once: blank texts and one enormous (~5 MB) document in the
    training data, a label the training data never had in the validation data, a word with invalid UTF-8."""
    rows = csv_rows(w)
    blanks = [["", "food"], ["   ", "tech"], ["\t \n ", "sports"]]
    words = np.array(["goal", "team", "match", "the", "of", "ball"])
    huge = " ".join(words[np.random.default_rng(0).integers(0, len(words), 1_000_000)])
    train_file = write_rows(w, "oddities.csv", rows[:1] + blanks + rows[1:] + blanks + [[huge, "sports"]])
    valid = write_rows(w, "valid-unseen.csv", csv_rows(w, "valid") + [["engine wheels", "autos"]])
    vectors = w.file("latin1.txt", w.data["glove"].read_bytes() + b"caf\xe9\xff" + b" 0.25" * 8 + b"\n")
    return [
        "train",
        "--config",
        w.config,
        "--run.dir",
        RUN,
        "--train.epochs",
        "1",
        "--data.test=",
        "--metrics.tensorboard",
        "false",
        "--data.train",
        train_file,
        "--data.valid",
        valid,
        "--embeddings.pretrained",
        vectors,
    ]


def _duplicates(w: World) -> Path:
    lines = glove_lines(w)
    return w.file("duplicates.txt", "\n".join(lines + [lines[0].split(" ")[0] + " 0.5" * 8]) + "\n")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scribble(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _in_step(step: int, name: str, damage: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda run: damage(run / "checkpoints" / f"step-{step}" / name)


def _partial_step(step: int) -> Callable[[Path], None]:
    def make(run: Path) -> None:
        folder = run / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / "__0_0.distcp").write_bytes(b"half a shard")  # no .metadata, no trainer_state.json

    return make


MORE_EPOCHS = ("--train.epochs", "3")  # the copied run is complete at step 10; 3 epochs are 15 steps
SCENARIOS: dict[str, Scenario] = {i: s for i, (s, _) in ERROR_CASES.items()} | {
    "eval-unseen-labels": Scenario(lambda w: ["eval", "--run", RUN, "--data", _unseen_test_file(w)]),
    "vectors-duplicate-words": Scenario(
        lambda w: [*train(*MORE_EPOCHS)(w), "--embeddings.pretrained", _duplicates(w)]
    ),
    "vectors-word2vec-binary-named-txt": Scenario(
        lambda w: [
            *train(*MORE_EPOCHS)(w),
            "--embeddings.pretrained",
            w.file("word2vec.txt", word2vec_bytes(w)),
        ]
    ),
    "vectors-text-named-bin": Scenario(
        lambda w: [
            *train(*MORE_EPOCHS)(w),
            "--embeddings.pretrained",
            w.file("glove.bin", w.data["glove"].read_bytes()),
        ]
    ),
    "usable-oddities": Scenario(_oddities, start="empty"),
    "checkpoint-partial-step": Scenario(train(*MORE_EPOCHS), damage=_partial_step(12)),
    "checkpoint-truncated-shard": Scenario(
        train(*MORE_EPOCHS), damage=_in_step(10, "__0_0.distcp", _truncate)
    ),
    "checkpoint-flipped-byte": Scenario(train(*MORE_EPOCHS), damage=_in_step(10, "__0_0.distcp", _flip_byte)),
    "checkpoint-garbage-metadata": Scenario(train(*MORE_EPOCHS), damage=_in_step(10, ".metadata", _scribble)),
    "checkpoint-garbage-trainer-state": Scenario(
        train(*MORE_EPOCHS),
        damage=_in_step(10, "trainer_state.json", lambda p: p.write_text('{"step": 10, ')),
    ),
    "checkpoint-none": Scenario(
        train("--train.epochs", "1", "--data.test=", "--metrics.tensorboard", "false"),
        start="empty",
        damage=_partial_step(3),
    ),
    "training-non-finite-loss": Scenario(
        train(*MORE_EPOCHS, "--optim.sparse_lr", "1e30", "--optim.dense_lr", "1e30")
    ),
}
WORKERS = (os.cpu_count() or 2) + 1  # the commands mostly import torch: overlap them a little


def _launch(world: World, name: str) -> Outcome:
    scenario = SCENARIOS[name]
    run = world.root / "scenarios" / name
    if scenario.start == "copy":
        shutil.copytree(world.run, run)
    else:
        run.mkdir(parents=True)
    if scenario.damage is not None:
        scenario.damage(run)
    argv = [run if a == RUN else a for a in scenario.argv(world)]
    before = snapshot(run)
    return Outcome(world.cli(*argv, stdin=scenario.stdin), run, before)


@pytest.fixture(scope="module")
def outcomes(world, request) -> dict[str, Future]:
    """Start every scenario the selected tests of this module need, side by side; each test waits for its own."""
    wanted = [
        item.callspec.params["scenario"]
        for item in request.session.items
        if item.module is request.module and hasattr(item, "callspec") and "scenario" in item.callspec.params
    ]
    original = snapshot(world.run)
    pool = ThreadPoolExecutor(WORKERS)
    futures = {name: pool.submit(_launch, world, name) for name in dict.fromkeys(wanted)}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)
    assert snapshot(world.run) == original, "the shared run changed"


def outcome(outcomes: dict[str, Future], name: str) -> Outcome:
    return outcomes[name].result(timeout=900)


# ------------------------------------------------------------------------------------------ the error matrix
@pytest.mark.parametrize("scenario", list(ERROR_CASES))
def test_bad_input_is_one_line_and_leaves_the_run_alone(world, outcomes, scenario):
    result = outcome(outcomes, scenario)
    message = user_error(result.proc, *ERROR_CASES[scenario][1])
    print(message)
    assert snapshot(result.run) == result.before, "the run folder changed"
    assert debris(result.run) == []


@pytest.mark.parametrize("scenario", ["training-non-finite-loss"])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(world, outcomes, scenario):
    result = outcome(outcomes, scenario)
    checkpoints = result.run / "checkpoints"
    message = user_error(result.proc, "non-finite loss", "step 10", str(checkpoints), "optim.sparse_lr")
    print(message)
    assert snapshot(checkpoints) == {
        k.removeprefix("checkpoints/"): v for k, v in result.before.items() if k.startswith("checkpoints/")
    }


# ------------------------------------------------------------------------------------------ usable oddities
@pytest.mark.parametrize("scenario", ["eval-unseen-labels"])
def test_unseen_labels_are_reported_and_count_as_errors_in_eval(world, outcomes, scenario):
    proc = ok(outcome(outcomes, scenario).proc)
    summary = last_json(proc.stdout)
    assert summary["unseen_label_docs"] == 2 and summary["n"] == 62
    known = json.loads((world.run / "result.json").read_text())["test"]  # the same model on the 60 known docs
    assert summary["accuracy"] == pytest.approx(known["accuracy"] * 60 / 62)  # both unseen docs are errors
    assert "2 documents have labels never seen in training (counted as errors): autos" in proc.stderr


@pytest.mark.parametrize(
    ("scenario", "log"),
    [
        pytest.param("vectors-duplicate-words", "(1 duplicates skipped", id="vectors-duplicate-words"),
        pytest.param(
            "vectors-word2vec-binary-named-txt",
            "(0 duplicates skipped",
            id="vectors-word2vec-binary-named-txt",
        ),
        pytest.param("vectors-text-named-bin", "(0 duplicates skipped", id="vectors-text-named-bin"),
    ],
)
def test_vector_files_that_still_work_resume_the_same_table(outcomes, scenario, log):
    """Detection is by content, and the first occurrence of a duplicated word wins: each file gives the shared
    run's exact table (same fingerprint), so a copy of the run resumes from it and trains 5 more steps."""
    proc = ok(outcome(outcomes, scenario).proc)
    assert log in proc.stderr
    assert "resumed from step 10" in proc.stderr
    assert last_json(proc.stdout)["steps_this_run"] == 5


@pytest.mark.parametrize("scenario", ["usable-oddities"])
def test_blank_texts_unseen_labels_invalid_utf8_and_a_huge_document_train(outcomes, scenario):
    proc = ok(outcome(outcomes, scenario).proc)
    log = proc.stderr
    assert "301 documents (6 empty skipped)" in log  # blank and whitespace-only texts: skipped, counted
    assert "1 documents have labels never seen in training (autos); they count as errors" in log
    assert "1 words with invalid UTF-8 bytes replaced" in log
    result = last_json(proc.stdout)
    assert result["steps_this_run"] == 5  # the enormous document is one (truncated) document of 301
    assert result["valid"]["n"] == 61


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("scenario", ["checkpoint-partial-step"])
def test_partial_step_folder_is_ignored(outcomes, scenario):
    result = outcome(outcomes, scenario)
    proc = ok(result.proc)
    assert "resumed from step 10" in proc.stderr
    assert last_json(proc.stdout)["steps_this_run"] == 5
    assert sorted(p.name for p in (result.run / "checkpoints").iterdir()) == ["step-10", "step-15"]  # pruned


@pytest.mark.parametrize(
    ("scenario", "reason"),
    [
        pytest.param(
            "checkpoint-truncated-shard", "could not be loaded (rank 0: ", id="checkpoint-truncated-shard"
        ),
        pytest.param(
            "checkpoint-flipped-byte", "could not be loaded (rank 0: ", id="checkpoint-flipped-byte"
        ),
        pytest.param(
            "checkpoint-garbage-metadata", "could not be loaded (rank 0: ", id="checkpoint-garbage-metadata"
        ),
        pytest.param(
            "checkpoint-garbage-trainer-state",
            "trainer_state.json is corrupt",
            id="checkpoint-garbage-trainer-state",
        ),
    ],
)
def test_corrupted_checkpoint_is_refused_and_the_previous_one_used(outcomes, scenario, reason):
    proc = ok(outcome(outcomes, scenario).proc)
    # (the scenario resumes with more epochs, which the trainer also warns about)
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line and "changed settings" not in line]
    assert len(warnings) == 1, proc.stderr  # one line, no DCP traceback
    assert "step-10" in warnings[0] and reason in warnings[0] and "trying an older one" in warnings[0], (
        warnings
    )
    print(warnings[0])
    assert "resumed from step 5" in proc.stderr
    assert last_json(proc.stdout)["steps_this_run"] == 10


@pytest.mark.parametrize("scenario", ["checkpoint-none"])
def test_no_checkpoint_starts_from_scratch(outcomes, scenario):
    result = outcome(outcomes, scenario)
    proc = ok(result.proc)
    assert "resumed" not in proc.stderr
    assert last_json(proc.stdout)["steps_this_run"] == 5
    assert sorted(p.name for p in (result.run / "checkpoints").iterdir()) == ["step-5"]  # debris pruned


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_checkpoint_from_two_processes_resumes_in_one(world, outcomes, tmp_path):
    """A real 2-process torchrun (gloo) writes step 5 with world_size 2; one process resumes it (DCP reshards).
    Runs after the pool's scenarios (it asks for `outcomes` first) so the two workers are not starved."""
    for future in outcomes.values():
        future.exception(timeout=900)
    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "trainer",
        "train",
        "--config",
        str(world.config),
        "--run.dir",
        str(run),
        "--train.epochs",
        "1",
        "--data.test=",
        "--metrics.tensorboard",
        "false",
    ]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=clean_env(world.root, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"),
    )
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, err[-4000:]
    state = json.loads((run / "checkpoints" / "step-5" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    resumed = ok(
        world.train("--run.dir", run, "--train.epochs", "2", "--data.test=", "--metrics.tensorboard", "false")
    )
    assert "resumed from step 5 (saved by world size 2" in resumed.stderr
    assert last_json(resumed.stdout)["steps_this_run"] == 5


# ------------------------------------------------------------------------------------------ out of memory
@pytest.fixture
def restore_torch_threads():
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("error", "after_steps"),
    [
        (lambda: __import__("torch").OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), 0),
        (
            lambda: RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                "you tried to allocate 400000000000 bytes"
            ),
            6,
        ),
        (lambda: MemoryError(), 0),
    ],
    ids=["cuda-oom", "cpu-allocator-after-a-checkpoint", "memory-error"],
)
def test_out_of_memory_names_the_batch_settings(
    world, tmp_path, monkeypatch, capsys, restore_torch_threads, error, after_steps
):
    """A real OOM is impractical on a CI machine: the model's forward raises one, in-process, through the CLI."""
    from trainer.cli import main
    from trainer.model import TextClassifier

    calls = {"n": 0}
    forward = TextClassifier.forward

    def exploding_forward(self, *args, **kwargs):
        calls["n"] += 1
        if self.training and calls["n"] > after_steps:
            raise error()
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(TextClassifier, "forward", exploding_forward)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            str(world.config),
            "--run.dir",
            str(run),
            "--data.test=",
            "--data.valid=",
            "--metrics.tensorboard",
            "false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("error: out of memory during training"), err
    assert "train.batch_size (now 64)" in last and "train.tokens_per_batch" in last
    if after_steps:
        assert f"step 5, is kept in {run / 'checkpoints'}" in last
    else:
        assert "No checkpoint had been saved yet" in last
    print(last)
