"""A FloDial episode through the real ``active_reasoning`` agent loop, with the user simulated by a real
``transformers serve`` (SmolLM2-135M-Instruct) reached through the loop's ``simulator:`` knob."""

from __future__ import annotations

import asyncio

import pytest
from fixtures.flodial_charts import laptop_chart
from fixtures.harness import SAMPLING, build_loop
from fixtures.servers import ScriptedServer

from verl_selflock.contracts import episode as ef
from verl_selflock.contracts.critique import CRITIQUE_FIELDS, iter_turn_labels
from verl_selflock.data.flodial import FloDialDataConfig, flodial_messages, load_flowchart, make_flodial_spec

# The policy is scripted (what it asks is fixed); the simulated user is the real model server.
POLICY_SCRIPT = [
    "<scratch>start broad</scratch><interact>\nQuery: Does the laptop power on?\n</interact><|im_end|>",
    "<interact>Guess: 1, 1, 2, 1, 1</interact><|im_end|>",
    "<interact>\nQuery: Is the screen black?\n</interact><|im_end|>",
    "<interact>Guess: 1, 1, 3, 1, 1</interact><|im_end|>",
    "<interact>\nQuery: Does an external monitor show a picture?\n</interact><|im_end|>",
    "<interact>Guess: 1, 1, 4, 1, 1</interact><|im_end|>",
    "<interact>\nQuery: Does the fan spin?\n</interact><|im_end|>",
    "<interact>Guess: 1, 1, 5, 1, 1</interact><|im_end|>",
    "<interact>\nQuery: Is the weather nice today?\n</interact><|im_end|>",
    "<scratch>done</scratch><answer>0, 0, 1, 0, 0</answer><|im_end|>",
]


@pytest.mark.slow
def test_flodial_episode_against_the_real_simulator_server(make_config, chatml_tokenizer, chat_server):
    tok = chatml_tokenizer
    chart = load_flowchart(laptop_chart())
    spec = make_flodial_spec(
        FloDialDataConfig(difficulty="hard"), chart, "8", ["3", "5", "6", "10"], [1, 2, 0, 3, 4],
        split="train", seed=0, instance_id="fd-0",
    )
    row = {"raw_prompt": flodial_messages(spec), "extra_info": {"env": spec, "index": 0}, "data_source": "flodial_hard"}
    config = make_config(
        **{"actor_rollout_ref.rollout.prompt_length": 2048, "actor_rollout_ref.rollout.response_length": 2048}
    )
    server = ScriptedServer(tok, POLICY_SCRIPT, stop_ids={tok.convert_tokens_to_ids("<|im_end|>")})
    simulator = {"base_url": chat_server.base_url, "model": chat_server.model, "max_tokens": 8, "timeout_s": 120}

    async def main():
        loop = await build_loop(config, server, tok, knobs={"simulator": simulator})
        # Two rollouts of the same episode on one worker: the second one's questions hit the reply cache.
        return [await loop.run(dict(SAMPLING), **row) for _ in range(2)]

    first, second = asyncio.run(main())
    for out in (first, second):
        f = out.extra_fields
        n = len(out.response_ids)
        assert all(len(f[key]) == n for key in CRITIQUE_FIELDS)
        assert out.response_mask == [int(t >= 0) for t in f["turn_ids"]]
        assert f[ef.TURNS] == 10 and f[ef.STOP_REASON] == ef.STOP_ANSWER and f[ef.TASK] == "flodial"
        assert f[ef.ANSWERED] is True and f[ef.REWARD] == 1.0  # the scripted answer names the true fault

        env = f[ef.ENV_METRICS]
        # Whatever the small model replied, each of the five distinct questions reached it (or the cache)
        # and none failed.
        assert env["sim_failures"] == 0 and env["action_rounds"] == env["sim_calls"] == 5
        # The labels the loop wrote agree with the environment's own feedback counts.
        labels = dict(iter_turn_labels(f))
        as_labels = [labels[t].critique for t in range(0, 9, 2)]
        assert as_labels.count(1) == env["answers_yes"] == f[ef.AS_POS]
        assert as_labels.count(0) == env["answers_no"]
        assert as_labels.count(-1) == env["answers_unknown"] == f[ef.AS_NEG]
        assert labels[9].critique == 0
        assert f[ef.BT_POS] + f[ef.BT_NEG] <= 4
    m1, m2 = first.extra_fields[ef.ENV_METRICS], second.extra_fields[ef.ENV_METRICS]
    assert m1["sim_cache_hits"] == 0 and m2["sim_cache_hits"] == m2["sim_calls"] == m1["sim_calls"] > 0
    assert first.response_ids == second.response_ids  # greedy simulator + same script: the same episode
