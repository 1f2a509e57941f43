"""The chat client of the policy under evaluation: an empty reply is the model's turn, not a fault.

:class:`~verl_selflock.simulators.ChatClient` serves simulated users, for whom an empty reply is a
failed call: it retries, then reports ``ok=False`` and the task degrades the turn. For the *policy*
that is wrong. A server that answered (HTTP 200) with ``content`` None or blank has run the model, and
the model said nothing: the environment must judge that turn (an invalid action) like any other.
Retrying it wastes calls (at temperature 0 the model says nothing again), and reporting it as an
endpoint error would keep the episode from ever being scored, on every rerun. Timeouts, connection
errors, 429/5xx and bodies that are not a completion stay endpoint failures, retried as before.
"""

from __future__ import annotations

from verl_selflock.simulators import ChatClient

__all__ = ["PolicyClient"]


class PolicyClient(ChatClient):
    """:class:`ChatClient` whose answered-but-empty replies come back at once with ``ok=True`` (None
    content as ``""``, blank text as it came), counted in ``stats()["empty_replies"]``."""

    empty_reply_is_failure = False
