"""Directional critiques of tau2 telecom turns, inferred from the interaction ("targeted" rules, non-oracle).

The tau2 setting of the AREW paper (arXiv 2603.12109), the one setting without an oracle: only what
the interaction shows is used. Every agent turn is an Action turn (channel AS). The first rule that
applies decides the turn's critique:

1. ``invalid``: no well-formed ``<message>``/``<tool_call>`` block, an empty message, tool-call JSON
   that is not strict JSON of ``{"name": str, "arguments": object}`` (no ``NaN``/``Infinity``), a
   message or tool call over ``MAX_ACTION_CHARS`` (:mod:`verl_selflock.envs.tau2.parsing`)       -> -1
2. ``wrong_identity``: a tool call whose arguments name a customer, line, bill or phone number
   that belongs to another customer than the user's (the user's identity: tau2's user device
   phone number -> its customer record)                                                      -> -1
3. ``tool_error``: tau2 returned an error for the tool call (unknown tool, bad arguments,
   failed precondition), or its arguments do not fit the tool's schema and it was not run     -> -1
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
7. ``sim_failure``: the user turn degraded (:mod:`verl_selflock.envs.tau2.env`)      -> 0, exempt
8. ``warmup``: nothing of the above and the turn is before ``min_turn`` (default 6)       -> 0, eligible
9. ``unproductive``: nothing of the above from turn ``min_turn`` on                         -> -1

``TurnLabel.fallback`` (:class:`~verl_selflock.contracts.critique.FallbackRole`) is ``ELIGIBLE`` exactly for
``warmup`` turns: well-formed, non-repeated turns that drew a real answer but no measurable progress
yet; ``step_abs_sum``'s fallback promotes them to positives in a trajectory that has negatives but no
positive turn. ``sim_failure`` turns are ``EXEMPT``; every other turn is ``ORDINARY`` (its critique is
nonzero, so the role is never read).
"""

from __future__ import annotations

from verl_selflock.contracts.critique import FallbackRole

__all__ = ["targeted_critique"]


def targeted_critique(
    negative: str | None, signals: list[str], repeated: bool, degraded: str | None, turn: int, min_turn: int
) -> tuple[int, str, FallbackRole]:
    """(critique, deciding rule, fallback role) of one turn, rules 1-9 of the module docstring in order.

    Args:
        negative: the negative rule (1-4) that fired, or None.
        signals: the positive signals (rule 5) that fired.
        repeated: the turn repeats an earlier tool call or message (rule 6).
        degraded: why the user turn degraded (rule 7), or None.
        turn: the 1-based turn; ``min_turn``: the first turn an unproductive turn is -1 (rules 8, 9).
    """
    if negative is not None:
        return -1, negative, FallbackRole.ORDINARY
    if signals:
        return 1, "positive", FallbackRole.ORDINARY
    if repeated:
        return -1, "repeat", FallbackRole.ORDINARY
    if degraded is not None:
        # The user side failed, not the agent: a fallback must not turn this 0 into a bonus of either sign.
        return 0, "sim_failure", FallbackRole.EXEMPT
    if turn < min_turn:
        return 0, "warmup", FallbackRole.ELIGIBLE
    return -1, "unproductive", FallbackRole.ORDINARY
