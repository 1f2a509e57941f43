"""Generation time of the CPU (``hf``) rollout per training step: before the prefix cache, and now
without it, with it, and with it and the main job's speculative decoding.

    python benchmarks/bench_hf_rollout.py                  # the main job's shapes, 2 steps
    python benchmarks/bench_hf_rollout.py --max-batch-size 1   # requests one by one (no batched decode)

The shapes of the main job (``recipes/pe_g/cpu_smoke.yaml``, read from the recipe): its policy
(SmolLM2-135M-Instruct warm-started on expert episodes, built and cached on first use), its training
rows (compact PE-G, S=2, 4 turns), its ``selflock_agent_loop`` caps (turns of at most 64 tokens,
observations of at most 160), a batch of 2 episodes per step. Each step replays real multi-turn
episodes through :class:`HFGenerationServer` (the server the agent loop talks to, same request id for
every turn of an episode, both episodes' turns sent concurrently so that they are batched): greedy
turns, cut after their first closing tag as the agent loop cuts them, judged by the real PE
environment, whose feedback comes back as the next user message. The timer covers the ``generate``
calls only. Each step runs four times on the same conversations (greedy decoding):

- ``before``: the decoding loop as it was before this work (``benchmarks/baselines/hf_generate_before.py``,
  commit d01a161: every turn re-prefills the whole conversation, full-vocabulary logits at every prefill
  position, concatenated KV cache, plain sdpa attention, plain linears);
- ``off``: today's loop with the prefix cache off (the other speed-ups stay: last-position logits in
  prefill, a preallocated decode cache, grouped-query attention folded at decode);
- ``on``: today's loop with each conversation's KV cache reused from its previous turn;
- ``spec``: ``on`` plus the recipe's n-gram speculative decoding
  (``rollout.engine_kwargs.hf.speculative_config``), i.e. the main job's rollout.

Printed: each arm's ratio to ``before`` (the issue's target for the main job's rollout: <= 0.5), on / off
(the cache alone) and spec / on (speculation alone), and the drafts' acceptance. Greedy tokens must be
identical between ``off``, ``on`` and ``spec``; whether ``before`` matched them is printed too.

Two clocks: wall time, and the process's CPU time (the server decodes on one torch thread, so on a
shared machine the CPU time is the work done, the wall time adds the waits for a core).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pandas as pd
import torch

from verl_selflock.envs import make_env
from verl_selflock.episode.token_cut import cap_text_tokens, cut_turn, end_of_turn_ids
from verl_selflock.verl_adapter.cpu import generation_server
from verl_selflock.verl_adapter.cpu.generation_server import HFGenerationServer
from verl_selflock.verl_adapter.cpu.packed_linear import PackedLinear
from verl_selflock.verl_adapter.cpu.prefix_cache import PrefixCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from baselines import hf_generate_before


def make_server(model_path: str, args: argparse.Namespace) -> HFGenerationServer:
    """The real server (its own ``__init__``: model, tokenizer, options) with the smoke recipe's rollout config."""
    config = SimpleNamespace(
        engine_kwargs={"hf": {"num_threads": args.threads, "max_batch_size": args.max_batch_size,
                              "speculative_config": args.speculative_config}},
        max_num_seqs=256,
        seed=0,
        prompt_length=args.prompt_length,
        response_length=args.response_length,
        temperature=1.0,
        max_model_len=None,
        repetition_penalty=1.0,
        ignore_eos=False,
        enable_prefix_caching=True,
        full_determinism=False,
    )
    return HFGenerationServer(config, SimpleNamespace(path=model_path, local_path=model_path))


async def play_step(server: HFGenerationServer, rows: list[dict[str, Any]], args: argparse.Namespace, tag: str) -> dict:
    """Play the episodes of ``rows`` together; returns the generation time and every turn's tokens."""
    tokenizer = server.tokenizer
    eot_ids = end_of_turn_ids(tokenizer)
    stop_ids = set(server.eos_token_ids)
    episodes = []
    for k, row in enumerate(rows):
        prompt = tokenizer.apply_chat_template(list(row["prompt"]), add_generation_prompt=True, tokenize=True)
        ids = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        env = make_env(row["extra_info"]["env"])
        episodes.append({"id": f"{tag}-ep{k}", "ids": ids, "prompt_len": len(ids), "env": env, "turns": []})

    generate_s = cpu_s = 0.0
    live = list(episodes)
    for _ in range(args.turns):
        params = {"temperature": 0.0, "max_tokens": args.max_turn_tokens}
        started, cpu_started = time.perf_counter(), time.process_time()
        outputs = await asyncio.gather(
            *[server.generate(request_id=ep["id"], prompt_ids=ep["ids"], sampling_params=params) for ep in live]
        )
        generate_s += time.perf_counter() - started
        cpu_s += time.process_time() - cpu_started
        still = []
        for ep, out in zip(live, outputs, strict=True):
            ep["turns"].append(list(out.token_ids))
            cut = cut_turn(tokenizer, list(out.token_ids), eot_ids, stop_ids, tags=ep["env"].closing_tags)
            ep["ids"] += cut.kept_ids + cut.closing_ids
            step = await ep["env"].step(cut.text)
            if step.done or step.observation is None:
                continue
            obs, _ = cap_text_tokens(tokenizer, step.observation, args.max_obs_tokens)
            # the next user message and assistant header, as the chat template renders them (ChatML)
            ep["ids"] += tokenizer.encode(f"<|im_start|>user\n{obs}<|im_end|>\n<|im_start|>assistant\n")
            still.append(ep)
        live = still
        if not live:
            break
    return {
        "generate_s": generate_s,
        "cpu_s": cpu_s,
        "turns": [ep["turns"] for ep in episodes],
        "prompt_tokens": [ep["prompt_len"] for ep in episodes],
        "final_tokens": [len(ep["ids"]) for ep in episodes],
    }


def recipe_shapes(recipe: Path) -> dict[str, Any]:
    """The main job's policy path, training rows and agent-loop caps, resolved from its recipe (the
    warm-started model is built and cached on first use, as the main job does)."""
    from omegaconf import OmegaConf

    from verl_selflock.verl_adapter.resolvers import register_resolvers

    register_resolvers()
    config = OmegaConf.load(recipe)
    speculative = OmegaConf.select(config, "actor_rollout_ref.rollout.engine_kwargs.hf.speculative_config")
    return {
        "model": str(config.actor_rollout_ref.model.path),
        "train_file": str(config.data.train_files),
        "max_turn_tokens": int(config.selflock_agent_loop.max_turn_tokens),
        "max_obs_tokens": int(config.selflock_agent_loop.max_obs_tokens),
        "episodes": int(config.data.train_batch_size) * int(config.actor_rollout_ref.rollout.n),
        "prompt_length": int(config.data.max_prompt_length),
        "response_length": int(config.data.max_response_length),
        "speculative_config": OmegaConf.to_container(speculative) if speculative is not None else None,
    }


@contextlib.contextmanager
def before_backend(server: HFGenerationServer) -> Iterator[None]:
    """The server decoding with the loop from before the prefix cache, on plain sdpa attention and linears."""
    def old_generate(model, requests, eos_token_ids, pad_token_id, generator=None, decode=None, prefixes=None,
                     keep_kv=False, speculation=None):
        return hf_generate_before.generate_batch(model, requests, eos_token_ids, pad_token_id, generator, decode)

    attention = server.model.config._attn_implementation
    server.model.set_attn_implementation("sdpa")
    packed = [module for module in server.model.modules() if isinstance(module, PackedLinear)]
    rows = [module.max_rows for module in packed]
    try:
        for module in packed:
            module.max_rows = 0
        with mock.patch.object(generation_server, "generate_batch", old_generate):
            yield
    finally:
        server.model.set_attn_implementation(attention)
        for module, max_rows in zip(packed, rows, strict=True):
            module.max_rows = max_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "pe_g" / "cpu_smoke.yaml")
    parser.add_argument("--steps", type=int, default=2, help="rollout steps (each a new batch of rows)")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the server's default: 1)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="1: every request decoded alone")
    args = parser.parse_args()
    shapes = recipe_shapes(args.recipe)
    for key in ("max_turn_tokens", "max_obs_tokens", "prompt_length", "response_length", "speculative_config"):
        setattr(args, key, shapes[key])
    episodes = shapes["episodes"]

    rows = pd.read_parquet(shapes["train_file"]).to_dict("records")
    server = make_server(shapes["model"], args)
    cache = server.prefix_cache or PrefixCache()
    speculation = server.speculation
    if speculation is None:
        raise SystemExit(f"{args.recipe} sets no rollout.engine_kwargs.hf.speculative_config: nothing to time for spec")
    arms = ("before", "off", "on", "spec")

    async def run() -> list[dict[str, dict]]:
        await server.generate(request_id="warmup", prompt_ids=[1, 2, 3], sampling_params={"max_tokens": 4})
        steps = []
        for step in range(args.steps):
            batch = rows[step * episodes : (step + 1) * episodes]
            server.prefix_cache, server.speculation = None, None
            with before_backend(server):
                before = await play_step(server, batch, args, f"before{step}")
            off = await play_step(server, batch, args, f"off{step}")
            server.prefix_cache = cache
            # a weight update between steps (the trainer's, here the same weights) drops the cache
            await server.update_weights(dict(server.model.state_dict()), global_steps=step)
            on = await play_step(server, batch, args, f"on{step}")
            await server.update_weights(dict(server.model.state_dict()), global_steps=step)
            server.speculation = speculation
            spec = await play_step(server, batch, args, f"spec{step}")
            steps.append({"before": before, "off": off, "on": on, "spec": spec})
            times = ", ".join(f"{arm} {steps[-1][arm]['generate_s']:.1f} / {steps[-1][arm]['cpu_s']:.1f}" for arm in arms)
            print(
                f"step {step} (s wall / s CPU): {times}; prompts {off['prompt_tokens']} -> {off['final_tokens']} "
                f"tokens, turns {[len(t) for t in off['turns']]}",
                flush=True,
            )
        return steps

    steps = asyncio.run(run())
    identical = all(s["off"]["turns"] == s["on"]["turns"] == s["spec"]["turns"] for s in steps)
    before_identical = all(s["before"]["turns"] == s["on"]["turns"] for s in steps)
    print(f"model {shapes['model']}; {episodes} episodes per step, turns <= {args.max_turn_tokens} tokens, "
          f"observations <= {args.max_obs_tokens}; torch threads {torch.get_num_threads()}, "
          f"max_batch_size {args.max_batch_size}, {len(steps)} steps; speculation {args.speculative_config}")
    for clock, label in (("generate_s", "wall"), ("cpu_s", "process CPU")):
        mean = {arm: sum(s[arm][clock] for s in steps) / len(steps) for arm in arms}
        print(
            f"generation per step ({label}): "
            + ", ".join(f"{arm} {mean[arm]:.1f} s ({mean[arm] / mean['before']:.2f}x before)" for arm in arms)
            + f"; spec / before {mean['spec'] / mean['before']:.2f} (target <= 0.5), on / off "
            f"{mean['on'] / mean['off']:.2f}, spec / on {mean['spec'] / mean['on']:.2f}"
        )
    stats = asyncio.run(server.get_stats())
    print(f"prefix cache: {cache.stats}, {len(cache)} entries, {cache.nbytes / 2**20:.1f} MiB; drafts: "
          f"{stats['accepted_draft_tokens']} of {stats['draft_tokens']} draft tokens accepted")
    print(f"greedy tokens identical without the cache, with it and with speculation: {identical}; before's "
          f"tokens the same: {before_identical}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
