"""Record per-turn critiques while any agent loop builds its response: the public critique API.

AREW (``algorithm.adv_estimator=arew``) reads four per-token lists from a sample's
``AgentLoopOutput.extra_fields`` (:mod:`verl_selflock.contracts.critique`). An agent loop produces them
by calling a :class:`CritiqueRecorder` as it appends tokens to its response, in the same order::

    recorder = CritiqueRecorder()
    recorder.begin_turn()                  # the model starts a turn
    recorder.generated(len(turn_ids))      # tokens it generated (response_mask 1)
    recorder.observe(len(template_ids))    # tokens it did not (template, tool output: mask 0)
    recorder.end_turn(critique=+1)         # the turn's critique, once it is known
    ...
    output.extra_fields.update(recorder.as_extra_fields())

Rules, so the lists line up with ``response_ids`` token for token:

* every response token is recorded exactly once, ``generated`` inside an open turn, ``observe``
  anywhere (a turn may interleave both: a closing template token is observed inside the turn);
* ``drop_last(n)`` mirrors a loop that removes tokens from the end of its response (veRL's Continuous
  Token merges trim a stale suffix), ``truncate(n)`` one that cuts the response to ``n`` tokens;
* a turn that is never ended (the episode stopped before it could be judged) keeps critique 0 and
  channel ``CHANNEL_NONE``: it carries no bonus.

The critique is z_t in {-1, 0, +1}; the channel says which capability the turn exercised (``CHANNEL_AS``:
acting, e.g. a query or a tool call; ``CHANNEL_BT``: updating the belief; ``algorithm.arew.channels``
can keep one of them); the fallback role tells the ``step_abs_sum`` fallbacks what they may do with a
zero turn (:class:`~verl_selflock.contracts.critique.FallbackRole`). Plain Python: no veRL, no torch.
"""

from __future__ import annotations

from verl_selflock.contracts.critique import CHANNEL_AS, FallbackRole, ResponseLayout, TurnLabel

__all__ = ["CritiqueRecorder"]


class CritiqueRecorder:
    """Per-token turn ids and per-turn critiques of one response, recorded while it is built."""

    def __init__(self) -> None:
        self._layout = ResponseLayout()
        self._open: int | None = None
        self._begun = 0

    def __len__(self) -> int:
        """Tokens recorded so far (must equal the response's length when the loop returns)."""
        return len(self._layout)

    @property
    def open_turn(self) -> int | None:
        """Index of the turn begun and not ended yet, or None."""
        return self._open

    @property
    def num_turns(self) -> int:
        """Turns begun so far (ended or not)."""
        return self._begun

    def begin_turn(self) -> int:
        """Open the next agent turn; returns its index (0-based). A turn still open is closed unlabelled
        (critique 0, channel ``CHANNEL_NONE``)."""
        self._open = self._begun
        self._begun += 1
        # A turn exists from its start, even if it keeps no token (the estimator skips it then).
        self._layout.set_label(self._open, TurnLabel())
        return self._open

    def generated(self, num_tokens: int) -> None:
        """Append ``num_tokens`` tokens the model generated in the open turn (response_mask 1)."""
        if self._open is None:
            raise RuntimeError("CritiqueRecorder.generated: no open turn (call begin_turn first)")
        self._layout.add_turn_tokens(self._open, _count(num_tokens))

    def observe(self, num_tokens: int) -> None:
        """Append ``num_tokens`` tokens the model did not generate (observations, tool output, chat
        template tokens; response_mask 0): turn id -1, critique 0."""
        self._layout.add_observation_tokens(_count(num_tokens))

    def end_turn(
        self,
        critique: int = 0,
        channel: int = CHANNEL_AS,
        fallback: FallbackRole | int = FallbackRole.ORDINARY,
    ) -> TurnLabel:
        """Label the open turn and close it; returns the label.

        Args:
            critique: z_t in {-1, 0, +1}.
            channel: ``CHANNEL_AS`` (default: the turn acted), ``CHANNEL_BT`` or ``CHANNEL_NONE``.
            fallback: what the ``step_abs_sum`` fallbacks may do with the turn if ``critique`` is 0.
        """
        if self._open is None:
            raise RuntimeError("CritiqueRecorder.end_turn: no open turn (call begin_turn first)")
        label = TurnLabel(critique=int(critique), channel=int(channel), fallback=FallbackRole(int(fallback)))
        self._layout.set_label(self._open, label)
        self._open = None
        return label

    def drop_last(self, num_tokens: int) -> None:
        """Forget the last ``num_tokens`` tokens (the loop removed them from the end of its response)."""
        self.truncate(len(self) - min(_count(num_tokens), len(self)))

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens (the response was cut to ``length``)."""
        self._layout.truncate(max(0, int(length)))

    def label(self, turn: int) -> TurnLabel:
        """The current label of ``turn`` (critique 0 until it is ended)."""
        return self._layout.labels[turn]

    def as_extra_fields(self) -> dict[str, list[int]]:
        """The per-token fields AREW reads (``critique``, ``critique_channel``, ``turn_ids``,
        ``fallback_eligible``), one entry per recorded token, for ``AgentLoopOutput.extra_fields``."""
        return self._layout.as_extra_fields()


def _count(num_tokens: int) -> int:
    if isinstance(num_tokens, bool) or int(num_tokens) != num_tokens or num_tokens < 0:
        raise ValueError(f"a token count must be an int >= 0, got {num_tokens!r}")
    return int(num_tokens)
