"""Wires the components into a training run: build -> (resume) -> loop -> evaluate -> export.

The loop has a fixed shape: lr -> zero_grad -> forward/backward -> clip dense -> finite check -> step -> maybe
log -> maybe evaluate -> maybe checkpoint. The checkpointer owns the save policy. Host syncs (`.item()`,
`float()`) happen only in the logging / evaluation / checkpoint branches, except the finite check, which on CUDA
also waits for those branches.
"""

import hashlib
import json
import logging
import os
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from trainer import jit, kernels
from trainer.background_build import BackgroundBuild
from trainer.batch import Batch, batch_from_collated, collate, collate_grouped, wide_idf
from trainer.checkpoint import Checkpointer, ResumeError, atomic_write_text, valid_steps
from trainer.config import Config, ConfigError, config_changes, dump_toml
from trainer.data import BatchPlan, BatchPrefetcher, DataBundle, class_weights, prepare_data, rank_share
from trainer.data_cache import cache_root, load_pretrained
from trainer.distributed import (
    DistInfo,
    agree_any,
    all_reduce_,
    broadcast_object,
    check_shared_folders,
    init_distributed,
    shutdown_distributed,
)
from trainer.embeddings import build_table_specs
from trainer.evaluation import confusion_image, evaluate, per_class_table
from trainer.export import export_model
from trainer.fused_sgd import FusedTableSGD
from trainer.fused_sgd import why_not as why_fused_sgd_not
from trainer.metrics import (
    MetricsLogger,
    NullLogger,
    StepTimer,
    Throughput,
    current_rss_bytes,
    peak_rss_bytes,
)
from trainer.model import TextClassifier
from trainer.optim import OptimizerContainer, clean_name, unwrap
from trainer.progress import progress_bar
from trainer.row_wise import COMM_SECONDS as comm_counter
from trainer.run_control import RunDirLock, StopFlag, TrainingStopped, is_out_of_memory
from trainer.sharding import (
    build_tables,
    describe_plan,
    needs_sparse_grad_sync,
    resolve_sharding,
    sync_sparse_grads,
    wrap_for_training,
)

log = logging.getLogger("trainer")

# settings that change where things go or how fast, not what is trained: left out of "changed settings" messages
NOT_TRAINING_SETTINGS = tuple(f"{name} " for name in (
    "run.dir", "train.resume", "train.threads", "data.cache_dir", "data.workers", "data.build_in_background",
    "embeddings.vectors_cache_dir", "metrics.progress", "dist.timeout_s", "dist.data_timeout_s", "dist.pin_cores",
    "optim.fused_sgd"))  # the same weights either way (fused_sgd.py)


def frozen_tensor(rows) -> torch.Tensor:
    """A tensor over the (read-only, memory-mapped) frozen rows without copying them."""
    import warnings

    with warnings.catch_warnings():  # torch warns that the array is not writable: it is never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(rows)


def use_bf16(setting: str, device: torch.device) -> bool:
    """train.bf16: `auto` turns bf16 autocast on for CUDA devices that run bf16 natively (Ampere and newer; on older
    ones it is emulated, slower than float32); `on` forces it on CUDA; never on CPU."""
    if device.type != "cuda" or setting == "off":
        return False
    return setting == "on" or torch.cuda.is_bf16_supported(including_emulation=False)


def state_layout(state: dict) -> dict[str, list[int]]:
    """Every checkpointed tensor's global shape by key (of `Trainer.state()`). The same for every world size and
    sharding mode; it changes with the dense part's shape (model.hidden, model.combine, the LSTM's sizes) and with
    optimizer state (dense SGD momentum), which DCP would otherwise report as an unreadable checkpoint."""
    return {f"{section}/{key}": list(t.shape) for section, tensors in state.items() for key, t in tensors.items()}


def _absolute_source(spec: str) -> str:
    """A vectors file's absolute path; a package name (glove-6b-50d) or an empty spec as given."""
    return str(Path(spec).resolve()) if spec and Path(spec).exists() else spec


def _seed_step(seed: int, device: torch.device) -> None:
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the current device's generator; CUDA is initialised by now


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo, background_build: BackgroundBuild | None = None) -> None:
        """`background_build`: the data cache being built by a child process (`data_cache.start_background_build`),
        waited for before the data is read."""
        self.cfg = cfg
        self.info = info
        self.background_build = background_build
        self.run_dir = Path(cfg.run.dir)
        self.stop = StopFlag()

    # ---------------------------------------------------------------- build
    def build(self) -> None:
        cfg, info = self.cfg, self.info
        if cfg.dist.pin_cores and info.is_main and hasattr(os, "sched_getaffinity"):
            log.info("dist.pin_cores: local rank 0 runs on cores %s (each local rank on its own block)",
                     sorted(os.sched_getaffinity(0)))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        if info.is_main:
            if getattr(self, "created_folders", None) is None:  # what a failed build removes again (fit)
                self.created_folders = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a read-only or special file system: name the setting, not only the errno
                raise ConfigError(f"run.dir: cannot create {self.run_dir} ({e.strerror or e})") from None
        if getattr(self, "run_lock", None) is None:  # once: fit() builds again after a caller's build()
            self.run_lock = RunDirLock(self.run_dir, info)
        shared = {"run.dir": self.run_dir}
        if not cache_root(cfg).resolve().is_relative_to(self.run_dir.resolve()):
            shared["data.cache_dir"] = cache_root(cfg)
        check_shared_folders(shared, info)
        if cfg.train.resume == "never" and valid_steps(self.run_dir / "checkpoints"):
            raise ResumeError(f"run.dir {self.run_dir} already holds checkpoints and train.resume = never; "
                              "use another run.dir or train.resume = auto")
        if cfg.train.resume == "never" and (self.run_dir / "result.json").exists():
            raise ResumeError(f"run.dir {self.run_dir} already holds a finished run (result.json, model/) and "
                              "train.resume = never; use another run.dir")
        self.logger = MetricsLogger(self.run_dir, cfg.metrics.tensorboard) if info.is_main else NullLogger()
        e = cfg.embeddings
        if self.background_build is not None:  # the CLI's child building the data cache (data_cache.py)
            kernels.load_numba()  # the first step's numba start-up cost, while the child works
            self.background_build.wait()
        t0 = time.perf_counter()
        self.pretrained = load_pretrained(cfg, progress=info.is_main and cfg.metrics.progress)
        if self.pretrained is not None:
            log.info("pretrained %s: %d x %d in %.2fs (%d duplicates skipped, %d words with invalid UTF-8 bytes "
                     "replaced)", e.pretrained, self.pretrained.num_rows, self.pretrained.dim,
                     time.perf_counter() - t0, self.pretrained.num_duplicates, self.pretrained.num_bad_utf8)
        self.data: DataBundle = prepare_data(cfg, self.pretrained, info, cache_root(cfg))
        vocab = self.data.vocab
        cov = self.data.coverage
        log.info("vocabulary: %d words (%d pretrained, %d OOV), %d labels; pretrained coverage %.1f%% of types, "
                 "%.1f%% of tokens", len(vocab.words), vocab.num_pretrained, vocab.num_oov, len(vocab.labels),
                 100 * cov["pretrained_type_coverage"], 100 * cov["pretrained_token_coverage"])
        self.frozen = frozen_tensor(self.data.frozen)
        dim = self.pretrained.dim if self.pretrained is not None else e.dim
        self.specs = build_table_specs(
            num_pretrained=vocab.num_pretrained, num_oov=vocab.num_oov, dim=dim,
            ngram_buckets=e.ngram_buckets, char_buckets=e.char_ngrams, masked=cfg.model.encoder == "masked_bag",
            pretrained_trainable=cfg.pretrained_trainable,
            init_std=self.data.init_std * e.init_scale,
            wide=tuple(cfg.model.wide_families), num_classes=len(vocab.labels), deep_chars=cfg.model.deep_chars,
        )
        self.sharding = resolve_sharding(cfg.dist, self.specs, info)
        tables = build_tables(self.sharding, self.specs, self.frozen, cfg.train.seed, info)
        self.model = TextClassifier(tables, cfg.model, vocab.num_pretrained, len(vocab.labels)).to(info.device)
        tables.move_frozen(info.device)
        if self.model.wide_tables:
            self.model.wide_idf = wide_idf(self.data.train, {s.name: s.num_rows for s in self.specs})
        self.model.dense_autocast = use_bf16(cfg.train.bf16, info.device)
        self.train_model = wrap_for_training(self.model, self.sharding, info)
        self.sync_tables = needs_sparse_grad_sync(tables, info)
        self.token_level = cfg.model.encoder == "lstm"
        # the data thread's work in one GIL-free call where it can be (CPU steps; GPU batches are pinned as tensors)
        self.grouping_plan = (self.model.grouping_plan() if info.device.type == "cpu" and kernels.fused_kernels_enabled()
                              else None)
        tc = cfg.train
        self.plan = BatchPlan(self.data.train.raw_tokens, tc.batch_size, tc.tokens_per_batch, tc.seed)
        self.total_steps = tc.max_steps or self.plan.total_steps(tc.epochs)
        unfreeze = 0 if (cfg.pretrained_trainable and not e.freeze_pretrained) else e.unfreeze_after_steps
        self.optim = OptimizerContainer(self.train_model, cfg.optim, self.total_steps, unfreeze, self.frozen)
        self.fused_sgd_reason = why_fused_sgd_not(cfg, info, tables, cfg.model) if cfg.optim.sparse == "sgd" else None
        if cfg.optim.sparse == "sgd" and self.fused_sgd_reason is None:
            self.model.fused_sgd = FusedTableSGD(tables, masked=cfg.model.encoder == "masked_bag",
                                                 wide=self.model.wide_tables)
            self.optim.fuse_tables(self.model.fused_sgd)
        self.weights = class_weights(np.asarray(self.data.train.labels), len(vocab.labels), tc.class_weights)
        self.weights_t = torch.from_numpy(self.weights).to(info.device)
        self.checkpointer = Checkpointer(self.run_dir, cfg.checkpoint, info)
        self._start_train_data_fingerprint()

    # ---------------------------------------------------------------- state
    def state(self) -> dict:
        tables = unwrap(self.model).tables
        model_state = {}
        for name, param in unwrap(self.model).named_parameters():
            model_state[clean_name(name)] = tables.checkpoint_view(clean_name(name), param.data)
        optim_state = {k: tables.checkpoint_view(k.split("/", 1)[1].rsplit("/", 1)[0], v)
                       for k, v in self.optim.state_tensors().items()}
        return {"model": model_state, "optim": optim_state}

    def fingerprints(self) -> dict:
        return {
            "vocab_fingerprint": self.data.vocab.fingerprint(),
            "pretrained_fingerprint": self.pretrained.fingerprint if self.pretrained is not None else "none",
            # absolute: the exported model reopens the file to extend its vocabulary from any working directory
            "pretrained_source": _absolute_source(self.cfg.embeddings.pretrained),
            "tables": [[s.name, s.num_rows, s.dim] for s in self.specs],
            "optimizers": {k: type(v).__name__ for k, v in self.optim.optimizers.items()},
            "encoder": self.cfg.model.encoder,
        }

    def check_resumable(self, saved: dict) -> None:
        mine = {**self.fingerprints(), "state_layout": state_layout(self.state())}
        before, now = saved.get("state_layout") or {}, mine["state_layout"]
        changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        shown = ", ".join(f"{k}: {before.get(k, 'absent')} then, {now.get(k, 'absent')} now" for k in changed[:3])
        reasons = {
            "pretrained_fingerprint": "the pretrained table differs from the one this run was trained with "
                                      f"({saved.get('pretrained_source')!r} then, {mine['pretrained_source']!r} now)",
            "vocab_fingerprint": "the vocabulary or label set differs (training data, tokenizer, min_freq or max_vocab "
                                 "changed)",
            "tables": f"the embedding tables differ ({saved.get('tables')} then, {mine['tables']} now; "
                      "model.encoder, model.wide, embeddings.ngram_buckets / char_ngrams and the vocabulary decide "
                      "them)",
            "optimizers": f"the optimizers differ ({saved.get('optimizers')} then, {mine['optimizers']} now; "
                          "optim.sparse, optim.dense and the tables decide them)",
            "encoder": f"model.encoder differs ({saved.get('encoder')} then, {mine['encoder']} now)",
            "state_layout": f"the model or optimizer state differs in shape ({shown}"
                            f"{f' and {len(changed) - 3} more' if len(changed) > 3 else ''}; model.hidden, "
                            "model.combine, the LSTM's sizes or the dense optimizer's settings changed)",
        }
        for key, reason in reasons.items():
            if saved.get(key) != mine[key]:
                raise ResumeError(f"run.dir {self.run_dir} holds a run this configuration cannot resume: {reason}."
                                  f"{self._settings_changed()} Train in another run.dir (or move this one away), or "
                                  "restore the run's settings to resume it.")
        mine_fp = self._train_data_fingerprint()
        if mine_fp is not None and saved.get("train_data_fingerprint", mine_fp) != mine_fp:
            if self.info.is_main:  # not a reason to refuse (a corrected label file is a fair change), but said
                log.warning("the training data differs from what checkpoint step %s was trained on (same vocabulary "
                            "and labels; other documents, labels or order): training goes on with the new data",
                            saved.get("step"))

    def _settings_changed(self, lead: str = "Settings changed since that run") -> str:
        """` Settings changed since that run: ...` from its config.toml, for a refused resume's message."""
        path = self.run_dir / "config.toml"
        try:
            changed = config_changes(tomllib.loads(path.read_text(encoding="utf-8")),
                                     tomllib.loads(dump_toml(self.cfg)))
        except (OSError, tomllib.TOMLDecodeError):
            return ""
        changed = [c for c in changed
                   if not c.startswith(("train.epochs ", "train.max_steps ", *NOT_TRAINING_SETTINGS))]
        return f" {lead}: {'; '.join(changed)}." if changed else ""

    def _write_config(self, step: int) -> None:
        """RUN_DIR/config.toml: the settings of this invocation. A resume with other settings (a new learning rate,
        more epochs) is allowed, but said, and the settings the steps before it ran with stay beside it."""
        path, text = self.run_dir / "config.toml", dump_toml(self.cfg)
        kept = self.run_dir / f"config.until-step-{step}.toml"
        if step and path.exists() and path.read_text(encoding="utf-8") != text:
            if not kept.exists():  # an earlier resume at this step kept them already (attempts since saved nothing)
                os.replace(path, kept)
            changed = [c for c in config_changes(tomllib.loads(kept.read_text(encoding="utf-8")), tomllib.loads(text))
                       if not c.startswith(NOT_TRAINING_SETTINGS)]
            if changed:
                log.warning("resuming at step %d with changed settings: %s; config.toml holds them now, the earlier "
                            "ones are in %s", step, "; ".join(changed), kept.name)
        atomic_write_text(path, text)

    def _finished_result(self, step: int) -> dict | None:
        """A run folder whose run already ended (no step left, its result and model written): its result, untouched.
        Without this a second invocation of the same command trained nothing and overwrote result.json with an
        empty one."""
        result_path = self.run_dir / "result.json"
        if step < self.total_steps or not result_path.exists() or not (self.run_dir / "model").is_dir():
            return None
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable: not a finished run's (this runs on rank 0 before a broadcast)
            return None
        if not isinstance(result, dict) or result.get("step") != step:
            return None
        log.warning("run.dir %s already finished at step %d (result.json, model/): nothing to train.%s For a new run "
                    "use another run.dir; to train on, raise train.epochs or train.max_steps", self.run_dir, step,
                    self._settings_changed("Settings given now that differ from the run's, not applied"))
        return result

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        """Build, resume, train, evaluate and export; run.dir stays locked until it returns (RunDirLock)."""
        try:
            return self._fit()
        except BaseException:
            self._remove_created_folders_if_empty()
            raise
        finally:
            if getattr(self, "run_lock", None) is not None:
                self.run_lock.release()
                self.run_lock = None

    def _remove_created_folders_if_empty(self) -> None:
        """A run refused before it wrote anything (bad data, a config error found while building) leaves no empty
        run.dir behind: the folders this run created are removed again, innermost first, while they are empty."""
        for folder in getattr(self, "created_folders", None) or []:
            if not folder.exists():  # the data cache's build removes the run folder it made (build_cache)
                continue
            try:
                folder.rmdir()  # only an empty folder; anything written there keeps it
            except OSError:
                return

    def _fit(self) -> dict:
        cfg, info = self.cfg, self.info
        self.build()
        self.optim.init_state()
        self.optim.zero_grad()
        state = self.state()  # init_state created the optimizer tensors: take the views again
        plan_text = describe_plan(self.specs, self.sharding, self.info, self.optim)
        log.info("%s\n%s", plan_text, self.optim.describe())
        if info.is_main:
            jit.announce_compiles(log)
        if self.fused_sgd_reason:  # sgd on the tables through autograd: say why, since it is slower
            log.info("optim.fused_sgd: the tables' sgd runs through autograd here (%s)", self.fused_sgd_reason)
        resumed = self.checkpointer.load_latest(state, self.check_resumable)
        step = resumed["step"] if resumed else 0
        tokens_seen = resumed["tokens_seen"] if resumed else 0
        if resumed:
            # a finished run is left as it is (no config, no event file). Rank 0's view decides for all: every rank
            # must agree to skip the final evaluation's collectives
            finished = broadcast_object(self._finished_result(step) if info.is_main else None, info)
            if finished is not None:
                return finished
            if step > self.total_steps:
                log.warning("resumed from step %d (saved by world size %d, %s), past the %d steps these settings "
                            "train (train.epochs, train.max_steps): no step to take", step, resumed["world_size"],
                            resumed["sharding"], self.total_steps)
            else:
                log.info("resumed from step %d (saved by world size %d, %s); %d steps remain", step,
                         resumed["world_size"], resumed["sharding"], self.total_steps - step)
        elif info.is_main and (self.run_dir / "result.json").exists():
            log.warning("run.dir %s holds a finished run's result.json but no checkpoint to resume from "
                        "(checkpoint.enabled = false?): training again from step 0, replacing its model and result",
                        self.run_dir)
        if resumed or (self.run_dir / "metrics.jsonl").exists():  # also an attempt killed before its first save
            self.logger.resumed(step)
        # only now that the run folder is known to be ours (a refused resume leaves it untouched)
        if info.is_main:
            self._write_config(step)
            # the run is not finished: a result.json here is an earlier run's (e.g. one without checkpoints), and
            # must not pass for this one's if it is killed before writing its own
            (self.run_dir / "result.json").unlink(missing_ok=True)
        self.logger.text("config", dump_toml(cfg))
        self.logger.text("sharding_plan", plan_text + "\n" + self.optim.describe())
        self.stop.install()
        try:
            result = self._loop(step, tokens_seen)
            if self.info.rank == 0:
                jit.report_compiled(log, "training")
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            raise TrainingStopped(self._oom_message(e)) from None
        finally:
            self.stop.uninstall()
        return result

    def _oom_message(self, e: BaseException) -> str:
        tc = self.cfg.train
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return (f"out of memory during training ({first}); lower train.batch_size (now {tc.batch_size}) or set "
                f"train.tokens_per_batch (now {tc.tokens_per_batch}; it caps the tokens per step). "
                f"{self._kept_checkpoint()}")

    def _kept_checkpoint(self) -> str:
        steps = valid_steps(self.checkpointer.folder)
        if not steps:
            return "No checkpoint had been saved yet."
        return f"The last good checkpoint, step {steps[-1]}, is kept in {self.checkpointer.folder}."

    def _loss(self, logits: torch.Tensor, batch, global_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss whose DDP-averaged gradient equals the gradient of the global-batch weighted mean loss.

        Every rank knows the whole global batch's labels (the plan is global), so the denominator needs no
        communication. Returns (loss to backpropagate, this rank's weighted loss sum and weight, for logging)."""
        denom = float(self.weights[np.asarray(self.data.train.labels[global_rows])].sum()) or 1.0
        labels = batch.labels
        per_doc = F.cross_entropy(logits.float(), labels, weight=self.weights_t, reduction="none")
        local_sum = per_doc.sum()
        local_w = self.weights_t[labels].sum()  # 0 for a rank whose share of the batch is empty
        return local_sum * (self.info.world_size / denom), local_sum.detach(), local_w

    def _loop(self, step: int, tokens_seen: int) -> dict:
        cfg, info = self.cfg, self.info
        timer = StepTimer(sync=torch.cuda.synchronize if info.device.type == "cuda" else None)
        meter = Throughput(cfg.metrics.warmup_steps)
        bar = progress_bar(total=self.total_steps, initial=step, desc="train",
                           enabled=info.is_main and cfg.metrics.progress)
        self.train_model.train()
        # as after the last step taken: the loop sets it per step, but a resume at the final step runs none, and
        # the test evaluation and projector must still see the unfrozen pretrained correction
        unwrap(self.model).delta_active = step > 0 and self.optim.pretrained_active(step - 1)
        t_start = time.perf_counter()
        prefetch = BatchPrefetcher(self._batch_parts, self.total_steps, pin=info.device.type != "cpu")
        try:
            return self._steps(step, tokens_seen, prefetch, timer, meter, bar, t_start)
        finally:
            prefetch.close()

    def _make_batch(self, step: int) -> tuple[np.ndarray, Batch, int]:
        """Step `step`'s global rows, this rank's collated share of them, and the number of batches in its epoch."""
        rows, parts, num_batches = self._batch_parts(step)
        return rows, self._finish_batch(parts), num_batches

    def _batch_parts(self, step: int) -> tuple[np.ndarray, Batch | tuple, int]:
        """`_make_batch` as the data thread runs it, off the main thread: collating, id grouping, row-wise routes.
        Where one numba call does all of it (`batch.collate_grouped`), it returns that call's arrays, and the
        main thread makes the tensors (`_finish_batch`): the data thread then takes the GIL about once a batch."""
        epoch, index = self.plan.position(step)
        batches = self.plan.epoch(epoch)
        rows = rank_share(batches[index], self.info.rank, self.info.world_size)
        if self.grouping_plan is not None:
            parts = collate_grouped(self.data.train, rows, self.data.vocab.num_pretrained, *self.grouping_plan)
            return batches[index], parts, len(batches)
        batch = collate(self.data.train, rows, self.data.vocab.num_pretrained, self.token_level, fused=True)
        unwrap(self.model).prepare(batch)
        return batches[index], batch, len(batches)

    @staticmethod
    def _finish_batch(parts: Batch | tuple) -> Batch:
        return parts if isinstance(parts, Batch) else batch_from_collated(parts)

    def _steps(self, step, tokens_seen, prefetch, timer, meter, bar, t_start) -> dict:
        cfg, info, model = self.cfg, self.info, self.train_model
        cpu = info.device.type == "cpu"
        last_valid: dict = {}
        steps_this_run = 0
        # row-wise all-to-alls run inside forward and backward; their time is reported as its own share
        comm_seen = comm_counter[0]
        while step < self.total_steps:
            epoch, index = self.plan.position(step)
            step_count = step + 1
            final = step_count == self.total_steps
            log_now = step_count == 1 or step_count % cfg.metrics.log_every_steps == 0 or final
            timer.start(active=cpu or log_now)  # on CUDA a timed step waits for the GPU at each mark
            global_rows, parts, num_batches = prefetch.get(step)
            batch = self._finish_batch(parts).to(info.device)
            timer.mark("data")
            # dropout randomness from (seed, step, rank): a resumed run draws exactly what it would have
            # (only this device's generator: torch.manual_seed also seeds every lazy CUDA/XPU/MTIA generator, and
            # each of those formats a stack trace when the device is unused, about 1 ms per step on CPU)
            _seed_step(cfg.train.seed * 1_000_003 + step * 7919 + info.rank, info.device)
            unwrap(self.model).delta_active = self.optim.pretrained_active(step)
            self.optim.set_lr(step)
            self.optim.zero_grad()
            logits = model(batch)
            loss, local_sum, local_w = self._loss(logits, batch, global_rows)
            timer.mark("forward")
            timer.move(comm_counter[0] - comm_seen, "forward", "communication")
            comm_seen = comm_counter[0]
            loss.backward()
            timer.mark("backward")
            timer.move(comm_counter[0] - comm_seen, "backward", "communication")
            comm_seen = comm_counter[0]
            if self.sync_tables:
                sync_sparse_grads(unwrap(self.model).tables, info)
                timer.mark("communication")
            grad_norm = self.optim.clip_dense(cfg.optim.grad_clip)
            epoch_end = index + 1 == num_batches
            save_now = self.checkpointer.should_save(step_count, epoch_end, final)
            # One host-side agreement per step on CPU: "is any rank's loss or dense gradient non-finite" (stepping
            # with it would write NaN into weights the next save keeps) and "was any rank asked to stop". On CUDA
            # the finite check syncs with the GPU, so it runs on logging / checkpoint steps only.
            check_finite = cpu or log_now or save_now
            bad = False
            if check_finite:
                bad = not bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm.to(loss.device)))
            bad, stop_now = agree_any(bad, self.stop.requested, info=info)
            if bad:
                raise TrainingStopped(
                    f"non-finite loss or gradient at step {step_count}; stopped without saving. "
                    f"{self._kept_checkpoint()} Lower optim.sparse_lr / optim.dense_lr.")
            self.optim.step(step)
            timer.mark("optimizer")
            step = step_count
            steps_this_run += 1
            tokens_seen += int(self.data.train.raw_tokens[global_rows].sum())
            meter.update(batch.num_tokens, batch.num_docs)
            bar.update(1)
            if log_now:
                self._log_train(step, (local_sum, local_w), logits, batch, grad_norm, meter, timer, tokens_seen,
                                epoch)
            if self.data.valid is not None and (
                (cfg.train.eval_every_steps and step % cfg.train.eval_every_steps == 0)
                or (not cfg.train.eval_every_steps and epoch_end) or final
            ):
                with meter.paused():  # throughput is training throughput: evaluation and saving do not count
                    last_valid = self._evaluate("valid", step)
            if save_now or (stop_now and cfg.checkpoint.enabled):
                with meter.paused():
                    state = self.state()
                    self.checkpointer.save(step, state, self._trainer_state(step, tokens_seen, epoch, state))
            if stop_now:
                log.warning("stopped by signal at step %d; %s", step,
                            "checkpoint saved" if cfg.checkpoint.enabled else "checkpoint.enabled = false: not saved")
                bar.close()
                self.logger.close()
                # the exit status is 128 + the signal (cli) in the process that received one; a rank that stopped
                # with another (no signal of its own) exits 0, as before: on Kubernetes a pod failing without the
                # pre-emption's DisruptionTarget condition would count against the Job's backoff limit
                return {"stopped": True, "step": step, "signal": self.stop.signum}
        bar.close()
        wall = time.perf_counter() - t_start
        result = {"step": step, "steps_this_run": steps_this_run, "train_seconds": wall}
        if not last_valid and self.data.valid is not None and steps_this_run == 0:
            last_valid = self._evaluate("valid", step)  # a run resumed at its last step: its result has both splits
        if last_valid:
            result["valid"] = {k: last_valid[k] for k in ("accuracy", "macro_f1", "loss", "n")}
        if self.data.test is not None:
            test = self._evaluate("test", step)
            result["test"] = {k: test[k] for k in ("accuracy", "macro_f1", "loss", "n")}
        export_model(self.run_dir / "model", unwrap(self.model), self.data.vocab, self.frozen, self.cfg, self.specs,
                     self.fingerprints(), self.info)
        self._final_logs(result, step)
        if info.is_main:
            atomic_write_text(self.run_dir / "result.json", json.dumps(result, indent=1))
        return result

    def _trainer_state(self, step: int, tokens_seen: int, epoch: int, state: dict) -> dict:
        return {
            "step": step,
            "epoch": epoch,
            "tokens_seen": tokens_seen,
            "world_size": self.info.world_size,
            "sharding": self.sharding,
            "torch_version": torch.__version__,
            "state_layout": state_layout(state),
            "train_data_fingerprint": self._train_data_fingerprint(),
            **self.fingerprints(),
        }

    def _train_data_fingerprint(self) -> str | None:
        """The training split's content (token ids, document bounds, labels, with their shapes and types): a
        resume on changed data (relabelled rows, the same vocabulary) is said, not silent. Rank 0's alone (the one
        that writes trainer_state.json and warns); hashed on a thread started in build (about 30 ms for the demo's
        3M tokens, 6 s for 4 GB of ids), so that no checkpoint, a SIGTERM's included, waits for it."""
        future = getattr(self, "_train_fp", None)
        return future.result() if future is not None else None

    def _start_train_data_fingerprint(self) -> None:
        if not self.info.is_main:
            return
        arrays = [self.data.train.token_ids, self.data.train.token_offsets, self.data.train.labels]

        def digest() -> str:
            h = hashlib.blake2b(digest_size=16)
            for array in arrays:  # blake2b releases the GIL on large buffers
                h.update(f"{array.dtype.str}{array.shape}".encode())
                h.update(memoryview(np.ascontiguousarray(array)).cast("B"))
            return h.hexdigest()

        pool = ThreadPoolExecutor(1, thread_name_prefix="train-fingerprint")
        self._train_fp = pool.submit(digest)
        pool.shutdown(wait=False)

    def _log_train(self, step, local_loss, logits, batch, grad_norm, meter, timer, tokens_seen, epoch) -> None:
        info = self.info
        # host sync (logging step only): loss mean and max across ranks, batch accuracy
        correct = float((logits.argmax(1) == batch.labels).sum()) if batch.num_docs else 0.0
        local_sum, local_w = float(local_loss[0]), float(local_loss[1])
        local_mean = local_sum / local_w if local_w > 0 else 0.0
        # The global weighted mean (what one process on the whole batch logs), not a mean of the ranks' means: a
        # rank with no documents would otherwise count as a loss of 0. Built on the host from Python floats
        # (torch.stack refuses a CPU tensor next to CUDA ones).
        stats = torch.tensor([local_sum, local_w, correct, float(batch.num_docs)], dtype=torch.float64)
        summed = all_reduce_(stats.clone().to(info.device), info, op="sum").cpu()
        mem = torch.tensor([float(local_mean), peak_rss_bytes() / 2**30], dtype=torch.float64)
        peak = all_reduce_(mem.to(info.device), info, op="max").cpu()
        values = {
            "loss/train": float(summed[0]) / max(float(summed[1]), 1e-12),
            "loss/train_max_rank": float(peak[0]),
            "accuracy/train_batch": float(summed[2]) / max(float(summed[3]), 1.0),
            "grad/dense_norm": float(grad_norm),
            "progress/epoch": epoch,
            "progress/tokens_seen": tokens_seen,
            "memory/rss_gb": current_rss_bytes() / 2**30,
            "memory/peak_rss_gb": peak_rss_bytes() / 2**30,
            "memory/peak_rss_gb_max_rank": float(peak[1]),
        }
        # `step` counts completed steps; the one just taken had index step - 1 (set_lr / optim.step)
        values.update({f"lr/{k}": v for k, v in self.optim.lrs(step - 1).items()})
        rates = meter.rates()
        if rates:  # per-rank rates summed: the whole job's throughput
            packed = all_reduce_(torch.tensor([rates["throughput/tokens_per_s"], rates["throughput/examples_per_s"]],
                                              dtype=torch.float64).to(info.device), info).cpu()
            values["throughput/tokens_per_s"] = float(packed[0])
            values["throughput/examples_per_s"] = float(packed[1])
        values.update(timer.shares())
        timer.reset()
        if info.device.type == "cuda":
            values["memory/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(info.device) / 2**30
        if step == 1:
            values.update({f"embeddings/{k}": v for k, v in self.data.coverage.items()})
        self.logger.scalars(values, step)
        # the same curve against tokens seen (x = tokens), for comparing runs with different batch sizes
        self.logger.tb_scalars({"loss_vs_tokens/train": values["loss/train"]}, tokens_seen)
        # the max over ranks only where there is more than one rank (alone it repeats the loss)
        spread = f" (max over ranks {values['loss/train_max_rank']:.4f})" if info.world_size > 1 else ""
        log.info("step %d/%d loss %.4f%s %s", step, self.total_steps, values["loss/train"], spread,
                 f"{values['throughput/tokens_per_s']:,.0f} tokens/s" if "throughput/tokens_per_s" in values else "")

    def _evaluate(self, split: str, step: int) -> dict:
        docs = getattr(self.data, split)
        m = evaluate(self.train_model, docs, self.data.vocab.num_pretrained, self.token_level,
                     len(self.data.vocab.labels), self.info)
        scalars = {f"accuracy/{split}": m["accuracy"], f"accuracy/{split}_macro_f1": m["macro_f1"]}
        if m["loss"] is not None:  # None: no document of the split has a label seen in training
            scalars[f"loss/{split}"] = m["loss"]
        self.logger.scalars(scalars, step)
        log.info("%s at step %d: accuracy %.4f macro_f1 %.4f loss %s (n=%d)", split, step, m["accuracy"],
                 m["macro_f1"], "n/a" if m["loss"] is None else f"{m['loss']:.4f}", m["n"])
        if self.info.is_main:
            (self.run_dir / "eval").mkdir(exist_ok=True)
            atomic_write_text(self.run_dir / "eval" / f"{split}.json", json.dumps(m))
            atomic_write_text(self.run_dir / "eval" / f"{split}_per_class.txt",
                              per_class_table(m, self.data.vocab.labels))
            self.logger.image(f"confusion/{split}", confusion_image(np.array(m["confusion"], dtype=np.float64)), step)
            self.logger.text(f"per_class/{split}", per_class_table(m, self.data.vocab.labels), step)
        return m

    def _final_logs(self, result: dict, step: int) -> None:
        hparams = {f"{section}.{k}": v for section, d in self.cfg.to_dict().items() for k, v in d.items()
                   if section in ("embeddings", "model", "optim", "train") and isinstance(v, int | float | str | bool)}
        final = {}
        for split in ("valid", "test"):
            if split in result:
                final[f"{split}_accuracy"] = result[split]["accuracy"]
                final[f"{split}_macro_f1"] = result[split]["macro_f1"]
        self.logger.hparams(hparams, final, step)
        from trainer.export import projector_rows

        rows = projector_rows(unwrap(self.model), self.data.vocab, self.cfg.metrics.projector_words, self.info)
        if rows is not None:
            self.logger.projector(*rows, step=step)
        self.logger.close()


def run_training(cfg: Config, background_build: BackgroundBuild | None = None) -> dict:
    info = init_distributed(cfg.train.device, cfg.dist.timeout_s, cfg.dist.pin_cores, cfg.dist.data_timeout_s)
    trainer = None
    try:
        trainer = Trainer(cfg, info, background_build)
        return trainer.fit()
    finally:
        # however training ended (a non-finite loss, an error, a signal): the processes of a group end without
        # the interpreter's finalisation (distributed.exit_process), so nothing may be left to a destructor
        if getattr(trainer, "logger", None) is not None:  # made by build(), which may not have run
            trainer.logger.close()
        shutdown_distributed()
