"""``active_reasoning``: the task-agnostic multi-turn agent loop of active-reasoning tasks.

All task knowledge lives in the environment (:mod:`verl_selflock.envs`), built per sample from the
row's ``extra_info["env"]``, and the episode's rules (step, count, stop, score) in the veRL-free
:class:`~verl_selflock.episode.runner.EpisodeRunner` that ``verl-selflock eval`` uses too. The loop
generates turns, cuts them, hands their text to the runner, labels the turns and lays the tokens out::

    response      = [turn_0 | close_0 | obs_0 | turn_1 | close_1 | obs_1 | ... | turn_T | close_T]
    response_mask =  1 ... 1   0 ... 0  0...0   1 ... 1   ...
    turn_ids      =  0 ... 0  -1 ...-1 -1...-1  1 ... 1   ...
    critique      =  z_0 ...   0 ... 0  0...0   z_1 ...   ...

* ``turn_t``: the tokens the model generated, cut right after the first closing tag of the
  environment's ``closing_tags`` (default ``</interact>`` / ``</answer>``;
  :mod:`verl_selflock.episode.token_cut`), unchanged, with their log-probs. If the
  model ended the turn itself with the template's end-of-turn token, that token is part of the turn.
* ``close_t``: what the chat template writes after an assistant message (ChatML ``<|im_end|>\\n``,
  minus the ``<|im_end|>`` the model already wrote). The model did not generate these tokens, so they
  are masked out of the loss (mask 0, log-prob 0, turn id -1) like observation tokens.
* ``obs_t``: the environment's feedback as a user message plus the next assistant header, rendered by
  veRL's Continuous Token builder (``ct_merge_context_msg``); the feedback *text* is capped at
  ``max_obs_tokens`` before templating, so template tokens are never cut.

The episode stops at an ``<answer>`` turn, when the environment says it is done, at the turn cap
(these rules: :mod:`verl_selflock.episode.runner`), or when the next turn would not fit in
``rollout.response_length`` (the loop's own rule, on tokens). The budget is checked before every
generation (``max_tokens`` = the smaller of ``max_turn_tokens`` and what is left, minus the closing
tokens) and before appending an observation, so the response always ends with a closed assistant
message and never needs a blind cut. A turn that stops only because the *remaining budget*
ran out is not shown to the environment (critique 0, ``selflock_truncated``); a turn that exhausts
its own ``max_turn_tokens`` is, and the environment judges it (usually an invalid action).

Counterfactual branches (training rows only, knob ``counterfactual_bt``): when a step carries
``counterfactual_observation``, the loop also renders that text as the user message in place of the
real observation and samples the next turn from there (same template, per-turn cap and token cut),
hands the text to ``env.observe_counterfactual`` and discards the tokens: they never enter the
response, mask, log-probs or layout. Counted in ``extra_fields`` (``selflock_cf_branches``,
``selflock_cf_time_s``).

Reward: the loop does not set ``AgentLoopOutput.reward_score``. It stores the environment's outcome
(:mod:`verl_selflock.contracts.episode`) in ``extra_fields``; veRL's reward loop hands those to our
``active_reasoning`` reward manager (:mod:`verl_selflock.verl_adapter.reward_manager`) as
``tool_extra_fields``, so the reward path stays the official one (and ``reward.reward_manager.name`` stays meaningful).

Config (agent-loop YAML at ``actor_rollout_ref.rollout.agent.agent_loop_config_path``, see
``agent_loop.yaml`` beside this file; knobs: :class:`ActiveReasoningLoopConfig`; every key is optional)::

    - name: active_reasoning
      _target_: verl_selflock.verl_adapter.agent_loop.ActiveReasoningAgentLoop
      max_turn_tokens: 512
      max_obs_tokens: 512
      t3: {enabled: true, signal: auto, k: 2}   # optional: T3 truncation (verl_selflock.algorithms.t3)

T3: after each turn that the environment judged, the runner hands the turn's ``StepResult.progress`` to
a :class:`~verl_selflock.algorithms.t3.T3Monitor`; when it fires (and the episode would otherwise go on)
the episode ends there (``stop_reason`` ``t3``) and is scored by ``env.result()`` like any other.

``run()`` goes through named steps on a :class:`~verl_selflock.verl_adapter.rollout.Rollout` (the
episode's running state and token bookkeeping), as veRL's ``ToolAgentLoop`` goes through its states:
``_start``, then per turn ``_generate_turn``, ``_judge_turn`` and ``_append_observation`` (with
``_counterfactual_turn``), then ``_output``.

veRL settings read: ``rollout.response_length`` (total budget), ``rollout.multi_turn.max_assistant_turns``
and ``rollout.multi_turn.max_user_turns`` (extra caps when set), ``rollout.full_determinism``,
``data.apply_chat_template_kwargs``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any
from uuid import uuid4

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
from verl.utils.rollout_trace import rollout_trace_op
from verl.workers.rollout.replica import TokenOutput

from verl_selflock.contracts.episode import CF_BRANCHES, CF_TIME, GT_ANSWER, STOP_T3
from verl_selflock.contracts.names import AGENT_NAME
from verl_selflock.envs import ActiveReasoningEnv, EnvContext, StepResult, make_env
from verl_selflock.episode.runner import EpisodeRunner
from verl_selflock.episode.token_cut import ENDED_BY_LENGTH, TurnCut, cap_text_tokens, cut_turn, end_of_turn_ids
from verl_selflock.simulators import ensure_reachable, shared_client
from verl_selflock.verl_adapter.agent_loop_config import ActiveReasoningLoopConfig, loop_config_for, pop_entry_knobs
from verl_selflock.verl_adapter.rollout import Rollout, is_aborted

__all__ = ["AGENT_LOOP_CONFIG_PATH", "ActiveReasoningAgentLoop", "ActiveReasoningLoopConfig"]

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

AGENT_LOOP_CONFIG_PATH = str(Path(__file__).with_name("agent_loop.yaml"))
"""Absolute path of the default agent-loop YAML, for ``rollout.agent.agent_loop_config_path``."""


@register(AGENT_NAME)
class ActiveReasoningAgentLoop(AgentLoopBase):
    """Multi-turn rollout of one active-reasoning episode; see the module docstring for the layout."""

    def __init__(self, *args: Any, tools: Any = None, **kwargs: Any) -> None:
        # ``tools`` (veRL's tool list) is not used: the environment is the only counterpart. The knobs are
        # the keys of the agent-loop YAML entry (keyword arguments here, with ``name``) under the run's
        # ``selflock_agent_loop`` node, which every worker receives in the trainer config, on every node.
        entry_knobs = pop_entry_knobs(kwargs)
        super().__init__(*args, **kwargs)
        self.loop_config = loop_config_for(self.config, entry_knobs)
        if self.loop_config.simulator is not None:
            # Once per process: a simulator this worker cannot reach stops the run here, naming its URL,
            # instead of degrading every simulated-user turn to critique 0.
            ensure_reachable(self.loop_config.simulator)
        self.response_length = int(self.rollout_config.response_length)
        multi_turn = self.rollout_config.get("multi_turn", None) or {}
        self.max_assistant_turns = multi_turn.get("max_assistant_turns", None)
        self.max_user_turns = multi_turn.get("max_user_turns", None)

        self.eot_ids = end_of_turn_ids(self.tokenizer, self.apply_chat_template_kwargs)
        eos = self.tokenizer.eos_token_id
        stop_ids = set(eos if isinstance(eos, list | tuple) else [eos]) - {None}
        if self.eot_ids and self.eot_ids[0] in set(self.tokenizer.all_special_ids):
            stop_ids.add(self.eot_ids[0])
        self.stop_ids = frozenset(stop_ids)

        needed = self.loop_config.min_turn_tokens + len(self.eot_ids)
        if self.response_length < needed:
            raise ValueError(
                f"rollout.response_length={self.response_length} leaves no room for one turn of "
                f"min_turn_tokens={self.loop_config.min_turn_tokens} plus {len(self.eot_ids)} end-of-turn tokens"
            )

    @rollout_trace_op
    async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs: Any) -> AgentLoopOutput:
        # 1. the episode, its runner and the prompt
        ep = await self._start(sampling_params, int(priority), kwargs)
        while True:
            # 2. generate one turn, cut it after its first closing tag, append it and close the message
            cut = await self._generate_turn(ep)
            if cut is None:  # cut by the response budget or aborted by the server: not judged
                break
            # 3. the environment judges the turn; the runner counts it and says whether the episode stops
            step = await self._judge_turn(ep, cut)
            if step is None:
                break
            # 4. the observation as a user message + the next assistant header (+ a counterfactual branch)
            if not await self._append_observation(ep, step):
                break
        # 5. outcome and output
        return self._output(ep)

    # ------------------------------------------------------------------ steps

    async def _start(self, sampling_params: dict[str, Any], priority: int, row: Mapping[str, Any]) -> Rollout:
        """Build the episode's environment (from the row's ``extra_info["env"]``), runner and prompt tokens."""
        cfg = self.loop_config
        messages: list[dict[str, Any]] = list(row["raw_prompt"])
        spec = self._env_spec(row)
        env = make_env(spec, max_turns=cfg.max_turns, context=self._env_context(spec, row.get("extra_info")))
        turn_cap = env.max_turns if not self.max_assistant_turns else min(env.max_turns, self.max_assistant_turns)
        prompt_ids = await self.ct_build_initial_tokens(messages)
        # T3 changes where training rollouts stop; the runner lets evaluation rows (split: test) play to the end.
        runner = EpisodeRunner(env, turn_cap=turn_cap, max_observations=self.max_user_turns, t3=cfg.t3)
        deterministic = self.rollout_config.get("full_determinism", False)
        return Rollout(
            env=env,
            runner=runner,
            messages=messages,
            prompt_ids=prompt_ids,
            request_id=f"det-{priority}" if deterministic else uuid4().hex,
            sampling_params=sampling_params,
            priority=priority,
        )

    async def _generate_turn(self, ep: Rollout) -> TurnCut | None:
        """Generate one turn within the per-turn cap and what is left of the response budget, cut it after
        the first closing tag, append the model's kept tokens (mask 1, their log-probs) and the template's
        closing tokens (mask 0). None when the turn was cut by the response budget or aborted by the
        server (the episode ends)."""
        cfg = self.loop_config
        max_tokens = min(cfg.max_turn_tokens, self.response_length - len(ep.response_mask) - len(self.eot_ids))
        params = self._turn_params(ep.sampling_params, max_tokens, ep.env)
        start = time.perf_counter()
        output: TokenOutput = await self.server_manager.generate(
            request_id=ep.request_id, prompt_ids=ep.runtime_ids, sampling_params=params, priority=ep.priority
        )
        taken = ep.take_generation(output, max_tokens, time.perf_counter() - start)
        if taken is None:  # aborted by the server: the episode ends before this turn
            ep.runner.stop_for_abort()
            return None
        gen_ids, gen_logprobs = taken

        cut = cut_turn(self.tokenizer, gen_ids, self.eot_ids, self.stop_ids, tags=ep.env.closing_tags)
        kept_logprobs = gen_logprobs[: len(cut.kept_ids)] if ep.want_logprobs else None
        merge, mask, logprobs = await self.ct_merge_assistant_token(
            ep.runtime_ids, cut.kept_ids, ep.response_mask, ep.response_logprobs, assistant_logprobs=kept_logprobs
        )
        ep.recorder.begin_turn()  # its index is ep.runner.judged: every earlier turn was judged
        ep.apply_merge(merge, mask, logprobs)
        ep.append_closing(cut.closing_ids)

        if cut.ended_by == ENDED_BY_LENGTH and max_tokens < cfg.max_turn_tokens and len(gen_ids) >= max_tokens:
            # Cut by the response budget, not by the model: no critique, no environment step.
            ep.runner.stop_for_budget(unjudged_turn=True)
            return None
        return cut

    async def _judge_turn(self, ep: Rollout, cut: TurnCut) -> StepResult | None:
        """Hand the turn's text to the runner (environment step, counts, stop rules) and label the turn's
        tokens with its critique. The step, or None when the episode ends after this turn."""
        judgement = await ep.runner.judge(cut.text, cut.tag)
        ep.timing["tool_calls"] += judgement.step_s
        label = judgement.step.label
        ep.recorder.end_turn(label.critique, label.channel, label.fallback)
        ep.messages.append({"role": "assistant", "content": cut.text})
        if judgement.stop == STOP_T3:
            # An upper bound: the episode could have ended sooner or used shorter turns.
            room_left = self.response_length - len(ep.response_mask)
            budget = ep.runner.turns_left * self.loop_config.max_turn_tokens
            ep.runner.stats.t3_budget_saved = max(0, min(room_left, budget))
        return None if judgement.stop else judgement.step

    async def _append_observation(self, ep: Rollout, step: StepResult) -> bool:
        """Append the observation (text capped at ``max_obs_tokens``) as a user message plus the next
        assistant header (mask 0, turn id -1), rendered by veRL's Continuous Token builder. False (the
        episode ends, truncated) when the next turn would then not fit in the response budget."""
        cfg = self.loop_config
        before_obs = (ep.messages, ep.runtime_ids, ep.response_mask)  # a counterfactual branch starts here
        obs_text, obs_cut = cap_text_tokens(
            self.tokenizer, step.observation, cfg.max_obs_tokens, cfg.obs_truncation_marker
        )
        new_messages = ep.messages + [{"role": "user", "content": obs_text}]
        merge, new_mask, new_logprobs = await self.ct_merge_context_msg(
            ep.messages, new_messages, ep.runtime_ids, ep.response_mask, ep.response_logprobs
        )
        if len(new_mask) + cfg.min_turn_tokens + len(self.eot_ids) > self.response_length:
            ep.runner.stop_for_budget()
            return False
        ep.apply_merge(merge, new_mask, new_logprobs)
        ep.messages = new_messages
        ep.runner.observation_shown(capped=obs_cut)
        if step.counterfactual_observation and cfg.counterfactual_bt and ep.env.context.training:
            start = time.perf_counter()
            ep.cf_branches += await self._counterfactual_turn(ep, step.counterfactual_observation, *before_obs)
            ep.cf_time_s += time.perf_counter() - start
        return True

    async def _counterfactual_turn(
        self,
        ep: Rollout,
        observation: str,
        messages: list[dict[str, Any]],
        runtime_ids: list[int],
        response_mask: list[int],
    ) -> int:
        """Sample the next turn after ``observation`` instead of the real one, on a side branch from the
        state before the real observation (``messages``, ``runtime_ids``, ``response_mask``), and hand its
        text to ``env.observe_counterfactual``. The branch is templated, capped and cut exactly like a
        real turn but touches none of the episode's ids, mask, log-probs or layout. Returns 1 if a
        branch was generated, 0 if the response budget left no room for it."""
        cfg = self.loop_config
        obs_text, _ = cap_text_tokens(self.tokenizer, observation, cfg.max_obs_tokens, cfg.obs_truncation_marker)
        branch_messages = messages + [{"role": "user", "content": obs_text}]
        merge, branch_mask, _ = await self.ct_merge_context_msg(
            messages, branch_messages, list(runtime_ids), list(response_mask), None
        )
        max_tokens = min(cfg.max_turn_tokens, self.response_length - len(branch_mask) - len(self.eot_ids))
        if max_tokens < cfg.min_turn_tokens:
            return 0
        params = self._turn_params(ep.sampling_params, max_tokens, ep.env)
        # Same request id: the branch shares the episode's prefix (sticky session, prefix cache).
        output: TokenOutput = await self.server_manager.generate(
            request_id=ep.request_id, prompt_ids=list(merge.token_ids), sampling_params=params, priority=ep.priority
        )
        if is_aborted(output):  # nothing to judge: an empty text would read as the agent's own turn
            ep.runner.branch_aborted()
            return 0
        gen_ids = list(output.token_ids)[:max_tokens]
        cut = cut_turn(self.tokenizer, gen_ids, self.eot_ids, self.stop_ids, tags=ep.env.closing_tags)
        ep.env.observe_counterfactual(cut.text)
        return 1

    def _output(self, ep: Rollout) -> AgentLoopOutput:
        """Score the episode (``env.result()`` through the runner) and return the response with its
        per-token critique fields and the episode record in ``extra_fields``."""
        stats = ep.runner.finish()
        response_ids, response_mask, response_logprobs, cut = ep.response(self.response_length)
        stats.truncated = stats.truncated or cut
        extra_fields: dict[str, Any] = dict(ep.tags)
        extra_fields.update({"turn_scores": [], "tool_rewards": []})  # veRL's multi-turn schema
        extra_fields.update(ep.recorder.as_extra_fields())
        extra_fields.update(stats.as_extra_fields())
        extra_fields.update({CF_BRANCHES: ep.cf_branches, CF_TIME: ep.cf_time_s})
        extra_fields[GT_ANSWER] = ep.env.ground_truth_answer()
        metrics: dict[str, Any] = dict(ep.timing)
        metrics["generate_sequences"] += ep.cf_time_s
        metrics["num_preempted"] = ep.num_preempted if ep.num_preempted is not None else -1
        return AgentLoopOutput(
            prompt_ids=list(ep.prompt_ids),
            response_ids=response_ids,
            response_mask=response_mask,
            response_logprobs=response_logprobs,
            num_turns=1 + stats.turns + ep.runner.observations,
            metrics=metrics,
            # As veRL's ToolAgentLoop does: veRL aligns them to prompt + response and pads the rest.
            routed_experts=(
                None
                if ep.routed_experts is None
                else ep.routed_experts[: len(ep.prompt_ids) + self.response_length]
            ),
            extra_fields=extra_fields,
        )

    # ------------------------------------------------------------------ helpers

    def _turn_params(
        self, sampling_params: Mapping[str, Any], max_tokens: int, env: ActiveReasoningEnv
    ) -> dict[str, Any]:
        """Sampling params of one turn: the per-turn token cap, and the task's closing tags as stop strings
        when ``stop_on_closing_tag`` is on (our token-level cut stays the authority either way)."""
        params = {**sampling_params, "max_tokens": max_tokens}
        if self.loop_config.stop_on_closing_tag:
            params.update(stop=[f"</{tag}>" for tag in env.closing_tags], include_stop_str_in_output=True)
        return params

    @staticmethod
    def _env_spec(row: Mapping[str, Any]) -> Mapping[str, Any]:
        extra_info = row.get("extra_info") or {}
        spec = extra_info.get("env") if isinstance(extra_info, Mapping) else None
        if not isinstance(spec, Mapping):
            raise ValueError(
                "active_reasoning agent loop: the row has no extra_info['env'] dict (the environment spec); "
                f"got extra_info keys {sorted(extra_info) if isinstance(extra_info, Mapping) else type(extra_info)}"
            )
        return spec

    def _env_context(self, spec: Mapping[str, Any], extra_info: Any = None) -> EnvContext:
        """Shared services for one episode. Rows built for evaluation (``split: test`` in the env spec or,
        as the PE builder writes it, in ``extra_info``) are not training."""
        simulator = shared_client(self.loop_config.simulator) if self.loop_config.simulator else None
        split = spec.get("split") or (extra_info.get("split") if isinstance(extra_info, Mapping) else None)
        return EnvContext(simulator=simulator, training=str(split or "train") != "test")

    def describe_config(self) -> dict[str, Any]:
        """Effective knobs (for logs and tests)."""
        return {
            **asdict(self.loop_config),
            "response_length": self.response_length,
            "max_assistant_turns": self.max_assistant_turns,
            "max_user_turns": self.max_user_turns,
            "end_of_turn_ids": list(self.eot_ids),
        }
