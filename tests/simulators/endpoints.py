"""An OpenAI-compatible test server with ``/v1/models`` and API-key checking (aiohttp, in a thread): what
the start-up check of a worker's simulator talks to (``test_preflight``, ``verl_adapter/test_multinode``)."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Self

from aiohttp import web
from fixtures.openai_servers import completion_body, free_port

KEY = "sk-test-secret-123"


@dataclass
class Endpoint:
    """An OpenAI-compatible server: ``models`` lists what it serves (None: no ``/models`` route);
    ``key``: the bearer token it wants (None: any); ``status``: forced status of ``/models``; ``fail_first``:
    that many 503s (any route) before answering;
    ``chat_ok``: whether a chat completion for an unlisted model succeeds; ``prefix``: the route root."""

    models: list[str] | None = field(default_factory=lambda: ["patient"])
    key: str | None = None
    status: int | None = None
    fail_first: int = 0
    chat_ok: bool = True
    prefix: str = "/v1"
    seen: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, authorization)

    def __post_init__(self) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}{self.prefix}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()

    def _refused(self, request: web.Request) -> web.Response | None:
        self.seen.append((request.method, request.path, request.headers.get("Authorization", "")))
        if self.key is not None and request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": {"message": "Incorrect API key"}}, status=401)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": {"message": "loading"}}, status=503)
        return None

    async def _models(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        if self.status is not None:
            return web.json_response({"error": {"message": "forced"}}, status=self.status)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def _chat(self, request: web.Request) -> web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        if not self.chat_ok:
            return web.json_response({"error": {"message": "The model does not exist."}}, status=404)
        return web.json_response(completion_body("OK"))

    def __enter__(self) -> Self:
        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            if self.models is not None:
                app.router.add_get(f"{self.prefix}/models", self._models)
            app.router.add_post(f"{self.prefix}/chat/completions", self._chat)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            self._ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
