"""IGPO's scoring cost against veRL's old-log-prob pass (``cost``, the default) and against the rollout it
scores, with the tokens T3 saves (``rollout``), on CPU with SmolLM2-135M.

    python benchmarks/bench_igpo.py                      # cost: ~5 min (the per-prefix pass is most of it)
    python benchmarks/bench_igpo.py --part rollout --episodes 4 --max-turns 6 --turn-tokens 32   # ~10 min

``cost``: PE-G paper shapes (512 prompts x n 5, 10 turns of
<= 512 tokens, ~900-token prompt, ~150-token observations) with every length scaled by
``--length-scale`` and the batch cut to ``--prompts`` prompts, token ids random (the cost does not
depend on them). It times the old-log-prob pass (one forward over every trajectory) and IGPO's scoring
both ways: per prefix (one forward per distinct turn prefix, in chunks of ``--chunk-tokens``) and packed
(``algorithm.igpo.scoring=packed``: one forward per row under a tree attention mask, rows concatenated up
to ``--micro-tokens``), prints both ratios (target <= 1.5x), the packed scores' largest difference from the
per-prefix ones, and the chunks' partition sizes and driver bytes; then builds the plan at the full
paper shapes (no forward) to show the tokens of both ways and the chunk bounds there.

Measured 2026-12-06 (defaults, one thread, while another job ran at nice 19 on the other core):
old-log-prob pass 10 sequences, 7,674 tokens, 27.6 s; per prefix 92 sequences, 44,373 tokens, 157.3 s
(5.70x); packed 10,878 tokens, 35.8 s (**1.30x** in time, 1.42x in tokens), scores within 1.9e-6. At full
paper shapes: per prefix 83.6M tokens (5.37x), packed 15.5M (1.00x).

``rollout``:

1. Rollout: ``--episodes`` PE-G (S=3) episodes from our data builder, run concurrently through the real
   ``active_reasoning`` agent loop against our HF generation server (the CPU backend's rollout: batched
   decoding with a KV cache), SmolLM2-135M-Instruct sampling at temperature 1.
2. IGPO scoring of those episodes: one teacher-forced sequence per (episode, turn prefix), scored in
   batches by the same model (:func:`verl_selflock.algorithms.igpo_plan.score_with_hf_model`; in training
   the actor does this, packed by default). Printed: its wall time / the rollout's wall time.
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
on 2026-11-30, 24 s for 8 sequences against 58 s (0.41), and without T3 (4 turns, 16 sequences) 64 s (0.49);
on 2026-12-06 with packed scoring, 4.0 s for 6 sequences against 26 s of generation (0.15).
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


# -- cost: scoring vs the old-log-prob pass -----------------------------------------------------------
PAPER = {"prompts": 512, "n": 5, "turns": 10, "prompt": 900, "turn": 512, "obs": 150}
"""PE-G paper shapes: 512 prompts x 5 rollouts, 10 turns of <= 512 tokens, a ~900-token prompt, the
feedback between turns ~150 tokens (recipes/pe_g/base.yaml: 6656 response tokens for 10 turns)."""


def synthetic_batch(prompts: int, n: int, turns: int, prompt_len: int, turn_len: int, obs_len: int, vocab: int,
                    seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[int]]]:
    """Random-token trajectories with PE-G's layout: per row a prompt shared by its group, then ``turns``
    agent turns of 50-100% of ``turn_len`` tokens, each followed by ``obs_len`` observation tokens
    (none after the last). Returns prompts, responses and per-token turn ids (-1 on observations)."""
    gen = torch.Generator().manual_seed(seed)
    out_prompts, responses, turn_ids = [], [], []
    for _ in range(prompts):
        prompt = torch.randint(vocab, (prompt_len,), generator=gen)
        for _ in range(n):
            pieces, ids = [], []
            for k in range(turns):
                length = int(torch.randint(max(turn_len // 2, 1), turn_len + 1, (1,), generator=gen))
                pieces.append(torch.randint(vocab, (length,), generator=gen))
                ids += [k] * length
                if k < turns - 1:
                    pieces.append(torch.randint(vocab, (obs_len,), generator=gen))
                    ids += [-1] * obs_len
            out_prompts.append(prompt)
            responses.append(torch.cat(pieces))
            turn_ids.append(ids)
    return out_prompts, responses, turn_ids


@torch.no_grad()
def forward_all(model: Any, seqs: list[torch.Tensor], micro_tokens: int) -> float:
    """Per-token log-probs of every sequence, as veRL's engine computes them for ``compute_log_prob``
    (full logits, log-softmax, gather), in micro-batches of at most ``micro_tokens`` padded tokens of
    similar-length sequences (veRL's dynamic batch sizes, without remove-padding). Returns seconds."""
    start = time.perf_counter()
    order = sorted(range(len(seqs)), key=lambda i: seqs[i].numel())
    batch: list[torch.Tensor] = []

    def run(batch: list[torch.Tensor]) -> None:
        width = max(s.numel() for s in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for j, s in enumerate(batch):
            ids[j, : s.numel()], mask[j, : s.numel()] = s, 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1))

    for i in order:
        if batch and (len(batch) + 1) * seqs[i].numel() > micro_tokens:  # sorted: the newest is the widest
            run(batch)
            batch = []
        batch.append(seqs[i])
    if batch:
        run(batch)
    return time.perf_counter() - start


def chunk_bytes(plan: Any, chunk: list[int]) -> tuple[int, int]:
    """(tokens, driver bytes) of one chunk: its materialised sequences plus the TensorDict of fields put
    into TransferQueue (what :func:`score_with_actor` holds at once)."""
    from verl_selflock.verl_adapter.igpo_scoring import plan_to_tensordict

    sub = plan.subset(chunk)
    seqs = sub.input_ids
    fields = plan_to_tensordict(sub, None, seqs)
    nbytes = sum(s.numel() * s.element_size() for s in seqs)
    for key in fields.keys():  # noqa: SIM118  (a TensorDict: iterating it yields no keys)
        value = fields[key]
        if isinstance(value, torch.Tensor):
            nbytes += (value.values() if value.is_nested else value).numel() * value.element_size()
    return sum(s.numel() for s in seqs), nbytes


def build_plan(prompts: list[torch.Tensor], responses: list[torch.Tensor], turn_ids: list[list[int]],
               tokenizer: Any) -> Any:
    from verl_selflock.algorithms.igpo_config import IgpoConfig
    from verl_selflock.algorithms.igpo_plan import plan_scoring

    answer = "0.412,0.335,0.253"  # a PE-G answer (w* of S=3)
    return plan_scoring(prompts, responses, turn_ids, [answer] * len(prompts), tokenizer, IgpoConfig())


def run_cost(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from verl_selflock.algorithms.igpo_packing import packed_chunks, packed_lengths, score_packed_with_hf_model
    from verl_selflock.algorithms.igpo_plan import score_with_hf_model
    from verl_selflock.models import smollm2_path
    from verl_selflock.verl_adapter.cpu.sampling import load_causal_lm

    model_dir = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_causal_lm(model_dir).float().eval()
    vocab = int(model.config.vocab_size)
    scale = args.length_scale
    shape = {k: max(1, round(PAPER[k] * scale)) for k in ("prompt", "turn", "obs")}
    prompts, responses, turn_ids = synthetic_batch(args.prompts, PAPER["n"], PAPER["turns"], shape["prompt"],
                                                   shape["turn"], shape["obs"], vocab, args.seed)
    plan_start = time.perf_counter()
    plan = build_plan(prompts, responses, turn_ids, tokenizer)
    plan_s = time.perf_counter() - plan_start
    trajectories = [torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)]
    old_tokens = sum(t.numel() for t in trajectories)

    forward_all(model, trajectories[:2], args.micro_tokens)  # warm-up
    old_s = forward_all(model, trajectories, args.micro_tokens)
    chunks = plan.chunks(args.chunk_tokens)
    score_s = sum(forward_all(model, plan.subset(c).input_ids, args.micro_tokens) for c in chunks)
    sizes = [chunk_bytes(plan, c) for c in chunks]
    packed_chunk_list = packed_chunks(plan, args.chunk_tokens)
    packed_tokens = int(packed_lengths(plan).sum())
    start = time.perf_counter()
    packed = torch.cat([
        score_packed_with_hf_model(model, plan.subset(c), max_tokens=args.micro_tokens) for c in packed_chunk_list
    ])
    packed_s = time.perf_counter() - start
    reference = score_with_hf_model(model, plan.subset(packed_chunk_list[0]), batch_size=8)
    worst = float((packed[: len(reference)] - reference).abs().max())

    print(f"device: CPU, torch threads {args.threads}; model SmolLM2-135M-Instruct (fp32)", flush=True)
    print(f"shapes: PE-G paper x {scale} in length ({shape['prompt']}-token prompt, {PAPER['turns']} turns of "
          f"{shape['turn'] // 2}-{shape['turn']} tokens, {shape['obs']}-token observations), {args.prompts} prompts x "
          f"n {PAPER['n']} = {len(prompts)} rows (paper: {PAPER['prompts']} prompts)")
    print("\n== IGPO scoring vs veRL's old-log-prob pass (same forward, micro-batches of "
          f"<= {args.micro_tokens} padded tokens) ==")
    print(f"old-log-prob pass: {len(trajectories)} sequences, {old_tokens} tokens, {old_s:.2f} s")
    print(f"IGPO scoring:      {len(plan)} sequences ({plan.entry_seq.numel()} (row, turn) pairs, "
          f"{plan.entry_seq.numel() - len(plan)} shared), {plan.num_tokens} tokens, {score_s:.2f} s in "
          f"{len(chunks)} chunks; plan built in {plan_s * 1000:.0f} ms")
    print(f"ratio scoring / old-log-prob: time {score_s / old_s:.2f}x, tokens {plan.num_tokens / old_tokens:.2f}x")
    print(f"IGPO packed scoring (algorithm.igpo.scoring=packed, the default): {len(packed_chunk_list)} chunks, "
          f"{packed_tokens} tokens (one forward per row: trunk + tails under a tree mask), {packed_s:.2f} s; "
          f"max |packed - per-prefix| mean log-prob {worst:.1e} on the first chunk")
    print(f"ratio packed scoring / old-log-prob: time {packed_s / old_s:.2f}x, tokens {packed_tokens / old_tokens:.2f}x "
          "(target <= 1.5x)")
    print(f"per chunk (--chunk-tokens {args.chunk_tokens}): max {max(t for t, _ in sizes)} tokens, "
          f"max {max(b for _, b in sizes) / 2**20:.2f} MiB on the driver (sequences + TensorDict fields); "
          f"all at once would be {sum(b for _, b in sizes) / 2**20:.2f} MiB")
    paper_shapes(tokenizer, vocab, args.seed)


def paper_shapes(tokenizer: Any, vocab: int, seed: int) -> None:
    """The plan at full PE-G paper shapes (no forward): tokens, chunks and driver bytes per chunk at the
    default ``algorithm.igpo.scoring_chunk_tokens``."""
    from verl_selflock.algorithms.igpo_config import DEFAULT_SCORING_CHUNK_TOKENS
    from verl_selflock.algorithms.igpo_packing import packed_lengths

    rss0 = _rss_mib()
    prompts, responses, turn_ids = synthetic_batch(PAPER["prompts"], PAPER["n"], PAPER["turns"], PAPER["prompt"],
                                                   PAPER["turn"], PAPER["obs"], vocab, seed)
    old_tokens = sum(p.numel() + r.numel() for p, r in zip(prompts, responses, strict=True))
    start = time.perf_counter()
    plan = build_plan(prompts, responses, turn_ids, tokenizer)
    plan_s = time.perf_counter() - start
    chunks = plan.chunks(DEFAULT_SCORING_CHUNK_TOKENS)
    largest = max(chunks, key=lambda c: int(plan.lengths[c].sum()))
    tokens, nbytes = chunk_bytes(plan, largest)
    rss1 = _rss_mib()
    print(f"\n== full PE-G paper shapes: {len(prompts)} rows, {old_tokens / 1e6:.1f}M trajectory tokens (plan only) ==")
    packed_tokens = int(packed_lengths(plan).sum())
    print(f"scoring per prefix: {len(plan)} sequences ({plan.entry_seq.numel() - len(plan)} shared), "
          f"{plan.num_tokens / 1e6:.1f}M tokens = {plan.num_tokens / old_tokens:.2f}x the old-log-prob pass; "
          f"plan built in {plan_s:.1f} s")
    print(f"scoring packed: {packed_tokens / 1e6:.1f}M tokens = {packed_tokens / old_tokens:.2f}x the old-log-prob pass")
    print(f"default scoring_chunk_tokens {DEFAULT_SCORING_CHUNK_TOKENS}: {len(chunks)} chunks; largest "
          f"{tokens} tokens, {len(largest)} sequences, {nbytes / 2**20:.0f} MiB on the driver "
          f"(one call: ~{nbytes / tokens * plan.num_tokens / 2**30:.1f} GiB); process RSS grew by "
          f"{rss1 - rss0:.0f} MiB (the batch's tensors, the plan and that chunk)")


def _rss_mib() -> float:
    """Resident memory of this process now (Linux), MiB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["cost", "rollout"], default="cost")
    parser.add_argument("--prompts", type=int, default=2, help="cost: prompts (x n 5 rollouts)")
    parser.add_argument("--length-scale", type=float, default=0.125, help="cost: factor on every paper length")
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="cost: algorithm.igpo.scoring_chunk_tokens")
    parser.add_argument("--micro-tokens", type=int, default=4096, help="cost: tokens per forward micro-batch")
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
    if args.part == "cost":
        run_cost(args)
        return

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
