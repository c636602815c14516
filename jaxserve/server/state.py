"""Per-app server state: the engine once it is warm, the served model names, the metrics."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from jaxserve.config import ServerConfig
from jaxserve.server.errors import engine_error, model_not_found, server_busy
from jaxserve.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from jaxserve.engine.async_engine import AsyncEngine


@dataclass
class ServerState:
    """Mutable by design: the engine appears when warm-up ends. One instance per app, never global."""

    config: ServerConfig
    engine: "AsyncEngine | None" = None
    startup_error: str | None = None
    startup_progress: str | None = None  # what the start is doing now (jaxserve.startup), for /health
    created: int = 0
    metrics: ServerMetrics = field(init=False)
    _token_bytes: Sequence[bytes | None] | None = field(default=None, init=False, repr=False)
    _token_bytes_lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(lambda: self.engine.stats() if self.engine is not None else None)

    async def token_bytes(self) -> Sequence[bytes | None]:
        """Exact bytes of every token id (for logprobs), built once on first use (about a second)."""
        async with self._token_bytes_lock:
            if self._token_bytes is None:
                engine = self.require_engine()
                self._token_bytes = await asyncio.to_thread(engine.tokenizer.token_bytes)
            return self._token_bytes

    @property
    def ready(self) -> bool:
        return self.engine is not None

    def require_engine(self) -> "AsyncEngine":
        if self.engine is None:
            if self.startup_error:
                raise server_busy(f"the engine failed to start: {self.startup_error}")
            doing = f" ({self.startup_progress})" if self.startup_progress else ""
            raise server_busy(f"the server is starting: the engine is loading the model and compiling{doing}; "
                              "retry shortly")
        return self.engine

    @property
    def served_model_name(self) -> str:
        if self.config.served_model_name:
            return self.config.served_model_name
        if self.engine is not None:
            return self.engine.model_name
        return self.config.engine.model or "default"

    def resolve_model(self, requested: str | None) -> str:
        """The name to report back; a model this server does not serve is a 404."""
        name = self.served_model_name
        if requested is None or requested == "":
            return name
        if requested != name:
            raise model_not_found(requested)
        return name

    def admit(self) -> None:
        """503 (with Retry-After) when the engine takes no new request now: its queue of admitted requests
        that are not yet running is full, it is shutting down, or it is dead. Cheap: checked before any
        tokenization or constraint compilation; the engine checks again when the request is submitted."""
        engine = self.require_engine()
        try:
            engine.check_admission()
        except Exception as exc:
            err = engine_error(exc)
            if err is None:
                raise
            raise err from None

    def health(self) -> str | None:
        """Why the server cannot serve right now (None: it can)."""
        if self.engine is None:
            return f"the engine failed to start: {self.startup_error}" if self.startup_error else "starting"
        if self.engine.dead_reason is not None:
            return f"the engine is dead: {self.engine.dead_reason}"
        if self.engine.draining:
            return "shutting down"
        return None
