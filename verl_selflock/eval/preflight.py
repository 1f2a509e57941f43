"""Pre-flight checks of a ``verl-selflock eval`` run: its endpoints answer, and one process per ``--out``.

Endpoints. The chat clients never raise on a server fault (:mod:`verl_selflock.simulators.client`): a
simulated user that fails is degraded into the task's "cannot answer" feedback, so a mistyped
``--simulator-url`` would play every episode against a patient who knows nothing and report a
plausible score. Before any episode, :func:`check_endpoint` therefore sends one small chat completion
to each endpoint the run opened (the simulator's, and the policy's) and refuses to start, with a
:class:`~verl_selflock.errors.UserError` naming the URL and what came back, unless the reply is a chat
completion. One request, no retries: a server still starting is refused too (start the run once it
answers); failures later in the run are counted and judged by ``--max-sim-failure-rate``.

Lock. Two processes on one ``--out`` would each run every episode and interleave their records;
:class:`OutLock` holds an OS file lock on ``OUT/.eval.lock`` (released by the kernel if the process
dies) and writes who holds it to ``OUT/.eval.owner.json`` so that the refused process can name it.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from verl_selflock.errors import UserError

__all__ = ["LOCK_FILE", "OWNER_FILE", "OutLock", "check_endpoint", "describe_reply"]

LOCK_FILE = ".eval.lock"
OWNER_FILE = ".eval.owner.json"
PREFLIGHT_MESSAGES = [{"role": "user", "content": "Reply with the single word OK."}]
PREFLIGHT_MAX_TOKENS = 4
"""Enough for a server to prove it runs the model; cheap on any endpoint."""
SNIPPET_CHARS = 120


def _snippet(text: str) -> str:
    """The start of a body on one line (an HTML error page must not spill over the terminal)."""
    flat = " ".join(text.split())
    return repr(flat[:SNIPPET_CHARS] + ("..." if len(flat) > SNIPPET_CHARS else ""))


def describe_reply(status: int, content_type: str, body: str) -> str | None:
    """What is wrong with an HTTP reply to a chat completion request, in a few words; None if it is one.

    A completion is a JSON object whose ``choices[0].message.content`` is a string or null (null: a
    policy may say nothing, and an empty simulator reply is counted by the run, not refused here)."""
    if not 200 <= status < 300:
        return f"HTTP {status} with {_snippet(body) if body.strip() else 'an empty body'}"
    try:
        data = json.loads(body)
    except ValueError:
        return f"HTTP {status} with a body that is not JSON ({content_type or 'no content type'}): {_snippet(body)}"
    try:
        message = data["choices"][0]["message"]
        ok = isinstance(message, dict) and isinstance(message.get("content"), str | None)
    except (KeyError, IndexError, TypeError):
        ok = False
    if not ok:
        return f"HTTP {status} with JSON that is not a chat completion (no choices[0].message.content): {_snippet(body)}"
    return None


async def check_endpoint(
    option: str, base_url: str, model: str, api_key: str, timeout_s: float, temperature: float = 0.0
) -> None:
    """One chat completion to ``base_url`` (the run's model and temperature, a few tokens); raise
    :class:`UserError` naming ``option`` (the CLI flag that set the URL), the URL and what came back,
    unless the reply is a chat completion."""
    import httpx

    endpoint = base_url.rstrip("/") + "/chat/completions"
    request = {"model": model, "messages": PREFLIGHT_MESSAGES, "max_tokens": PREFLIGHT_MAX_TOKENS,
               "temperature": float(temperature)}
    problem: str | None
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.post(endpoint, json=request, headers={"Authorization": f"Bearer {api_key}"})
        problem = describe_reply(response.status_code, response.headers.get("content-type", ""), response.text)
    except httpx.TimeoutException:
        problem = f"no answer within {timeout_s:g} s"
    except httpx.HTTPError as err:  # refused connection, unknown host, broken reply
        problem = f"{type(err).__name__} ({' '.join(str(err).split()) or 'no detail'})"
    if problem is not None:
        raise UserError(
            f"{option} {base_url}: the pre-flight chat completion (POST {endpoint}, model {model!r}) got {problem}; "
            "is an OpenAI-compatible server running there (a URL ending in /v1) and serving that model?"
        )


class OutLock:
    """An exclusive lock on an eval output folder, for one process at a time (a context manager)."""

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self._lock: Any = None

    def acquire(self) -> None:
        """Take the lock now or raise :class:`UserError` naming the folder and the process holding it."""
        from filelock import FileLock, Timeout

        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out}: exists and is not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.out / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise UserError(
                f"--out {self.out}: another eval is writing to this folder ({self._owner()}); "
                "wait for it to finish, or use another --out"
            ) from None
        self._lock = lock
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv,
        }
        (self.out / OWNER_FILE).write_text(json.dumps(owner) + "\n")

    def _owner(self) -> str:
        """Who holds the lock, as far as its owner file says."""
        try:
            owner = json.loads((self.out / OWNER_FILE).read_text())
            return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "its process id is not recorded yet"

    def release(self) -> None:
        if self._lock is None:
            return
        (self.out / OWNER_FILE).unlink(missing_ok=True)
        self._lock.release()
        self._lock = None

    def __enter__(self) -> OutLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
