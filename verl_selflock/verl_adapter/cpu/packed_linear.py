"""Linear layers whose weights are packed once for oneDNN: a decode step of a few rows reads each weight once.

A decode step multiplies a few rows (the batch's next tokens, or a token and its speculative draft) by
every weight matrix of the model, so its cost is reading the weights. PyTorch's default CPU path (MKL
sgemm) repacks the weight matrix at every call once 4 or more rows come in, which reads it twice:
measured on one core with SmolLM2-135M's 1536x576 MLP weights, 267 us for 1 row, 497 us for 4, 646 us
for 8, 815 us for 32. With the weight reordered once for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``,
the kernel PyTorch's inductor uses for CPU linears), the same calls take 301, 327, 372 and 587 us; its
tied LM head (49152x576) 17.8 ms -> 8.1 ms at 4 rows. Below 4 rows the plain path is as fast or faster.

:class:`PackedLinear` wraps an ``nn.Linear`` and keeps its ``weight`` and ``bias`` parameters (the
same objects: state dict names, tied embeddings and in-place weight updates are unchanged). Inputs of at
``MIN_PACKED_ROWS`` to ``max_rows`` rows, float32, without autograd, go through the packed copy; everything
else (prefill, one or two rows, training) through ``F.linear``. The packed copy is rebuilt when the weight's version counter moves (an
in-place ``copy_`` from the trainer's weight update), so it is never stale. It costs one more copy of the
weights in memory. Off where PyTorch lacks oneDNN.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)

MIN_PACKED_ROWS = 4
"""Smallest input (rows = batch x query length) sent through the packed weight: where MKL starts repacking."""
MAX_PACKED_ROWS = 64
"""Largest: decode steps of a batch, with or without drafts (prefill stays on the plain path)."""


@functools.cache
def packed_linear_available() -> bool:
    """True when this PyTorch has oneDNN's reordered-weight linear (checked once, on a tiny product)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        weight, x = torch.randn(3, 5), torch.randn(2, 5)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(out, x @ weight.T, atol=1e-5))
    except (AttributeError, RuntimeError) as error:
        logger.info("oneDNN packed linear unavailable (%s): plain F.linear", error)
        return False


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` with a oneDNN-packed copy of its weight for small inference inputs.

    Attributes:
        weight: (out_features, in_features), the wrapped layer's parameter.
        bias: (out_features,) or None, the wrapped layer's parameter.
        max_rows: inputs with more rows than this use ``F.linear`` (0: never packed).
    """

    def __init__(self, linear: torch.nn.Linear, max_rows: int = MAX_PACKED_ROWS) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.max_rows = max_rows
        self._packed: torch.Tensor | None = None
        self._packed_version = -1

    def _packed_weight(self) -> torch.Tensor:
        version = self.weight._version
        if self._packed is None or version != self._packed_version:
            with torch.inference_mode():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
            self._packed_version = version
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if not MIN_PACKED_ROWS <= rows <= self.max_rows or x.dtype != torch.float32 or self.weight.dtype != torch.float32 or torch.is_grad_enabled():
            return torch.nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, max_rows={self.max_rows}"


def use_packed_linears(model: torch.nn.Module, max_rows: int = MAX_PACKED_ROWS) -> int:
    """Wrap every ``nn.Linear`` of ``model`` (in place) in :class:`PackedLinear`; returns how many.

    Nothing changes where oneDNN is missing or the model is not float32."""
    if not packed_linear_available():
        return 0
    targets = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32
    ]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, max_rows))
    return len(targets)
