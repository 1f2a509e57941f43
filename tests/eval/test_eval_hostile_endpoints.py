"""``verl-selflock eval`` on MediQ against misbehaving OpenAI-compatible servers on 127.0.0.1.

The simulated patient and the policy are real HTTP servers (:class:`fixtures.openai_servers.FaultServer`)
reached through the real clients. A dead, garbage, failing or hanging endpoint is refused by the
pre-flight call before any episode; a simulator that fails later is counted in ``summary.json`` and the
table, and above ``--max-sim-failure-rate`` the run is marked invalid and exits 3.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path

import pytest
from fixtures.mediq_rows import official_row
from fixtures.openai_servers import FaultServer, down_url, error_response

from verl_selflock.cli import main
from verl_selflock.errors import UserError
from verl_selflock.eval import runner
from verl_selflock.eval.summary import INVALID_RUN_EXIT

EPISODES = 4
QUERIES_PER_EPISODE = 3  # turns 1, 3, 5 ask the patient; 2, 4, 6 guess; 7 answers (MediQ allows 8)
SIM_CALLS = EPISODES * QUERIES_PER_EPISODE
FAST = ["--timeout", "2", "--retries", "0", "--simulator-timeout", "0.3", "--simulator-retries", "0",
        "--concurrency", str(EPISODES), "--no-progress"]


@pytest.fixture(scope="module")
def mediq_test_file(tmp_path_factory) -> str:
    from verl_selflock.data.mediq import build_mediq_dataset

    folder = tmp_path_factory.mktemp("mediq")
    source = folder / "mediq.jsonl"
    source.write_text("".join(json.dumps(official_row(i, answer="B")) + "\n" for i in range(EPISODES + 1)))
    paths, _ = build_mediq_dataset([source], folder / "data", n_val=EPISODES, progress=False)
    return paths["test"]


def mediq_turn(body: dict, number: int) -> str:
    """A scripted MediQ policy, turn by turn (the pre-flight call is answered like a first turn)."""
    turn = sum(m["role"] == "assistant" for m in body["messages"]) + 1
    if turn >= 7:
        return "<answer>0,1,0,0</answer>"
    if turn % 2 == 1:
        return f"<interact>Query: Question number {turn} about the pain?</interact>"
    return "<interact>Guess: 1,2,1,1</interact>"


def eval_cli(argv: list[str]) -> int:
    """The eval command through its own module, so that a UserError reaches the test as raised."""
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    return runner.run(parser.parse_args(argv))


def _args(data: str, out: Path, policy_url: str, sim_url: str) -> list[str]:
    return ["--data", data, "--out", str(out), "--base-url", policy_url, "--model", "policy",
            "--simulator-url", sim_url, "--simulator-model", "patient", *FAST]


async def _hang(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "1"


def _nothing_started(out: Path) -> None:
    assert not (out / "run.json").exists() and not (out / "episodes.jsonl").exists()


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("error500", r"HTTP 500 with '\{\"error\": \{\"message\": \"boom\"\}\}'"),
        ("garbage", r"a body that is not JSON \(application/json.*\): '<html>definitely not json</html>'"),
        ("html", r"a body that is not JSON \(text/html.*\): '<!DOCTYPE html> <html><body><h1>Welcome to nginx!"),
        ("wrong_schema", r"JSON that is not a chat completion \(no choices\[0\]\.message\.content\): '\{\"status\""),
        ("slow", r"no answer within 0\.3 s"),
    ],
)
def test_a_broken_simulator_is_refused_before_any_episode(mediq_test_file, tmp_path, mode, said):
    out = tmp_path / "out"
    with FaultServer("script", handler=mediq_turn) as policy, FaultServer(mode, delay_s=1.0) as patient:
        with pytest.raises(UserError) as refused:
            eval_cli(_args(mediq_test_file, out, policy.base_url, patient.base_url))
        assert len(policy.requests) == 1 and len(patient.requests) == 1  # the two pre-flight calls, nothing else
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--simulator-url {patient.base_url}: ")
    assert "model 'patient'" in message and re.search(said, message), message
    _nothing_started(out)


def test_a_dead_simulator_or_policy_is_refused_naming_its_url(mediq_test_file, tmp_path):
    out = tmp_path / "out"
    dead = down_url()
    refused = pytest.raises(UserError, match=rf"^--simulator-url {re.escape(dead)}: .* got ConnectError")
    with FaultServer("script", handler=mediq_turn) as policy, refused:
        eval_cli(_args(mediq_test_file, out, policy.base_url, dead))
    with FaultServer("ok", reply="1") as patient:
        with pytest.raises(UserError, match=rf"^--base-url {re.escape(dead)}: .* got ConnectError"):
            eval_cli(_args(mediq_test_file, out, dead, patient.base_url))
        assert patient.requests == []  # the policy is checked first: nothing reached the patient
    _nothing_started(out)


def test_a_wrong_model_name_is_refused_with_what_the_server_said(mediq_test_file, tmp_path):
    """A server that serves another model answers 404 with its reason; the refusal quotes it."""
    def only_the_patient(body: dict, number: int):
        if body["model"] != "patient":
            return error_response(404)
        return "1"

    with FaultServer("script", handler=mediq_turn) as policy, FaultServer("script", handler=only_the_patient) as sim:
        args = _args(mediq_test_file, tmp_path / "out", policy.base_url, sim.base_url)
        args[args.index("--simulator-model") + 1] = "patinet"
        with pytest.raises(UserError, match=r"model 'patinet'\) got HTTP 404 with '\{\"error\""):
            eval_cli(args)


def _run_with_patient(mediq_test_file: str, out: Path, handler, *extra: str) -> tuple[int, dict, int]:
    """The CLI with the scripted policy and a patient answering as ``handler`` says: (exit code, summary,
    requests the patient got, the pre-flight call included)."""
    with FaultServer("script", handler=mediq_turn) as policy, FaultServer("script", handler=handler) as patient:
        code = main(["eval", *_args(mediq_test_file, out, policy.base_url, patient.base_url), *extra])
    return code, json.loads((out / "summary.json").read_text()), len(patient.requests)


def test_simulator_failures_are_counted_and_above_the_threshold_invalidate_the_run(mediq_test_file, tmp_path, capsys):
    """The patient answers the pre-flight call, then fails two of its twelve calls (a 500 and an HTML
    page): 2/12 = 16.7% > 5% -> exit 3, ``valid: false`` with the reason, the count in the table."""
    def two_failures(body: dict, number: int):
        if number == 3:
            return error_response(500)
        if number == 7:
            return _html()
        return "1"

    code, summary, requests = _run_with_patient(mediq_test_file, tmp_path / "strict", two_failures)
    assert requests == 1 + SIM_CALLS
    assert code == INVALID_RUN_EXIT
    sim = summary["simulator"]
    assert (sim["calls"], sim["failures"], sim["max_failure_rate"]) == (SIM_CALLS, 2, 0.05)
    assert sim["failure_rate"] == pytest.approx(2 / SIM_CALLS) and 1 <= sim["episodes_with_failures"] <= 2
    assert summary["valid"] is False and "failed 2 of 12 calls (16.7%)" in summary["invalid_reason"]
    assert summary["episodes"] == EPISODES and summary["missing"] == 0  # scored, but not a result of the model
    captured = capsys.readouterr()
    assert captured.out.startswith("INVALID RUN: the simulated user failed 2 of 12 calls")
    assert "simulator: 2 of 12 calls failed (16.7%, at most 5.0% allowed)" in captured.out
    assert "invalid run:" in captured.err

    # The same faults under a looser threshold: a valid run that still reports them.
    code, summary, _ = _run_with_patient(mediq_test_file, tmp_path / "loose", two_failures,
                                         "--max-sim-failure-rate", "0.2")
    assert code == 0 and summary["valid"] is True and summary["invalid_reason"] is None
    assert summary["simulator"]["failures"] == 2
    assert "simulator: 2 of 12 calls failed (16.7%, at most 20.0% allowed)" in capsys.readouterr().out


def _html():
    from aiohttp import web

    return web.Response(text="<html><body>502 Bad Gateway</body></html>", content_type="text/html")


def test_a_simulator_that_hangs_after_the_preflight_invalidates_the_run(mediq_test_file, tmp_path):
    """Every call after the pre-flight one outlives the client's timeout: all twelve fail, none is
    answered, the run is invalid (before, the table showed a normal-looking score)."""
    code, summary, requests = _run_with_patient(
        mediq_test_file, tmp_path / "out", lambda body, n: "1" if n == 1 else _hang(0.8)
    )
    assert code == INVALID_RUN_EXIT and requests == 1 + SIM_CALLS
    assert (summary["simulator"]["calls"], summary["simulator"]["failures"]) == (SIM_CALLS, SIM_CALLS)
    assert summary["simulator"]["episodes_with_failures"] == EPISODES and summary["valid"] is False
    records = [json.loads(line) for line in (tmp_path / "out" / "episodes.jsonl").read_text().splitlines()]
    asks = [turn for record in records for turn in record["transcript"] if turn["round"] == "action"]
    assert len(asks) == SIM_CALLS and all(turn["info"]["sim_error"] == "timeout" for turn in asks)


def test_a_healthy_simulator_gives_a_valid_run_with_its_calls_counted(mediq_test_file, tmp_path):
    code, summary, requests = _run_with_patient(mediq_test_file, tmp_path / "out", lambda body, n: "1")
    assert code == 0 and summary["valid"] is True and requests == 1 + SIM_CALLS
    assert (summary["simulator"]["calls"], summary["simulator"]["failures"]) == (SIM_CALLS, 0)


@pytest.mark.parametrize(
    ("flag", "value", "said"),
    [
        ("--max-sim-failure-rate", "1.5", "--max-sim-failure-rate must be in"),
        ("--max-sim-failure-rate", "nan", "--max-sim-failure-rate must be in"),
        ("--simulator-timeout", "0", "--simulator-timeout must be > 0"),
        ("--simulator-retries", "-1", "--simulator-retries must be >= 0"),
        ("--simulator-url", "localhost:8000", "--simulator-url: must be an http"),
    ],
)
def test_bad_simulator_options_are_refused(mediq_test_file, tmp_path, flag, value, said):
    args = _args(mediq_test_file, tmp_path / "out", "http://127.0.0.1:9/v1", "http://127.0.0.1:9/v1")
    with pytest.raises(UserError, match=re.escape(said)):
        eval_cli([*args, flag, value])
    _nothing_started(tmp_path / "out")
