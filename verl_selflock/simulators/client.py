"""An async chat client for OpenAI-compatible endpoints that never raises on a server fault.

Simulated users and patients (MediQ, FloDial, tau2) and the policy under evaluation are LLMs behind
an OpenAI-compatible ``/v1/chat/completions`` endpoint: ``vllm serve`` on a GPU cluster, a hosted
API, or ``transformers serve`` on a CPU box. A rollout must never crash because such a server is
down, slow, overloaded or talks nonsense, so :meth:`ChatClient.chat` returns a :class:`ChatReply`
whose ``ok`` is False after ``max_retries`` retries with exponential backoff, and the caller
degrades the turn the way its task specifies (and counts it). Every outcome is counted in
:meth:`ChatClient.stats`.

Greedy answers (temperature 0) are deterministic, so a reply can be cached under a key the caller
chooses (e.g. ``(case_id, normalised_query)``): repeated questions across rollouts cost nothing.
Failures are never cached.

Config (``simulator:`` in a recipe's agent-loop YAML, or ``verl-selflock eval`` options)::

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
      cache: true
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_API_KEY_ENV = "SELFLOCK_SIMULATOR_API_KEY"


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
    """Environment variable holding the API key; unset or empty variable -> key ``EMPTY`` (local servers)."""
    temperature: float = 0.0
    max_tokens: int = 64
    timeout_s: float = 30.0
    """Per-attempt timeout (connect + read)."""
    max_concurrency: int = 16
    """Most requests in flight at once from one process (per event loop)."""
    max_retries: int = 2
    """Retries after the first attempt, on connection errors, timeouts, 429 and 5xx."""
    backoff_s: float = 0.5
    """First retry delay; doubles each retry."""
    cache: bool = True
    """Cache successful replies under the caller's key (only sensible with temperature 0)."""

    def __post_init__(self) -> None:
        def fail(key: str, why: str) -> None:
            raise SimulatorConfigError(f"simulator.{key}: {why}")

        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            fail("base_url", f"must be an http(s) URL such as http://localhost:8000/v1, got {self.base_url!r}")
        if not isinstance(self.model, str) or not self.model:
            fail("model", "must name the served model")
        if not 0.0 <= float(self.temperature) <= 2.0:
            fail("temperature", f"must be in [0, 2], got {self.temperature!r}")
        for key in ("max_tokens", "max_concurrency"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(key, f"must be a positive int, got {value!r}")
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 0:
            fail("max_retries", f"must be an int >= 0, got {self.max_retries!r}")
        if not float(self.timeout_s) > 0:
            fail("timeout_s", f"must be > 0, got {self.timeout_s!r}")
        if float(self.backoff_s) < 0:
            fail("backoff_s", f"must be >= 0, got {self.backoff_s!r}")

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
    """``timeout``, ``connection``, ``http_<status>``, ``empty`` or ``bad_response``, when not ok."""
    cached: bool = False
    attempts: int = 0
    """Requests actually sent (0 for a cache hit)."""


class ChatClient:
    """Async client for one endpoint: bounded concurrency, retries with backoff, a reply cache, counters."""

    def __init__(self, config: SimulatorConfig) -> None:
        from openai import AsyncOpenAI

        self.config = config
        # The SDK's own retries are off: ours are counted and bounded by the same config.
        self._client = AsyncOpenAI(
            base_url=config.base_url, api_key=config.api_key(), timeout=float(config.timeout_s), max_retries=0
        )
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._cache: dict[Hashable, str] = {}
        self._counts: Counter[str] = Counter()

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
        use_cache = self.config.cache and cache_key is not None
        if use_cache and cache_key in self._cache:
            self._counts["cache_hits"] += 1
            return ChatReply(text=self._cache[cache_key], ok=True, cached=True)
        if use_cache:
            self._counts["cache_misses"] += 1

        request: dict[str, Any] = {
            "model": self.config.model,
            "messages": [dict(m) for m in messages],
            "max_tokens": int(max_tokens or self.config.max_tokens),
            "temperature": float(self.config.temperature if temperature is None else temperature),
        }
        if stop:
            request["stop"] = list(stop)

        error = "unknown"
        attempts = 0
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self._counts["retries"] += 1
                await asyncio.sleep(float(self.config.backoff_s) * 2 ** (attempt - 1))
            attempts += 1
            self._counts["requests"] += 1
            text, error, retryable = await self._attempt(request)
            if text is not None:
                if use_cache:
                    self._cache[cache_key] = text
                return ChatReply(text=text, ok=True, attempts=attempts)
            self._counts[f"error_{error}"] += 1
            if not retryable:
                break
        self._counts["failures"] += 1
        logger.warning(
            "simulator %s at %s failed after %d attempt(s): %s", self.config.model, self.config.base_url, attempts, error
        )
        return ChatReply(text=None, ok=False, error=error, attempts=attempts)

    async def _attempt(self, request: dict[str, Any]) -> tuple[str | None, str, bool]:
        """(text or None, error kind, retryable)."""
        import openai

        try:
            async with self._semaphore:
                response = await self._client.chat.completions.create(**request)
        except openai.APITimeoutError:
            return None, "timeout", True
        except openai.APIConnectionError:
            return None, "connection", True
        except openai.APIStatusError as exc:
            status = int(exc.status_code)
            return None, f"http_{status}", status == 429 or status >= 500
        except (ValueError, TypeError, KeyError) as exc:  # a body the SDK cannot parse
            logger.debug("simulator: unparsable response: %r", exc)
            return None, "bad_response", True
        try:
            content = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            return None, "bad_response", True
        if not isinstance(content, str):
            return None, "bad_response", True
        if not content.strip():
            return None, "empty", True
        return content, "", False

    def stats(self) -> dict[str, float]:
        """Counters since creation: calls, requests, retries, failures, error_<kind>, cache hits/misses, hit rate."""
        out = {key: float(value) for key, value in self._counts.items()}
        for key in ("calls", "requests", "retries", "failures", "cache_hits", "cache_misses"):
            out.setdefault(key, 0.0)
        lookups = out["cache_hits"] + out["cache_misses"]
        out["cache_hit_rate"] = out["cache_hits"] / lookups if lookups else 0.0
        return out

    async def aclose(self) -> None:
        await self._client.close()


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
