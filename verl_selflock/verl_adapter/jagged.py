"""Per-sample batch fields as TransferQueue hands them out: jagged (nested) or dense tensors (torch only).

veRL's v1 trainer stores each sample's fields with its own length; ``kv_batch_get`` returns them as jagged
nested tensors, or as dense ones when every row has the same length.
"""

from __future__ import annotations

import torch


def padded(tensor: torch.Tensor, value: float) -> torch.Tensor:
    """A (bs, max_len) dense tensor, rows padded on the right with ``value``."""
    return torch.nested.to_padded_tensor(tensor, value) if tensor.is_nested else tensor


def as_jagged(tensor: torch.Tensor) -> torch.Tensor:
    """The field as a jagged nested tensor (veRL stacks equal-length rows densely)."""
    return tensor if tensor.is_nested else torch.nested.as_nested_tensor(list(tensor.unbind(0)), layout=torch.jagged)


def rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Per-sample 1-D tensors of a jagged or dense field."""
    return list(tensor.unbind(0))
