"""Settings of a ``verl-selflock eval`` run and the test rows it plays.

Output folder (``--out``) of a run: :data:`EPISODES_FILE` (one record per finished episode),
:data:`ERRORS_FILE` (episodes abandoned because the endpoint failed), :data:`RUN_FILE` (the settings)
and :data:`SUMMARY_FILE` (see :mod:`verl_selflock.eval.runner`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_selflock.errors import UserError

__all__ = [
    "EPISODES_FILE", "ERRORS_FILE", "FEEDBACK_MODES", "RUN_FILE", "SUMMARY_FILE", "EpisodeRow", "EvalConfig", "load_rows",
]

EPISODES_FILE = "episodes.jsonl"
ERRORS_FILE = "errors.jsonl"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
FEEDBACK_MODES = ("real", "unknown")


@dataclass(frozen=True)
class EvalConfig:
    """Settings of one evaluation run."""

    data: str
    """Parquet file of a test split (as written by ``verl-selflock data``)."""
    out: str
    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    max_episodes: int | None = None
    concurrency: int = 8
    max_tokens: int = 512
    """Most tokens per agent turn (the training loop's ``max_turn_tokens``)."""
    temperature: float = 0.0
    timeout_s: float = 120.0
    max_retries: int = 3
    feedback: str = "real"
    oracle_bt: bool = False
    simulator_url: str | None = None
    simulator_model: str | None = None
    simulator_timeout_s: float = 30.0
    simulator_retries: int = 2
    max_sim_failure_rate: float = 0.05
    """Share of simulator calls that may fail (after all retries) in a valid run; above it the summary is
    marked invalid: those episodes were played against a user who could not answer."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.feedback not in FEEDBACK_MODES:
            raise UserError(f"--feedback must be one of {FEEDBACK_MODES}, got {self.feedback!r}")
        if self.concurrency < 1:
            raise UserError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.max_episodes is not None and self.max_episodes < 1:
            raise UserError(f"--max-episodes must be >= 1, got {self.max_episodes}")
        if (self.simulator_url is None) != (self.simulator_model is None):
            raise UserError("--simulator-url and --simulator-model go together")
        if self.max_tokens < 1:
            raise UserError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise UserError(f"--temperature must be in [0, 2], got {self.temperature}")
        if not self.timeout_s > 0:
            raise UserError(f"--timeout must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.max_retries}")
        if not self.simulator_timeout_s > 0:
            raise UserError(f"--simulator-timeout must be > 0, got {self.simulator_timeout_s}")
        if self.simulator_retries < 0:
            raise UserError(f"--simulator-retries must be >= 0, got {self.simulator_retries}")
        if not 0.0 <= self.max_sim_failure_rate <= 1.0:
            raise UserError(f"--max-sim-failure-rate must be in [0, 1], got {self.max_sim_failure_rate}")

    def settings(self) -> dict[str, Any]:
        return {
            "data": os.path.abspath(self.data),
            "model": self.model,
            "base_url": self.base_url,
            "feedback": self.feedback,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "oracle_bt": self.oracle_bt,
            "simulator_model": self.simulator_model,
        }


@dataclass(frozen=True)
class EpisodeRow:
    """One test row: its id, prompt messages and environment spec."""

    id: str
    index: int
    data_source: str
    messages: list[dict[str, str]]
    spec: dict[str, Any]


def load_rows(path: str | os.PathLike, max_episodes: int | None = None) -> list[EpisodeRow]:
    """The first ``max_episodes`` rows of a parquet written by our builders; a missing, unreadable or
    empty file, or rows our builders would not write, raise :class:`UserError` naming the file and row."""
    import pandas as pd

    if not Path(path).is_file():
        raise UserError(f"--data {path}: no such file (build a test split with `verl-selflock data`)")
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"--data {path}: not a readable parquet file ({' '.join(str(err).split())[:200]})") from err
    missing = [column for column in ("prompt", "extra_info") if column not in frame.columns]
    if missing:
        raise UserError(f"--data {path}: not a verl-selflock dataset (no column(s) {missing}); build one with `verl-selflock data`")
    if frame.empty:
        # Nothing to play: a run would report "0 of 0 episodes" and exit 0, as if it had passed.
        raise UserError(f"--data {path}: the test set has no rows; build it again with `verl-selflock data`")
    if max_episodes is not None:
        frame = frame.iloc[:max_episodes]
    rows = []
    seen: set[str] = set()
    for number, record in enumerate(frame.to_dict("records")):
        extra = record["extra_info"] or {}
        spec = extra.get("env") if isinstance(extra, Mapping) else None
        if not isinstance(spec, Mapping):
            raise UserError(f"--data {path}: row {number} has no extra_info['env'] spec")
        episode_id = str(spec.get("id") or f"{record.get('data_source', 'row')}-{extra.get('index', number)}")
        if episode_id in seen:
            raise UserError(f"--data {path}: episode id {episode_id!r} occurs twice (row {number}); ids must be unique to resume safely")
        seen.add(episode_id)
        try:
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in record["prompt"]]
        except (KeyError, TypeError) as err:
            raise UserError(f"--data {path}: row {number} has a prompt that is not a list of chat messages ({err!r})") from err
        rows.append(
            EpisodeRow(episode_id, int(extra.get("index", number)), str(record.get("data_source", "")), messages, dict(spec))
        )
    return rows
