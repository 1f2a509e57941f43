"""The summary of a ``verl-selflock eval`` run: metrics with confidence intervals, the oracle-BT
masking analysis, the simulated user's failures, and the table printed on the terminal.

Validity. Tasks with a simulated user (MediQ, FloDial, tau2) degrade a simulator call that failed
after all retries into the task's "cannot answer" feedback and go on; each episode counts its calls
and failures (``EpisodeResult.metrics``, :data:`~verl_selflock.diagnostics.metrics.SIMULATOR_METRICS`).
A run whose simulator failed on more than ``max_sim_failure_rate`` of its calls measured the model
against a user who could not answer: :func:`judge_validity` marks its summary ``"valid": false`` with
the reason, and the CLI exits with :data:`INVALID_RUN_EXIT`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from verl_selflock.contracts.episode import ENV_METRICS, EpisodeStats
from verl_selflock.diagnostics.metrics import SIMULATOR_METRICS, counts_of, pearson, summarize, wilson_interval
from verl_selflock.eval.config import EPISODES_FILE, RUN_FILE
from verl_selflock.eval.store import EpisodeStore

__all__ = ["INVALID_RUN_EXIT", "format_summary", "judge_validity", "simulator_counts", "summarize_run"]

INVALID_RUN_EXIT = 3
"""Exit code of an eval whose summary is invalid (2 is taken: user errors, episodes left to retry)."""


def summarize_run(out: str | os.PathLike, selected_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Summary of the finished episodes in ``out/episodes.jsonl`` (restricted to ``selected_ids``)."""
    out = Path(out)
    records = {str(r["id"]): r for r in EpisodeStore(out / EPISODES_FILE).records(strict=True)}
    if selected_ids is not None:
        wanted = set(selected_ids)
        records = {key: value for key, value in records.items() if key in wanted}
    stats = [EpisodeStats.from_extra_fields(r.get("stats")) for r in records.values()]
    counts = [counts_of(s) for s in stats if s is not None]
    summary: dict[str, Any] = {
        "settings": json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else {},
        "episodes": len(counts),
        "selected": len(selected_ids) if selected_ids is not None else len(counts),
        "metrics": {name: estimate.as_dict() for name, estimate in summarize(counts).items()},
    }
    summary["missing"] = summary["selected"] - summary["episodes"]
    summary["simulator"] = simulator_counts(records.values())
    oracle = [r for r in records.values() if isinstance(r.get("oracle_bt"), Mapping)]
    if oracle:
        summary["oracle_bt"] = _masking(oracle)
    return summary


def simulator_counts(records: Any) -> dict[str, Any]:
    """Simulator calls and failures summed over episode records (``stats[selflock_env_metrics]``)."""
    calls, hits, failures, episodes = 0, 0, 0, 0
    key_calls, key_hits, key_failures = SIMULATOR_METRICS
    for record in records:
        metrics = (record.get("stats") or {}).get(ENV_METRICS) or {}
        failed = int(metrics.get(key_failures, 0) or 0)
        calls += int(metrics.get(key_calls, 0) or 0)
        hits += int(metrics.get(key_hits, 0) or 0)
        failures += failed
        episodes += int(failed > 0)
    return {"calls": calls, "cache_hits": hits, "failures": failures, "episodes_with_failures": episodes,
            "failure_rate": failures / calls if calls else 0.0}


def judge_validity(summary: dict[str, Any], max_sim_failure_rate: float) -> dict[str, Any]:
    """Set ``summary["valid"]`` (and ``invalid_reason`` when False) from its simulator failure rate."""
    sim = summary["simulator"]
    sim["max_failure_rate"] = max_sim_failure_rate
    valid = sim["failure_rate"] <= max_sim_failure_rate
    summary["valid"] = valid
    summary["invalid_reason"] = None if valid else (
        f"the simulated user failed {sim['failures']} of {sim['calls']} calls ({sim['failure_rate']:.1%}) after all "
        f"retries, above --max-sim-failure-rate {max_sim_failure_rate:.1%}: these episodes were played against a user "
        "who could not answer (check the simulator server and its log, then run again into a new --out)"
    )
    return summary


def _masking(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Correlation of AS quality with reward under the agent's BT and under the oracle's."""
    as_quality, agent_reward, oracle_reward = [], [], []
    for record in records:
        stats = record["stats"]
        rounds = stats.get("selflock_action_rounds", 0)
        if not rounds:
            continue
        as_quality.append(stats.get("selflock_as_pos", 0) / rounds)
        agent_reward.append(float(record["reward"]))
        oracle_reward.append(float(record["oracle_bt"]["reward"]))
    n = len(as_quality)

    def side(rewards: list[float]) -> dict[str, Any]:
        low, high = wilson_interval(sum(rewards), n)
        return {"success_rate": sum(rewards) / n if n else math.nan, "ci_low": low, "ci_high": high,
                "corr_as_quality_reward": pearson(as_quality, rewards)}

    return {
        "episodes": n,
        "agent_bt": side(agent_reward),
        "oracle_bt": side(oracle_reward),
        "note": "Pearson correlation over episodes between the share of AS +1 queries and the reward; "
        "NaN when fewer than 3 episodes or a side is constant.",
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a table for the terminal."""
    lines = []
    if summary.get("valid") is False:
        lines.append(f"INVALID RUN: {summary.get('invalid_reason')}")
    lines.append(f"episodes: {summary['episodes']} of {summary['selected']} selected"
                 + (f" ({summary['missing']} not finished: run the command again to retry them)" if summary.get("missing") else ""))
    sim = summary.get("simulator")
    if sim and sim.get("calls"):
        allowed = f", at most {sim['max_failure_rate']:.1%} allowed" if "max_failure_rate" in sim else ""
        lines.append(f"simulator: {sim['failures']} of {sim['calls']} calls failed ({sim['failure_rate']:.1%}{allowed}) "
                     f"in {sim['episodes_with_failures']} episode(s)")
    lines.append(f"{'metric':<22}{'value':>9}   95% CI")
    for name, est in summary["metrics"].items():
        lines.append(f"{name:<22}{est['value']:>9.4f}   [{_num(est['ci_low'])}, {_num(est['ci_high'])}] ({est['ci']})")
    masking = summary.get("oracle_bt")
    if masking:
        lines.append(f"oracle-BT masking analysis over {masking['episodes']} episodes:")
        for key, label in (("agent_bt", "agent's BT"), ("oracle_bt", "oracle BT")):
            side = masking[key]
            lines.append(
                f"  {label:<11} success {side['success_rate']:.4f} [{_num(side['ci_low'])}, {_num(side['ci_high'])}]"
                f"  corr(AS quality, reward) {_num(side['corr_as_quality_reward'])}"
            )
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.4f}"
