"""oneDNN-packed linears in the ``hf`` rollout's model: the same outputs, the same parameters, never stale."""

from __future__ import annotations

import copy

import pytest
import torch

from verl_selflock.verl_adapter.cpu.packed_linear import (
    MIN_PACKED_ROWS,
    PackedLinear,
    packed_linear_available,
    use_packed_linears,
)
from verl_selflock.verl_adapter.cpu.sampling import GenerationRequest, generate_batch

pytestmark = pytest.mark.skipif(not packed_linear_available(), reason="this PyTorch has no oneDNN packed linear")


def _tied_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_wraps_every_linear_and_keeps_parameters_and_tying(tiny_lm):
    model = _tied_lm()
    names = list(model.state_dict())
    assert use_packed_linears(model) == 2 * 7 + 1  # q k v o gate up down per layer, and the LM head
    assert list(model.state_dict()) == names
    assert isinstance(model.lm_head, PackedLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


@pytest.mark.parametrize("rows", [1, MIN_PACKED_ROWS, 12, 200])
def test_same_outputs_at_every_size_and_after_an_inplace_weight_update(rows):
    linear = torch.nn.Linear(32, 48)
    reference = copy.deepcopy(linear)
    packed = PackedLinear(linear)
    x = torch.randn(rows, 32)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), reference(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(x.view(rows, 1, 32)), reference(x)[:, None], atol=1e-5, rtol=1e-5)
    new = torch.randn(48, 32)
    with torch.no_grad():  # the generation server's weight update: copy_ into the state dict's tensors
        linear.weight.copy_(new)
        reference.weight.copy_(new)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), reference(x), atol=1e-5, rtol=1e-5)


def test_autograd_takes_the_plain_path():
    linear = torch.nn.Linear(16, 8)
    packed = PackedLinear(copy.deepcopy(linear))
    x = torch.randn(MIN_PACKED_ROWS, 16)
    packed(x).sum().backward()
    linear(x).sum().backward()
    torch.testing.assert_close(packed.weight.grad, linear.weight.grad)


def test_generation_is_unchanged(tiny_lm):
    """Batched decode of 5 rows (packed from 4 rows on): the tokens and log-probs of plain linears."""
    model = copy.deepcopy(tiny_lm)
    assert use_packed_linears(model) > 0
    prompts = [[5, 6, 7], [3, 4], [12, 13, 14, 15], [9], [20, 21]]
    requests = [GenerationRequest(p, max_tokens=10, temperature=0.0) for p in prompts]
    for a, b in zip(generate_batch(model, requests, [], 0), generate_batch(tiny_lm, requests, [], 0), strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.log_probs), torch.tensor(b.log_probs), atol=1e-5, rtol=0)
