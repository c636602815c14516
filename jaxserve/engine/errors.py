"""What the engine tells a request's owner when it cannot serve it. The server maps each to an HTTP status:
ValueError (bad input) -> 400, `EngineBusy` -> 503 with Retry-After, `EngineDead` -> 503,
`RequestFailed` -> 500 for that request only."""
from __future__ import annotations


class EngineBusy(RuntimeError):
    """Not now, maybe later: the admission queue or a shared pool is full. Nothing was lost."""


class EngineDead(RuntimeError):
    """The engine cannot continue (its thread died, a step hung, the device state was lost)."""


class RequestFailed(RuntimeError):
    """This request hit an error inside the engine; the engine itself goes on serving the others."""
