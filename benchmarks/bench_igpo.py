"""IGPO's scoring cost against the rollout it scores, and the tokens T3 saves, on CPU with SmolLM2-135M.

    python benchmarks/bench_igpo.py --episodes 4 --max-turns 6 --turn-tokens 32

1. Rollout: ``--episodes`` PE-G (S=3) episodes from our data builder, run concurrently through the real
   ``active_reasoning`` agent loop against our HF generation server (the CPU backend's rollout: batched
   decoding with a KV cache), SmolLM2-135M-Instruct sampling at temperature 1.
2. IGPO scoring of those episodes: one teacher-forced sequence per (episode, turn prefix), scored in
   batches by the same model (:func:`verl_selflock.algorithms.igpo_plan.score_with_hf_model`; in training
   the actor's ``compute_log_prob`` does this). Printed: its wall time / the rollout's wall time.
3. T3: the same prompts rolled out again with T3 on (PE default: similarity gain, k = 2, or
   ``--t3-signal movement``): truncation rate, mean turn of the cut, generated tokens with and without T3
   and T3's own estimate of the budget it left unused.

Both clocks are wall time on a shared machine: run it a few times; ``--threads`` sets torch's intra-op
threads (1 by default, as in the CPU backend).

Measured on the 2-core shared development machine (defaults: 4 episodes, 6 turns, 32 tokens per turn):
rollout 269 s (680 generated tokens), scoring 220 s (24 sequences, 29,939 tokens) -> scoring / rollout
0.82; T3 cut 4/4 episodes at turn 4: 507 instead of 680 generated tokens, rollout 104 s instead of 269 s.
Inside veRL's training loop (the e2e test's 1-step IGPO run: 4 episodes, T3 cut at turn 2, so 2 prefixes
each) ``igpo/scoring_time_s`` was 29 s against 68 s of generation (``igpo/scoring_time_ratio_to_gen`` 0.43);
on 2026-11-30, 24 s for 8 sequences against 58 s (0.41), and without T3 (4 turns, 16 sequences) 64 s (0.49).
This script scores every episode, finished or not (as ``algorithm.igpo.unfinished=score``).
On CPU the rollout is dominated by re-reading the whole context every turn, like the scoring; the ratio
grows with the number of turns (one scored sequence per turn, each as long as the dialogue so far).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch


def compose_config(model_dir: str, response_length: int) -> Any:
    """veRL's ppo_trainer config as main_ppo composes it, with our model and lengths."""
    import verl
    from hydra import compose, initialize_config_dir

    overrides = [
        f"actor_rollout_ref.model.path={model_dir}",
        "actor_rollout_ref.rollout.name=vllm",  # only the agent loop reads this config here
        "actor_rollout_ref.rollout.prompt_length=2048",
        f"actor_rollout_ref.rollout.response_length={response_length}",
    ]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


async def rollout(config, server, tokenizer, rows, knobs) -> tuple[list[Any], float]:
    from verl_selflock.verl_adapter.standalone import build_agent_loop

    loop = build_agent_loop(config, server, tokenizer, knobs)
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    start = time.perf_counter()
    outputs = await asyncio.gather(*(loop.run(dict(sampling), priority=i, **row) for i, row in enumerate(rows)))
    return list(outputs), time.perf_counter() - start


def load_rows(episodes: int, max_turns: int, seed: int) -> list[dict[str, Any]]:
    import pandas as pd

    from verl_selflock.verl_adapter.resolvers import pe_data_dir

    folder = pe_data_dir("gated", 3, max(episodes, 8), 8, seed, max_turns)
    frame = pd.read_parquet(os.path.join(folder, "train.parquet")).head(episodes)
    rows = []
    for record in frame.to_dict("records"):
        rows.append({"raw_prompt": list(record["prompt"]), "extra_info": record["extra_info"], "index": 0})
    return rows


def generated_tokens(outputs) -> int:
    return int(sum(sum(out.response_mask) for out in outputs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=6, help="PE-G episode length (even; the paper: 10)")
    parser.add_argument("--turn-tokens", type=int, default=32, help="max tokens per agent turn")
    parser.add_argument("--scoring-batch", type=int, default=16)
    parser.add_argument("--t3-signal", default="auto", help="psi_gain (default) or movement")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    from transformers import AutoTokenizer

    from verl_selflock.algorithms.igpo_config import IgpoConfig
    from verl_selflock.algorithms.igpo_plan import plan_scoring, score_with_hf_model
    from verl_selflock.contracts import episode as ef
    from verl_selflock.models import smollm2_path
    from verl_selflock.verl_adapter.cpu.generation_server import HFGenerationServer

    model_dir = smollm2_path()
    response_length = args.max_turns * (args.turn_tokens + 200)
    config = compose_config(model_dir, response_length)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    server_config = SimpleNamespace(
        prompt_length=2048, response_length=response_length, temperature=1.0, max_model_len=None,
        max_num_seqs=args.episodes, repetition_penalty=1.0, ignore_eos=False, seed=args.seed, engine_kwargs={},
    )
    server = HFGenerationServer(server_config, SimpleNamespace(path=model_dir))
    rows = load_rows(args.episodes, args.max_turns, args.seed)
    knobs = {"max_turn_tokens": args.turn_tokens, "max_obs_tokens": 200, "min_turn_tokens": 8}

    # 1. rollout without T3, 2. IGPO scoring of it
    plain, rollout_s = asyncio.run(rollout(config, server, tokenizer, rows, knobs))
    print(f"[rollout without T3 done in {rollout_s:.1f} s]", flush=True)
    igpo = IgpoConfig()
    plan = plan_scoring(
        [o.prompt_ids for o in plain],
        [o.response_ids for o in plain],
        [o.extra_fields["turn_ids"] for o in plain],
        [o.extra_fields[ef.GT_ANSWER] for o in plain],
        tokenizer,
        igpo,
    )
    start = time.perf_counter()
    scores = score_with_hf_model(server.model, plan, batch_size=args.scoring_batch)
    scoring_s = time.perf_counter() - start

    # 3. the same prompts with T3 on
    t3_knobs = {**knobs, "t3": {"enabled": True, "signal": args.t3_signal}}
    with_t3, rollout_t3_s = asyncio.run(rollout(config, server, tokenizer, rows, t3_knobs))
    cut = [o for o in with_t3 if o.extra_fields[ef.T3_TRUNCATED]]

    turns = [o.extra_fields[ef.TURNS] for o in plain]
    print(f"device: CPU, torch threads {args.threads}; model SmolLM2-135M-Instruct; PE-G S=3, max_turns {args.max_turns}, "
          f"<= {args.turn_tokens} tokens per turn, {args.episodes} episodes")
    print("\n== IGPO teacher-forced scoring vs the rollout it scores ==")
    print(f"rollout: {rollout_s:.2f} s wall, {generated_tokens(plain)} generated tokens, turns/episode "
          f"{np.mean(turns):.1f}")
    print(f"scoring: {scoring_s:.2f} s wall, {len(plan)} sequences, {plan.num_tokens} tokens forwarded "
          f"(batch {args.scoring_batch}); mean p = {float(scores.exp().mean()):.2e}")
    print(f"scoring / rollout = {scoring_s / rollout_s:.3f}")
    print("\n== T3 ==")
    print(f"signal {args.t3_signal}; truncated {len(cut)}/{len(with_t3)} episodes"
          + (f", mean turn of the cut {np.mean([o.extra_fields[ef.T3_TURN] for o in cut]):.1f}" if cut else ""))
    print(f"generated tokens: {generated_tokens(plain)} without T3, {generated_tokens(with_t3)} with T3 "
          f"(sampled independently); rollout {rollout_s:.2f} s vs {rollout_t3_s:.2f} s")
    print(f"T3's budget left unused (an upper bound on tokens saved): "
          f"{sum(o.extra_fields[ef.T3_BUDGET_SAVED] for o in with_t3)} tokens")


if __name__ == "__main__":
    main()
