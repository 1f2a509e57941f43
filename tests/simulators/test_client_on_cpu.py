"""The simulator client against real HTTP servers: `transformers serve` and fault-injecting ones."""

from __future__ import annotations

import asyncio

import pytest

from fixtures.openai_servers import FaultServer, down_url
from verl_selflock.simulators import ChatClient, SimulatorConfig, SimulatorConfigError, shared_client

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
