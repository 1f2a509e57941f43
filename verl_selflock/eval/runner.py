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
  ratios with 95% confidence intervals (:func:`verl_selflock.diagnostics.metrics.summarize`), the
  simulated user's calls and failures, and ``valid`` (false, with ``invalid_reason``, when more than
  ``--max-sim-failure-rate`` of the simulator's calls failed: :mod:`verl_selflock.eval.summary`); also
  printed as a table.
* ``.eval.lock`` / ``.eval.owner.json``: one process per folder (:mod:`verl_selflock.eval.preflight`).

Before any episode the run checks its data (a missing, unreadable or empty file), its options per
task, the records it resumes (a line that is not one of ours is refused, naming the file and line),
and sends one chat completion to each endpoint it opened (a dead, non-OpenAI or garbage server is
refused naming the URL and what came back). User mistakes raise :class:`~verl_selflock.errors.UserError`.
Exit codes of :func:`run`: 0 every episode finished, 2 some must be retried (or a user error), 3 the
summary is invalid (:data:`~verl_selflock.eval.summary.INVALID_RUN_EXIT`).

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

from verl_selflock.errors import UserError
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
from verl_selflock.eval.preflight import OutLock, check_endpoint
from verl_selflock.eval.store import EpisodeStore, to_jsonable
from verl_selflock.eval.summary import INVALID_RUN_EXIT, format_summary, judge_validity, summarize_run

logger = logging.getLogger(__name__)

__all__ = [
    "EpisodeRow",
    "EvalConfig",
    "add_arguments",
    "evaluate",
    "format_summary",
    "load_rows",
    "run",
    "run_episode",
    "summarize_run",
]

# Settings that change the results: a resume must use the same ones.
_RESUME_KEYS = ("data", "model", "feedback", "temperature", "max_tokens", "oracle_bt", "simulator_model")


def _check_resume(out: Path, config: EvalConfig) -> None:
    """Refuse to resume a run of ``out`` made with other settings (writes nothing)."""
    run_path = out / RUN_FILE
    if not run_path.exists():
        return
    settings = config.settings()
    try:
        previous = json.loads(run_path.read_text())
    except (ValueError, UnicodeDecodeError):
        previous = None
    if not isinstance(previous, dict):
        raise UserError(f"{run_path}: not the JSON object of a run's settings; use another --out to start a new run")
    changed = {key: (previous.get(key), settings[key]) for key in _RESUME_KEYS if previous.get(key) != settings[key]}
    if changed:
        detail = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise UserError(f"{out} holds a run with other settings ({detail}); use another --out to start a new run")


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
            raise UserError(f"--oracle-bt is available for tasks {sorted(ORACLE_BT)}, not {unsupported}")
    if config.feedback == "unknown":
        from verl_selflock.envs.base import env_class

        for task in tasks:
            if env_class(task).uninformative_feedback is None:
                raise UserError(f"task {task!r} does not support --feedback unknown (no uninformative_feedback)")


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
            raise UserError(f"episode {row.id!r} (task {task!r}) cannot start: {err}") from err


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
    from verl_selflock.simulators import ChatClient, SimulatorConfig, SimulatorConfigError

    if policy is None:
        try:
            policy = _policy_client(config)
        except SimulatorConfigError as err:
            raise _option_error(err, "--base-url", "--model") from err
        owned.append(policy)
    if simulator is None and config.simulator_url:
        try:
            simulator = ChatClient(SimulatorConfig(
                base_url=config.simulator_url, model=str(config.simulator_model),
                timeout_s=config.simulator_timeout_s, max_retries=config.simulator_retries,
            ))
        except SimulatorConfigError as err:
            raise _option_error(err, "--simulator-url", "--simulator-model") from err
        owned.append(simulator)
    return policy, simulator


def _option_error(err: Exception, url_option: str, model_option: str) -> UserError:
    """A client setting's error (``simulator.<key>: why``) under the name of the CLI option that set it."""
    key, _, why = str(err).partition(": ")
    option = {"simulator.base_url": url_option, "simulator.model": model_option}.get(key)
    return UserError(f"{option}: {why}" if option else f"{url_option}: {err}")


async def _preflight(policy: Any, simulator: Any, owned: Sequence[Any]) -> None:
    """One chat completion to each endpoint this run opened (a caller's own client is its business)."""
    for client, option in ((policy, "--base-url"), (simulator, "--simulator-url")):
        if client is not None and client in owned:
            settings = client.config
            await check_endpoint(option, settings.base_url, settings.model, settings.api_key(),
                                 float(settings.timeout_s), float(settings.temperature))


async def evaluate(config: EvalConfig, policy: Any = None, simulator: Any = None) -> dict[str, Any]:
    """Run (or resume) an evaluation; returns the summary (also written to ``summary.json``).

    ``policy`` defaults to a :class:`~verl_selflock.eval.policy.PolicyClient` and ``simulator`` to a
    :class:`ChatClient` for ``config``'s endpoints. Everything is validated (data, options per task,
    the records resumed, endpoints, resume settings) before ``run.json`` is written; the output folder
    is locked for the whole run. User mistakes raise :class:`UserError`.
    """
    rows = load_rows(config.data, config.max_episodes)
    _check_tasks(rows, config)
    with OutLock(config.out):
        return await _evaluate_locked(config, rows, policy, simulator)


async def _evaluate_locked(config: EvalConfig, rows: list[EpisodeRow], policy: Any, simulator: Any) -> dict[str, Any]:
    from tqdm import tqdm

    out = Path(config.out)
    _check_resume(out, config)
    store, errors = EpisodeStore(out / EPISODES_FILE), EpisodeStore(out / ERRORS_FILE)
    store.repair()
    errors.repair()
    done = store.ids(strict=True)  # a line that is not ours stops the run here, naming file and line
    owned: list[Any] = []  # clients this call opened (and closes)
    try:
        policy, simulator = _open_clients(config, policy, simulator, owned)
        _check_envs_build(rows, config, simulator)
        await _preflight(policy, simulator, owned)
    except BaseException:
        await _close(owned)
        raise
    _start_run(out, config)
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
    summary = judge_validity(summarize_run(out, [row.id for row in rows]), config.max_sim_failure_rate)
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
    parser.add_argument("--simulator-timeout", type=float, default=30.0, help="seconds per simulator request attempt")
    parser.add_argument("--simulator-retries", type=int, default=2, help="retries per simulator request")
    parser.add_argument("--max-sim-failure-rate", type=float, default=0.05,
                        help="share of simulator calls that may fail after all retries; above it the summary is "
                        "marked invalid and the command exits 3 (default 0.05)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """CLI entry: 0 when every selected episode is finished, 2 when some must be retried, 3 when the
    summary is invalid (too many simulator failures). User mistakes raise :class:`UserError`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = EvalConfig(
        data=args.data, out=args.out, base_url=args.base_url, model=args.model, api_key_env=args.api_key_env,
        max_episodes=args.max_episodes, concurrency=args.concurrency, max_tokens=args.max_tokens,
        temperature=args.temperature, timeout_s=args.timeout, max_retries=args.retries, feedback=args.feedback,
        oracle_bt=args.oracle_bt, simulator_url=args.simulator_url, simulator_model=args.simulator_model,
        simulator_timeout_s=args.simulator_timeout, simulator_retries=args.simulator_retries,
        max_sim_failure_rate=args.max_sim_failure_rate, progress=not args.no_progress,
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
    if not summary["valid"]:
        print(f"invalid run: {summary['invalid_reason']}", file=sys.stderr)
        return INVALID_RUN_EXIT
    return 2 if summary["missing"] else 0
