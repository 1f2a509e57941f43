"""Start-up check that a worker process can reach its simulated user, once per process.

:class:`~verl_selflock.simulators.client.ChatClient` never raises on a server fault: a turn whose
simulator call fails gets the task's "cannot answer" reply and critique 0, and training goes on. That is
right for an outage in the middle of a run, and wrong at start-up: a worker that cannot reach its
simulator at all (a ``localhost`` URL on another node, an API key that only the driver's environment
holds, a URL without ``/v1``) would degrade *every* turn for the whole run while the reward still moves.
So the first episode of each process calls :func:`ensure_reachable`, which asks the endpoint once and
raises :class:`SimulatorUnreachableError` naming the URL, this host and what came back.

The request is ``GET {base_url}/models`` (every OpenAI-compatible server has it: vLLM, SGLang,
``transformers serve``, hosted APIs): it generates nothing and is not a chat call, so it never shows up
in a server's chat traffic. Outcomes:

* no connection or a timeout after the config's ``max_retries`` (at least :data:`MIN_ATTEMPTS` attempts,
  with its backoff): refused;
* 401 / 403: refused, naming the variable the key is read from (``api_key_env``) and whether it is set
  here; the key itself is never shown;
* the model listed: ok. Listed models without it, or a 5xx (``transformers serve`` answers 500 there):
  one chat completion of a few tokens decides (retried like the GET; refused unless it is a completion);
* 404 / 405 (no ``/models`` route): refused if ``{base_url}/v1/models`` answers (the URL lacks ``/v1``),
  otherwise accepted with a warning (a server answered, the model cannot be confirmed).

The outcome is kept per :class:`SimulatorConfig` and process: later episodes cost nothing, and after a
failure every episode of the process raises the same error at once.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any, NoReturn

from verl_selflock.errors import UserError
from verl_selflock.simulators.client import SimulatorConfig, backoff_delay

__all__ = ["SimulatorUnreachableError", "check_reachable", "ensure_reachable", "forget_checks", "is_loopback"]

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})
PROBE_MESSAGES = [{"role": "user", "content": "Reply with the single word OK."}]
PROBE_MAX_TOKENS = 2
SNIPPET_CHARS = 160
MIN_ATTEMPTS = 3
"""Attempts per start-up request even when the config retries nothing: refusing stops the whole run, so a
server that drops one connection while it warms up (``transformers serve`` loads its model on the first
request) must not be enough."""


class SimulatorUnreachableError(UserError, RuntimeError):
    """A worker cannot use its simulator endpoint at start-up (the message names the URL and the host)."""


_CHECKED: dict[SimulatorConfig, SimulatorUnreachableError | None] = {}
_LOCK = threading.Lock()


def ensure_reachable(config: SimulatorConfig | Mapping[str, Any]) -> None:
    """:func:`check_reachable`, once per process and config; later calls repeat the first outcome."""
    config = SimulatorConfig.from_mapping(config)
    with _LOCK:  # one probe per config even if several threads build loops at once
        if config not in _CHECKED:
            try:
                check_reachable(config)
                _CHECKED[config] = None
            except SimulatorUnreachableError as err:
                _CHECKED[config] = err
        error = _CHECKED[config]
    if error is not None:
        raise SimulatorUnreachableError(str(error))


def forget_checks() -> None:
    """Drop the kept outcomes (tests; a process that restarted its simulator)."""
    with _LOCK:
        _CHECKED.clear()


def check_reachable(config: SimulatorConfig) -> None:
    """Ask ``config.base_url`` once (with the config's retries); raise :class:`SimulatorUnreachableError`
    unless a server there accepts this process's key and (as far as it says) serves ``config.model``."""
    import httpx

    base = config.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {config.api_key()}"}
    timeout = float(config.timeout_s)
    with httpx.Client(timeout=timeout, headers=headers, follow_redirects=True) as client:
        response = _send(client, config, "GET", f"{base}/models", accept_5xx=True)
        status = response.status_code
        if status in (401, 403):
            _refuse(config, f"HTTP {status} ({_snippet(response.text)})", _key_hint(config))
        served = _model_ids(response) if 200 <= status < 300 else None
        if served is not None and config.model in served:
            return
        if status in (404, 405):
            if not base.endswith("/v1") and _answers(client, f"{base}/v1/models"):
                _refuse(config, f"HTTP {status} on GET {base}/models while {base}/v1/models answers",
                        f"set simulator.base_url to {base}/v1")
            logger.warning(
                "simulator %s: GET /models answered HTTP %d; a server is there but model %r cannot be confirmed "
                "(if every simulator call fails, check base_url and model)", config.base_url, status, config.model,
            )
            return
        # Listed without the model, or /models failed (`transformers serve` answers 500 there): a chat
        # completion of a few tokens decides.
        _probe_chat(client, config, base, served)


def _send(client: Any, config: SimulatorConfig, method: str, url: str, accept_5xx: bool = False, **kwargs: Any) -> Any:
    """One request; connection errors, timeouts and 5xx are retried as the chat client retries them, with at
    least :data:`MIN_ATTEMPTS` attempts (a 5xx is returned after the config's retries when ``accept_5xx``,
    else refused like a dead server)."""
    import httpx

    rng = random.Random()
    problem, response = "no attempt", None
    attempts = max(int(config.max_retries) + 1, MIN_ATTEMPTS)
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff_delay(attempt, float(config.backoff_s), float(config.backoff_max_s), rng.random()))
        try:
            response = client.request(method, url, **kwargs)
        except httpx.TimeoutException:
            problem, response = f"no answer within {float(config.timeout_s):g} s", None
            continue
        except httpx.HTTPError as err:  # refused connection, unknown host, broken reply
            problem, response = f"{type(err).__name__} ({' '.join(str(err).split()) or 'no detail'})", None
            continue
        if response.status_code < 500:
            return response
        problem = f"HTTP {response.status_code} ({_snippet(response.text)})"
        if accept_5xx and attempt >= int(config.max_retries):
            return response  # a route that always answers 5xx (`transformers serve` /models): chat decides
    if response is not None and accept_5xx:
        return response
    _refuse(config, f"{problem} after {attempts} attempt(s) of {method} {url}", _reach_hint(config))


def _probe_chat(client: Any, config: SimulatorConfig, base: str, served: list[str] | None) -> None:
    """One chat completion of a few tokens: does the server answer for ``config.model``?"""
    request = {"model": config.model, "messages": PROBE_MESSAGES, "max_tokens": PROBE_MAX_TOKENS,
               "temperature": 0.0}
    response = _send(client, config, "POST", f"{base}/chat/completions", json=request)
    if response.status_code in (401, 403):
        _refuse(config, f"HTTP {response.status_code} ({_snippet(response.text)})", _key_hint(config))
    if 200 <= response.status_code < 300 and _is_completion(response):
        return
    listed = f"; it lists {', '.join(served[:8])}" if served else ""
    _refuse(config, f"HTTP {response.status_code} on a chat completion for model {config.model} "
            f"({_snippet(response.text)}){listed}", "set simulator.model to a model this server serves")


def _answers(client: Any, url: str) -> bool:
    import httpx

    try:
        return 200 <= client.get(url).status_code < 300
    except httpx.HTTPError:
        return False


def _model_ids(response: Any) -> list[str] | None:
    """The ``id`` of each model in an OpenAI ``/models`` list; None when the body is not one."""
    try:
        data = response.json()["data"]
        return [str(item["id"]) for item in data]
    except (ValueError, KeyError, TypeError):
        return None


def _is_completion(response: Any) -> bool:
    try:
        message = response.json()["choices"][0]["message"]
        return isinstance(message, dict) and isinstance(message.get("content"), str | None)
    except (ValueError, KeyError, IndexError, TypeError):
        return False


def _snippet(text: str) -> str:
    """The start of a body on one line, without quotes: Hydra wraps the loop's errors in their ``repr``, which
    would escape them."""
    flat = " ".join(str(text).replace('"', "").replace("'", "").split())
    return (flat[:SNIPPET_CHARS] + ("..." if len(flat) > SNIPPET_CHARS else "")) if flat else "empty body"


def is_loopback(base_url: str) -> bool:
    """Whether ``base_url`` names the calling machine itself (a different server on every node)."""
    from urllib.parse import urlsplit

    try:
        host = urlsplit(base_url).hostname or ""
    except ValueError:
        return False
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _reach_hint(config: SimulatorConfig) -> str:
    loopback = is_loopback(config.base_url)
    where = (
        "this URL is this node's own loopback: with workers on several nodes, serve the simulator at an address "
        "every node can reach (or one per node)"
        if loopback
        else "is the server running, and reachable from this node?"
    )
    return f"{where}; the URL comes from selflock_agent_loop.simulator.base_url, resolved on the driver"


def _key_hint(config: SimulatorConfig) -> str:
    if not config.api_key_env:
        return "the server wants an API key: set simulator.api_key_env to the variable holding it"
    state = "set" if os.environ.get(config.api_key_env) else "not set"
    return (
        f"the server refused the key read from ${config.api_key_env}, which is {state} on this node: each worker "
        f"reads it from its own environment, so export {config.api_key_env} on every node before `ray start`"
    )


def _refuse(config: SimulatorConfig, problem: str, hint: str) -> NoReturn:
    raise SimulatorUnreachableError(
        f"simulator.base_url {config.base_url} (model {config.model}): the start-up check from "
        f"{socket.gethostname()} (pid {os.getpid()}) got {problem}; {hint}. Without it every simulated-user "
        "turn would fail and train on critique 0, so this worker stops here"
    )
