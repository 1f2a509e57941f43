"""``verl-selflock eval``: run a task's test split against any OpenAI-compatible chat endpoint.

The policy is a model behind ``/v1/chat/completions`` (a checkpoint served by ``vllm serve``, a hosted
model, or ``transformers serve`` on a CPU). Each episode uses the same pieces as training: the row's
``prompt`` messages from the parquet our builders write, the environment built from the row's
``extra_info["env"]`` (``EnvContext(training=False)``), the same cut after the first closing tag
(:func:`verl_selflock.envs.parsing.cut_after_first_closing_tag`, the text form of the training
loop's token cut), and the same counting (:meth:`EpisodeStats.count_step`). This reproduces the
paper's "direct prompting" column for any model. Differences from training: the conversation goes
through the server's chat template as messages (not our token layout), and observations are not
capped at ``max_obs_tokens``. A reply the endpoint answered with no content (None or blank) is the
model's turn, judged by the environment (an invalid action), never retried
(:mod:`verl_selflock.eval.policy`).

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
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_selflock.contracts.episode import STOP_ANSWER, STOP_DONE, STOP_MAX_TURNS, EpisodeStats
from verl_selflock.diagnostics.metrics import counts_of, pearson, summarize, wilson_interval
from verl_selflock.eval.oracle import ORACLE_BT
from verl_selflock.eval.store import EpisodeStore, to_jsonable

logger = logging.getLogger(__name__)

__all__ = ["EvalConfig", "EpisodeRow", "load_rows", "run_episode", "evaluate", "summarize_run", "add_arguments", "run"]

EPISODES_FILE = "episodes.jsonl"
ERRORS_FILE = "errors.jsonl"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
FEEDBACK_MODES = ("real", "unknown")
# Settings that change the results: a resume must use the same ones.
_RESUME_KEYS = ("data", "model", "feedback", "temperature", "max_tokens", "oracle_bt", "simulator_model")


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
    progress: bool = True

    def __post_init__(self) -> None:
        if self.feedback not in FEEDBACK_MODES:
            raise ValueError(f"--feedback must be one of {FEEDBACK_MODES}, got {self.feedback!r}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.max_episodes is not None and self.max_episodes < 1:
            raise ValueError(f"--max-episodes must be >= 1, got {self.max_episodes}")
        if (self.simulator_url is None) != (self.simulator_model is None):
            raise ValueError("--simulator-url and --simulator-model go together")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"--temperature must be in [0, 2], got {self.temperature}")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ValueError(f"--retries must be >= 0, got {self.max_retries}")

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
    """The first ``max_episodes`` rows of a parquet written by our builders (clear error otherwise)."""
    import pandas as pd

    if not Path(path).is_file():
        raise FileNotFoundError(f"--data {path}: no such file (build a test split with `verl-selflock data`)")
    frame = pd.read_parquet(path)
    missing = [column for column in ("prompt", "extra_info") if column not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a verl-selflock dataset (no column(s) {missing}); build one with `verl-selflock data`")
    if max_episodes is not None:
        frame = frame.iloc[:max_episodes]
    rows = []
    seen: set[str] = set()
    for number, record in enumerate(frame.to_dict("records")):
        extra = record["extra_info"] or {}
        spec = extra.get("env") if isinstance(extra, Mapping) else None
        if not isinstance(spec, Mapping):
            raise ValueError(f"{path}: row {number} has no extra_info['env'] spec")
        episode_id = str(spec.get("id") or f"{record.get('data_source', 'row')}-{extra.get('index', number)}")
        if episode_id in seen:
            raise ValueError(f"{path}: episode id {episode_id!r} occurs twice; ids must be unique to resume safely")
        seen.add(episode_id)
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in record["prompt"]]
        rows.append(
            EpisodeRow(episode_id, int(extra.get("index", number)), str(record.get("data_source", "")), messages, dict(spec))
        )
    return rows


class EndpointError(RuntimeError):
    """The policy endpoint failed after all retries: the episode is not a result of the model."""


async def run_episode(
    row: EpisodeRow, policy: Any, config: EvalConfig, simulator: Any = None
) -> dict[str, Any]:
    """Play one episode; the record of ``episodes.jsonl``. Raises :class:`EndpointError` when the
    policy endpoint fails (so the episode is retried later, never scored).

    ``policy`` is an object with ``async chat(messages, *, max_tokens, temperature) -> ChatReply``
    (:class:`verl_selflock.simulators.ChatClient`).
    """
    from verl_selflock.envs import EnvContext, make_env  # imports torch: only when episodes run
    from verl_selflock.envs.parsing import cut_after_first_closing_tag

    start = time.perf_counter()
    context = EnvContext(simulator=simulator, training=False, withhold_feedback=config.feedback == "unknown")
    env = make_env(row.spec, context=context)
    messages = list(row.messages)
    stats = EpisodeStats(task=env.task)
    transcript: list[dict[str, Any]] = []
    while True:
        reply = await policy.chat(messages, max_tokens=config.max_tokens, temperature=config.temperature)
        if reply.ok:
            text = reply.text or ""
        elif reply.error == "empty":
            text = ""  # the model said nothing: a (bad) turn of the model, judged like any other
        else:
            raise EndpointError(f"policy endpoint failed at turn {stats.turns + 1}: {reply.error}")
        cut, tag = cut_after_first_closing_tag(text, env.closing_tags)  # the task's turn format, as in training
        planned_round = env.next_round().value
        step = await env.step(cut)
        stats.turns += 1
        round_kind = stats.count_step(planned_round, step, closing_tag=tag)  # an early <answer> is the answer turn
        transcript.append(
            {
                "turn": stats.turns,
                "round": round_kind,
                "text": cut,
                "dropped_chars": len(text) - len(cut),
                "critique": int(step.label.critique),
                "channel": int(step.label.channel),
                "valid": bool(step.valid),
                "repeated": bool(step.repeated),
                "observation": step.observation,
                "info": to_jsonable(step.info),
            }
        )
        messages.append({"role": "assistant", "content": cut})
        if step.done or tag == "answer":
            stats.stop_reason = STOP_ANSWER if tag == "answer" else STOP_DONE
            break
        if stats.turns >= env.max_turns:
            stats.stop_reason = STOP_MAX_TURNS
            break
        if not step.observation:
            stats.stop_reason = STOP_DONE
            break
        messages.append({"role": "user", "content": step.observation})
    result = env.result()
    stats.reward, stats.success, stats.answered = float(result.reward), bool(result.success), bool(result.answered)
    stats.env_metrics = dict(result.metrics)
    record: dict[str, Any] = {
        "id": row.id,
        "index": row.index,
        "data_source": row.data_source,
        "task": env.task,
        "reward": stats.reward,
        "success": stats.success,
        "answered": stats.answered,
        "turns": stats.turns,
        "stop_reason": stats.stop_reason,
        "stats": stats.as_extra_fields(),
        "transcript": transcript,
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
    if config.oracle_bt:
        record["oracle_bt"] = ORACLE_BT[env.task](row.spec, transcript)
    return record


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


def summarize_run(out: str | os.PathLike, selected_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Summary of the finished episodes in ``out/episodes.jsonl`` (restricted to ``selected_ids``)."""
    out = Path(out)
    records = {str(r["id"]): r for r in EpisodeStore(out / EPISODES_FILE).records()}
    if selected_ids is not None:
        wanted = set(selected_ids)
        records = {key: value for key, value in records.items() if key in wanted}
    stats = [EpisodeStats.from_extra_fields(r.get("stats")) for r in records.values()]
    counts = [counts_of(s) for s in stats if s is not None]
    summary: dict[str, Any] = {
        "settings": json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).exists() else {},
        "episodes": len(counts),
        "selected": len(selected_ids) if selected_ids is not None else len(counts),
        "metrics": {name: estimate.as_dict() for name, estimate in summarize(counts).items()},
    }
    summary["missing"] = summary["selected"] - summary["episodes"]
    oracle = [r for r in records.values() if isinstance(r.get("oracle_bt"), Mapping)]
    if oracle:
        summary["oracle_bt"] = _masking(oracle)
    return summary


def _masking(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Correlation of AS quality with reward under the agent's BT and under the oracle's."""
    as_quality, agent_reward, oracle_reward = [], [], []
    for record in records:
        stats = record["stats"]
        rounds = stats.get("selflock_action_rounds", 0)
        if not rounds:
            continue
        as_quality.append(stats.get("selflock_as_pos", 0) / rounds)
        agent_reward.append(float(record["reward"]))
        oracle_reward.append(float(record["oracle_bt"]["reward"]))
    n = len(as_quality)

    def side(rewards: list[float]) -> dict[str, Any]:
        low, high = wilson_interval(sum(rewards), n)
        return {"success_rate": sum(rewards) / n if n else math.nan, "ci_low": low, "ci_high": high,
                "corr_as_quality_reward": pearson(as_quality, rewards)}

    return {
        "episodes": n,
        "agent_bt": side(agent_reward),
        "oracle_bt": side(oracle_reward),
        "note": "Pearson correlation over episodes between the share of AS +1 queries and the reward; "
        "NaN when fewer than 3 episodes or a side is constant.",
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The summary as a table for the terminal."""
    lines = [f"episodes: {summary['episodes']} of {summary['selected']} selected"
             + (f" ({summary['missing']} not finished: run the command again to retry them)" if summary.get("missing") else "")]
    lines.append(f"{'metric':<22}{'value':>9}   95% CI")
    for name, est in summary["metrics"].items():
        lines.append(f"{name:<22}{est['value']:>9.4f}   [{_num(est['ci_low'])}, {_num(est['ci_high'])}] ({est['ci']})")
    masking = summary.get("oracle_bt")
    if masking:
        lines.append(f"oracle-BT masking analysis over {masking['episodes']} episodes:")
        for key, label in (("agent_bt", "agent's BT"), ("oracle_bt", "oracle BT")):
            side = masking[key]
            lines.append(
                f"  {label:<11} success {side['success_rate']:.4f} [{_num(side['ci_low'])}, {_num(side['ci_high'])}]"
                f"  corr(AS quality, reward) {_num(side['corr_as_quality_reward'])}"
            )
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.4f}"


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
