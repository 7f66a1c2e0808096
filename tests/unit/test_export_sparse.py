"""Zero-initialised tables that are mostly untouched are exported as their nonzero rows (trainer/export.py), and load
back bit for bit."""

from pathlib import Path

import pytest
import torch

from trainer.embeddings import TableSpec
from trainer.export import SPARSE_PREFIX, ModelFolderError, _dense_tables, _table_entries


def mostly_zero(rows: int, dim: int, touched: list[int]) -> torch.Tensor:
    table = torch.zeros(rows, dim)
    table[touched] = torch.randn(len(touched), dim)
    return table


def test_a_mostly_zero_table_is_stored_as_its_nonzero_rows_and_loads_back_bit_for_bit():
    spec = TableSpec("bigram", 100_000, 8, trainable=True, init="zeros")
    table = mostly_zero(100_000, 8, [0, 5, 65_535, 65_536, 99_999])  # both sides of a scan block's edge
    table[7, 3] = float("nan")  # a row with only a NaN is not zero
    table[9, 0] = -0.0  # a negative zero is: it loads back as 0.0
    entries = _table_entries(spec, table)
    assert set(entries) == {f"{SPARSE_PREFIX}bigram.rows", f"{SPARSE_PREFIX}bigram.values"}
    assert entries[f"{SPARSE_PREFIX}bigram.rows"].tolist() == [0, 5, 7, 65_535, 65_536, 99_999]
    rebuilt = _dense_tables(entries, [spec], Path("weights.pt"))["bigram"]
    assert rebuilt.shape == table.shape and torch.equal(rebuilt.nan_to_num(), table.nan_to_num())
    assert torch.isnan(rebuilt[7, 3]) and torch.isnan(rebuilt).sum() == 1


def test_tables_stored_whole():
    """A zero-initialised table with most rows nonzero, and every table of another initialisation."""
    busy = mostly_zero(100, 4, list(range(80)))
    assert list(_table_entries(TableSpec("wide_bigram", 100, 4, True, "zeros"), busy)) == ["tables.wide_bigram"]
    sparse_looking = mostly_zero(100, 4, [3])
    assert list(_table_entries(TableSpec("oov", 100, 4, True, "normal", 0.1), sparse_looking)) == ["tables.oov"]
    assert list(_table_entries(TableSpec("mask", 100, 4, True, "ones"), sparse_looking)) == ["tables.mask"]
    whole = {"tables.oov": sparse_looking, "tables.mask": busy}
    # a model exported before sparse tables existed
    assert _dense_tables(whole, [], Path("weights.pt")) == {"oov": sparse_looking, "mask": busy}


@pytest.mark.parametrize("damage", ["out_of_range", "negative", "values_shape", "no_values", "unknown_table"])
def test_stored_rows_that_do_not_fit_the_table_are_refused(damage):
    spec = TableSpec("bigram", 50, 4, trainable=True, init="zeros")
    entries = _table_entries(spec, mostly_zero(50, 4, [1, 2]))
    rows, values = f"{SPARSE_PREFIX}bigram.rows", f"{SPARSE_PREFIX}bigram.values"
    if damage == "out_of_range":
        entries[rows] = torch.tensor([1, 50])
    elif damage == "negative":
        entries[rows] = torch.tensor([-1, 2])
    elif damage == "values_shape":
        entries[values] = entries[values][:, :3]
    elif damage == "no_values":
        del entries[values]
    specs = [] if damage == "unknown_table" else [spec]
    with pytest.raises(ModelFolderError, match=r"weights.pt: the stored rows of table bigram do not fit its shape"):
        _dense_tables(entries, specs, Path("weights.pt"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nonzero_rows_in_any_float_type(dtype):
    from trainer.export import _nonzero_rows

    table = torch.zeros(10, 3, dtype=dtype)
    table[2, 1], table[4, 0], table[6, 2], table[8, 0] = 1e-30, -0.0, float("nan"), -2.0
    assert _nonzero_rows(table, block=4).tolist() == [2, 6, 8]  # blocks of 4: rows 8-9 are a partial block
