"""The simulator client against real HTTP servers: `transformers serve` and fault-injecting ones."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import random
import time

import pytest
from fixtures.openai_servers import FaultServer, completion_body, down_url

from verl_selflock.simulators import ChatClient, SimulatorConfig, SimulatorConfigError, shared_client
from verl_selflock.simulators.client import backoff_delay, retry_after_seconds

MESSAGES = [{"role": "user", "content": "Say yes."}]


def _client(base_url: str, **overrides) -> ChatClient:
    settings = {"base_url": base_url, "model": "m", "timeout_s": 2.0, "max_retries": 2, "backoff_s": 0.01, **overrides}
    return ChatClient(SimulatorConfig.from_mapping(settings))


def test_config_errors_name_the_key():
    with pytest.raises(SimulatorConfigError, match="simulator: unknown key.*'url'"):
        SimulatorConfig.from_mapping({"url": "http://x/v1", "model": "m"})
    with pytest.raises(SimulatorConfigError, match=r"missing \['model'\]"):
        SimulatorConfig.from_mapping({"base_url": "http://x/v1"})
    with pytest.raises(SimulatorConfigError, match="simulator.base_url"):
        SimulatorConfig.from_mapping({"base_url": "localhost:8000", "model": "m"})
    with pytest.raises(SimulatorConfigError, match="simulator.max_concurrency"):
        SimulatorConfig.from_mapping({"base_url": "http://x/v1", "model": "m", "max_concurrency": 0})
    with pytest.raises(SimulatorConfigError, match="no endpoint configured"):
        SimulatorConfig.from_mapping(None)


def test_api_key_comes_from_the_named_variable(monkeypatch):
    config = SimulatorConfig(base_url="http://x/v1", model="m", api_key_env="MY_SIM_KEY")
    monkeypatch.delenv("MY_SIM_KEY", raising=False)
    assert config.api_key() == "EMPTY"
    monkeypatch.setenv("MY_SIM_KEY", "secret")
    assert config.api_key() == "secret"


def test_server_down_degrades_and_counts():
    client = _client(down_url())
    reply = asyncio.run(client.chat(MESSAGES))
    assert not reply.ok and reply.text is None and reply.error == "connection" and reply.attempts == 3
    stats = client.stats()
    assert stats["failures"] == 1 and stats["retries"] == 2 and stats["error_connection"] == 3


@pytest.mark.parametrize(
    ("mode", "error", "attempts"),
    [("error500", "http_500", 3), ("slow", "timeout", 3), ("garbage", "bad_response", 3), ("empty", "empty", 3)],
)
def test_faults_degrade_after_bounded_retries(mode, error, attempts):
    with FaultServer(mode, delay_s=1.5) as server:
        client = _client(server.base_url, timeout_s=0.5)

        async def run():
            reply = await client.chat(MESSAGES, cache_key=("case", "q"))
            stats = client.stats()
            # failures are not cached: the next call asks the server again
            await client.chat(MESSAGES, cache_key=("case", "q"))
            return reply, stats

        reply, stats = asyncio.run(run())
        assert (reply.ok, reply.error, reply.attempts) == (False, error, attempts)
        assert stats["failures"] == 1 and stats[f"error_{error}"] == attempts
        assert client.stats()["cache_hits"] == 0 and client.stats()["failures"] == 2


def test_client_error_is_not_retried():
    class Status400(FaultServer):
        async def _reply(self, request):
            from aiohttp import web

            self.requests.append(await request.json())
            return web.json_response({"error": {"message": "bad request"}}, status=400)

    with Status400("ok") as server:
        reply = asyncio.run(_client(server.base_url).chat(MESSAGES))
    assert (reply.ok, reply.error, reply.attempts, len(server.requests)) == (False, "http_400", 1, 1)


def test_flaky_server_recovers_within_retries_and_replies_are_cached():
    with FaultServer("flaky", reply="Yes, 3", fail_first=2) as server:
        client = _client(server.base_url)

        async def run():
            first = await client.chat(MESSAGES, cache_key=("case-1", "is it on"), max_tokens=7, stop=["\n"])
            second = await client.chat(MESSAGES, cache_key=("case-1", "is it on"))
            other = await client.chat(MESSAGES, cache_key=("case-2", "is it on"))
            return first, second, other

        first, second, other = asyncio.run(run())
    assert (first.ok, first.text, first.attempts, first.cached) == (True, "Yes, 3", 3, False)
    assert (second.text, second.cached, second.attempts) == ("Yes, 3", True, 0)
    assert other.ok and not other.cached
    assert len(server.requests) == 4  # 2 failures + first + other; the cache hit sent nothing
    assert server.requests[2]["max_tokens"] == 7 and server.requests[2]["stop"] == ["\n"]
    assert server.requests[2]["temperature"] == 0.0 and server.requests[2]["model"] == "m"
    stats = client.stats()
    assert stats["cache_hits"] == 1 and stats["cache_misses"] == 2 and stats["cache_hit_rate"] == pytest.approx(1 / 3)


def test_concurrency_limit_is_respected():
    with FaultServer("slow", reply="ok", delay_s=0.3) as server:
        client = _client(server.base_url, max_concurrency=2, timeout_s=5.0)

        async def run():
            return await asyncio.gather(*(client.chat(MESSAGES) for _ in range(4)))

        replies = asyncio.run(asyncio.wait_for(run(), 10))
    assert all(r.ok for r in replies)
    assert len(server.requests) == 4 and server.max_in_flight == 2


def test_shared_client_is_one_per_config_and_loop():
    config = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}

    async def twice():
        return shared_client(config), shared_client(dict(config)), shared_client({**config, "model": "n"})

    a, b, c = asyncio.run(twice())
    assert a is b and a is not c
    (d, _, _) = asyncio.run(twice())
    assert d is not a  # a new event loop gets its own client


@pytest.mark.slow
def test_real_transformers_serve_greedy_reply_and_cache(chat_server):
    client = ChatClient(SimulatorConfig(base_url=chat_server.base_url, model=chat_server.model, max_tokens=12))

    async def run():
        first = await client.chat([{"role": "user", "content": "Answer Yes or No: is fire hot?"}], cache_key=("c", "q"))
        again = await client.chat([{"role": "user", "content": "Answer Yes or No: is fire hot?"}], cache_key=("c", "q"))
        fresh = await client.chat([{"role": "user", "content": "Answer Yes or No: is fire hot?"}])
        return first, again, fresh

    first, again, fresh = asyncio.run(run())
    assert first.ok and first.text and first.attempts == 1
    assert again.cached and again.text == first.text
    assert fresh.text == first.text  # greedy: the server itself is deterministic
    assert client.stats()["failures"] == 0


# --------------------------------------------------------------------------- cache rules


def test_sampled_calls_are_never_cached():
    """A reply sampled at temperature > 0 is one draw among many: caching it would freeze it. Only greedy
    calls (the config's or the call's temperature 0) read or fill the cache."""
    with FaultServer("ok", reply="a draw") as server:
        sampled = _client(server.base_url, temperature=0.7)
        greedy = _client(server.base_url)

        async def run():
            first = await sampled.chat(MESSAGES, cache_key=("case", "q"))
            second = await sampled.chat(MESSAGES, cache_key=("case", "q"))
            hot = await greedy.chat(MESSAGES, cache_key=("case", "q"), temperature=0.9)  # per-call sampling
            cold = [await greedy.chat(MESSAGES, cache_key=("case", "q")) for _ in range(2)]
            return first, second, hot, cold

        first, second, hot, cold = asyncio.run(run())
    assert not (first.cached or second.cached or hot.cached) and first.ok and second.ok
    assert [r.cached for r in cold] == [False, True]
    assert len(server.requests) == 4  # 2 sampled + 1 sampled per call + 1 greedy miss
    assert [r["temperature"] for r in server.requests] == [0.7, 0.7, 0.9, 0.0]
    assert sampled.stats()["cache_hits"] == sampled.stats()["cache_misses"] == 0
    assert (greedy.stats()["cache_hits"], greedy.stats()["cache_misses"]) == (1, 1)


def test_identical_calls_in_flight_share_one_request():
    """Three identical greedy calls at once send one request: the later two await it and count as hits."""
    with FaultServer("slow", reply="shared", delay_s=0.4) as server:
        client = _client(server.base_url, timeout_s=5.0)

        async def run():
            same = [client.chat(MESSAGES, cache_key=("case", "q")) for _ in range(3)]
            other = client.chat(MESSAGES, cache_key=("case", "other"))
            replies = await asyncio.gather(*same, other)
            later = await client.chat(MESSAGES, cache_key=("case", "q"))
            return replies, later

        replies, later = asyncio.run(asyncio.wait_for(run(), 10))
    assert all(r.ok and r.text == "shared" for r in replies)
    assert [(r.cached, r.attempts) for r in replies[:3]] == [(False, 1), (True, 0), (True, 0)]
    assert later.cached and len(server.requests) == 2
    stats = client.stats()
    assert (stats["cache_hits"], stats["cache_misses"], stats["in_flight_shared"]) == (3, 2, 2)


def test_a_failed_request_in_flight_fails_its_sharers_without_new_requests():
    with FaultServer("error500") as server:
        client = _client(server.base_url, max_retries=1)

        async def run():
            return await asyncio.gather(*(client.chat(MESSAGES, cache_key=("case", "q")) for _ in range(2)))

        replies = asyncio.run(asyncio.wait_for(run(), 10))
    assert [(r.ok, r.error) for r in replies] == [(False, "http_500")] * 2
    assert len(server.requests) == 2  # one call's attempt and retry, nothing from the sharer
    stats = client.stats()
    assert stats["failures"] == 2 and stats["cache_hits"] == 0 and stats["in_flight_shared"] == 1


def test_cache_keeps_the_most_recently_used_replies():
    with FaultServer("ok", reply="r") as server:
        client = _client(server.base_url, cache_size=2)

        async def run():
            return [(await client.chat(MESSAGES, cache_key=key)).cached for key in "abacba"]

        cached = asyncio.run(run())
    # a, b fill it; a is a hit (now the most recent); c evicts b; b evicts a; a evicts c.
    assert cached == [False, False, True, False, False, False]
    assert len(server.requests) == 5
    stats = client.stats()
    assert (stats["cache_evictions"], stats["cache_entries"], stats["cache_hits"]) == (3, 2, 1)
    with pytest.raises(SimulatorConfigError, match="simulator.cache_size"):
        SimulatorConfig(base_url="http://x/v1", model="m", cache_size=0)


# --------------------------------------------------------------------------- backoff


def test_backoff_delay_is_jittered_and_capped():
    for retry in range(1, 8):
        nominal = min(0.5 * 2 ** (retry - 1), 3.0)
        low, high = backoff_delay(retry, 0.5, 3.0, 0.0), backoff_delay(retry, 0.5, 3.0, 0.999999)
        assert low == pytest.approx(nominal / 2) and high == pytest.approx(nominal, rel=1e-5)
    assert backoff_delay(1, 0.5, 3.0, 0.2, retry_after_s=2.5) == 2.5  # the server's word, no jitter
    assert backoff_delay(1, 0.5, 3.0, 0.2, retry_after_s=3600) == 3.0  # bounded


def test_retry_after_header_parsing():
    future = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=30))
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert 25 <= retry_after_seconds({"retry-after": future}) <= 31
    assert retry_after_seconds({"retry-after": "-4"}) == 0.0
    for bad in ({}, {"retry-after": "soon"}, {"retry-after": "nan"}):
        assert retry_after_seconds(bad) is None


def test_retries_wait_jittered_exponential_delays():
    """The real retry loop draws each delay from the client's random source (seeded here)."""
    with FaultServer("error500") as server:
        client = _client(server.base_url, max_retries=3, backoff_s=0.05, backoff_max_s=0.15)
        client._rng = random.Random(7)
        waits: list[float] = []
        delay = client._retry_delay
        client._retry_delay = lambda retry, after: waits.append(delay(retry, after)) or waits[-1]
        reply = asyncio.run(client.chat(MESSAGES))
    draws = random.Random(7)
    expected = [backoff_delay(retry, 0.05, 0.15, draws.random()) for retry in (1, 2, 3)]
    assert not reply.ok and reply.attempts == 4 and len(server.requests) == 4
    assert waits == pytest.approx(expected) and len(set(waits)) == 3


def test_backoff_cap_bounds_the_wait():
    """Uncapped, 3 retries from 1 s would wait 3.5 s or more; capped at 0.1 s they take a fraction of that."""
    with FaultServer("error500") as server:
        client = _client(server.base_url, max_retries=3, backoff_s=1.0, backoff_max_s=0.1)
        start = time.monotonic()
        reply = asyncio.run(client.chat(MESSAGES))
        elapsed = time.monotonic() - start
    assert not reply.ok and len(server.requests) == 4 and elapsed < 2.0


class RetryAfterServer(FaultServer):
    """Fails the first request with ``status`` and a ``Retry-After`` header, then replies."""

    status: int = 503
    retry_after: str = "1"

    async def _reply(self, request):
        from aiohttp import web

        self.requests.append(await request.json())
        self.times = [*getattr(self, "times", []), time.monotonic()]
        if len(self.requests) == 1:
            return web.json_response(
                {"error": {"message": "busy"}}, status=self.status, headers={"Retry-After": self.retry_after}
            )
        return web.json_response(completion_body(self.reply))


@pytest.mark.parametrize(
    ("status", "retry_after", "backoff_max_s", "min_gap", "max_gap"),
    [
        (503, "1", 5.0, 0.95, 3.0),  # honoured
        (429, "1", 5.0, 0.95, 3.0),  # honoured
        (503, "3600", 0.3, 0.0, 1.5),  # bounded by backoff_max_s
        (500, "3600", 5.0, 0.0, 1.0),  # only 429/503 carry a meaningful Retry-After: plain backoff
    ],
)
def test_retry_after_is_honoured_and_bounded(status, retry_after, backoff_max_s, min_gap, max_gap):
    with RetryAfterServer("ok", reply="fine") as server:
        server.status, server.retry_after = status, retry_after
        client = _client(server.base_url, backoff_s=0.01, backoff_max_s=backoff_max_s)
        reply = asyncio.run(client.chat(MESSAGES))
    gap = server.times[1] - server.times[0]
    assert reply.ok and reply.text == "fine" and reply.attempts == 2
    assert min_gap <= gap <= max_gap
