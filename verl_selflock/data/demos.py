"""Expert demonstrations as a veRL multi-turn SFT parquet file (a supervised warm start before RL).

One row per episode. The column veRL's ``MultiTurnSFTDataset`` reads (``data.messages_key``, default
``messages``, in ``verl/trainer/config/sft_trainer_engine.yaml``) holds the conversation as the agent
loop builds it (:mod:`verl_selflock.verl_adapter.agent_loop`):

* the row's own prompt messages (system + first user message, exactly the RL row's ``prompt``);
* then per turn an ``assistant`` message whose content is the turn's text cut at its closing tag
  (``_judge_turn`` appends ``cut.text``), and, unless the episode ended there, a ``user`` message with the
  environment's observation (``_append_observation``), capped at ``max_obs_tokens`` tokens with the loop's
  marker (:func:`verl_selflock.episode.token_cut.cap_text_tokens`, the loop's own function and defaults:
  512 tokens, ``" ...(truncated)"``) when a tokenizer is given. Without a tokenizer the observation is
  written whole, and only if it has at most ``max_obs_tokens`` UTF-8 bytes: a tokenizer whose tokens each
  cover at least one byte (byte-level BPE: SmolLM2, Qwen, Llama 3) cannot need more tokens than that, so
  the cap would not have changed it (PE observations have ~250 bytes); otherwise :class:`InvalidInput`.

veRL trains on every assistant message (its tokens after the assistant header, the end-of-turn token
included) and on nothing else, which is what the RL loop's response mask does for the model's turns.

Other columns (ignored by veRL, for filtering and bookkeeping): ``data_source``, ``success``, ``reward``,
``n_turns``, ``critiques`` (the environment's critique of each assistant turn), ``seed`` (the dataset
seed), ``expert_seed``, ``id`` and ``extra_info`` = ``{"index", "split": "demo", "env": spec}``, so that a
demonstration can be replayed through its environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from verl_selflock.data.parquet import check_count, check_out_dir, write_splits
from verl_selflock.episode.token_cut import cap_text_tokens
from verl_selflock.errors import InvalidInput

__all__ = [
    "DEMOS_FILE",
    "DEMOS_SPLIT",
    "MAX_OBS_TOKENS",
    "MESSAGES_KEY",
    "OBS_TRUNCATION_MARKER",
    "DemoLike",
    "check_demo_request",
    "check_demos_out_dir",
    "demo_messages",
    "demo_row",
    "write_demos",
]

DEMOS_SPLIT = "demos"
DEMOS_FILE = f"{DEMOS_SPLIT}.parquet"
MESSAGES_KEY = "messages"
"""veRL's ``data.messages_key`` default."""
MAX_OBS_TOKENS = 512
"""The agent loop's ``max_obs_tokens`` default (``ActiveReasoningLoopConfig``; a test keeps them equal)."""
OBS_TRUNCATION_MARKER = " ...(truncated)"
"""The agent loop's ``obs_truncation_marker`` default."""


class _TurnLike(Protocol):
    text: str
    observation: str | None
    critique: int


class DemoLike(Protocol):
    """What a task's expert returns for one episode (:class:`verl_selflock.envs.demonstration.Demonstration`)."""

    spec: dict[str, Any]
    turns: Sequence[_TurnLike]
    success: bool
    reward: float
    seed: int


def _observation(text: str, tokenizer: Any, max_obs_tokens: int) -> str:
    if tokenizer is not None:
        return cap_text_tokens(tokenizer, text, max_obs_tokens, OBS_TRUNCATION_MARKER)[0]
    if len(text.encode("utf-8")) > max_obs_tokens:
        raise InvalidInput(
            f"an observation of {len(text.encode('utf-8'))} bytes may exceed max_obs_tokens={max_obs_tokens}: "
            "pass the policy's tokenizer so that it is capped as the agent loop caps it"
        )
    return text


def demo_messages(
    prompt: Sequence[Mapping[str, str]], demo: DemoLike, *, tokenizer: Any = None, max_obs_tokens: int = MAX_OBS_TOKENS
) -> list[dict[str, str]]:
    """The conversation of one demonstration: ``prompt``, then assistant turns and user observations
    alternating, ending with the last assistant turn (module docstring)."""
    if not demo.turns:
        raise ValueError("a demonstration needs at least one turn")
    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    for number, turn in enumerate(demo.turns, start=1):
        messages.append({"role": "assistant", "content": turn.text})
        if number < len(demo.turns):
            if not turn.observation:
                raise ValueError(f"turn {number} of {len(demo.turns)} has no observation but is not the last")
            messages.append({"role": "user", "content": _observation(turn.observation, tokenizer, max_obs_tokens)})
    return messages


def demo_row(
    data_source: str,
    prompt: Sequence[Mapping[str, str]],
    demo: DemoLike,
    *,
    index: int,
    dataset_seed: int,
    tokenizer: Any = None,
    max_obs_tokens: int = MAX_OBS_TOKENS,
) -> dict[str, Any]:
    """One row of ``demos.parquet`` (columns: module docstring)."""
    return {
        MESSAGES_KEY: demo_messages(prompt, demo, tokenizer=tokenizer, max_obs_tokens=max_obs_tokens),
        "data_source": data_source,
        "success": bool(demo.success),
        "reward": float(demo.reward),
        "n_turns": len(demo.turns),
        "critiques": [int(turn.critique) for turn in demo.turns],
        "seed": int(dataset_seed),
        "expert_seed": int(demo.seed),
        "id": str(demo.spec.get("id", "")),
        "extra_info": {"index": int(index), "split": "demo", "env": dict(demo.spec)},
    }


def check_demos_out_dir(out_dir: str | os.PathLike) -> Path:
    """Refuse an output folder that cannot take ``demos.parquet`` (before anything is played)."""
    return check_out_dir(out_dir, (DEMOS_SPLIT,))


def check_demo_request(
    n: int, seed: int, n_train: int, n_test: int, expert_seed: int | None, out_dir: str | os.PathLike
) -> int:
    """Refuse impossible arguments of a ``build_<task>_demos`` (naming the CLI option) before anything is
    played; returns the expert's seed (default: the dataset seed)."""
    check_count(n, "n (--demos)")
    check_count(seed, "seed (--seed)", minimum=0)
    check_count(n_train, "n_train (--train)", minimum=0)
    check_count(n_test, "n_test (--test)", minimum=0)
    expert_seed = seed if expert_seed is None else check_count(expert_seed, "expert_seed", minimum=0)
    check_demos_out_dir(out_dir)
    return expert_seed


def write_demos(rows: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> Path:
    """Write ``<out_dir>/demos.parquet`` atomically (:func:`verl_selflock.data.parquet.write_splits`)."""
    if not rows:
        raise InvalidInput("no demonstrations to write")
    return Path(write_splits({DEMOS_SPLIT: rows}, out_dir)[DEMOS_SPLIT])
