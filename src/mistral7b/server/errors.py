"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, whatever failed.

`APIError` is what the serving code raises; app.py's handlers turn it (and FastAPI's
validation errors, unknown routes, and anything unexpected) into a JSONResponse.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from mistral7b.server.protocol import ErrorInfo, ErrorResponse

# HTTP status -> OpenAI error type
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "server_error",
    504: "timeout",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(message=self.message, type=_TYPES.get(self.status, "api_error"),
                         param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The error as a server-sent event, for a stream that has already started."""
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(message: str, retry_after: int) -> APIError:
    return APIError(503, message, code="server_overloaded",
                    headers={"Retry-After": str(retry_after)})


def raw_error(status: int, message: str, code: str | None = None,
              headers: dict[str, str] | None = None) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) for ASGI middlewares that answer before the app runs."""
    err = APIError(status, message, code=code, headers=headers)
    body = json.dumps(err.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    return status, raw, body
