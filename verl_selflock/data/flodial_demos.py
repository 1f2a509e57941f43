"""FloDial expert demonstrations as veRL multi-turn SFT rows (``demos.parquet``), for a supervised warm start.

The episodes come from the dataset's own train split (:func:`verl_selflock.data.flodial.build_flodial_demos`
draws them); this module picks those that are not test episodes and plays each with the expert
(:mod:`verl_selflock.envs.flodial.expert`, against the scripted exact-text user of
:mod:`verl_selflock.envs.flodial.scripted_user`), one row per episode in the layout of
:mod:`verl_selflock.data.demos`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from verl_selflock.data.demos import demo_row
from verl_selflock.envs.flodial.expert import play_flodial_expert

__all__ = ["episode_key", "flodial_demo_rows", "select_demo_rows"]


def episode_key(spec: Mapping[str, Any]) -> tuple[str, str, frozenset[str]]:
    """(chart, true fault node, candidate nodes): what makes two episodes the same, in any candidate order
    (the builder's own rule for distinct episodes)."""
    nodes = [str(node) for node in spec["candidate_nodes"]]
    return str(spec["chart"]), nodes[int(spec["answer_index"])], frozenset(nodes)


def select_demo_rows(
    draw_train: Callable[[int], Sequence[Mapping[str, Any]]], n: int, test_rows: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """The first ``n`` train rows (``draw_train(count)``: train episodes ``0 .. count - 1`` of the dataset's
    seed) that equal no episode of ``test_rows``, drawing more train episodes as long as some are left out."""
    test = {episode_key(row["extra_info"]["env"]) for row in test_rows}
    wanted = n
    while True:
        kept = [row for row in draw_train(wanted) if episode_key(row["extra_info"]["env"]) not in test]
        if len(kept) >= n:
            return kept[:n]
        wanted += n - len(kept)


def flodial_demo_rows(
    rows: Sequence[Mapping[str, Any]],
    data_source: str,
    dataset_seed: int,
    expert_seed: int,
    tokenizer: Any = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One ``demos.parquet`` row per dataset row: the expert's episode on the row's spec, after the row's prompt."""
    from tqdm import tqdm

    out = []
    for index, row in enumerate(tqdm(rows, desc=f"expert demos {data_source}", disable=not progress)):
        demo = play_flodial_expert(row["extra_info"]["env"], seed=expert_seed)
        out.append(
            demo_row(data_source, row["prompt"], demo, index=index, dataset_seed=dataset_seed, tokenizer=tokenizer)
        )
    return out
