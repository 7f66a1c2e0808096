"""A split's encoded documents (`EncodedDocs`: flat CSR arrays), and where the encoder puts them block by block.

`features.Featurizer.encode_tokenized` computes the per-token arrays (word ids, bigram and char n-gram buckets) a
block of documents at a time. Each block's pieces go to a sink: `MemorySink` fills whole arrays held in memory
(inference, tests), `FolderSink` appends them to the split's `.npy` files as they come (the data cache's build), so
that a large training split is never held whole: the build's memory is then the tokenized types and one block, not
four arrays of 8 bytes a token besides (measured in `benchmarks/bench_data_build.py`). No torch here.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

# The per-token arrays, which the encoder sizes before its first block and fills a block's piece at a time.
PER_TOKEN = ("token_ids", "bigram_ids", "char_ids", "char_token_counts")
INT32_MAX = 2**31 - 1


@dataclass
class EncodedDocs:
    """All documents of a split as flat arrays (CSR: `*_offsets[d]:*_offsets[d+1]` is document d's slice)."""

    token_ids: np.ndarray  # int64 global word id per kept token, -1 = unknown word (kept only for its char n-grams)
    token_offsets: np.ndarray  # (N+1,)
    raw_tokens: np.ndarray  # (N,) tokenizer tokens per document before dropping unknown words (throughput counts)
    bigram_ids: np.ndarray  # int64 bucket ids
    bigram_offsets: np.ndarray  # (N+1,)
    char_ids: np.ndarray  # int64 bucket ids, grouped by token
    char_token_counts: np.ndarray  # (num kept tokens,) char n-grams of each kept token
    char_offsets: np.ndarray  # (N+1,) per document
    labels: np.ndarray  # (N,) int64 label id, -1 for a label unseen in training

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, folder: Path) -> None:
        """One .npy per array (ids stored as int32 where they fit) so loads can memory-map them. Without char
        n-grams `char_token_counts` is all zeros, 8 bytes a token: not written (`load` makes the zeros)."""
        folder.mkdir(parents=True, exist_ok=True)
        for f in fields(self):
            array = getattr(self, f.name)
            if f.name == "char_token_counts" and not array.any():
                continue
            if f.name.endswith("_ids") and (len(array) == 0 or array.max(initial=0) < INT32_MAX):
                _save_converted(folder / f"{f.name}.npy", array, np.dtype(np.int32))
            else:
                np.save(folder / f"{f.name}.npy", array)

    @classmethod
    def load(cls, folder: Path) -> "EncodedDocs":
        arrays = {f.name: np.load(folder / f"{f.name}.npy", mmap_mode="r") for f in fields(cls)
                  if f.name != "char_token_counts" or (folder / f"{f.name}.npy").exists()}
        if "char_token_counts" not in arrays:  # saved all zeros; np.zeros takes no memory until read
            if len(arrays["char_ids"]):  # the counts sum to len(char_ids): a file is missing, not left out
                raise FileNotFoundError(f"{folder / 'char_token_counts.npy'}: missing beside {len(arrays['char_ids'])} "
                                        "char n-gram ids; the cache folder is incomplete")
            zeros = np.zeros(len(arrays["token_ids"]), dtype=np.int64)
            zeros.flags.writeable = False  # read-only, as the memory-mapped arrays beside it
            arrays["char_token_counts"] = zeros
        return cls(**arrays)


def _write_header(out, dtype: np.dtype, length: int) -> None:
    np.lib.format.write_array_header_1_0(out, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                               "shape": (length,)})


def _save_converted(path: Path, array: np.ndarray, dtype: np.dtype, chunk: int = 1 << 22) -> None:
    """`np.save(path, array.astype(dtype))`, the same bytes, converted a chunk at a time: no whole converted copy
    (450 MB for the ids of a 120M-token split)."""
    with open(path, "wb") as out:
        _write_header(out, dtype, len(array))
        for lo in range(0, len(array), chunk):
            out.write(array[lo : lo + chunk].astype(dtype).tobytes())


class MemorySink:
    """The per-token arrays whole, in memory, as int64 (`span` hands out views to write a block's piece into)."""

    def __init__(self, sizes: dict[str, int]) -> None:
        # np.zeros of a large array is mapped lazily: an array a configuration never writes (char_token_counts
        # without char n-grams) takes no memory
        self.arrays = {name: np.zeros(sizes[name], dtype=np.int64) for name in PER_TOKEN}

    def span(self, name: str, lo: int, hi: int) -> np.ndarray:
        return self.arrays[name][lo:hi]

    def end_block(self) -> None:
        pass

    def finish(self, **per_document: np.ndarray) -> EncodedDocs:
        return EncodedDocs(**self.arrays, **per_document)


class FolderSink:
    """The per-token arrays written to `folder`'s .npy files block by block, in order, as `EncodedDocs.save` would
    lay them out; `finish` adds the per-document arrays (8 bytes a document) and returns the folder's arrays
    memory-mapped.

    Each file's header is written first (the encoder knows every length before its first block), then each block's
    piece converted to the file's dtype: int32 for ids whose bound (`id_bounds`, one past the largest possible id)
    fits. As `save` decides by the ids themselves, ids written as int64 (a bound past int32, e.g. 2**31 buckets)
    whose largest turns out to fit are converted at `finish`, and an all-zero `char_token_counts` is removed then
    (`load` makes the zeros), so the files are `save`'s in every case."""

    def __init__(self, folder: Path, sizes: dict[str, int], id_bounds: dict[str, int], char_ngrams: bool) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.files, self.dtypes, self.written, self.sizes = {}, {}, {}, sizes
        self.pending: list[tuple[str, int, np.ndarray]] = []
        self.largest: dict[str, int] = {}  # per file: the largest value written (for `save`'s dtype and zeros rules)
        try:
            for name in PER_TOKEN:
                if name == "char_token_counts" and not char_ngrams:
                    continue
                bound = id_bounds.get(name)
                self.dtypes[name] = np.dtype(np.int32 if bound is not None and bound <= INT32_MAX else np.int64)
                self.files[name] = open(folder / f"{name}.npy", "wb")  # noqa: SIM115 - closed by finish / close
                _write_header(self.files[name], self.dtypes[name], sizes[name])
                self.written[name] = 0
        except BaseException:
            self.close()
            raise

    def span(self, name: str, lo: int, hi: int) -> np.ndarray:
        """A fresh int64 buffer for [lo, hi) of `name`, written to its file at `end_block` (pieces of one array
        must come in order, each starting where the one before ended)."""
        buffer = np.empty(hi - lo, dtype=np.int64)
        if name in self.files:
            self.pending.append((name, lo, buffer))
        return buffer

    def end_block(self) -> None:
        for name, lo, buffer in self.pending:
            if lo != self.written[name]:
                raise AssertionError(f"FolderSink: {name} piece at {lo}, {self.written[name]} written so far")
            self.files[name].write(buffer.astype(self.dtypes[name], copy=False).tobytes())
            self.written[name] += len(buffer)
            if len(buffer):
                self.largest[name] = max(self.largest.get(name, 0), int(buffer.max()))
        self.pending.clear()

    def finish(self, **per_document: np.ndarray) -> EncodedDocs:
        self.end_block()
        short = {n: (w, self.sizes[n]) for n, w in self.written.items() if w != self.sizes[n]}
        self.close()
        if short:
            raise AssertionError(f"FolderSink: arrays not filled (written, size): {short}")
        for name, dtype in self.dtypes.items():
            path = self.folder / f"{name}.npy"
            if name == "char_token_counts" and self.largest.get(name, 0) == 0:  # counts are >= 0: all zero
                path.unlink()
            elif name.endswith("_ids") and dtype == np.int64 and self.largest.get(name, 0) < INT32_MAX:
                _save_converted(path.with_suffix(".int32"), np.load(path, mmap_mode="r"), np.dtype(np.int32))
                path.with_suffix(".int32").replace(path)
        for name, array in per_document.items():
            np.save(self.folder / f"{name}.npy", array)
        return EncodedDocs.load(self.folder)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
