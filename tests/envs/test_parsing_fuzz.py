"""The shared tag parser: unit cases for each rule, then adversarial fuzzing through parser and PE env."""

from __future__ import annotations

import math
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, CHANNEL_NONE
from verl_selflock.envs import RoundKind, make_env
from verl_selflock.envs.parsing import (
    cut_after_first_closing_tag,
    extract_block,
    find_keyed_lines,
    parse_focus,
    parse_pair,
    parse_query,
    parse_vector,
)

# --- cut_after_first_closing_tag -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,kept,tag",
    [
        ("a<interact>x</interact>tail", "a<interact>x</interact>", "interact"),
        ("<answer>1</answer><interact>x</interact>", "<answer>1</answer>", "answer"),
        ("<interact>x</interact><answer>1</answer>", "<interact>x</interact>", "interact"),
        ("<scratch><answer>1</answer></scratch><interact>x</interact>", "<scratch><answer>1</answer>", "answer"),
        ("no tags at all", "no tags at all", None),
        ("", "", None),
        ("</interact>", "</interact>", "interact"),
        ("<interact>x</Interact>", "<interact>x</Interact>", None),  # case-sensitive
        ("</scratch> only", "</scratch> only", None),
    ],
)
def test_cut(text, kept, tag):
    assert cut_after_first_closing_tag(text) == (kept, tag)


def test_cut_custom_tags():
    kept, tag = cut_after_first_closing_tag("<message>hi</message> x", tags=("message",))
    assert (kept, tag) == ("<message>hi</message>", "message")


# --- extract_block ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,content",
    [
        ("<interact>Pair: 1,2</interact>", "Pair: 1,2"),
        ("<interact><interact>Pair: 1,2</interact></interact>", "Pair: 1,2"),  # innermost well-formed block
        ("Pair: 1,2</interact>", None),  # closing without opening
        ("<interact>Pair: 1,2", None),  # opening without closing
        ("</interact><interact>a</interact>", "a"),  # stray closing tag first
        ("<interact></interact>", ""),
        ("<interact>a</interact><interact>b</interact>", "a"),
    ],
)
def test_extract_block(text, content):
    assert extract_block(text, "interact") == content


# --- keyed lines, pair, focus, query -------------------------------------------------------------------


def test_find_keyed_lines():
    keyed, others = find_keyed_lines("  Focus: 1,2\n\nPAIR : 3,4\nsome words\nThe feedback of your latest query: Yes.")
    assert keyed == {"focus": [" 1,2"], "pair": [" 3,4"], "the feedback of your latest query": [" Yes."]}
    assert others == ["some words"]


@pytest.mark.parametrize(
    "value,expected",
    [
        ("1,2", (1, 2)),
        (" 5 , 2 ", (2, 5)),  # sorted before use
        ("01,10", (1, 10)),
    ],
)
def test_parse_pair_ok(value, expected):
    parsed = parse_pair(value, 10)
    assert parsed.ok and parsed.value == expected


@pytest.mark.parametrize(
    "value",
    ["1,1", "0,2", "1,11", "1", "1,2,3", "", "1;2", "1, two", "1.0,2", "-1,2", "1,2.", "١,2", "１,2", "9" * 5000 + ",1"],
)
def test_parse_pair_rejects(value):
    parsed = parse_pair(value, 10)
    assert not parsed.ok and parsed.value is None and isinstance(parsed.error, str) and parsed.error


def test_parse_focus():
    assert parse_focus("3,1,2", 3, 6).value == (1, 2, 3)
    assert not parse_focus("1,2", 3, 6).ok
    assert not parse_focus("1,2,7", 3, 6).ok
    assert not parse_focus("1,2,2", 3, 6).ok


def test_parse_query():
    assert parse_query("Query: Does it hurt when you breathe?\nextra").value == "Does it hurt when you breathe?"
    assert not parse_query("Query:   ").ok
    assert not parse_query("Question: x").ok


# --- parse_vector ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block,expected",
    [
        ("Guess: 0.1, 0.2, 0.7", (0.1, 0.2, 0.7)),
        ("1 2 3", (1.0, 2.0, 3.0)),
        ("+1e-3, .5, 2.", (0.001, 0.5, 2.0)),
        ("-0, 1, 1", (0.0, 1.0, 1.0)),
    ],
)
def test_parse_vector_ok(block, expected):
    parsed = parse_vector(block, 3)
    assert parsed.ok and parsed.value == pytest.approx(expected)


@pytest.mark.parametrize(
    "block,reason",
    [
        ("0.1, 0.2", "exactly 3"),
        ("w1=0.1, w2=0.2, w3=0.7", "exactly 3"),  # every number counts, labels included
        ("NaN, 1, 2", "finite"),
        ("1, Infinity, 2", "finite"),
        ("1, 2, 3e400", "finite"),
        ("1, -2, 3", "non-negative"),
        ("1, 2, ३", "ASCII"),
        ("", "exactly 3"),
    ],
)
def test_parse_vector_rejects(block, reason):
    parsed = parse_vector(block, 3)
    assert not parsed.ok and reason in parsed.error


def test_parse_vector_allows_negative_when_asked():
    assert parse_vector("-1, 2, 3", 3, non_negative=False).value == (-1.0, 2.0, 3.0)


def test_words_containing_inf_are_not_non_finite():
    assert parse_vector("information: 1, 2, 3", 3).ok


# --- fuzzing ---------------------------------------------------------------------------------------------

NASTY = [
    "",
    " ",
    "\x00",
    "<interact>",
    "</interact>",
    "</answer>",
    "<answer></answer>",
    "<interact></interact>",
    "<interact>Pair: 1,2</interact>" * 50,
    "<interact><interact>Pair: 1,2</interact></interact>",
    "<interact>Focus: 1,2,3\nPair: 1,2</interact>",
    "<interact>Focus: 1,2\nPair: 2,1</interact>",
    "<interact>Pair: 1,2\nThe feedback of your latest query: Yes.</interact>",
    "The feedback of your latest query: Yes.\n<interact>Pair: 3,4</interact>",
    "<scratch><answer>0.1,0.2,0.3,0.4,0.5,0.6</answer></scratch>",
    "<scratch>think</scratch><answer>1,1,1,1,1,1,1,1</answer>",
    "<interact>Guess: nan, nan, nan, nan, nan, nan, nan, nan</interact>",
    "<interact>Guess: inf,1,1,1,1,1,1,1</interact>",
    "<interact>Guess: -1,1,1,1,1,1,1,1</interact>",
    "<interact>Guess: 1e999,1,1,1,1,1,1,1</interact>",
    "<interact>Guess: ١,٢,٣,٤,٥,٦,٧,٨</interact>",
    "<interact>Guess: １,２,３,４,５,６</interact>",
    "<interact>Pair: ١,٢</interact>",
    "<interact>Pair: " + "9" * 10000 + ",1</interact>",
    "<interact>Guess: " + ",".join(["1"] * 10000) + "</interact>",
    "<interact>Pair: 0,0</interact>",
    "<interact>Pair: -1,2</interact>",
    "<interact>Pair: 1,2,3</interact>",
    "<interact>Focus: 0,7,9\nPair: 11,12</interact>",
    "<interact>Focus:\nPair:</interact>",
    "<answer>0,0,0,0,0,0,0,0</answer>",
    "<answer>0,0,0,0,0,0</answer>",
    "<answer>" + "1," * 5000 + "</answer>",
    "x" * 200_000,
    "<interact>" + "Pair: 1,2\n" * 1000 + "</interact>",
    "</answer><answer>1,2,3,4,5,6</answer>",
    "<ANSWER>1,1,1,1,1,1</ANSWER>",
    "<interact>Pair: 1,2</interact" + ">" * 3,
    "<interact>\ud800Pair: 1,2</interact>",  # lone surrogate
    "<interact>Pair:\t1 ,\t2</interact>",
]

FRAGMENTS = [
    "<interact>",
    "</interact>",
    "<answer>",
    "</answer>",
    "<scratch>",
    "</scratch>",
    "Pair: ",
    "Focus: ",
    "Guess: ",
    "The feedback of your latest query: Yes.",
    "\n",
    ",",
    " ",
    "nan",
    "inf",
    "-",
    ".",
    "e",
    "١",
]

fragment = st.one_of(
    st.sampled_from(FRAGMENTS),
    st.integers(min_value=-3, max_value=12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(alphabet=string.printable, max_size=8),
    st.text(max_size=4),  # arbitrary unicode, surrogates included
)
generation = st.lists(fragment, max_size=30).map("".join)


def _spec(variant: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    D = 6 if variant == "gated" else 8
    spec = {
        "task": "pe",
        "variant": variant,
        "D": D,
        "movies": rng.integers(0, 20, size=(10, D)).astype(float).tolist(),
        "w_star": rng.dirichlet(np.ones(D)).tolist(),
        "max_turns": 10 if variant == "gated" else 12,
    }
    if variant == "gated":
        spec["S"] = 3
    return spec


class _Tally:
    generations = 0


def _run_episode(variant: str, texts: list[str], seed: int = 0) -> None:
    env = make_env(_spec(variant, seed))
    expected_channel = {RoundKind.ACTION: CHANNEL_AS, RoundKind.UPDATE: CHANNEL_BT, RoundKind.ANSWER: CHANNEL_NONE}
    judged = {CHANNEL_AS: 0, CHANNEL_BT: 0}  # critiqued (+1 or -1) turns per channel, counted from the labels
    for text in texts:
        kind = env.next_round()
        before = dict(env.counts)
        result = env.step_sync(text)
        _Tally.generations += 1
        # Parser functions never raise either, on the same inputs.
        cut, tag = cut_after_first_closing_tag(text)
        assert text.startswith(cut) and tag in (None, "interact", "answer")
        for name in ("interact", "answer"):
            block = extract_block(cut, name)
            if block is not None:
                parse_vector(block, 6)
                find_keyed_lines(block)
        assert result.label.critique in (-1, 0, 1)
        if result.label.critique:
            judged[result.label.channel] += 1
        if result.done:
            assert result.observation is None and result.label.critique == 0
            assert result.label.channel == CHANNEL_NONE
            break
        assert isinstance(result.observation, str) and result.observation
        assert result.label.channel == expected_channel[kind]
        if kind is RoundKind.ACTION:
            assert result.label.critique != 0  # AS labels are always +1 or -1
            if not result.valid:
                counted = env.counts["invalid_actions"] - before["invalid_actions"]
                counted += env.counts["repeats"] - before["repeats"]
                assert counted == 1 and result.label.critique == -1
        elif kind is RoundKind.UPDATE and not result.valid:
            assert env.counts["invalid_guesses"] == before["invalid_guesses"] + 1 and result.label.critique == -1
    outcome = env.result()
    metrics = outcome.metrics
    assert outcome.reward in (0.0, 1.0) and outcome.success is (outcome.reward == 1.0)
    assert judged[CHANNEL_AS] == metrics["action_rounds"]
    assert judged[CHANNEL_BT] <= metrics["update_rounds"]
    assert metrics["invalid_actions"] + metrics["repeats"] <= metrics["action_rounds"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    if outcome.reward:
        assert outcome.answered


@pytest.mark.parametrize("variant", ["gated", "full"])
def test_nasty_strings_in_every_round(variant):
    for offset in range(len(NASTY)):
        # Rotate the list so that each nasty string meets each round kind.
        texts = NASTY[offset:] + NASTY[:offset]
        _run_episode(variant, texts[:12], seed=offset)


def test_nasty_strings_through_parsers():
    for text in NASTY:
        cut, _ = cut_after_first_closing_tag(text)
        for name in ("interact", "answer", "scratch"):
            extract_block(text, name)
        find_keyed_lines(text)
        for parser in (lambda v: parse_pair(v, 10), lambda v: parse_focus(v, 3, 6), parse_query):
            parser(text)
        parse_vector(text, 8)


@pytest.mark.parametrize("variant", ["gated", "full"])
@settings(
    max_examples=150, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(texts=st.lists(generation, min_size=1, max_size=12), seed=st.integers(0, 3))
def test_fuzz_episodes(variant, texts, seed):
    _run_episode(variant, texts, seed)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(text=st.text(max_size=200))
def test_fuzz_parsers_on_arbitrary_unicode(text):
    cut, tag = cut_after_first_closing_tag(text)
    assert text.startswith(cut)
    for value in (parse_pair(text, 10), parse_focus(text, 2, 6), parse_vector(text, 6), parse_query(text)):
        assert value.ok != (value.error is not None)


def _random_turn(rng: np.random.Generator, variant: str, kind: RoundKind) -> str:
    """Mostly what the round asks for, with random (sometimes out-of-range) values; else anything."""
    D = 6 if variant == "gated" else 8
    roll = rng.random()
    if roll < 0.1:
        return "".join(rng.choice(FRAGMENTS + NASTY[:14], size=int(rng.integers(0, 12))))
    if roll < 0.15:
        kind = RoundKind(rng.choice([k.value for k in RoundKind]))  # the wrong kind of turn
    if kind is RoundKind.ACTION:
        hi = lambda n: n if rng.random() < 0.9 else n + 2  # noqa: E731
        focus = ",".join(map(str, rng.choice(np.arange(1, hi(D) + 1), size=3, replace=False)))
        pair = ",".join(map(str, rng.choice(np.arange(1, hi(10) + 1), size=2, replace=rng.random() < 0.05)))
        lines = ([f"Focus: {focus}"] if variant == "gated" else []) + [f"Pair: {pair}"]
        return "<scratch>compare</scratch>\n<interact>\n" + "\n".join(lines) + "\n</interact>"
    k = D if rng.random() < 0.9 else int(rng.integers(0, D + 3))
    values = ", ".join(f"{v:.3g}" for v in np.abs(rng.normal(0.5, 0.4, size=k)) * (1 if rng.random() < 0.95 else -1))
    if kind is RoundKind.UPDATE:
        return f"<scratch>update</scratch><interact>Guess: {values}</interact>"
    return f"<scratch>final</scratch><answer>{values}</answer>"


def _random_episode(rng: np.random.Generator, variant: str) -> list[str]:
    max_turns = 10 if variant == "gated" else 12
    kinds = [RoundKind.ACTION if t % 2 else RoundKind.UPDATE for t in range(1, max_turns)] + [RoundKind.ANSWER]
    return [_random_turn(rng, variant, kind) for kind in kinds]


@pytest.mark.parametrize("variant", ["gated", "full"])
def test_random_generations_volume(variant):
    """>= 1000 seeded random turns per variant through parse + env.step, same invariants as above."""
    rng = np.random.default_rng(123)
    start = _Tally.generations
    episode = 0
    while _Tally.generations - start < 1000:
        _run_episode(variant, _random_episode(rng, variant), seed=episode % 4)
        episode += 1
    assert _Tally.generations - start >= 1000
