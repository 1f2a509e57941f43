"""Prompt text of the Preference Estimation tasks (our own wording of the PE protocol).

Shared by the environment (the round instructions in its observations) and the data builder (the
first messages of a row), so that both say the same thing. The instructions never show a literal
``<answer>`` block that encloses numbers: a naive reward that searched the transcript for the last
``<answer>...</answer>`` would otherwise score the prompt's own example (a defect of the original
fork). Formats are described with letter placeholders instead. The prompt holds no decimal numbers
at all, so no hidden weight can leak through it (the tests check that).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from verl_selflock.envs import round_prompts as rp

__all__ = [
    "FEEDBACK_PREFIX",
    "action_block",
    "action_instruction",
    "update_instruction",
    "answer_instruction",
    "PROMPT_STYLES",
    "pe_system_prompt",
    "pe_compact_system_prompt",
    "pe_user_prompt",
    "pe_messages",
    "format_value",
]

FEEDBACK_PREFIX = "The feedback of your latest query: "
PROMPT_STYLES = ("full", "compact")
"""``full``: the paper-scale wording; ``compact``: the same rules in about a third of the tokens, for small
models on small machines (the embedded CPU default). The env spec's ``prompt`` key picks one."""


# --- round instructions (also the environment's observations) ----------------------------------
# No example numbers anywhere: nothing here can be parsed as an action or scored as an answer.


def _vector_format(D: int) -> str:
    return f"{D} non-negative numbers separated by commas, one per attribute in order"


def focus_placeholder(S: int) -> str:
    """``a,b,c`` for S=3: letters, never digits."""
    return ",".join("abcdefghijklmnopqrstuvwxyz"[:S]) if S <= 26 else "a,b,..."


def action_block(variant: str, S: int | None) -> str:
    """The Action-round block with letter placeholders."""
    if variant == "gated":
        return f"<interact>\nFocus: {focus_placeholder(S or 0)}\nPair: i,j\n</interact>"
    return "<interact>\nPair: i,j\n</interact>"


def action_instruction(variant: str, S: int | None, D: int, n_movies: int) -> str:
    """What to write in an Action round."""
    if variant == "gated":
        fields = f"Focus: {S} different attributes from 1 to {D}; Pair: two different movies from 1 to {n_movies}"
    else:
        fields = f"Pair: two different movies from 1 to {n_movies}"
    return rp.action_instruction(
        "query", action_block(variant, S), f"{fields}; nothing else in the block; do not repeat an earlier query"
    )


def update_instruction(D: int) -> str:
    """What to write in an Update round."""
    return rp.update_instruction(_vector_format(D))


def answer_instruction(D: int) -> str:
    """What to write in the Answer round (the tag pair encloses no number)."""
    return rp.answer_instruction("estimate", _vector_format(D))


# --- the first messages of a row ---------------------------------------------------------------


def format_value(value: float) -> str:
    """Attribute values are whole numbers in our data; print them without a decimal point."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _movie_table(movies: list[list[float]]) -> str:
    return "\n".join(
        f"Movie {index}: " + ", ".join(format_value(v) for v in row) for index, row in enumerate(movies, start=1)
    )


def pe_system_prompt(spec: Mapping[str, Any]) -> str:
    """System message: the game, the movie table, the rounds and every format."""
    style = spec.get("prompt", "full")
    if style not in PROMPT_STYLES:
        raise ValueError(f"PE env spec: prompt must be one of {PROMPT_STYLES}, got {style!r}")
    if style == "compact":
        return pe_compact_system_prompt(spec)
    variant, D, max_turns = spec["variant"], int(spec["D"]), int(spec["max_turns"])
    S = spec.get("S")
    movies = spec["movies"]
    n_movies = len(movies)
    if variant == "gated":
        query = (
            f"Each query names a focus of {S} different attributes and a pair of two different movies. The user "
            "compares the two movies on the focus attributes only: a movie's score is the sum over the focus "
            "attributes of weight times value."
        )
        repeat = "the same pair with the same focus"
        fields = (
            f"with {S} different attribute numbers (1 to {D}) after Focus and two different movie numbers "
            f"(1 to {n_movies}) after Pair"
        )
    else:
        query = (
            "Each query names a pair of two different movies. The user compares their scores: a movie's score "
            "is the sum over all attributes of weight times value."
        )
        repeat = "the same pair"
        fields = f"with two different movie numbers (1 to {n_movies}) after Pair"
    return "\n".join(
        [
            f"You are playing a preference-discovery game. A user has a hidden weight for each of {D} movie "
            f"attributes (numbered 1 to {D}); every weight is zero or positive. Find out how the weights compare "
            "by asking the user about pairs of movies, then report your estimate of the weights.",
            "",
            f"Reference movies (movie number: attribute 1 to {D}):",
            _movie_table(movies),
            "",
            f"Queries: {query} A pair is read with the smaller movie number first: the user replies Yes if that "
            "movie has the higher score, No if the lower, Equal if the scores are the same. A query whose reply "
            "is the same for all possible weights (one movie is higher on every compared attribute) teaches you "
            f"nothing. Do not repeat a question ({repeat}): repeated or invalid queries get no feedback.",
            "",
            rp.rounds_paragraph(max_turns, "ask one query", "state your current estimate", " (your final estimate)")
            + " Before any query, your estimate weighs every attribute equally.",
            "",
            rp.FORMATS_HEADER,
            rp.action_format(action_block(variant, S), fields),
            rp.update_format(_vector_format(D)),
            rp.answer_format("estimate"),
            "Only the proportions between the weights matter, so make clear distinctions. "
            + rp.turn_rules("game")
            + " Your answer is correct if it points in nearly the same direction as the user's weights.",
        ]
    )


def pe_compact_system_prompt(spec: Mapping[str, Any]) -> str:
    """The same game and rules as :func:`pe_system_prompt`, tersely: every rule the environment enforces
    (formats, ranges, dominated and repeated queries, rounds, where a turn ends, what counts as correct)
    is still stated, once."""
    variant, D, max_turns = spec["variant"], int(spec["D"]), int(spec["max_turns"])
    S, movies = spec.get("S"), spec["movies"]
    n_movies = len(movies)
    if variant == "gated":
        query = f"Focus: {S} different attributes (1 to {D}); Pair: two different movies (1 to {n_movies})."
        score, repeat = "on the focus attributes", "same focus and pair"
    else:
        query = f"Pair: two different movies (1 to {n_movies})."
        score, repeat = "on all attributes", "same pair"
    return "\n".join(
        [
            f"Preference game: a user has a hidden weight (zero or positive) for each of {D} movie attributes. "
            "Ask about pairs of movies, then estimate the weights.",
            f"Movies (attributes 1 to {D}):",
            _movie_table(movies),
            f"Query: {query} A movie's score {score} is the sum of weight times value. The user replies Yes if "
            "the smaller-numbered movie scores higher, No if lower, Equal if the same. A pair where one movie is "
            f"higher on every compared attribute teaches nothing; a repeated ({repeat}) or invalid query gets no "
            "feedback.",
            rp.rounds_paragraph(max_turns, "one query", "your current estimate", " (final estimate)")
            + " Before any query, your estimate weighs every attribute equally.",
            "Formats (think briefly in <scratch>...</scratch> first):",
            rp.action_format(action_block(variant, S), "with the numbers described above"),
            rp.update_format(_vector_format(D)),
            rp.answer_format("estimate"),
            rp.turn_rules("game") + " Your answer is correct if it points in nearly the same direction as the "
            "user's weights.",
        ]
    )


def pe_user_prompt(spec: Mapping[str, Any]) -> str:
    """First user message: start the episode with round 1 (an Action round)."""
    max_turns = int(spec["max_turns"])
    action = action_instruction(spec["variant"], spec.get("S"), int(spec["D"]), len(spec["movies"]))
    return rp.opening(f"you have {max_turns // 2} queries", max_turns, action)


def pe_messages(spec: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat ``prompt`` column of one PE row."""
    return rp.chat_prompt(pe_system_prompt(spec), pe_user_prompt(spec))
