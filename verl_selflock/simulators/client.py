"""An async chat client for OpenAI-compatible endpoints that never raises on a server fault.

Simulated users and patients (MediQ, FloDial, tau2) and the policy under evaluation are LLMs behind
an OpenAI-compatible ``/v1/chat/completions`` endpoint: ``vllm serve`` on a GPU cluster, a hosted
API, or ``transformers serve`` on a CPU box. A rollout must never crash because such a server is
down, slow, overloaded or talks nonsense, so :meth:`ChatClient.chat` returns a :class:`ChatReply`
whose ``ok`` is False after ``max_retries`` retries, and the caller degrades the turn the way its
task specifies (and counts it). Every outcome is counted in :meth:`ChatClient.stats`.

Retries (connection errors, timeouts, 429, 5xx, unparsable or empty bodies) wait an exponential
backoff with jitter: ``backoff_s * 2**(retry - 1)`` scaled by a random factor in [0.5, 1] (so that
many workers hit by the same outage do not retry in lockstep), at most ``backoff_max_s``. A 429 or
503 that carries ``Retry-After`` (seconds or an HTTP date; or ``retry-after-ms``) waits what the
server asks instead, also at most ``backoff_max_s``, so a rollout never stalls on a server's say-so.

Cache. Only greedy calls (temperature 0, the config's or the call's) use it: their replies are
deterministic, so a reply can be kept under a key the caller chooses (e.g. ``(case_id,
normalised_query)``) and repeated questions across rollouts cost nothing. A sampled call
(temperature > 0) always asks the server, so sampled replies are never frozen. Failures are never
cached. Identical greedy calls in flight at the same time share one request: the later ones await
the first and count as cache hits. The cache keeps the ``cache_size`` most recently used replies.

Training workers check once at start-up that the endpoint answers (:mod:`~verl_selflock.simulators.preflight`).

Config (``selflock_agent_loop.simulator`` in a veRL config, or ``verl-selflock eval`` options)::

    simulator:
      base_url: http://localhost:8000/v1
      model: Qwen/Qwen2.5-14B-Instruct
      api_key_env: SELFLOCK_SIMULATOR_API_KEY   # name of the variable holding the key (optional)
      temperature: 0.0
      max_tokens: 64
      timeout_s: 30
      max_concurrency: 16
      max_retries: 2
      backoff_s: 0.5
      backoff_max_s: 10
      cache: true
      cache_size: 50000
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import logging
import math
import os
import random
import weakref
from collections import Counter, OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "SELFLOCK_SIMULATOR_API_KEY"
DEFAULT_CACHE_SIZE = 50_000
"""Default cache bound: a few hundred bytes per short reply, tens of MB at most for tau2's longer ones."""
JITTER_MIN = 0.5
"""Retry delays are scaled by a random factor in [JITTER_MIN, 1]."""
RETRY_AFTER_STATUSES = frozenset({429, 503})


class SimulatorConfigError(ValueError):
    """A simulator/endpoint setting is wrong (raised before any request is made)."""


@dataclass(frozen=True)
class SimulatorConfig:
    """Where and how to reach an OpenAI-compatible chat endpoint."""

    base_url: str
    """Endpoint root including ``/v1``, e.g. ``http://localhost:8000/v1``."""
    model: str
    """Model name the server expects in requests (``vllm serve``'s served name, a folder for
    ``transformers serve``)."""
    api_key_env: str | None = DEFAULT_API_KEY_ENV
    """Environment variable holding the API key (unset or empty: key ``EMPTY``), read by each process from its
    own environment: only the name is in configs (veRL prints them), so every Ray node needs the variable."""
    temperature: float = 0.0
    max_tokens: int = 64
    timeout_s: float = 30.0
    """Per-attempt timeout (connect + read)."""
    max_concurrency: int = 16
    """Most requests in flight at once from one process (per event loop)."""
    max_retries: int = 2
    """Retries after the first attempt, on connection errors, timeouts, 429 and 5xx."""
    backoff_s: float = 0.5
    """First retry delay; doubles each retry (before jitter)."""
    backoff_max_s: float = 10.0
    """Longest wait before a retry, also when a 429/503 asks for longer with ``Retry-After``."""
    cache: bool = True
    """Cache successful greedy replies (temperature 0) under the caller's key; sampled calls never use it."""
    cache_size: int = DEFAULT_CACHE_SIZE
    """Most replies the cache keeps; the least recently used one is dropped first."""

    def __post_init__(self) -> None:
        def fail(key: str, why: str) -> None:
            raise SimulatorConfigError(f"simulator.{key}: {why}")

        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            fail("base_url", f"must be an http(s) URL such as http://localhost:8000/v1, got {self.base_url!r}")
        if not isinstance(self.model, str) or not self.model:
            fail("model", "must name the served model")
        if not 0.0 <= float(self.temperature) <= 2.0:
            fail("temperature", f"must be in [0, 2], got {self.temperature!r}")
        for key in ("max_tokens", "max_concurrency", "cache_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(key, f"must be a positive int, got {value!r}")
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 0:
            fail("max_retries", f"must be an int >= 0, got {self.max_retries!r}")
        if not float(self.timeout_s) > 0:
            fail("timeout_s", f"must be > 0, got {self.timeout_s!r}")
        if float(self.backoff_s) < 0:
            fail("backoff_s", f"must be >= 0, got {self.backoff_s!r}")
        if float(self.backoff_max_s) < 0:
            fail("backoff_max_s", f"must be >= 0, got {self.backoff_max_s!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> SimulatorConfig:
        """Build from a plain dict or DictConfig, naming any unknown or missing key."""
        if mapping is None:
            raise SimulatorConfigError("simulator: no endpoint configured (need at least base_url and model)")
        if isinstance(mapping, SimulatorConfig):
            return mapping
        data = dict(mapping.items())
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SimulatorConfigError(f"simulator: unknown key(s) {unknown}; known keys: {sorted(known)}")
        missing = [key for key in ("base_url", "model") if not data.get(key)]
        if missing:
            raise SimulatorConfigError(f"simulator: missing {missing} (e.g. base_url: http://localhost:8000/v1)")
        return cls(**data)

    def api_key(self) -> str:
        value = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return value or "EMPTY"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ChatReply:
    """Outcome of one :meth:`ChatClient.chat` call."""

    text: str | None
    """The reply's content; None when the call failed."""
    ok: bool
    error: str | None = None
    """``timeout``, ``connection``, ``http_<status>``, ``empty`` or ``bad_response``, when not ok
    (``exception`` when :func:`verl_selflock.envs.base.ask_simulator` caught one)."""
    cached: bool = False
    """Served from the cache, or by an identical request already in flight."""
    attempts: int = 0
    """Requests this call actually sent (0 for a cache hit or a shared in-flight request)."""


@dataclass(frozen=True)
class _Attempt:
    """Outcome of one request."""

    text: str | None
    error: str = ""
    retryable: bool = False
    retry_after_s: float | None = None
    """What the server asked to wait (``Retry-After`` on a 429/503), if it said."""


class ChatClient:
    """Async client for one endpoint: bounded concurrency, retries with backoff, a reply cache, counters."""

    empty_reply_is_failure: bool = True
    """A simulated user that answers nothing has failed (retried, then the task degrades the turn). For
    an evaluated policy an empty answer is the model's turn: see :class:`verl_selflock.eval.policy.PolicyClient`."""

    def __init__(self, config: SimulatorConfig) -> None:
        from openai import AsyncOpenAI

        self.config = config
        # The SDK's own retries are off: ours are counted and bounded by the same config.
        self._client = AsyncOpenAI(
            base_url=config.base_url, api_key=config.api_key(), timeout=float(config.timeout_s), max_retries=0
        )
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._cache: OrderedDict[Hashable, str] = OrderedDict()  # least recently used first
        self._in_flight: dict[Hashable, asyncio.Future[ChatReply]] = {}
        self._counts: Counter[str] = Counter()
        self._rng = random.Random()

    async def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        cache_key: Hashable | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: Sequence[str] | None = None,
    ) -> ChatReply:
        """One chat completion. Never raises for server or network faults: see :class:`ChatReply`."""
        self._counts["calls"] += 1
        request: dict[str, Any] = {
            "model": self.config.model,
            "messages": [dict(m) for m in messages],
            "max_tokens": int(max_tokens or self.config.max_tokens),
            "temperature": float(self.config.temperature if temperature is None else temperature),
        }
        if stop:
            request["stop"] = list(stop)
        # A sampled reply is one draw of many: caching it would replay that draw forever.
        if not (self.config.cache and cache_key is not None and request["temperature"] == 0.0):
            return await self._send(request)
        return await self._cached_chat(request, cache_key)

    async def _cached_chat(self, request: dict[str, Any], key: Hashable) -> ChatReply:
        """A greedy call: the cache, else a request already in flight for ``key``, else a new one."""
        text = self._cache.get(key)
        if text is not None:
            self._cache.move_to_end(key)
            self._counts["cache_hits"] += 1
            return ChatReply(text=text, ok=True, cached=True)
        pending = self._in_flight.get(key)
        if pending is not None:
            return await self._join(pending)
        self._counts["cache_misses"] += 1
        # A task of its own, so that a caller cancelled mid-request does not cancel the others' reply.
        task = asyncio.ensure_future(self._send_and_store(request, key))
        self._in_flight[key] = task
        task.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(task)

    async def _join(self, pending: asyncio.Future[ChatReply]) -> ChatReply:
        """Await an identical request in flight: a hit if it succeeds, this call's failure if it fails."""
        self._counts["in_flight_shared"] += 1
        reply = await asyncio.shield(pending)
        if reply.ok:
            self._counts["cache_hits"] += 1
            return ChatReply(text=reply.text, ok=True, cached=True)
        self._counts["cache_misses"] += 1
        self._counts["failures"] += 1
        return ChatReply(text=None, ok=False, error=reply.error)

    def _forget(self, key: Hashable, done: asyncio.Future[ChatReply]) -> None:
        if self._in_flight.get(key) is done:
            del self._in_flight[key]

    async def _send_and_store(self, request: dict[str, Any], key: Hashable) -> ChatReply:
        reply = await self._send(request)
        if reply.ok and reply.text is not None:
            self._store(key, reply.text)
        return reply

    def _store(self, key: Hashable, text: str) -> None:
        """Keep ``text`` under ``key``, dropping the least recently used replies beyond ``cache_size``."""
        self._cache[key] = text
        self._cache.move_to_end(key)
        while len(self._cache) > self.config.cache_size:
            self._cache.popitem(last=False)
            self._counts["cache_evictions"] += 1

    async def _send(self, request: dict[str, Any]) -> ChatReply:
        """The request with up to ``max_retries`` retries; counts requests, retries, errors and failures."""
        outcome = _Attempt(None, "unknown")
        attempts = 0
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self._counts["retries"] += 1
                await asyncio.sleep(self._retry_delay(attempt, outcome.retry_after_s))
            attempts += 1
            self._counts["requests"] += 1
            outcome = await self._attempt(request)
            if outcome.text is not None:
                return ChatReply(text=outcome.text, ok=True, attempts=attempts)
            self._counts[f"error_{outcome.error}"] += 1
            if not outcome.retryable:
                break
        self._counts["failures"] += 1
        logger.warning(
            "endpoint %s at %s failed after %d attempt(s): %s",
            self.config.model, self.config.base_url, attempts, outcome.error,
        )
        return ChatReply(text=None, ok=False, error=outcome.error, attempts=attempts)

    def _retry_delay(self, retry: int, retry_after_s: float | None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based); see the module docstring."""
        return backoff_delay(
            retry, float(self.config.backoff_s), float(self.config.backoff_max_s), self._rng.random(), retry_after_s
        )

    async def _attempt(self, request: dict[str, Any]) -> _Attempt:
        import openai

        try:
            async with self._semaphore:
                response = await self._client.chat.completions.create(**request)
        except openai.APITimeoutError:
            return _Attempt(None, "timeout", True)
        except openai.APIConnectionError:
            return _Attempt(None, "connection", True)
        except openai.APIStatusError as exc:
            status = int(exc.status_code)
            wait = retry_after_seconds(exc.response.headers) if status in RETRY_AFTER_STATUSES else None
            return _Attempt(None, f"http_{status}", status == 429 or status >= 500, wait)
        except (ValueError, TypeError, KeyError) as exc:  # a body the SDK cannot parse
            logger.debug("simulator: unparsable response: %r", exc)
            return _Attempt(None, "bad_response", True)
        try:
            content = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            return _Attempt(None, "bad_response", True)
        if content is None and not self.empty_reply_is_failure:
            content = ""
        if not isinstance(content, str):
            return _Attempt(None, "bad_response", True)
        if not content.strip():
            if self.empty_reply_is_failure:
                return _Attempt(None, "empty", True)
            self._counts["empty_replies"] += 1
        return _Attempt(content)

    def stats(self) -> dict[str, float]:
        """Counters since creation: calls, requests, retries, failures, error_<kind>, cache hits/misses,
        hit rate, evictions, calls that joined a request in flight, cached replies."""
        out = {key: float(value) for key, value in self._counts.items()}
        for key in (
            "calls", "requests", "retries", "failures", "cache_hits", "cache_misses", "cache_evictions",
            "in_flight_shared",
        ):
            out.setdefault(key, 0.0)
        lookups = out["cache_hits"] + out["cache_misses"]
        out["cache_hit_rate"] = out["cache_hits"] / lookups if lookups else 0.0
        out["cache_entries"] = float(len(self._cache))
        return out

    async def aclose(self) -> None:
        await self._client.close()


def backoff_delay(
    retry: int, backoff_s: float, backoff_max_s: float, unit_random: float, retry_after_s: float | None = None
) -> float:
    """Wait before retry number ``retry`` (1-based): the server's ``Retry-After`` if given, else
    ``backoff_s * 2**(retry - 1)`` scaled by a jitter factor in [JITTER_MIN, 1] (``unit_random`` in
    [0, 1) picks it); never more than ``backoff_max_s``."""
    if retry_after_s is not None:
        return min(max(retry_after_s, 0.0), backoff_max_s)
    nominal = min(backoff_s * 2 ** (retry - 1), backoff_max_s)
    return nominal * (JITTER_MIN + (1.0 - JITTER_MIN) * unit_random)


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """What ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date) ask to wait; None if absent or unreadable."""
    millis = _seconds(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max((when - datetime.datetime.now(datetime.timezone.utc)).total_seconds(), 0.0)


def _seconds(text: str | None) -> float | None:
    """A header's number, clamped at 0; None when absent or not a finite number (NaN would break sleep)."""
    try:
        value = float(text) if text is not None else math.nan
    except ValueError:
        return None
    return max(value, 0.0) if math.isfinite(value) else None


# One client per (config, event loop) and process: the cache and the concurrency limit are shared by
# every episode a worker runs, and an asyncio semaphore / HTTP pool must not cross event loops.
_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[SimulatorConfig, ChatClient]] = (
    weakref.WeakKeyDictionary()
)


def shared_client(config: SimulatorConfig | Mapping[str, Any]) -> ChatClient:
    """The process's client for ``config`` on the running event loop (created on first use)."""
    config = SimulatorConfig.from_mapping(config)
    loop = asyncio.get_running_loop()
    per_loop = _CLIENTS.setdefault(loop, {})
    client = per_loop.get(config)
    if client is None:
        client = per_loop[config] = ChatClient(config)
    return client
