"""One ``verl-selflock eval`` episode: chat with the policy endpoint, judged by the shared episode runner.

Each turn is the endpoint's reply, cut after its first closing tag
(:func:`verl_selflock.envs.parsing.cut_after_first_closing_tag`, the text form of the training loop's
token cut) and handed to :class:`verl_selflock.episode.runner.EpisodeRunner`: the same steps, counts,
stop rules and result as the training agent loop. The conversation goes through the server's chat
template as messages; observations are not capped at ``max_obs_tokens``. A reply the endpoint answered
with no content (None or blank) is the model's turn, judged by the environment (an invalid action),
never retried (:mod:`verl_selflock.eval.policy`).
"""

from __future__ import annotations

import time
from typing import Any

from verl_selflock.episode.runner import EpisodeRunner
from verl_selflock.eval.config import EpisodeRow, EvalConfig
from verl_selflock.eval.oracle import ORACLE_BT
from verl_selflock.eval.store import to_jsonable

__all__ = ["EndpointError", "run_episode"]


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
    runner = EpisodeRunner(env)
    messages = list(row.messages)
    transcript: list[dict[str, Any]] = []
    while True:
        reply = await policy.chat(messages, max_tokens=config.max_tokens, temperature=config.temperature)
        if reply.ok:
            text = reply.text or ""
        elif reply.error == "empty":
            text = ""  # the model said nothing: a (bad) turn of the model, judged like any other
        else:
            raise EndpointError(f"policy endpoint failed at turn {runner.stats.turns + 1}: {reply.error}")
        cut, tag = cut_after_first_closing_tag(text, env.closing_tags)  # the task's turn format, as in training
        judgement = await runner.judge(cut, tag)
        step = judgement.step
        transcript.append(
            {
                "turn": runner.stats.turns,
                "round": judgement.kind,
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
        if judgement.stop is not None:
            break
        messages.append({"role": "user", "content": step.observation})
        runner.observation_shown()
    stats = runner.finish()
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
