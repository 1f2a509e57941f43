"""The CPU backend: platform selection, veRL patch targets, and the HF rollout's generation.

Platform and patch state is process-wide (veRL resolves its platform once per process), so the
selection tests run a fresh interpreter per case. Generation is tested on a tiny random Llama
(fast) and on SmolLM2-135M-Instruct (``slow``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from fixtures.hf_server import server_on
from fixtures.log_probs import teacher_forced_log_probs

from verl_selflock.verl_adapter.cpu.sampling import GenerationRequest, filter_top_k_top_p, generate_batch

# One intra-op thread: on a shared 2-core machine OpenMP spin contention makes small matmuls ~30x
# slower with 2 threads (see verl_selflock.verl_adapter.cpu.THREADS_ENV).
torch.set_num_threads(1)


def _run_probe(code: str, platform: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES")}
    if platform is not None:
        env["VERL_PLATFORM"] = platform
    # load the backend the same way whether or not the lead's entry point is installed
    env["VERL_USE_EXTERNAL_MODULES"] = "verl_selflock.verl_adapter.cpu._autoregister"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROBE = """
import json, os
import torch
import verl
from verl.plugin.platform import PlatformRegistry, get_platform
from verl.utils import distributed, device
from verl.workers.engine.base import EngineRegistry
from verl.workers.rollout.base import get_rollout_class
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl_selflock.verl_adapter import cpu
from verl_selflock.verl_adapter.cpu import patches


names = cpu.register()
assert cpu.register() == names  # idempotent
platform = get_platform()
out = {
    "platform": type(platform).__name__,
    "registered": "cpu" in PlatformRegistry.registered_names(),
    "names": names,
    "applied": patches.APPLIED,
    "gloo_patched": bool(getattr(distributed.initialize_global_process_group_ray, patches._MARK, False)),
    "rollout_adapter": get_rollout_class("hf", "async").__name__,
    "replica": RolloutReplicaRegistry.get("hf").__name__,
    "engine_cpu": "cpu" in EngineRegistry._engines["language_model"]["fsdp2"],
}
if out["platform"] == "PlatformCPU":
    out["current_device"] = str(platform.current_device())
    module = platform.device_module
    module.empty_cache(); module.synchronize()
    out["mem_get_info_ok"] = module.mem_get_info()[1] > 0
    out["engine"] = EngineRegistry.get_engine_cls("language_model", "fsdp2").__name__
    out["critic_engine"] = EngineRegistry.get_engine_cls("value_model", "fsdp2").__name__
    from verl.workers.engine.fsdp import transformer_impl
    out["pin_memory"] = transformer_impl.CPUOffloadPolicy().pin_memory
    # the real gloo process group (stock veRL: ValueError: Duplicate device type cpu)
    os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    from verl.workers import engine_workers  # imports the function by name
    engine_workers.initialize_global_process_group_ray(timeout_second=60)
    out["dist_backend"] = torch.distributed.get_backend()
    torch.distributed.destroy_process_group()
    from omegaconf import OmegaConf
    cfg = OmegaConf.create({"trainer": {"device": "cuda"}})
    device.auto_set_device(cfg)
    out["trainer_device"] = cfg.trainer.device
print(json.dumps(out))
"""


@pytest.mark.slow  # fresh interpreters import veRL (~10 s)
def test_cpu_platform_selected_only_when_asked_gpu_users_unaffected():
    out = _run_probe(PROBE, platform=None)
    assert out["registered"]
    assert out["platform"] != "PlatformCPU"  # this CPU host falls back to veRL's default, not to us
    assert out["applied"] == []
    assert not out["gloo_patched"]
    assert not out["engine_cpu"]
    assert out["names"] == ["platform:cpu", "rollout:hf"]
    # the rollout name is registered everywhere but only used when a config names it
    assert out["rollout_adapter"] == "HFServerAdapter"
    assert out["replica"] == "HFReplica"


@pytest.mark.slow  # fresh interpreters import veRL (~10 s)
def test_cpu_platform_selected_with_verl_platform_env_and_patches_work():
    out = _run_probe(PROBE, platform="cpu")
    assert out["platform"] == "PlatformCPU"
    assert out["current_device"] == "cpu"
    assert out["mem_get_info_ok"]
    assert set(out["applied"]) == {
        "gloo_backend",
        "fsdp2_offload_no_pin",
        "fsdp_engine_cpu",
        "valuehead_attn",
        "default_attn_sdpa",
        "auto_set_device",
    }
    assert out["engine"] == "FSDPEngineWithLMHead"
    assert out["critic_engine"] == "FSDPEngineWithValueHead"
    assert out["pin_memory"] is False
    assert out["dist_backend"] == "gloo"
    assert out["trainer_device"] == "cpu"


def test_every_patched_verl_name_still_exists():
    from verl_selflock.verl_adapter.cpu.patches import missing_patch_targets

    assert missing_patch_targets() == []


def test_cpu_overrides_compose_with_verl_config(verl_config):
    from verl_selflock.verl_adapter.cpu import cpu_overrides

    cfg = verl_config(cpu_overrides(n_ranks=2, with_critic=True))
    assert cfg.actor_rollout_ref.rollout.name == "hf"
    assert cfg.actor_rollout_ref.ref.strategy == "fsdp2"  # follows the actor
    assert cfg.critic.strategy == "fsdp2"
    assert cfg.ray_kwargs.ray_init.num_gpus == cfg.trainer.n_gpus_per_node == 2


# ---------------------------------------------------------------------------------------------
# generation core on a tiny random model
# ---------------------------------------------------------------------------------------------




def test_batched_left_padded_greedy_equals_one_by_one(tiny_lm):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15]]
    requests = [GenerationRequest(prompt_ids=p, max_tokens=12, temperature=0.0) for p in prompts]
    batched = generate_batch(tiny_lm, requests, eos_token_ids=[1], pad_token_id=0)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = generate_batch(tiny_lm, [request], eos_token_ids=[1], pad_token_id=0)
        assert together.token_ids == alone.token_ids
        torch.testing.assert_close(torch.tensor(together.log_probs), torch.tensor(alone.log_probs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_log_probs_match_teacher_forcing(tiny_lm, temperature):
    prompts = [[5, 6, 7, 8, 9], [3, 4, 20]]
    requests = [GenerationRequest(prompt_ids=p, max_tokens=16, temperature=temperature) for p in prompts]
    results = generate_batch(tiny_lm, requests, eos_token_ids=[], pad_token_id=0, generator=torch.Generator().manual_seed(1))
    for request, result in zip(requests, results, strict=True):
        assert len(result.token_ids) == 16 and result.stop_reason == "length"
        expected = teacher_forced_log_probs(tiny_lm, request.prompt_ids, result.token_ids, temperature)
        torch.testing.assert_close(torch.tensor(result.log_probs), expected, atol=1e-4, rtol=0)


def test_stops_at_eos_and_keeps_it(tiny_lm):
    (probe,) = generate_batch(tiny_lm, [GenerationRequest([5, 6, 7], max_tokens=8, temperature=0.0)], [], 0)
    eos = probe.token_ids[3]  # make the 4th greedy token the eos
    stops = [t for t in probe.token_ids[:3] if t == eos]
    (result,) = generate_batch(tiny_lm, [GenerationRequest([5, 6, 7], max_tokens=8, temperature=0.0)], [eos], 0)
    assert result.token_ids == probe.token_ids[: probe.token_ids.index(eos) + 1]
    assert result.token_ids[-1] == eos and result.stop_reason == "completed"
    assert not stops or len(result.token_ids) < 4
    ignoring = GenerationRequest([5, 6, 7], max_tokens=8, temperature=0.0, ignore_eos=True)
    (full,) = generate_batch(tiny_lm, [ignoring], [eos], 0)
    assert full.token_ids == probe.token_ids


def _bracketed(ids: list[int]) -> str:
    """A decoding where every token is its own text, so a stop string's first complete match is known."""
    return "".join(f"<{token}>" for token in ids)


def test_stop_strings_end_the_generation_as_vllm_does(tiny_lm):
    """The ids end with the token whose text completes the stop string (no eos after it); a stop string
    spanning two tokens completes at the second; the server reads ``stop`` from the sampling params."""
    (probe,) = generate_batch(tiny_lm, [GenerationRequest([5, 6, 7], max_tokens=12, temperature=0.0)], [], 0)
    ids = probe.token_ids
    single = f"<{ids[4]}>"
    spanning = f"{ids[3]}><{ids[4]}"  # the tail of token 4's text and the head of token 5's
    for stop in (single, spanning):
        request = GenerationRequest([5, 6, 7], max_tokens=12, temperature=0.0, stop=(stop,))
        (result,) = generate_batch(tiny_lm, [request], [], 0, decode=_bracketed)
        end = _bracketed(ids).index(stop) + len(stop)
        expected = next(n for n in range(1, len(ids) + 1) if len(_bracketed(ids[:n])) >= end)
        assert result.token_ids == ids[:expected] and result.stop_reason == "completed"
        assert result.log_probs == pytest.approx(probe.log_probs[:expected])
    with pytest.raises(ValueError, match="decode"):
        generate_batch(tiny_lm, [GenerationRequest([5], max_tokens=2, stop=("x",))], [], 0)

    server = server_on(tiny_lm, 63, 12)
    server.tokenizer = SimpleNamespace(decode=lambda ids, skip_special_tokens=False: _bracketed(ids))
    greedy = {"temperature": 0.0, "stop": [single], "include_stop_str_in_output": True}
    out = asyncio.run(server.generate(request_id="s", prompt_ids=[5, 6, 7], sampling_params=greedy))
    assert out.token_ids == ids[: ids.index(ids[4]) + 1] and out.stop_reason == "completed"


def test_top_k_one_is_greedy_and_top_p_keeps_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    kept = filter_top_k_top_p(logits, torch.tensor([1, -1]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(kept[0]).tolist() == [True, False, False, False]
    assert torch.isfinite(kept[1]).all()
    probs = torch.softmax(logits[:1], -1)  # ~[0.61, 0.22, 0.14, 0.03]
    kept = filter_top_k_top_p(logits[:1], torch.tensor([-1]), torch.tensor([0.7]))
    assert torch.isfinite(kept[0]).tolist() == [True, True, False, False]
    assert probs[0, 0] < 0.7 < probs[0, :2].sum()


def test_server_caps_lengths_batches_concurrent_requests_and_tags_steps(tiny_lm):
    server = server_on(tiny_lm, 63, 6)

    async def main():
        await server.set_global_steps(3)
        greedy = {"temperature": 0.0, "top_p": 1.0, "top_k": -1}
        return await asyncio.gather(
            server.generate(request_id="a", prompt_ids=[5, 6, 7], sampling_params=dict(greedy)),
            server.generate(request_id="b", prompt_ids=[8, 9], sampling_params={**greedy, "max_tokens": 2}),
            server.generate(request_id="c", prompt_ids=[8, 9], sampling_params={**greedy, "max_tokens": 100}),
        )

    first, second, third = asyncio.run(main())
    assert len(first.token_ids) <= 6 and len(second.token_ids) <= 2 and len(third.token_ids) <= 6
    assert len(first.log_probs) == len(first.token_ids)
    assert first.extra_fields["global_steps"] == 3
    # veRL's default budget when no max_tokens is given: prompt_length + response_length - len(prompt)
    assert server._request_from(list(range(200)), {}).max_tokens == 6
    assert server._request_from(list(range(258)), {}).max_tokens == 4
    assert server.stats["batches"] == 1 and server.stats["requests"] == 3  # gathered into one batch


def test_update_weights_changes_generation(tiny_lm):
    import copy

    model = copy.deepcopy(tiny_lm)
    server = server_on(model, 63, 8)
    greedy = {"temperature": 0.0}

    async def generate():
        return (await server.generate(request_id="x", prompt_ids=[5, 6, 7], sampling_params=greedy)).token_ids

    before = asyncio.run(generate())
    new_state = {name: torch.randn_like(t) for name, t in tiny_lm.state_dict().items()}
    report = asyncio.run(server.update_weights(new_state, global_steps=1))
    assert report["missing"] == [] and report["unexpected"] == []
    after = asyncio.run(generate())
    assert after != before
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], new_state["lm_head.weight"])
    asyncio.run(server.update_weights(tiny_lm.state_dict()))
    assert asyncio.run(generate()) == before


def test_adapter_streams_trainer_weights_in_buckets(tiny_lm):
    import copy

    from verl_selflock.verl_adapter.cpu.hf_rollout import HFServerAdapter

    server = server_on(copy.deepcopy(tiny_lm), 63, 8)
    calls = []

    class _Method:
        def __init__(self, fn):
            self.fn = fn

        def remote(self, *args, **kwargs):
            calls.append((sorted(args[0]), kwargs.get("finished", False)))
            return self.fn(*args, **kwargs)

    adapter = HFServerAdapter.__new__(HFServerAdapter)  # no Ray: talk to the server object directly
    adapter.is_leader_rank, adapter.bucket_bytes = True, 4096
    adapter._server = SimpleNamespace(load_weights=_Method(server.load_weights))
    new_state = {name: torch.randn_like(t) for name, t in tiny_lm.state_dict().items() if name != "lm_head.weight"}
    asyncio.run(adapter.update_weights(iter(new_state.items()), global_steps=7))
    assert len(calls) > 2 and calls[-1][1] and not any(finished for _, finished in calls[:-1])
    assert sorted(n for names, _ in calls for n in names) == sorted(new_state)
    for name, tensor in new_state.items():
        torch.testing.assert_close(server.model.state_dict()[name], tensor)
    assert server.global_steps == 7 and server.stats["weight_updates"] == 1


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoTokenizer

    from verl_selflock.verl_adapter.cpu.sampling import eos_token_ids_of, load_causal_lm

    model = load_causal_lm(smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return model, tokenizer, eos_token_ids_of(tokenizer, model.generation_config)


def _chat(tokenizer, text: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.slow
def test_smollm2_generation_log_probs_match_forward_and_stop_at_eos(smollm2):
    model, tokenizer, eos = smollm2
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    prompts = [_chat(tokenizer, "What is 2+3? Reply with just the number."), _chat(tokenizer, "Write a long poem.")]
    requests = [
        GenerationRequest(prompts[0], max_tokens=24, temperature=0.0),
        GenerationRequest(prompts[1], max_tokens=24, temperature=1.0, top_p=0.9, top_k=50),
    ]
    short, long = generate_batch(model, requests, eos, tokenizer.pad_token_id, torch.Generator().manual_seed(0))
    assert short.stop_reason == "completed" and short.token_ids[-1] in eos and len(short.token_ids) < 24
    assert "5" in tokenizer.decode(short.token_ids)
    assert len(long.token_ids) == 24 and long.stop_reason == "length"  # capped
    for request, result in ((requests[0], short), (requests[1], long)):
        expected = teacher_forced_log_probs(model, request.prompt_ids, result.token_ids, request.temperature)
        got = torch.tensor(result.log_probs)
        assert (got - expected).abs().max() < 1e-3
        if len(got) > 2 and expected.std() > 0:
            assert torch.corrcoef(torch.stack([got, expected]))[0, 1] > 0.99


@pytest.mark.slow
def test_smollm2_stop_string_ends_at_the_same_tokens(smollm2):
    """With the real tokenizer: a stop string taken from the greedy reply ends the generation at the token
    that completes it, the tokens before it unchanged (what vLLM returns with ``stop``)."""
    model, tokenizer, eos = smollm2
    prompt = _chat(tokenizer, "Write one sentence about the sea.")
    (full,) = generate_batch(model, [GenerationRequest(prompt, max_tokens=20, temperature=0.0)], eos, 0)
    stop = tokenizer.decode(full.token_ids[6:8])
    assert stop.strip(), stop
    request = GenerationRequest(prompt, max_tokens=20, temperature=0.0, stop=(stop,))
    (cut,) = generate_batch(model, [request], eos, 0, decode=tokenizer.decode)
    n = len(cut.token_ids)
    assert cut.token_ids == full.token_ids[:n] and stop in tokenizer.decode(cut.token_ids)
    assert stop not in tokenizer.decode(cut.token_ids[:-1]) and cut.stop_reason == "completed"


@pytest.mark.slow
def test_smollm2_server_respects_response_length_and_weight_updates(smollm2):
    model, tokenizer, eos = smollm2
    server = server_on(model, eos[0], 10)
    prompt = _chat(tokenizer, "Write a long story about a dragon.")

    async def generate():
        out = await server.generate(request_id="r", prompt_ids=prompt, sampling_params={"temperature": 0.0})
        return out.token_ids

    before = asyncio.run(generate())
    assert len(before) == 10
    original = {name: t.clone() for name, t in model.state_dict().items()}
    perturbed = {name: t + 0.05 * torch.randn_like(t) for name, t in original.items()}
    asyncio.run(server.update_weights(perturbed))
    assert asyncio.run(generate()) != before
    asyncio.run(server.update_weights(original))
    assert asyncio.run(generate()) == before
