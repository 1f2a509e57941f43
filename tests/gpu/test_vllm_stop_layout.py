"""The agent loop with ``stop_on_closing_tag`` on veRL's vLLM sampling path follows the token-layout rules
it follows on our CPU backend: a turn ends at the token that completes its first closing tag (or at an
end-of-turn token, or at the turn cap), kept tokens are a prefix of what was generated, with its
log-probs, and observations are masked out. Same PE-G episode, SmolLM2-135M-Instruct, on both backends.
"""

from __future__ import annotations

import asyncio
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
MAX_TURN_TOKENS = 24
TAGS = ("</interact>", "</answer>")


class _Recorder:
    """Records every generate call (params and output) of the server it wraps."""

    def __init__(self, server: Any) -> None:
        self.server, self.calls = server, []

    async def generate(self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any], **kwargs: Any):
        out = await self.server.generate(request_id=request_id, prompt_ids=prompt_ids,
                                         sampling_params=dict(sampling_params), **kwargs)
        self.calls.append(SimpleNamespace(prompt_ids=list(prompt_ids), params=dict(sampling_params), out=out))
        return out


class _VllmServer:
    """veRL 0.9.1's vLLM ``generate`` (``vllm_async_server.py``), on vLLM's offline engine: the same
    SamplingParams built from the loop's params (``logprobs`` True -> 0), the same TokenOutput."""

    def __init__(self, model_dir: str) -> None:
        from vllm import LLM

        self.llm = LLM(model=model_dir, dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True, seed=0)

    async def generate(self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any], **kwargs: Any):
        from verl.workers.rollout.replica import TokenOutput
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = dict(sampling_params)
        params["logprobs"] = 0 if params.pop("logprobs", False) else None
        result = self.llm.generate([TokensPrompt(prompt_token_ids=list(prompt_ids))], SamplingParams(**params),
                                   use_tqdm=False)[0].outputs[0]
        ids = list(result.token_ids)
        log_probs = [lp[ids[i]].logprob for i, lp in enumerate(result.logprobs)] if result.logprobs else None
        return TokenOutput(token_ids=ids, log_probs=log_probs, stop_reason="completed", extra_fields={"global_steps": 0})


def _cpu_server(model_dir: str) -> Any:
    from verl_selflock.verl_adapter.cpu.generation_server import HFGenerationServer

    config = SimpleNamespace(prompt_length=2048, response_length=512, temperature=1.0, max_model_len=None,
                             max_num_seqs=1, repetition_penalty=1.0, ignore_eos=False, seed=0, engine_kwargs={})
    return HFGenerationServer(config, SimpleNamespace(path=model_dir))


def _episode(server: Any, tokenizer: Any, model_dir: str) -> tuple[Any, list]:
    from fixtures.harness import SAMPLING, compose_verl_config

    from verl_selflock.data.pe import PEDataConfig, build_pe_rows
    from verl_selflock.verl_adapter.standalone import build_agent_loop

    (row,) = build_pe_rows(PEDataConfig("gated", 6, 3, 4), n_train=1, n_test=0, seed=11, progress=False)["train"]
    config = compose_verl_config([f"actor_rollout_ref.model.path={model_dir}",
                                  "actor_rollout_ref.rollout.prompt_length=2048",
                                  "actor_rollout_ref.rollout.response_length=512"])
    recorder = _Recorder(server)
    knobs = {"max_turn_tokens": MAX_TURN_TOKENS, "max_obs_tokens": 96, "stop_on_closing_tag": True}

    async def main():
        loop = build_agent_loop(config, recorder, tokenizer, knobs=knobs)
        kwargs = {"raw_prompt": row["prompt"], "extra_info": row["extra_info"], "data_source": row["data_source"]}
        return await loop.run(dict(SAMPLING), **kwargs)

    return asyncio.run(main()), recorder.calls


def _check_layout(out: Any, calls: list, tokenizer: Any, eos: set[int]) -> None:
    fields = out.extra_fields
    n = len(out.response_ids)
    assert len(out.response_mask) == len(out.response_logprobs) == n > 0
    assert out.response_mask == [int(t >= 0) for t in fields["turn_ids"]]  # observations masked out
    for t, call in enumerate(calls):
        assert set(call.params["stop"]) == set(TAGS) and call.params["include_stop_str_in_output"] is True
        ids = call.out.token_ids
        text = tokenizer.decode(ids)
        # vLLM's stop rule: the generation ends at the token that completes the first stop string.
        if any(tag in text for tag in TAGS):
            assert not any(tag in tokenizer.decode(ids[:-1]) for tag in TAGS), text
        else:
            assert ids[-1] in eos or len(ids) == call.params["max_tokens"], text
        positions = [i for i, tid in enumerate(fields["turn_ids"]) if tid == t]
        if not positions:  # a turn the loop kept nothing of (e.g. cut by the response budget)
            continue
        assert positions == list(range(positions[0], positions[0] + len(positions)))
        assert [out.response_ids[i] for i in positions] == ids[: len(positions)]
        assert [out.response_logprobs[i] for i in positions] == pytest.approx(call.out.log_probs[: len(positions)])
        assert all(math.isfinite(lp) and lp <= 0 for lp in call.out.log_probs)
        assert call.params["max_tokens"] <= MAX_TURN_TOKENS


def test_stop_on_closing_tag_layout_is_the_same_on_vllm_and_cpu():
    pytest.importorskip("vllm", reason="needs vLLM: pip install -e '.[vllm]'")
    pytest.importorskip("gguf", reason="needs the cpu extra (SmolLM2's GGUF -> HF conversion): pip install -e '.[cpu]'")
    from transformers import AutoTokenizer, GenerationConfig

    from verl_selflock.models import smollm2_path
    from verl_selflock.verl_adapter.cpu.sampling import eos_token_ids_of

    model_dir = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = set(eos_token_ids_of(tokenizer, GenerationConfig.from_pretrained(model_dir)))
    for server in (_VllmServer(model_dir), _cpu_server(model_dir)):
        out, calls = _episode(server, tokenizer, model_dir)
        assert calls, "the loop never called the server"
        _check_layout(out, calls, tokenizer, eos)
