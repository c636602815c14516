"""The ASGI app over a real (tiny) engine in this process, for server tests that need the engine's hooks or
internals; tests of the real launcher process are in test_server_e2e.py."""
from __future__ import annotations

import asyncio
import contextlib
from typing import Iterator

import httpx

from jaxserve.config import ServerConfig
from jaxserve.engine.async_engine import AsyncEngine
from jaxserve.engine.engine import LLMEngine
from jaxserve.server.app import build_app


def make_app(engine: AsyncEngine, **server_options):
    """The app with `engine` already warm (the lifespan's loader is never called)."""
    async def never_called():
        raise AssertionError("the engine is set directly")

    app = build_app(ServerConfig(engine=engine.engine.config, **server_options), never_called)
    app.state.jaxserve.engine = engine
    return app


@contextlib.contextmanager
def started(engine: LLMEngine, **async_options) -> Iterator[AsyncEngine]:
    aeng = AsyncEngine(engine, **async_options)
    asyncio.run(aeng.start())
    try:
        yield aeng
    finally:
        asyncio.run(aeng.shutdown())


def call(app, *requests: tuple[str, str, dict | None]) -> list[httpx.Response]:
    """Send (method, path, json body) requests to the app concurrently; their responses in order."""
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            return await asyncio.gather(*(client.request(method, path, json=body) for method, path, body in requests))
    return asyncio.run(go())
