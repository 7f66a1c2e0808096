"""Checkpoints through the real Trainer: exact round trip of model and optimizer state, partial folders,
pruning, falling back past a corrupted checkpoint, and refusing to resume an incompatible run."""

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch

from trainer.checkpoint import STATE_FILE, Checkpointer, ResumeError, valid_steps
from trainer.config import CheckpointConfig, load_config
from trainer.distributed import DistInfo
from trainer.metrics import RESUMED_AT_STEP
from trainer.report import read_metrics
from trainer.tabular import DataError
from trainer.trainer import Trainer

INFO = DistInfo(0, 0, 1, torch.device("cpu"), "none")
QUIET = {"metrics": {"tensorboard": False, "projector_words": 0, "log_every_steps": 1000}}


@pytest.fixture
def quick_config(tiny_config):
    """A tiny run without validation/test/TensorBoard: only what checkpoints need."""

    def make(name: str = "run", **sections) -> Path:
        merged = {"train": {"max_steps": 4, "threads": 1}, **QUIET}
        for section, values in sections.items():
            merged[section] = {**merged.get(section, {}), **values}
        # conftest's tiny_config cannot take a `data` section (its first parameter is called `data`)
        path = tiny_config(name, **merged)
        doc = tomllib.loads(path.read_text())
        doc["data"].update(valid="", test="")
        path.write_text(tomli_w.dumps(doc))
        return path

    return make


def make_trainer(path: Path, *overrides: str) -> Trainer:
    return Trainer(load_config(path, list(overrides)), INFO)


def loaded_fresh(path: Path, *overrides: str) -> tuple[Trainer, dict, dict | None]:
    """A fresh trainer whose state is loaded from the newest checkpoint, exactly as fit() does it."""
    t = make_trainer(path, *overrides)
    t.build()
    t.optim.init_state()
    state = t.state()
    saved = t.checkpointer.load_latest(state, t.check_resumable)
    return t, state, saved


def flat(state: dict) -> dict[str, torch.Tensor]:
    return {f"{section}/{k}": v for section, d in state.items() for k, v in d.items()}


def test_round_trip_restores_model_and_every_optimizer_state_exactly(quick_config):
    # freeze_pretrained=false: a `pretrained` optimizer as well as `dense` (AdamW) and `sparse` (SparseAdam)
    path = quick_config(embeddings={"ngram_buckets": 64, "freeze_pretrained": False})
    first = make_trainer(path)
    result = first.fit()
    assert result["step"] == 4
    want = flat(first.state())
    assert set(first.optim.optimizers) == {"dense", "sparse", "pretrained"}
    assert type(first.optim.optimizers["sparse"]).__name__ in ("SparseAdam", "FastSparseAdam")
    for key in (
        "optim/sparse/tables.bags.oov.weight/exp_avg",
        "optim/sparse/tables.bags.oov.weight/exp_avg_sq",
        "optim/sparse/tables.bags.oov.weight/step",
        "optim/sparse/tables.bags.bigram.weight/exp_avg",
        "optim/pretrained/tables.bags.pretrained_delta.weight/exp_avg",
        "optim/dense/dense.head.out.weight/exp_avg",
        "optim/dense/dense.head.out.weight/exp_avg_sq",
        "optim/dense/dense.head.out.weight/step",
        "model/tables.bags.oov.weight",
        "model/dense.head.out.weight",
    ):
        assert key in want, key
    assert int(want["optim/sparse/tables.bags.oov.weight/step"]) == 4
    assert want["optim/sparse/tables.bags.oov.weight/exp_avg"].abs().sum() > 0

    fresh = make_trainer(path)
    fresh.build()
    fresh.optim.init_state()
    state = fresh.state()
    before = flat(state)
    assert before["optim/sparse/tables.bags.oov.weight/exp_avg"].abs().sum() == 0  # nothing loaded yet
    saved = fresh.checkpointer.load_latest(state, fresh.check_resumable)
    assert saved is not None and saved["step"] == 4 and saved["world_size"] == 1
    got = flat(state)
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key
    # loaded in place: the live parameters and optimizer states are the loaded values
    oov = fresh.model.tables.bags["oov"].weight
    assert torch.equal(oov, want["model/tables.bags.oov.weight"])
    assert torch.equal(
        fresh.optim.optimizers["sparse"].state[oov]["exp_avg"],
        want["optim/sparse/tables.bags.oov.weight/exp_avg"],
    )
    head = fresh.model.dense.head.out.weight
    assert torch.equal(
        fresh.optim.optimizers["dense"].state[head]["exp_avg_sq"],
        want["optim/dense/dense.head.out.weight/exp_avg_sq"],
    )
    assert fresh.checkpointer.last_saved_step == 4


@pytest.mark.parametrize("sparse", ["sgd", "adagrad", "rowwise_adagrad"])
def test_round_trip_other_sparse_optimizers(quick_config, sparse):
    path = quick_config(optim={"sparse": sparse}, train={"max_steps": 3})
    first = make_trainer(path)
    first.fit()
    want = flat(first.state())
    _, state, saved = loaded_fresh(path)
    assert saved["step"] == 3
    got = flat(state)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_checkpoint_never_contains_the_frozen_table(quick_config, tiny_data):
    path = quick_config()
    t = make_trainer(path)
    t.fit()
    keys = flat(t.state())
    assert not any("frozen" in k or k.startswith("model/tables.pretrained") for k in keys)
    folder = Path(t.run_dir) / "checkpoints" / "step-4"
    meta = json.loads((folder / STATE_FILE).read_text())
    assert meta["pretrained_fingerprint"] == t.pretrained.fingerprint
    assert meta["step"] == 4 and meta["tokens_seen"] > 0


def test_partial_step_folder_is_ignored(quick_config):
    path = quick_config()
    t = make_trainer(path)
    t.fit()
    ckpts = Path(t.run_dir) / "checkpoints"
    # crash after DCP wrote everything but before trainer_state.json
    shutil.copytree(ckpts / "step-4", ckpts / "step-100")
    (ckpts / "step-100" / STATE_FILE).unlink()
    # crash before .metadata
    (ckpts / "step-200").mkdir()
    (ckpts / "step-200" / STATE_FILE).write_text(json.dumps({"step": 200}))
    (ckpts / "not-a-step").mkdir()
    assert valid_steps(ckpts) == [4]
    _, _, saved = loaded_fresh(path)
    assert saved["step"] == 4


def tiny_state(value: float) -> dict:
    return {"model": {"w": torch.full((64, 8), value)}, "optim": {"s": torch.tensor(value * 10)}}


def test_keep_latest_k_prunes_old_and_partial_folders(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep_latest_k=2), INFO)
    ck.save(1, tiny_state(1), {"step": 1})
    ck.save(2, tiny_state(2), {"step": 2})
    (ck.folder / "step-3").mkdir()  # partial: older than the next valid one, so debris
    ck.save(4, tiny_state(4), {"step": 4})
    assert valid_steps(ck.folder) == [2, 4]
    assert sorted(p.name for p in ck.folder.iterdir()) == ["step-2", "step-4"]
    ck.save(5, tiny_state(5), {"step": 5})
    assert valid_steps(ck.folder) == [4, 5]
    state = tiny_state(0)
    assert ck.load_latest(state, lambda s: None)["step"] == 5
    assert torch.equal(state["model"]["w"], torch.full((64, 8), 5.0))
    assert float(state["optim"]["s"]) == 50.0


def test_keep_latest_one(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep_latest_k=1), INFO)
    for step in (3, 6, 9):
        ck.save(step, tiny_state(step), {"step": step})
    assert valid_steps(ck.folder) == [9]


def test_single_process_save_and_load_do_not_warn(tmp_path):
    # DCP warns on every save and load without a process group; users would see it after every checkpoint
    ck = Checkpointer(tmp_path, CheckpointConfig(), INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ck.save(1, tiny_state(1), {"step": 1})
        state = tiny_state(0)
        assert ck.load_latest(state, lambda s: None)["step"] == 1
    assert torch.equal(state["model"]["w"], torch.full((64, 8), 1.0))
    assert [str(w.message) for w in caught if "torch.distributed" in str(w.message)] == []


def test_save_policy():
    ck = Checkpointer(Path("/nonexistent"), CheckpointConfig(every_steps=5, at_epoch_end=False), INFO)
    assert [s for s in range(1, 16) if ck.should_save(s, epoch_end=s % 4 == 0, final=s == 15)] == [5, 10, 15]
    ck = Checkpointer(Path("/nonexistent"), CheckpointConfig(every_steps=0, at_epoch_end=True), INFO)
    assert [s for s in range(1, 13) if ck.should_save(s, epoch_end=s % 4 == 0, final=s == 12)] == [4, 8, 12]
    assert not ck.should_save(0, epoch_end=True, final=True)
    ck.last_saved_step = 8
    assert not ck.should_save(8, epoch_end=True, final=False)


def truncate_shards(folder: Path) -> None:
    shards = list(folder.glob("*.distcp"))
    assert shards
    for shard in shards:
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 3])


def test_corrupted_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep_latest_k=3), INFO)
    ck.save(1, tiny_state(1), {"step": 1})
    ck.save(2, tiny_state(2), {"step": 2})
    truncate_shards(ck.folder / "step-2")
    state = tiny_state(0)
    fresh = Checkpointer(tmp_path, CheckpointConfig(keep_latest_k=3), INFO)
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        saved = fresh.load_latest(state, lambda s: None)
    assert saved == {"step": 1}
    assert torch.equal(state["model"]["w"], torch.full((64, 8), 1.0))
    assert float(state["optim"]["s"]) == 10.0
    assert fresh.last_saved_step == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-2" in w and "could not be loaded" in w for w in warnings), warnings


def test_pruning_after_a_fallback_drops_the_unloadable_checkpoint_not_the_one_resumed_from(tmp_path, caplog):
    """Resumed from step 2 past a broken step 3, the next save (step 4) must leave [2, 4] with keep_latest_k=2: the
    broken step 3 counted among the newest two and step 2, the good one, was deleted."""
    ck = Checkpointer(tmp_path, CheckpointConfig(keep_latest_k=3), INFO)
    for step in (1, 2, 3):
        ck.save(step, tiny_state(step), {"step": step})
    truncate_shards(ck.folder / "step-3")
    resumed = Checkpointer(tmp_path, CheckpointConfig(keep_latest_k=2), INFO)
    assert resumed.load_latest(tiny_state(0), lambda s: None) == {"step": 2}
    assert valid_steps(ck.folder) == [1, 2, 3]  # nothing removed before the run saves
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        resumed.save(4, tiny_state(4), {"step": 4})
    assert valid_steps(ck.folder) == [2, 4]
    assert (ck.folder / "step-3.unloadable" / "trainer_state.json").is_file()  # set aside, not deleted
    assert any("step-3" in r.getMessage() and "could not be loaded" in r.getMessage() for r in caplog.records)
    resumed.save(5, tiny_state(5), {"step": 5})  # later saves prune by count alone
    assert valid_steps(ck.folder) == [4, 5]


def test_all_checkpoints_corrupted_is_refused_and_nothing_removed(tmp_path, caplog):
    """Starting over beside checkpoints that no longer load would prune them (a transient read error on a shared
    file system, a partial copy): the user decides, with every folder still there."""
    ck = Checkpointer(tmp_path, CheckpointConfig(), INFO)
    ck.save(1, tiny_state(1), {"step": 1})
    ck.save(2, tiny_state(2), {"step": 2})
    for step in (1, 2):
        truncate_shards(ck.folder / f"step-{step}")
    (ck.folder / "step-2" / "trainer_state.json").write_text("{")
    with pytest.raises(ResumeError, match=r"none of the 2 checkpoints in .*checkpoints could be loaded "
                                          r"\(step-2: trainer_state.json is corrupt .*; step-1: .*\); to start over"):
        Checkpointer(tmp_path, CheckpointConfig(), INFO).load_latest(tiny_state(0), lambda s: None)
    assert valid_steps(ck.folder) == [1, 2]


def test_trainer_resumes_from_previous_checkpoint_when_newest_is_corrupted(quick_config, caplog):
    path = quick_config(checkpoint={"every_steps": 2, "at_epoch_end": False, "keep_latest_k": 3})
    t = make_trainer(path)
    t.fit()
    ckpts = Path(t.run_dir) / "checkpoints"
    assert valid_steps(ckpts) == [2, 4]
    truncate_shards(ckpts / "step-4")
    with caplog.at_level(logging.WARNING, logger="trainer.checkpoint"):
        result = make_trainer(path).fit()
    assert result["step"] == 4 and result["steps_this_run"] == 2
    assert any("step-4" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert valid_steps(ckpts) == [2, 4]  # step 4 was written again, whole this time
    _, _, saved = loaded_fresh(path)
    assert saved["step"] == 4


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (["--embeddings.max_vocab", "10"], "vocabulary or label set differs"),
        (["--optim.sparse", "adagrad"], "optimizers differ"),
        (["--model.encoder", "lstm", "--model.lstm_hidden", "4"], "model.encoder differs"),
        (["--embeddings.char_ngrams", "32"], "embedding tables differ"),
        # the dense part's shape: DCP would report it as an unreadable checkpoint, and the run restart from 0
        (["--model.hidden", "8"], r"differs in shape \(model/dense.head"),
    ],
)
def test_incompatible_run_raises_resume_error_naming_the_reason(quick_config, overrides, reason):
    path = quick_config()
    make_trainer(path).fit()
    with pytest.raises(ResumeError, match=reason) as exc:
        loaded_fresh(path, *overrides)
    assert "cannot resume" in str(exc.value)


def test_changed_pretrained_vectors_raise_resume_error(quick_config, tiny_data):
    path = quick_config()
    make_trainer(path).fit()
    glove = tiny_data["glove"]
    lines = glove.read_text().splitlines()
    word, *values = lines[0].split()
    lines[0] = " ".join([word, *(f"{float(v) + 1:.5f}" for v in values)])
    glove.write_text("\n".join(lines) + "\n")
    with pytest.raises(ResumeError, match="pretrained table differs"):
        make_trainer(path).fit()


def test_resume_never_refuses_an_existing_run(quick_config):
    path = quick_config()
    make_trainer(path).fit()
    with pytest.raises(ResumeError, match="train.resume = never"):
        make_trainer(path, "--train.resume", "never").fit()


def test_resume_never_refuses_a_finished_run_without_checkpoints(quick_config, caplog):
    """checkpoint.enabled = false leaves result.json and model/ only: train.resume = never must not overwrite them,
    and the default (auto) says that it starts over."""
    path = quick_config(checkpoint={"enabled": False})
    make_trainer(path).fit()
    run_dir = Path(make_trainer(path).run_dir)
    result = (run_dir / "result.json").read_text()
    with pytest.raises(ResumeError, match="already holds a finished run .* train.resume = never"):
        make_trainer(path, "--train.resume", "never").fit()
    assert (run_dir / "result.json").read_text() == result
    with caplog.at_level(logging.WARNING, logger="trainer"):
        make_trainer(path).fit()
    assert any("holds a finished run's result.json but no checkpoint" in r.getMessage() for r in caplog.records)


def test_a_run_dir_in_use_by_another_process_is_refused(quick_config, tmp_path):
    """A second training process on the same run.dir stops before it writes there (RunDirLock, a flock on the
    folder, which writes nothing itself); the lock goes with the process that held it."""
    path = quick_config()
    run_dir = Path(make_trainer(path).run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ready, release = tmp_path / "ready", tmp_path / "release"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(run_dir)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        f"while not os.path.exists({str(release)!r}): time.sleep(0.05)\n")])
    try:
        for _ in range(200):
            if ready.exists():
                break
            time.sleep(0.05)
        with pytest.raises(ResumeError, match=r"is in use by another training process; wait for it to end"):
            make_trainer(path).fit()
        assert list(run_dir.iterdir()) == []  # nothing written: no metrics, no events, no lock file
    finally:
        release.touch()
        holder.wait(timeout=30)
    assert make_trainer(path).fit()["steps_this_run"] == 4


def _lock_taken_by_another_process(run_dir: Path) -> bool:
    code = ("import fcntl, os, sys\n"
            f"fd = os.open({str(run_dir)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n")
    return subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_the_run_dir_stays_locked_through_a_second_build_and_is_free_after_fit(quick_config):
    """POSIX locks belong to the process: a second RunDirLock on the same file (fit() builds again after a caller's
    build(); two Trainers in one process) must not drop the first one's lock when it goes."""
    import gc

    from trainer.run_control import RunDirLock

    path = quick_config()
    trainer = make_trainer(path)
    trainer.build()
    run_dir = Path(trainer.run_dir)
    assert not _lock_taken_by_another_process(run_dir)
    second = make_trainer(path)
    second.build()
    del second
    gc.collect()
    assert not _lock_taken_by_another_process(run_dir)  # the first Trainer's lock is still there
    trainer.fit()
    assert _lock_taken_by_another_process(run_dir)  # released when fit returned
    # a forked worker (tokenizing) does not keep the lock alive after the trainer lets go of it
    again = make_trainer(path)
    again.build()
    child = os.fork()
    if child == 0:
        time.sleep(3)
        os._exit(0)
    try:
        again.run_lock.release()
        assert _lock_taken_by_another_process(run_dir)
    finally:
        os.waitpid(child, 0)
    a_file = run_dir / "afile"
    a_file.write_text("x")
    with pytest.raises(ResumeError, match="cannot open it to lock it"):  # a message, not an OSError traceback
        RunDirLock(a_file, INFO)


def test_resume_after_finish_runs_no_steps(quick_config):
    path = quick_config()
    first = make_trainer(path).fit()
    run_dir = Path(make_trainer(path).run_dir)
    logged = (run_dir / "metrics.jsonl").read_text()
    again = make_trainer(path).fit()  # finished: its result stands, nothing is trained, evaluated or written
    assert again == first and again["steps_this_run"] == 4
    assert json.loads((run_dir / "result.json").read_text()) == first
    assert (run_dir / "metrics.jsonl").read_text() == logged
    (run_dir / "result.json").unlink()  # as if killed during its final evaluation: that part runs again
    redone = make_trainer(path).fit()
    assert redone["step"] == 4 and redone["steps_this_run"] == 0
    assert json.loads((run_dir / "result.json").read_text()) == redone
    w = torch.load(run_dir / "model" / "weights.pt", weights_only=True)
    assert all(np.isfinite(v.numpy()).all() for v in w.values())


@pytest.mark.parametrize(
    "overrides",
    [
        ["--model.hidden", "8", "--model.dropout", "0.3", "--train.class_weights", "inverse_log"],
        [
            "--embeddings.unfreeze_after_steps",
            "4",
            "--embeddings.ngram_buckets",
            "32",
        ],  # unfreezes after the resume
        [
            "--model.encoder",
            "lstm",
            "--model.lstm_hidden",
            "4",
            "--model.dropout",
            "0.2",
            "--optim.sparse",
            "adagrad",
        ],
        ["--train.batch_size", "0", "--train.tokens_per_batch", "400", "--optim.sparse", "rowwise_adagrad"],
        ["--model.wide", "words,bigrams,chars", "--embeddings.ngram_buckets", "64", "--embeddings.char_ngrams", "97",
         "--model.deep_chars", "false", "--model.encoder", "masked_bag"],
    ],
    ids=["dropout-weights", "unfreeze", "lstm", "token-budget", "wide"],
)
def test_resumed_run_ends_where_an_uninterrupted_run_ends(quick_config, overrides):
    """Run 6 steps saving at 3 and 6; drop step 6 and the export; the resumed run (steps 4-6) must reproduce it."""
    path = quick_config(
        train={"max_steps": 6}, checkpoint={"every_steps": 3, "at_epoch_end": False, "keep_latest_k": 5}
    )
    full = make_trainer(path, *overrides)
    assert full.fit()["steps_this_run"] == 6
    want = {k: v.clone() for k, v in flat(full.state()).items()}
    run = Path(full.run_dir)
    shutil.rmtree(run / "checkpoints" / "step-6")
    shutil.rmtree(run / "model")
    resumed = make_trainer(path, *overrides)
    assert resumed.fit()["steps_this_run"] == 3
    # the resume is marked in metrics.jsonl, and the report reads every step once
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if RESUMED_AT_STEP in r] == [3]
    logged = [r["step"] for r in read_metrics(run / "metrics.jsonl")[0] if "loss/train" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 6
    got = flat(resumed.state())
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_a_run_whose_checkpoints_all_fail_to_load_is_refused_and_keeps_them(quick_config):
    """When no checkpoint loads, the run does not start again from step 0 (its first save would prune the
    unloadable ones): it stops with a message, and the checkpoints stay for the user to recover or move away."""
    path = quick_config(checkpoint={"every_steps": 2, "at_epoch_end": False, "keep_latest_k": 1})
    make_trainer(path).fit()
    ckpts = Path(make_trainer(path).run_dir) / "checkpoints"
    assert valid_steps(ckpts) == [4]
    truncate_shards(ckpts / "step-4")
    (Path(make_trainer(path).run_dir) / "result.json").unlink()
    with pytest.raises(ResumeError, match="none of the 1 checkpoints .* could be loaded"):
        make_trainer(path, "--train.max_steps", "2").fit()
    assert valid_steps(ckpts) == [4]


def test_resume_at_the_final_step_keeps_the_pretrained_correction(quick_config):
    """A finished run restarted (e.g. killed during its test evaluation) takes no step; its evaluation must still
    use the unfrozen pretrained correction, as the run's own last steps did."""
    path = quick_config(embeddings={"freeze_pretrained": False})
    first = make_trainer(path)
    first.fit()
    assert first.model.delta_active
    (Path(first.run_dir) / "result.json").unlink()  # killed before the result was written
    again = make_trainer(path)
    result = again.fit()
    assert result["steps_this_run"] == 0
    assert again.model.delta_active


def test_training_without_pretrained_vectors_exports_and_projects(quick_config):
    """embeddings.pretrained = "": the frozen table is empty but has the model's width, so the end of the run
    (export, projector rows, neighbours) can join it with the OOV rows."""
    from trainer.export import projector_rows, word_vectors

    path = quick_config(embeddings={"pretrained": "", "dim": 6}, metrics={"projector_words": 10})
    t = make_trainer(path)
    result = t.fit()
    assert result["step"] == 4
    vectors = word_vectors(t.model, t.data.vocab)
    assert vectors.shape == (len(t.data.vocab.words), 6)
    rows, labels, _ = projector_rows(t.model, t.data.vocab, 10, INFO)
    assert rows.shape[1] == 6 and all(kind == "learned" for _, kind, _ in labels)
    index = {w: i for i, w in enumerate(t.data.vocab.words)}
    assert np.array_equal(rows, vectors[[index[word] for word, _, _ in labels]])


@pytest.mark.parametrize("encoder", ["masked_bag", "bag"])
def test_projector_rows_are_the_chosen_words_vectors(quick_config, encoder):
    """The projector reads only its words' rows; they equal those words' rows of every word's vectors (E(w) * M(w)
    for masked_bag; pretrained and learned words both)."""
    from trainer.export import projector_rows, word_vectors

    t = make_trainer(quick_config(model={"encoder": encoder}))
    t.fit()
    vectors = word_vectors(t.model, t.data.vocab)
    rows, labels, _ = projector_rows(t.model, t.data.vocab, 8, INFO)
    assert {kind for _, kind, _ in labels} == {"pretrained", "learned"}
    index = {w: i for i, w in enumerate(t.data.vocab.words)}
    assert np.array_equal(rows, vectors[[index[word] for word, _, _ in labels]])


def test_a_run_started_again_without_a_checkpoint_marks_step_zero(quick_config):
    """An attempt killed before its first save leaves rows but no checkpoint: the next one starts at step 0, says
    so in metrics.jsonl, and the report keeps only its rows (the old rule, "a step lower than the row before",
    missed an attempt that had logged step 1 alone)."""
    path = quick_config("again", checkpoint={"enabled": False}, metrics={"log_every_steps": 1})
    run = Path(tomllib.loads(path.read_text())["run"]["dir"])
    make_trainer(path, "--train.max_steps", "1").fit()  # as the killed attempt: it logged step 1 only
    make_trainer(path).fit()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if RESUMED_AT_STEP in r] == [0]
    logged = [r["step"] for r in read_metrics(run / "metrics.jsonl")[0] if "loss/train" in r]
    assert logged == [1, 2, 3, 4]


def test_disabled_checkpoints_write_and_load_nothing_and_refuse_a_folder_that_has_some(quick_config):
    """checkpoint.enabled = false: no step folder, the model is still exported; a run folder that already holds
    checkpoints is refused (starting over beside them, a later run would resume from the old timeline)."""
    import subprocess
    import sys

    path = quick_config("off", checkpoint={"enabled": False})
    result = make_trainer(path).fit()
    run = Path(tomllib.loads(path.read_text())["run"]["dir"])
    assert result["step"] == 4 and valid_steps(run / "checkpoints") == []
    assert (run / "model" / "model.json").is_file()
    # nothing in training imports DCP when checkpoints are off (its import alone costs ~0.9 s)
    probe = ("import sys, torch; from trainer.config import load_config; from trainer.trainer import Trainer; "
             "from trainer.distributed import DistInfo; "
             f"Trainer(load_config({str(path)!r}, ['--run.dir', {str(run) + '2'!r}]), "
             "DistInfo(0, 0, 1, torch.device('cpu'), 'none')).fit(); "
             "print('torch.distributed.checkpoint' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1] == "False"
    stopped = make_trainer(path, "--run.dir", str(run) + "3")
    stopped.stop.requested = True  # as a SIGTERM before the first step would: stop after it, save nothing
    assert stopped.fit() == {"stopped": True, "step": 1, "signal": None}  # no signal received: exit status 0
    assert valid_steps(Path(str(run) + "3") / "checkpoints") == []
    on = quick_config("on")
    make_trainer(on).fit()
    with pytest.raises(ResumeError, match="checkpoint.enabled = false, but .* holds checkpoints"):
        make_trainer(on, "--checkpoint.enabled", "false").fit()


def test_a_model_exported_before_tokenizer_versions_keeps_tokenizer_1(quick_config):
    """Tokenizer 2 keeps combining marks inside words; a model exported before it existed was trained on the
    version-1 split, so its predictions must featurize text that way."""
    from trainer.export import LoadedModel

    path = quick_config("tok")
    make_trainer(path).fit()
    model = Path(tomllib.loads(path.read_text())["run"]["dir"]) / "model"
    assert LoadedModel(model).cfg.data.tokenizer_version == 2
    saved = tomllib.loads((model / "config.toml").read_text(encoding="utf-8"))
    del saved["data"]["tokenizer_version"]
    (model / "config.toml").write_text(tomli_w.dumps(saved), encoding="utf-8")
    assert LoadedModel(model).cfg.data.tokenizer_version == 1


def test_a_truncated_or_missing_model_file_is_refused_with_its_size(quick_config):
    """weights.pt is written without zip CRCs (torch.load never checks them); the sizes model.json records catch a
    truncated copy instead. A model exported before the sizes existed still loads."""
    import json
    import shutil

    from trainer.export import LoadedModel

    path = quick_config("sizes")
    make_trainer(path).fit()
    model = Path(tomllib.loads(path.read_text())["run"]["dir"]) / "model"
    good = model.with_name("good")
    shutil.copytree(model, good)
    LoadedModel(model)
    weights = (model / "weights.pt").read_bytes()
    (model / "weights.pt").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=rf"weights.pt: {len(weights) // 2:,} bytes, the export wrote {len(weights):,}"):
        LoadedModel(model)
    (model / "frozen.npy").unlink()
    (model / "weights.pt").write_bytes(weights)
    with pytest.raises(ValueError, match="frozen.npy: missing"):
        LoadedModel(model)
    meta = json.loads((good / "model.json").read_text())
    del meta["file_bytes"]
    (good / "model.json").write_text(json.dumps(meta))
    assert LoadedModel(good).meta["labels"]


def test_a_model_from_a_newer_weights_format_is_refused_and_the_current_one_is_recorded(quick_config):
    import json

    from trainer.export import WEIGHTS_FORMAT, LoadedModel, ModelFolderError

    path = quick_config("fmt")
    make_trainer(path).fit()
    model = Path(tomllib.loads(path.read_text())["run"]["dir"]) / "model"
    meta = json.loads((model / "model.json").read_text())
    assert meta["weights_format"] == WEIGHTS_FORMAT == 2
    meta["weights_format"] = WEIGHTS_FORMAT + 1
    (model / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFolderError, match=r"weights format 3, from a newer trainer; this one reads formats up to 2"):
        LoadedModel(model)
    del meta["weights_format"]  # a model exported before the field: format 1, every table whole
    (model / "model.json").write_text(json.dumps(meta))
    assert LoadedModel(model).meta["labels"]
    good_meta = (model / "model.json").read_text()
    for broken, reason in (("{", "Expecting property name"), (json.dumps({"labels": []}), "no table_specs")):
        (model / "model.json").write_text(broken)
        with pytest.raises(ModelFolderError, match=f"model.json: not a readable exported model file \\({reason}"):
            LoadedModel(model)
    (model / "model.json").write_text(good_meta)
    good_config = (model / "config.toml").read_text()
    (model / "config.toml").write_text("[model\n")  # the message names the file that is broken
    with pytest.raises(ModelFolderError, match=r"config.toml: not a readable exported model file \(Expected"):
        LoadedModel(model)
    (model / "config.toml").write_text(good_config)
    (model / "vocab" / "words.txt").unlink()  # was a bare "[Errno 2] No such file or directory"
    with pytest.raises(ModelFolderError, match=r"vocab: the model's vocabulary cannot be read .*words.txt"):
        LoadedModel(model)


def test_neighbors_of_a_word_whose_char_ngrams_never_trained_is_a_clear_error(quick_config):
    """The n-gram rows start at zero: an unseen word made only of untrained n-grams has a zero vector, whose
    neighbours would be the first k words at score 0."""
    from trainer.inference import neighbors

    path = quick_config("near", embeddings={"char_ngrams": 1_000_003})  # few collisions with trained grams
    make_trainer(path).fit()
    run = tomllib.loads(path.read_text())["run"]["dir"]
    with pytest.raises(KeyError, match="none of its character n-grams was seen in training"):
        neighbors(run, "жжжж", 3)
    near = neighbors(run, "soccerball", 3)  # unseen, but its n-grams were trained
    assert len(near) == 3 and all(n["score"] != 0 for n in near)
    from trainer.export import LoadedModel

    vocab_size = len(LoadedModel(Path(run) / "model").vocab.words)
    everyone = neighbors(run, "pasta", vocab_size + 5)  # more than there are: every other word, finite scores
    assert len(everyone) == vocab_size - 1 and "pasta" not in {n["word"] for n in everyone}
    assert all(np.isfinite(n["score"]) for n in everyone)


def test_neighbors_of_an_unknown_word_with_wide_only_char_ngrams_says_why(quick_config):
    from trainer.inference import neighbors

    path = quick_config("near-wide", embeddings={"char_ngrams": 64}, model={"wide": "chars", "deep_chars": False})
    make_trainer(path).fit()
    run = tomllib.loads(path.read_text())["run"]["dir"]
    with pytest.raises(KeyError, match=r"feed only its wide part \(model.deep_chars = false\)"):
        neighbors(run, "zzqqxx", 3)


def test_run_files_are_utf8_whatever_the_locale(tmp_path):
    """Labels and the token pattern are not ASCII; under a non-UTF-8 locale the vocabulary and exported config
    were written in the locale's encoding (or failed to be)."""
    import os
    import subprocess
    import sys

    script = (
        "import numpy as np; from pathlib import Path; from trainer.vocab import Vocabulary; "
        # escapes, not the letters: under the C locale the command line itself is decoded as ASCII
        "v = Vocabulary(words=['\\u00e9'], num_pretrained=0, pretrained_rows=np.zeros(0, np.int64), "
        "counts=np.ones(1, np.int64), labels=['n\\u00e9gatif', 'positif']); "
        f"v.save(Path({str(tmp_path / 'v')!r})); print(Vocabulary.load(Path({str(tmp_path / 'v')!r})).labels)"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONIOENCODING": "utf-8"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['négatif', 'positif']"
    assert "négatif" in (tmp_path / "v" / "vocab.json").read_bytes().decode("utf-8")


def test_wide_model_exports_and_evaluates_as_trained(quick_config, tiny_data):
    """The exported wide & deep model carries its idf; `eval --no-extend` scores exactly what the run reported."""
    from trainer.inference import run_eval

    path = quick_config("wide", model={"wide": "words,bigrams,chars", "deep_chars": False},
                        embeddings={"ngram_buckets": 64, "char_ngrams": 97}, train={"max_steps": 12})
    doc = tomllib.loads(path.read_text())
    doc["data"]["test"] = str(tiny_data["test"])
    path.write_text(tomli_w.dumps(doc))
    result = make_trainer(path).fit()
    run = Path(doc["run"]["dir"])
    summary, _ = run_eval(str(run), str(tiny_data["test"]), extend=False)
    assert (summary["accuracy"], summary["macro_f1"]) == (result["test"]["accuracy"], result["test"]["macro_f1"])
    assert summary["loss"] == pytest.approx(result["test"]["loss"], rel=1e-6)
    extended, _ = run_eval(str(run), str(tiny_data["test"]))  # extra pretrained words: zero wide rows, idf 0
    assert extended["extended_words"] > 0 and extended["n"] == summary["n"]


def test_eval_scores_its_file_a_batch_at_a_time_as_the_run_scored_it_whole(quick_config, tiny_data, monkeypatch):
    """`trainer eval` keeps no batch: its file is tokenized, encoded and scored a batch of texts at a time, and
    the metrics of the batches together are the run's own test evaluation (loss up to float rounding)."""
    from trainer import data_cache, inference, tabular_stream

    path = quick_config("streamed", train={"max_steps": 6})
    doc = tomllib.loads(path.read_text())
    doc["data"]["test"] = str(tiny_data["test"])
    path.write_text(tomli_w.dumps(doc))
    result = make_trainer(path).fit()
    run = Path(doc["run"]["dir"])
    batches = []
    encode = data_cache.Featurizer.encode_tokenized
    monkeypatch.setattr(data_cache, "tokenizing_batch", lambda workers, max_chars=None: (40, 40))  # characters: a few texts a batch
    monkeypatch.setattr(tabular_stream, "CHUNK_BYTES", 64)  # a chunk of a few rows (a longer row: read again)
    monkeypatch.setattr(inference, "EVAL_PIECE_TOKENS", 5)  # and a batch encoded and scored in pieces
    monkeypatch.setattr(data_cache.Featurizer, "encode_tokenized",
                        lambda self, tokenized, labels=None, **kw: batches.append(len(labels)) or
                        encode(self, tokenized, labels, **kw))
    summary, _ = inference.run_eval(str(run), str(tiny_data["test"]), extend=False)
    assert len(batches) > 10 and summary["n"] == result["test"]["n"]
    assert (summary["accuracy"], summary["macro_f1"]) == (result["test"]["accuracy"], result["test"]["macro_f1"])
    assert summary["loss"] == pytest.approx(result["test"]["loss"], rel=1e-6)
    assert not list((run / "eval").glob(".encoded-*"))  # nothing written but the results
    # a file whose columns are named otherwise than the run's: named on the command line (--data.text_column ...)
    renamed = run / "renamed.csv"
    renamed.write_text(tiny_data["test"].read_text().replace("text,label", "body,section", 1))
    with pytest.raises(DataError, match="no text column 'text'"):
        inference.run_eval(str(run), str(renamed), extend=False)
    again, _ = inference.run_eval(str(run), str(renamed), extend=False, text_column="body", label_column="section")
    assert again == summary


def test_eval_tokenizes_smaller_batches_than_the_data_cache(quick_config, tiny_data, monkeypatch):
    """`trainer eval` asks for EVAL_BATCH_CHARS-character batches (memory), whatever the data cache's batch is."""
    from trainer import data_cache, inference

    path = quick_config("evalbatch", train={"max_steps": 2})
    make_trainer(path).fit()
    run = Path(tomllib.loads(path.read_text())["run"]["dir"])
    asked = []
    batch = data_cache.tokenizing_batch
    monkeypatch.setattr(data_cache, "tokenizing_batch", lambda workers, max_chars=None: asked.append(max_chars) or
                        batch(workers, max_chars))
    inference.run_eval(str(run), str(tiny_data["test"]))
    assert asked == [inference.EVAL_BATCH_CHARS] and inference.EVAL_BATCH_CHARS < data_cache.tokenizing_batch(1)[0]




def test_resuming_on_changed_training_data_says_so(quick_config, caplog):
    """Relabelled or reordered training rows with the same vocabulary resumed silently."""
    path = quick_config("changed_data", checkpoint={"every_steps": 2})
    make_trainer(path).fit()
    train = Path(tomllib.loads(path.read_text())["data"]["train"])
    header, *rows = train.read_text().splitlines()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        make_trainer(path, "--train.max_steps", "6").fit()  # the same data: nothing said
    assert not [r for r in caplog.records if "training data differs" in r.getMessage()]
    train.write_text("\n".join([header, *reversed(rows)]) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        result = make_trainer(path, "--train.max_steps", "8").fit()
    assert result["step"] == 8
    assert [r for r in caplog.records if "training data differs from what checkpoint step 6" in r.getMessage()]
