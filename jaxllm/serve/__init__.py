"""Serving: an OpenAI-compatible HTTP API over a continuous-batching engine (see docs/serve.md).

- `engine`: the worker thread that owns the model and batches requests over KV-cache slots.
- `protocol`: request bodies -> checked engine requests; results -> OpenAI JSON and SSE chunks.
- `app`: `create_app(engine)`, the Flask app; `metrics`: its Prometheus collectors; `errors`: the JSON errors.
- `server`: `jaxllm serve`, the app under waitress with a graceful stop.
"""

from jaxllm.serve.app import create_app
from jaxllm.serve.engine import Engine, EngineSettings
from jaxllm.serve.server import serve

__all__ = ["Engine", "EngineSettings", "create_app", "serve"]
