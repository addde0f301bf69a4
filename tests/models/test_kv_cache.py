"""The sampling cache's row copies: gather rows into new buffers, write a stage's columns back."""

from __future__ import annotations

import pytest
import torch

from spear.models.kv_cache import GrowingLayer


def _layer(rows: int, filled: int, capacity: int) -> GrowingLayer:
    k = torch.arange(rows * 2 * capacity * 3, dtype=torch.float32).reshape(rows, 2, capacity, 3)
    return GrowingLayer.holding(k, -k, filled)


def test_gather_rows_copies_the_filled_columns_of_the_rows_into_zeroed_buffers() -> None:
    layer = _layer(4, 5, 8)
    sub = layer.gather_rows(torch.tensor([3, 1]), 7)
    assert sub._kbuf is not None and sub._vbuf is not None
    assert sub._kbuf.shape == (2, 2, 7, 3) and sub.keys.shape == (2, 2, 5, 3)
    torch.testing.assert_close(sub.keys, layer.keys[[3, 1]])
    torch.testing.assert_close(sub.values, layer.values[[3, 1]])
    assert not sub._kbuf[:, :, 5:].any() and not sub._vbuf[:, :, 5:].any()
    assert sub.keys.data_ptr() != layer.keys.data_ptr()  # a copy: the layer is left intact


def test_put_rows_writes_the_columns_of_those_rows_only_and_extends_the_filled_part() -> None:
    layer, src = _layer(4, 5, 8), _layer(2, 7, 7)
    assert layer._kbuf is not None and layer._vbuf is not None and src._kbuf is not None
    before = layer._kbuf.clone()
    src._kbuf.fill_(100.0)
    layer.put_rows(torch.tensor([2, 0]), src, 5, 7)
    assert layer.keys.shape[2] == 7 and layer.get_seq_length() == 7
    assert (layer._kbuf[[2, 0], :, 5:7] == 100.0).all()
    torch.testing.assert_close(layer._vbuf[[2, 0], :, 5:7], src.values[:, :, 5:7])
    torch.testing.assert_close(layer._kbuf[[1, 3]], before[[1, 3]])  # other rows untouched
    torch.testing.assert_close(layer._kbuf[:, :, :5], before[:, :, :5])  # earlier columns too
    with pytest.raises(ValueError, match="capacity of 8"):
        layer.put_rows(torch.tensor([0]), _layer(1, 9, 9), 7, 9)
