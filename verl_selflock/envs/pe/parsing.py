"""Parsing of a PE Action round: the query block (``Focus:`` and ``Pair:`` lines for PE-G, ``Pair:`` for PE-F).

An action block must consist of exactly the expected ``Key: value`` lines (either order), nothing
else; indices are 1-based, in range, distinct and sorted (the strict rules of
:mod:`verl_selflock.envs.parsing`). Queries are order-free: ``Pair: 5,2`` is asked as (2, 5).
"""

from __future__ import annotations

from dataclasses import dataclass

from verl_selflock.envs.parsing import Parsed, find_action_lines, parse_focus, parse_pair

__all__ = ["PEAction", "parse_pe_action"]


@dataclass(frozen=True)
class PEAction:
    """A parsed PE query. Indices are 1-based and sorted, as shown to the agent."""

    pair: tuple[int, int]
    focus: tuple[int, ...] | None = None
    """Focus attributes (gated variant); None for the full variant."""

    @property
    def key(self) -> tuple[tuple[int, int], tuple[int, ...]]:
        """Identity used for repeat detection: the same pair with a different focus is a new query."""
        return self.pair, self.focus or ()


def parse_pe_action(block: str | None, variant: str, S: int | None, D: int, n_movies: int) -> Parsed[PEAction]:
    """Parse an Action-round block: exactly the expected ``Key: value`` lines, nothing else.

    Args:
        block: the ``<interact>`` content, None when the turn had no block.
        variant: ``"gated"`` (a ``Focus:`` line of ``S`` attributes out of ``D``, and a ``Pair:`` line)
            or ``"full"`` (a ``Pair:`` line only).
        n_movies: number of reference movies (the range of ``Pair:`` indices).
    """
    if block is None:
        return Parsed.fail("no <interact>...</interact> block")
    expected = ("focus", "pair") if variant == "gated" else ("pair",)
    keyed, others = find_action_lines(block, expected)
    if others:
        return Parsed.fail(f"unexpected text in the block: {others[0].strip()[:40]!r}")
    if set(keyed) != set(expected) or any(len(values) != 1 for values in keyed.values()):
        lines = " and ".join(f"one '{key.capitalize()}:' line" for key in expected)
        return Parsed.fail(f"the block must contain exactly {lines}")
    pair = parse_pair(keyed["pair"][0], n_movies)
    if not pair.ok:
        return Parsed.fail(pair.error or "bad pair")
    focus: tuple[int, ...] | None = None
    if variant == "gated":
        parsed_focus = parse_focus(keyed["focus"][0], S or 0, D)
        if not parsed_focus.ok:
            return Parsed.fail(parsed_focus.error or "bad focus")
        focus = parsed_focus.value
    assert pair.value is not None
    return Parsed(PEAction(pair=pair.value, focus=focus))
