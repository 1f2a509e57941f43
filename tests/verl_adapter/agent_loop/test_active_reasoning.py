"""The ``active_reasoning`` agent loop, built as veRL builds it, driven by scripted policies.

Expected responses are written out segment by segment from hand-written template strings (not from
the code under test), then compared token for token: ids, response_mask, log-probs, turn ids and
critiques. A second check re-renders the whole conversation with the tokenizer's chat template and
requires ``prompt_ids + response_ids`` to equal it, which proves every assistant message is closed
the way the template closes it and every observation is a complete user message.
"""

from __future__ import annotations

import asyncio

import pytest
from fixtures.harness import (
    AGENT,
    INSTRUCTION,
    SYSTEM,
    Expected,
    build_loop,
    run_episode,
    scripted_row,
)
from fixtures.scripted_env import ScriptedEnv
from fixtures.servers import ABORTED, ScriptedServer, scripted_logprob

from verl_selflock.contracts import episode as ef
from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, CHANNEL_NONE, CRITIQUE_FIELDS, iter_turn_labels

IM_END = "<|im_end|>"


def enc(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def chatml_obs(tokenizer, text: str) -> list[int]:
    """A ChatML user message followed by the next assistant header, written out by hand."""
    return enc(tokenizer, f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def kept_prefix(server: ScriptedServer, turn: int, tokenizer, text: str) -> list[int]:
    """The script's first tokens that spell ``text`` (asserting the script tokenizes that way)."""
    ids = server.script_ids(turn)
    expect = enc(tokenizer, text)
    assert ids[: len(expect)] == expect, "test script: the kept text must be a token prefix of the turn"
    return expect


def logprobs(turn: int, n: int) -> list[float]:
    return [scripted_logprob(turn, j) for j in range(n)]


def assert_matches(output, expected: Expected) -> None:
    fields = output.extra_fields
    assert output.response_ids == expected.ids
    assert output.response_mask == expected.mask
    assert fields["turn_ids"] == expected.turn_ids
    assert fields["critique"] == expected.critique
    assert fields["critique_channel"] == expected.channel
    assert output.response_logprobs == pytest.approx(expected.logprobs)
    for key in CRITIQUE_FIELDS:
        assert len(fields[key]) == len(output.response_ids), key


def assert_prompts_are_prefixes(server: ScriptedServer, output, header: list[int]) -> None:
    """Every generation saw exactly the sequence built so far, ending with an assistant header."""
    full = output.prompt_ids + output.response_ids
    for call in server.calls:
        assert call.prompt_ids == full[: len(call.prompt_ids)]
        assert call.prompt_ids[-len(header) :] == header


# --------------------------------------------------------------------------- ChatML, exact layout


CHATML_SCRIPT = [
    # 1. tag then junk then eos: the junk and the eos are dropped, the template closes the message
    "<scratch>think</scratch><interact>Pair: 1,2</interact> trailing junk that must go<|im_end|>",
    # 2. tag immediately followed by the model's own <|im_end|>: that token is the model's, kept
    "<interact>Guess: 0.5,0.5</interact><|im_end|>",
    # 3. no tag, natural end: an invalid action, the whole turn is kept
    "I am not sure what to do<|im_end|>",
    # 4. answer, then more text and no eos (the server hit nothing): cut after </answer>
    "<scratch>ok</scratch><answer>1,2</answer> and then more words",
]


@pytest.mark.parametrize("hf_model_type", [None, "qwen2"])
def test_chatml_layout_is_exact(make_config, chatml_tokenizer, hf_model_type):
    """Turn ids, mask, critiques and log-probs line up with each turn's tokens; text after the tag is
    dropped; observations are masked with turn id -1. ``qwen2`` selects veRL's Qwen Continuous Token
    builder (which inserts a newline after a bare <|im_end|>): the result must be identical."""
    tok = chatml_tokenizer
    im_end, nl = tok.convert_tokens_to_ids(IM_END), enc(tok, "\n")
    server = ScriptedServer(tok, CHATML_SCRIPT, stop_ids={im_end}, global_steps=[5, 5, 6, 7])
    loop, out = run_episode(make_config(), server, tok, scripted_row(), hf_model_type=hf_model_type)

    k0 = kept_prefix(server, 0, tok, "<scratch>think</scratch><interact>Pair: 1,2</interact>")
    k1 = kept_prefix(server, 1, tok, "<interact>Guess: 0.5,0.5</interact>") + [im_end]
    k2 = kept_prefix(server, 2, tok, "I am not sure what to do") + [im_end]
    k3 = kept_prefix(server, 3, tok, "<scratch>ok</scratch><answer>1,2</answer>")
    exp = Expected()
    exp.turn(0, k0, +1, CHANNEL_AS, logprobs(0, len(k0)))
    exp.context([im_end, *nl])
    exp.context(chatml_obs(tok, "Feedback 1."))
    exp.turn(1, k1, +1, CHANNEL_BT, logprobs(1, len(k1)))
    exp.context(nl)
    exp.context(chatml_obs(tok, "Feedback 2."))
    exp.turn(2, k2, -1, CHANNEL_AS, logprobs(2, len(k2)))
    exp.context(nl)
    exp.context(chatml_obs(tok, "Feedback 3."))
    exp.turn(3, k3, 0, CHANNEL_NONE, logprobs(3, len(k3)))
    exp.context([im_end, *nl])
    assert_matches(out, exp)

    # The environment saw each turn cut right after its tag, nothing after it.
    (env,) = ScriptedEnv.instances
    assert env.received == [
        "<scratch>think</scratch><interact>Pair: 1,2</interact>",
        "<interact>Guess: 0.5,0.5</interact>",
        "I am not sure what to do",
        "<scratch>ok</scratch><answer>1,2</answer>",
    ]
    assert "junk" not in tok.decode(out.response_ids) and "more words" not in tok.decode(out.response_ids)

    # The token sequence is exactly the chat template's rendering of the conversation.
    conversation = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": INSTRUCTION},
        {"role": "assistant", "content": env.received[0]},
        {"role": "user", "content": "Feedback 1."},
        {"role": "assistant", "content": env.received[1]},
        {"role": "user", "content": "Feedback 2."},
        {"role": "assistant", "content": env.received[2]},
        {"role": "user", "content": "Feedback 3."},
        {"role": "assistant", "content": env.received[3]},
    ]
    rendered = tok.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert out.prompt_ids + out.response_ids == list(rendered)
    assert_prompts_are_prefixes(server, out, enc(tok, "<|im_start|>assistant\n"))

    # Per-turn max_tokens: the per-turn cap (512) while the budget allows it.
    assert [c.sampling_params["max_tokens"] for c in server.calls] == [512] * 4
    assert all(c.sampling_params["logprobs"] for c in server.calls)

    # Tags from the server (trap 1), outcome, counters.
    f = out.extra_fields
    assert (f["global_steps"], f["min_global_steps"], f["max_global_steps"]) == (5, 5, 7)
    assert f[ef.REWARD] == 1.0 and f[ef.SUCCESS] is True and f[ef.ANSWERED] is True
    assert f[ef.TURNS] == 4 and f[ef.INVALID_ACTIONS] == 1 and f[ef.REPEATED_ACTIONS] == 0
    assert (f[ef.AS_POS], f[ef.AS_NEG], f[ef.BT_POS], f[ef.BT_NEG]) == (1, 1, 1, 0)
    assert (f[ef.ACTION_ROUNDS], f[ef.UPDATE_ROUNDS]) == (2, 1)  # turns 1, 3 / turn 2; turn 4 answers
    assert f[ef.TRUNCATED] is False and f[ef.STOP_REASON] == ef.STOP_ANSWER
    assert f[ef.TASK] == "scripted_test" and f[ef.ENV_METRICS] == {"scripted_turns": 4.0}
    assert out.reward_score is None  # the reward manager is the official path
    assert out.num_turns == 1 + 4 + 3
    labels = dict(iter_turn_labels(f))
    assert [labels[t].critique for t in range(4)] == [1, 1, -1, 0]


def test_repeat_and_max_turns_without_answer(make_config, chatml_tokenizer):
    """A repeated action is counted and critiqued -1; an episode that never answers ends at the answer
    turn with reward 0 and ``answered`` False."""
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    script = ["<interact>Pair: 1,2</interact><|im_end|>"] * 2 + ["<interact>Pair: 1,2</interact><|im_end|>"]
    script += ["I give up<|im_end|>"]
    server = ScriptedServer(tok, script, stop_ids={im_end})
    _, out = run_episode(make_config(), server, tok, scripted_row())
    f = out.extra_fields
    labels = dict(iter_turn_labels(f))
    assert [labels[t].critique for t in range(4)] == [1, -1, -1, 0]
    assert f[ef.REPEATED_ACTIONS] == 2 and f[ef.INVALID_ACTIONS] == 1  # the final non-answer
    assert f[ef.ANSWERED] is False and f[ef.REWARD] == 0.0 and f[ef.STOP_REASON] == ef.STOP_DONE


def test_an_early_answer_is_counted_as_the_answer_turn_only(make_config, chatml_tokenizer):
    """<answer> in the Action round of turn 3: one Action and one Update round, three judged turns."""
    tok = chatml_tokenizer
    script = ["<interact>Pair: 1,2</interact><|im_end|>", "<interact>Guess</interact><|im_end|>",
              "<answer>1,2</answer><|im_end|>"]
    server = ScriptedServer(tok, script, stop_ids={tok.convert_tokens_to_ids(IM_END)})
    _, out = run_episode(make_config(), server, tok, scripted_row(max_turns=6))
    f = out.extra_fields
    assert f[ef.TURNS] == 3 and f[ef.STOP_REASON] == ef.STOP_ANSWER and f[ef.REWARD] == 1.0
    assert (f[ef.ACTION_ROUNDS], f[ef.UPDATE_ROUNDS], f[ef.JUDGED_TURNS]) == (1, 1, 3)
    assert (f[ef.AS_POS], f[ef.BT_POS]) == (1, 1)  # as_proxy 1.0, bt_proxy 1.0


# --------------------------------------------------------------------------- per-turn cap, no tag


def test_turn_stopped_by_turn_cap_without_tag(make_config, chatml_tokenizer):
    """A turn that exhausts max_turn_tokens without a tag keeps all its tokens, is closed by the
    template, and is judged by the environment (an invalid action); the episode goes on."""
    tok = chatml_tokenizer
    im_end, nl = tok.convert_tokens_to_ids(IM_END), enc(tok, "\n")
    rambling = "<scratch>" + "a long rambling thought that never ends " * 8
    server = ScriptedServer(tok, [rambling, "<answer>1,2</answer><|im_end|>"], stop_ids={im_end})
    _, out = run_episode(make_config(), server, tok, scripted_row(), knobs={"max_turn_tokens": 12})

    k0 = server.script_ids(0)[:12]
    k1 = kept_prefix(server, 1, tok, "<answer>1,2</answer>") + [im_end]
    exp = Expected()
    exp.turn(0, k0, -1, CHANNEL_AS, logprobs(0, 12))
    exp.context([im_end, *nl])
    exp.context(chatml_obs(tok, "Feedback 1."))
    exp.turn(1, k1, 0, CHANNEL_NONE, logprobs(1, len(k1)))
    exp.context(nl)
    assert_matches(out, exp)
    assert [c.sampling_params["max_tokens"] for c in server.calls] == [12, 12]
    (env,) = ScriptedEnv.instances
    assert env.received[0] == tok.decode(k0)
    f = out.extra_fields
    assert f[ef.INVALID_ACTIONS] == 1 and f[ef.AS_NEG] == 1 and f[ef.TRUNCATED] is False
    assert f[ef.REWARD] == 1.0


# --------------------------------------------------------------------------- observation cap


def test_observation_cap_keeps_template_tokens(make_config, chatml_tokenizer):
    """An over-long observation is cut in its text, not in the templated tokens: the user block still
    opens with <|im_start|>user and closes with <|im_end|> + the next assistant header."""
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    long_obs = "The feedback is " + "very " * 200 + "END."
    marker = " ...(truncated)"
    server = ScriptedServer(
        tok, ["<interact>Pair: 1,2</interact><|im_end|>", "<answer>1,2</answer><|im_end|>"], stop_ids={im_end}
    )
    row = scripted_row(observations=[long_obs])
    _, out = run_episode(make_config(), server, tok, row, knobs={"max_obs_tokens": 24})

    k0 = kept_prefix(server, 0, tok, "<interact>Pair: 1,2</interact>") + [im_end]
    start = len(k0) + 1  # + the template's newline
    end = out.response_mask.index(1, start)  # first generated token of turn 1
    block = out.response_ids[start:end]
    head, tail = enc(tok, "<|im_start|>user\n"), enc(tok, "<|im_end|>\n<|im_start|>assistant\n")
    assert block[: len(head)] == head and block[-len(tail) :] == tail
    content = tok.decode(block[len(head) : -len(tail)])
    assert len(enc(tok, content)) <= 24
    assert content.endswith(marker) and long_obs.startswith(content[: -len(marker)]) and "END" not in content
    assert set(out.response_mask[start:end]) == {0} and set(out.extra_fields["turn_ids"][start:end]) == {-1}
    assert out.extra_fields[ef.OBS_TRUNCATED] == 1

    # Still a well-formed conversation.
    (env,) = ScriptedEnv.instances
    conversation = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": INSTRUCTION},
        {"role": "assistant", "content": env.received[0]},
        {"role": "user", "content": content},
        {"role": "assistant", "content": env.received[1]},
    ]
    assert out.prompt_ids + out.response_ids == list(tok.apply_chat_template(conversation, return_dict=False))


# --------------------------------------------------------------------------- response_length budget


def _turn0_and_obs(tok, server):
    im_end = tok.convert_tokens_to_ids(IM_END)
    k0 = kept_prefix(server, 0, tok, "<interact>Pair: 1,2</interact>") + [im_end]
    return k0, enc(tok, "\n"), chatml_obs(tok, "Feedback 1.")


def test_budget_runs_out_inside_a_turn(make_config, chatml_tokenizer):
    """The last turn gets max_tokens = what is left (minus the closing tokens); when it stops there, the
    turn is closed, not sent to the environment (critique 0), and the episode is marked truncated."""
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    script = ["<interact>Pair: 1,2</interact><|im_end|>", "<scratch>" + "still thinking about it " * 20]
    server = ScriptedServer(tok, script, stop_ids={im_end})
    k0, nl, obs0 = _turn0_and_obs(tok, server)
    budget = len(k0) + len(nl) + len(obs0) + 10 + 2  # room for a 10-token turn + <|im_end|>\n
    config = make_config(**{"actor_rollout_ref.rollout.response_length": budget})
    _, out = run_episode(config, server, tok, scripted_row(), knobs={"max_turn_tokens": 64, "min_turn_tokens": 4})

    exp = Expected()
    exp.turn(0, k0, +1, CHANNEL_AS, logprobs(0, len(k0)))
    exp.context(nl)
    exp.context(obs0)
    exp.turn(1, server.script_ids(1)[:10], 0, CHANNEL_NONE, logprobs(1, 10))
    exp.context([im_end, *nl])
    assert_matches(out, exp)
    assert len(out.response_ids) == budget
    assert [c.sampling_params["max_tokens"] for c in server.calls] == [min(64, budget - 2), 10]
    (env,) = ScriptedEnv.instances
    assert len(env.received) == 1  # the budget-cut turn was not judged
    f = out.extra_fields
    assert f[ef.TRUNCATED] is True and f[ef.STOP_REASON] == ef.STOP_RESPONSE_LENGTH and f[ef.TURNS] == 2
    assert f[ef.REWARD] == 0.0 and f[ef.ANSWERED] is False


def test_no_room_for_the_next_observation(make_config, chatml_tokenizer):
    """If the observation plus a minimal turn would not fit, the observation is not appended: the
    response ends with the closed assistant message."""
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    server = ScriptedServer(tok, ["<interact>Pair: 1,2</interact><|im_end|>"], stop_ids={im_end})
    k0, nl, obs0 = _turn0_and_obs(tok, server)
    budget = len(k0) + len(nl) + len(obs0) + 4 + 2 - 1  # one token short of min_turn_tokens=4 + closing
    config = make_config(**{"actor_rollout_ref.rollout.response_length": budget})
    _, out = run_episode(config, server, tok, scripted_row(), knobs={"min_turn_tokens": 4})

    exp = Expected()
    exp.turn(0, k0, +1, CHANNEL_AS, logprobs(0, len(k0)))
    exp.context(nl)
    assert_matches(out, exp)
    assert len(server.calls) == 1
    f = out.extra_fields
    assert f[ef.TRUNCATED] is True and f[ef.STOP_REASON] == ef.STOP_RESPONSE_LENGTH and f[ef.TURNS] == 1


# --------------------------------------------------------------------------- Llama-3-style template


def test_llama3_template_layout(make_config, llama3_tokenizer):
    """Same loop, another template: the end-of-turn token is <|eot_id|> with no separator after it,
    observations are <|start_header_id|>user<|end_header_id|> blocks."""
    tok = llama3_tokenizer
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    script = [
        "<interact>Pair: 1,2</interact><|eot_id|>",  # own end-of-turn token, kept
        "<interact>Guess: 0.2,0.8</interact>\nmore text<|eot_id|>",  # dropped tail, template closes
        "<answer>1,2</answer><|eot_id|>",
    ]
    server = ScriptedServer(tok, script, stop_ids={eot})
    _, out = run_episode(make_config(), server, tok, scripted_row())

    def obs(text: str) -> list[int]:
        return enc(tok, f"<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>") + enc(
            tok, "<|start_header_id|>assistant<|end_header_id|>\n\n"
        )

    k0 = kept_prefix(server, 0, tok, "<interact>Pair: 1,2</interact>") + [eot]
    k1 = kept_prefix(server, 1, tok, "<interact>Guess: 0.2,0.8</interact>")
    k2 = kept_prefix(server, 2, tok, "<answer>1,2</answer>") + [eot]
    exp = Expected()
    exp.turn(0, k0, +1, CHANNEL_AS, logprobs(0, len(k0)))
    exp.context(obs("Feedback 1."))
    exp.turn(1, k1, +1, CHANNEL_BT, logprobs(1, len(k1)))
    exp.context([eot])
    exp.context(obs("Feedback 2."))
    exp.turn(2, k2, 0, CHANNEL_NONE, logprobs(2, len(k2)))
    assert_matches(out, exp)

    (env,) = ScriptedEnv.instances
    conversation = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": INSTRUCTION},
        {"role": "assistant", "content": env.received[0]},
        {"role": "user", "content": "Feedback 1."},
        {"role": "assistant", "content": env.received[1]},
        {"role": "user", "content": "Feedback 2."},
        {"role": "assistant", "content": env.received[2]},
    ]
    # Text-level equality here, not token-level: this template's generation prompt ends with "\n\n",
    # which SmolLM2's BPE encodes as one token at the end of a string but as two before "<". The
    # prompt the model saw ended with the one-token form and its continuation is kept as generated
    # (token-in, token-out), so re-tokenizing the whole conversation would differ at those seams.
    rendered = tok.apply_chat_template(conversation, tokenize=False)
    assert tok.decode(out.prompt_ids + out.response_ids) == rendered
    assert_prompts_are_prefixes(server, out, enc(tok, "<|start_header_id|>assistant<|end_header_id|>\n\n"))
    assert out.extra_fields[ef.REWARD] == 1.0


# --------------------------------------------------------------------------- configuration and errors


def test_yaml_knobs_reach_the_loop(make_config, chatml_tokenizer):
    server = ScriptedServer(chatml_tokenizer, [])
    knobs = {"max_turn_tokens": 40, "max_obs_tokens": 30, "min_turn_tokens": 5, "max_turns": 6}
    config = make_config(**{"actor_rollout_ref.rollout.multi_turn.max_assistant_turns": 3})

    async def main():
        return await build_loop(config, server, chatml_tokenizer, knobs=knobs)

    loop = asyncio.run(main())
    described = loop.describe_config()
    assert {k: described[k] for k in knobs} == knobs
    assert described["max_assistant_turns"] == 3 and described["response_length"] == 1024
    assert described["end_of_turn_ids"] == enc(chatml_tokenizer, "<|im_end|>\n")


def test_max_assistant_turns_caps_the_episode(make_config, chatml_tokenizer):
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    script = ["<interact>Pair: 1,2</interact><|im_end|>", "<interact>Guess: 1,1</interact>"]
    server = ScriptedServer(tok, script, stop_ids={im_end})
    config = make_config(**{"actor_rollout_ref.rollout.multi_turn.max_assistant_turns": 2})
    _, out = run_episode(config, server, tok, scripted_row())
    assert out.extra_fields[ef.TURNS] == 2 and out.extra_fields[ef.STOP_REASON] == ef.STOP_MAX_TURNS
    assert out.response_ids[-2:] == enc(tok, "<|im_end|>\n")  # the last message is closed


@pytest.mark.parametrize(
    "knobs", [{"max_turn_tokens": 0}, {"max_obs_tokens": -1}, {"max_turns": 3}, {"min_turn_tokens": 0}]
)
def test_bad_knobs_fail_at_construction(make_config, chatml_tokenizer, knobs):
    from hydra.errors import InstantiationException

    async def main():
        return await build_loop(make_config(), ScriptedServer(chatml_tokenizer, []), chatml_tokenizer, knobs=knobs)

    # Hydra wraps the loop's ValueError; the message names the offending knob.
    with pytest.raises(InstantiationException, match=next(iter(knobs))):
        asyncio.run(main())


def test_row_without_env_spec_is_an_error(make_config, chatml_tokenizer):
    row = scripted_row()
    row["extra_info"] = {"index": 0}
    with pytest.raises(ValueError, match=r"extra_info\['env'\]"):
        run_episode(make_config(), ScriptedServer(chatml_tokenizer, []), chatml_tokenizer, row)


def test_server_without_logprobs_is_an_error(make_config, chatml_tokenizer):
    """Rollout log-probs are on by default; a server that drops them is an infrastructure fault."""

    class NoLogprobs(ScriptedServer):
        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            out = await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
            return out.model_copy(update={"log_probs": None})

    server = NoLogprobs(chatml_tokenizer, ["<answer>1,2</answer>"])
    with pytest.raises(RuntimeError, match="log-probs"):
        run_episode(make_config(), server, chatml_tokenizer, scripted_row())


def test_an_aborted_generation_ends_the_episode_cleanly(make_config, chatml_tokenizer):
    """veRL's vLLM server answers a request it aborted (a pause before a weight sync) with no tokens and no
    log-probs: the episode ends there, the turns before it stay as they were, and the abort is counted."""
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    script = ["<interact>Pair: 1,2</interact><|im_end|>", ABORTED]
    server = ScriptedServer(tok, script, stop_ids={im_end})
    _, out = run_episode(make_config(), server, tok, scripted_row())
    f = out.extra_fields
    assert f[ef.STOP_REASON] == ef.STOP_ABORTED and f[ef.ABORTED_GENERATIONS] == 1
    assert (f[ef.TURNS], f[ef.JUDGED_TURNS]) == (1, 1)  # the aborted turn is neither played nor judged
    assert [label.critique for _, label in iter_turn_labels(f)] == [1]
    assert f[ef.REWARD] == 0.0 and f[ef.ANSWERED] is False
    # Nothing of the aborted call entered the response: it ends with the observation after turn 1.
    first = server.calls[0].token_ids
    assert out.response_ids[: len(first)] == first and sum(out.response_mask) == len(first)
    assert len(out.response_ids) == len(out.response_mask) == len(out.response_logprobs)


def test_routed_experts_of_the_last_turn_reach_the_output(make_config, chatml_tokenizer):
    """MoE routing replay: like veRL's ToolAgentLoop, the output carries the routed experts of the latest
    generation (they cover its prompt, the whole dialogue so far, and its tokens), cut to prompt + budget."""

    class Routed(ScriptedServer):
        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            out = await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params)
            experts = [[len(self.calls), position] for position in range(len(prompt_ids) + len(out.token_ids))]
            return out.model_copy(update={"routed_experts": experts})

    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    server = Routed(tok, ["<interact>Pair: 1,2</interact><|im_end|>", "<answer>1,2</answer><|im_end|>"], {im_end})
    _, out = run_episode(make_config(), server, tok, scripted_row())
    last = server.calls[-1]
    assert out.routed_experts == [[2, p] for p in range(len(last.prompt_ids) + len(last.token_ids))]
    _, plain = run_episode(make_config(), ScriptedServer(tok, ["<answer>1,2</answer>"]), tok, scripted_row())
    assert plain.routed_experts is None


def test_logprobs_off(make_config, chatml_tokenizer):
    server = ScriptedServer(chatml_tokenizer, ["<answer>1,2</answer>"])
    sampling = {"temperature": 1.0, "logprobs": False}
    _, out = run_episode(make_config(), server, chatml_tokenizer, scripted_row(), sampling=sampling)
    assert out.response_logprobs is None and out.extra_fields[ef.REWARD] == 1.0


# --------------------------------------------------------------------------- veRL's own worker


def _object_column(values):
    import numpy as np

    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def test_verl_agent_loop_worker_runs_the_loop_from_yaml(make_config, chatml_tokenizer, tmp_path):
    """veRL's AgentLoopWorker (legacy batch path, no streaming reward) loads our YAML entry, runs the
    loop per row and pads the outputs: the per-token fields stay aligned with the valid tokens."""
    import numpy as np
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.protocol import DataProto

    yaml_path = tmp_path / "agent_loops.yaml"
    yaml_path.write_text(
        f"- name: {AGENT}\n  _target_: verl_selflock.verl_adapter.agent_loop.ActiveReasoningAgentLoop\n"
        "  max_turn_tokens: 48\n"
    )
    config = make_config(
        **{
            "actor_rollout_ref.rollout.agent.agent_loop_config_path": str(yaml_path),
            "actor_rollout_ref.rollout.response_length": 256,
        }
    )
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    script = [
        "<interact>Pair: 1,2</interact> junk<|im_end|>",
        "<interact>Guess: 1,2</interact>",
        "<answer>1,2</answer>",
    ]
    server = ScriptedServer(tok, script, stop_ids={im_end})
    rows = [scripted_row(answer="1,2"), scripted_row(answer="3,4")]
    batch = DataProto.from_single_dict(
        {
            **{key: np.array([row[key] for row in rows], dtype=object) for key in ("extra_info", "data_source")},
            "raw_prompt": _object_column([row["raw_prompt"] for row in rows]),
            "agent_name": np.array([AGENT] * 2, dtype=object),
            "index": np.arange(2),
        }
    )

    async def main():
        worker = AgentLoopWorker(config, llm_client=server)
        return await worker.generate_sequences(batch)

    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

    # The worker re-registers our loop from the YAML in veRL's process-wide registry: restore it so
    # later tests get the plugin's defaults, not this file's max_turn_tokens.
    registered = _agent_loop_registry.get(AGENT)
    try:
        out = asyncio.run(main())
    finally:
        _agent_loop_registry[AGENT] = registered
    assert out.batch["responses"].shape == (2, 256)
    assert "rollout_log_probs" in out.batch.keys()
    assert all(c.sampling_params["max_tokens"] == 48 for c in server.calls)
    for i in range(2):
        valid = int(out.batch["attention_mask"][i, 512:].sum())
        turn_ids = out.non_tensor_batch["turn_ids"][i]
        assert len(turn_ids) == valid
        mask = out.batch["response_mask"][i, :valid].tolist()
        assert mask == [int(t >= 0) for t in turn_ids]
        assert out.batch["response_mask"][i, valid:].sum() == 0
        assert out.non_tensor_batch["max_global_steps"][i] == 3
    assert out.non_tensor_batch[ef.REWARD].tolist() == [1.0, 0.0]
    assert out.non_tensor_batch[ef.TURNS].tolist() == [3, 3]


# --------------------------------------------------------------------------- the real SmolLM2 model on PE


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    # One thread: the CPUs are shared, and oversubscribed OpenMP threads make decoding ~8x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize(("variant", "greedy"), [("gated", True), ("gated", False), ("full", False)])
def test_real_model_on_pe_episode(make_config, chatml_tokenizer, smollm2_model, variant, greedy):
    """SmolLM2-135M-Instruct (fp32, CPU) plays a short PE episode through the real loop: whatever it
    writes, the episode completes, the layout is consistent, each turn's kept tokens and log-probs are
    exactly a prefix of what the model generated in that call, and the counters match the env's."""
    import math

    from fixtures.servers import HFModelServer

    from verl_selflock.data.pe import PEDataConfig, build_pe_rows

    tok = chatml_tokenizer
    data_config = PEDataConfig(variant, 6 if variant == "gated" else 4, 3 if variant == "gated" else None, 4)
    (row,) = build_pe_rows(data_config, n_train=1, n_test=0, seed=11, progress=False)["train"]
    config = make_config(
        **{"actor_rollout_ref.rollout.prompt_length": 2048, "actor_rollout_ref.rollout.response_length": 256}
    )
    server = HFModelServer(smollm2_model, tok, stop_ids={tok.convert_tokens_to_ids(IM_END)}, greedy=greedy, seed=3)
    kwargs = {"raw_prompt": row["prompt"], "extra_info": row["extra_info"], "data_source": row["data_source"]}
    _, out = run_episode(config, server, tok, kwargs, knobs={"max_turn_tokens": 16, "max_obs_tokens": 64})

    f = out.extra_fields
    n = len(out.response_ids)
    assert 0 < n <= 256
    assert len(out.response_mask) == len(out.response_logprobs) == n
    assert all(len(f[key]) == n for key in CRITIQUE_FIELDS)
    assert out.response_mask == [int(t >= 0) for t in f["turn_ids"]]
    assert all(z == 0 for z, t in zip(f["critique"], f["turn_ids"], strict=True) if t < 0)

    # Turn t's tokens are a prefix of call t's generation, with the model's own log-probs.
    full = out.prompt_ids + out.response_ids
    for t, call in enumerate(server.calls):
        positions = [i for i, tid in enumerate(f["turn_ids"]) if tid == t]
        assert positions == list(range(positions[0], positions[0] + len(positions)))
        assert [out.response_ids[i] for i in positions] == call.token_ids[: len(positions)]
        assert [out.response_logprobs[i] for i in positions] == pytest.approx(call.log_probs[: len(positions)])
        assert all(math.isfinite(lp) and lp <= 0 for lp in call.log_probs)
        assert call.prompt_ids == full[: len(call.prompt_ids)]
        assert call.sampling_params["max_tokens"] <= 16

    # The counters agree with the environment's own round counts and with the turn labels in the layout
    # (environments no longer count critiques: the episode runner's counter is the only one).
    env = f[ef.ENV_METRICS]
    labels = [label for _, label in iter_turn_labels(f)]

    def labelled(channel: int, z: int) -> int:
        return sum(label.channel == channel and label.critique == z for label in labels)

    # A turn cut by the response budget is generated but never stepped.
    budget_cut = f[ef.STOP_REASON] == ef.STOP_RESPONSE_LENGTH and f[ef.TURNS] > env["turns"]
    assert env["turns"] == f[ef.TURNS] - int(budget_cut)
    assert (f[ef.AS_POS], f[ef.AS_NEG], f[ef.BT_POS], f[ef.BT_NEG]) == (
        labelled(CHANNEL_AS, 1),
        labelled(CHANNEL_AS, -1),
        labelled(CHANNEL_BT, 1),
        labelled(CHANNEL_BT, -1),
    )
    assert f[ef.AS_POS] + f[ef.AS_NEG] == env["action_rounds"] == f[ef.ACTION_ROUNDS]
    assert f[ef.UPDATE_ROUNDS] == env["update_rounds"]
    assert f[ef.INFO_GAIN_COUNT] <= env["action_rounds"]  # PE: every query but a NaN one
    assert f[ef.REPEATED_ACTIONS] == env["repeats"]
    assert f[ef.INVALID_ACTIONS] >= env["invalid_actions"] + env["invalid_guesses"]
    assert f[ef.REWARD] in (0.0, 1.0) and f[ef.ANSWERED] == bool(env["answered"])
    assert f[ef.STOP_REASON] in (ef.STOP_ANSWER, ef.STOP_DONE, ef.STOP_MAX_TURNS, ef.STOP_RESPONSE_LENGTH)
