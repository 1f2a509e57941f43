"""Prompt text of the MediQ task, in our own words: the doctor (policy) and the simulated patient.

Shared by the environment (observations, the patient's messages) and the data builder (the first
messages of a row), so that both say the same thing. Like the PE prompts, no text here shows an
``<answer>`` block enclosing numbers, so nothing in the instructions can be scored as an answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from verl_selflock.envs import round_prompts as rp

__all__ = [
    "OPTION_LETTERS",
    "FEEDBACK_PREFIX",
    "FIXED_REPLY",
    "patient_messages",
    "action_instruction",
    "update_instruction",
    "answer_instruction",
    "mediq_system_prompt",
    "mediq_user_prompt",
    "mediq_messages",
]

OPTION_LETTERS = ("A", "B", "C", "D")
FEEDBACK_PREFIX = "Patient: "
FIXED_REPLY = "I can't answer that question. Please don't ask me that again."
"""The patient's reply when no new fact answers the question (nothing relevant, already told, or the
simulator failed): the task's fixed "cannot answer" reply."""


# --- the simulated patient ----------------------------------------------------------------------


def patient_messages(facts: Sequence[str], query: str) -> list[dict[str, str]]:
    """Chat messages for the patient LLM: answer ``query`` with at most two fact numbers or Unknown."""
    numbered = "\n".join(f"{index}. {fact}" for index, fact in enumerate(facts, start=1))
    system = (
        "You are role-playing a patient who is being asked questions by a doctor. Everything you know about "
        "yourself is in the numbered list of facts below; you know nothing else.\n"
        "When the doctor asks a question, find the facts that directly answer it. Reply with only the numbers "
        "of those facts (at most two), separated by a comma, for example: 4 or 2,7. If no fact answers the "
        "question, reply with only the word Unknown. Never explain, never repeat the facts, never add any "
        "other words.\n\n"
        f"Facts:\n{numbered}"
    )
    return [{"role": "system", "content": system}, {"role": "user", "content": f"Doctor's question: {query}"}]


# --- the doctor (policy) ------------------------------------------------------------------------

_GUESS_FORMAT = "4 non-negative numbers separated by commas: your weight for each option in the order A, B, C, D"


def action_instruction() -> str:
    """What to write in an Action round."""
    return rp.action_instruction(
        "question to the patient", rp.QUERY_BLOCK, "a single short question about one thing; do not repeat an earlier question"
    )


def update_instruction() -> str:
    """What to write in an Update round."""
    return rp.update_instruction(_GUESS_FORMAT)


def answer_instruction() -> str:
    """What to write in the Answer round (the tag pair encloses no number)."""
    return rp.answer_instruction("weights", _GUESS_FORMAT, " The option with the single largest weight is your answer.")


def mediq_system_prompt(spec: Mapping[str, Any]) -> str:
    """System message: the case as first presented, the question, the options, the rounds, the formats."""
    max_turns = int(spec["max_turns"])
    options = "\n".join(f"{letter}: {text}" for letter, text in zip(OPTION_LETTERS, spec["options"], strict=True))
    return "\n".join(
        [
            "You are a doctor seeing a patient. You must answer a multiple-choice question about the case, but you "
            "only know how the patient first presented. Everything else about the patient is hidden: ask the "
            "patient questions to find out what you need, then choose an option.",
            "",
            f"Initial presentation: {spec['initial']}",
            f"Question: {spec['question']}",
            f"Options:\n{options}",
            "",
            rp.rounds_paragraph(max_turns, "ask the patient one question", "state how likely you now find each option")
            + " Before any question, all four options are equally likely. The patient only answers with facts you "
            "have not heard yet; otherwise they say they cannot answer. Asking the same question again teaches you "
            "nothing.",
            "",
            rp.FORMATS_HEADER,
            rp.action_format(rp.QUERY_BLOCK, "with a single short question about one thing"),
            rp.update_format(_GUESS_FORMAT),
            rp.answer_format("weights", " Your answer is the option with the single largest weight (a tie counts as wrong)."),
            "Update your weights when the patient tells you something new, and only then. " + rp.turn_rules("visit"),
        ]
    )


def mediq_user_prompt(spec: Mapping[str, Any]) -> str:
    """First user message: start the episode with round 1 (an Action round)."""
    max_turns = int(spec["max_turns"])
    return rp.opening(f"you may ask {max_turns // 2} questions", max_turns, action_instruction())


def mediq_messages(spec: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat ``prompt`` column of one MediQ row."""
    return rp.chat_prompt(mediq_system_prompt(spec), mediq_user_prompt(spec))
