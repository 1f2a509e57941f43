"""``verl-selflock eval``: resumable episodes, endpoint failures, the feedback ablation, oracle BT,
and end to end against a real ``transformers serve`` with SmolLM2-135M-Instruct (killed and resumed)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.mediq_rows import official_row
from fixtures.openai_servers import FaultServer, error_response

from verl_selflock.cli import main
from verl_selflock.data.pe import build_pe_dataset
from verl_selflock.errors import UserError
from verl_selflock.eval import runner
from verl_selflock.eval.runner import EvalConfig, evaluate, format_summary
from verl_selflock.simulators import ChatReply

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pe_test_file(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("pe_data")
    return build_pe_dataset("gated", 3, 0, 6, seed=0, out_dir=out, progress=False)["test"]


class ScriptedPolicy:
    """A policy with the ChatClient interface that asks pairs 1,2 / 3,4 / ... with focus 1,2,3,
    guesses equal weights and answers them (it ignores the feedback)."""

    def __init__(self) -> None:
        self.seen_observations: list[str] = []

    async def chat(self, messages, *, max_tokens=None, temperature=None, **_):
        self.seen_observations += [m["content"] for m in messages[-1:] if m["role"] == "user"]
        turn = sum(m["role"] == "assistant" for m in messages) + 1
        if turn == 10:
            return ChatReply("<scratch>done</scratch><answer>1,1,1,2,2,2</answer>", ok=True)
        if turn % 2 == 1:
            i = turn
            return ChatReply(f"<scratch>ask</scratch><interact>\nFocus: 1,2,3\nPair: {i},{i + 1}\n</interact> extra", ok=True)
        return ChatReply("<interact>Guess: 1,1,1,1,1,1</interact>", ok=True)


def eval_cli(argv: list[str]) -> int:
    """``verl-selflock eval ARGV`` through the eval module itself: a user mistake raises its UserError here
    (the top-level CLI prints it as one line, which is the CLI's own test)."""
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    return runner.run(parser.parse_args(argv))


def _ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def test_feedback_ablation_and_oracle_bt(pe_test_file, tmp_path):
    policy = ScriptedPolicy()
    config = EvalConfig(data=pe_test_file, out=str(tmp_path / "unknown"), base_url="http://unused/v1", model="scripted",
                        feedback="unknown", oracle_bt=True, max_episodes=3, progress=False)
    summary = asyncio.run(evaluate(config, policy=policy))
    assert summary["episodes"] == 3 and summary["missing"] == 0
    feedback = [o.splitlines()[0] for o in policy.seen_observations if o.startswith("The feedback")]
    assert feedback and all(line == "The feedback of your latest query: Unknown." for line in feedback)
    metrics = summary["metrics"]
    assert metrics["info_gain_per_action"]["value"] == 0.0  # nothing was revealed
    assert metrics["turns"]["value"] == 10 and metrics["finish_ratio"]["value"] == 1.0
    assert metrics["success_rate"]["ci"] == "wilson" and metrics["as_proxy"]["ci"] == "bootstrap"
    masking = summary["oracle_bt"]
    assert masking["episodes"] == 3 and set(masking["agent_bt"]) >= {"success_rate", "corr_as_quality_reward"}
    records = [json.loads(line) for line in (tmp_path / "unknown" / "episodes.jsonl").read_text().splitlines()]
    # With every answer withheld the oracle learns nothing: its belief is the prior mean.
    assert all(r["oracle_bt"]["answers_used"] == 0 for r in records)
    assert records[0]["transcript"][0]["dropped_chars"] == len(" extra")  # cut after the first closing tag

    real = EvalConfig(data=pe_test_file, out=str(tmp_path / "real"), base_url="http://unused/v1", model="scripted",
                      oracle_bt=True, max_episodes=3, progress=False)
    summary = asyncio.run(evaluate(real, policy=ScriptedPolicy()))
    assert summary["metrics"]["info_gain_per_action"]["value"] > 0
    assert all(json.loads(line)["oracle_bt"]["answers_used"] > 0
               for line in (tmp_path / "real" / "episodes.jsonl").read_text().splitlines())
    assert "oracle BT" in format_summary(summary)


def test_endpoint_failures_are_retried_on_resume_never_scored(pe_test_file, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--data", pe_test_file, "--out", str(out), "--model", "m", "--max-episodes", "4",
            "--retries", "0", "--concurrency", "2", "--no-progress"]
    # The endpoint passes the pre-flight call, then fails every turn.
    with FaultServer("script", handler=lambda body, n: "ok" if n == 1 else error_response(500)) as server:
        assert main([*args, "--base-url", server.base_url]) == 2  # nothing finished: asks for a rerun
    assert not (out / "episodes.jsonl").exists() or _ids(out / "episodes.jsonl") == []
    assert len(_ids(out / "errors.jsonl")) == 4
    assert json.loads((out / "summary.json").read_text())["missing"] == 4
    assert "run the command again" in capsys.readouterr().out

    # The endpoint is back (it answers every turn with an early answer): the same command resumes.
    with FaultServer("ok", reply="<scratch>x</scratch><answer>1,1,1,2,2,2</answer>") as server:
        assert main([*args, "--base-url", server.base_url]) == 0
        ids = _ids(out / "episodes.jsonl")
        assert len(ids) == 4 == len(set(ids))
        assert main([*args, "--base-url", server.base_url]) == 0  # nothing left to do
        assert len(server.requests) == 2 + 4  # a pre-flight call per run, one turn per episode, none replayed
    assert _ids(out / "episodes.jsonl") == ids
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 4 and summary["metrics"]["turns"]["value"] == 1.0
    with pytest.raises(UserError, match="other settings"):
        eval_cli([*args[1:], "--base-url", "http://127.0.0.1:9/v1", "--feedback", "unknown"])


def _kill_after_first_episode(command: list[str], episodes, timeout_s: float) -> list[str]:
    """Run the CLI ``command`` in a subprocess, SIGKILL it once ``episodes`` holds a finished episode (or
    after ``timeout_s``); the ids written by then."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and run.poll() is None:
        if episodes.exists() and episodes.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait(10)
    return _ids(episodes)


def test_killed_run_resumes_without_losing_or_duplicating_episodes(pe_test_file, tmp_path, capsys):
    """The real CLI in a subprocess against a real HTTP endpoint (slow replies, an early answer each):
    SIGKILL after the first finished episode, run the same command again, every episode exactly once."""
    out = tmp_path / "eval"
    episodes = out / "episodes.jsonl"
    with FaultServer("slow", reply="<answer>1,1,1,2,2,2</answer>", delay_s=0.3) as server:
        command = [sys.executable, "-m", "verl_selflock.cli", "eval", "--data", pe_test_file, "--out", str(out),
                   "--base-url", server.base_url, "--model", "m", "--concurrency", "2", "--no-progress"]
        done_before = _kill_after_first_episode(command, episodes, timeout_s=60)
        assert 1 <= len(done_before) < 6
        # The same command again (in this process: a second interpreter start-up costs seconds).
        assert main(command[3:]) == 0
    ids = _ids(episodes)
    assert len(ids) == 6 == len(set(ids)) and ids[: len(done_before)] == done_before
    assert json.loads((out / "summary.json").read_text())["episodes"] == 6
    assert "success_rate" in capsys.readouterr().out


@pytest.mark.slow
def test_eval_end_to_end_against_real_transformers_serve(chat_server, tmp_path):
    """Three PE-G episodes of SmolLM2-135M-Instruct behind `transformers serve` (the real model, prompts,
    parser and environment), with the oracle-BT replay: the CLI in a subprocess is killed after its first
    finished episode, the same command run again finishes the rest, every episode exactly once; the
    table and summary.json."""
    data = build_pe_dataset("gated", 3, 0, 3, seed=0, out_dir=tmp_path / "data", max_turns=2, progress=False)["test"]
    out = tmp_path / "eval"
    episodes = out / "episodes.jsonl"
    args = ["eval", "--data", data, "--out", str(out), "--base-url", chat_server.base_url,
            "--model", chat_server.model, "--max-tokens", "24", "--concurrency", "1", "--no-progress", "--oracle-bt"]
    done_before = _kill_after_first_episode([sys.executable, "-m", "verl_selflock.cli", *args], episodes, timeout_s=120)
    assert 1 <= len(done_before) < 3, "the run was not interrupted mid-way"
    assert main(args) == 0
    ids = _ids(episodes)
    assert len(ids) == 3 == len(set(ids)) and ids[: len(done_before)] == done_before
    records = [json.loads(line) for line in episodes.read_text().splitlines()]
    assert {r["task"] for r in records} == {"pe"}
    for record in records:
        assert record["transcript"][0]["round"] == "action" and 1 <= record["turns"] <= 2
        assert record["stats"]["selflock_action_rounds"] == 1  # the Action round was judged
        assert "reward" in record["oracle_bt"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 3 and summary["missing"] == 0 and summary["settings"]["model"] == chat_server.model
    assert {"success_rate", "as_proxy", "turns", "invalid_ratio", "finish_ratio"} <= set(summary["metrics"])


class MediQPolicy:
    """Asks one question, guesses, then answers option B (ChatClient interface)."""

    async def chat(self, messages, *, max_tokens=None, temperature=None, **_):
        turn = sum(m["role"] == "assistant" for m in messages) + 1
        if turn == 1:
            return ChatReply("<scratch>ask</scratch><interact>Query: Any pain?</interact> trailing", ok=True)
        if turn == 2:
            return ChatReply("<interact>Guess: 1,2,1,1</interact>", ok=True)
        return ChatReply("<answer>0,1,0,0</answer>", ok=True)


class Patient:
    """The simulated patient behind the ChatClient interface: always names fact 1."""

    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, messages, *, cache_key=None, **_):
        self.calls += 1
        return ChatReply("1", ok=True)


def test_simulator_tasks_evaluate_with_the_feedback_ablation(tmp_path):
    """MediQ through eval: the patient endpoint is used, its feedback withheld; critiques as usual."""
    from verl_selflock.data.mediq import build_mediq_dataset

    source = tmp_path / "mediq.jsonl"
    source.write_text("".join(json.dumps(official_row(i, answer="B")) + "\n" for i in range(3)))
    paths, _ = build_mediq_dataset([source], tmp_path / "mediq", n_val=2, progress=False)
    patient = Patient()
    config = EvalConfig(data=paths["test"], out=str(tmp_path / "out"), base_url="http://unused/v1", model="scripted",
                        feedback="unknown", progress=False)
    summary = asyncio.run(evaluate(config, policy=MediQPolicy(), simulator=patient))
    assert summary["episodes"] == 2 and patient.calls == 2
    records = [json.loads(line) for line in (tmp_path / "out" / "episodes.jsonl").read_text().splitlines()]
    for record in records:
        ask = record["transcript"][0]
        assert ask["critique"] == 1 and "Hidden fact" not in ask["observation"]  # judged as usual, withheld
        assert ask["dropped_chars"] == len(" trailing") and record["success"] is True


def test_feedback_ablation_is_refused_for_tasks_without_an_uninformative_reply(tmp_path):
    pytest.importorskip("tau2")
    from verl_selflock.data.tau2 import build_tau2_dataset

    paths = build_tau2_dataset(tmp_path / "tau2", max_rows=1, progress=False)
    config = EvalConfig(data=paths["test"], out=str(tmp_path / "out"), base_url="http://unused/v1", model="m",
                        feedback="unknown", progress=False)
    with pytest.raises(UserError, match="'tau2_telecom' does not support --feedback unknown"):
        asyncio.run(evaluate(config, policy=MediQPolicy()))


class EarlyAnswerPolicy(ScriptedPolicy):
    """Asks, guesses, then answers in the Action round of turn 3."""

    async def chat(self, messages, *, max_tokens=None, temperature=None, **_):
        turn = sum(m["role"] == "assistant" for m in messages) + 1
        if turn == 3:
            return ChatReply("<answer>1,1,1,2,2,2</answer>", ok=True)
        return await super().chat(messages, max_tokens=max_tokens, temperature=temperature)


def test_an_early_answer_is_counted_once_as_the_answer_turn(pe_test_file, tmp_path):
    config = EvalConfig(data=pe_test_file, out=str(tmp_path / "out"), base_url="http://unused/v1", model="m",
                        max_episodes=2, progress=False)
    summary = asyncio.run(evaluate(config, policy=EarlyAnswerPolicy()))
    records = [json.loads(line) for line in (tmp_path / "out" / "episodes.jsonl").read_text().splitlines()]
    for record in records:
        stats = record["stats"]
        assert record["turns"] == 3 and [t["round"] for t in record["transcript"]] == ["action", "update", "answer"]
        assert (stats["selflock_action_rounds"], stats["selflock_update_rounds"]) == (1, 1)
        assert stats["selflock_judged_turns"] == 3
    metrics = summary["metrics"]
    # Every valid query of this policy is informative (AS +1): one Action round each, proxy 1.0, not 1/2.
    assert [r["transcript"][0]["critique"] for r in records] == [1, 1]
    assert metrics["as_proxy"]["value"] == 1.0 and metrics["invalid_ratio"]["value"] == 0.0


@pytest.mark.parametrize("content", [None, "", "  \n"])
def test_an_answered_empty_reply_is_the_models_turn_never_retried(pe_test_file, tmp_path, content):
    """A server that answered 200 with no content ran the model: the empty turn is judged (invalid action)
    and the episode scored; nothing is retried or recorded as an endpoint error."""
    out = tmp_path / "run"
    mode = "empty" if content == "" else "ok"
    with FaultServer(mode, reply=content) as server:
        code = main(["eval", "--data", pe_test_file, "--out", str(out), "--base-url", server.base_url, "--model", "m",
                     "--max-episodes", "2", "--retries", "3", "--no-progress"])
        assert code == 0
        assert len(server.requests) == 1 + 2 * 10  # the pre-flight call; every turn asked once (PE-G: 10 turns)
    assert not (out / "errors.jsonl").exists() or _ids(out / "errors.jsonl") == []
    records = [json.loads(line) for line in (out / "episodes.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["turns"] == 10 and r["answered"] is False for r in records)
    assert all(not turn["valid"] for r in records for turn in r["transcript"])
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    assert metrics["invalid_ratio"]["value"] == 1.0 and metrics["finish_ratio"]["value"] == 0.0


def test_a_failed_check_leaves_no_run_json_behind(pe_test_file, tmp_path):
    """A typo (data path, an option the task does not support, a missing simulator) fails before run.json
    is written, so the corrected command starts the run instead of being refused as "other settings"."""
    from verl_selflock.data.mediq import build_mediq_dataset

    out = tmp_path / "out"
    base = ["--out", str(out), "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--no-progress"]
    with pytest.raises(UserError, match="no such file"):
        eval_cli([*base, "--data", pe_test_file + ".typo"])
    assert not (out / "run.json").exists()
    with pytest.raises(UserError, match="--base-url: must be an http"):
        eval_cli([*base[:3], "localhost:8000", *base[4:], "--data", pe_test_file])
    assert not (out / "run.json").exists()

    source = tmp_path / "mediq.jsonl"
    source.write_text("".join(json.dumps(official_row(i, answer="B")) + "\n" for i in range(3)))
    paths, _ = build_mediq_dataset([source], tmp_path / "mediq", n_val=2, progress=False)
    with pytest.raises(UserError, match="--oracle-bt is available for tasks"):
        eval_cli([*base, "--data", paths["test"], "--oracle-bt"])
    assert not (out / "run.json").exists()
    config = EvalConfig(data=paths["test"], out=str(out), base_url="http://unused/v1", model="m", progress=False)
    with pytest.raises(UserError, match="needs a simulated patient"):
        asyncio.run(evaluate(config, policy=MediQPolicy()))  # forgot --simulator-url
    assert not (out / "run.json").exists()

    # The corrected command runs (and a MediQ answer's psi is no belief update: one Update round, one delta).
    patient = Patient()
    summary = asyncio.run(evaluate(config, policy=MediQPolicy(), simulator=patient))
    assert summary["episodes"] == 2 and json.loads((out / "run.json").read_text())["model"] == "m"
    for line in (out / "episodes.jsonl").read_text().splitlines():
        record = json.loads(line)
        answer = record["transcript"][-1]
        assert answer["round"] == "answer" and "psi" not in answer["info"] and "answer_psi" in answer["info"]
        assert record["stats"]["selflock_psi_delta_count"] == 1
