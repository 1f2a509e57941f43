"""Does AREW change what the agent learns? Vanilla PPO, AREW (AS only), AREW (AS + BT) and KL-Cov,
from the same warm-started model, on the same data, steps and seeds.

Each (arm, seed) is one run of veRL's real training loop (``python -m verl.trainer.main_ppo``) on the
embedded CPU default (``recipes/pe_g/cpu_smoke.yaml``) with the arm's flags; its metrics go to
``<out>/<arm>_s<seed>.jsonl`` (veRL's file logger) and its console to ``<arm>_s<seed>.log``. Runs that
already finished are not rerun, and a run stopped part-way resumes from its last checkpoint (every
``--save-freq`` steps), so the script can be stopped and started again, across sessions.

The table: for every arm and metric, each seed's mean over the second half of training (steps > N/2),
then the mean over seeds with a 95% t-interval (with two seeds the interval is wide: it is honest);
and the same at step 1, where all arms start from the same model. The plot: ``verl-selflock plot train``.

    VERL_PLATFORM=cpu python benchmarks/bench_learning.py --steps 20 --seeds 0 1 --out outputs/bench_learning
    python benchmarks/bench_learning.py --out outputs/bench_learning --report-only   # table of what ran
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (scipy is not a dependency);
# more seeds than 11 use the value for 10, a slightly wider interval.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]

ARMS: dict[str, list[str]] = {
    # Our selflock trainer mode runs veRL's own GAE step for gae and still logs the diagnostics.
    "vanilla_ppo": ["algorithm.adv_estimator=gae"],
    "arew_as": ["algorithm.adv_estimator=arew", "algorithm.arew.channels=as"],
    "arew_as_bt": ["algorithm.adv_estimator=arew", "algorithm.arew.channels=both"],
    # recipes/pe_g/kl_cov.yaml's policy loss on the same setting.
    "kl_cov": [
        "algorithm.adv_estimator=gae",
        "actor_rollout_ref.actor.policy_loss.loss_mode=kl_cov",
        "actor_rollout_ref.actor.policy_loss.kl_cov_ratio=0.002",
        "actor_rollout_ref.actor.policy_loss.ppo_kl_coef=1.0",
    ],
}
METRICS: dict[str, str] = {
    "success": "selflock/success_rate",
    "AS proxy": "selflock/as_proxy",
    "BT proxy": "selflock/bt_proxy",
    "invalid": "selflock/invalid_ratio",
    "entropy": "actor/entropy",
}


def run_one(arm: str, seed: int, steps: int, out: Path, extra: list[str], save_freq: int) -> Path:
    """Train one (arm, seed) to ``steps`` steps; return its metrics JSONL.

    A run stopped part-way (the machine's session ended) goes on from its last checkpoint the next time
    (veRL's ``resume_mode=auto``, a checkpoint every ``save_freq`` steps, the last one kept): each attempt
    logs to its own ``<arm>_s<seed>.attempt<k>.jsonl`` (veRL's file logger truncates its file), and the
    finished run's steps are merged into ``<arm>_s<seed>.jsonl``. Skipped when that file is complete.
    """
    final = out / f"{arm}_s{seed}.jsonl"
    if len(read_steps(final)) >= steps:
        print(f"[skip] {arm} seed {seed}: {final} has {steps} steps", flush=True)
        return final
    attempts = sorted(out.glob(f"{arm}_s{seed}.attempt*.jsonl"))
    attempt = out / f"{arm}_s{seed}.attempt{len(attempts)}.jsonl"
    checkpoints = out / "checkpoints" / f"{arm}_s{seed}"
    command = [
        sys.executable, "-m", "verl.trainer.main_ppo",
        "--config-path", str(ROOT / "recipes" / "pe_g"), "--config-name", "cpu_smoke",
        *ARMS[arm],
        f"trainer.total_training_steps={steps}",
        f"trainer.save_freq={save_freq}",
        "trainer.resume_mode=auto",
        f"trainer.default_local_dir={checkpoints}",
        "trainer.max_actor_ckpt_to_keep=1",
        "trainer.max_critic_ckpt_to_keep=1",
        "trainer.logger=[console,file]",
        f"trainer.experiment_name=bench_{arm}_s{seed}",
        f"data.seed={seed}",
        f"actor_rollout_ref.rollout.seed={seed}",
        *extra,
    ]
    env = {**os.environ, "VERL_PLATFORM": os.environ.get("VERL_PLATFORM", "cpu"), "VERL_FILE_LOGGER_PATH": str(attempt)}
    start = time.perf_counter()
    with (out / f"{arm}_s{seed}.log").open("a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, check=False)
    took = time.perf_counter() - start
    merged: dict[int, dict[str, float]] = {}
    for path in [*attempts, attempt]:
        merged.update(read_steps(path))  # a resumed attempt repeats no step; a later one wins if it did
    print(f"[done] {arm} seed {seed}: exit {done.returncode}, {took / 60:.1f} min, {len(merged)} steps so far",
          flush=True)
    if len(merged) >= steps:
        final.write_text("".join(json.dumps({"step": k, "data": merged[k]}) + "\n" for k in sorted(merged)))
        shutil.rmtree(checkpoints, ignore_errors=True)
    return final


def read_steps(jsonl: Path) -> dict[int, dict[str, float]]:
    """Step -> metrics from veRL's file logger (one JSON object per step)."""
    if not jsonl.is_file():
        return {}
    steps: dict[int, dict[str, float]] = {}
    for line in jsonl.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves a partial last line
        steps[int(record["step"])] = record.get("data", {})
    return steps


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (nan with fewer than two values)."""
    if not values:
        return math.nan, math.nan
    if len(values) < 2:
        return float(values[0]), math.nan
    array = np.asarray(values, dtype=float)
    half = T975[min(len(array) - 1, len(T975)) - 1] * array.std(ddof=1) / math.sqrt(len(array))
    return float(array.mean()), float(half)


def table(out: Path, arms: list[str], seeds: list[int], steps: int) -> str:
    """Markdown table: per arm and metric, step 1 and the second half of training, mean +- 95% CI over seeds."""
    header = "| arm | seeds | " + " | ".join(f"{name} (step 1)" for name in METRICS) + " | "
    header += " | ".join(f"{name} (steps {steps // 2 + 1}-{steps})" for name in METRICS) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(METRICS))]
    for arm in arms:
        runs = [read_steps(out / f"{arm}_s{seed}.jsonl") for seed in seeds]
        runs = [run for run in runs if len(run) >= steps]
        if not runs:
            continue
        cells = []
        for window in ((1, 1), (steps // 2 + 1, steps)):
            for key in METRICS.values():
                per_seed = []
                for run in runs:
                    values = [run[s][key] for s in range(window[0], window[1] + 1) if key in run.get(s, {})]
                    if values:
                        per_seed.append(float(np.mean(values)))
                mean, half = interval(per_seed)
                if math.isnan(mean):
                    cells.append("n/a")
                else:
                    cells.append(f"{mean:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}"))
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_learning")
    parser.add_argument("--save-freq", type=int, default=5, help="checkpoint every N steps, to resume a stopped run")
    parser.add_argument("--report-only", action="store_true", help="print the table of the runs already there")
    parser.add_argument("overrides", nargs="*", help="extra veRL overrides for every run (key=value)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if not args.report_only:
        # Seed-major order: a stopped benchmark still has every arm for the first seeds.
        for seed in args.seeds:
            for arm in args.arms:
                run_one(arm, seed, args.steps, args.out, args.overrides, args.save_freq)

    report = table(args.out, args.arms, args.seeds, args.steps)
    print(report)
    (args.out / "table.md").write_text(report + "\n")
    runs = [
        f"{arm}_s{seed}={args.out / f'{arm}_s{seed}.jsonl'}"
        for arm in args.arms for seed in args.seeds if (args.out / f"{arm}_s{seed}.jsonl").is_file()
    ]
    if runs:
        plot = [sys.executable, "-m", "verl_selflock.cli", "plot", "train", "--runs", *runs,
                "--out", str(args.out / "learning.png"), "--smooth", "3"]
        subprocess.run(plot, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
