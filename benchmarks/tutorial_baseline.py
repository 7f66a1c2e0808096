"""A tutorial-style PyTorch text classifier, the baseline most people would write first. One process, one JSON line.

What "tutorial-style" means here (the shape of the PyTorch text-classification tutorials):
  - tokenizer: lowercase, then the regex `\\w+`; vocabulary of every training word plus <pad> and <unk>;
  - a DataLoader with shuffle, batches of 64 documents, numericalized and padded in `collate_fn` every epoch;
  - nn.Embedding(padding_idx=0) -> mean over the non-pad tokens -> nn.Linear; cross-entropy; Adam on every
    trainable parameter (dense gradients, so each step updates the whole embedding table); 3 epochs.
  - `--pretrained glove-6b-50d --freeze`: rows of training words found in GloVe start from their vectors (read
    with the trainer's `trainer.vectors.load_vectors`), the others from zeros as torchtext does, and the whole
    table is frozen (only the linear layer learns).

tokens/s counts tokenizer tokens of the training documents x epochs over the training-loop seconds (evaluation
excluded), the same definition as the trainer's `throughput/tokens_per_s`.

    python benchmarks/tutorial_baseline.py [--pretrained glove-6b-50d --freeze] [--threads 2] [--epochs 3]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import resource
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
PAD, UNK = 0, 1
TOKEN_RE = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    return TOKEN_RE.findall(text.lower())


def read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(row["text"], row["label"]) for row in csv.DictReader(f)]


def build_vocab(texts: list[str]) -> dict[str, int]:
    counts = Counter(tok for text in texts for tok in tokenize(text))
    vocab = {"<pad>": PAD, "<unk>": UNK}
    for word, _ in counts.most_common():
        vocab[word] = len(vocab)
    return vocab


class MeanEmbeddingClassifier(nn.Module):
    def __init__(self, num_words: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_words, dim, padding_idx=PAD)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        mask_BT1 = (ids_BT != PAD).unsqueeze(-1).float()
        summed_BD = (self.embedding(ids_BT) * mask_BT1).sum(1)
        mean_BD = summed_BD / mask_BT1.sum(1).clamp(min=1.0)  # empty documents pool to zeros
        return self.fc(mean_BD)


def load_pretrained_rows(spec: str, vocab: dict[str, int], dim: int) -> tuple[torch.Tensor, float]:
    """(len(vocab), D) initial table: pretrained vectors where the word has one, zeros elsewhere; and the hit rate."""
    sys.path.insert(0, str(ROOT))
    from trainer.vectors import load_vectors

    vectors = load_vectors(spec)
    if vectors.dim != dim:
        raise SystemExit(f"--dim {dim} does not match the pretrained width {vectors.dim}")
    index = vectors.index()
    table = torch.zeros(len(vocab), dim)
    hits = [(row, index[word]) for word, row in vocab.items() if word in index]
    rows = torch.tensor([r for r, _ in hits], dtype=torch.long)
    table[rows] = torch.from_numpy(vectors.take(torch.tensor([p for _, p in hits]).numpy()).copy())
    return table, len(hits) / max(len(vocab) - 2, 1)


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for ids_BT, labels_B in loader:
            correct += int((model(ids_BT).argmax(1) == labels_B).sum())
            total += len(labels_B)
    model.train()
    return correct / max(total, 1)


def main(argv: list[str] | None = None) -> int:
    data = ROOT / "data" / "debian"
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, default=data / "train.csv")
    ap.add_argument("--valid", type=Path, default=data / "valid.csv")
    ap.add_argument("--test", type=Path, default=data / "test.csv")
    ap.add_argument(
        "--pretrained", default="", help="vectors for trainer.vectors.load_vectors, e.g. glove-6b-50d"
    )
    ap.add_argument("--freeze", action="store_true", help="freeze the embedding table (needs --pretrained)")
    ap.add_argument("--dim", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.freeze and not args.pretrained:
        ap.error("--freeze needs --pretrained")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    train, valid, test = read_csv(args.train), read_csv(args.valid), read_csv(args.test)
    vocab = build_vocab([text for text, _ in train])
    labels = {label: i for i, label in enumerate(sorted({label for _, label in train}))}

    def collate(batch: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [torch.tensor([vocab.get(t, UNK) for t in tokenize(text)] or [PAD]) for text, _ in batch]
        return pad_sequence(ids, batch_first=True, padding_value=PAD), torch.tensor(
            [labels[y] for _, y in batch]
        )

    def loader(rows, shuffle: bool) -> DataLoader:
        return DataLoader(rows, batch_size=args.batch_size, shuffle=shuffle, collate_fn=collate)

    model = MeanEmbeddingClassifier(len(vocab), args.dim, len(labels))
    coverage = None
    if args.pretrained:
        table, coverage = load_pretrained_rows(args.pretrained, vocab, args.dim)
        model.embedding.weight.data.copy_(table)
    model.embedding.weight.requires_grad_(not args.freeze)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    train_tokens = sum(len(tokenize(text)) for text, _ in train)

    train_s = 0.0
    valid_acc = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        for ids_BT, labels_B in loader(train, shuffle=True):
            optimizer.zero_grad()
            loss_fn(model(ids_BT), labels_B).backward()
            optimizer.step()
        train_s += time.perf_counter() - t0
        valid_acc.append(accuracy(model, loader(valid, shuffle=False)))
    test_acc = accuracy(model, loader(test, shuffle=False))
    result = {
        "valid": {"accuracy": valid_acc[-1], "per_epoch": valid_acc},
        "test": {"accuracy": test_acc, "n": len(test)},
        "train_seconds": train_s,
        "train_tokens": train_tokens,
        "epochs": args.epochs,
        "tokens_per_s": train_tokens * args.epochs / train_s,
        "vocab": len(vocab),
        "pretrained_coverage": coverage,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
