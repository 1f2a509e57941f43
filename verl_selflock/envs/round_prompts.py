"""The wording the round-based tasks (PE, MediQ, FloDial) share: round instructions, the rounds and
formats paragraphs of the system prompt, the opening user message.

One place for it keeps the three tasks' protocols described alike, so an agent trained on one reads
the others' rules the same way; each task fills in only its own nouns, blocks and vector formats.
The datasets' prompts and the environments' observations are built from these pieces, so changing a
word here changes both (and every dataset built before the change no longer matches the env).
"""

from __future__ import annotations

__all__ = [
    "FORMATS_HEADER",
    "QUERY_BLOCK",
    "action_format",
    "action_instruction",
    "answer_format",
    "answer_instruction",
    "chat_prompt",
    "opening",
    "rounds_paragraph",
    "turn_rules",
    "update_format",
    "update_instruction",
]

QUERY_BLOCK = "<interact>\nQuery: your question\n</interact>"
"""The Action-round block of the tasks whose queries are free text (MediQ, FloDial)."""
FORMATS_HEADER = "Formats (always think briefly inside <scratch> and </scratch> first):"


# --- round instructions (the line that announces a round, in the prompt and in observations) ----


def action_instruction(query: str, block: str, rules: str) -> str:
    """What to write in an Action round: one new ``query`` written as ``block``, then ``rules``."""
    return f"<scratch>...</scratch> then one new {query}\n{block}\n({rules})."


def update_instruction(vector: str) -> str:
    """What to write in an Update round: a ``Guess:`` of the form ``vector``."""
    return f"<scratch>...</scratch> then <interact>Guess: ...</interact> with {vector}."


def answer_instruction(final: str, vector: str, tail: str = "") -> str:
    """What to write in the Answer round; the tag pair encloses no number, so it cannot be scored."""
    return f"<scratch>...</scratch> then your final {final} between the tags <answer> and </answer>: {vector}.{tail}"


# --- the system prompt's protocol paragraphs ------------------------------------------------------


def rounds_paragraph(max_turns: int, action: str, update: str, answer: str = "") -> str:
    """Which rounds are Action / Update / Answer rounds (``action`` / ``update`` / ``answer`` say what
    each is for; ``answer`` includes its leading space)."""
    actions = ", ".join(map(str, range(1, max_turns, 2)))
    updates = ", ".join(map(str, range(2, max_turns, 2)))
    return (
        f"Rounds: {max_turns} in total. Rounds {actions} are Action rounds ({action}). Rounds {updates} "
        f"are Update rounds ({update}). Round {max_turns} is the Answer round{answer}."
    )


def action_format(block: str, fields: str) -> str:
    return f"- Action round: one block\n{block}\n{fields}, and nothing else in the block."


def update_format(vector: str) -> str:
    return f"- Update round: <interact>Guess: ...</interact> where ... is {vector}."


def answer_format(final: str, tail: str = "") -> str:
    return f"- Answer round: your final {final} in the same form, but between the tags <answer> and </answer>.{tail}"


def turn_rules(setting: str) -> str:
    """Where a turn ends, and that an answer ends the ``setting`` ("game", "visit") at once."""
    return (
        "A turn ends at the first </interact> or </answer> you write; anything after it is ignored. The answer "
        f"tags end the {setting} in any round."
    )


# --- the first messages of a row ----------------------------------------------------------------


def opening(budget: str, max_turns: int, action: str) -> str:
    """First user message: the query ``budget`` ("you have 5 queries"), then round 1's instruction."""
    return f"Let's start: {budget}. Round 1 of {max_turns} is an Action round: " + action


def chat_prompt(system: str, user: str) -> list[dict[str, str]]:
    """The chat ``prompt`` column of a row: the system message and the first user message."""
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]
