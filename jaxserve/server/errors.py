"""OpenAI's error envelope and the exceptions the routes raise to produce it.

Every failure a client can cause ends here as `{"error": {"message", "type", "param", "code"}}` with a
4xx status; FastAPI's own 422 for validation errors never reaches a client (see `install_error_handlers`).
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxserve.engine.errors import EngineBusy, EngineDead, RequestFailed

logger = logging.getLogger(__name__)

# Longest slice of a user-supplied value echoed back in an error message (bodies can be megabytes).
_MAX_ECHO_CHARS = 120


class APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI's error envelope."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


class ClientDisconnected(Exception):
    """The client went away before the response was ready: nobody will read an answer."""


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{truncate(model)}` does not exist.",
        param="model",
        code="model_not_found",
    )


def server_busy(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="service_unavailable", headers={"Retry-After": "1"})


def engine_error(exc: BaseException) -> APIError | None:
    """The HTTP answer to an exception the engine raised for one request (None: not the engine's)."""
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if isinstance(exc, EngineBusy):
        return server_busy(str(exc))
    if isinstance(exc, EngineDead):
        return APIError(503, f"the engine is unavailable: {exc}", type="server_error", code="engine_unavailable")
    if isinstance(exc, RequestFailed):
        return APIError(500, str(exc), type="server_error", code="request_failed")
    return None


def truncate(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= _MAX_ECHO_CHARS else text[:_MAX_ECHO_CHARS] + "..."


def validation_error_to_api_error(exc: ValidationError | RequestValidationError) -> APIError:
    """Turn pydantic's error list into one readable 400 naming the first offending field."""
    errors = exc.errors(include_url=False, include_input=False) if isinstance(exc, ValidationError) else exc.errors()
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind in ("json_invalid", "json_type") or (kind == "model_type" and not loc):
        # Malformed JSON, invalid UTF-8, or a body that is not a JSON object.
        detail = first.get("ctx", {}).get("error") if isinstance(first.get("ctx"), dict) else None
        msg = "request body is not a valid JSON object" + (f": {truncate(str(detail))}" if detail else "")
        return bad_request(msg, code="invalid_json")
    msg = truncate(str(first.get("msg", "invalid value"))) if first.get("msg") else "invalid value"
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
    where = f"{param}: " if param else ""
    return bad_request(f"{where}{msg}{more}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception a request can raise to the envelope: never FastAPI's 422, never a bare 500."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_to_api_error(exc).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> JSONResponse:
        return validation_error_to_api_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return APIError(404, "Not found: no such route", code="not_found").response()
        if exc.status_code == 405:
            return APIError(405, "Method not allowed for this route", code="method_not_allowed").response()
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(ClientDisconnected)
    async def _disconnected(_: Request, exc: ClientDisconnected) -> Response:
        # 499 (nginx's "client closed request") only shows in logs and metrics; the socket is gone.
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request")
        return APIError(500, f"internal server error: {type(exc).__name__}", type="server_error").response()
