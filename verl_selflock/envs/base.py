"""The interface every active-reasoning task implements (plain Python: no veRL, no Ray).

An episode is built from a dataset row's ``extra_info["env"]`` dict. The agent loop feeds it the
text of each agent turn (already cut right after the first closing tag) and gets back the feedback
to show the agent, the turn's directional critique and whether the episode is over. Rounds
alternate Action (odd turns, AS critique), Update (even turns, BT critique), ..., and the turn
``max_turns`` is the answer turn (critique 0). An ``<answer>`` block in any turn ends the episode.

To add a task: subclass :class:`ActiveReasoningEnv` (or :class:`RoundBasedEnv`, which routes the
paper's Action / Update / Answer rounds to three methods: PE; or its subclass
:class:`verl_selflock.envs.simulated_user.SimulatedUserEnv` for a task that asks a simulated user and
tracks a belief over options: MediQ, FloDial), decorate it with
``@register_env("name")``, and write rows whose ``extra_info["env"]["task"] == "name"``. The class
states only what differs from the defaults: ``default_max_turns``, ``needs_simulator`` (with its
``simulator_hint``), the names of its ``counters``. Put the task in its own package
``verl_selflock/envs/<task>/`` (environment, prompts, parsing ...).

Baselines (optional, per task):

* T3 (truncate belief-trapped episodes, :mod:`verl_selflock.algorithms.t3`): report a per-turn
  progress measure in ``StepResult.progress`` (signal name -> value; leave it empty on turns that do not
  measure progress) and declare each signal's default window in ``progress_signals``. Generic signal:
  :data:`NEW_INFORMATION_SIGNAL` (1.0 if the turn's feedback brought new information, else 0.0: MediQ
  and FloDial on Action rounds, k = 2; tau2 on every turn, k = 3 from turn 6, where a state change
  counts as new information).
* IGPO (:mod:`verl_selflock.algorithms.igpo`): return the ground-truth answer text from
  :meth:`ActiveReasoningEnv.ground_truth_answer`, written exactly as the agent should answer it.
"""

from __future__ import annotations

import enum
import inspect
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from verl_selflock.contracts.critique import CHANNEL_NONE, TurnLabel
from verl_selflock.envs.parsing import Parsed, cut_after_first_closing_tag, extract_block
from verl_selflock.simulators.client import ChatReply

logger = logging.getLogger(__name__)


class RoundKind(str, enum.Enum):
    ACTION = "action"
    UPDATE = "update"
    ANSWER = "answer"


def round_kind(turn: int, max_turns: int) -> RoundKind:
    """Kind of the 1-based ``turn`` in an episode of ``max_turns`` (even) turns."""
    if turn >= max_turns:
        return RoundKind.ANSWER
    return RoundKind.ACTION if turn % 2 == 1 else RoundKind.UPDATE


@dataclass
class StepResult:
    """What the environment answers to one agent turn."""

    observation: str | None
    """Text shown to the agent as the next user message; None when the episode is over."""
    label: TurnLabel
    """The turn's critique (and channel)."""
    done: bool
    """The episode is over (answer given, answer turn reached, or nothing more to say)."""
    valid: bool = True
    """The turn's action/guess/answer parsed and was admissible."""
    repeated: bool = False
    """The action repeated an earlier one."""
    info: dict[str, Any] = field(default_factory=dict)
    """Task-specific details (parsed action, feedback, Psi_hat ...) for diagnostics and tests."""
    counterfactual_observation: str | None = None
    """Training-only request: also sample the agent's next turn after *this* text instead of
    ``observation``, on a side branch whose tokens are never trained on, and hand that turn to
    :meth:`ActiveReasoningEnv.observe_counterfactual` before the real next turn (MediQ's
    counterfactual BT critique: how far does the belief move after a null reply?)."""
    progress: dict[str, float] = field(default_factory=dict)
    """T3 progress measures of this turn, signal name -> d(H_t-1, H_t) (see ``progress_signals``); empty
    when the turn does not measure progress (it then does not enter T3's window)."""


@dataclass
class EpisodeResult:
    """Outcome of a finished (or cut) episode."""

    reward: float
    """Outcome reward of the answer the episode actually produced (0 if none)."""
    success: bool
    answered: bool
    """The agent produced a well-formed final answer."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Per-sample task-specific scalars: turns, invalid/repeated actions, simulator calls ... (not the
    critique counts: the episode runner counts those from each turn's label)."""


@dataclass(frozen=True)
class ProgressSignal:
    """Defaults of T3 for one progress signal an environment reports in ``StepResult.progress``.

    T3 cuts the episode after turn t >= ``min_turn`` when the last ``k`` measured turns all have
    progress <= ``delta_min``.
    """

    k: int
    delta_min: float = 0.0
    min_turn: int = 0
    description: str = ""


ROUND_COUNTERS = ("action_rounds", "update_rounds", "invalid_actions", "invalid_guesses", "repeats")
"""The counters every :class:`RoundBasedEnv` task keeps first (a task appends its own)."""

NEW_INFORMATION_SIGNAL = "new_information"
"""T3 signal of the simulator tasks (MediQ, FloDial, tau2): 1.0 when the turn's feedback brought
information not seen before (``StepResult.info["new_information"]``), else 0.0."""


@dataclass
class EnvContext:
    """What an episode may use besides its spec: shared services and the run's mode."""

    simulator: Any = None
    """The simulated user/patient: an object with ``async chat(messages, *, cache_key=None, ...)
    -> ChatReply`` (:class:`verl_selflock.simulators.ChatClient`); None for tasks that need none."""
    training: bool = True
    """Training rollouts (False for validation/eval): training-only extras such as counterfactual
    branches are skipped otherwise."""
    withhold_feedback: bool = False
    """Feedback ablation (``verl-selflock eval --feedback unknown``): every feedback the agent would
    get is replaced by the task's :attr:`ActiveReasoningEnv.uninformative_feedback`. Critiques and the
    reward are computed as usual, so the run measures how much the agent relies on interaction."""


class ActiveReasoningEnv(ABC):
    """One episode of an active-reasoning task."""

    task: ClassVar[str] = ""
    closing_tags: ClassVar[tuple[str, ...]] = ("interact", "answer")
    """Tags whose closing form (``</tag>``) ends an agent turn: the agent loop cuts each generation
    right after the first of them (a task with another turn format, e.g. tau2's ``<message>`` /
    ``<tool_call>``, overrides this)."""
    uninformative_feedback: ClassVar[str | None] = None
    """The task's reply that carries no information (MediQ's "cannot answer", FloDial's "Unknown.").
    A task that sets it must show it instead of its real feedback when ``context.withhold_feedback``
    is set; None means the task does not support the feedback ablation."""
    progress_signals: ClassVar[Mapping[str, ProgressSignal]] = {}
    """T3 progress signals this task reports, name -> defaults; the first one is the task's default."""
    default_max_turns: ClassVar[int | None] = None
    """Turn budget of a spec that names no ``max_turns`` (None: the spec must name it)."""
    needs_simulator: ClassVar[bool] = False
    """The task talks to a simulated user/patient: building an episode without
    ``context.simulator`` raises ``ValueError(simulator_hint)``."""
    simulator_hint: ClassVar[str] = "this task needs a simulator: set the agent loop's `simulator:` knob"
    """The error message when a task that :attr:`needs_simulator` gets none (says how to configure one)."""
    counters: ClassVar[tuple[str, ...]] = ()
    """Names of the task's per-episode counters, all 0 at the start (:attr:`counts`, :meth:`count`);
    :meth:`counter_metrics` reports them, in this order, in ``EpisodeResult.metrics``. Critiques are
    not counted here: the episode runner counts them from each ``StepResult.label``."""

    def __init__(
        self, spec: Mapping[str, Any], max_turns: int | None = None, context: EnvContext | None = None
    ) -> None:
        default = self.spec_default_max_turns(spec)
        self.spec = dict(spec) if default is None else {**spec, "max_turns": spec.get("max_turns", default)}
        self.context = context if context is not None else EnvContext()
        self.max_turns = int(max_turns if max_turns is not None else self.spec["max_turns"])
        if self.max_turns < 2 or self.max_turns % 2:
            raise ValueError(f"max_turns must be an even number >= 2, got {self.max_turns}")
        if self.needs_simulator and self.context.simulator is None:
            raise ValueError(self.simulator_hint)
        self.turn = 0  # number of agent turns received so far
        self.done = False
        self.counts: dict[str, int] = dict.fromkeys(self.counters, 0)
        """Per-episode counters (:attr:`counters`), reported by :meth:`counter_metrics`."""

    @classmethod
    def spec_default_max_turns(cls, spec: Mapping[str, Any]) -> int | None:
        """Turn budget of ``spec`` when it names none: :attr:`default_max_turns` (a task whose default
        depends on the spec, e.g. PE's variant, overrides this)."""
        return cls.default_max_turns

    def count(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``key`` (one of :attr:`counters`)."""
        self.counts[key] += n

    def counter_metrics(self) -> dict[str, float]:
        """The counters as ``EpisodeResult.metrics`` entries (floats, in :attr:`counters` order)."""
        return {key: float(value) for key, value in self.counts.items()}

    @abstractmethod
    async def step(self, text: str) -> StepResult:
        """Consume the agent's turn ``self.turn + 1`` (its generated text) and answer it."""

    @abstractmethod
    def result(self) -> EpisodeResult:
        """Score the episode as it stands (callable at any time, e.g. after a cut)."""

    def observe_counterfactual(self, text: str) -> None:
        """The agent's turn sampled on the counterfactual branch that the last step asked for.

        Called by the agent loop (training rollouts only) before the real next turn. Tasks that never
        set :attr:`StepResult.counterfactual_observation` ignore it.
        """

    def next_round(self) -> RoundKind:
        """Kind of the next turn, as the agent loop and ``verl-selflock eval`` count it (Action rounds
        and Update rounds are the denominators of ``selflock/as_proxy`` and ``selflock/bt_proxy``).
        Default: the paper's alternation; a task with another protocol overrides it."""
        return round_kind(self.turn + 1, self.max_turns)

    def ground_truth_answer(self) -> str | None:
        """The correct final answer as the agent should write it inside ``<answer>`` (IGPO); None if unknown."""
        return None


class RoundBasedEnv(ActiveReasoningEnv):
    """A task of the paper's protocol: Action rounds (odd turns) and Update rounds (even turns), each
    written in an ``<interact>`` block, and an ``<answer>`` block at the answer turn (or earlier, which
    ends the episode). :meth:`step` routes each turn; subclasses implement the Action and Update rounds
    and how a final answer is parsed and kept; the answer turn sets ``self.done``."""

    async def step(self, text: str) -> StepResult:
        """Consume one agent turn; see the task module's docstring for the rules."""
        handler, args = self._route(text)
        result = handler(*args)
        return await result if inspect.isawaitable(result) else result

    def _route(self, text: str) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        """The handler of this turn and its arguments (the turn counter moves on)."""
        if self.done:
            return _episode_over, ()
        if not isinstance(text, str):
            text = ""
        self.turn += 1
        kind = round_kind(self.turn, self.max_turns)
        cut, tag = cut_after_first_closing_tag(text)
        if tag == "answer" or kind is RoundKind.ANSWER:
            return self._answer_turn, (cut, tag, kind)
        block = extract_block(cut, "interact") if tag == "interact" else None
        return (self._action_turn if kind is RoundKind.ACTION else self._update_turn), (block,)

    @abstractmethod
    def _action_turn(self, block: str | None) -> StepResult | Awaitable[StepResult]:
        """An Action round: ``block`` is the ``<interact>`` content, None if there was none."""

    @abstractmethod
    def _update_turn(self, block: str | None) -> StepResult:
        """An Update round: ``block`` is the ``<interact>`` content, None if there was none."""

    @abstractmethod
    def parse_answer(self, block: str | None) -> Parsed[Any]:
        """The final answer in an ``<answer>`` block's content (None: there was no block)."""

    @abstractmethod
    def _record_answer(self, answer: Any) -> dict[str, Any]:
        """Keep a well-formed final answer for :meth:`result`; returns the turn's ``info`` entries."""

    def _answer_turn(self, cut: str, tag: str | None, kind: RoundKind) -> StepResult:
        """An ``<answer>`` turn, or the answer turn reached without one (``cut`` = the turn's text): the
        episode ends, critique 0 (answer turns are never critiqued)."""
        self.done = True
        block = extract_block(cut, "answer") if tag == "answer" else None
        parsed = self.parse_answer(block)
        info: dict[str, Any] = {"round": kind.value, "turn": self.turn, "early": kind is not RoundKind.ANSWER}
        if parsed.ok:
            info.update(self._record_answer(parsed.value))
        else:
            info["error"] = parsed.error if tag == "answer" else "no <answer>...</answer> block"
        return StepResult(None, TurnLabel(0, CHANNEL_NONE), done=True, valid=parsed.ok, info=info)

    def _outcome(self, success: bool, answered: bool, /, **metrics: float) -> EpisodeResult:
        """Reward 1 iff ``success``; metrics: the counters, ``turns``, then ``metrics`` in their order."""
        scalars = self.counter_metrics()
        scalars.update(turns=float(self.turn), **metrics)
        return EpisodeResult(reward=1.0 if success else 0.0, success=success, answered=answered, metrics=scalars)

    # --- the line that announces the next round (shared wording of the round-based tasks) ---------

    def _after_action(self, noun: str, update: str, answer: str) -> str:
        """After an Action round: the next round is an Update round (``update`` says what to write) or,
        after the last query (``noun``: "query", "question"), the Answer round (``answer``)."""
        if round_kind(self.turn + 1, self.max_turns) is RoundKind.ANSWER:
            head = f"That was your last {noun}. Round {self.turn + 1} of {self.max_turns} is the Answer round: "
            return head + answer
        return f"Round {self.turn + 1} of {self.max_turns} is an Update round: " + update

    def _after_update(self, noun: str, plural: str, action: str) -> str:
        """After an Update round: the next Action round, with the number of queries left (``noun`` /
        ``plural``), then what to write (``action``)."""
        left = (self.max_turns - self.turn) // 2
        return (
            f"Round {self.turn + 1} of {self.max_turns} is an Action round ({left} "
            f"{noun if left == 1 else plural} left including this one): " + action
        )


async def ask_simulator(
    simulator: Any, messages: Sequence[Mapping[str, str]], *, cache_key: Hashable | None, task: str
) -> ChatReply:
    """``simulator.chat(messages, cache_key=...)`` that never raises: an exception (a bug in a client,
    an SDK error nobody mapped) becomes a failed reply (``error="exception"``), logged, so the task
    degrades the turn exactly as after a failed call instead of crashing the rollout."""
    try:
        reply = await simulator.chat(messages, cache_key=cache_key)
    except Exception as err:  # noqa: BLE001  (whatever the simulator raises, the rollout goes on)
        logger.warning("%s: the simulator raised %r; the turn degrades like a failed call", task, err)
        return ChatReply(text=None, ok=False, error="exception")
    if not isinstance(reply, ChatReply):
        logger.warning("%s: the simulator returned %r, not a ChatReply; the turn degrades", task, type(reply))
        return ChatReply(text=None, ok=False, error="bad_response")
    if reply.ok and not isinstance(reply.text, str):
        # An "ok" reply without text is as useless as a failed one: every task reads the text.
        return ChatReply(text=None, ok=False, error="bad_response", attempts=reply.attempts)
    return reply


def _episode_over() -> StepResult:
    return StepResult(None, TurnLabel(), done=True, valid=False, info={"error": "episode is over"})


_ENV_REGISTRY: dict[str, type[ActiveReasoningEnv]] = {}
"""Task name -> environment class. The built-in tasks register themselves when the package
:mod:`verl_selflock.envs` is imported, which Python always does before it imports this module, so the
lookups below never import a task (and nothing here imports a module that imports this one)."""


def register_env(name: str) -> Callable[[type[ActiveReasoningEnv]], type[ActiveReasoningEnv]]:
    """Class decorator registering an environment under the task name used in dataset rows."""

    def decorator(cls: type[ActiveReasoningEnv]) -> type[ActiveReasoningEnv]:
        existing = _ENV_REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise ValueError(f"environment {name!r} is already registered to {existing.__qualname__}")
        cls.task = name
        _ENV_REGISTRY[name] = cls
        return cls

    return decorator


def registered_envs() -> list[str]:
    return sorted(_ENV_REGISTRY)


def registered_progress_signals() -> list[str]:
    """Every T3 progress signal some registered task reports."""
    return sorted({name for cls in _ENV_REGISTRY.values() for name in cls.progress_signals})


def env_class(task: str) -> type[ActiveReasoningEnv]:
    """The registered environment class of ``task``."""
    if task not in _ENV_REGISTRY:
        raise ValueError(f"unknown task {task!r}; registered tasks: {registered_envs()}")
    return _ENV_REGISTRY[task]


def make_env(
    spec: Mapping[str, Any], max_turns: int | None = None, context: EnvContext | None = None
) -> ActiveReasoningEnv:
    """Build an episode from a row's ``extra_info["env"]`` (which names its ``task``)."""
    return env_class(spec.get("task"))(spec, max_turns=max_turns, context=context)
