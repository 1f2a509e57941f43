"""Prompt text of the FloDial task, in our own words: the troubleshooting agent (policy) and the simulated user.

Shared by the environment (observations, the user simulator's messages) and the data builder (the
first messages of a row), so that both say the same thing. Like the PE and MediQ prompts, no text
here shows an ``<answer>`` block enclosing numbers, so nothing in the instructions can be scored as
an answer. The agent's prompt never shows the reference table (only the simulated user sees it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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
    return (
        "<scratch>...</scratch> then one new yes/no question\n<interact>\nQuery: your question\n</interact>\n"
        "(one atomic question on the Query line, nothing else in the block; do not repeat an earlier question)."
    )


def update_instruction(K: int) -> str:
    """What to write in an Update round."""
    return f"<scratch>...</scratch> then <interact>Guess: ...</interact> with {_vector_format(K)}."


def answer_instruction(K: int) -> str:
    """What to write in the Answer round (the tag pair encloses no number)."""
    return (
        "<scratch>...</scratch> then your final weights between the tags <answer> and </answer>: "
        f"{_vector_format(K)}. Put the single largest weight on the fault you believe is the cause."
    )


# --- the first messages of a row -------------------------------------------------------------


def flodial_system_prompt(spec: Mapping[str, Any]) -> str:
    """System message: the problem, the candidate faults, the rounds and every format. Never the table."""
    candidates = list(spec["candidates"])
    K, max_turns = len(candidates), int(spec["max_turns"])
    listing = "\n".join(f"Fault {i}: {text}" for i, text in enumerate(candidates, start=1))
    actions = ", ".join(map(str, range(1, max_turns, 2)))
    updates = ", ".join(map(str, range(2, max_turns, 2)))
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
            f"Rounds: {max_turns} in total. Rounds {actions} are Action rounds (ask one question). Rounds {updates} "
            f"are Update rounds (state your current belief). Round {max_turns} is the Answer round. Before any "
            "question, your belief weighs every candidate equally.",
            "",
            "Formats (always think briefly inside <scratch> and </scratch> first):",
            "- Action round: one block\n<interact>\nQuery: your question\n</interact>\nwith one short question "
            "after Query, and nothing else in the block.",
            f"- Update round: <interact>Guess: ...</interact> where ... is {K} non-negative numbers separated by "
            "commas, one weight per candidate fault in order (a larger weight = more likely the cause).",
            "- Answer round: your final weights in the same form, but between the tags <answer> and </answer>.",
            "A turn ends at the first </interact> or </answer> you write; anything after it is ignored. The answer "
            "tags end the game in any round. Your answer is correct if its single largest weight is on the true "
            "fault.",
        ]
    )


def flodial_user_prompt(spec: Mapping[str, Any]) -> str:
    """First user message: start with round 1 (an Action round)."""
    max_turns = int(spec["max_turns"])
    return f"Let's start: you can ask {max_turns // 2} questions. Round 1 of {max_turns} is an Action round: " + (
        action_instruction()
    )


def flodial_messages(spec: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat ``prompt`` column of one FloDial row."""
    return [
        {"role": "system", "content": flodial_system_prompt(spec)},
        {"role": "user", "content": flodial_user_prompt(spec)},
    ]
