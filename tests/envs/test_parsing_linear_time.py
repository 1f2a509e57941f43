"""Parsing in time linear in the reply (issue 15): pathological shapes up to 1 MB through every parser and
every environment's ``step`` under a generous bound that still catches quadratic behaviour, and property
tests: the linear rewrites accept exactly what the patterns they replaced accepted, and the parsers never
raise and keep their rules (the first closing tag cuts the turn, a block holds only its expected lines).

The bound is CPU time of this thread (``time.thread_time``), so other processes on a shared machine do
not make it flaky: 0.5 s per parse, where a linear parse of 1 MB takes milliseconds and the replaced
keyed-line pattern took ~17 s on 100 KB of spaces (``benchmarks/bench_parsing.py`` has the numbers).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verl_selflock.envs import EnvContext, make_env
from verl_selflock.envs.flodial.parsing import parse_flodial_action, parse_simulator_reply
from verl_selflock.envs.mediq.env import normalise_query, parse_patient_reply
from verl_selflock.envs.parsing import (
    MAX_QUERY_CHARS,
    TOO_LONG,
    cut_after_first_closing_tag,
    extract_block,
    find_action_lines,
    find_keyed_lines,
    keyed_line,
    parse_query_block,
    parse_vector,
)
from verl_selflock.envs.pe.parsing import parse_pe_action
from verl_selflock.simulators import ChatReply

BOUND_S = 0.5
MB = 1_000_000

# The patterns the linear code replaced: on short inputs they define the accepted language.
LEGACY_KEYED = re.compile(r"^\s*([A-Za-z][A-Za-z ]*?)\s*:(.*)$")
LEGACY_NUMBER = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
LEGACY_NONFINITE = re.compile(r"(?<![A-Za-z])(?:nan|inf|infinity)(?![A-Za-z])", re.IGNORECASE)
LEGACY_VERDICT = re.compile(
    r"^(yes|no)\b[\s,.:;\-]*(?:\(\s*)?(?:(?:row|id|question|number|no\.)\s*)?[#:]?\s*(\d{1,4})\s*\)?[\s.!]*$"
)
LEGACY_UNKNOWN = re.compile(r"^unknown\b[\s.!]*$")


def cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.thread_time()
    fn()
    return time.thread_time() - start


# Block contents of n characters, each the worst case of some loop or pattern (see the bench).
SHAPES: dict[str, Callable[[int], str]] = {
    "key + spaces + x": lambda n: "\nPair" + " " * n + "x\n",
    "query + spaces and tabs": lambda n: "Query:" + " \t" * (n // 2) + "?",
    "letters and spaces": lambda n: "a " * (n // 2),
    "colons": lambda n: "a:" * (n // 2),
    "key lines": lambda n: "Pair: 1,2\n" * (n // 10),
    "junk lines": lambda n: "a\n" * (n // 2),
    "blank lines": lambda n: "\n" * n,
    "unicode spaces": lambda n: "Pair" + "\u2003\u00a0" * (n // 2) + "x",
    "digit run": lambda n: "1" * n,
    "1e soup": lambda n: "1e" * (n // 2),
    "sign soup": lambda n: "-." * (n // 2),
    "nan candidates": lambda n: " n" * (n // 2),
    "infinit soup": lambda n: "infinit " * (n // 8),
    "non-ASCII": lambda n: "é" * n,
    "numbers": lambda n: "1," * (n // 2),
    "tag soup": lambda n: "<interact></interac</answer" * (n // 27),
}
BLOCK_PARSERS: dict[str, Callable[[str], object]] = {
    "pe gated": lambda b: parse_pe_action(b, "gated", 3, 6, 10),
    "pe full": lambda b: parse_pe_action(b, "full", None, 8, 10),
    "query block": parse_query_block,
    "flodial action": parse_flodial_action,
    "keyed lines": find_keyed_lines,
    "vector": lambda b: parse_vector(b, 4),
    "cut": cut_after_first_closing_tag,
    "extract": lambda b: extract_block(b, "interact"),
    "sim verdict": parse_simulator_reply,
    "patient reply": lambda b: parse_patient_reply(b, 5),
    "normalise": normalise_query,
}


# Growing sizes: a quadratic parser fails at 10 KB or 100 KB in seconds instead of hanging on 1 MB.
SIZES = (10_000, 100_000, MB)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_parser_is_fast_on_pathological_shapes(shape):
    for size in SIZES:
        text = SHAPES[shape](size)
        for name, parse in BLOCK_PARSERS.items():
            spent = cpu_seconds(lambda parse=parse: parse(text))
            assert spent < BOUND_S, f"{name} on {shape!r} ({len(text)} chars): {spent:.2f} s"


def test_the_simulator_verdict_is_fast_on_long_whitespace():
    for n in SIZES:
        for text in ("yes" + " " * n + "x", "yes 3" + " " * n + "x", "yes" + " ," * (n // 2) + " 3" + " ." * (n // 2)):
            assert cpu_seconds(lambda text=text: parse_simulator_reply(text)) < BOUND_S, f"{len(text)} chars"


class QuietUser:
    """A simulated user behind the client interface that answers every question "Unknown"."""

    async def chat(self, messages, *, cache_key=None, **_: object) -> ChatReply:
        return ChatReply("Unknown", ok=True)


def _specs() -> dict[str, dict]:
    movies = [[float((i * 7 + k * 3) % 11) for k in range(8)] for i in range(10)]
    return {
        "pe-g": {"task": "pe", "variant": "gated", "D": 6, "S": 3, "movies": [m[:6] for m in movies],
                 "w_star": [1, 2, 3, 1, 2, 3], "max_turns": 10},
        "pe-f": {"task": "pe", "variant": "full", "D": 8, "movies": movies, "w_star": [1] * 8, "max_turns": 12},
        "mediq": {"task": "mediq", "id": "c", "max_turns": 8, "options": ["A", "B", "C", "D"], "answer_index": 0,
                  "facts": ["fact one", "fact two"]},
        "flodial": {"task": "flodial", "problem_description": "It does not start.", "candidates": ["a", "b", "c"],
                    "answer_index": 0, "table": [{"node": "1", "question": "On?", "answer": "yes"}], "max_turns": 10},
    }  # fmt: skip


@pytest.mark.parametrize("task", ["pe-g", "pe-f", "mediq", "flodial"])
def test_env_step_is_fast_on_1mb_turns(task):
    turns = {
        "action: key + spaces": "<interact>\nPair" + " " * MB + "x\n</interact>",
        "action: query + junk lines": "<interact>Query: why?\n" + "junk\n" * (MB // 5) + "</interact>",
        "action: 1 MB query": "<interact>Query: " + "why " * (MB // 4) + "</interact>",
        "guess: digits": "<interact>Guess: " + "1" * MB + "</interact>",
        "answer: sign soup": "<answer>" + "-." * (MB // 2) + "</answer>",
        "tag soup": "<interact>" * (MB // 10) + "</interac" * (MB // 20) + "</interact>",
        "no tags": "x" * MB,
    }
    spec = _specs()[task]
    for name, text in turns.items():
        env = make_env(spec, context=EnvContext(simulator=QuietUser()))
        spent = cpu_seconds(lambda env=env, text=text: asyncio.run(env.step(text)))
        assert spent < BOUND_S, f"{task} {name}: {spent:.2f} s"


# --- the linear rewrites accept exactly what the replaced patterns accepted --------------------------------

LINE_ALPHABET = st.sampled_from(list("Pair QuERYz:: \t\u00a0\u2003\u1680\x1f-1é,İıſK\u212a"))
line = st.lists(LINE_ALPHABET, max_size=24).map("".join)


@settings(max_examples=800, deadline=None, derandomize=True, database=None)
@given(text=line)
def test_keyed_line_matches_the_replaced_pattern(text):
    legacy = LEGACY_KEYED.match(text)
    assert keyed_line(text) == (None if legacy is None else (legacy.group(1), legacy.group(2)))


def _legacy_find_keyed_lines(block: str) -> tuple[dict[str, list[str]], list[str]]:
    keyed: dict[str, list[str]] = {}
    others: list[str] = []
    for text in block.splitlines():
        if not text.strip():
            continue
        match = LEGACY_KEYED.match(text)
        if match is None:
            others.append(text)
        else:
            keyed.setdefault(match.group(1).lower(), []).append(match.group(2))
    return keyed, others


blocks = st.lists(st.one_of(line, st.sampled_from(["Pair: 1,2", "Focus: 1,2,3", "Query: x?", "", " "])), max_size=6)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(lines=blocks, sep=st.sampled_from(["\n", "\r\n", "\r", "\u2028", "\x0b"]))
def test_keyed_lines_and_action_lines_agree_with_the_replaced_parser(lines, sep):
    block = sep.join(lines)
    assert find_keyed_lines(block) == _legacy_find_keyed_lines(block)
    # The early-stopping reader rejects exactly the blocks that the full reader makes the callers reject.
    for keys in (("pair",), ("focus", "pair"), ("query",)):
        keyed, others = _legacy_find_keyed_lines(block)
        valid = not others and set(keyed) == set(keys) and all(len(v) == 1 for v in keyed.values())
        fast_keyed, fast_others = find_action_lines(block, keys)
        fast_valid = not fast_others and set(fast_keyed) == set(keys) and all(len(v) == 1 for v in fast_keyed.values())
        assert fast_valid == valid
        if valid:
            assert (fast_keyed, fast_others) == (keyed, others)


NUMBER_ALPHABET = st.sampled_from(
    list("0123456789.-+eE ,nNaAiIfFtTyYx\u0130\u0131\u017f\u212a١")
    + ["-.5", "+.", ".5", "-1", "1e-3", "2.", "nan", "inf", "Infinity", "\u0131nf", "NaN", "\u017fnan", "\u212ainf"]
)


@settings(max_examples=800, deadline=None, derandomize=True, database=None)
@given(text=st.lists(NUMBER_ALPHABET, max_size=14).map("".join), dim=st.integers(1, 4))
def test_vector_parsing_matches_the_replaced_patterns(text, dim):
    parsed = parse_vector(text, dim, non_negative=False)
    has_non_ascii_digit = any(ch.isnumeric() for ch in text if not ch.isascii())
    tokens = LEGACY_NUMBER.findall(text)
    legacy_ok = not has_non_ascii_digit and not LEGACY_NONFINITE.search(text) and len(tokens) == dim
    if legacy_ok:
        values = tuple(float(t) for t in tokens)
        assert parsed.ok == all(abs(v) != float("inf") for v in values)
        if parsed.ok:
            assert parsed.value == values
    else:
        assert not parsed.ok
    if not has_non_ascii_digit:  # the nan/inf check comes second: its verdict shows in the reason
        assert ("finite numbers (no nan/inf)" in (parsed.error or "")) == bool(LEGACY_NONFINITE.search(text))


VERDICT_ALPHABET = st.sampled_from(
    ["yes", "No", "YES", "unknown", "row", "id", "no.", "number", "question", "e", "n", "s"]
    + list(" \t\u00a0\u2003(),.:;-#!*`_'\"x0123") + ["12", "12345"]
)
_GAP = st.lists(st.sampled_from([" ", "  ", "\t", "\u00a0", ",", ".", ":", ";", "-", "!"]), max_size=4).map("".join)
# Shaped like a verdict (each part optional or perturbed), so that most draws are near the boundary.
VERDICT_LIKE = st.tuples(
    st.sampled_from(["", " ", "*", "'", "x"]),
    st.sampled_from(["yes", "No", "YES", "unknown", "Unknown.", "nope"]),
    _GAP,
    st.sampled_from(["", "(", "( "]),
    st.sampled_from(["", "row ", "id", "no.", "number  ", "question\t", "ID:"]),
    st.sampled_from(["", "#", ":"]),
    _GAP,
    st.sampled_from(["3", "12", "0", "1234", "12345", "", "x", "3 and 4"]),
    _GAP,
    st.sampled_from(["", ")", ") "]),
    _GAP,
    st.sampled_from(["", "\nmore text", "x"]),
).map("".join)


@settings(max_examples=800, deadline=None, derandomize=True, database=None)
@given(text=st.one_of(VERDICT_LIKE, st.lists(VERDICT_ALPHABET, max_size=12).map("".join)))
def test_simulator_verdict_matches_the_replaced_pattern(text):
    lines = [x for x in text.splitlines() if x.strip()]
    first = lines[0].translate(str.maketrans("", "", "*`\"'_")).strip().lower() if lines else ""
    match = LEGACY_VERDICT.match(first) if lines else None
    verdict = parse_simulator_reply(text)
    if match is not None:
        assert (verdict.row, verdict.word, verdict.parsed) == (int(match.group(2)), match.group(1), True)
    else:
        assert (verdict.row, verdict.word) == (None, None)
        assert verdict.parsed == bool(lines and LEGACY_UNKNOWN.match(first))


# --- never raises, and the rules hold on any text -----------------------------------------------------------

TAGGY = st.lists(
    st.one_of(
        st.sampled_from(["<interact>", "</interact>", "<answer>", "</answer>", "Query: ", "Pair: ", "\n", " ", "1,2"]),
        st.text(max_size=6),
    ),
    max_size=20,
).map("".join)


@settings(max_examples=800, deadline=None, derandomize=True, database=None)
@given(text=TAGGY)
def test_parsers_never_raise_and_keep_the_rules(text):
    cut, tag = cut_after_first_closing_tag(text)
    assert text.startswith(cut)
    if tag is None:
        assert cut == text and "</interact>" not in text and "</answer>" not in text
    else:
        # Cut right after the first closing tag: it ends the kept text, and no closing tag comes earlier.
        closing = f"</{tag}>"
        assert cut.endswith(closing)
        body = cut[: -len(closing)]
        assert "</interact>" not in body and "</answer>" not in body
    block = extract_block(cut, "interact")
    if block is not None:
        assert "</interact>" not in block and "<interact>" not in block
        assert f"<interact>{block}</interact>" in cut
    for parsed in (parse_query_block(block), parse_flodial_action(block), parse_pe_action(block, "full", None, 8, 10)):
        assert parsed.ok == (parsed.error is None) and (parsed.value is None) == (not parsed.ok)
    query = parse_query_block(block)
    if query.ok or query.code == TOO_LONG:  # exactly one non-blank line, a Query: line; its length decides
        (only,) = [x for x in block.splitlines() if x.strip()]
        key, value = keyed_line(only)
        assert key.lower() == "query" and (len(value.strip()) <= MAX_QUERY_CHARS) == query.ok
        assert query.value == (value.strip() if query.ok else None)


def test_query_block_cap_and_strictness():
    assert parse_query_block("Query: " + "a" * MAX_QUERY_CHARS).ok
    over = parse_query_block("Query: " + "a" * (MAX_QUERY_CHARS + 1))
    assert not over.ok and over.code == TOO_LONG and "longer than 1000" in over.error
    junk = parse_query_block("Query: why?\n" + "x" * 100_000)
    assert not junk.ok and junk.code is None and "nothing else" in junk.error
    assert parse_query_block("\n\n  Query:  why?  \n\n").value == "why?"
    with pytest.raises(ValueError, match="MAX_QUERY_CHARS"):
        parse_query_block("Query: x", max_chars=MAX_QUERY_CHARS + 1)
