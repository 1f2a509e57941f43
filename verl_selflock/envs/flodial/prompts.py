"""Prompt text of the FloDial task, in our own words: the troubleshooting agent (policy) and the simulated user.

Shared by the environment (observations, the user simulator's messages) and the data builder (the
first messages of a row), so that both say the same thing. Like the PE and MediQ prompts, no text
here shows an ``<answer>`` block enclosing numbers, so nothing in the instructions can be scored as
an answer. The agent's prompt never shows the reference table (only the simulated user sees it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from verl_selflock.envs import round_prompts as rp

__all__ = [
    "FEEDBACK_PREFIX",
    "simulator_messages",
    "action_instruction",
    "update_instruction",
    "answer_instruction",
    "flodial_system_prompt",
    "flodial_user_prompt",
    "flodial_messages",
]

FEEDBACK_PREFIX = "The feedback of your latest query: "


# --- the simulated user -----------------------------------------------------------------------


def simulator_messages(problem: str, table: Sequence[Mapping[str, Any]], query: str) -> list[dict[str, str]]:
    """Chat messages asking the user simulator to match ``query`` against the reference table.

    The table is numbered from 0, one row per line: ``{idx}. {question} -> {Yes|No}``.
    """
    rows = "\n".join(f"{idx}. {row['question']} -> {str(row['answer']).capitalize()}" for idx, row in enumerate(table))
    system = (
        "You role-play a person who has this problem and is being helped by a troubleshooting agent: "
        f"{problem}\n"
        "You know the answers to these yes/no diagnostic questions and nothing else (row number. question -> "
        f"your answer):\n{rows}\n"
        "The agent asks one question. If it asks the same thing as one row, or clearly paraphrases it, reply "
        "with that row's answer and number, exactly 'Yes, <number>' or 'No, <number>'. If no row matches, or "
        "the question is vague, ambiguous or asks several things at once, reply exactly 'Unknown'. "
        "Reply with nothing else."
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": query}]


# --- the agent's round instructions (also the environment's observations) ---------------------


def _vector_format(K: int) -> str:
    return f"{K} non-negative numbers separated by commas, one weight per candidate fault in order"


def action_instruction() -> str:
    """What to write in an Action round."""
    rules = "one atomic question on the Query line, nothing else in the block; do not repeat an earlier question"
    return rp.action_instruction("yes/no question", rp.QUERY_BLOCK, rules)


def update_instruction(K: int) -> str:
    """What to write in an Update round."""
    return rp.update_instruction(_vector_format(K))


def answer_instruction(K: int) -> str:
    """What to write in the Answer round (the tag pair encloses no number)."""
    return rp.answer_instruction(
        "weights", _vector_format(K), " Put the single largest weight on the fault you believe is the cause."
    )


# --- the first messages of a row -------------------------------------------------------------


def flodial_system_prompt(spec: Mapping[str, Any]) -> str:
    """System message: the problem, the candidate faults, the rounds and every format. Never the table."""
    candidates = list(spec["candidates"])
    K, max_turns = len(candidates), int(spec["max_turns"])
    listing = "\n".join(f"Fault {i}: {text}" for i, text in enumerate(candidates, start=1))
    return "\n".join(
        [
            "You are a troubleshooting assistant. A user reports this problem: "
            f"{spec['problem_description']}",
            "",
            f"Exactly one of these {K} candidate faults (numbered 1 to {K}) is the cause; each is described by "
            "the fix a technician would give:",
            listing,
            "",
            "Find the cause by asking the user yes/no diagnostic questions about their situation. The user only "
            "knows the answers to the questions of a fixed troubleshooting checklist: a question that asks the "
            "same thing as a checklist item gets Yes or No; anything else (vague, combined, or not on the "
            "checklist) gets Unknown, and so does a question you already asked. Ask concrete questions that "
            "tell the candidate faults apart.",
            "",
            rp.rounds_paragraph(max_turns, "ask one question", "state your current belief")
            + " Before any question, your belief weighs every candidate equally.",
            "",
            rp.FORMATS_HEADER,
            rp.action_format(rp.QUERY_BLOCK, "with one short question after Query"),
            rp.update_format(_vector_format(K) + " (a larger weight = more likely the cause)"),
            rp.answer_format("weights"),
            rp.turn_rules("game") + " Your answer is correct if its single largest weight is on the true fault.",
        ]
    )


def flodial_user_prompt(spec: Mapping[str, Any]) -> str:
    """First user message: start with round 1 (an Action round)."""
    max_turns = int(spec["max_turns"])
    return rp.opening(f"you can ask {max_turns // 2} questions", max_turns, action_instruction())


def flodial_messages(spec: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat ``prompt`` column of one FloDial row."""
    return rp.chat_prompt(flodial_system_prompt(spec), flodial_user_prompt(spec))
