"""The serving API's errors: one exception type and the OpenAI JSON shape it is sent as.

Every error the server sends is `{"error": {"message", "type", "param", "code"}}` with an HTTP status:
400 invalid fields, 401 a missing or wrong API key, 404 unknown routes or models, 405 wrong methods,
413 oversized bodies, 415 a body that is not declared JSON, 421 a Host header this server does not
answer to, 429 a full queue (with `Retry-After`), 503 not ready or shutting down, 504 a request past
its time limit, 500 a bug (never for bad input). waitress's own errors (before the app runs) have the
same shape (`jaxllm.serve.server.JsonErrorTask`).
"""

from __future__ import annotations

from typing import Any

# The `type` of each status, as the OpenAI API names them where it has a name.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class ServeError(Exception):
    """An error response: HTTP `status`, a message for the client, and the OpenAI `param` / `code` fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ServeError:
    return ServeError(400, message, param=param, code=code)


def queue_full(retry_after_s: int) -> ServeError:
    return ServeError(
        429,
        "the server is at capacity (its request queue is full); retry later",
        code="queue_full",
        headers={"Retry-After": str(retry_after_s)},
    )


def timed_out(timeout_s: float) -> ServeError:
    return ServeError(504, f"the request did not finish within the server's limit of {timeout_s:g} s", code="timeout")


def unavailable(message: str, code: str) -> ServeError:
    return ServeError(503, message, code=code, headers={"Retry-After": "1"})
