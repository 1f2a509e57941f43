"""The ``active_reasoning`` reward manager, built and fed the way veRL's reward loop does it."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest

_TESTS_DIR = str(Path(__file__).resolve().parents[1])
if _TESTS_DIR not in sys.path:  # makes ``fixtures`` (tests/fixtures) importable
    sys.path.insert(0, _TESTS_DIR)

from fixtures.harness import AGENT, SYSTEM, compose_verl_config, scripted_row  # noqa: E402
from fixtures.scripted_env import ScriptedEnv  # noqa: E402
from fixtures.servers import ScriptedServer  # noqa: E402

from verl_selflock.contracts import episode as ef  # noqa: E402
from verl_selflock.verl_adapter.reward_manager import (  # noqa: E402
    EXTRA_INFO_KEYS,
    MISSING_OUTCOME,
    ActiveReasoningRewardManager,
    reward_extra_info,
)

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def config(smollm2_dir):
    return compose_verl_config(
        [
            f"actor_rollout_ref.model.path={smollm2_dir}",
            "actor_rollout_ref.rollout.name=vllm",
            "actor_rollout_ref.rollout.prompt_length=512",
            "actor_rollout_ref.rollout.response_length=256",
            "reward.reward_manager.name=active_reasoning",
        ]
    )


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(autouse=True)
def _clear_env_instances():
    ScriptedEnv.instances.clear()
    yield
    ScriptedEnv.instances.clear()


class _Remote:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)  # a coroutine: awaited like a Ray ObjectRef


class LocalRewardHandle:
    """Stands in for a ``RewardLoopWorker`` Ray actor handle: ``await handle.compute_score.remote(data)``."""

    def __init__(self, worker):
        self.compute_score = _Remote(worker.compute_score)


def one_row(non_tensor: dict, response_len: int = 4):
    """A 1-row DataProto shaped like the one ``AgentLoopWorker._compute_score`` sends."""
    import torch
    from verl.protocol import DataProto

    def column(value):
        array = np.empty(1, dtype=object)
        array[0] = value
        return array

    prompts = torch.tensor([[5, 6, 7]])
    responses = torch.arange(response_len).unsqueeze(0) + 10
    return DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses,
            "input_ids": torch.cat([prompts, responses], dim=1),
            "attention_mask": torch.ones(1, 3 + response_len, dtype=torch.long),
        },
        non_tensors={key: column(value) for key, value in non_tensor.items()},
    )


def run(coro):
    return asyncio.run(coro)


# --------------------------------------------------------------------------- construction


def test_built_by_verl_from_config(config, tokenizer):
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.trainer.ppo.reward import load_reward_manager, resolve_reward_manager_cls

    assert resolve_reward_manager_cls(config) is ActiveReasoningRewardManager

    async def main():
        worker = RewardLoopWorker(config)  # what each reward-loop Ray actor runs
        direct = load_reward_manager(config, tokenizer, reward_router_address=None, reward_model_tokenizer=None)
        return worker, direct

    worker, direct = run(main())
    assert isinstance(worker.reward_manager, ActiveReasoningRewardManager)
    assert isinstance(direct, ActiveReasoningRewardManager)


# --------------------------------------------------------------------------- scoring one row


def _manager(config, tokenizer):
    async def main():
        return ActiveReasoningRewardManager(config=config, tokenizer=tokenizer, compute_score=None, extra_kwarg=1)

    return run(main())


def test_scores_the_env_outcome_from_tool_extra_fields(config, tokenizer):
    stats = ef.EpisodeStats(
        reward=1.0, success=True, answered=True, turns=4, invalid_actions=1, as_pos=1, as_neg=1, bt_pos=1, bt_neg=0,
        env_metrics={"sim_calls": 3.0, "sim_cache_hits": 2.0, "cos_final": 0.5},
    )
    fields = {**stats.as_extra_fields(), "turn_ids": [0, 0, -1]}
    data = one_row({"data_source": "pe_g_s3", "tool_extra_fields": fields})
    out = run(_manager(config, tokenizer).run_single(data))
    assert out["reward_score"] == 1.0
    info = out["reward_extra_info"]
    assert set(info) == set(EXTRA_INFO_KEYS)
    assert info["acc"] == 1.0 and info["selflock/success"] == 1.0 and info["selflock/answered"] == 1.0
    assert info["selflock/turns"] == 4.0 and info["selflock/invalid_actions"] == 1.0
    assert (info["selflock/as_pos"], info["selflock/as_neg"], info["selflock/bt_pos"], info["selflock/bt_neg"]) == (
        1.0,
        1.0,
        1.0,
        0.0,
    )
    assert info[MISSING_OUTCOME] == 0.0
    # simulator counters surface from the env's metrics (0 where the task has no simulator)
    assert (info["selflock/sim_calls"], info["selflock/sim_cache_hits"], info["selflock/sim_failures"]) == (3.0, 2.0, 0.0)
    # No rounds were counted in these hand-built stats: the per-episode proxies have no value (None).
    assert info["selflock/as_proxy"] is None and info["selflock/bt_proxy"] is None
    assert all(isinstance(v, float) for key, v in info.items() if not key.endswith("_proxy"))


def test_the_score_is_the_env_reward_not_a_text_search(config, tokenizer):
    """A decoded response with a correct-looking <answer> block scores what the env said (0 here)."""
    fields = ef.EpisodeStats(reward=0.0, answered=False, turns=4).as_extra_fields()
    data = one_row({"data_source": "pe", "tool_extra_fields": fields}, response_len=8)
    out = run(_manager(config, tokenizer).run_single(data))
    assert out["reward_score"] == 0.0 and out["reward_extra_info"]["selflock/answered"] == 0.0


def test_missing_outcome_scores_zero_with_counter_and_warning(config, tokenizer, caplog):
    manager = _manager(config, tokenizer)
    other_loop = {"turn_scores": [], "tool_rewards": [], "global_steps": 3}  # e.g. tool_agent's fields
    with caplog.at_level(logging.WARNING, logger="verl_selflock.verl_adapter.reward_manager"):
        outs = [
            run(manager.run_single(one_row({"data_source": "gsm8k", "tool_extra_fields": other_loop}))),
            run(manager.run_single(one_row({"data_source": "gsm8k"}))),  # no tool_extra_fields at all
        ]
    for out in outs:
        assert out["reward_score"] == 0.0
        assert set(out["reward_extra_info"]) == set(EXTRA_INFO_KEYS)
        assert out["reward_extra_info"][MISSING_OUTCOME] == 1.0
    assert manager.missing_outcome_count == 2
    assert sum("has no 'selflock_reward'" in r.getMessage() for r in caplog.records) == 2


def test_legacy_columns_and_multi_row_data(config, tokenizer):
    """Without ``tool_extra_fields`` the legacy trainer's per-key columns are read; with several rows
    (multi-output loops) the last row carries the outcome."""
    from verl.protocol import DataProto

    manager = _manager(config, tokenizer)
    columns = ef.EpisodeStats(reward=1.0, success=True, answered=True).as_extra_fields()
    columns.pop(ef.ENV_METRICS)
    out = run(manager.run_single(one_row({"data_source": "pe", **columns})))
    assert out["reward_score"] == 1.0 and out["reward_extra_info"]["acc"] == 1.0

    first = one_row({"tool_extra_fields": ef.EpisodeStats(reward=0.0).as_extra_fields()})
    last = one_row({"tool_extra_fields": ef.EpisodeStats(reward=1.0, success=True).as_extra_fields()})
    both = DataProto.concat([first, last])
    assert run(manager.run_single(both))["reward_score"] == 1.0


# --------------------------------------------------------------------------- end to end through veRL


def _object_column(values):
    column = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        column[i] = value
    return column


def test_agent_loop_worker_streams_rewards_through_the_manager(config, tokenizer):
    """veRL's AgentLoopWorker runs our loop and, with reward-loop handles, sends each finished
    trajectory to a real RewardLoopWorker (1-row DataProto with ``tool_extra_fields``): the scores are
    the env outcomes, placed at the last valid token, and the extra info becomes batch columns.

    Row 2 never answers, although its instructions show the exact correct answer in answer tags: a
    scorer that searched the decoded transcript for the last <answer> would give it 1.
    """
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker
    from verl.protocol import DataProto

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    answering = ["<interact>Pair: 1,2</interact><|im_end|>", "<interact>Guess: 1,2</interact>", "<answer>1,2</answer>"]
    never = [*answering[:2], "I do not know.<|im_end|>", "Still no idea.<|im_end|>"]
    rows = [scripted_row(answer="1,2"), scripted_row(answer="3,4"), scripted_row(answer="1,2")]
    rows[2]["raw_prompt"] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Ask, then answer. The expected format is <answer>1,2</answer>."},
    ]

    class PerRowServer(ScriptedServer):
        """Row 3 (recognised by its instructions) gets the never-answering script."""

        def choose_script(self, prompt_ids):
            return never if "expected format" in tokenizer.decode(prompt_ids) else answering

    server = PerRowServer(tokenizer, answering, stop_ids={im_end})
    batch = DataProto.from_single_dict(
        {
            "raw_prompt": _object_column([row["raw_prompt"] for row in rows]),
            "extra_info": _object_column([row["extra_info"] for row in rows]),
            "data_source": _object_column([row["data_source"] for row in rows]),
            "reward_model": _object_column([row["reward_model"] for row in rows]),
            "agent_name": _object_column([AGENT] * 3),
            "index": np.arange(3),
        }
    )

    async def main():
        reward_worker = RewardLoopWorker(config)
        handles = [LocalRewardHandle(reward_worker)]
        worker = AgentLoopWorker(config, llm_client=server, reward_loop_worker_handles=handles)
        return await worker.generate_sequences(batch), reward_worker

    out, reward_worker = run(main())
    scores = out.batch["rm_scores"]
    valid = out.batch["attention_mask"][:, 512:].sum(dim=1)
    assert scores.sum(dim=1).tolist() == [1.0, 0.0, 0.0]
    assert scores[0, valid[0] - 1] == 1.0  # at the last valid response token
    assert out.non_tensor_batch["acc"].tolist() == [1.0, 0.0, 0.0]
    assert out.non_tensor_batch["selflock/answered"].tolist() == [1.0, 1.0, 0.0]
    assert out.non_tensor_batch[MISSING_OUTCOME].tolist() == [0.0, 0.0, 0.0]
    assert set(EXTRA_INFO_KEYS) <= set(out.meta_info["reward_extra_keys"])
    assert reward_worker.reward_manager.missing_outcome_count == 0

    # The trap was armed: the last <answer> block in row 3's decoded transcript is the right answer.
    transcript = tokenizer.decode(out.batch["input_ids"][2], skip_special_tokens=True)
    assert re.findall(r"<answer>(.*?)</answer>", transcript)[-1] == "1,2"
    assert "do not know" in transcript


def test_validation_reports_per_episode_proxies_skipping_episodes_without_rounds():
    """veRL's validation means drop None (a NaN would make the whole mean NaN): an episode without Action
    or Update rounds (an answer in turn 1) leaves the proxies to the episodes that have them."""
    from verl.trainer.ppo.metric_utils import process_validation_metrics

    answered_at_once = ef.EpisodeStats(turns=1, judged_turns=1, answered=True)
    asked = ef.EpisodeStats(turns=4, judged_turns=4, action_rounds=2, as_pos=1, update_rounds=1, bt_pos=1)
    asked_badly = ef.EpisodeStats(turns=3, judged_turns=3, action_rounds=2, as_pos=0, update_rounds=1, bt_pos=0)
    infos = [reward_extra_info(s) for s in (answered_at_once, asked, asked_badly)]
    assert infos[0]["selflock/as_proxy"] is None and infos[0]["selflock/bt_proxy"] is None
    assert (infos[1]["selflock/as_proxy"], infos[1]["selflock/bt_proxy"]) == (0.5, 1.0)
    columns = {key: [info[key] for info in infos] for key in EXTRA_INFO_KEYS}
    metrics = process_validation_metrics(["pe"] * 3, ["u0", "u1", "u2"], columns)["pe"]
    assert metrics["selflock/as_proxy"]["mean@1"] == pytest.approx(0.25)  # (0.5 + 0) / 2 episodes with actions
    assert metrics["selflock/bt_proxy"]["mean@1"] == pytest.approx(0.5)
    assert metrics["acc"]["mean@1"] == 0.0
