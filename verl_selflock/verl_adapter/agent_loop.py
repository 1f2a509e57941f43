"""``active_reasoning``: the task-agnostic multi-turn agent loop of active-reasoning tasks.

All task knowledge lives in the environment (:mod:`verl_selflock.envs`), built per sample from the
row's ``extra_info["env"]``. The loop only generates turns, cuts them, asks the environment, labels
the turns and lays the tokens out::

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

The episode stops at an ``<answer>`` turn, when the environment says it is done, at the turn cap,
or when the next turn would not fit in ``rollout.response_length``. The budget is checked before
every generation (``max_tokens`` = the smaller of ``max_turn_tokens`` and what is left, minus the
closing tokens) and before appending an observation, so the response always ends with a closed
assistant message and never needs a blind cut. A turn that stops only because the *remaining budget*
ran out is not shown to the environment (critique 0, ``selflock_truncated``); a turn that exhausts
its own ``max_turn_tokens`` is, and the environment judges it (usually an invalid action).

Counterfactual branches (training rows only, knob ``counterfactual_bt``): when a step carries
``counterfactual_observation``, the loop also renders that text as the user message in place of the
real observation and samples the next turn from there (same template, per-turn cap and token cut),
hands the text to ``env.observe_counterfactual`` and discards the tokens: they never enter the
response, mask, log-probs or layout. Counted in ``extra_fields`` (``selflock_cf_branches``,
``selflock_cf_time_s``).

Reward: the loop does not set ``AgentLoopOutput.reward_score``. It stores the environment's outcome
(:mod:`verl_selflock.contracts.episode`) in ``extra_fields``; veRL's reward loop hands those to
our ``active_reasoning`` reward manager (:mod:`verl_selflock.verl_adapter.reward_manager`) as ``tool_extra_fields``,
so the reward path stays the official one (and ``reward.reward_manager.name`` stays meaningful).

Config (agent-loop YAML at ``actor_rollout_ref.rollout.agent.agent_loop_config_path``, see
``active_reasoning.yaml`` beside this file; every key is optional)::

    - name: active_reasoning
      _target_: verl_selflock.verl_adapter.agent_loop.ActiveReasoningAgentLoop
      max_turn_tokens: 512
      max_obs_tokens: 512
      t3: {enabled: true, signal: auto, k: 2}   # optional: T3 truncation (verl_selflock.algorithms.t3)

T3: after each turn that the environment judged, the turn's ``StepResult.progress`` goes to a
:class:`~verl_selflock.algorithms.t3.T3Monitor`; when it fires (and the episode would otherwise go on)
the episode ends there (``stop_reason`` ``t3``) and is scored by ``env.result()`` like any other.

veRL settings read: ``rollout.response_length`` (total budget), ``rollout.multi_turn.max_assistant_turns``
and ``rollout.multi_turn.max_user_turns`` (extra caps when set), ``rollout.full_determinism``,
``data.apply_chat_template_kwargs``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register
from verl.utils.rollout_trace import rollout_trace_op
from verl.workers.rollout.replica import TokenOutput

from verl_selflock.contracts.episode import (
    CF_BRANCHES,
    CF_TIME,
    GT_ANSWER,
    STOP_ANSWER,
    STOP_DONE,
    STOP_MAX_TURNS,
    STOP_RESPONSE_LENGTH,
    STOP_T3,
    EpisodeStats,
)
from verl_selflock.episode.token_cut import (
    ENDED_BY_LENGTH,
    cap_text_tokens,
    cut_turn,
    end_of_turn_ids,
)
from verl_selflock.algorithms.t3 import T3Config, T3Monitor, T3Rule
from verl_selflock.envs import ActiveReasoningEnv, EnvContext, make_env
from verl_selflock.envs.base import registered_progress_signals
from verl_selflock.contracts.critique import ResponseLayout
from verl_selflock.contracts.names import AGENT_NAME
from verl_selflock.simulators import SimulatorConfig, shared_client

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

AGENT_LOOP_CONFIG_PATH = str(Path(__file__).with_name("active_reasoning.yaml"))
"""Absolute path of the default agent-loop YAML, for ``rollout.agent.agent_loop_config_path``."""


# TokenOutput tags the trainer needs per sample (trap: without them the metrics step fails).
_STEP_TAGS = ("global_steps", "min_global_steps", "max_global_steps")


@dataclass
class ActiveReasoningLoopConfig:
    """Knobs of the ``active_reasoning`` agent loop (keys of its agent-loop YAML entry)."""

    max_turn_tokens: int = 512
    """Most tokens one agent turn may generate (the papers' "max response per turn"), passed to the
    server as ``max_tokens``; further capped by what is left of ``rollout.response_length``."""
    max_obs_tokens: int = 512
    """Most tokens of one observation's *text* (before the chat template wraps it)."""
    max_turns: int | None = None
    """Override the episode length in the row's env spec (even, >= 2); None: use the row's."""
    min_turn_tokens: int = 16
    """Do not start another turn (do not even append its observation) unless at least this many
    tokens could be generated in it; the episode ends as truncated instead."""
    stop_on_closing_tag: bool = False
    """Also ask the server to stop on the environment's closing tags (``</interact>`` / ``</answer>``; ``stop`` and
    ``include_stop_str_in_output`` sampling params: vLLM understands them; our token-level cut stays
    the authority). Saves generating past the tag; leave off for servers that reject unknown keys."""
    obs_truncation_marker: str = " ...(truncated)"
    """Appended to a capped observation (counted inside ``max_obs_tokens``)."""
    simulator: dict[str, Any] | None = None
    """OpenAI-compatible endpoint of the simulated user/patient for tasks that have one (MediQ, FloDial,
    tau2): keys of :class:`verl_selflock.simulators.SimulatorConfig`. One client per worker process is
    shared by all its episodes (concurrency limit, reply cache)."""
    counterfactual_bt: bool = True
    """Honour environments' requests for counterfactual branches (``StepResult.counterfactual_observation``,
    MediQ's counterfactual BT critique) in training rollouts: the next turn is also sampled after the
    counterfactual observation, on a side branch whose tokens never enter the response. False: never."""

    t3: T3Config | Mapping[str, Any] | None = None
    """T3 truncation settings (``t3.enabled``, ``signal``, ``k``, ``delta_min``, ``min_turn``); off by default."""

    def __post_init__(self) -> None:
        if self.simulator is not None:
            self.simulator = SimulatorConfig.from_mapping(self.simulator).as_dict()
        self.t3 = T3Config.from_mapping(self.t3)
        self.t3.check_signal_known(registered_progress_signals())
        for name in ("max_turn_tokens", "max_obs_tokens", "min_turn_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"active_reasoning agent loop: {name} must be a positive int, got {value!r}")
        if self.max_turns is not None and (self.max_turns < 2 or self.max_turns % 2):
            raise ValueError(f"active_reasoning agent loop: max_turns must be even and >= 2, got {self.max_turns!r}")


@register(AGENT_NAME)
class ActiveReasoningAgentLoop(AgentLoopBase):
    """Multi-turn rollout of one active-reasoning episode; see the module docstring for the layout."""

    def __init__(
        self,
        *args: Any,
        max_turn_tokens: int = 512,
        max_obs_tokens: int = 512,
        max_turns: int | None = None,
        min_turn_tokens: int = 16,
        stop_on_closing_tag: bool = False,
        obs_truncation_marker: str = " ...(truncated)",
        simulator: Mapping[str, Any] | None = None,
        counterfactual_bt: bool = True,
        t3: Mapping[str, Any] | None = None,
        tools: Any = None,
        **kwargs: Any,
    ) -> None:
        # ``tools`` (veRL's tool list) is not used: the environment is the only counterpart.
        # ``**kwargs`` also swallows ``name`` from an agent-loop YAML entry.
        super().__init__(*args, **kwargs)
        self.loop_config = ActiveReasoningLoopConfig(
            max_turn_tokens=int(max_turn_tokens),
            max_obs_tokens=int(max_obs_tokens),
            max_turns=None if max_turns is None else int(max_turns),
            min_turn_tokens=int(min_turn_tokens),
            stop_on_closing_tag=bool(stop_on_closing_tag),
            obs_truncation_marker=str(obs_truncation_marker),
            simulator=None if simulator is None else dict(simulator.items()),
            counterfactual_bt=bool(counterfactual_bt),
            t3=_plain(t3),
        )
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
        cfg = self.loop_config
        priority = int(priority)

        # 1. the episode and the prompt
        messages: list[dict[str, Any]] = list(kwargs["raw_prompt"])
        spec = self._env_spec(kwargs)
        env = make_env(spec, max_turns=cfg.max_turns, context=self._env_context(spec, kwargs.get("extra_info")))
        turn_cap = env.max_turns if not self.max_assistant_turns else min(env.max_turns, self.max_assistant_turns)
        prompt_ids = await self.ct_build_initial_tokens(messages)
        runtime_ids = list(prompt_ids)
        # T3 changes where training rollouts stop; evaluation rows (split: test) play to the end so
        # validation reports untruncated success.
        use_t3 = cfg.t3.enabled and env.context.training
        t3 = T3Monitor(T3Rule.resolve(cfg.t3, env.task, type(env).progress_signals)) if use_t3 else None

        want_logprobs = bool(sampling_params.get("logprobs", False))
        response_mask: list[int] = []
        response_logprobs: list[float] | None = [] if want_logprobs else None
        layout = ResponseLayout()
        stats = EpisodeStats(task=env.task, t3_enabled=t3 is not None)
        tags: dict[str, Any] = {}
        timing = {"generate_sequences": 0.0, "tool_calls": 0.0}
        branches = {"count": 0, "time_s": 0.0}  # counterfactual side branches (training only)
        num_preempted: int | None = None
        user_turns = 0
        request_id = f"det-{priority}" if self.rollout_config.get("full_determinism", False) else uuid4().hex

        turn = 0
        while True:
            # 2. generate one turn within the per-turn cap and what is left of the response budget
            room = self.response_length - len(response_mask) - len(self.eot_ids)
            max_tokens = min(cfg.max_turn_tokens, room)
            turn_params = self._turn_params(sampling_params, max_tokens, env)
            start = time.perf_counter()
            output: TokenOutput = await self.server_manager.generate(
                request_id=request_id, prompt_ids=runtime_ids, sampling_params=turn_params, priority=priority
            )
            timing["generate_sequences"] += time.perf_counter() - start
            self._merge_tags(tags, output.extra_fields or {})
            if output.num_preempted is not None:
                num_preempted = (num_preempted or 0) + output.num_preempted
            gen_ids, gen_logprobs = self._checked_generation(output, max_tokens, want_logprobs)

            # 3. cut after the first closing tag, keep the model's tokens, close the message
            cut = cut_turn(self.tokenizer, gen_ids, self.eot_ids, self.stop_ids, tags=env.closing_tags)
            kept_logprobs = gen_logprobs[: len(cut.kept_ids)] if want_logprobs else None
            merge, response_mask, response_logprobs = await self.ct_merge_assistant_token(
                runtime_ids, cut.kept_ids, response_mask, response_logprobs, assistant_logprobs=kept_logprobs
            )
            runtime_ids = merge.token_ids
            _sync_layout(layout, merge, turn)
            runtime_ids = runtime_ids + cut.closing_ids
            response_mask = response_mask + [0] * len(cut.closing_ids)
            if response_logprobs is not None:
                response_logprobs = response_logprobs + [0.0] * len(cut.closing_ids)
            layout.add_observation_tokens(len(cut.closing_ids))
            stats.turns += 1

            if cut.ended_by == ENDED_BY_LENGTH and max_tokens < cfg.max_turn_tokens and len(gen_ids) >= max_tokens:
                # Cut by the response budget, not by the model: no critique, no environment step.
                stats.truncated, stats.stop_reason = True, STOP_RESPONSE_LENGTH
                break

            # 4. the environment judges the turn
            round_kind = env.next_round().value
            start = time.perf_counter()
            step = await env.step(cut.text)
            timing["tool_calls"] += time.perf_counter() - start
            layout.set_label(turn, step.label)
            stats.count_step(round_kind, step, closing_tag=cut.tag)
            messages.append({"role": "assistant", "content": cut.text})
            turn += 1

            if step.done or cut.tag == "answer":
                stats.stop_reason = STOP_ANSWER if cut.tag == "answer" else STOP_DONE
                break
            if turn >= turn_cap or (self.max_user_turns and user_turns >= self.max_user_turns):
                stats.stop_reason = STOP_MAX_TURNS
                break
            if not step.observation:
                stats.stop_reason = STOP_DONE
                break
            if t3 is not None and t3.observe(step.progress):
                # Belief trapped: end here; env.result() scores the episode as it stands.
                room_left = self.response_length - len(response_mask)
                stats.t3_truncated, stats.t3_turn, stats.stop_reason = True, turn, STOP_T3
                # An upper bound: the episode could have ended sooner or used shorter turns.
                stats.t3_budget_saved = max(0, min(room_left, (turn_cap - turn) * cfg.max_turn_tokens))
                break

            # 5. the observation as a user message + the next assistant header (mask 0, turn id -1)
            before_obs = (messages, runtime_ids, response_mask)  # never mutated in place: a branch may start here
            obs_text, obs_cut = cap_text_tokens(
                self.tokenizer, step.observation, cfg.max_obs_tokens, cfg.obs_truncation_marker
            )
            new_messages = messages + [{"role": "user", "content": obs_text}]
            merge, new_mask, new_logprobs = await self.ct_merge_context_msg(
                messages, new_messages, runtime_ids, response_mask, response_logprobs
            )
            if len(new_mask) + cfg.min_turn_tokens + len(self.eot_ids) > self.response_length:
                stats.truncated, stats.stop_reason = True, STOP_RESPONSE_LENGTH
                break
            runtime_ids, response_mask, response_logprobs = merge.token_ids, new_mask, new_logprobs
            _sync_layout(layout, merge, None)
            messages = new_messages
            user_turns += 1
            stats.obs_truncated += int(obs_cut)
            if step.counterfactual_observation and cfg.counterfactual_bt and env.context.training:
                start = time.perf_counter()
                branches["count"] += await self._counterfactual_turn(
                    env, step.counterfactual_observation, *before_obs, request_id, sampling_params, priority
                )
                branches["time_s"] += time.perf_counter() - start

        # 6. outcome and output
        result = env.result()
        stats.reward, stats.success, stats.answered = float(result.reward), bool(result.success), bool(result.answered)
        stats.env_metrics = dict(result.metrics)

        response_ids = runtime_ids[len(prompt_ids) :]
        if not (len(response_ids) == len(response_mask) == len(layout)) or (
            response_logprobs is not None and len(response_logprobs) != len(response_mask)
        ):
            raise RuntimeError(
                f"active_reasoning: inconsistent layout: {len(response_ids)} response ids, {len(response_mask)} "
                f"mask, {len(layout)} layout, {None if response_logprobs is None else len(response_logprobs)} logprobs"
            )
        if len(response_ids) > self.response_length:  # only if the builder inserted more than planned
            logger.warning("active_reasoning: response of %d tokens cut to %d", len(response_ids), self.response_length)
            response_ids, response_mask = response_ids[: self.response_length], response_mask[: self.response_length]
            if response_logprobs is not None:
                response_logprobs = response_logprobs[: self.response_length]
            layout.truncate(self.response_length)
            stats.truncated = True

        extra_fields: dict[str, Any] = dict(tags)
        extra_fields.update({"turn_scores": [], "tool_rewards": []})  # veRL's multi-turn schema
        extra_fields.update(layout.as_extra_fields())
        extra_fields.update(stats.as_extra_fields())
        extra_fields.update({CF_BRANCHES: branches["count"], CF_TIME: branches["time_s"]})
        timing["generate_sequences"] += branches["time_s"]
        extra_fields[GT_ANSWER] = env.ground_truth_answer()
        metrics: dict[str, Any] = dict(timing)
        metrics["num_preempted"] = num_preempted if num_preempted is not None else -1
        return AgentLoopOutput(
            prompt_ids=list(prompt_ids),
            response_ids=list(response_ids),
            response_mask=list(response_mask),
            response_logprobs=list(response_logprobs) if response_logprobs is not None else None,
            num_turns=1 + stats.turns + user_turns,
            metrics=metrics,
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

    async def _counterfactual_turn(
        self,
        env: ActiveReasoningEnv,
        observation: str,
        messages: list[dict[str, Any]],
        runtime_ids: list[int],
        response_mask: list[int],
        request_id: str,
        sampling_params: dict[str, Any],
        priority: int,
    ) -> int:
        """Sample the next turn after ``observation`` instead of the real one, on a side branch, and hand
        its text to ``env.observe_counterfactual``. The branch is templated, capped and cut exactly like a
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
        params = self._turn_params(sampling_params, max_tokens, env)
        # Same request id: the branch shares the episode's prefix (sticky session, prefix cache).
        output: TokenOutput = await self.server_manager.generate(
            request_id=request_id, prompt_ids=list(merge.token_ids), sampling_params=params, priority=priority
        )
        cut = cut_turn(self.tokenizer, list(output.token_ids)[:max_tokens], self.eot_ids, self.stop_ids, tags=env.closing_tags)
        env.observe_counterfactual(cut.text)
        return 1

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

    @staticmethod
    def _merge_tags(tags: dict[str, Any], fields: Mapping[str, Any]) -> None:
        """Copy the server's per-sample tags; later turns only move ``max_global_steps`` forward."""
        if not tags:
            tags.update(fields)
            # The client normally fills min/max from global_steps; make sure they exist.
            for key in _STEP_TAGS[1:]:
                tags.setdefault(key, fields.get("global_steps"))
            return
        if fields.get("max_global_steps") is not None:
            tags["max_global_steps"] = fields["max_global_steps"]

    @staticmethod
    def _checked_generation(
        output: TokenOutput, max_tokens: int, want_logprobs: bool
    ) -> tuple[list[int], list[float]]:
        """The server's tokens and log-probs, validated (a server fault is an error, not a bad action)."""
        gen_ids = list(output.token_ids)
        gen_logprobs = list(output.log_probs) if output.log_probs is not None else []
        if want_logprobs:
            if output.log_probs is None:
                raise RuntimeError(
                    "the rollout server returned no log-probs although sampling_params['logprobs'] is set"
                )
            if len(gen_logprobs) != len(gen_ids):
                raise RuntimeError(
                    f"the rollout server returned {len(gen_logprobs)} log-probs for {len(gen_ids)} tokens"
                )
        if len(gen_ids) > max_tokens:
            logger.warning("active_reasoning: server returned %d tokens for max_tokens=%d", len(gen_ids), max_tokens)
            gen_ids, gen_logprobs = gen_ids[:max_tokens], gen_logprobs[:max_tokens]
        return gen_ids, gen_logprobs

    def describe_config(self) -> dict[str, Any]:
        """Effective knobs (for logs and tests)."""
        return {
            **asdict(self.loop_config),
            "response_length": self.response_length,
            "max_assistant_turns": self.max_assistant_turns,
            "max_user_turns": self.max_user_turns,
            "end_of_turn_ids": list(self.eot_ids),
        }


def _plain(node: Any) -> Any:
    """An OmegaConf node of the agent-loop YAML as plain Python (Hydra hands nested mappings as DictConfig)."""
    if node is None or isinstance(node, T3Config):
        return node
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover  (omegaconf ships with veRL)
        pass
    return dict(node) if isinstance(node, Mapping) else node


def _sync_layout(layout: ResponseLayout, merge: Any, turn: int | None) -> None:
    """Mirror a Continuous Token merge in the layout, in the order ``align_response_metadata`` applies it:
    drop removed prefix tokens, add inserted boundary tokens (not generated), then the appended tokens
    (generated by ``turn``, or context tokens when ``turn`` is None)."""
    if merge.removed_prefix_token_count:
        layout.truncate(len(layout) - merge.removed_prefix_token_count)
    layout.add_observation_tokens(len(merge.inserted_token_ids))
    if turn is None:
        layout.add_observation_tokens(merge.appended_token_count)
    else:
        layout.add_turn_tokens(turn, merge.appended_token_count)

