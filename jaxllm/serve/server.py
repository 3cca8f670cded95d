"""`jaxllm serve`: the app under waitress, a threaded production WSGI server, with one engine per process.

Threaded, not pre-forking: JAX does not survive a fork after it has started, and one worker thread
owns the model (see `engine`). SIGTERM or SIGINT stops gracefully: new completions get 503, running
ones finish (up to `drain_s`), then the server exits; a second signal exits at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from waitress.channel import HTTPChannel
from waitress.task import ErrorTask

from jaxllm.errors import InputError
from jaxllm.serve.engine import Engine, EngineSettings
from jaxllm.serve.errors import ServeError

API_KEY_ENV = "JAXLLM_API_KEY"
WAITRESS_MAX_BODY = 64 << 20  # waitress refuses bodies past this itself; the app's JSON 413 starts at 1 MiB
CONNECTION_LIMIT = 1000  # open connections (idle ones included) before waitress stops accepting (its own: 100)
CHANNEL_TIMEOUT_S = 30  # an idle connection (no request in progress) is closed after this (waitress's own: 120)
log = logging.getLogger("jaxllm.serve")


def check_address(host: str, port: int) -> None:
    """`InputError` for a port outside 0-65535 (0: any free port)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError(f"--port must be between 0 and 65535 (0: any free port), got {port}")
    if not host:
        raise InputError("--host must not be empty")


def create_server(app: Any, host: str, port: int, **adjustments: Any) -> Any:
    """A bound waitress server (not yet running) whose own errors (before the app runs) are JSON too.

    An address that cannot be listened on (in use, not an address of this machine, not resolvable)
    is an `InputError` naming it."""
    import waitress

    check_address(host, port)
    sockets: dict[Any, Any] = {}
    try:
        server = waitress.create_server(app, map=sockets, host=host, port=port, **adjustments)
    except OSError as err:  # socket.gaierror included
        reason = err.strerror or str(err)
        raise InputError(f"cannot listen on --host {host} --port {port}: {reason}") from None
    except ValueError as err:  # waitress's own checks of its adjustments
        raise InputError(f"cannot listen on --host {host} --port {port}: {err}") from None
    for listener in _listeners(server, sockets):
        listener.channel_class = JsonErrorChannel
    server.jaxllm_listeners = _listeners(server, sockets)
    return server


def _listeners(server: Any, sockets: dict[Any, Any]) -> list[Any]:
    from waitress.server import BaseWSGIServer

    return [x for x in {id(x): x for x in [server, *sockets.values()]}.values() if isinstance(x, BaseWSGIServer)]


def set_app(server: Any, app: Any) -> None:
    """Serve `app` on a server made by `create_server` (bound before the model was loaded)."""
    for listener in server.jaxllm_listeners:
        listener.application = app


class JsonErrorTask(ErrorTask):
    """waitress's own error responses (bad framing, a body over its cap, a crash) in the API's JSON shape."""

    def execute(self) -> None:
        e = self.request.error
        message = f"{e.reason}: {e.body}" if e.body else e.reason
        body = json.dumps(ServeError(e.code, message).body()).encode()
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


def load_engine(
    checkpoint: str | Path,
    settings: EngineSettings,
    tokenizer_path: str | Path | None = None,
    mesh_overrides: Sequence[str] = (),
    dtype: str | None = None,
) -> Engine:
    """A started engine (warming up in its thread) over a checkpoint and its tokenizer, sharded over the
    mesh of `mesh_overrides` (`mesh.tensor=2`, as `jaxllm train`'s) when given; `dtype`: weights and
    computation in that dtype (`jaxllm.checkpoint.with_dtype`). On one CPU device the Dense kernels are
    held in the decode kernel's strips layout (`jaxllm.decode_layout`)."""
    from jaxllm import decode_layout
    from jaxllm.checkpoint import load_params_on_mesh
    from jaxllm.text import load_codec

    cfg, params = decode_layout.prepare(*load_params_on_mesh(checkpoint, mesh_overrides, dtype))
    tokenizer = load_codec(checkpoint, cfg.vocab_size, tokenizer_path)
    return Engine(cfg, params, tokenizer, settings).start()


def serve(
    checkpoint: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    settings: EngineSettings | None = None,
    tokenizer_path: str | Path | None = None,
    dtype: str | None = None,
    model_name: str | None = None,
    threads: int | None = None,
    drain_s: float = 30.0,
    connection_limit: int = CONNECTION_LIMIT,
    channel_timeout_s: int = CHANNEL_TIMEOUT_S,
    allowed_hosts: Sequence[str] = (),
    public_metrics: bool = False,
    cors_origins: Sequence[str] = (),
    mesh_overrides: Sequence[str] = (),
    out: TextIO | None = None,
) -> None:
    """Serve a checkpoint on http://host:port until SIGTERM/SIGINT (port 0: any free port, printed).

    The address is bound first, so that a bad one is an `InputError` before the model loads.
    `allowed_hosts`: Host header names accepted besides loopback ones and `host` ("*": any).
    `cors_origins`: origins whose web pages may call the API (see `jaxllm.serve.cors`).
    `mesh_overrides`: `mesh.*=` overrides sharding the model and the KV cache (docs/launch.md).
    `dtype` (e.g. "bfloat16"): weights and computation in that dtype (`jaxllm.checkpoint.with_dtype`)."""
    from jaxllm.serve.app import create_app
    from jaxllm.serve.cors import normalize_origin

    out = out or sys.stdout
    settings = settings or EngineSettings()
    # Every request waiting for the engine holds a thread: enough for all slots and the whole queue.
    threads = threads or settings.slots + settings.max_queue + 8
    for name, value in (("--threads", threads), ("--connection-limit", connection_limit),
                        ("--channel-timeout", channel_timeout_s)):  # fmt: skip
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    cors_origins = [normalize_origin(o) for o in cors_origins]  # a bad one fails before the model loads
    server = create_server(
        _not_loaded, host, port, threads=threads, max_request_body_size=WAITRESS_MAX_BODY, ident="jaxllm",
        connection_limit=connection_limit, channel_timeout=channel_timeout_s,
        cleanup_interval=max(1, min(30, channel_timeout_s // 2)),
    )  # fmt: skip
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    engine = load_engine(checkpoint, settings, tokenizer_path, mesh_overrides, dtype)
    api_key = os.environ.get(API_KEY_ENV) or None
    hosts = [*allowed_hosts, *([] if host in ("0.0.0.0", "::") else [host])]
    app = create_app(engine, model_name=model_name, api_key=api_key, allowed_hosts=hosts,
                     public_metrics=public_metrics, cors_origins=cors_origins)  # fmt: skip
    set_app(server, app)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("listening on %s without an API key (set %s to require one)", host, API_KEY_ENV)
    model = app.extensions["jaxllm"]["model"]
    print(f"serving {model} on http://{host}:{server.effective_port} (GET /ready: 200 once warmed up)",
          file=out, flush=True)  # fmt: skip
    previous = {s: signal.signal(s, _GracefulStop(engine, drain_s)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()  # returns on KeyboardInterrupt, raised by the handler once drained
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        engine.stop()
        print("server stopped", file=out, flush=True)


def _not_loaded(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The app until the model is loaded (the server does not run before then: never called in practice)."""
    body = json.dumps(ServeError(503, "the model is loading", code="not_ready").body()).encode()
    start_response("503 Service Unavailable", [("Content-Type", "application/json"), ("Retry-After", "1")])
    return [body]


class _GracefulStop:
    """Signal handler: the first signal drains the engine in a thread, then interrupts the main loop."""

    def __init__(self, engine: Engine, drain_s: float):
        self.engine, self.drain_s, self.draining = engine, drain_s, False

    def __call__(self, signum: int, frame: Any) -> None:
        if self.draining:  # drained (our own interrupt) or a second signal: stop now
            raise KeyboardInterrupt
        self.draining = True
        log.info("signal %s: finishing running requests (up to %g s), then stopping", signum, self.drain_s)
        threading.Thread(target=self._drain, name="jaxllm-drain", daemon=True).start()

    def _drain(self) -> None:
        self.engine.drain(self.drain_s)
        time.sleep(0.2)  # let the last responses be written
        os.kill(os.getpid(), signal.SIGINT)  # runs __call__ again, in the main thread
