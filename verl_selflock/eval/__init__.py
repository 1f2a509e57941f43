"""``verl-selflock eval``: the test split of any task against any OpenAI-compatible endpoint."""

from verl_selflock.eval.runner import EvalConfig, evaluate, format_summary, load_rows, run_episode, summarize_run

__all__ = ["EvalConfig", "evaluate", "format_summary", "load_rows", "run_episode", "summarize_run"]
