"""Jagged / dense per-sample fields (verl_selflock.verl_adapter.jagged)."""

from __future__ import annotations

import torch

from verl_selflock.verl_adapter.jagged import as_jagged, padded, rows


def test_dense_and_jagged_fields_give_the_same_rows_and_padding():
    dense = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    jagged = as_jagged(dense)
    assert jagged.is_nested and as_jagged(jagged) is jagged
    assert [row.tolist() for row in rows(jagged)] == [row.tolist() for row in rows(dense)]
    torch.testing.assert_close(padded(jagged, 0.0), dense)
    assert padded(dense, 0.0) is dense
    ragged = torch.nested.as_nested_tensor([torch.tensor([1.0]), torch.tensor([2.0, 3.0])], layout=torch.jagged)
    torch.testing.assert_close(padded(ragged, -1.0), torch.tensor([[1.0, -1.0], [2.0, 3.0]]))
