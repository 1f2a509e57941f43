"""MediQ through the real ``active_reasoning`` loop: the counterfactual BT branch is generated and judged
but its tokens never enter the response, and an episode runs against a real patient server."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from fixtures.harness import SAMPLING, Expected, build_loop, run_episode
from fixtures.mediq_rows import COUGH_CASE
from fixtures.openai_servers import FaultServer
from fixtures.servers import ABORTED, ScriptedServer, scripted_logprob

from verl_selflock.contracts import episode as ef
from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT, CHANNEL_NONE, CRITIQUE_FIELDS
from verl_selflock.contracts.episode import CF_BRANCHES, CF_TIME
from verl_selflock.data.mediq import build_mediq_rows
from verl_selflock.envs.mediq.prompts import FIXED_REPLY

IM_END = "<|im_end|>"
CASE = COUGH_CASE

Q1 = "<scratch>a</scratch><interact>Query: Do you have a fever?</interact>"
Q2 = "<interact>Query: Do you smoke?</interact>"
REAL_GUESS = "<interact>Guess: 4,1,1,1</interact>"
ANSWER = "<answer>4,1,1,1</answer>"


def mediq_row(split: str = "train", max_turns: int = 4) -> dict:
    # The builder keeps both splits non-empty: a twin case (same content, other id) fills the other one.
    twin = dataclasses.replace(CASE, case_id="fixture-2")
    rows = build_mediq_rows([CASE, twin], seed=0, n_val=1, max_turns=max_turns, progress=False)
    row = rows[split][0]
    return {
        "raw_prompt": row["prompt"],
        "extra_info": row["extra_info"],
        "data_source": row["data_source"],
        "reward_model": row["reward_model"],
        "index": 0,
    }


def simulator_knob(base_url: str, model: str = "patient", **extra) -> dict:
    return {"base_url": base_url, "model": model, "timeout_s": 10.0, "max_retries": 0, **extra}


def enc(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def chatml_obs(tokenizer, text: str) -> list[int]:
    return enc(tokenizer, f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def observation(feedback: str, follow: str) -> str:
    return f"Patient: {feedback}\n{follow}"


UPDATE_FOLLOW = (
    "Round 2 of 4 is an Update round: <scratch>...</scratch> then <interact>Guess: ...</interact> with 4 "
    "non-negative numbers separated by commas: your weight for each option in the order A, B, C, D."
)


@pytest.mark.parametrize(("cf_guess", "bt_critique"), [("1,1,1,1", 1), ("9,1,1,1", -1)])
def test_counterfactual_branch_is_judged_but_never_trained_on(make_config, chatml_tokenizer, cf_guess, bt_critique):
    """Turn order on the server: Q1, [branch: guess after the null reply], real guess, Q2, answer.
    The response holds Q1, obs, real guess, obs, Q2, obs, answer exactly (no branch token); the branch
    was generated from the episode's prefix + the null-reply observation with the same per-turn cap;
    its guess decides the BT critique (prior -> (4,1,1,1) moves sqrt(0.0675); (1,1,1,1) moves 0 -> +1;
    (9,1,1,1) moves sqrt(0.2133) -> -1)."""
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    nl = enc(tok, "\n")
    script = [Q1 + IM_END, f"<interact>Guess: {cf_guess}</interact>{IM_END}", REAL_GUESS + IM_END, Q2 + IM_END]
    script.append(ANSWER + IM_END)
    server = ScriptedServer(tok, script, stop_ids={im_end})
    with FaultServer("ok", reply="1") as patient:  # the patient names fact 1 every time
        _, out = run_episode(
            make_config(),
            server,
            tok,
            mediq_row(),
            knobs={"simulator": simulator_knob(patient.base_url), "max_turn_tokens": 512},
        )
        assert len(patient.requests) == 2  # Q1 and Q2; the branch asks no patient

    fact_obs = observation(CASE.facts[0], UPDATE_FOLLOW)
    null_obs = observation(FIXED_REPLY, UPDATE_FOLLOW)
    action_follow = (
        "Round 3 of 4 is an Action round (1 question left including this one): <scratch>...</scratch> then one "
        "new question to the patient\n<interact>\nQuery: your question\n</interact>\n(a single short question "
        "about one thing; do not repeat an earlier question)."
    )
    answer_follow = (
        "That was your last question. Round 4 of 4 is the Answer round: <scratch>...</scratch> then your final "
        "weights between the tags <answer> and </answer>: 4 non-negative numbers separated by commas: your weight "
        "for each option in the order A, B, C, D. The option with the single largest weight is your answer."
    )
    exp = Expected()
    k0, k2, k3, k4 = (enc(tok, t) + [im_end] for t in (Q1, REAL_GUESS, Q2, ANSWER))
    exp.turn(0, k0, 1, CHANNEL_AS, [scripted_logprob(0, j) for j in range(len(k0))])
    exp.context(nl + chatml_obs(tok, fact_obs))
    exp.turn(1, k2, bt_critique, CHANNEL_BT, [scripted_logprob(2, j) for j in range(len(k2))])
    exp.context(nl + chatml_obs(tok, f"Guess recorded.\n{action_follow}"))
    # Q2 gets fact 1 again: nothing new -> the fixed reply, AS -1, and no branch.
    exp.turn(2, k3, -1, CHANNEL_AS, [scripted_logprob(3, j) for j in range(len(k3))])
    exp.context(nl + chatml_obs(tok, observation(FIXED_REPLY, answer_follow)))
    exp.turn(3, k4, 0, CHANNEL_NONE, [scripted_logprob(4, j) for j in range(len(k4))])
    exp.context(nl)

    fields = out.extra_fields
    assert out.response_ids == exp.ids and out.response_mask == exp.mask
    assert out.response_logprobs == pytest.approx(exp.logprobs)
    assert fields["turn_ids"] == exp.turn_ids and fields["critique"] == exp.critique
    assert fields["critique_channel"] == exp.channel
    assert all(len(fields[key]) == len(out.response_ids) for key in CRITIQUE_FIELDS)

    # The branch: prefix up to the end of Q1's message, then the null-reply observation; same cap.
    assert len(server.calls) == 5
    branch = server.calls[1]
    q1_end = len(out.prompt_ids) + len(k0) + len(nl)
    full = out.prompt_ids + out.response_ids
    assert branch.prompt_ids == full[:q1_end] + chatml_obs(tok, null_obs)
    assert branch.sampling_params["max_tokens"] == server.calls[2].sampling_params["max_tokens"] == 512
    assert server.calls[2].prompt_ids == full[: q1_end + len(chatml_obs(tok, fact_obs))]
    branch_ids = branch.token_ids
    assert not any(out.response_ids[i : i + len(branch_ids)] == branch_ids for i in range(len(out.response_ids)))

    assert fields[CF_BRANCHES] == 1 and fields[CF_TIME] >= 0.0
    env_metrics = fields[ef.ENV_METRICS]
    assert env_metrics["cf_branches"] == 1 and env_metrics["sim_calls"] == 2 and env_metrics["sim_failures"] == 0
    assert fields[ef.REWARD] == 1.0 and fields[ef.TURNS] == 4


def test_an_aborted_counterfactual_branch_is_dropped(make_config, chatml_tokenizer):
    """The server aborts the branch (no tokens, stop reason ``aborted``): no empty text reaches the
    environment as the agent's branch turn; the Update round falls back to the Psi_hat rule, the abort is
    counted and the episode goes on to its answer."""
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    script = [Q1 + IM_END, ABORTED, REAL_GUESS + IM_END, Q2 + IM_END, ANSWER + IM_END]
    server = ScriptedServer(tok, script, stop_ids={im_end})
    with FaultServer("ok", reply="1") as patient:
        _, out = run_episode(
            make_config(), server, tok, mediq_row(), knobs={"simulator": simulator_knob(patient.base_url)}
        )
    fields = out.extra_fields
    assert len(server.calls) == 5 and fields[CF_BRANCHES] == 0 and fields[ef.ABORTED_GENERATIONS] == 1
    assert fields[ef.BT_POS] == 1  # the Psi_hat rule (0.25 -> 4/7), as without a branch
    assert fields[ef.STOP_REASON] == ef.STOP_ANSWER and fields[ef.REWARD] == 1.0 and fields[ef.TURNS] == 4


@pytest.mark.parametrize(("split", "knob"), [("test", True), ("train", False)])
def test_no_branch_at_validation_or_when_switched_off(make_config, chatml_tokenizer, split, knob):
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    server = ScriptedServer(tok, [Q1 + IM_END, REAL_GUESS + IM_END, Q2 + IM_END, ANSWER + IM_END], stop_ids={im_end})
    with FaultServer("ok", reply="1") as patient:
        knobs = {"simulator": simulator_knob(patient.base_url), "counterfactual_bt": knob}
        _, out = run_episode(make_config(), server, tok, mediq_row(split), knobs=knobs)
    assert len(server.calls) == 4 and out.extra_fields[CF_BRANCHES] == 0
    assert out.extra_fields[ef.ENV_METRICS]["cf_branches"] == 0
    assert out.extra_fields[ef.BT_POS] == 1  # the Psi_hat rule: 0.25 -> 4/7


class RoundAwarePolicy(ScriptedServer):
    """A scripted policy that answers by the round the last observation announces (the patient's real
    replies decide whether a counterfactual branch happens, so a fixed call order cannot be scripted)."""

    QUERIES = (Q1, Q2, Q2)

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
        tail = self.tokenizer.decode(prompt_ids[-160:])
        last_user = tail.rsplit("<|im_start|>user", 1)[-1]
        if "Update round" in last_user:
            text = REAL_GUESS
        elif "Answer round" in last_user:
            text = ANSWER
        else:
            asked = sum(1 for call in self.calls if "Query:" in self.tokenizer.decode(call.token_ids))
            text = self.QUERIES[min(asked, len(self.QUERIES) - 1)]
        self.turns = [text + IM_END]
        self._progress[request_id] = 0
        self._scripts[request_id] = self.turns
        return await super().generate(request_id, prompt_ids=prompt_ids, sampling_params=sampling_params, **kwargs)


@pytest.mark.slow
def test_mediq_episodes_against_the_real_patient_server(make_config, chatml_tokenizer, chat_server):
    """Two training episodes in one worker event loop, patient = a real `transformers serve` with
    SmolLM2-135M-Instruct: whatever the small model replies, every turn is judged (no failures), the
    second episode's questions come from the cache, and branches never leak into the response."""
    tok = chatml_tokenizer
    im_end = tok.convert_tokens_to_ids(IM_END)
    row = mediq_row(max_turns=6)
    knobs = {"simulator": simulator_knob(chat_server.base_url, chat_server.model, max_tokens=8, timeout_s=60.0)}

    async def main():
        outputs = []
        for _ in range(2):
            server = RoundAwarePolicy(tok, [], stop_ids={im_end})
            loop = await build_loop(make_config(), server, tok, knobs=knobs)
            outputs.append((await loop.run(dict(SAMPLING), **row), server))
        return outputs

    outputs = asyncio.run(main())
    for episode, (out, server) in enumerate(outputs):
        fields = out.extra_fields
        env = fields[ef.ENV_METRICS]
        assert env["sim_failures"] == 0 and env["sim_calls"] == 2  # Q1 and Q2; the repeat of Q2 is not asked
        assert env["sim_cache_hits"] == (2 if episode else 0)
        assert env["repeats"] == 1 and env["action_rounds"] == 3 and env["update_rounds"] == 2
        assert fields[ef.AS_POS] + fields[ef.AS_NEG] == 3 and fields[ef.ACTION_ROUNDS] == 3
        assert fields[ef.STOP_REASON] == ef.STOP_ANSWER and fields[ef.REWARD] == 1.0 and fields[ef.TURNS] == 6
        # Real turns are the calls whose prompt is a prefix of the final sequence; the rest are branches.
        full = out.prompt_ids + out.response_ids
        real = [call for call in server.calls if call.prompt_ids == full[: len(call.prompt_ids)]]
        assert len(real) == 6 and fields[CF_BRANCHES] == env["cf_branches"] == len(server.calls) - 6
        generated = [tid for tid, m in zip(out.response_ids, out.response_mask, strict=True) if m]
        assert generated == [tid for call in real for tid in call.token_ids]
        assert out.response_mask == [int(t >= 0) for t in fields["turn_ids"]]
    # Same questions, same case: the patient's answers (hence the observations) are identical.
    assert outputs[0][0].response_ids == outputs[1][0].response_ids
