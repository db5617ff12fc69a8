"""HTTP errors in the OpenAI shape `{"error": {"message", "type", "param", "code"}}`.

Every way a request can fail ends here: our own `APIError`, FastAPI's validation errors (turned
from 422 into 400, with the offending field named), Starlette's 404/405/413, and unexpected
exceptions (500, logged with a traceback; never caused by user input).
"""

import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatdistill.serve.protocol import ErrorDetail, ErrorResponse

log = logging.getLogger("chatdistill.serve")

# OpenAI's error `type` per status; `code` gives the finer reason.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error answered to the client as `status` with an OpenAI-shaped body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        # Text echoed from the request may hold lone surrogates, which UTF-8 cannot carry.
        self.message = _printable(message)
        self.param = None if param is None else _printable(param)
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(
            message=self.message,
            type=_TYPES.get(self.status, "invalid_request_error"),
            param=self.param,
            code=self.code,
        )
        return ErrorResponse(error=detail).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _is_union_tag(part: object) -> bool:
    """Pydantic puts the tried union member (`str`, `list[int]`, `TextContentPart`) into `loc`;
    field names in the protocol are lower snake case, so anything else is such a tag."""
    if isinstance(part, int):
        return False
    text = str(part)
    return "[" in text or text in {"str", "int", "float", "bool"} or text[:1].isupper()


def validation_error(errors: Sequence[dict[str, Any]]) -> APIError:
    """One 400 from pydantic's error list: the first failing field, all reasons it failed."""
    if not errors:
        return APIError(400, "invalid request", code="invalid_request")
    first = errors[0]
    kind = first.get("type", "")
    if kind == "json_invalid":
        reason = first.get("ctx", {}).get("error", "malformed JSON")
        return APIError(400, f"request body is not valid JSON: {reason}", code="invalid_json")
    loc = [p for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    param = ".".join(str(p) for p in loc) or None
    if kind == "extra_forbidden":
        return APIError(
            400,
            f"unrecognized request argument '{param}': this server does not support it",
            param=param,
            code="unsupported_parameter",
        )
    if kind == "missing" and not loc:
        return APIError(400, "request body is missing: send a JSON object", code="invalid_request")
    same_field = [
        e
        for e in errors
        if [p for p in e.get("loc", ()) if p != "body" and not _is_union_tag(p)] == loc
    ]
    reasons = []
    for e in same_field:
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if msg not in reasons:
            reasons.append(msg)
    where = f"{param}: " if param else ""
    return APIError(400, where + "; or ".join(reasons), param=param, code="invalid_value")


def install_error_handlers(app: FastAPI, on_error: Callable[[int], None]) -> None:
    """Answer every failure in the OpenAI shape; `on_error(status)` counts them."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        on_error(exc.status)
        return exc.response()

    async def request_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        err = validation_error(list(exc.errors()))
        on_error(err.status)
        return err.response()

    async def http_exception(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        err = APIError(
            exc.status_code,
            str(exc.detail),
            code=code.get(exc.status_code),
            headers=dict(exc.headers) if exc.headers else None,
        )
        on_error(err.status)
        return err.response()

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        on_error(500)
        return APIError(
            500, "internal server error; see the server log", code="internal_error"
        ).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, request_validation)
    app.add_exception_handler(StarletteHTTPException, http_exception)
    app.add_exception_handler(Exception, unexpected)
