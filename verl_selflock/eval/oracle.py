"""Oracle belief tracking for the masking analysis of ``verl-selflock eval --oracle-bt``.

For each episode the agent's own queries and the answers it was shown are replayed, but the belief
is updated by an oracle instead of the agent; the reward that belief would get is recorded. Over a
test set, the correlation between AS quality (share of AS +1 queries) and reward is then computed
under the agent's BT and under the oracle's: a weak correlation under the agent's BT that becomes
strong under the oracle's means poor belief tracking hides the value of good questions (the
paper's "masking"). Tasks register a replay function in :data:`ORACLE_BT`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

__all__ = ["ORACLE_BT", "pe_oracle_bt"]


def pe_oracle_bt(spec: Mapping[str, Any], transcript: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """PE: exact Bayesian updating over the Dirichlet(1) prior (:mod:`verl_selflock.envs.pe.oracle`);
    the oracle's belief is the posterior mean after every answered query of the episode."""
    from verl_selflock.envs.pe.oracle import oracle_belief  # the envs package imports torch: only when used

    queries = []
    for turn in transcript:
        info = turn.get("info") or {}
        if turn.get("round") == "action" and info.get("pair") is not None and info.get("feedback"):
            queries.append((info["pair"], info.get("focus"), str(info["feedback"])))
    return asdict(oracle_belief(spec, queries))


ORACLE_BT: dict[str, Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], dict[str, Any]]] = {
    "pe": pe_oracle_bt,
}
"""task name -> replay(spec, transcript) -> {"reward": float, ...}."""
