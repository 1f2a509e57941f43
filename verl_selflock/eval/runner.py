"""``verl-selflock eval``: run a task's test split against any OpenAI-compatible chat endpoint.

The policy is a model behind ``/v1/chat/completions`` (a checkpoint served by ``vllm serve``, a hosted
model, or ``transformers serve`` on a CPU). Each episode uses the same pieces as training: the row's
``prompt`` messages from the parquet our builders write, the environment built from the row's
``extra_info["env"]`` (``EnvContext(training=False)``), the same cut after the first closing tag, and
the same episode runner (steps, counts, stop rules, result: :mod:`verl_selflock.episode.runner`); one
episode is :func:`verl_selflock.eval.episode.run_episode`. This reproduces the paper's "direct
prompting" column for any model. This module runs (or resumes) the whole split, checks the settings
first, writes the summary (:mod:`verl_selflock.eval.summary`) and is the CLI.

Output folder (``--out``):

* ``episodes.jsonl``: one record per finished episode (id, outcome, counts, the full transcript with
  every turn's text, feedback, critique and env info; the oracle-BT replay with ``--oracle-bt``),
  appended, flushed and fsync'ed one at a time. Re-running the same command resumes: episodes
  already there are skipped, so nothing is lost or duplicated when a run is interrupted.
* ``errors.jsonl``: episodes abandoned because the *endpoint* failed after all retries (never
  counted as a failure of the model); they are retried by the next run.
* ``run.json``: the settings, written once every check passed (data, options per task, endpoints); a
  resume with different settings (model, data, feedback ...) is refused.
* ``summary.json``: success rate, AS/BT proxies, information gain, turns, finish/invalid/repeat
  ratios with 95% confidence intervals (:func:`verl_selflock.diagnostics.metrics.summarize`), also
  printed as a table.

Ablations:

* ``--feedback unknown``: every feedback is replaced by the task's uninformative reply
  (``ActiveReasoningEnv.uninformative_feedback``; PE: the comparison is shown as ``Unknown.``). The
  drop from ``--feedback real`` measures how much the agent relies on interaction.
* ``--oracle-bt`` (PE): the masking analysis of :mod:`verl_selflock.eval.oracle`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from verl_selflock.eval.config import (
    EPISODES_FILE,
    ERRORS_FILE,
    FEEDBACK_MODES,
    RUN_FILE,
    SUMMARY_FILE,
    EpisodeRow,
    EvalConfig,
    load_rows,
)
from verl_selflock.eval.episode import EndpointError, run_episode
from verl_selflock.eval.oracle import ORACLE_BT
from verl_selflock.eval.store import EpisodeStore, to_jsonable
from verl_selflock.eval.summary import format_summary, summarize_run

logger = logging.getLogger(__name__)

__all__ = [
    "EvalConfig", "EpisodeRow", "load_rows", "run_episode", "evaluate", "summarize_run", "format_summary",
    "add_arguments", "run",
]

# Settings that change the results: a resume must use the same ones.
_RESUME_KEYS = ("data", "model", "feedback", "temperature", "max_tokens", "oracle_bt", "simulator_model")


def _check_resume(out: Path, config: EvalConfig) -> None:
    """Refuse to resume a run of ``out`` made with other settings (writes nothing)."""
    run_path = out / RUN_FILE
    if not run_path.exists():
        return
    settings = config.settings()
    previous = json.loads(run_path.read_text())
    changed = {key: (previous.get(key), settings[key]) for key in _RESUME_KEYS if previous.get(key) != settings[key]}
    if changed:
        detail = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise ValueError(f"{out} holds a run with other settings ({detail}); use another --out to start a new run")


def _start_run(out: Path, config: EvalConfig) -> None:
    """Record the settings of a new run. Called only once everything was validated: a run.json left by a
    command that failed its checks would make the corrected command look like a resume with other settings."""
    run_path = out / RUN_FILE
    if not run_path.exists():
        out.mkdir(parents=True, exist_ok=True)
        run_path.write_text(json.dumps(config.settings(), indent=2) + "\n")


def _check_tasks(rows: Sequence[EpisodeRow], config: EvalConfig) -> None:
    """The options this run asks for are supported by every task in the data."""
    tasks = sorted({str(row.spec.get("task")) for row in rows})
    if config.oracle_bt:
        unsupported = [task for task in tasks if task not in ORACLE_BT]
        if unsupported:
            raise ValueError(f"--oracle-bt is available for tasks {sorted(ORACLE_BT)}, not {unsupported}")
    if config.feedback == "unknown":
        from verl_selflock.envs.base import env_class

        for task in tasks:
            if env_class(task).uninformative_feedback is None:
                raise ValueError(f"task {task!r} does not support --feedback unknown (no uninformative_feedback)")


def _check_envs_build(rows: Sequence[EpisodeRow], config: EvalConfig, simulator: Any) -> None:
    """Build the environment of each task's first row, as the episodes will: a spec the task rejects or a
    task that needs a simulated user (``--simulator-url``) fails here, before the run starts."""
    from verl_selflock.envs import EnvContext, make_env

    first: dict[str, EpisodeRow] = {}
    for row in rows:
        first.setdefault(str(row.spec.get("task")), row)
    for task, row in first.items():
        context = EnvContext(simulator=simulator, training=False, withhold_feedback=config.feedback == "unknown")
        try:
            make_env(row.spec, context=context)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"episode {row.id!r} (task {task!r}) cannot start: {err}") from err


def _policy_client(config: EvalConfig) -> Any:
    from verl_selflock.eval.policy import PolicyClient
    from verl_selflock.simulators import SimulatorConfig

    return PolicyClient(
        SimulatorConfig(
            base_url=config.base_url,
            model=config.model,
            api_key_env=config.api_key_env,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            timeout_s=config.timeout_s,
            max_concurrency=config.concurrency,
            max_retries=config.max_retries,
            cache=False,
        )
    )


def _open_clients(config: EvalConfig, policy: Any, simulator: Any, owned: list[Any]) -> tuple[Any, Any]:
    """The policy and simulator clients, defaulting to ``config``'s endpoints; those opened here are
    appended to ``owned`` (bad endpoint settings raise here, before the run starts)."""
    from verl_selflock.simulators import ChatClient, SimulatorConfig

    if policy is None:
        policy = _policy_client(config)
        owned.append(policy)
    if simulator is None and config.simulator_url:
        simulator = ChatClient(SimulatorConfig(base_url=config.simulator_url, model=str(config.simulator_model)))
        owned.append(simulator)
    return policy, simulator


async def evaluate(config: EvalConfig, policy: Any = None, simulator: Any = None) -> dict[str, Any]:
    """Run (or resume) an evaluation; returns the summary (also written to ``summary.json``).

    ``policy`` defaults to a :class:`~verl_selflock.eval.policy.PolicyClient` and ``simulator`` to a
    :class:`ChatClient` for ``config``'s endpoints. Everything is validated (data, options per task,
    endpoints, resume settings) before ``run.json`` is written.
    """
    from tqdm import tqdm

    out = Path(config.out)
    rows = load_rows(config.data, config.max_episodes)
    _check_tasks(rows, config)
    _check_resume(out, config)
    owned: list[Any] = []  # clients this call opened (and closes)
    try:
        policy, simulator = _open_clients(config, policy, simulator, owned)
        _check_envs_build(rows, config, simulator)
    except BaseException:
        await _close(owned)
        raise
    _start_run(out, config)
    store, errors = EpisodeStore(out / EPISODES_FILE), EpisodeStore(out / ERRORS_FILE)
    store.repair()
    errors.repair()
    done = store.ids()
    pending = [row for row in rows if row.id not in done]

    semaphore = asyncio.Semaphore(config.concurrency)
    bar = tqdm(total=len(rows), initial=len(rows) - len(pending), desc="eval", unit="episode", disable=not config.progress)
    failed = 0

    async def one(row: EpisodeRow) -> None:
        nonlocal failed
        async with semaphore:
            try:
                record = await run_episode(row, policy, config, simulator)
            except EndpointError as err:
                failed += 1
                errors.append({"id": row.id, "error": str(err), "time": time.time()})
                logger.warning("episode %s: %s (will be retried by the next run)", row.id, err)
                return
            store.append(record)  # durable before the next episode is counted
            bar.update(1)

    try:
        await asyncio.gather(*(one(row) for row in pending))
    finally:
        bar.close()
        await _close(owned)
    summary = summarize_run(out, [row.id for row in rows])
    summary["errored_this_run"] = failed
    (out / SUMMARY_FILE).write_text(json.dumps(to_jsonable(summary), indent=2) + "\n")
    return summary


async def _close(clients: Sequence[Any]) -> None:
    for client in clients:
        await client.aclose()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``verl-selflock eval``."""
    parser.add_argument("--data", required=True, help="test parquet built by `verl-selflock data` (e.g. ~/data/pe_g_s3/test.parquet)")
    parser.add_argument("--out", required=True, help="output folder (episodes.jsonl, summary.json); rerun to resume")
    parser.add_argument("--base-url", required=True, help="policy endpoint, e.g. http://localhost:8000/v1")
    parser.add_argument("--model", required=True, help="model name the endpoint serves")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="variable holding the API key (unset: 'EMPTY')")
    parser.add_argument("--max-episodes", type=int, default=None, help="first N rows of the file (default: all)")
    parser.add_argument("--concurrency", type=int, default=8, help="episodes (and requests) in flight at once")
    parser.add_argument("--max-tokens", type=int, default=512, help="most tokens per agent turn")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request attempt")
    parser.add_argument("--retries", type=int, default=3, help="retries per request on timeouts, 429 and 5xx")
    parser.add_argument("--feedback", choices=FEEDBACK_MODES, default="real",
                        help="'unknown' replaces every feedback with the task's uninformative reply")
    parser.add_argument("--oracle-bt", action="store_true", help="PE: masking analysis with oracle belief tracking")
    parser.add_argument("--simulator-url", default=None, help="simulated user endpoint for tasks that need one")
    parser.add_argument("--simulator-model", default=None, help="simulated user model name")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """CLI entry: 0 when every selected episode is finished, 2 when some must be retried."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = EvalConfig(
        data=args.data, out=args.out, base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
        max_episodes=args.max_episodes, concurrency=args.concurrency, max_tokens=args.max_tokens,
        temperature=args.temperature, timeout_s=args.timeout, max_retries=args.retries, feedback=args.feedback,
        oracle_bt=args.oracle_bt, simulator_url=args.simulator_url, simulator_model=args.simulator_model,
        progress=not args.no_progress,
    )
    try:
        summary = asyncio.run(evaluate(config))
    except KeyboardInterrupt:
        saved = len(EpisodeStore(Path(config.out) / EPISODES_FILE).ids())
        print(f"\ninterrupted: {saved} finished episodes are in {config.out}; run the same command to resume",
              file=sys.stderr)
        return 130
    print(format_summary(summary))
    print(f"summary: {os.path.abspath(os.path.join(config.out, SUMMARY_FILE))}", file=sys.stderr)
    return 2 if summary["missing"] else 0
