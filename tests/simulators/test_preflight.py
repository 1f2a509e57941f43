"""The start-up check of a worker's simulator: a real HTTP server (aiohttp, in a thread) that plays vLLM's
``/v1/models`` and ``/v1/chat/completions``, or misbehaves; the check refuses what would degrade every turn
and names the URL, and never shows the key."""

from __future__ import annotations

from typing import Any

import pytest
from fixtures.openai_servers import down_url
from simulators.endpoints import KEY, Endpoint

from verl_selflock.simulators import SimulatorConfig, SimulatorUnreachableError, ensure_reachable
from verl_selflock.simulators.preflight import check_reachable, forget_checks


def config(base_url: str, model: str = "patient", **overrides: Any) -> SimulatorConfig:
    values = {"base_url": base_url, "model": model, "timeout_s": 2.0, "max_retries": 0, "backoff_s": 0.01, **overrides}
    return SimulatorConfig(**values)


@pytest.fixture(autouse=True)
def _fresh_checks():
    forget_checks()
    yield
    forget_checks()


def test_a_served_model_passes_with_one_get_and_no_chat_call():
    with Endpoint() as server:
        check_reachable(config(server.base_url))
    assert [(method, path) for method, path, _ in server.seen] == [("GET", "/v1/models")]


def test_a_dead_url_is_refused_naming_url_host_and_loopback(monkeypatch):
    dead = down_url()
    with pytest.raises(SimulatorUnreachableError) as caught:
        check_reachable(config(dead, max_retries=1))
    message = str(caught.value)
    assert message.startswith(f"simulator.base_url {dead} (model patient): the start-up check from ")
    assert "ConnectError" in message and "after 3 attempt(s)" in message  # never fewer than MIN_ATTEMPTS
    assert "this node's own loopback" in message and "resolved on the driver" in message
    assert "\n" not in message


def test_a_refused_key_names_the_variable_never_the_key(monkeypatch):
    monkeypatch.setenv("SIM_KEY_T", "wrong-key")
    with Endpoint(key=KEY) as server, pytest.raises(SimulatorUnreachableError) as caught:
        check_reachable(config(server.base_url, api_key_env="SIM_KEY_T"))
    message = str(caught.value)
    assert "HTTP 401" in message and "$SIM_KEY_T, which is set on this node" in message
    assert "export SIM_KEY_T on every node" in message
    assert KEY not in message and "wrong-key" not in message

    monkeypatch.delenv("SIM_KEY_T")
    with Endpoint(key=KEY) as server, pytest.raises(SimulatorUnreachableError, match="which is not set on this node"):
        check_reachable(config(server.base_url, api_key_env="SIM_KEY_T"))

    monkeypatch.setenv("SIM_KEY_T", KEY)
    with Endpoint(key=KEY) as server:
        check_reachable(config(server.base_url, api_key_env="SIM_KEY_T"))
    assert server.seen[0][2] == f"Bearer {KEY}"


def test_an_unlisted_model_gets_one_chat_call_that_decides():
    with Endpoint(models=["/models/patient-folder-name"]) as server:  # transformers serve lists other names
        check_reachable(config(server.base_url, model="/data/patient"))
    assert [method for method, _, _ in server.seen] == ["GET", "POST"]
    with Endpoint(models=["qwen-14b"], chat_ok=False) as server, pytest.raises(SimulatorUnreachableError) as caught:
        check_reachable(config(server.base_url, model="patinet"))
    assert "HTTP 404 on a chat completion for model patinet" in str(caught.value)
    assert "it lists qwen-14b" in str(caught.value) and "set simulator.model" in str(caught.value)
    assert "'" not in str(caught.value) and '"' not in str(caught.value)  # Hydra shows the loop's errors by repr


def test_a_url_without_v1_is_refused_with_the_fix():
    with Endpoint() as server:
        root = server.base_url.removesuffix("/v1")
        with pytest.raises(SimulatorUnreachableError, match=rf"set simulator.base_url to {root}/v1"):
            check_reachable(config(root))


def test_a_server_without_a_models_route_is_accepted_without_a_chat_call(caplog):
    with Endpoint(models=None) as server:
        check_reachable(config(server.base_url))
    assert server.seen == []  # the 404 came from the router: no chat call, no traffic a test could count
    assert "cannot be confirmed" in caplog.text


def test_a_server_still_loading_is_retried_with_the_configs_backoff():
    with Endpoint(fail_first=2) as server:
        check_reachable(config(server.base_url, max_retries=2))
    assert [method for method, _, _ in server.seen] == ["GET"] * 3
    with Endpoint(fail_first=6) as server, pytest.raises(SimulatorUnreachableError, match="HTTP 503.*of POST"):
        check_reachable(config(server.base_url, max_retries=1))
    assert [method for method, _, _ in server.seen] == ["GET"] * 2 + ["POST"] * 3


def test_the_start_up_check_retries_even_when_the_config_retries_nothing():
    """Refusing stops the run: a server that drops its first requests while it warms up is not refused."""
    with Endpoint(fail_first=2) as server:
        check_reachable(config(server.base_url, max_retries=0))
    assert [method for method, _, _ in server.seen] == ["GET", "POST", "POST"]


def test_a_failing_models_route_lets_a_chat_call_decide():
    """``transformers serve`` answers 500 on ``/v1/models`` and serves chat completions fine."""
    with Endpoint(status=500) as server:
        check_reachable(config(server.base_url))
    assert [method for method, _, _ in server.seen] == ["GET", "POST"]
    with Endpoint(status=500, chat_ok=False) as server, pytest.raises(SimulatorUnreachableError, match="HTTP 404 on a chat"):
        check_reachable(config(server.base_url))


def test_ensure_reachable_asks_once_per_process_and_repeats_a_failure():
    with Endpoint() as server:
        for _ in range(3):
            ensure_reachable(config(server.base_url).as_dict())  # the loop hands its knob as a dict
    assert len(server.seen) == 1
    dead = config(down_url())
    with pytest.raises(SimulatorUnreachableError) as first:
        ensure_reachable(dead)
    with pytest.raises(SimulatorUnreachableError) as second:
        ensure_reachable(dead)
    assert str(first.value) == str(second.value)
