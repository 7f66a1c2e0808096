"""The exported model: one self-contained folder `RUN_DIR/model/` that eval, predict and neighbors load.

Contents: `weights.pt` (every trainable table, whole or, when zero-initialised and mostly untouched, as its nonzero
rows; and the dense state), `frozen.npy` (the pretrained rows the vocabulary uses), `vocab/`, `config.toml`,
`model.json` (labels, table shapes, fingerprints). Written to a temporary folder and renamed into place, so a crash
never leaves a half model. DCP checkpoints are for resuming; this folder is the release format.
"""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer.config import Config, config_from_dict, dump_toml
from trainer.distributed import DistInfo
from trainer.embeddings import LocalTables, TableSpec
from trainer.model import TextClassifier
from trainer.vocab import Vocabulary

log = logging.getLogger(__name__)


class ModelFolderError(ValueError):
    """An exported model folder that cannot be loaded as it is (incomplete, or missing a table's weights): the CLI
    prints the message on one line."""


def _dense_module(model: TextClassifier) -> nn.Module:
    dense = model.dense
    return dense.module if hasattr(dense, "module") else dense


def _save_without_crc(obj: dict, path: Path) -> None:
    """torch.save without the zip entries' CRC32s. Why: they cost 0.15-0.25 s of the demo's 210 MB export, and
    torch.load never checks them (a flipped byte loads silently, tried on torch 2.13); model.json's file sizes
    catch the usual damage, a truncated file. Zip tools (`unzip -t`, Python's zipfile) report the zero CRCs as
    errors. A torch without the switch (it is recent) saves with CRCs as before."""
    from torch import serialization

    if not hasattr(serialization, "set_crc32_options"):
        torch.save(obj, path)
        return
    before = serialization.get_crc32_options()
    serialization.set_crc32_options(False)
    try:
        torch.save(obj, path)
    finally:
        serialization.set_crc32_options(before)


SPARSE_PREFIX = "tables_sparse."
# A zero-initialised table is stored as its nonzero rows when at most this share of its rows is nonzero. Why: the
# hashed n-gram tables start at zero and a short run touches a part of them (the demo's 2 epochs: 50% of 1M bigram
# buckets), and the export of the whole table was the largest fixed cost of a short run (0.24-0.6 s of 200 MB here).
# The cost: rank 0 copies the nonzero rows to save them (up to this share of the table, beside the table), and a
# load holds them beside the rebuilt table.
SPARSE_MAX_SHARE = 0.75
# model.json's "weights_format": 1 (absent) every table whole; 2 zero-initialised tables may be stored sparse. A
# loader refuses a format above its own with a message (a checkout from before format 2 reports the sparse tables as
# missing instead).
WEIGHTS_FORMAT = 2


def _nonzero_rows(table: torch.Tensor, block: int = 65536) -> torch.Tensor:
    """Ids of the rows with an element != 0 (NaN counts, -0.0 does not), in order; in blocks, so no table-sized
    temporary. float32 rows are tested as their bits without the sign's: 45 ms for 1M x 50, against 80 ms for
    `ne(0).any(1)`."""

    def nonzero_in(rows: torch.Tensor) -> torch.Tensor:
        if rows.dtype == torch.float32:
            return (rows.view(torch.int32) & 0x7FFFFFFF).amax(dim=1).ne(0)
        return rows.ne(0).any(dim=1)

    found = [nonzero_in(table[lo : lo + block]).nonzero().squeeze(1) + lo for lo in range(0, table.shape[0], block)]
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.int64)


def _table_entries(spec: TableSpec, table: torch.Tensor) -> dict[str, torch.Tensor]:
    """weights.pt's entries for one trainable table: `tables.NAME` whole, or, for a zero-initialised table that is
    mostly still zero, `tables_sparse.NAME.rows` and `.values` (its nonzero rows; the loader fills in the zeros)."""
    if spec.init == "zeros" and table.shape[0] > 0:
        rows = _nonzero_rows(table)
        if rows.shape[0] <= SPARSE_MAX_SHARE * table.shape[0]:
            return {f"{SPARSE_PREFIX}{spec.name}.rows": rows, f"{SPARSE_PREFIX}{spec.name}.values": table[rows]}
    return {f"tables.{spec.name}": table.contiguous()}


def _dense_tables(weights: dict[str, torch.Tensor], specs: list[TableSpec], path: Path) -> dict[str, torch.Tensor]:
    """Every table of weights.pt as a whole tensor, the sparse-stored ones (`_table_entries`) rebuilt."""
    tables = {k.removeprefix("tables."): v for k, v in weights.items() if k.startswith("tables.")}
    by_name = {s.name: s for s in specs}
    for key in weights:
        if not (key.startswith(SPARSE_PREFIX) and key.endswith(".rows")):
            continue
        name = key.removeprefix(SPARSE_PREFIX).removesuffix(".rows")
        rows, values, spec = weights[key], weights.get(f"{SPARSE_PREFIX}{name}.values"), by_name.get(name)
        if (spec is None or values is None or rows.dim() != 1 or tuple(values.shape) != (rows.shape[0], spec.dim)
                or (rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= spec.num_rows))):
            raise ModelFolderError(f"{path}: the stored rows of table {name} do not fit its shape "
                                   f"({spec.num_rows if spec else '?'} x {spec.dim if spec else '?'} in model.json)")
        table = torch.zeros(spec.num_rows, spec.dim, dtype=values.dtype)
        table[rows] = values
        tables[name] = table
    return tables


def export_model(folder: Path, model: TextClassifier, vocab: Vocabulary, frozen: torch.Tensor, cfg: Config,
                 specs: list[TableSpec], fingerprints: dict, info: DistInfo) -> None:
    # every rank takes part: row-wise tables gather their shards to rank 0 here
    tables = {s.name: model.tables.full_rows_on_main(s.name) for s in specs if s.trainable}
    if not info.is_main:
        return
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {}
    for spec in specs:
        if spec.trainable:
            weights.update(_table_entries(spec, tables[spec.name].detach().cpu()))
    weights.update({f"dense.{k}": v.detach().cpu() for k, v in _dense_module(model).state_dict().items()})
    weights.update({f"wide_idf.{k}": v.cpu() for k, v in model.wide_idf.items()})
    _save_without_crc(weights, tmp / "weights.pt")
    np.save(tmp / "frozen.npy", frozen.cpu().numpy())
    vocab.save(tmp / "vocab")
    (tmp / "config.toml").write_text(dump_toml(cfg), encoding="utf-8")
    meta = {
        "labels": vocab.labels,
        "table_specs": [{"name": s.name, "num_rows": s.num_rows, "dim": s.dim, "trainable": s.trainable, "init": s.init,
                    "init_std": s.init_std} for s in specs],
        "weights_format": WEIGHTS_FORMAT,
        "delta_active": bool(model.delta_active) or cfg.pretrained_trainable,
        # sizes checked at load: a truncated copy (a full disk, an interrupted transfer) fails with a message
        "file_bytes": {name: (tmp / name).stat().st_size for name in ("weights.pt", "frozen.npy")},
        **fingerprints,
    }
    (tmp / "model.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if folder.exists():
        old = folder.with_name(folder.name + f".old{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)


class LoadedModel:
    """An exported model ready for inference on one device."""

    def __init__(self, folder: Path, device: torch.device | str = "cpu", extend_pretrained: bool = True) -> None:
        folder = Path(folder)
        if not (folder / "model.json").exists():
            raise FileNotFoundError(f"{folder}: no exported model here (model.json missing); "
                                    "train to completion first, or pass the run folder")
        import tomllib

        self.folder = folder
        reading = folder / "model.json"  # the file named in the message when it cannot be read
        try:
            self.meta = json.loads(reading.read_text(encoding="utf-8"))
            missing = [k for k in ("table_specs", "labels", "delta_active") if k not in self.meta]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            reading = folder / "config.toml"
            saved = tomllib.loads(reading.read_bytes().decode("utf-8"))
        except (OSError, ValueError, TypeError) as e:  # JSONDecodeError, TOMLDecodeError, UnicodeDecodeError
            raise ModelFolderError(f"{reading}: not a readable exported model file ({e}); export it again or copy "
                                   "the folder again") from None
        # a model exported before data.tokenizer_version existed was trained with tokenizer 1: keep featurizing its
        # input that way, not with the current default
        saved.setdefault("data", {}).setdefault("tokenizer_version", 1)
        self.cfg: Config = config_from_dict(saved)
        for name, size in self.meta.get("file_bytes", {}).items():  # absent in models exported before it existed
            found = (folder / name).stat().st_size if (folder / name).exists() else None
            if found != size:
                raise ModelFolderError(f"{folder / name}: {'missing' if found is None else f'{found:,} bytes'}, the "
                                 f"export wrote {size:,}; the model folder is incomplete (copy it again)")
        found_format = self.meta.get("weights_format", 1)
        if not isinstance(found_format, int) or found_format > WEIGHTS_FORMAT:
            raise ModelFolderError(f"{folder / 'model.json'}: weights format {found_format!r}, from a newer trainer; "
                                   f"this one reads formats up to {WEIGHTS_FORMAT} (upgrade the trainer package)")
        try:
            self.vocab = Vocabulary.load(folder / "vocab")
        except (OSError, ValueError) as e:
            raise ModelFolderError(f"{folder / 'vocab'}: the model's vocabulary cannot be read ({e}); the model folder "
                                   "is incomplete (copy it again)") from None
        weights = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
        frozen = torch.from_numpy(np.load(folder / "frozen.npy"))
        specs = [TableSpec(**t) for t in self.meta["table_specs"]]
        tables_w = _dense_tables(weights, specs, folder / "weights.pt")
        self.wide_idf = {k.removeprefix("wide_idf."): v for k, v in weights.items() if k.startswith("wide_idf.")}
        self.num_extended = 0
        if extend_pretrained:
            frozen, tables_w, specs = self._extend(frozen, tables_w, specs)
        self.specs = specs
        missing = sorted({s.name for s in specs if s.trainable} - set(tables_w))
        if missing:
            raise ModelFolderError(f"{folder / 'weights.pt'}: no weights for table(s) {', '.join(missing)}")
        tables = LocalTables(specs, frozen, seed=0, rows=tables_w)
        self.model = TextClassifier(tables, self.cfg.model, self.vocab.num_pretrained, len(self.vocab.labels))
        self.model.dense.load_state_dict({k.removeprefix("dense."): v for k, v in weights.items()
                                          if k.startswith("dense.")})
        self.model.delta_active = self.meta["delta_active"]
        self.model.wide_idf = self.wide_idf
        self.device = torch.device(device)
        self.model.to(self.device)
        tables.move_frozen(self.device)
        self.model.eval()

    def _extend(self, frozen, tables_w, specs):
        """Give words never seen in training their pretrained rows (when the source is available and unchanged):
        they join the pretrained range, the mask gets rows of ones and the correction rows of zeros for them."""
        source = self.meta.get("pretrained_source")
        if not source or self.cfg.embeddings.full_pretrained:
            return frozen, tables_w, specs
        from trainer.vectors import VectorFileError, load_vectors

        cache = Path(self.cfg.embeddings.vectors_cache_dir) if self.cfg.embeddings.vectors_cache_dir else None
        try:
            pv = load_vectors(source, cache_dir=cache)
        except (VectorFileError, OSError) as e:
            fallback = ("their character n-grams" if self.cfg.embeddings.char_ngrams else
                        "only the word n-gram buckets they are part of" if self.cfg.embeddings.ngram_buckets else
                        "nothing of them")
            log.warning("pretrained source %s unavailable (%s): words unseen in training get no pretrained row (the "
                        "model sees %s; --no-extend does not look for the file)", source, e, fallback)
            return frozen, tables_w, specs
        if pv.fingerprint != self.meta["pretrained_fingerprint"]:
            log.warning("pretrained source %s changed since training; not extending the vocabulary", source)
            return frozen, tables_w, specs
        known = self.vocab.index
        extra = [i for i, w in enumerate(pv.words) if w not in known]
        if not extra:
            return frozen, tables_w, specs
        p, x = self.vocab.num_pretrained, len(extra)
        extra_rows = np.asarray(extra, dtype=np.int64)
        frozen = torch.cat([frozen, torch.from_numpy(pv.take(extra_rows))])
        if "pretrained_delta" in tables_w:
            d = tables_w["pretrained_delta"]
            tables_w["pretrained_delta"] = torch.cat([d, d.new_zeros(x, d.shape[1])])
        if "mask" in tables_w:
            m = tables_w["mask"]
            tables_w["mask"] = torch.cat([m[:p], m.new_ones(x, m.shape[1]), m[p:]])
        if "wide_word" in tables_w:  # words unseen in training: no wide weight (zero rows, idf 0)
            w = tables_w["wide_word"]
            tables_w["wide_word"] = torch.cat([w[:p], w.new_zeros(x, w.shape[1]), w[p:]])
            if "wide_word" in self.wide_idf:
                i = self.wide_idf["wide_word"]
                self.wide_idf["wide_word"] = torch.cat([i[:p], i.new_zeros(x), i[p:]])
        words = self.vocab.words
        self.vocab = Vocabulary(
            words=words[:p] + [pv.words[i] for i in extra] + words[p:],
            num_pretrained=p + x,
            pretrained_rows=np.concatenate([self.vocab.pretrained_rows, extra_rows]),
            counts=np.concatenate([self.vocab.counts[:p], np.zeros(x, dtype=np.int64), self.vocab.counts[p:]]),
            labels=self.vocab.labels,
        )
        grow = {"pretrained": x, "pretrained_delta": x, "mask": x, "wide_word": x}
        specs = [TableSpec(s.name, s.num_rows + grow.get(s.name, 0), s.dim, s.trainable, s.init, s.init_std)
                 for s in specs]
        self.num_extended = x
        return frozen, tables_w, specs


def word_vectors(model: TextClassifier, vocab: Vocabulary) -> np.ndarray:
    """Each vocabulary word's effective row: (E(w) + correction(w)) * M(w) for every word in the vocabulary."""
    return chosen_word_vectors(model, torch.arange(vocab.num_pretrained + vocab.num_oov), vocab.num_pretrained)


def projector_rows(model: TextClassifier, vocab: Vocabulary, n: int, info: DistInfo):
    """The most frequent learned (OOV) words next to the most frequent pretrained words, for the projector.

    Collective for row-wise tables (every rank calls it; rank 0 gets the rows, the others None). Only the chosen
    words' rows are read: computing every word's vector first copied the whole frozen table to host memory on every
    rank, several times a table's size per rank with 8 GPU ranks on a node, at the end of a run."""
    if n <= 0:
        return None
    p = vocab.num_pretrained
    counts = np.asarray(vocab.counts)
    pre = np.argsort(-counts[:p], kind="stable")[: n // 2]
    oov = p + np.argsort(-counts[p:], kind="stable")[: n - len(pre)]
    chosen = np.concatenate([pre, oov])
    vectors = chosen_word_vectors(model, torch.from_numpy(chosen), p)
    if not info.is_main:
        return None
    labels = [[vocab.words[i], "pretrained" if i < p else "learned", str(int(counts[i]))] for i in chosen]
    return vectors, labels, ["word", "kind", "count"]


def chosen_word_vectors(model: TextClassifier, ids: torch.Tensor, num_pretrained: int) -> np.ndarray:
    """(E(w) + correction(w)) * M(w) for the vocabulary ids `ids` (pretrained ids below `num_pretrained`, then OOV),
    reading only those rows. Collective for row-wise tables (`rows_of`)."""
    t = model.tables
    is_pre = ids < num_pretrained
    pre_ids, oov_ids = ids[is_pre], ids[~is_pre] - num_pretrained
    pre = t.rows_of("pretrained", pre_ids)
    if t.has("pretrained_delta") and model.delta_active:
        pre = pre + t.rows_of("pretrained_delta", pre_ids)
    rows = torch.empty(ids.shape[0], pre.shape[1])
    rows[is_pre] = pre
    rows[~is_pre] = t.rows_of("oov", oov_ids)
    if t.has("mask"):
        rows = rows * t.rows_of("mask", ids)
    return rows.numpy()
