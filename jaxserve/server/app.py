"""The FastAPI app: routes, auth, body limits, and the engine's warm-up in the background.

The app listens from the start and answers 503 until the engine is warm, so load balancers and clients
can poll `/health`; `on_ready` fires once requests can be served.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import TYPE_CHECKING, AsyncIterator, Awaitable, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jaxserve.config import ServerConfig
from jaxserve.server.errors import APIError, install_error_handlers
from jaxserve.server.metrics import ServerMetrics
from jaxserve.server.openapi import install_openapi
from jaxserve.server.protocol import now
from jaxserve.server.serving_chat import ChatService
from jaxserve.server.serving_completions import CompletionService
from jaxserve.server.serving_native import NativeService
from jaxserve.server.state import ServerState

if TYPE_CHECKING:
    from jaxserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)

# Paths reported in metrics by name; anything else (404 probes, fuzzing) is folded into "other".
_METRIC_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/generate",
        "/v1/tokenize",
        "/v1/detokenize",
        "/flush_cache",
        "/health",
        "/metrics",
    }
)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it is larger than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise APIError(400, "invalid Content-Length header") from None
        if size > limit:
            raise APIError(413, f"request body of {size} bytes exceeds the limit of {limit} bytes", code="request_too_large")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


class RequestCounter:
    """Counts finished requests by endpoint and status. Plain ASGI rather than BaseHTTPMiddleware, so
    streamed bodies pass through untouched, chunk by chunk."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # the app died before starting a response

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            path = scope["path"]
            endpoint = path if path in _METRIC_PATHS else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
            self.metrics.requests.labels(endpoint=endpoint, status=str(status)).inc()


def build_app(
    config: ServerConfig,
    load_engine: Callable[[], Awaitable["AsyncEngine"]],
    on_ready: Callable[[], Awaitable[None]] | None = None,
    on_startup_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """`load_engine` builds and warms the engine (runs in the background after the app starts)."""
    state = ServerState(config=config, created=now())

    async def warm_up() -> None:
        try:
            state.engine = await load_engine()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # report, then let the launcher exit non-zero
            logger.exception("the engine failed to start")
            state.startup_error = f"{type(exc).__name__}: {exc}"
            if on_startup_failure is not None:
                on_startup_failure(exc)
            return
        if on_ready is not None:
            await on_ready()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(warm_up(), name="jaxserve-warm-up")
        try:
            yield
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if state.engine is not None:
                logger.info("shutting down the engine (aborting unfinished requests)")
                await state.engine.shutdown()

    app = FastAPI(title="jaxserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.jaxserve = state
    install_error_handlers(app)
    install_openapi(app)
    chat = ChatService(state)
    completions = CompletionService(state)
    native = NativeService(state)
    limit = config.max_request_body_bytes

    async def require_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(
                401,
                "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    auth = [Depends(require_api_key)]

    app.add_middleware(RequestCounter, metrics=state.metrics)

    @app.get("/health")
    async def health() -> JSONResponse:
        state.require_engine()  # 503 while starting or after a failed start
        problem = state.health()
        if problem is not None:
            return JSONResponse({"status": "unavailable", "reason": problem}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(name: str, engine: "AsyncEngine") -> dict:
        return {
            "id": name,
            "object": "model",
            "created": state.created,
            "owned_by": "jaxserve",
            "root": config.engine.model or engine.model_name,
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> JSONResponse:
        engine = state.require_engine()
        return JSONResponse({"object": "list", "data": [model_card(state.served_model_name, engine)]})

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def get_model(model_id: str) -> JSONResponse:
        engine = state.require_engine()
        return JSONResponse(model_card(state.resolve_model(model_id), engine))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        return await chat.handle(await read_body(request, limit), request)

    @app.post("/v1/completions", dependencies=auth)
    async def completions_route(request: Request) -> Response:
        return await completions.handle(await read_body(request, limit), request)

    @app.post("/generate", dependencies=auth)
    async def generate(request: Request) -> Response:
        return await native.generate(await read_body(request, limit), request)

    @app.post("/flush_cache", dependencies=auth)
    async def flush_cache() -> JSONResponse:
        engine = state.require_engine()
        try:
            freed = await engine.flush_prefix_cache()
        except ValueError as exc:
            raise APIError(400, str(exc), code="requests_running") from None
        return JSONResponse({"status": "ok", "freed_pages": freed})

    @app.post("/v1/tokenize", dependencies=auth)
    async def tokenize(request: Request) -> Response:
        return await native.tokenize(await read_body(request, limit))

    @app.post("/v1/detokenize", dependencies=auth)
    async def detokenize(request: Request) -> Response:
        return await native.detokenize(await read_body(request, limit))

    return app
