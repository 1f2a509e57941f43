"""The running state of one ``active_reasoning`` rollout and its token bookkeeping.

:class:`Rollout` is what the agent loop (:mod:`verl_selflock.verl_adapter.agent_loop`) carries from step
to step, as veRL's ``ToolAgentLoop`` carries its ``AgentData``: the episode (environment, runner,
messages), the request settings, and the response being built. The response's per-token lists always
have one entry per response token, and they are only ever *replaced*, never mutated in place (a
counterfactual branch may start from an earlier state):

* ``response_mask``: 1 on tokens the model generated, 0 on closing, observation and template tokens
  (veRL's ``AgentLoopOutput.response_mask``);
* ``response_logprobs``: the model's log-prob of each generated token, 0.0 elsewhere; None when
  ``sampling_params["logprobs"]`` is not set;
* ``recorder``: the turn id / critique of each token, recorded through the public critique API
  (:class:`~verl_selflock.episode.recorder.CritiqueRecorder`) that any agent loop can use.

The loop calls veRL (server, Continuous Token builder); this module only books the results, duck-typed
on veRL's ``TokenOutput`` and merge results, so it imports no veRL.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from verl_selflock.envs.base import ActiveReasoningEnv
from verl_selflock.episode.recorder import CritiqueRecorder
from verl_selflock.episode.runner import EpisodeRunner

__all__ = ["Rollout", "is_aborted", "record_merge"]

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

# TokenOutput tags the trainer needs per sample (trap: without them the metrics step fails).
_STEP_TAGS = ("global_steps", "min_global_steps", "max_global_steps")


@dataclass
class Rollout:
    """Running state of one episode's rollout."""

    env: ActiveReasoningEnv
    runner: EpisodeRunner
    """The episode's rules: step, count, stop, score (:mod:`verl_selflock.episode.runner`)."""
    messages: list[dict[str, Any]]
    """The conversation so far (prompt, then assistant turns and user observations)."""
    prompt_ids: list[int]
    request_id: str
    sampling_params: dict[str, Any]
    priority: int
    runtime_ids: list[int] = field(init=False)
    """The prompt followed by the response so far (what the next generation continues)."""
    response_mask: list[int] = field(default_factory=list)
    response_logprobs: list[float] | None = field(init=False)
    recorder: CritiqueRecorder = field(default_factory=CritiqueRecorder)
    tags: dict[str, Any] = field(default_factory=dict)
    """The server's per-sample tags (``global_steps`` ...), copied into ``extra_fields``."""
    timing: dict[str, float] = field(default_factory=lambda: {"generate_sequences": 0.0, "tool_calls": 0.0})
    """Seconds spent in generation and in environment steps (veRL's ``AgentLoopOutput.metrics``)."""
    num_preempted: int | None = None
    cf_branches: int = 0
    """Counterfactual side branches generated (training only; their tokens are never trained on)."""
    cf_time_s: float = 0.0
    routed_experts: Any = None
    """The MoE experts the rollout routed each token through, from the latest real turn's generation (it
    covers that call's prompt, i.e. the whole dialogue so far, plus its tokens): what Megatron's routing
    replay (``rollout.enable_rollout_routing_replay``) needs; None when the server does not report it."""

    def __post_init__(self) -> None:
        self.prompt_ids = list(self.prompt_ids)
        self.runtime_ids = list(self.prompt_ids)
        self.response_logprobs = [] if self.want_logprobs else None

    @property
    def want_logprobs(self) -> bool:
        return bool(self.sampling_params.get("logprobs", False))

    def take_generation(
        self, output: Any, max_tokens: int, seconds: float
    ) -> tuple[list[int], list[float]] | None:
        """Book one server call (time, per-sample tags, preemptions) and return its tokens and log-probs,
        validated: a server fault is an error, not a bad action of the model. None when the server
        aborted the request (:func:`is_aborted`). ``output`` is veRL's ``TokenOutput``."""
        self.timing["generate_sequences"] += seconds
        _merge_tags(self.tags, output.extra_fields or {})
        if output.num_preempted is not None:
            self.num_preempted = (self.num_preempted or 0) + output.num_preempted
        if is_aborted(output):
            return None
        if getattr(output, "routed_experts", None) is not None:
            self.routed_experts = output.routed_experts
        gen_ids = list(output.token_ids)
        gen_logprobs = list(output.log_probs) if output.log_probs is not None else []
        if self.want_logprobs:
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

    def apply_merge(self, merge: Any, response_mask: list[int], response_logprobs: list[float] | None) -> None:
        """Take a Continuous Token merge (``ct_merge_assistant_token`` / ``ct_merge_context_msg``) and its
        aligned mask and log-probs, and record it (:func:`record_merge`)."""
        self.runtime_ids, self.response_mask, self.response_logprobs = merge.token_ids, response_mask, response_logprobs
        record_merge(self.recorder, merge)

    def append_closing(self, ids: list[int]) -> None:
        """Append tokens the model did not generate (the template's closing tokens): mask 0, log-prob 0."""
        self.runtime_ids = self.runtime_ids + list(ids)
        self.response_mask = self.response_mask + [0] * len(ids)
        if self.response_logprobs is not None:
            self.response_logprobs = self.response_logprobs + [0.0] * len(ids)
        self.recorder.observe(len(ids))

    def response(self, max_length: int) -> tuple[list[int], list[int], list[float] | None, bool]:
        """``(response_ids, response_mask, response_logprobs, cut)``, checked for consistency and cut to
        ``max_length`` (``cut`` True; the layout too) if the builder inserted more than planned."""
        ids, mask, logprobs = self.runtime_ids[len(self.prompt_ids) :], self.response_mask, self.response_logprobs
        if not (len(ids) == len(mask) == len(self.recorder)) or (logprobs is not None and len(logprobs) != len(mask)):
            raise RuntimeError(
                f"active_reasoning: inconsistent layout: {len(ids)} response ids, {len(mask)} mask, "
                f"{len(self.recorder)} recorded, {None if logprobs is None else len(logprobs)} logprobs"
            )
        if len(ids) <= max_length:
            return list(ids), list(mask), None if logprobs is None else list(logprobs), False
        logger.warning("active_reasoning: response of %d tokens cut to %d", len(ids), max_length)
        self.recorder.truncate(max_length)
        kept_logprobs = None if logprobs is None else list(logprobs[:max_length])
        return list(ids[:max_length]), list(mask[:max_length]), kept_logprobs, True


def record_merge(recorder: CritiqueRecorder, merge: Any) -> None:
    """Record a Continuous Token merge (veRL's ``MergeResult``, duck-typed) in the order
    ``align_response_metadata`` applies it to the mask: drop the removed stale suffix, then the inserted
    boundary tokens (not generated), then the appended tokens: generated in the open turn for an
    assistant merge (``kind == "assistant"``), observed for a context merge."""
    recorder.drop_last(merge.removed_prefix_token_count)
    recorder.observe(len(merge.inserted_token_ids))
    if merge.kind == "assistant":
        recorder.generated(merge.appended_token_count)
    else:
        recorder.observe(merge.appended_token_count)


def is_aborted(output: Any) -> bool:
    """veRL's vLLM server marks a request it aborted (``pause_generation`` before a weight sync) with stop
    reason ``aborted``, with no tokens and no log-probs or with the tokens generated so far
    (``vllm_async_server.py``, 0.9.1, ``generate``). Either way the reply is not a turn of the model."""
    return getattr(output, "stop_reason", None) == "aborted"


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
