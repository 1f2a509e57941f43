"""Per-turn cost of the PE environments: cut + parse + simulated user + critique, per ``step``.

    python benchmarks/bench_pe_env.py --episodes 1000

Episodes come from the real data builder (PE-G S=2/3, PE-F D=6/8). Turns imitate model output: a
``<scratch>`` paragraph of ~1,200 characters with numbers in it, then the block the round asks for,
with ~15% broken turns (bad indices, wrong vector length, stray text, repeats, missing tags) and a
few early answers, and sometimes trailing text after the closing tag. The timer covers only
``env.step_sync(text)`` (what ``await env.step(text)`` runs); building the episode is timed apart.
Target: median and p99 per turn <= 1 ms.

Two clocks: wall time, and the thread's CPU time (``time.thread_time_ns``). On a shared machine
the wall-clock tail includes time spent waiting for a core (another process ran); the CPU-time
tail is the environment's own cost. Both are printed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from verl_selflock.data.pe import PEDataConfig, make_pe_spec, sample_pe_instance
from verl_selflock.envs import RoundKind, make_env

WORDS = (
    "movie attribute weight higher lower compare focus score pair because the user said so estimate "
    "seems matters more less than and so"
).split()


def scratch_pool(rng: np.random.Generator, size: int = 64, n_chars: int = 1200) -> list[str]:
    """Reasoning paragraphs (~1,200 characters, numbers mixed in), drawn once: generating text is not timed."""
    pool = []
    for _ in range(size):
        words = rng.choice(WORDS + [str(v) for v in range(20)], size=n_chars // 6)
        pool.append("<scratch>" + " ".join(words)[:n_chars] + "</scratch>\n")
    return pool


SCRATCH = scratch_pool(np.random.default_rng(12345))


def scratch(rng: np.random.Generator) -> str:
    return SCRATCH[int(rng.integers(len(SCRATCH)))]


def turn_text(rng: np.random.Generator, kind: RoundKind, config: PEDataConfig, asked: list[str]) -> str:
    """A model-like turn for the round ``kind``; about 15% are broken in some way."""
    D, S = config.D, config.S
    head = scratch(rng)
    broken = rng.random() < 0.15
    if kind is RoundKind.ACTION:
        if rng.random() < 0.02:
            return head + "<answer>" + ", ".join(f"{v:.2f}" for v in rng.random(D)) + "</answer>"
        if broken and asked and rng.random() < 0.3:
            return asked[int(rng.integers(len(asked)))]  # a repeat
        pair = rng.choice(np.arange(1, config.n_movies + (3 if broken else 1)), size=2, replace=False)
        lines = [f"Pair: {pair[0]},{pair[1]}"]
        if S is not None:
            focus = rng.choice(np.arange(1, D + 1), size=S, replace=False)
            lines.insert(0, "Focus: " + ",".join(map(str, focus)))
        if broken and rng.random() < 0.5:
            lines.append("The feedback of your latest query: Yes.")
        text = head + "<interact>\n" + "\n".join(lines) + "\n</interact>"
        if rng.random() < 0.1:
            text += "\nI will now wait for the user's feedback."
        asked.append(text)
        return text
    k = D if not broken else int(rng.integers(0, D + 3))
    values = ", ".join(f"{v:.3f}" for v in rng.dirichlet(np.ones(D))[:k]) if k <= D else ", ".join(["0.1"] * k)
    if kind is RoundKind.UPDATE:
        return head + f"<interact>Guess: {values}</interact>"
    return head + f"<answer>{values}</answer>"


def bench(name: str, config: PEDataConfig, episodes: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    step_ns: list[int] = []
    step_cpu_ns: list[int] = []
    build_ns: list[int] = []
    for episode in range(episodes):
        movies, w_star = sample_pe_instance(rng, config)
        spec = make_pe_spec(config, movies, w_star, seed, f"bench-{episode}")
        texts_asked: list[str] = []
        t0 = time.perf_counter_ns()
        env = make_env(spec)
        build_ns.append(time.perf_counter_ns() - t0)
        while True:
            text = turn_text(rng, env.next_round(), config, texts_asked)
            c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
            result = env.step_sync(text)
            step_ns.append(time.perf_counter_ns() - t0)
            step_cpu_ns.append(time.thread_time_ns() - c0)
            if result.done:
                break
        env.result()
    steps = np.asarray(step_ns) / 1e6
    cpu = np.asarray(step_cpu_ns) / 1e6
    builds = np.asarray(build_ns) / 1e6
    stats = {
        "turns": float(len(steps)),
        "median_ms": float(np.median(steps)),
        "p99_ms": float(np.percentile(steps, 99)),
        "cpu_median_ms": float(np.median(cpu)),
        "cpu_p99_ms": float(np.percentile(cpu, 99)),
        "build_median_ms": float(np.median(builds)),
    }
    print(
        f"{name:8s} turns {len(steps):6d} | wall median {stats['median_ms']:.4f} ms p99 {stats['p99_ms']:.4f} ms "
        f"| cpu median {stats['cpu_median_ms']:.4f} ms p99 {stats['cpu_p99_ms']:.4f} ms "
        f"| env build median {stats['build_median_ms']:.4f} ms"
    )
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=1000, help="episodes per task variant")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cases = {
        "PE-G S=2": PEDataConfig("gated", 6, 2, 10),
        "PE-G S=3": PEDataConfig("gated", 6, 3, 10),
        "PE-F D=6": PEDataConfig("full", 6, None, 12),
        "PE-F D=8": PEDataConfig("full", 8, None, 12),
    }
    results = [bench(name, config, args.episodes, args.seed) for name, config in cases.items()]
    for clock, key in (("wall", "p99_ms"), ("cpu", "cpu_p99_ms")):
        worst = max(r[key] for r in results)
        print(f"worst {clock} p99 per turn: {worst:.4f} ms ({'within' if worst <= 1.0 else 'OVER'} the 1 ms target)")


if __name__ == "__main__":
    main()
