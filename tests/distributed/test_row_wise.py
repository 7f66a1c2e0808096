"""Row-wise sharded tables (trainer/row_wise.py) against two oracles, on real gloo process groups.

For W in {1, 2, 3}: the real TextClassifier with tables from `build_table_specs`, driven by the real collate,
loss (`Trainer._loss`) and OptimizerContainer for several steps, gives the same losses, dense gradients, table
gradients and final table rows with
  - row_wise tables (only the dense part in DDP),
  - replicated tables (the dense part in DDP, the tables' sparse gradients averaged by `sync_sparse_grads`),
  - one process on the concatenated global batch.
The data make the collectives meet their edge cases: a vocabulary not divisible by W, tables with fewer rows than
W (an empty shard), a global batch smaller than W (a rank with zero documents), ranks whose documents have no OOV
ids, an empty document, and a step where nobody looks up an OOV word.

One process-group run per world size does all of it (spawning is the expensive part); module-scoped fixtures
hold the per-rank results and the tests below only compare.
"""

import re
import shutil
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from harness import DistributedRunError, run_distributed

from trainer.batch import collate, wide_idf
from trainer.config import ModelConfig, OptimConfig
from trainer.data import class_weights, rank_share
from trainer.distributed import DistInfo, all_reduce_
from trainer.embeddings import LocalTables, TableSpec, build_table_specs, init_rows_
from trainer.features import EncodedDocs
from trainer.model import DenseNet, TextClassifier
from trainer.optim import OptimizerContainer
from trainer.row_wise import RowWiseTables, shard_rows
from trainer.sharding import (
    build_tables,
    describe_plan,
    needs_sparse_grad_sync,
    sync_sparse_grads,
    wrap_for_training,
)
from trainer.trainer import Trainer

# pretrained 7 rows (W=2: 4+3, W=3: 3+3+1), oov 2 (W=3: 1+1+0, an empty shard), mask 9, bigram 11, char 1
P, OOV, DIM, BIGRAMS, CHARS, CLASSES = 7, 2, 4, 11, 1, 3
NO_OOV_DOCS = {2, 3, 4, 5, 16, 17, 18, 19, 20}
EMPTY_DOCS = {18}
# 6 docs (W=2: rank 1 has no OOV ids), 7 (uneven split), 2 and 1 (ranks with zero documents), 5 (no OOV at all)
BAG_BATCHES = (tuple(range(0, 6)), tuple(range(6, 13)), (13, 14), (15,), tuple(range(16, 21)))
# the LSTM cannot take a rank with zero documents (see test_lstm_rank_without_documents)
LSTM_BATCHES = (tuple(range(0, 6)), tuple(range(6, 13)), tuple(range(16, 21)))
TOL = dict(rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class Case:
    name: str
    encoder: str = "bag"
    sparse: str = "sparse_adam"
    dense: str = "adamw"
    pooling: str = "mean"
    hidden: int = 0
    pretrained_trainable: bool = False
    unfreeze_step: int = -1
    wide: tuple = ()  # model.wide families: their tables stay whole on every rank, also under row_wise
    batches: tuple = field(default=BAG_BATCHES)


CASES = (
    Case("bag-sparse_adam"),
    Case("bag-sgd", sparse="sgd", dense="sgd", hidden=5),
    Case("bag-rowwise_adagrad-delta", sparse="rowwise_adagrad", pretrained_trainable=True, unfreeze_step=2),
    Case("masked_bag-sparse_adam", encoder="masked_bag", hidden=5),
    Case("masked_bag-sgd", encoder="masked_bag", sparse="sgd"),
    Case("masked_bag-rowwise_adagrad", encoder="masked_bag", sparse="rowwise_adagrad", dense="sgd"),
    Case("lstm-sparse_adam", encoder="lstm", batches=LSTM_BATCHES),
    Case("masked_bag-sgd-wide", encoder="masked_bag", sparse="sgd", wide=("words", "bigrams", "chars")),
)
CKPT_CASES = (
    Case("ckpt-sparse_adam", encoder="masked_bag"),
    Case("ckpt-rowwise_adagrad", sparse="rowwise_adagrad"),
    Case("ckpt-wide", encoder="masked_bag", sparse="sgd", wide=("words", "bigrams", "chars")),
)
CKPT_TRAIN_STEPS = 3  # steps before the save; the next batch (one document) is the continuation step


# ---------------------------------------------------------------------------------- data, model, training loop
def make_docs() -> EncodedDocs:
    """21 documents of global word ids (pretrained, OOV, -1 = unknown word kept for its character n-grams).
    Pretrained row P-1 and bigram row BIGRAMS-1 are never used: rows nobody touches."""
    rng = np.random.default_rng(0)
    tokens, bigrams, chars, char_counts = [], [], [], []
    tok_off, big_off, chr_off = [0], [0], [0]
    for d in range(21):
        n = 0 if d in EMPTY_DOCS else int(rng.integers(1, 7))
        pool = list(range(P - 1)) + [-1] + ([] if d in NO_OOV_DOCS else list(range(P, P + OOV)) * 2)
        ids = rng.choice(pool, size=n).tolist()
        if d == 0:
            ids[0] = P  # the first document has an OOV id
        counts = rng.integers(0, 3, size=n).tolist()
        tokens += ids
        char_counts += counts
        chars += rng.integers(0, CHARS, size=sum(counts)).tolist()
        bigrams += rng.integers(0, BIGRAMS - 1, size=max(n - 1, 0)).tolist()
        tok_off.append(len(tokens))
        big_off.append(len(bigrams))
        chr_off.append(len(chars))
    i64 = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return EncodedDocs(
        token_ids=i64(tokens),
        token_offsets=i64(tok_off),
        raw_tokens=np.diff(i64(tok_off)),
        bigram_ids=i64(bigrams),
        bigram_offsets=i64(big_off),
        char_ids=i64(chars),
        char_token_counts=i64(char_counts),
        char_offsets=i64(chr_off),
        labels=rng.integers(0, CLASSES, size=21).astype(np.int64),
    )


def frozen_table() -> torch.Tensor:
    return torch.randn(P, DIM, generator=torch.Generator().manual_seed(7))


def case_specs(case: Case) -> list[TableSpec]:
    return build_table_specs(
        num_pretrained=P,
        num_oov=OOV,
        dim=DIM,
        ngram_buckets=BIGRAMS,
        char_buckets=CHARS,
        masked=case.encoder == "masked_bag",
        pretrained_trainable=case.pretrained_trainable,
        init_std=0.3,
        wide=case.wide,
        num_classes=CLASSES,
    )


def build(info: DistInfo, mode: str, case: Case, seed: int = 0) -> SimpleNamespace:
    """Model, DDP wrapping and optimizers as Trainer.build makes them. mode: single, replicated, row_wise
    (through build_tables, which keeps LocalTables at W=1) or row_wise_forced (RowWiseTables at any W)."""
    specs, frozen = case_specs(case), frozen_table()
    sharding = "row_wise" if mode.startswith("row_wise") else "replicated"
    tables = (
        RowWiseTables(specs, frozen, seed, info)
        if mode == "row_wise_forced"
        else build_tables(sharding, specs, frozen, seed, info)
    )
    # LocalTables' EmbeddingBags draw V x dim numbers from the global RNG before init_rows_ overwrites them, so
    # without a reseed here the dense init would depend on the table sizes (and differ from row_wise)
    torch.manual_seed(1234 + seed)
    cfg = ModelConfig(
        encoder=case.encoder, pooling=case.pooling, hidden=case.hidden, dropout=0.0, lstm_hidden=3,
        wide=",".join(case.wide),
    )
    model = TextClassifier(tables, cfg, P, CLASSES)
    if case.wide:  # as Trainer.build sets it: from the whole training split, the same on every rank
        model.wide_idf = wide_idf(make_docs(), {s.name: s.num_rows for s in specs})
    tables.move_frozen(info.device)
    train_model = wrap_for_training(model, sharding, info)
    ocfg = OptimConfig(
        sparse=case.sparse,
        dense=case.dense,
        sparse_lr=0.2 if case.sparse == "sgd" else 0.05,
        dense_lr=0.05,
        pretrained_lr=0.05,
        warmup_steps=2,
        schedule="linear",
        grad_clip=1.0,
        wide_lr=0.5,
    )
    optim = OptimizerContainer(train_model, ocfg, len(case.batches), case.unfreeze_step, frozen)
    optim.init_state()  # as Trainer.fit does before the first step
    return SimpleNamespace(
        model=model,
        train_model=train_model,
        optim=optim,
        tables=tables,
        specs=specs,
        specs_by_name={s.name: s for s in specs},
        frozen=frozen,
        sharding=sharding,
    )


def gather_rows(local: torch.Tensor, num_rows: int, info: DistInfo, tables, name: str = "") -> torch.Tensor:
    """A row-sharded tensor, whole (independent of RowWiseTables.full_rows); whole tensors (LocalTables', and
    RowWiseTables' tables whole on every rank) pass through."""
    if not isinstance(tables, RowWiseTables) or name in tables.replicated_tables:
        return local.clone()
    import torch.distributed as dist

    chunk = max(1, -(-num_rows // info.world_size))
    padded = local.new_zeros((chunk, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:num_rows]


def table_grad(run: SimpleNamespace, name: str, info: DistInfo) -> torch.Tensor:
    weight = run.tables.bags[name].weight
    local = weight.grad.to_dense() if weight.grad is not None else torch.zeros_like(weight)
    return gather_rows(local, run.tables.specs[name].num_rows, info, run.tables, name)


def train(
    run: SimpleNamespace, info: DistInfo, case: Case, docs: EncodedDocs, batches, first_step: int = 0
) -> dict:
    """The body of Trainer._loop (without logging/checkpointing); records what the oracles compare."""
    weights = class_weights(docs.labels, CLASSES, "inverse_log")
    loss_ctx = SimpleNamespace(
        weights=weights,
        weights_t=torch.from_numpy(weights),
        info=info,
        data=SimpleNamespace(train=SimpleNamespace(labels=docs.labels)),
    )
    rec = {"loss": [], "dense_grad": [], "table_grad": []}
    for step, global_rows in enumerate(batches, start=first_step):
        global_rows = np.asarray(global_rows)
        batch = collate(docs, rank_share(global_rows, info.rank, info.world_size), P, case.encoder == "lstm")
        if step % 2 == 0:  # the data thread's grouping and row-wise routes on even steps (the last, 5 documents,
            run.model.prepare(batch)  # runs the pretrained correction), the forward's own on odd steps
        run.model.delta_active = run.optim.pretrained_active(step)
        run.optim.set_lr(step)
        run.optim.zero_grad()
        logits = run.train_model(batch)
        loss, *_ = Trainer._loss(loss_ctx, logits, batch, global_rows)
        loss.backward()
        if needs_sparse_grad_sync(run.tables, info):  # as Trainer._steps does
            sync_sparse_grads(run.tables, info)
        # sum over ranks of (local sum * W / denominator) = W * global mean
        rec["loss"].append(float(all_reduce_(loss.detach().clone(), info)) / info.world_size)
        rec["dense_grad"].append({run.optim.names[p]: p.grad.clone() for p in run.optim.dense_params()})
        rec["table_grad"].append({n: table_grad(run, n, info) for n in run.tables.bags})
        run.optim.clip_dense(1.0)
        run.optim.step(step)
    return rec


def final_state(run: SimpleNamespace) -> dict:
    """Whole tables (collective for row-wise) and dense parameters."""
    tables = {s.name: run.tables.full_rows(s.name).clone() for s in run.specs}
    dense = {run.optim.names[p]: p.detach().clone() for p in run.optim.dense_params()}
    return {"tables": tables, "dense": dense}


def frozen_hygiene(run: SimpleNamespace) -> dict:
    frozen = run.tables.frozen
    ptr = frozen.untyped_storage().data_ptr()
    same = lambda t: t.numel() > 0 and t.untyped_storage().data_ptr() == ptr  # noqa: E731
    modules = [run.model, run.train_model, run.model.dense]
    state = Trainer.state(SimpleNamespace(model=run.model, optim=run.optim))
    flat = {f"{sec}/{k}": v for sec, d in state.items() for k, v in d.items()}
    ddp = run.model.dense if hasattr(run.model.dense, "module") else None  # DDP wraps the dense part only
    ddp_params = {n for n, _ in ddp.named_parameters()} if ddp is not None else set()
    return {
        "is_param_or_buffer": any(same(t) for m in modules for t in [*m.parameters(), *m.buffers()]),
        "in_optimizer": any(
            same(p) for opt in run.optim.optimizers.values() for g in opt.param_groups for p in g["params"]
        ),
        "in_state": any(same(v.to_local() if hasattr(v, "to_local") else v) for v in flat.values())
        or any("frozen" in k or ".pretrained." in k for k in flat),
        "requires_grad": frozen.requires_grad,
        "ddp_params": sorted(ddp_params),
        "train_model_is_ddp": hasattr(run.train_model, "module"),
        "local_frozen_rows": frozen.shape[0],
    }


# ---------------------------------------------------------------------------------------------------- workers
def _oracle_runs(info: DistInfo, modes: tuple[str, ...]) -> dict:
    docs = make_docs()
    out = {}
    for case in CASES:
        for mode in modes:
            run = build(info, mode, case)
            initial = final_state(run)
            expected_frozen = frozen_table()[
                slice(*shard_rows(P, info.world_size, info.rank))
                if isinstance(run.tables, RowWiseTables)
                else slice(None)
            ]
            rec = train(run, info, case, docs, case.batches)
            out[case.name, mode] = {
                **rec,
                "initial": initial,
                **final_state(run),
                "hygiene": frozen_hygiene(run),
                "frozen_unchanged": torch.equal(run.tables.frozen, expected_frozen),
                "table_type": type(run.tables).__name__,
                "plan": describe_plan(run.specs, run.sharding, info, run.optim),
            }
    return out


def _pooled_edge_cases(info: DistInfo) -> dict:
    """Direct `pooled` calls: rank-dependent segments (none on the last rank), ids (none on rank 1), an empty
    shard, and a table with no rows at all; forward against LocalTables on the same input, gradient (owner's
    rows, gathered) * W against the sum over ranks of LocalTables' gradients."""
    specs = [
        TableSpec("pretrained", P, DIM, False, "pretrained"),
        TableSpec("oov", OOV, DIM, True, "normal", 0.5),
        TableSpec("bigram", BIGRAMS, DIM, True, "normal", 0.5),
    ]
    empty = [
        TableSpec("pretrained", 0, DIM, False, "pretrained"),
        TableSpec("oov", 0, DIM, True, "normal", 0.5),
    ]
    out = {}
    for label, sp, frozen in (("tables", specs, frozen_table()), ("no_rows", empty, torch.zeros(0, 1))):
        rw, local = RowWiseTables(sp, frozen, 3, info), LocalTables(sp, frozen, 3)
        g = torch.Generator().manual_seed(100 + info.rank)
        last = info.rank == info.world_size - 1 and info.world_size > 1
        for spec in sp:
            num_segments = 0 if last else 4
            num_ids = 0 if (info.rank == 1 or not spec.num_rows or last) else 9
            ids = torch.randint(0, max(spec.num_rows, 1), (num_ids,), generator=g)
            offsets = torch.sort(torch.randint(0, num_ids + 1, (num_segments,), generator=g)).values
            if num_segments:
                offsets[0] = 0
            a, b = rw.pooled(spec.name, ids, offsets), local.pooled(spec.name, ids, offsets)
            entry = {
                "forward_err": float((a - b).abs().max()) if a.numel() else 0.0,
                "shape": tuple(a.shape),
                "expected_shape": tuple(b.shape),
            }
            if spec.trainable:
                w = torch.arange(a.numel(), dtype=a.dtype).view_as(a) + 1.0 + info.rank
                (a * w).sum().backward()
                (b * w).sum().backward()
                full_rw = gather_rows(rw.bags[spec.name].weight.grad.to_dense(), spec.num_rows, info, rw)
                full_rw = full_rw * info.world_size
                summed = all_reduce_(local.bags[spec.name].weight.grad.to_dense(), info)
                entry["grad_err"] = float((full_rw - summed).abs().max()) if summed.numel() else 0.0
                entry["grad_is_sparse"] = rw.bags[spec.name].weight.grad.is_sparse
            out[label, spec.name] = entry
        # lists, not generators: every rank makes every collective call even after a mismatch
        out[label, "full_rows"] = all([
            torch.equal(rw.full_rows(s.name).reshape(-1), local.full_rows(s.name).reshape(-1)) for s in sp
        ])
        # a few rows (the projector's words): the same ids on every rank, repeats and every owner's rows included
        def pick(num_rows: int) -> torch.Tensor:
            if not num_rows:
                return torch.zeros(0, dtype=torch.long)
            firsts = torch.tensor(sorted({shard_rows(num_rows, info.world_size, r)[0] for r in range(info.world_size)
                                          if shard_rows(num_rows, info.world_size, r)[0] < num_rows}))
            return torch.cat([firsts, torch.randint(0, num_rows, (7,), generator=torch.Generator().manual_seed(5))])

        picks = {s.name: pick(s.num_rows) for s in sp}
        out[label, "full_rows_on_main"] = all([
            (rw.full_rows_on_main(s.name) is None) if info.rank else
            torch.equal(rw.full_rows_on_main(s.name).reshape(-1), local.full_rows(s.name).reshape(-1)) for s in sp
        ])
        out[label, "rows_of"] = all([torch.equal(rw.rows_of(n, ids).reshape(-1), local.rows_of(n, ids).reshape(-1))
                                     for n, ids in picks.items()])
    return out


def _checkpoint_view_checks(info: DistInfo) -> dict:
    case = CKPT_CASES[1]
    run = build(info, "row_wise_forced", case)
    from torch.distributed.tensor import DTensor

    weight = run.tables.bags["oov"].weight
    view = run.tables.checkpoint_view("tables.bags.oov.weight", weight.data)
    acc = run.optim.state_tensors()["sparse/tables.bags.oov.weight/sum"]
    acc_view = run.tables.checkpoint_view("tables.bags.oov.weight", acc)
    dense = next(p for p in run.optim.dense_params())
    return {
        "is_dtensor": isinstance(view, DTensor),
        "global_shape": tuple(view.shape),
        "stride": view.stride(),
        "shares_storage": view.to_local().untyped_storage().data_ptr() == weight.untyped_storage().data_ptr(),
        "full_equal": torch.equal(view.full_tensor(), run.tables.full_rows("oov")),
        "acc_shape": tuple(acc_view.shape),
        "step_unchanged": run.tables.checkpoint_view(
            "tables.bags.oov.weight", torch.zeros((), dtype=torch.int64)
        ).dim()
        == 0,
        "dense_unchanged": run.tables.checkpoint_view("dense.head.out.weight", dense) is dense,
    }


def _state_values(run: SimpleNamespace, info: DistInfo) -> dict:
    """Live values after training or a load, whole: tables through the live parameters, optimizer state through
    the optimizer's own state tensors (not the checkpoint views)."""

    def whole(name: str, t: torch.Tensor) -> torch.Tensor:
        table = re.fullmatch(r"tables\.bags\.(\w+)\.weight", name)
        if table is None or t.dim() == 0:
            return t.detach().clone()
        return gather_rows(t.detach(), run.specs_by_name[table.group(1)].num_rows, info, run.tables, table.group(1))

    model = {n: whole(n, p) for p, n in run.optim.names.items()}
    optim = {k: whole(k.split("/")[1], v) for k, v in run.optim.state_tensors().items()}
    return {"model": model, "optim": optim}


def _checkpoint_run(info: DistInfo, mode: str, folder: str, save: bool) -> dict:
    """Save (train, save, continue one step) or load (fresh init, load, continue one step) every CKPT_CASE."""
    import torch.distributed.checkpoint as dcp

    docs = make_docs()
    out = {}
    for case in CKPT_CASES:
        run = build(info, mode, case, seed=0 if save else 99)
        if save:
            train(run, info, case, docs, case.batches[:CKPT_TRAIN_STEPS])
        state = Trainer.state(SimpleNamespace(model=run.model, optim=run.optim))
        before = _state_values(run, info)
        if save:
            dcp.save(state, checkpoint_id=f"{folder}/{case.name}")
        else:
            dcp.load(state, checkpoint_id=f"{folder}/{case.name}")
        after = _state_values(run, info)
        rec = train(
            run, info, case, docs, case.batches[CKPT_TRAIN_STEPS : CKPT_TRAIN_STEPS + 1], CKPT_TRAIN_STEPS
        )
        out[case.name] = {"before": before, "after": after, "next_loss": rec["loss"][0], **final_state(run)}
    return out


def worker(info: DistInfo, ckpt_folder: str) -> dict:
    """Everything one world size checks, in one process group."""
    result = {"oracle": _oracle_runs(info, ("row_wise", "row_wise_forced", "replicated"))}
    result["pooled"] = _pooled_edge_cases(info)
    if info.world_size == 2:
        result["view"] = _checkpoint_view_checks(info)
        result["saved"] = _checkpoint_run(info, "row_wise", ckpt_folder, save=True)
    elif info.world_size == 3:
        result["loaded_row_wise"] = _checkpoint_run(info, "row_wise", ckpt_folder, save=False)
        result["loaded_replicated"] = _checkpoint_run(info, "replicated", ckpt_folder, save=False)
    else:
        result["loaded_local"] = _checkpoint_run(info, "row_wise", ckpt_folder, save=False)
    return result


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("row_wise_ckpt")
    yield str(folder)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def reference() -> dict:
    """One process, whole tables, the concatenated global batches."""
    info = DistInfo(0, 0, 1, torch.device("cpu"), "none")
    docs = make_docs()
    out = {}
    for case in CASES:
        run = build(info, "single", case)
        initial = final_state(run)
        out[case.name] = {
            **train(run, info, case, docs, case.batches),
            "initial": initial,
            **final_state(run),
        }
    return out


@pytest.fixture(scope="module")
def runs(ckpt_folder) -> dict[int, list[dict]]:
    """Per world size, the per-rank results of `worker` (W=2 first: it writes the checkpoints W=3 and 1 load)."""
    return {w: run_distributed(worker, w, ckpt_folder, timeout_s=240) for w in (2, 3, 1)}


# ---------------------------------------------------------------------------------------------------- tests
def _close(a, b, what: str) -> None:
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("mode", ["row_wise", "row_wise_forced", "replicated"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_single_process(runs, reference, world_size, mode, case):
    ref = reference[case.name]
    got = runs[world_size][0]["oracle"][case.name, mode]
    where = f"{case.name} {mode} W={world_size}"
    expected_type = (
        "RowWiseTables"
        if mode == "row_wise_forced" or (mode == "row_wise" and world_size > 1)
        else "LocalTables"
    )
    assert got["table_type"] == expected_type
    np.testing.assert_allclose(got["loss"], ref["loss"], **TOL, err_msg=f"{where}: loss")
    for step, (g, r) in enumerate(zip(got["dense_grad"], ref["dense_grad"], strict=True)):
        assert g.keys() == r.keys()
        for name in r:
            _close(g[name], r[name], f"{where} step {step} dense grad {name}")
    for step, (g, r) in enumerate(zip(got["table_grad"], ref["table_grad"], strict=True)):
        for name in r:
            _close(g[name], r[name], f"{where} step {step} table grad {name}")
    for name in ref["tables"]:
        assert torch.equal(got["initial"]["tables"][name], ref["initial"]["tables"][name]), (
            f"{where}: init {name}"
        )
        _close(
            got["tables"][name],
            ref["tables"][name],
            f"{where}: rows of {name} after {len(case.batches)} steps",
        )
    for name in ref["dense"]:
        _close(got["dense"][name], ref["dense"][name], f"{where}: {name} after {len(case.batches)} steps")


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_agree(runs, world_size):
    """Every rank sees the same global loss and the same whole tables (full_rows is a collective)."""
    for case in CASES:
        for mode in ("row_wise", "replicated"):
            first = runs[world_size][0]["oracle"][case.name, mode]
            for other in runs[world_size][1:]:
                got = other["oracle"][case.name, mode]
                assert got["loss"] == first["loss"]
                for name, rows in first["tables"].items():
                    assert torch.equal(got["tables"][name], rows), (case.name, mode, name)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_frozen_table_hygiene(runs, world_size):
    for rank, result in enumerate(runs[world_size]):
        for (case, mode), got in result["oracle"].items():
            h = got["hygiene"]
            where = f"{case} {mode} W={world_size} rank {rank}"
            assert not h["is_param_or_buffer"], f"{where}: the frozen table is a parameter or buffer"
            assert not h["in_optimizer"], f"{where}: the frozen table is in an optimizer"
            assert not h["in_state"], f"{where}: the frozen table is in the checkpoint state"
            assert not h["requires_grad"]
            assert got["frozen_unchanged"], f"{where}: the frozen rows changed"
            if got["table_type"] == "RowWiseTables":
                assert h["local_frozen_rows"] == len(range(*shard_rows(P, world_size, rank)))
            # DDP holds the dense part only, in both modes (replicated tables: sync_sparse_grads)
            assert h["ddp_params"] and not any("bags" in n or "tables" in n for n in h["ddp_params"])
            assert h["train_model_is_ddp"] is False


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_untouched_rows_are_bit_identical(runs, reference, world_size):
    """Pretrained row P-1 (hence its mask and correction rows) and bigram row BIGRAMS-1 are never looked up. The
    tables start as one process would start them, whatever the sharding: OOV rows drawn, bigram rows zero."""
    untouched = {"bigram": BIGRAMS - 1, "mask": P - 1, "pretrained_delta": P - 1}
    init = torch.empty(OOV, DIM)
    init_rows_(init, TableSpec("oov", OOV, DIM, True, "normal", 0.3), torch.Generator().manual_seed(0))
    checked = 0
    for (case, mode), got in runs[world_size][0]["oracle"].items():
        for name, row in untouched.items():
            if name in got["tables"]:
                assert torch.equal(got["tables"][name][row], got["initial"]["tables"][name][row]), (
                    case,
                    mode,
                    name,
                )
                checked += 1
        assert torch.equal(got["initial"]["tables"]["oov"], init) and init.abs().sum() > 0
        assert torch.equal(got["initial"]["tables"]["bigram"], torch.zeros(BIGRAMS, DIM))
        # and the rows that were touched did move
        assert not torch.equal(got["tables"]["oov"], got["initial"]["tables"]["oov"]), (case, mode)
    assert checked >= 3 * len(CASES)


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_pooled_edge_cases(runs, world_size):
    """Zero segments, zero ids, an empty shard and a table without rows, forward and backward, on every rank."""
    for rank, result in enumerate(runs[world_size]):
        for key, entry in result["pooled"].items():
            if key[1] in ("full_rows", "full_rows_on_main", "rows_of"):
                assert entry, f"rank {rank}: {key[1]} of {key[0]} differ from LocalTables"
                continue
            assert entry["shape"] == entry["expected_shape"], (rank, key)
            assert entry["forward_err"] < 1e-6, (rank, key)
            if "grad_err" in entry:
                assert entry["grad_err"] < 1e-5, (rank, key)
                assert entry["grad_is_sparse"], (rank, key)


@pytest.mark.slow
def test_sharding_plan_and_checkpoint_view(runs):
    view = runs[2][0]["view"]
    assert view["is_dtensor"] and view["shares_storage"] and view["full_equal"]
    assert view["global_shape"] == (OOV, DIM) and view["stride"] == (DIM, 1)
    assert view["acc_shape"] == (OOV,)  # row-wise Adagrad: one number per row, sharded by row too
    assert view["step_unchanged"] and view["dense_unchanged"]
    plan = runs[3][0]["oracle"]["bag-sparse_adam", "row_wise"]["plan"]
    assert "row_wise, world size 3" in plan
    oov_line = next(line for line in plan.splitlines() if line.split()[:1] == ["oov"])
    assert oov_line.split()[4] == "1"  # ceil(2 / 3) rows on the fullest rank
    # model.wide's tables stay whole on every rank under row_wise: all P + OOV word rows, where mask has 3
    plan = runs[3][0]["oracle"]["masked_bag-sgd-wide", "row_wise"]["plan"]
    rows_per_rank = {line.split()[0]: line.split()[4] for line in plan.splitlines()[2:-1]}
    assert rows_per_rank["wide_word"] == "9" and rows_per_rank["mask"] == "3"
    assert rows_per_rank["wide_bigram"] == str(BIGRAMS)


def _assert_state_equal(got: dict, expected: dict, where: str) -> None:
    for section in ("model", "optim"):
        assert got[section].keys() == expected[section].keys(), f"{where}: {section} keys"
        for key, value in expected[section].items():
            assert torch.equal(got[section][key].to(value.dtype), value), f"{where}: {section} {key}"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["W=1", "W=3 row_wise", "W=3 replicated"])
def test_dcp_reshards_row_wise_checkpoint(runs, target):
    """Saved by W=2 row-wise (row-sharded DTensors over the live tables and optimizer state); loaded into another
    world size / layout, the LIVE parameters and optimizer state hold the saved values, on every rank, and the
    next step (a one-document batch: some W=3 ranks have no documents) continues identically."""
    key = {
        "W=1": (1, "loaded_local"),
        "W=3 row_wise": (3, "loaded_row_wise"),
        "W=3 replicated": (3, "loaded_replicated"),
    }[target]
    saved = runs[2][0]["saved"]
    for rank, result in enumerate(runs[key[0]]):
        for case in CKPT_CASES:
            got, ref = result[key[1]][case.name], saved[case.name]
            where = f"{case.name} -> {target} rank {rank}"
            # the fresh model really differed before the load (another init seed)
            assert not torch.equal(
                got["before"]["model"]["tables.bags.oov.weight"],
                ref["before"]["model"]["tables.bags.oov.weight"],
            ), where
            _assert_state_equal(got["after"], ref["before"], where)
            assert abs(got["next_loss"] - ref["next_loss"]) < 1e-5, where
            for name, rows in ref["tables"].items():
                _close(got["tables"][name], rows, f"{where}: {name} after the next step")
            for name, value in ref["dense"].items():
                _close(got["dense"][name], value, f"{where}: {name} after the next step")


def _raise_on_rank_one(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.rank == 1:
        raise ValueError("rank one fails before the collective")
    dist.all_reduce(torch.ones(1))  # rank 0 waits here for a rank that never comes


def _sleep_forever(info: DistInfo) -> None:
    import time

    time.sleep(3600)


@pytest.mark.slow
def test_harness_reports_a_failing_rank_and_stops_the_others():
    with pytest.raises(DistributedRunError, match="rank 1 raised:(.|\n)*rank one fails"):
        run_distributed(_raise_on_rank_one, 2, timeout_s=60, pg_timeout_s=60, grace_s=1)


@pytest.mark.slow
def test_harness_times_out_a_hung_run():
    with pytest.raises(DistributedRunError, match="killed \\(the 2 s run limit"):
        run_distributed(_sleep_forever, 2, timeout_s=2)


def test_lstm_rank_without_documents():
    net = DenseNet(ModelConfig(encoder="lstm", lstm_hidden=3), DIM, CLASSES)
    x = torch.zeros(0, DIM, requires_grad=True)
    net(x, torch.zeros(0, dtype=torch.long)).sum().backward()
    # the LSTM parameters must get (zero) gradients too, or DDP waits for them on the other ranks
    assert all(p.grad is not None for p in net.parameters())


def test_shard_rows_layout():
    """torch.chunk / DTensor Shard(0) layout: ceil(V/W) rows per rank, trailing ranks possibly empty."""
    for num_rows in range(0, 12):
        for world in range(1, 5):
            chunks = torch.arange(num_rows).chunk(world) if num_rows else ()
            sizes = [len(c) for c in chunks] + [0] * (world - len(chunks))
            ranges = [shard_rows(num_rows, world, r) for r in range(world)]
            assert [b - a for a, b in ranges] == sizes
            assert all(ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
            assert (ranges[0][0], ranges[-1][1]) == (0, num_rows)
