"""The Flask app: `create_app(engine)` routes HTTP to a running `Engine` (see docs/serve.md).

Request threads parse and check a body (`protocol`), submit it to the engine, and wait on the
job's own event queue: for a JSON response until every row has finished, for a stream (SSE)
chunk by chunk. A stream whose client goes away cancels its job, which frees its slots.
"""

from __future__ import annotations

import hmac
import html
import logging
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from importlib import resources
from typing import Any, NamedTuple, cast

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from jaxllm.completion import Completion
from jaxllm.serve import chat, cors, logprobs, protocol
from jaxllm.serve.engine import Delta, Engine, Failed, Finished, Job
from jaxllm.serve.errors import ServeError, timed_out
from jaxllm.serve.metrics import Metrics, make_metrics
from jaxllm.text import TextCodec

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
PING_EVERY_S = 1.0  # a stream waiting this long for tokens sends an SSE comment (and so notices a gone client)
WAIT_GRACE_S = 5.0  # a request thread gives up this long after the engine should have timed its job out
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")  # Host header names always accepted
JSON_ROUTES = {"/v1/completions", "/v1/chat/completions"}  # routes that read a JSON body: Content-Type must say so


def host_name(header: str) -> str:
    """The name of a Host header, lower case, without its port or brackets ("[::1]:80" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    name, _, port = header.rpartition(":") if header.count(":") == 1 else (header, "", "")
    return (name if port.isdigit() or not port else header).rstrip(".")


def create_app(
    engine: Engine,
    *,
    model_name: str | None = None,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    allowed_hosts: Iterable[str] = (),
    public_metrics: bool = False,
    cors_origins: Iterable[str] = (),
) -> Flask:
    """The serving app over a started `engine`.

    `api_key`: require `Authorization: Bearer KEY` on /v1/ and on /metrics (unless `public_metrics`).
    Requests whose `Host` header names neither a loopback name nor one of `allowed_hosts` get 421
    (against DNS rebinding: a web page whose name resolves to 127.0.0.1); "*" allows any Host.
    `cors_origins`: origins (https://chat.example.com) whose pages may call /v1/ from a browser (`cors`).
    The page at / is a chat page when the tokenizer has a chat template, else a completion page.
    """
    app = Flask(__name__)
    hosts = {host_name(h) for h in (*LOOPBACK_HOSTS, *allowed_hosts)}
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    model = model_name or engine.cfg.name
    created = protocol.now()
    metrics = make_metrics(engine)
    app.extensions["jaxllm"] = {"engine": engine, "metrics": metrics, "model": model}
    page = resources.files("jaxllm.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.before_request
    def check_host() -> None:
        if "*" in hosts:
            return
        name = host_name(request.headers.get("Host", ""))
        if name not in hosts:
            raise ServeError(
                421, f"this server does not answer to the Host {name[:100]!r}; start it with --allow-host NAME "
                "to accept that name", code="misdirected_request",
            )  # fmt: skip

    cors.install(app, cors_origins)  # after the Host check, before the API key's (preflights carry no key)

    @app.before_request
    def check_content_type() -> None:
        if request.method == "POST" and request.path in JSON_ROUTES and request.mimetype != "application/json":
            raise ServeError(
                415, f"Content-Type must be application/json, got {request.mimetype or 'none'!r}",
                code="unsupported_media_type",
            )  # fmt: skip

    @app.before_request
    def authenticate() -> None:
        protected = request.path.startswith("/v1/") or (request.path == "/metrics" and not public_metrics)
        if api_key and protected:
            header = request.headers.get("Authorization", "")
            token = header[7:].strip() if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), api_key.encode()):
                raise ServeError(
                    401, "Incorrect or missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip

    @app.after_request
    def count(response: Response) -> Response:
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in METHODS else "other"
        metrics.http_requests.labels(endpoint, method, str(response.status_code)).inc()
        return response

    @app.errorhandler(ServeError)
    def serve_error(err: ServeError) -> Response:
        return error_response(err)

    @app.errorhandler(HTTPException)
    def http_error(err: HTTPException) -> Response:
        code = err.code or 500
        if code == 404:
            return error_response(ServeError(404, f"Invalid URL ({request.method} {request.path})"))
        if code == 405:
            allowed = sorted(getattr(err, "valid_methods", None) or [])
            e = ServeError(405, f"Method {request.method} is not allowed for {request.path}; use {', '.join(allowed)}")
            e.headers["Allow"] = ", ".join(allowed)
            return error_response(e)
        if code == 413:
            return error_response(
                ServeError(413, f"The request body is larger than {max_body_bytes} bytes", code="request_too_large")
            )
        return error_response(ServeError(code, err.description or err.name))

    @app.errorhandler(Exception)
    def internal_error(err: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(ServeError(500, "internal server error"))

    @app.get("/")
    def index() -> Response:
        mode = "chat" if TextCodec.wrap(engine.tokenizer).chat_template else "completion"
        return Response(page.replace("{{MODEL}}", html.escape(model)).replace("{{MODE}}", mode), mimetype="text/html")

    @app.get("/health")
    def health() -> Response:
        return jsonify(status="ok")

    @app.get("/ready")
    def ready() -> Response:
        if not engine.ready:
            message = "the server is shutting down" if engine.stopping else "the model is loading or warming up"
            return error_response(ServeError(503, message, code="not_ready"))
        return jsonify(status="ready", model=model)

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": model, "object": "model", "created": created, "owned_by": "jaxllm",
                "context_length": engine.cfg.context_length}  # fmt: skip

    @app.get("/v1/models")
    def models() -> Response:
        return jsonify(object="list", data=[model_card()])

    @app.get("/v1/models/<path:model_id>")
    def model_info(model_id: str) -> Response:
        if model_id != model:
            raise ServeError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return jsonify(model_card())

    @app.post("/v1/completions")
    def completions() -> Response:
        return respond(protocol.parse_completion, TEXT)

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        return respond(lambda body: chat.parse_chat(body, engine.cfg.context_length, engine.tokenizer), CHAT)

    def respond(parse: Callable[[Any], protocol.CompletionParams], shape: Shape) -> Response:
        start = time.monotonic()
        try:
            params = parse(protocol.parse_json(request.get_data(cache=False)))
            protocol.check_model(params, model)
            req, prompt_tokens = protocol.to_request(params, engine.cfg, engine.tokenizer)
            scoring = protocol.scoring_of(params)
            job = engine.submit(req, scoring)
        except ServeError as err:
            metrics.completions.labels("rejected").inc()
            raise err from None
        metrics.prompt_tokens.inc(prompt_tokens)
        if scoring is not None:
            metrics.scoring_requests.inc()
        if shape is CHAT:
            metrics.chat_requests.inc()
        if params.stream:
            stream = _SSE(job, params, model, prompt_tokens, start, metrics, shape)
            return Response(stream, mimetype="text/event-stream", headers=SSE_HEADERS)
        results: list[Completion | None] = [None] * len(req.prompts)
        scores: list[logprobs.Scores | None] = [None] * len(req.prompts)
        for event in _events(job, wait=None):
            if isinstance(event, Failed):
                _finish(metrics, job, start, "timeout" if event.error.status == 504 else "failed")
                raise event.error
            if isinstance(event, Finished):
                results[event.row], scores[event.row] = event.completion, event.scores
        finished = cast(list[Completion], results)  # every row has finished
        texts = [c.text or "" for c in finished]
        if params.echo:
            codec = TextCodec.wrap(engine.tokenizer)
            texts = [codec.decode(prompt) + text for prompt, text in zip(req.prompts, texts, strict=True)]
        choice_logprobs: list[Any] = [None] * len(finished)
        if scoring is not None:
            for i, s in enumerate(scores):
                assert s is not None
                choice_logprobs[i] = shape.logprobs(s, engine.tokenizer, scoring.top)
                metrics.scored_tokens.labels("prompt").inc(len(req.prompts[i]) if scoring.echo else 0)
                metrics.scored_tokens.labels("completion").inc(len(finished[i].tokens))
        body = shape.response(shape.new_id(), model, protocol.now(), finished, prompt_tokens, texts=texts,
                              logprobs=choice_logprobs)  # fmt: skip
        metrics.generated_tokens.inc(body["usage"]["completion_tokens"])
        _finish(metrics, job, start, "ok")
        return jsonify(body)

    return app


class Shape(NamedTuple):
    """How one endpoint's responses look: ids, the whole body, a streamed chunk, the stream's first chunk."""

    new_id: Callable[[], str]
    response: Callable[..., dict[str, Any]]
    chunk: Callable[..., dict[str, Any]]
    logprobs: Callable[[logprobs.Scores, Any, int], dict[str, Any]]
    first_chunk: Callable[[str, str, int, int], dict[str, Any]] | None = None


TEXT = Shape(protocol.completion_id, protocol.completion_response, protocol.chunk, logprobs.legacy)
CHAT = Shape(chat.chat_id, chat.chat_response, chat.chat_chunk, logprobs.chat_content, chat.role_chunk)


def error_response(err: ServeError) -> Response:
    response = jsonify(err.body())
    response.status_code = err.status
    response.headers.update(err.headers)
    return response


def _events(job: Job, wait: float | None) -> Iterator[Delta | Finished | Failed | None]:
    """The job's events until all its rows finished or it failed; None after each `wait` s of silence."""
    left = len(job.req.prompts)
    while left:
        remaining = job.deadline + WAIT_GRACE_S - time.monotonic()
        if remaining <= 0:  # the engine should have failed it by now: give up from this side
            job.cancel()
            yield Failed(timed_out(job.timeout_s))
            return
        try:
            event = job.events.get(timeout=min(remaining, wait) if wait else remaining)
        except queue.Empty:
            if wait:
                yield None
            continue
        yield event
        if isinstance(event, Failed):
            return
        left -= isinstance(event, Finished)


class _SSE:
    """A stream's WSGI iterable. Closing it (the stream ended, or the client left) cancels the job, which
    frees its slots (nothing for a finished job), and records the outcome once."""

    def __init__(self, job: Job, params: protocol.CompletionParams, model: str, prompt_tokens: int, start: float,
                 metrics: Metrics, shape: Shape = TEXT):  # fmt: skip
        self.job, self.params, self.model, self.prompt_tokens, self.shape = job, params, model, prompt_tokens, shape
        self.start, self.metrics = start, metrics
        self.outcome: str | None = "cancelled"
        self.chunks = self._chunks()

    def __iter__(self) -> Iterator[bytes]:
        return self.chunks

    def close(self) -> None:
        self.chunks.close()
        self.job.cancel()
        if self.outcome is not None:
            _finish(self.metrics, self.job, self.start, self.outcome)
            self.outcome = None

    def _chunks(self) -> Iterator[bytes]:
        """Text as it comes, a chunk with each choice's finish_reason, usage when asked for, then [DONE]."""
        cid, created, generated = self.shape.new_id(), protocol.now(), 0

        def chunk(choices: list[tuple[int, str, str | None]], usage: dict[str, int] | None = None) -> bytes:
            body = self.shape.chunk(cid, self.model, created, choices, usage, self.params.include_usage)
            return protocol.sse(body)

        if self.shape.first_chunk is not None:
            first = self.shape.first_chunk(cid, self.model, created, len(self.job.req.prompts))
            yield protocol.sse({**first, **({"usage": None} if self.params.include_usage else {})})
        for event in _events(self.job, wait=PING_EVERY_S):
            if event is None:
                yield protocol.SSE_PING
            elif isinstance(event, Delta):
                yield chunk([(event.row, event.text, None)])
            elif isinstance(event, Finished):
                generated += len(event.completion.tokens)
                self.metrics.generated_tokens.inc(len(event.completion.tokens))
                yield chunk([(event.row, event.text, event.completion.finish_reason)])
            else:
                self.outcome = "timeout" if event.error.status == 504 else "failed"
                yield protocol.error_event(event.error)
                yield protocol.SSE_DONE
                return
        if self.params.include_usage:
            yield chunk([], protocol.usage(self.prompt_tokens, generated))
        self.outcome = "ok"
        yield protocol.SSE_DONE


def _finish(metrics: Metrics, job: Job, start: float, outcome: str) -> None:
    metrics.completions.labels(outcome).inc()
    if job.first_token_at is not None:
        metrics.ttft.observe(job.first_token_at - start)
    if outcome == "ok":
        metrics.latency.observe(time.monotonic() - start)
