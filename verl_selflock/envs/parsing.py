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
* **One question, bounded.** A free-text question to a simulated user (MediQ's and FloDial's
  ``Query:`` line) is the block's only line and at most :data:`MAX_QUERY_CHARS` characters
  (:func:`parse_query_block`); a longer one is the agent's invalid turn, never sent to a simulator.
* **Numbers are ASCII.** Index lists accept ASCII digits only (at most 6 per index, so a
  thousands-digit "index" cannot trigger Python's int-conversion limit); a vector block containing
  any non-ASCII digit (Arabic-Indic, full-width ...) or a ``nan``/``inf`` word is invalid.

**Linear time.** Every parser here runs in time linear in its input (a 1 MB reply of any shape
parses in tens of milliseconds at most; ``benchmarks/bench_parsing.py``): no pattern lets two
quantifiers compete for the same characters (``[A-Za-z ]*?`` next to ``\\s*`` backtracks
quadratically on a long run of spaces), repeated searches resume where the last one stopped, and
scans stop once the answer is known (``parse_vector`` reads at most ``dim + 1`` numbers).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

__all__ = [
    "Parsed",
    "cut_after_first_closing_tag",
    "extract_block",
    "find_action_lines",
    "find_keyed_lines",
    "keyed_line",
    "parse_index_list",
    "parse_pair",
    "parse_focus",
    "parse_vector",
    "parse_query",
    "parse_query_block",
    "MAX_QUERY_CHARS",
    "TOO_LONG",
]

T = TypeVar("T")

# Largest number of digits accepted for one 1-based index (far above any real table size).
_MAX_INDEX_DIGITS = 6

# Longest question (characters, after stripping) that may go to a simulated user. Real questions are
# one sentence (MediQ's and FloDial's are under 200 characters); 1,000 leaves room for any honest
# question while a longer "question" (pasted reasoning, a repeated phrase, junk) is the agent's
# garbage: it must be the agent's invalid turn (-1), not a simulator failure (0, exempt from every
# fallback) after the endpoint rejects an oversized prompt, and it must not inflate the simulator
# prompt. Tasks may set a tighter cap (FloDial: 300); none may exceed this one.
MAX_QUERY_CHARS = 1000

TOO_LONG = "too_long"
"""``Parsed.code`` of a question rejected only for its length (envs count these turns)."""

# A decimal number in ASCII: optional sign, digits with optional fraction (or a bare fraction),
# optional exponent. "All numbers in the block" means every maximal match of this pattern, as
# ``findall`` lists them (a match holds a digit at most 2 characters after its start, which
# ``_numbers`` uses to skip digit-free stretches in one fast search).
_NUMBER_RE = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
_DIGIT_RE = re.compile(r"[0-9]")
# A nan/inf/infinity word in any case, not inside a longer word: the language of
# ``(?<![A-Za-z])(?:nan|inf|infinity)(?![A-Za-z])`` with re.IGNORECASE, written so that the search
# starts with a character class (the regex engine then skips non-candidates in C; the form with the
# lookbehind first costs ~50 ns per character on digits). Under IGNORECASE, ``i`` also matches the
# Turkish dotted/dotless i, and ``[A-Za-z]`` also those plus the long s and the Kelvin sign: spelled
# out here (tests compare both patterns).
_LETTER = "A-Za-z\u0130\u0131\u017f\u212a"
_I = "iI\u0130\u0131"
_NONFINITE_RE = re.compile(
    rf"[nN{_I}](?<![{_LETTER}][nN{_I}])"
    rf"(?:(?<=[nN])[aA][nN]|(?<=[{_I}])[nN][fF](?:[{_I}][nN][{_I}][tT][yY])?)(?![{_LETTER}])"
)


@dataclass(frozen=True)
class Parsed(Generic[T]):
    """Result of parsing agent text: ``value`` when it parsed, else ``error`` (a short reason)."""

    value: T | None = None
    error: str | None = None
    code: str | None = None
    """Machine-readable kind of failure, when a caller acts on it (:data:`TOO_LONG`); else None."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def fail(cls, reason: str, code: str | None = None) -> Parsed[T]:
        return cls(None, reason, code)


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


def keyed_line(line: str) -> tuple[str, str] | None:
    """``(key, value)`` of one ``Key: value`` line (key as written), else None.

    The language of ``^\\s*([A-Za-z][A-Za-z ]*?)\\s*:(.*)$`` on one line, in linear time (that
    regex backtracks quadratically on ``Pair`` + 100,000 spaces + ``x``): the key is the text before
    the first colon, without surrounding whitespace, and must be ASCII letters and spaces starting
    with a letter; the value is everything after that colon.
    """
    stripped = line.lstrip()
    colon = stripped.find(":")
    if colon <= 0:  # no colon, or nothing before it
        return None
    key = stripped[:colon].rstrip()
    if not (key.isascii() and key[0].isalpha() and key.replace(" ", "").isalpha()):
        return None
    return key, stripped[colon + 1 :]


def find_keyed_lines(block: str) -> tuple[dict[str, list[str]], list[str]]:
    """Split a block into ``Key: value`` lines and other non-blank lines.

    Returns:
        ``(keyed, others)``: ``keyed`` maps the lower-cased key to the values of every line with
        that key (in order); ``others`` are the non-blank lines that are not ``Key: value`` lines.
    """
    return _scan_keyed_lines(block, None)


def find_action_lines(block: str, keys: Collection[str]) -> tuple[dict[str, list[str]], list[str]]:
    """:func:`find_keyed_lines` for an action block that may hold only one line per key of ``keys``
    (lower case) and nothing else: the same result while the block obeys that rule, but reading
    stops at the first non-blank line that breaks it (another line, another key, a key seen twice),
    which is then the last entry of the result. So every caller rejects exactly the blocks that
    ``find_keyed_lines`` makes it reject, in time independent of how many lines follow (100,000
    ``Pair:`` lines cost two)."""
    return _scan_keyed_lines(block, keys)


def _scan_keyed_lines(block: str, keys: Collection[str] | None) -> tuple[dict[str, list[str]], list[str]]:
    """The one scan behind both: every line, or (``keys`` given) up to the first line breaking the rule."""
    keyed: dict[str, list[str]] = {}
    others: list[str] = []
    # filter(str.strip, ...) drops blank lines in C: a million empty lines cost no Python steps.
    for line in filter(str.strip, block.splitlines()):
        pair = keyed_line(line)
        if pair is None:
            others.append(line)
            if keys is not None:
                break
            continue
        key = pair[0].lower()
        keyed.setdefault(key, []).append(pair[1])
        if keys is not None and (key not in keys or len(keyed[key]) > 1):
            break
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
    tokens = _numbers(block, dim + 1)
    if len(tokens) != dim:
        found = f"more than {dim}" if len(tokens) > dim else str(len(tokens))
        return Parsed.fail(f"expected exactly {dim} numbers, found {found}")
    values = tuple(float(token) for token in tokens)  # the pattern only matches float() syntax
    if not all(math.isfinite(v) for v in values):
        return Parsed.fail("values must be finite numbers (too large)")
    if non_negative and any(v < 0 for v in values):
        return Parsed.fail("values must be non-negative")
    return Parsed(values)


def _numbers(block: str, limit: int) -> list[str]:
    """The first ``limit`` numbers of ``block`` (``_NUMBER_RE.findall(block)[:limit]``), in time linear
    in the block: each step jumps to the next digit in one C-speed search, then matches from at most
    2 characters before it (no match can start earlier), so digit-free stretches cost no regex
    attempts and a block of thousands of numbers stops after ``limit``."""
    tokens: list[str] = []
    pos = 0
    while len(tokens) < limit:
        digit = _DIGIT_RE.search(block, pos)
        if digit is None:
            break
        match = _NUMBER_RE.search(block, max(pos, digit.start() - 2))
        if match is None:  # unreachable: the digit itself starts a match
            break
        tokens.append(match.group())
        pos = match.end()
    return tokens


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
    """Text after ``Query:`` (or ``key:``) on the first such line of ``block``; must be non-empty.

    Lenient (other lines are ignored, no length cap): an Action block is read with
    :func:`parse_query_block` instead, which enforces the one-line rule and :data:`MAX_QUERY_CHARS`."""
    keyed, _ = find_keyed_lines(block)
    values = keyed.get(key.lower())
    if not values:
        return Parsed.fail(f"no '{key.capitalize()}:' line")
    text = values[0].strip()
    if not text:
        return Parsed.fail(f"empty '{key.capitalize()}:' line")
    return Parsed(text)


def parse_query_block(block: str | None, key: str = "query", max_chars: int = MAX_QUERY_CHARS) -> Parsed[str]:
    """An Action block that asks a simulated user one question: exactly one non-empty ``Query:`` (or
    ``key:``) line and nothing else, at most ``max_chars`` characters after stripping.

    Any other non-blank line (reasoning, injected text, a second question) makes the action invalid,
    as for every action block. A question over the cap fails with ``code`` :data:`TOO_LONG` so that
    the task counts it; it is the agent's invalid turn and must never reach the simulator.
    """
    if max_chars > MAX_QUERY_CHARS:
        raise ValueError(f"max_chars must be at most MAX_QUERY_CHARS={MAX_QUERY_CHARS}, got {max_chars}")
    label = key.capitalize()
    if block is None:
        return Parsed.fail("no <interact>...</interact> block")
    name = key.lower()
    keyed, others = find_action_lines(block, (name,))
    if others or set(keyed) != {name} or len(keyed[name]) != 1:
        return Parsed.fail(f"the block must contain exactly one '{label}:' line and nothing else")
    query = keyed[name][0].strip()
    if not query:
        return Parsed.fail(f"empty '{label}:' line")
    if len(query) > max_chars:
        return Parsed.fail(
            f"the question is longer than {max_chars} characters; ask one short question", code=TOO_LONG
        )
    return Parsed(query)
