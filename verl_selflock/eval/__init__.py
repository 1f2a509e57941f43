"""``verl-selflock eval``: the test split of any task against any OpenAI-compatible endpoint."""

from verl_selflock.eval.config import EvalConfig, load_rows
from verl_selflock.eval.episode import run_episode
from verl_selflock.eval.runner import evaluate
from verl_selflock.eval.summary import format_summary, summarize_run

__all__ = ["EvalConfig", "evaluate", "format_summary", "load_rows", "run_episode", "summarize_run"]
