"""Errors that are the user's to fix (a bad argument, a missing or corrupt file), not bugs of ours.

Every ``verl-selflock`` command prints a :class:`UserError` as one line naming what to change and
exits with :data:`USER_ERROR_EXIT`, without a traceback (``--debug`` or ``VERL_SELFLOCK_DEBUG=1`` shows
it). Anything else that escapes a command is a bug and keeps its traceback.
"""

from __future__ import annotations

import os

USER_ERROR_EXIT = 2
"""Exit code of a command stopped by a :class:`UserError` (argparse uses the same for bad arguments)."""
DEBUG_ENV = "VERL_SELFLOCK_DEBUG"
"""Set to 1 to see the traceback of a :class:`UserError`."""


class UserError(Exception):
    """A mistake in what the user asked for: the message names the argument, file and line to fix."""


class InvalidInput(UserError, ValueError):
    """A bad argument value or a corrupt input file. Also a ValueError: the library functions that raise
    it (the data builders, the log readers) raised ValueError before, and callers may rely on that."""


class MissingInput(UserError, FileNotFoundError):
    """An input file or folder that is not there (also a FileNotFoundError, as before)."""


def one_line(message: object, limit: int = 2000) -> str:
    """``message`` on one line (newlines become " | "), cut to ``limit`` characters: a message that quotes
    user input (a 1 MB argument, a binary line) must not flood the terminal."""
    text = " | ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def debug_requested() -> bool:
    """True when ``VERL_SELFLOCK_DEBUG`` is set to anything but empty, 0, false or no."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
