"""Parsing of FloDial turns and replies: the agent's query block and the simulated user's verdict.

An Action block must hold exactly one ``Query: ...`` line (at most :data:`MAX_QUERY_CHARS`
characters) and nothing else: the shared rule :func:`verl_selflock.envs.parsing.parse_query_block`
(MediQ's too), with FloDial's tighter cap. The user simulator answers ``Yes, <ID>`` / ``No, <ID>`` /
``Unknown`` (:func:`verl_selflock.envs.flodial.prompts.simulator_messages`), read robustly by
:func:`parse_simulator_reply`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from verl_selflock.envs.parsing import Parsed, parse_query_block

__all__ = ["MAX_QUERY_CHARS", "SimulatorVerdict", "normalise_query", "parse_flodial_action", "parse_simulator_reply"]

# One atomic question: FloDial's own cap, tighter than the shared parsing.MAX_QUERY_CHARS (which
# parse_query_block enforces as the upper bound of any task's cap).
MAX_QUERY_CHARS = 300


def parse_flodial_action(block: str | None) -> Parsed[str]:
    """An Action block: exactly one non-empty ``Query:`` line of at most :data:`MAX_QUERY_CHARS`
    characters and nothing else (``code`` :data:`~verl_selflock.envs.parsing.TOO_LONG` when only the
    length is wrong)."""
    return parse_query_block(block, "query", MAX_QUERY_CHARS)


def normalise_query(query: str) -> str:
    """Case-, space- and end-punctuation-insensitive form of a question (repeat detection, cache key)."""
    return re.sub(r"\s+", " ", query).strip().strip("?.!").strip().lower()


@dataclass(frozen=True)
class SimulatorVerdict:
    """What a simulator reply says: a row and its yes/no word, or unknown (with ``parsed`` False if
    the reply was not even a well-formed "Unknown")."""

    row: int | None
    word: str | None
    parsed: bool


_MARKUP = str.maketrans("", "", "*`\"'_")
_VERDICT_RE = re.compile(
    r"^(yes|no)\b[\s,.:;\-]*(?:\(\s*)?(?:(?:row|id|question|number|no\.)\s*)?[#:]?\s*(\d{1,4})\s*\)?[\s.!]*$"
)
_UNKNOWN_RE = re.compile(r"^unknown\b[\s.!]*$")


def parse_simulator_reply(text: str) -> SimulatorVerdict:
    """Read ``Yes, <ID>`` / ``No, <ID>`` / ``Unknown`` robustly.

    Accepted: any case, markdown emphasis or quotes, ``Yes, 3``, ``yes 3``, ``No - row 3.``,
    ``Yes (3)``, ``Yes, ID: 3``. Only the first non-blank line counts. Anything with a second number,
    or any other text, is not a verdict (``parsed`` False) and counts as unknown.
    """
    lines = [line for line in str(text).splitlines() if line.strip()]
    if not lines:
        return SimulatorVerdict(None, None, False)
    # Whitespace runs collapse to one space: every whitespace in the patterns sits in a starred class
    # that contains \s, so the verdict is unchanged, and the starred classes that follow one another
    # can no longer split a long run between them (quadratic backtracking on "yes" + 10,000 spaces).
    first = " ".join(lines[0].translate(_MARKUP).lower().split())
    match = _VERDICT_RE.match(first)
    if match is not None:
        return SimulatorVerdict(int(match.group(2)), match.group(1), True)
    return SimulatorVerdict(None, None, bool(_UNKNOWN_RE.match(first)))
