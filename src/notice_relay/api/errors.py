"""The API's one error body, and the translation of every error into it.

Every error answer is ``{"error": code, "reason": text, "errors": [{field, message}]}``
(:class:`~notice_relay.api.schemas.ErrorBody`): ``error`` is a stable machine code,
``reason`` a sentence for people, ``errors`` the offending fields (may be empty).

Bad input is always a 4xx: FastAPI's validation errors become 422, a body that cannot
be parsed 400, an unknown path 404. A 5xx means the relay itself is unwell (store or
Kafka unavailable: 503) or a bug (500, logged with its traceback).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from notice_relay.api.producer import MessageTooLarge
from notice_relay.errors import KafkaUnavailable, NoticeRelayError, StoreError
from notice_relay.models import FieldError

log = structlog.get_logger("notice_relay.api")

_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 406: "not_acceptable", 409: "conflict",
    413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_request",
    429: "too_many_requests", 500: "internal_error", 503: "unavailable",
}


class ApiError(NoticeRelayError):
    """An answer other than success, with its status and error body."""

    def __init__(self, status: int, reason: str, *, code: str | None = None,
                 errors: Sequence[FieldError] = (),
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.reason = reason
        self.errors = list(errors)
        self.headers = headers
        super().__init__(reason)


_NEED_KEY = "a valid API key is required: Authorization: Bearer nr_<key_id>_<secret>"


def unauthorized(reason: str = _NEED_KEY) -> ApiError:
    """401: no credentials, or credentials that do not verify."""
    return ApiError(401, reason, headers={"WWW-Authenticate": "Bearer"})


def forbidden(reason: str) -> ApiError:
    """403: the key is valid but its role may not do this."""
    return ApiError(403, reason)


def not_found(what: str) -> ApiError:
    """404: also the answer for what exists but belongs to someone else."""
    return ApiError(404, f"no {what}")


def error_response(status: int, code: str, reason: str, errors: Sequence[FieldError] = (),
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error answer."""
    body = {"error": code, "reason": reason,
            "errors": [e.model_dump(mode="json") for e in errors]}
    return JSONResponse(body, status_code=status, headers=headers)


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "$"


async def _api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.reason, exc.errors, exc.headers)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors: dict[str, list[str]] = {}
    for err in exc.errors():
        # The input is never echoed: it may be a token or a key.
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "json_invalid":
            msg = f"not valid JSON: {err.get('ctx', {}).get('error', msg)}"
            errors.setdefault("$", []).append(msg)
            continue
        errors.setdefault(_field(err.get("loc", ())), []).append(msg)
    fields = [FieldError(field=f, message="; ".join(dict.fromkeys(m))[:500])
              for f, m in errors.items()]
    shown = ", ".join(f.field for f in fields[:10])
    return error_response(422, "invalid_request", f"invalid request: {shown}", fields)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    reason = exc.detail if isinstance(exc.detail, str) else _CODES.get(exc.status_code, "error")
    if exc.status_code == 404:
        reason = "no such resource"
    return error_response(exc.status_code, _CODES.get(exc.status_code, "error"), reason,
                          headers=dict(exc.headers) if exc.headers else None)


async def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("api.unavailable", error=str(exc)[:300])
    what = "Kafka" if isinstance(exc, KafkaUnavailable) else "the audit store"
    return error_response(503, "unavailable", f"{what} is unavailable; try again later",
                          headers={"Retry-After": "5"})


async def _too_large(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(413, "payload_too_large", str(exc))


async def _internal(_request: Request, exc: Exception) -> JSONResponse:
    log.error("api.internal_error", error_type=type(exc).__name__, exc_info=exc)
    return error_response(500, "internal_error", "internal error; it has been logged")


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the one body."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(KafkaUnavailable, _unavailable)
    app.add_exception_handler(StoreError, _unavailable)
    app.add_exception_handler(OperationalError, _unavailable)
    app.add_exception_handler(MessageTooLarge, _too_large)
    app.add_exception_handler(Exception, _internal)
