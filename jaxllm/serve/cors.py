"""CORS for the API: lets a chat UI served from another origin call /v1/ (`jaxllm serve --cors-origin`).

Only the listed origins get CORS headers, and only on /v1/; a request from any other origin (or with no Origin) is
answered as before, so the browser keeps it from reading the response. A preflight (`OPTIONS` with
`Access-Control-Request-Method`) from a listed origin to /v1/... is answered 204 before the API key is
checked (a browser never sends credentials in a preflight); the real request still needs the key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flask import Flask, Response, request

from jaxllm.errors import InputError

ALLOW_HEADERS = "Authorization, Content-Type"
ALLOW_METHODS = "GET, POST, OPTIONS"
MAX_AGE_S = "600"  # how long a browser may cache a preflight's answer
_ORIGIN = re.compile(r"(https?)://([a-z0-9.\-]+|\[[0-9a-f:.]+\])(:\d{1,5})?", re.IGNORECASE)


def normalize_origin(origin: str) -> str:
    """An origin as browsers send it in the Origin header ("HTTP://Example.com/" -> "http://example.com");
    `InputError` unless it is scheme://host[:port] with scheme http or https."""
    text = origin.strip().rstrip("/")
    match = _ORIGIN.fullmatch(text)
    if match is None:
        raise InputError(
            f"--cors-origin must be an origin such as https://chat.example.com or http://localhost:3000 "
            f"(scheme, host and optional port, no path), got {origin!r}"
        )
    scheme, host, port = match.group(1).lower(), match.group(2).lower(), match.group(3) or ""
    default = {"http": ":80", "https": ":443"}[scheme]
    return f"{scheme}://{host}{'' if port == default else port}"


def install(app: Flask, origins: Iterable[str]) -> None:
    """Answer preflights and add CORS headers for `origins`; nothing at all when there are none.

    Call it before registering the app's authentication hook: before-request hooks run in order."""
    allowed = frozenset(normalize_origin(o) for o in origins)
    if not allowed:
        return

    def listed() -> str | None:
        """The request's Origin when it is listed and the request is to the API (/v1/...)."""
        origin = request.headers.get("Origin", "")
        return origin if origin in allowed and request.path.startswith("/v1/") else None

    @app.before_request
    def preflight() -> Response | None:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers and listed():
            return Response(status=204, headers={"Access-Control-Max-Age": MAX_AGE_S})
        return None

    @app.after_request
    def add_headers(response: Response) -> Response:
        response.vary.add("Origin")  # the headers depend on Origin: caches must not share them across origins
        origin = listed()
        if origin is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
            response.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        return response
