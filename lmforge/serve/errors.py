"""Errors in OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, for every FastAPI app
lmforge serves (the OpenAI-compatible server and the recommender's): one exception, one body, one set of
handlers, so a client's error handling works against either."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.schemas import FieldError


class APIError(Exception):
    """An error response: HTTP `status`, OpenAI's error `kind` (its "type") and the request field at fault."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.headers = status, message, kind, param, headers


def error_body(
    status: int, message: str, kind: str, param: str | None = None, headers: dict | None = None
) -> JSONResponse:
    code = {401: "invalid_api_key", 404: "not_found", 413: "request_too_large", 429: "rate_limited"}.get(status)
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status, headers=headers
    )


async def api_error(_, error: APIError) -> JSONResponse:
    return error_body(error.status, error.message, error.kind, error.param, error.headers)


# pydantic's labels of union branches in an error's location ("str", "list[...]", "tagged-union[...]"): not fields
UNION_BRANCHES = {"str", "int", "float", "bool", "dict", "list", "none"}


def field_path(location) -> str:
    """An error location as the request's dotted field path (`messages.0.content.1.image_url.url`), without
    pydantic's union-branch labels or the tag a tagged union's branch is named by."""
    parts, tag_next = [], False
    for part in location:
        if isinstance(part, str) and ("[" in part or part in UNION_BRANCHES):
            tag_next = "tagged-union[" in part  # the next name (after a list's index) is the branch's tag
            continue
        if tag_next and isinstance(part, str):
            tag_next = False
            continue
        parts.append(str(part))
    return ".".join(parts)


def invalid_request_handler(status: int):
    """The handler for a body that is not JSON or does not fit the schema, answering with `status`."""

    async def invalid_request(_, error: RequestValidationError) -> JSONResponse:
        # Where a value fits no branch of a union, the branch whose error lies deepest is the one the client
        # meant (a content list with a bad part, not a content string).
        problems = sorted(error.errors(), key=lambda problem: -len(field_path(problem.get("loc", ())[1:]).split(".")))
        first = problems[0] if problems else {}
        if first.get("type") == "json_invalid":
            return error_body(
                status, f"request body is not valid JSON: {first.get('msg', '')}", "invalid_request_error"
            )
        field_error = (first.get("ctx") or {}).get("error")
        if isinstance(field_error, FieldError):
            return error_body(status, f"invalid request: {field_error}", "invalid_request_error", field_error.field)
        location = field_path(first.get("loc", ())[1:])
        unsupported = next((problem for problem in problems if problem.get("type") == "extra_forbidden"), None)
        if unsupported is not None:  # the field policy (schemas._Request): refused, never dropped
            name = field_path(unsupported.get("loc", ())[1:])
            return error_body(
                status,
                f"unsupported field {name!r}: this server does not implement it",
                "invalid_request_error",
                name,
            )
        detail = "; ".join(
            f"{field_path(problem.get('loc', ())[1:]) or 'body'}: {problem.get('msg')}" for problem in problems[:5]
        )
        return error_body(status, f"invalid request: {detail}", "invalid_request_error", location or None)

    return invalid_request


async def http_error(_, error: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown path: 404, a wrong method: 405) in the same shape."""
    return error_body(error.status_code, str(error.detail), "invalid_request_error")


def use_openai_errors(app: FastAPI, validation_status: int = 400) -> None:
    """Make every error `app` sends, raised or FastAPI's own, an OpenAI-shaped body. A request that does not
    fit the schema gets `validation_status`: 400 as OpenAI answers it, or FastAPI's 422 for an API that
    promised that."""
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request_handler(validation_status))
    app.add_exception_handler(StarletteHTTPException, http_error)
