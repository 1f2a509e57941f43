"""The actor worker's packed-scoring method on the fields the driver puts into TransferQueue.

The method runs on veRL's FSDP engine in training (``tests/e2e/test_cpu_training.py`` runs IGPO through
it); here the engine is reduced to the four members the method uses, around SmolLM2, to check the round
trip driver fields -> worker -> per-sequence scores against the per-prefix reference, with rows split
over several forwards and one-token padding rows among them.
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from verl.utils import tensordict_utils as tu

from verl_selflock.algorithms.igpo_config import IgpoConfig
from verl_selflock.algorithms.igpo_packing import PackedRow, pack_plan, scores_from_rows
from verl_selflock.algorithms.igpo_plan import plan_scoring, score_with_hf_model
from verl_selflock.verl_adapter.igpo_scoring import packed_fields
from verl_selflock.verl_adapter.igpo_worker import MICRO_TOKENS_KEY, OUTPUT_FIELD, SelflockActorWorker
from verl_selflock.verl_adapter.jagged import as_jagged, rows


class _Engine:
    """What ``compute_igpo_answer_logprobs`` uses of veRL's ``FSDPEngine``."""

    def __init__(self, module):
        self.module = module
        self._autocast_dtype = torch.float32
        self.eval_calls = 0

    def eval_mode(self):
        self.eval_calls += 1
        return nullcontext()

    def is_mp_src_rank_with_outputs(self) -> bool:
        return True


@pytest.fixture
def cpu_platform(monkeypatch):
    """veRL's platform singleton as a CPU worker of our backend has it (``VERL_PLATFORM=cpu``)."""
    from verl.plugin.platform import platform_manager

    from verl_selflock.verl_adapter.cpu.platform import PlatformCPU

    monkeypatch.setattr(platform_manager, "_current_platform", PlatformCPU())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_worker_scores_the_drivers_fields_like_the_per_prefix_reference(
    smollm2_dir, chatml_tokenizer, cpu_platform, temperature
):
    from verl_selflock.verl_adapter.cpu.sampling import load_causal_lm

    model = load_causal_lm(smollm2_dir).float().eval()
    gen = torch.Generator().manual_seed(3)
    prompts, responses, turn_ids = [], [], []
    for _ in range(3):
        prompts.append(torch.randint(1000, (20,), generator=gen))
        responses.append(torch.randint(1000, (40,), generator=gen))
        turn_ids.append([0] * 10 + [-1] * 5 + [1] * 10 + [-1] * 5 + [2] * 10)
    plan = plan_scoring(prompts, responses, turn_ids, ["0.5,0.3,0.2"] * 3, chatml_tokenizer, IgpoConfig())
    packed = pack_plan(plan) + [PackedRow.padding(0)]  # the driver pads to a multiple of the DP size
    data = packed_fields(packed)
    tu.assign_non_tensor(data, temperature=temperature, **{MICRO_TOKENS_KEY: 200})  # two rows per forward at most

    engine = _Engine(model)
    worker = SimpleNamespace(actor=SimpleNamespace(engine=engine))
    output = SelflockActorWorker.compute_igpo_answer_logprobs(worker, data)

    assert output.batch_size == torch.Size([len(packed)]) and engine.eval_calls == 1
    logprobs = rows(as_jagged(output[OUTPUT_FIELD]))
    assert [lp.numel() for lp in logprobs] == [len(row) for row in packed]
    scores = scores_from_rows(packed, logprobs, len(plan))
    torch.testing.assert_close(scores, score_with_hf_model(model, plan, temperature=temperature), atol=2e-5, rtol=0)
