"""eval / predict / neighbors over an exported model (single process)."""

import dataclasses
import hashlib
import json
import os
import re
import select
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from trainer.batch import collate
from trainer.data_cache import make_featurizer, stream_tokenized
from trainer.distributed import DistInfo
from trainer.evaluation import EvalTotals, per_class_table
from trainer.export import LoadedModel, ModelFolderError, word_vectors
from trainer.vocab import char_ngram_buckets


def model_folder(run: str) -> Path:
    """Accept the run folder or its model/ subfolder."""
    path = Path(run)
    if (path / "model" / "model.json").exists():
        return path / "model"
    if (path / "model.json").exists():
        return path
    raise FileNotFoundError(f"--run {run}: no exported model (expected {path / 'model' / 'model.json'}); "
                            "training exports it when it finishes")


def eval_folder(model_dir: Path) -> Path:
    """Where `trainer eval` writes: the run's `eval/` when `model_dir` is a run's `model/` folder (what `trainer
    report` reads), else `eval/` inside the model folder itself: a model copied on its own (deployed beside others)
    must not write into whatever folder holds it."""
    run = model_dir.parent
    if model_dir.name == "model" and any((run / marker).exists() for marker in (
            "result.json", "metrics.jsonl", "checkpoints")):  # a run's own files (config.toml is anybody's)
        return run / "eval"
    return model_dir / "eval"


def _eval_name(out_dir: Path, spec: str, source: str, extend: bool) -> str:
    """The evaluation's file name: the data file's name (and `.no-extend`), so evaluating the same file again
    replaces its result; a different file of the same name (another folder's test.csv) gets the name plus a short
    hash of its path instead of replacing the earlier one's result silently."""
    base, suffix = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec).name), "" if extend else ".no-extend"
    try:
        earlier = json.loads((out_dir / f"{base}{suffix}.json").read_text(encoding="utf-8")).get("data")
    except (OSError, ValueError, AttributeError):
        return base + suffix
    if earlier in (None, source):
        return base + suffix
    return f"{base}-{hashlib.sha256(source.encode()).hexdigest()[:8]}{suffix}"


def _write_atomic(path: Path, text: str) -> None:
    """Temp file + rename (not trainer.checkpoint's: that import pulls in DCP, seconds for a predict)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _local_info(device: torch.device) -> DistInfo:
    return DistInfo(0, 0, 1, device, "none")


EVAL_PIECE_TOKENS = 1 << 21  # tokens `trainer eval` encodes and scores at a time
# characters of text `trainer eval` tokenizes at a time: a quarter of the data cache's batch at 1 worker. Measured
# on a 295 MB CSV: peak 1.69 GiB at the data cache's batch (128M characters at 2 workers), 1.37 GiB at this one,
# of which 1.0 GiB is the model and libraries; same time
EVAL_BATCH_CHARS = 16 << 20


def run_eval(run: str, data: str, device: str = "cpu", extend: bool = True, text_column: str | None = None,
             label_column: str | None = None) -> tuple[dict, str]:
    """Metrics of the exported model on `data`. `extend`: words unseen in training get their pretrained rows
    (LoadedModel), as `predict` does by default; the figures can then differ slightly from the run's own test
    evaluation, which `extend=False` reproduces exactly. `text_column` / `label_column`: `data`'s, where they
    are not the run's (`data.text_column`, `data.label_column`)."""
    folder = model_folder(run)
    loaded = LoadedModel(folder, device, extend_pretrained=extend)
    cfg = loaded.cfg
    if text_column or label_column:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, text_column=text_column or cfg.data.text_column, label_column=label_column or cfg.data.label_column))
    featurizer = make_featurizer(cfg, loaded.vocab)
    info = _local_info(loaded.device)
    totals = EvalTotals(len(loaded.vocab.labels))
    unseen: set[str] = set()

    def take(tokenized, labels: list[str]) -> None:
        # encoded and scored a piece at a time: a piece's ids in memory (about 8-24 bytes a token), not a batch's
        for docs_slice, piece in tokenized.pieces(EVAL_PIECE_TOKENS):
            docs = featurizer.encode_tokenized(piece, labels[docs_slice])
            totals.add(loaded.model, docs, loaded.vocab.num_pretrained, cfg.model.encoder == "lstm", info)
        unseen.update(y for y in labels if y not in loaded.vocab.label_index)

    def restart() -> None:
        totals.reset()
        unseen.clear()

    # read, tokenized, encoded and scored a batch of texts at a time (the data cache's batches), and the batch
    # dropped: a large evaluation file is never held whole, nor written anywhere (a bare hub name: its test split)
    _, skipped = stream_tokenized(data, cfg, "test", featurizer.tokenizer, featurizer.workers, take, restart,
                                  setting="--data", batch_chars=EVAL_BATCH_CHARS)
    metrics = totals.metrics(info)
    metrics["skipped_empty"] = skipped
    metrics["extended_words"] = loaded.num_extended
    unseen_labels = sorted(unseen)
    metrics["unseen_labels"] = unseen_labels
    text = per_class_table(metrics, loaded.vocab.labels)
    if unseen_labels:
        text += f"\n{metrics['unseen_label_docs']} documents have labels never seen in training (counted as errors): " \
                f"{', '.join(unseen_labels[:20])}"
    out_dir = eval_folder(folder)
    try:
        out_dir.mkdir(exist_ok=True)
    except OSError as e:  # a read-only deployed model folder
        raise ModelFolderError(f"{out_dir}: cannot write the evaluation there ({e.strerror or e}); copy the "
                               "model folder somewhere writable") from None
    metrics["data"] = str(Path(data).resolve()) if Path(data).exists() else data
    metrics["extend"] = extend
    name = _eval_name(out_dir, data, metrics["data"], extend)
    _write_atomic(out_dir / f"{name}.per_class.txt", text + "\n")
    _write_atomic(out_dir / f"{name}.json", json.dumps(metrics))
    summary = {k: metrics[k] for k in ("accuracy", "macro_f1", "n", "loss", "unseen_label_docs", "skipped_empty",
                                       "extended_words")}
    return summary, text


class Predictor:
    def __init__(self, run: str, device: str = "cpu", extend: bool = True) -> None:
        self.loaded = LoadedModel(model_folder(run), device, extend_pretrained=extend)
        self.featurizer = make_featurizer(self.loaded.cfg, self.loaded.vocab)
        self.token_level = self.loaded.cfg.model.encoder == "lstm"

    @torch.no_grad()
    def probabilities(self, texts: list[str]) -> tuple[torch.Tensor, dict[str, list[int]]]:
        """Class probabilities (len(texts), labels), columns in `loaded.vocab.labels` order, and per text:
        `known_words`, its tokens found in the vocabulary, and `features`, the ids looked up (those words, word
        bigram buckets, char n-grams; hashed n-grams exist for unknown words too). features 0 means the model saw
        nothing of the text and the label is the biases' choice."""
        docs = self.featurizer.encode(texts)
        batch = collate(docs, np.arange(len(texts)), self.loaded.vocab.num_pretrained, self.token_level)
        probs = torch.softmax(self.loaded.model(batch.to(self.loaded.device)).float(), dim=1).cpu()
        doc_of_token = np.repeat(np.arange(len(texts)), np.diff(docs.token_offsets))
        known = np.bincount(doc_of_token[docs.token_ids >= 0], minlength=len(texts))
        return probs, {"known_words": known.tolist(), "features": batch.lengths.round().long().tolist()}

    def predict(self, texts: list[str], top_k: int = 1) -> list[dict]:
        probs, counts = self.probabilities(texts)
        k = min(top_k, probs.shape[1])
        scores, idx = probs.topk(k, dim=1)
        labels = self.loaded.vocab.labels
        out = []
        for s_row, i_row, known, n in zip(scores.tolist(), idx.tolist(), counts["known_words"], counts["features"],
                                          strict=True):
            top = [{"label": labels[i], "score": round(s, 6)} for s, i in zip(s_row, i_row, strict=True)]
            out.append({"label": top[0]["label"], "score": top[0]["score"], "top_k": top, "known_words": known,
                        "features": n})
        return out

    def predict_stream(self, lines: Iterable[str], top_k: int, chunk: int = 512) -> Iterator[dict]:
        """Predictions for `lines`, scored `chunk` lines at a time; from a pipe, a FIFO or a terminal (`lines` an
        open file that is not a regular one), also whenever no further input is waiting, so an answer does not
        wait for 511 more lines (`tail -f log | trainer predict` gave nothing until its input ended)."""
        fd = interactive_fd(lines)
        buffer: list[str] = []
        for line in lines:
            buffer.append(line.rstrip("\n"))
            if len(buffer) == chunk or (fd is not None and not select.select([fd], [], [], 0)[0]):
                yield from self.predict(buffer, top_k)
                buffer = []
        if buffer:
            yield from self.predict(buffer, top_k)


def neighbors(run: str, word: str, k: int = 10) -> list[dict]:
    """Nearest words by cosine over the pretrained rows and the learned rows. A word outside the vocabulary is
    represented by its character n-grams (when the model has them)."""
    loaded = LoadedModel(model_folder(run))
    vocab, cfg, model = loaded.vocab, loaded.cfg, loaded.model
    query = word.lower() if cfg.data.lowercase else word
    vectors = word_vectors(model, vocab)
    idx = vocab.index.get(query)
    if idx is not None:
        q = vectors[idx].copy()
    elif model.tables.has("char"):
        ids = char_ngram_buckets(query, cfg.embeddings.char_minn, cfg.embeddings.char_maxn, cfg.embeddings.char_ngrams)
        q = model.tables.full_rows("char").cpu().numpy()[ids].sum(0)
        if not q.any():  # its n-gram rows never trained: they are still at zero, every score would be 0
            raise KeyError(f"{word!r} is not in the vocabulary, and none of its character n-grams was seen in "
                           "training")
    elif cfg.embeddings.char_ngrams:  # model.deep_chars = false: its char n-grams are one logit per class
        raise KeyError(f"{word!r} is not in the vocabulary, and the model's character n-grams feed only its wide "
                       "part (model.deep_chars = false), so they give the word no vector")
    else:
        raise KeyError(f"{word!r} is not in the vocabulary and the model has no character n-grams")
    norms = np.linalg.norm(vectors, axis=1) * (np.linalg.norm(q) or 1.0)
    scores = vectors @ q / np.where(norms > 0, norms, 1.0)
    if idx is not None:
        scores[idx] = -np.inf
    top = np.argsort(-scores, kind="stable")[: min(k, len(scores) - (idx is not None))]  # never the word itself
    return [{"word": vocab.words[i], "score": round(float(scores[i]), 6),
             "kind": "pretrained" if i < vocab.num_pretrained else "learned"} for i in top]


def interactive_fd(lines: object) -> int | None:
    """The file descriptor of `lines` when it is a pipe, FIFO, socket or terminal (input that arrives over time),
    else None (a regular file, a list)."""
    try:
        fd = lines.fileno()  # type: ignore[attr-defined]
        return None if stat.S_ISREG(os.fstat(fd).st_mode) else fd
    except (AttributeError, OSError, ValueError):
        return None


def print_jsonl(rows: Iterable[dict], stream=sys.stdout, flush: bool = False) -> None:
    """One JSON object per line; `flush`: after each, for a reader waiting on a pipe."""
    for row in rows:
        stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        if flush:
            stream.flush()
