"""``tool_agent_arew``: veRL's stock ``ToolAgentLoop`` plus per-turn critiques inferred from its tool calls.

Everything veRL's loop does is veRL's code, run unchanged through ``super()``: the prompt with the tool
schemas, generation, the tool parser (``rollout.multi_turn.format``), tool execution and response
truncation, the turn caps, the outputs (``turn_scores``, ``tool_rewards``, metrics). This subclass only
*watches* it, through four hooks, and records what AREW reads
(:class:`~verl_selflock.episode.recorder.CritiqueRecorder`)::

    response   = [turn_0 | tool_out_0 | turn_1 | tool_out_1 | ... | turn_T]
    turn_ids   =  0 ... 0  -1 ...  -1   1 ... 1  ...
    critique   =  z_0 ...   0 ...   0   z_1 ...  ...

* ``ct_merge_assistant_token`` / ``ct_merge_context_msg``: every Continuous Token merge veRL makes is
  mirrored in the recorder once veRL has applied it (a context merge veRL discards because the response
  budget is spent is discarded here too);
* ``_call_tool``: what each call returned (invalid / raised / output / the tool's reward and metrics);
* ``_handle_generating_state`` / ``_handle_processing_tools_state``: turn boundaries; after the tools
  ran, the turn's calls are judged in order by a :class:`~verl_selflock.tools.critique.ToolCritic`
  (new information +1; invalid call, tool error, exact repeat -1; else 0; a turn without a call 0).

veRL 0.9.1 builds one loop object per trajectory (``AgentLoopWorker._run_agent_loop``), so the
episode's recorder and critic live on the instance; :meth:`run` refuses a second concurrent episode.

Config: the top-level ``selflock_tool_agent`` node of the veRL config, which every agent-loop worker
receives on every node (knobs: :class:`~verl_selflock.tools.loop_config.ToolAgentArewConfig`), over the keys
of a ``tool_agent_arew`` entry of an agent-loop YAML if one declares it; no file is needed (the plugin
registers the loop by name)::

    selflock_tool_agent:
      max_turn_tokens: 48
      critique: {source: interaction, repeat: -1, error_patterns: ["^\\s*error\\b"]}
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopOutput, register
from verl.experimental.agent_loop.tool_agent_loop import AgentData, AgentState, ToolAgentLoop
from verl.experimental.agent_loop.tool_parser import FunctionCall
from verl.tools.schemas import ToolResponse

from verl_selflock.contracts.critique import CHANNEL_AS, CHANNEL_BT
from verl_selflock.episode.recorder import CritiqueRecorder
from verl_selflock.tools.critique import CallVerdict, ToolCritic, tool_record, turn_critique
from verl_selflock.tools.loop_config import TOOL_AGENT_NAME, TOOL_CONFIG_KEY, ToolAgentArewConfig
from verl_selflock.verl_adapter.agent_loop_config import merged_knobs, pop_entry_knobs
from verl_selflock.verl_adapter.rollout import record_merge

__all__ = ["ArewToolAgentLoop"]

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

# veRL 0.9.1 tool_agent_loop.py, ToolAgentLoop._call_tool: the text it returns when a tool raised.
_RAISED_PREFIX = "Error executing tool '{name}':"


@dataclass
class _CallFacts:
    """What one tool call did, as ``_call_tool`` saw it (judged later, in call order)."""

    call: FunctionCall
    output: str
    invalid: bool
    raised: bool
    state_changed: bool
    tool_reward: float | None


@dataclass
class _Episode:
    recorder: CritiqueRecorder = field(default_factory=CritiqueRecorder)
    critic: ToolCritic = field(default_factory=ToolCritic)
    pending_merge: tuple[Any, list[int]] | None = None
    """The latest Continuous Token merge and the aligned mask veRL got for it (applied or not)."""
    calls: list[_CallFacts] = field(default_factory=list)
    verdicts: list[list[CallVerdict]] = field(default_factory=list)
    """Per assistant turn, its calls' verdicts (for tests and logs)."""


@register(TOOL_AGENT_NAME)
class ArewToolAgentLoop(ToolAgentLoop):
    """veRL's ``ToolAgentLoop`` that also writes AREW's per-token critique fields (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # ``**kwargs`` carries veRL's own arguments (tools, tokenizer, trainer_config, ...) and, from an
        # agent-loop YAML entry, ``name`` and our knobs: ours are taken out before veRL's loop sees them.
        entry_knobs = pop_entry_knobs(kwargs, ToolAgentArewConfig.knob_names())
        super().__init__(*args, **kwargs)
        # self.config: the whole veRL config (AgentLoopBase), the same on every node; its node wins.
        knobs = merged_knobs(self.config, entry_knobs, TOOL_CONFIG_KEY)
        self.arew_config = ToolAgentArewConfig.from_mapping(knobs, where=TOOL_CONFIG_KEY)
        self._stop_tag: str | None = getattr(self.tool_parser, "tool_call_end_token", None)
        self._start_tag: str | None = getattr(self.tool_parser, "tool_call_start_token", None)
        if self.arew_config.stop_after_tool_call and not self._stop_tag:
            raise ValueError(
                f"{TOOL_AGENT_NAME}: stop_after_tool_call needs a tool parser with an end tag; "
                f"rollout.multi_turn.format={self.tool_parser_name!r} has none"
            )
        self._episode: _Episode | None = None

    async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs: Any) -> AgentLoopOutput:
        if self._episode is not None:
            raise RuntimeError(f"{TOOL_AGENT_NAME}: one loop object runs one episode at a time")
        self._episode = ep = _Episode(critic=ToolCritic(self.arew_config.critique))
        try:
            output = await super().run(sampling_params, priority=priority, **kwargs)
            return self._with_critiques(output, ep)
        finally:
            self._episode = None

    # ------------------------------------------------------------------ hooks on veRL's loop

    async def ct_merge_assistant_token(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().ct_merge_assistant_token(*args, **kwargs)
        self._stash_merge(result)
        return result

    async def ct_merge_context_msg(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().ct_merge_context_msg(*args, **kwargs)
        self._stash_merge(result)
        return result

    async def _handle_generating_state(
        self, agent_data: AgentData, sampling_params: dict[str, Any], ignore_termination: bool = False
    ) -> AgentState:
        ep = self._require_episode()
        ep.recorder.begin_turn()
        messages_before = len(agent_data.messages)
        state = await super()._handle_generating_state(agent_data, self._turn_params(sampling_params), ignore_termination)
        # veRL applies the assistant merge unconditionally (before its termination checks).
        self._record_pending(applied=True)
        if state != AgentState.PROCESSING_TOOLS:
            parsed = len(agent_data.messages) > messages_before  # False: a turn cap ended it before parsing
            ep.verdicts.append([])
            critique = ep.critic.final_critique(self._turn_score(agent_data, ep.recorder.open_turn), answered=parsed)
            if parsed and self._opened_unparsed_call(agent_data):
                verdict = ep.critic.judge_unparsed_call()
                ep.verdicts[-1].append(verdict)
                critique = verdict.critique
            ep.recorder.end_turn(critique, self._channel)
        return state

    async def _handle_processing_tools_state(self, agent_data: AgentData) -> AgentState:
        ep = self._require_episode()
        ep.calls = []
        state = await super()._handle_processing_tools_state(agent_data)
        # veRL keeps the tool responses' merge only when the next turn still fits (else TERMINATED).
        self._record_pending(applied=state == AgentState.GENERATING)
        ran = agent_data.tool_calls[: self.max_parallel_calls]
        facts = [next(f for f in ep.calls if f.call is call) for call in ran]
        verdicts = [
            ep.critic.judge_call(
                f.call.name,
                f.call.arguments,
                f.output,
                invalid=f.invalid,
                raised=f.raised,
                state_changed=f.state_changed,
                tool_reward=f.tool_reward,
            )
            for f in facts
        ]
        ep.verdicts.append(verdicts)
        score = self._turn_score(agent_data, ep.recorder.open_turn)
        ep.recorder.end_turn(
            turn_critique((v.critique for v in verdicts), score, self.arew_config.critique.source), self._channel
        )
        return state

    async def _call_tool(
        self, tool_call: FunctionCall, tools_kwargs: dict[str, Any], agent_data: AgentData
    ) -> tuple[ToolResponse, float, dict]:
        active = getattr(agent_data, "_active_tools", self.tools)
        invalid = tool_call.name not in active or not _json_object(tool_call.arguments)
        response, reward, metrics = await super()._call_tool(tool_call, tools_kwargs, agent_data)
        text = response.text or ""
        raised = not invalid and text.startswith(_RAISED_PREFIX.format(name=tool_call.name))
        changed = isinstance(metrics, dict) and bool(metrics.get("state_changed", False))
        reward_value = None if reward is None else float(reward)
        self._require_episode().calls.append(_CallFacts(tool_call, text, invalid, raised, changed, reward_value))
        return response, reward, metrics

    # ------------------------------------------------------------------ helpers

    @property
    def _channel(self) -> int:
        return CHANNEL_BT if self.arew_config.critique.channel == "bt" else CHANNEL_AS

    def _require_episode(self) -> _Episode:
        if self._episode is None:
            raise RuntimeError(f"{TOOL_AGENT_NAME}: a state handler ran outside run()")
        return self._episode

    def _stash_merge(self, result: Any) -> None:
        if self._episode is not None:
            merge, aligned_mask, _ = result
            self._episode.pending_merge = (merge, aligned_mask)

    def _record_pending(self, applied: bool) -> None:
        ep = self._require_episode()
        if ep.pending_merge is not None and applied:
            record_merge(ep.recorder, ep.pending_merge[0])
        ep.pending_merge = None

    def _turn_params(self, sampling_params: dict[str, Any]) -> dict[str, Any]:
        cfg = self.arew_config
        params = dict(sampling_params)
        if cfg.max_turn_tokens is not None:
            params["max_tokens"] = min(int(params.get("max_tokens", cfg.max_turn_tokens)), cfg.max_turn_tokens)
        if cfg.stop_after_tool_call and self._stop_tag:
            stops = params.get("stop") or []
            stops = [stops] if isinstance(stops, str) else list(stops)
            params.update(stop=[*stops, self._stop_tag], include_stop_str_in_output=True)
        return params

    def _opened_unparsed_call(self, agent_data: AgentData) -> bool:
        """The turn wrote the parser's tool-call start tag, yet no call was parsed from it."""
        if not self._start_tag or agent_data.tool_calls:
            return False
        return self._start_tag in self.tokenizer.decode(agent_data.response_ids)

    @staticmethod
    def _turn_score(agent_data: AgentData, turn: int | None) -> float | None:
        scores = agent_data.turn_scores
        return float(scores[turn]) if turn is not None and turn < len(scores) else None

    def _with_critiques(self, output: AgentLoopOutput, ep: _Episode) -> AgentLoopOutput:
        """Cut the recorded layout as veRL cut the response, check they line up, add the fields."""
        ep.recorder.truncate(self.response_length)
        if len(ep.recorder) != len(output.response_ids):
            raise RuntimeError(
                f"{TOOL_AGENT_NAME}: recorded {len(ep.recorder)} tokens for a response of "
                f"{len(output.response_ids)}: the critiques would not line up with the tokens"
            )
        output.extra_fields.update(ep.recorder.as_extra_fields())
        output.extra_fields.update(tool_record(ep.critic.counts(), ep.recorder.num_turns))
        return output


def _json_object(arguments: str) -> bool:
    """veRL runs a call whose arguments parse as JSON; a tool needs an object (a dict) of arguments."""
    try:
        return isinstance(json.loads(arguments), dict)
    except (TypeError, ValueError):
        return False
