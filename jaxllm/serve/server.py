"""`jaxllm serve`: the app under waitress, a threaded production WSGI server, with one engine per process.

Threaded, not pre-forking: JAX does not survive a fork after it has started, and one worker thread
owns the model (see `engine`). SIGTERM or SIGINT stops gracefully: new completions get 503, running
ones finish (up to `drain_s`), then the server exits; a second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from jaxllm.serve.engine import Engine, EngineSettings

API_KEY_ENV = "JAXLLM_API_KEY"
WAITRESS_MAX_BODY = 64 << 20  # waitress refuses bodies past this itself; the app's JSON 413 starts at 1 MiB
log = logging.getLogger("jaxllm.serve")


def load_engine(checkpoint: str | Path, settings: EngineSettings, tokenizer_path: str | Path | None = None) -> Engine:
    """A started engine (warming up in its thread) over a checkpoint and its tokenizer."""
    from jaxllm.checkpoint import load_params
    from jaxllm.text import load_codec

    cfg, params = load_params(checkpoint)
    tokenizer = load_codec(checkpoint, cfg.vocab_size, tokenizer_path)
    return Engine(cfg, params, tokenizer, settings).start()


def serve(
    checkpoint: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    settings: EngineSettings | None = None,
    tokenizer_path: str | Path | None = None,
    model_name: str | None = None,
    threads: int | None = None,
    drain_s: float = 30.0,
    out: TextIO | None = None,
) -> None:
    """Serve a checkpoint on http://host:port until SIGTERM/SIGINT (port 0: any free port, printed)."""
    import waitress

    from jaxllm.serve.app import create_app

    out = out or sys.stdout
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = settings or EngineSettings()
    engine = load_engine(checkpoint, settings, tokenizer_path)
    api_key = os.environ.get(API_KEY_ENV) or None
    app = create_app(engine, model_name=model_name, api_key=api_key)
    # Every request waiting for the engine holds a thread: enough for all slots and the whole queue.
    threads = threads or settings.slots + settings.max_queue + 8
    server: Any = waitress.create_server(
        app, host=host, port=port, threads=threads, max_request_body_size=WAITRESS_MAX_BODY, ident="jaxllm"
    )
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
