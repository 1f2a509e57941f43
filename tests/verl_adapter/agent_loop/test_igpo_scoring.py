"""IGPO's teacher-forced scores of a real agent-loop episode on SmolLM2-135M-Instruct, checked against
an independent computation: the conversation re-rendered by the chat template at each turn boundary,
the answer appended, one plain ``transformers`` forward, the mean log-prob of the answer tokens."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures.harness import INSTRUCTION, SYSTEM, run_episode, scripted_row
from fixtures.scripted_env import ScriptedEnv
from fixtures.servers import ScriptedServer

from verl_selflock.algorithms.igpo import IgpoConfig, compute_igpo_turn_advantages, group_ids
from verl_selflock.algorithms.igpo_plan import plan_scoring, score_with_hf_model
from verl_selflock.contracts import episode as ef
from verl_selflock.verl_adapter.igpo_scoring import answer_mean_logprobs, plan_to_tensordict

pytestmark = pytest.mark.slow
IM_END = "<|im_end|>"
ANSWER = "0.6,0.3,0.1"
SCRIPT = [
    f"<interact>Pair: 1,2</interact>{IM_END}",
    f"<interact>Guess: 0.5,0.4,0.1</interact>{IM_END}",
    f"<interact>Pair: 2,3</interact>{IM_END}",
    f"<answer>0.5,0.3,0.2</answer>{IM_END}",
]


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir):
    from verl_selflock.verl_adapter.cpu.sampling import load_causal_lm

    torch.manual_seed(0)
    return load_causal_lm(smollm2_dir).float().eval()


def _independent_mean_logprob(model, tokenizer, messages: list[dict], config: IgpoConfig) -> float:
    prefix = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prefix = list(prefix["input_ids"] if hasattr(prefix, "keys") else prefix)
    bridge = tokenizer.encode(config.bridge, add_special_tokens=False)
    answer = tokenizer.encode(ANSWER, add_special_tokens=False)
    ids = torch.tensor([prefix + bridge + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    start = len(prefix) + len(bridge)
    logprobs = torch.log_softmax(logits[start - 1 : -1], dim=-1)
    return float(logprobs.gather(1, torch.tensor(answer).unsqueeze(1)).mean())


def test_scores_match_an_independent_forward_and_give_the_information_gain(make_config, chatml_tokenizer, smollm2_model):
    tok, model, config = chatml_tokenizer, smollm2_model, IgpoConfig()
    server = ScriptedServer(tok, SCRIPT, stop_ids={tok.convert_tokens_to_ids(IM_END)})
    _, out = run_episode(make_config(), server, tok, scripted_row(answer=ANSWER, max_turns=4))
    fields = out.extra_fields
    assert fields[ef.GT_ANSWER] == ANSWER and fields[ef.TURNS] == 4

    plan = plan_scoring([out.prompt_ids], [out.response_ids], [fields["turn_ids"]], [ANSWER], tok, config)
    assert len(plan) == 4 and plan.prefixes.tolist() == [0, 1, 2, 3]

    # Independent: render the dialogue before each turn with the chat template.
    (env,) = ScriptedEnv.instances
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": INSTRUCTION}]
    expected = []
    for k in range(4):
        expected.append(_independent_mean_logprob(model, tok, messages, config))
        messages += [{"role": "assistant", "content": env.received[k]}, {"role": "user", "content": f"Feedback {k + 1}."}]
    expected = torch.tensor(expected)

    scores = score_with_hf_model(model, plan, batch_size=4)
    torch.testing.assert_close(scores, expected, atol=2e-4, rtol=0)

    # The reduction the trainer applies to the actor's output: veRL's nested per-position log-probs
    # (position p holds log pi(token p+1)), cut to the response with veRL's own helper.
    td = plan_to_tensordict(plan)
    per_position = []
    with torch.no_grad():
        for ids in plan.input_ids:
            logits = model(input_ids=ids.unsqueeze(0)).logits[0].float()
            lp = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[1:].unsqueeze(1))[:, 0]
            per_position.append(torch.cat([lp, torch.zeros(1)]))
    nested = torch.nested.as_nested_tensor(per_position, layout=torch.jagged)
    torch.testing.assert_close(answer_mean_logprobs(nested, td["response_mask"]), expected, atol=2e-4, rtol=0)

    # IG rewards: p_{k+1} - p_k on turns 0..2, the outcome (wrong answer: 0) on turn 3.
    table = compute_igpo_turn_advantages(
        plan.to_table(scores), plan.scored, plan.num_turns, torch.tensor([fields[ef.REWARD]]), group_ids(["u"]), config
    )
    p = expected.exp()
    torch.testing.assert_close(table.rewards[0, :3], p[1:] - p[:-1], atol=2e-4, rtol=0)
    assert table.rewards[0, 3] == 0.0 and fields[ef.REWARD] == 0.0
    assert all(0.0 < float(v) < 1.0 for v in p) and not math.isclose(float(p[0]), float(p[3]))
