"""Task-agnostic parsing of agent turns: tag cutting, block extraction, strict field parsers.

Everything the agent writes is adversarial, so nothing here raises on any ``str`` input: the
parsers return a :class:`Parsed` value that holds either the parsed value or a short reason that
can be shown to the agent and logged.

Rules (shared by every task and by the agent loop):

* **The first closing tag decides.** A turn ends right after the first ``</interact>`` or
  ``</answer>`` in the generation (the agent loop cuts the generated tokens there; the
  environments cut again, so they never see text past that tag). Whatever the agent wrote after it
  is dropped. Consequently ``<scratch>... <answer>1,2</answer> ...</scratch>`` is an answer turn,
  and a second ``<interact>`` block in the same turn is never read.
* **The action is the block closed by that tag**, taken from the last matching opening tag before
  it: ``<interact><interact>Pair: 1,2</interact>`` yields ``Pair: 1,2``. A closing tag without an
  opening tag yields no block (an invalid action). Tags are case-sensitive and attribute-free.
* **Only the block is read.** Text outside it (reasoning, or fake feedback such as "The feedback
  of your latest query: Yes." typed by the agent itself) has no effect. Inside an action block,
  any line that is not one of the expected ``Key: ...`` lines makes the action invalid, so injected
  text inside the block is rejected too.
* **Numbers are ASCII.** Index lists accept ASCII digits only (at most 6 per index, so a
  thousands-digit "index" cannot trigger Python's int-conversion limit); a vector block containing
  any non-ASCII digit (Arabic-Indic, full-width ...) or a ``nan``/``inf`` word is invalid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

__all__ = [
    "Parsed",
    "cut_after_first_closing_tag",
    "extract_block",
    "find_keyed_lines",
    "parse_index_list",
    "parse_pair",
    "parse_focus",
    "parse_vector",
    "parse_query",
]

T = TypeVar("T")

# Largest number of digits accepted for one 1-based index (far above any real table size).
_MAX_INDEX_DIGITS = 6

# A decimal number in ASCII: optional sign, digits with optional fraction (or a bare fraction),
# optional exponent. "All numbers in the block" means every maximal match of this pattern.
_NUMBER_RE = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_NONFINITE_RE = re.compile(r"(?<![A-Za-z])(?:nan|inf|infinity)(?![A-Za-z])", re.IGNORECASE)
_KEYED_LINE_RE = re.compile(r"^\s*([A-Za-z][A-Za-z ]*?)\s*:(.*)$")


@dataclass(frozen=True)
class Parsed(Generic[T]):
    """Result of parsing agent text: ``value`` when it parsed, else ``error`` (a short reason)."""

    value: T | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def fail(cls, reason: str) -> Parsed[T]:
        return cls(None, reason)


def cut_after_first_closing_tag(
    text: str, tags: Sequence[str] = ("interact", "answer")
) -> tuple[str, str | None]:
    """Cut ``text`` right after the first closing tag among ``tags``.

    Args:
        text: the agent's generation for one turn.
        tags: tag names whose closing form (``</name>``) ends a turn.

    Returns:
        ``(kept_text, tag)``: the text up to and including the earliest closing tag and the name
        of that tag; ``(text, None)`` when no closing tag occurs.
    """
    best_end = -1
    best_tag: str | None = None
    for tag in tags:
        closing = f"</{tag}>"
        # Only search the prefix before the best hit so far: the earliest tag wins.
        limit = best_end if best_end >= 0 else len(text)
        pos = text.find(closing, 0, limit)
        if pos >= 0:
            best_end = pos + len(closing)
            best_tag = tag
    if best_tag is None:
        return text, None
    return text[:best_end], best_tag


def extract_block(text: str, tag: str) -> str | None:
    """Content of the first well-formed ``<tag>...</tag>`` block, or None.

    "Well-formed" = a closing tag with an opening tag before it; the content starts after the last
    opening tag before that closing tag, so stray or nested openings do not leak into the content.
    """
    opening, closing = f"<{tag}>", f"</{tag}>"
    start = 0
    while True:
        close = text.find(closing, start)
        if close < 0:
            return None
        open_ = text.rfind(opening, start, close)
        if open_ >= 0:
            return text[open_ + len(opening) : close]
        start = close + len(closing)


def find_keyed_lines(block: str) -> tuple[dict[str, list[str]], list[str]]:
    """Split a block into ``Key: value`` lines and other non-blank lines.

    Returns:
        ``(keyed, others)``: ``keyed`` maps the lower-cased key to the values of every line with
        that key (in order); ``others`` are the non-blank lines that are not ``Key: value`` lines.
    """
    keyed: dict[str, list[str]] = {}
    others: list[str] = []
    for line in block.splitlines():
        if not line.strip():
            continue
        match = _KEYED_LINE_RE.match(line)
        if match is None:
            others.append(line)
            continue
        keyed.setdefault(match.group(1).lower(), []).append(match.group(2))
    return keyed, others


def parse_index_list(value: str, count: int, upper: int, what: str) -> Parsed[tuple[int, ...]]:
    """Parse ``count`` distinct comma-separated 1-based indices in ``[1, upper]``.

    The result is sorted (queries are order-free: ``Pair: 5,2`` is the same question as
    ``Pair: 2,5``). Whitespace around items is allowed; anything else is not.
    """
    items = value.split(",")
    if len(items) != count:
        return Parsed.fail(f"{what} needs exactly {count} comma-separated numbers, got {len(items)} items")
    indices: list[int] = []
    for item in items:
        item = item.strip()
        if not item or not (item.isascii() and item.isdigit()):
            return Parsed.fail(f"{what} items must be plain whole numbers, got {item[:20]!r}")
        if len(item) > _MAX_INDEX_DIGITS:
            return Parsed.fail(f"{what} index {item[:20]}... is out of range 1..{upper}")
        index = int(item)
        if not 1 <= index <= upper:
            return Parsed.fail(f"{what} index {index} is out of range 1..{upper}")
        indices.append(index)
    if len(set(indices)) != count:
        return Parsed.fail(f"{what} indices must be different from each other")
    return Parsed(tuple(sorted(indices)))


def parse_pair(value: str, n_items: int) -> Parsed[tuple[int, int]]:
    """Parse the value of a ``Pair: p1,p2`` line: two distinct 1-based indices, sorted."""
    return parse_index_list(value, 2, n_items, "Pair")  # type: ignore[return-value]


def parse_focus(value: str, size: int, dim: int) -> Parsed[tuple[int, ...]]:
    """Parse the value of a ``Focus: k1,k2[,k3]`` line: ``size`` distinct 1-based indices, sorted."""
    return parse_index_list(value, size, dim, "Focus")


def parse_vector(block: str, dim: int, non_negative: bool = True) -> Parsed[tuple[float, ...]]:
    """Parse a guess/answer vector: all numbers in ``block``; exactly ``dim``, finite.

    Args:
        block: block content, e.g. ``"Guess: 0.1, 0.4, 0.5"`` (the key is optional: every number
            in the block counts, so labels with digits such as ``w1=`` make the count wrong).
        dim: required number of components.
        non_negative: reject negative components (preference weights are non-negative).
    """
    if not block.isascii() and any(ch.isnumeric() for ch in block if not ch.isascii()):
        return Parsed.fail("numbers must be written with ASCII digits")
    if _NONFINITE_RE.search(block):
        return Parsed.fail("values must be finite numbers (no nan/inf)")
    tokens = _NUMBER_RE.findall(block)
    if len(tokens) != dim:
        return Parsed.fail(f"expected exactly {dim} numbers, found {len(tokens)}")
    values = tuple(float(token) for token in tokens)  # the pattern only matches float() syntax
    if not all(math.isfinite(v) for v in values):
        return Parsed.fail("values must be finite numbers (too large)")
    if non_negative and any(v < 0 for v in values):
        return Parsed.fail("values must be non-negative")
    return Parsed(values)


def parse_weights(block: str | None, dim: int) -> Parsed[np.ndarray]:
    """A guess/answer block as a belief: exactly ``dim`` finite non-negative numbers, not all zero (an
    all-zero vector puts weight on nothing, so it expresses no belief); float64 array, unscaled."""
    if block is None:
        return Parsed.fail("no well-formed block")
    parsed = parse_vector(block, dim, non_negative=True)
    if not parsed.ok:
        return Parsed.fail(parsed.error or "bad vector")
    vector = np.asarray(parsed.value, dtype=np.float64)
    if not np.any(vector > 0):
        return Parsed.fail("an all-zero vector has no direction: it expresses no belief")
    return Parsed(vector)


def parse_query(block: str, key: str = "query") -> Parsed[str]:
    """Text after ``Query:`` (or ``key:``) on the first such line of ``block``; must be non-empty."""
    keyed, _ = find_keyed_lines(block)
    values = keyed.get(key.lower())
    if not values:
        return Parsed.fail(f"no '{key.capitalize()}:' line")
    text = values[0].strip()
    if not text:
        return Parsed.fail(f"empty '{key.capitalize()}:' line")
    return Parsed(text)
