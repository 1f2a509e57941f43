"""Parsing of FloDial turns and replies: the agent's query block and the simulated user's verdict.

An Action block must hold exactly one ``Query: ...`` line (at most :data:`MAX_QUERY_CHARS`
characters) and nothing else. The user simulator answers ``Yes, <ID>`` / ``No, <ID>`` / ``Unknown``
(:func:`verl_selflock.envs.flodial.prompts.simulator_messages`), read robustly by
:func:`parse_simulator_reply`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from verl_selflock.envs.parsing import Parsed, find_keyed_lines

__all__ = ["MAX_QUERY_CHARS", "SimulatorVerdict", "normalise_query", "parse_flodial_action", "parse_simulator_reply"]

MAX_QUERY_CHARS = 300  # one atomic question; longer blocks are invalid (and would bloat the simulator prompt)


def parse_flodial_action(block: str | None) -> Parsed[str]:
    """An Action block: exactly one non-empty ``Query:`` line and nothing else."""
    if block is None:
        return Parsed.fail("no <interact>...</interact> block")
    keyed, others = find_keyed_lines(block)
    if others or set(keyed) != {"query"} or len(keyed["query"]) != 1:
        return Parsed.fail("the block must contain exactly one 'Query:' line and nothing else")
    query = keyed["query"][0].strip()
    if not query:
        return Parsed.fail("empty 'Query:' line")
    if len(query) > MAX_QUERY_CHARS:
        return Parsed.fail(f"the question is longer than {MAX_QUERY_CHARS} characters; ask one short question")
    return Parsed(query)


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
    first = lines[0].translate(_MARKUP).strip().lower()
    match = _VERDICT_RE.match(first)
    if match is not None:
        return SimulatorVerdict(int(match.group(2)), match.group(1), True)
    return SimulatorVerdict(None, None, bool(_UNKNOWN_RE.match(first)))
