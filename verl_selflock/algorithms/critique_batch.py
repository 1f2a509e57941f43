"""The per-token critique fields of a batch as padded tensors: the input of AREW and IGPO."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from verl_selflock.contracts.critique import CRITIQUE, CRITIQUE_CHANNEL, CRITIQUE_FIELDS, FALLBACK_ELIGIBLE, TURN_IDS


class CritiqueBatch(NamedTuple):
    """Padded per-token critique tensors of a batch, all (bs, response_length)."""

    critique: torch.Tensor
    """int8 in {-1, 0, +1}; 0 where no critique applies."""
    channel: torch.Tensor
    """int8 CHANNEL_* per token."""
    turn_ids: torch.Tensor
    """int64 turn index per token, -1 outside generated turns."""
    fallback_eligible: torch.Tensor
    """int8 :class:`FallbackRole` per token (named after the per-token key; 0 off turns)."""
    has_critique: torch.Tensor
    """(bs,) bool: the sample carried critique fields at all."""


def collate_critiques(extra_fields: Sequence[Mapping[str, Any] | None], response_length: int) -> CritiqueBatch:
    """Pad the per-sample critique lists of a batch into tensors.

    Args:
        extra_fields: one ``extra_fields`` dict per sample, in batch order. A sample whose dict lacks
            the critique fields (another agent loop, an old checkpointed batch) gets an all-zero row and
            ``has_critique = False``; it never raises.
        response_length: width of the batch's response tensors. Longer lists are cut to it.

    Returns:
        A :class:`CritiqueBatch` of (bs, response_length) tensors.
    """
    bs = len(extra_fields)
    critique = torch.zeros(bs, response_length, dtype=torch.int8)
    channel = torch.zeros(bs, response_length, dtype=torch.int8)
    turn_ids = torch.full((bs, response_length), -1, dtype=torch.int64)
    fallback = torch.zeros(bs, response_length, dtype=torch.int8)
    has_critique = torch.zeros(bs, dtype=torch.bool)
    for row, fields in enumerate(extra_fields):
        if not fields or any(key not in fields for key in CRITIQUE_FIELDS):
            continue
        n = min(len(fields[TURN_IDS]), response_length)
        # One tensor copy per field per row: marshalling, not per-token Python work.
        critique[row, :n] = torch.as_tensor(fields[CRITIQUE][:n], dtype=torch.int8)
        channel[row, :n] = torch.as_tensor(fields[CRITIQUE_CHANNEL][:n], dtype=torch.int8)
        turn_ids[row, :n] = torch.as_tensor(fields[TURN_IDS][:n], dtype=torch.int64)
        # int8, not bool: the role has three values (older samples' 0/1 flags read as ORDINARY/ELIGIBLE).
        fallback[row, :n] = torch.as_tensor(fields[FALLBACK_ELIGIBLE][:n], dtype=torch.int8)
        has_critique[row] = True
    return CritiqueBatch(critique, channel, turn_ids, fallback, has_critique)
