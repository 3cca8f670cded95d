"""The serving engine: one worker thread owns the model and batches requests continuously.

Built on the slot engine (`jaxllm.slots`: `prefill`, `decode`) and the host helpers of
`jaxllm.completion` (`Collector`, `TextStream`); nothing here samples or validates by itself.

- Request threads call `submit(req)` with a request checked by `jaxllm.request.check_request`;
  each prompt of it is a *row*. The job waits in a bounded queue (full: `ServeError` 429).
- The worker thread keeps one `DecodeState` of up to `slots` KV-cache slots. Its shape follows the
  busy slots: before each prefill and decode its cache length becomes the smallest bucket
  (`min_cache` doubled, up to the context) that holds every busy row's next `steps_per_call` tokens
  (at most its prompt + max_tokens), and its slot count the smallest power of two (at most `slots`)
  that holds the highest busy slot; both grow as rows come and advance and shrink as they leave
  (`jaxllm.slots.resize`), so short requests pay for short caches and one client's decode step
  computes one row, not `slots`. Rows take the lowest free slots. The prefill compiles once per
  (prefill batch, cache length), the decode once per (slot count, cache length); the warm-up
  compiles the shortest cache length's prefills and its decode at the fewest and the most slots,
  the other shapes compile on first use (logged).
- With parameters sharded over a mesh (`jaxllm.sharding.param_shardings`), the state is placed by
  the same rules: slots over the batch axes, kv heads over tensor.
- Each loop the worker (1) frees the
  slots of cancelled (client gone) and expired jobs, (2) takes rows from the queue into free slots
  and prefills them (batches of up to `max_prefill_batch`), posting their first tokens at once,
  (3) runs up to `steps_per_call` decode steps for every busy slot at once, (4) reads the tokens
  back, turns them into final text with a `Collector` per row (stop ids, stop strings), and posts
  `Delta` / `Finished` events to each job's own queue. A finished row leaves its slot at once; the
  next row joins on the next loop.
- A request that asks for log-probabilities (`Scoring`: OpenAI's `logprobs`, `echo`) is scored after
  generation: each loop, the rows that finished in it and want scores are run together through one
  jitted full forward over prompt + completion (`jaxllm.scoring.score_tokens`; rows padded to a
  power-of-two batch of up to `max_score_batch` and a length bucket, so few shapes compile), and only
  then is their `Finished` posted, carrying the `Scores`. A row that wants at most one token (lm-eval's
  `loglikelihood`: `echo`, `max_tokens` 0 or 1) is scored by its prefill instead, which then also runs the
  output head over every prompt position (`jaxllm.slots.PromptScores`): one pass over the prompt, not
  two; its token is sampled from the same logits as without scores.
- Row i of a request draws with the key fold_in(key(seed), i), whichever slot it lands in and
  whatever shares the batch: a request gives what `jaxllm.generate` gives for the same arguments.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxllm.completion import Collector, Completion, TextStream
from jaxllm.config import ModelConfig
from jaxllm.errors import InputError
from jaxllm.model import Params
from jaxllm.request import Request
from jaxllm.scoring import score_tokens
from jaxllm.serve.errors import ServeError, queue_full, timed_out, unavailable
from jaxllm.serve.logprobs import MAX_TOP, Scores, Scoring
from jaxllm.sharding import mesh_of
from jaxllm.slots import (
    PromptScores,
    batch_bucket,
    bucket,
    decode_jit,
    inference_config,
    init_state_jit,
    insert_jit,
    mark_done,
    pack_prompts,
    prefill_rows_jit,
    request_keys,
    resize_jit,
    row_key_data,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineSettings:
    """How the engine batches: slots (concurrent rows), queue bound, steps per device call, time limit."""

    slots: int = 16
    max_queue: int = 64
    steps_per_call: int = 4  # decode steps per jitted call: fewer host round trips, coarser joins
    max_prefill_batch: int = 4  # rows prefilled in one call (a power of two: each size compiles once)
    max_stop_ids: int = 4
    max_score_batch: int = 4  # rows scored in one call (a power of two) for requests with logprobs / echo
    timeout_s: float = 120.0
    warmup: bool = True  # compile the prefills and the decode of the shortest cache before reporting ready
    # Positions per slot (prompt + completion), at most the model's context; None: the whole context.
    # The KV cache and the prefill buckets scale with it (an 8k-context model: 6 GB of float32 cache
    # for 16 slots). RoPE models only: learned positions fix the context in the parameters.
    max_context: int | None = None
    min_cache: int = 256  # the shortest cache length (positions per slot); longer ones double up to the context

    def __post_init__(self) -> None:
        for name in ("slots", "max_queue", "steps_per_call", "max_stop_ids", "min_cache"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise InputError(f"the request timeout must be > 0 s, got {self.timeout_s}")
        if self.max_prefill_batch < 1 or self.max_prefill_batch & (self.max_prefill_batch - 1):
            raise InputError(f"max_prefill_batch must be a power of two, got {self.max_prefill_batch}")
        if self.max_score_batch < 1 or self.max_score_batch & (self.max_score_batch - 1):
            raise InputError(f"max_score_batch must be a power of two, got {self.max_score_batch}")
        if self.max_context is not None and self.max_context < 1:
            raise InputError(f"max_context must be >= 1, got {self.max_context}")


def serving_config(cfg: ModelConfig, settings: EngineSettings) -> ModelConfig:
    """The inference config with the context cut to `settings.max_context` (RoPE models only)."""
    cfg = inference_config(cfg)
    limit = settings.max_context
    if limit is None or limit >= cfg.context_length:
        return cfg
    if cfg.family != "llama":
        raise InputError(f"max_context {limit} needs a RoPE model: {cfg.name}'s learned positions fix its "
                         f"context at {cfg.context_length}")  # fmt: skip
    return cfg.replace(context_length=limit)


class Delta(NamedTuple):
    """More final text of row `row`."""

    row: int
    text: str


class Finished(NamedTuple):
    """Row `row` is done: the rest of its text, its `Completion` (all tokens, text, finish reason) and,
    when the request asked for them, its `Scores`."""

    row: int
    text: str
    completion: Completion
    scores: Scores | None = None


class Failed(NamedTuple):
    """The whole job failed (time limit, shutdown, engine error); no more events follow."""

    error: ServeError


Event = Delta | Finished | Failed


class Job:
    """One submitted request: its checked rows and the queue of events the engine posts for it."""

    def __init__(self, req: Request, timeout_s: float, scoring: Scoring | None = None):
        self.req = req
        self.scoring = scoring
        self.timeout_s = timeout_s
        self.created = time.monotonic()
        self.deadline = self.created + timeout_s
        self.events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.first_token_at: float | None = None  # set by the engine when a first token is sampled
        self._cancelled = threading.Event()
        self.closed = False  # engine side: failed or cancelled; its rows are dropped
        self.key_data: np.ndarray | None = None  # per-row PRNG key data, made by the engine thread

    def cancel(self) -> None:
        """Give up on the job (the client left): the engine frees its slots on its next loop."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(eq=False)
class _Row:
    job: Job
    index: int
    collector: Collector
    text: TextStream  # final tokens so far (the Collector's callback pushes them) and the text posted
    # A one-token scoring row's log-probabilities from its prefill (host `PromptScores` arrays, its index).
    prefill_scores: tuple[PromptScores, int] | None = None

    @property
    def prompt(self) -> list[int]:
        return self.job.req.prompts[self.index]

    @property
    def scored_in_prefill(self) -> bool:
        """At most one token wanted, with scores: the prefill scores the prompt and that token in one pass."""
        return self.job.scoring is not None and self.job.req.max_new_tokens <= 1


class Engine:
    """Continuous batching over a fixed number of KV-cache slots, run by one worker thread (`start`)."""

    def __init__(self, cfg: ModelConfig, params: Params, tokenizer: Any, settings: EngineSettings | None = None):
        self.settings = settings or EngineSettings()
        self.cfg = serving_config(cfg, self.settings)
        self.params = params
        self.mesh = mesh_of(params)  # sharded params: the state is sharded by the same rules
        self.tokenizer = tokenizer
        self.on_decode: Callable[[int], None] | None = None  # called with the busy slots of each decode call
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=self.settings.max_queue)
        self._waiting: collections.deque[_Row] = collections.deque()  # rows of jobs taken from the queue
        self._slots: list[_Row | None] = [None] * self.settings.slots
        self._positions = np.zeros(self.settings.slots, np.int64)  # each busy slot's newest position, last read
        self._min_slots = self._slot_quantum()
        self._cache_lens: set[int] = set()  # cache lengths used so far (their shapes are compiled)
        self._slot_counts: set[int] = set()  # slot counts decoded so far
        self._to_score: list[tuple[_Row, str]] = []  # finished rows waiting for their scores (this loop)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._draining = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)

    # Request threads -----------------------------------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def submit(self, req: Request, scoring: Scoring | None = None) -> Job:
        """Queue a checked request (`scoring`: score its tokens after generation); raises `ServeError` 429
        (queue full) or 503 (not running)."""
        if self.stopping:
            raise unavailable("the server is shutting down", "shutting_down")
        if self._error is not None:
            raise unavailable(f"the generation engine failed to start: {self._error}", "engine_failed")
        if len(req.stop_ids) > self.settings.max_stop_ids:
            raise ServeError(400, f"at most {self.settings.max_stop_ids} stop token ids", param="stop")
        job = Job(req, self.settings.timeout_s, scoring)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise queue_full(retry_after_s=1) from None
        return job

    @property
    def ready(self) -> bool:
        """The model is loaded and compiled, and the worker is running."""
        return self._ready.is_set() and self._thread.is_alive() and not self.stopping and self._error is None

    @property
    def stopping(self) -> bool:
        """Draining or stopped: new requests get 503."""
        return self._draining or self._stop.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout) and self.ready

    def queue_depth(self) -> int:
        """Jobs waiting in the queue (not yet taken by the worker)."""
        return self._queue.qsize()

    def busy_slots(self) -> int:
        return sum(row is not None for row in self._slots)

    def idle(self) -> bool:
        return self._queue.empty() and not self._waiting and not self._to_score and self.busy_slots() == 0

    def drain(self, timeout: float) -> bool:
        """Refuse new requests (503) and wait up to `timeout` s for the running ones; True if all ended."""
        self._draining = True
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self.idle():
            time.sleep(0.05)
        return self.idle()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker; jobs still queued or running fail with 503."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # The worker thread --------------------------------------------------------------------------

    def _run(self) -> None:
        s = self.settings
        try:
            self._reset_state()
            if s.warmup:
                self._warm_up()
        except Exception as err:  # a model that cannot run: /ready stays 503, requests get 503
            log.exception("the generation engine failed to start")
            self._error = err
            self._fail_everything(unavailable(f"the generation engine failed to start: {err}", "engine_failed"))
            return
        self._ready.set()
        while not self._stop.is_set():
            try:
                self._loop_once()
            except Exception:
                # A decode call (or anything else outside a prefill) failed: only the rows in the slots
                # were in it. Fail their requests, start from an empty state, and go on with the queue.
                log.exception("generation engine error; failing the requests in flight and resetting")
                self._fail_running(ServeError(500, "internal error in the generation engine"))
                try:
                    self._reset_state()
                except Exception:  # the device itself is gone: nothing more can run
                    log.exception("the generation engine cannot recover")
                    self._error = RuntimeError("the generation engine failed")
                    self._fail_everything(unavailable("the generation engine failed", "engine_failed"))
                    return
        self._fail_everything(unavailable("the server is shutting down", "shutting_down"))

    def _reset_state(self) -> None:
        """Every slot empty, the fewest slots, the shortest cache length. A first prefill (of padding
        only) gives the state the placement it keeps from then on (committed to the device of the
        params), which compiled code is keyed on."""
        s = self.settings
        self._cache_len = self._cache_bucket(1)
        self._cache_lens.add(self._cache_len)
        self._state = init_state_jit(self.cfg, self._min_slots, self._cache_len, s.max_stop_ids, self.mesh)
        self._prefill_rows([], 1)

    def _cache_bucket(self, need: int) -> int:
        c = self.cfg.context_length
        return max(bucket(need, c), min(self.settings.min_cache, c))

    def _slot_quantum(self) -> int:
        """The fewest slots the state holds: the devices its slots are split over (the mesh's data x fsdp,
        when they divide `slots`), else 1."""
        n = 1 if self.mesh is None else self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        return n if self.settings.slots % n == 0 else 1

    def _slot_bucket(self, need: int) -> int:
        """The slot count for slots 0..need-1: a power of two times the quantum, at most `slots`."""
        return min(self._min_slots * batch_bucket(-(-need // self._min_slots)), self.settings.slots)

    @property
    def state_slots(self) -> int:
        """Slots in the state now (each decode step computes all of them)."""
        return self._state.seq_BS.shape[0]

    def _warm_up(self) -> None:
        """Compile what serving runs at the shortest cache length: each prefill batch, the decode and the
        stop mask at the fewest and at the most slots (one client; a full server). Other slot counts and
        longer caches compile on first use (logged): each decode shape is a whole compile of the model."""
        start, shapes, b = time.monotonic(), 0, 1
        counts = sorted({self._slot_bucket(1), self._slot_bucket(self.settings.slots)})
        self._slot_counts.update(counts)
        while b <= self.settings.max_prefill_batch:
            self._prefill_rows([], b)  # padding rows only: dropped, the state is unchanged
            b, shapes = b * 2, shapes + 1
        for n in counts:
            self._state = resize_jit(self._state, self._cache_len, self.mesh, n)
            self._prefill_rows([], 1)  # the insert at this slot count (a small program)
            self._state = decode_jit(self.cfg, self.params, self._state, np.int32(self.settings.steps_per_call),
                                     self.mesh)  # fmt: skip
            self._state = mark_done(self._state, np.zeros(n, bool))
        self._state = resize_jit(self._state, self._cache_len, self.mesh, counts[0])
        request_keys(0, 1)
        jax.block_until_ready(self._state)
        log.info("warm-up: %d shapes compiled in %.1f s (%d prefill batches up to %d and the decode at %s slots, at "
                 "cache length %d of %d; other slot counts and longer caches compile on first use)",
                 shapes + len(counts), time.monotonic() - start, shapes, self.settings.max_prefill_batch,
                 " and ".join(map(str, counts)), self._cache_len, self.cfg.context_length)  # fmt: skip

    def _fit_state(self) -> None:
        """Resize the state to the fewest slots holding every busy slot and the shortest cache bucket
        holding every busy slot's next decode call (at most its prompt + max_tokens): grown as rows come
        and advance, shrunk as they leave."""
        k, need, top = self.settings.steps_per_call, 1, 0
        for slot, row in enumerate(self._slots):
            if row is not None:
                end = len(row.prompt) + row.job.req.max_new_tokens
                need = max(need, len(row.prompt), min(int(self._positions[slot]) + k + 1, end))
                top = slot + 1
        length, slots = self._cache_bucket(need), self._slot_bucket(top)
        if length == self._cache_len and slots == self.state_slots:
            return
        if length not in self._cache_lens:
            self._cache_lens.add(length)
            log.info("cache length %d -> %d (first use: its prefill and decode compile now)", self._cache_len, length)
        elif slots not in self._slot_counts:
            log.info("slots %d -> %d (first use: the decode compiles now)", self.state_slots, slots)
        self._slot_counts.add(slots)
        self._state = resize_jit(self._state, length, self.mesh, slots)
        self._cache_len = length

    def _loop_once(self) -> None:
        self._free_abandoned()
        admitted = self._admit()
        self._fit_state()
        if admitted:
            self._prefill(admitted)
            self._free_abandoned()  # rows of a request whose other row failed to prefill
            self._deliver()  # the first tokens (sampled by the prefill) go out now, not after the next decode
        busy = self.busy_slots()
        if busy:
            self._state = decode_jit(self.cfg, self.params, self._state, np.int32(self.settings.steps_per_call),
                                     self.mesh)  # fmt: skip
            if self.on_decode is not None:
                self.on_decode(busy)
            self._deliver()
        if self._to_score:
            self._score()
        if busy == 0 and not self._waiting:
            self._take_job(block=True)

    def _take_job(self, block: bool) -> bool:
        """Move the next live job from the queue into `_waiting` (one row per prompt)."""
        while True:
            try:
                job = self._queue.get(timeout=0.05) if block else self._queue.get_nowait()
            except queue.Empty:
                return False
            if self._close_if_abandoned(job):
                continue
            n = len(job.req.prompts)
            job.key_data = row_key_data(job.req.seed, n)
            self._waiting.extend(
                _Row(job, i, Collector(job.req.row(i), self.tokenizer, None), TextStream(self.tokenizer.decode))
                for i in range(n)
            )
            return True

    def _admit(self) -> list[tuple[int, _Row]]:
        """Rows into free slots, from `_waiting` and then the queue."""
        admitted = []
        free = [i for i, row in enumerate(self._slots) if row is None]
        while free:
            if not self._waiting and not self._take_job(block=False):
                break
            row = self._waiting.popleft()
            if self._close_if_abandoned(row.job):
                continue
            slot = free.pop(0)
            self._slots[slot] = row
            self._positions[slot] = len(row.prompt)
            row.collector.callback = lambda _, token, row=row: row.text.push(token)
            admitted.append((slot, row))
        return admitted

    def _prefill(self, admitted: list[tuple[int, _Row]]) -> None:
        """Prefill admitted rows in chunks. A chunk that fails is run again row by row, so that only the
        row that fails on its own (the culprit) fails its request; the others go on."""
        admitted = sorted(admitted, key=lambda sr: len(sr[1].prompt))  # similar lengths share a bucket
        step = self.settings.max_prefill_batch
        for i in range(0, len(admitted), step):
            closed = [slot for slot, row in admitted[i : i + step] if row.job.closed]  # another row failed
            if closed:
                self._free_slots(closed)
            chunk = [(slot, row) for slot, row in admitted[i : i + step] if not row.job.closed]
            if not chunk:
                continue
            try:
                self._prefill_chunk(chunk)
            except Exception as err:
                if self._state_lost():  # failed after donating the state: the loop fails the slots, resets
                    raise
                if len(chunk) == 1:
                    self._fail_rows(chunk, err)
                    continue
                log.warning("a prefill of %d rows failed (%s); prefilling them one by one", len(chunk), err)
                for one in chunk:
                    if one[1].job.closed:  # another row of the same request failed already
                        self._free_slots([one[0]])
                        continue
                    try:
                        self._prefill_chunk([one])
                    except Exception as row_err:
                        self._fail_rows([one], row_err)

    def _state_lost(self) -> bool:
        return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(self._state))

    def _prefill_chunk(self, chunk: list[tuple[int, _Row]]) -> None:
        self._prefill_rows(chunk, batch_bucket(len(chunk)))

    def _fail_rows(self, rows: list[tuple[int, _Row]], err: Exception) -> None:
        """The rows' requests fail (400 for an `InputError`, else 500); their slots are freed."""
        if isinstance(err, InputError):
            error = ServeError(400, str(err))
        else:
            log.error("a request failed in the generation engine", exc_info=err)
            error = ServeError(500, "internal error in the generation engine")
        for _, row in rows:
            self._close_job(row.job, error)
        self._free_slots([slot for slot, _ in rows])

    def _free_slots(self, slots: list[int]) -> None:
        freed = np.zeros(self.state_slots, bool)
        for slot in slots:
            self._slots[slot] = None
            freed[slot] = True
        self._state = mark_done(self._state, freed)

    def _prefill_rows(self, chunk: list[tuple[int, _Row]], b: int) -> None:
        """One jitted prefill of `chunk` padded to b rows as wide as the cache, then its rows put into
        their slots (a slot index past the end drops a row)."""
        s = self.settings
        slots_B = np.full((b,), s.slots, np.int32)
        slots_B[: len(chunk)] = [slot for slot, _ in chunk]
        rows = [(row.prompt, row.job.req, row.job.key_data[row.index]) for _, row in chunk]
        prompts = pack_prompts(rows, b, self._cache_len, s.max_stop_ids)
        top = MAX_TOP if any(row.scored_in_prefill for _, row in chunk) else 0
        new_rows, _, scores = prefill_rows_jit(self.cfg, self.params, prompts, self._cache_len, self.mesh, top)
        self._state = insert_jit(self._state, new_rows, slots_B, self.mesh)
        if scores is not None:
            host = jax.device_get(scores)
            for j, (_, row) in enumerate(chunk):
                row.prefill_scores = (host, j) if row.scored_in_prefill else None

    def _deliver(self) -> None:
        """Read every busy slot's tokens back, post its new text, and free the slots that finished."""
        seq_BS, positions_B, done_B = jax.device_get((self._state.seq_BS, self._state.positions_B, self._state.done_B))
        now = time.monotonic()
        self._positions[: len(positions_B)] = positions_B
        stopped = np.zeros(len(positions_B), bool)
        for slot, row in enumerate(self._slots):
            if row is None or row.job.closed:
                continue
            done = bool(done_B[slot])
            try:
                raw = seq_BS[slot, len(row.prompt) : positions_B[slot] + 1].tolist()
                if raw and row.job.first_token_at is None:
                    row.job.first_token_at = now
                row.collector.update([raw], [done])
                new_text = row.text.take()
                if row.collector.final[0]:
                    completion = row.collector.results[0]
                    rest = row.text.finish(completion.text or "")
                    if row.prefill_scores is not None:  # scored by its prefill: no second pass
                        host, j = row.prefill_scores
                        scores = self._scores(row, host.target_BW[j], host.top_logp_BWK[j], host.top_ids_BWK[j])
                        row.job.events.put(Finished(row.index, new_text + rest, completion, scores))
                    elif row.job.scoring is not None:
                        self._to_score.append((row, new_text + rest))  # posted once scored, this loop
                    else:
                        row.job.events.put(Finished(row.index, new_text + rest, completion))
                    self._slots[slot] = None
                    stopped[slot] = not done  # a stop string ended it: stop its decoding too
                elif new_text:
                    row.job.events.put(Delta(row.index, new_text))
            except Exception as err:  # this row's text (its tokenizer, its stops) failed: only its request fails
                log.error("a request failed while its text was made", exc_info=err)
                self._close_job(row.job, ServeError(500, "internal error in the generation engine"))
                self._slots[slot] = None
                stopped[slot] = not done
        if stopped.any():
            self._state = mark_done(self._state, stopped)

    def _score(self) -> None:
        """Score the rows that finished this loop (batched by length), then post their `Finished`. A
        batch that fails fails only its requests (500)."""
        pending, self._to_score = self._to_score, []
        pending = sorted((p for p in pending if not p[0].job.closed), key=lambda p: len(self._sequence(p[0])))
        step = self.settings.max_score_batch
        for i in range(0, len(pending), step):
            chunk = [p for p in pending[i : i + step] if not p[0].job.closed]
            if not chunk:
                continue
            try:
                scores = self._score_chunk([row for row, _ in chunk])
            except Exception as err:
                log.error("scoring failed", exc_info=err)
                for row, _ in chunk:
                    self._close_job(row.job, ServeError(500, "internal error in the generation engine"))
                continue
            for (row, text), row_scores in zip(chunk, scores, strict=True):
                if not row.job.closed:
                    row.job.events.put(Finished(row.index, text, row.collector.results[0], row_scores))

    @staticmethod
    def _sequence(row: _Row) -> list[int]:
        completion = row.collector.results[0]
        assert completion is not None
        return [*row.prompt, *completion.tokens]

    def _score_chunk(self, rows: list[_Row]) -> list[Scores]:
        """One jitted forward over `rows` (prompt + completion each), padded to (batch bucket, length bucket)."""
        seqs = [self._sequence(row) for row in rows]
        t = bucket(max(map(len, seqs)), self.cfg.context_length)
        tokens_BT = np.zeros((batch_bucket(len(rows)), t), np.int32)
        for j, seq in enumerate(seqs):
            tokens_BT[j, : len(seq)] = seq
        target_BT, top_logp_BTK, top_ids_BTK = jax.device_get(score_tokens(self.cfg, self.params, tokens_BT))
        return [self._scores(row, target_BT[j], top_logp_BTK[j], top_ids_BTK[j]) for j, row in enumerate(rows)]

    def _scores(self, row: _Row, target_T: np.ndarray, top_logp_TK: np.ndarray, top_ids_TK: np.ndarray) -> Scores:
        """A finished row's `Scores` from arrays whose index p - 1 holds token p's log-probability and its
        position's best alternatives (`score_tokens`, or a scoring prefill's `PromptScores`)."""
        scoring = row.job.scoring
        assert scoring is not None
        seq = self._sequence(row)
        start = 0 if scoring.echo else len(row.prompt)
        logprobs: list[float | None] = []
        top: list[list[tuple[int, float]] | None] = []
        for p in range(start, len(seq)):  # token 0 has no scores: nothing precedes it
            ids, values = top_ids_TK[p - 1, : scoring.top], top_logp_TK[p - 1, : scoring.top]
            logprobs.append(None if p == 0 else float(target_T[p - 1]))
            top.append(None if p == 0 else [(int(i), float(v)) for i, v in zip(ids, values, strict=True)])
        return Scores(seq[start:], logprobs, top)

    def _close_if_abandoned(self, job: Job) -> bool:
        """Close a cancelled or expired job (posting `Failed` when expired); True if it is closed."""
        if not job.closed and (job.cancelled or time.monotonic() > job.deadline):
            job.closed = True
            if not job.cancelled:
                job.events.put(Failed(timed_out(job.timeout_s)))
        return job.closed

    def _free_abandoned(self) -> None:
        """Free the slots of closed, cancelled and expired jobs, then tell the expired ones."""
        now = time.monotonic()
        freed = np.zeros(self.state_slots, bool)
        jobs = {}
        for slot, row in enumerate(self._slots):
            if row is not None and (row.job.closed or row.job.cancelled or now > row.job.deadline):
                self._slots[slot] = None
                freed[slot] = True
                jobs[id(row.job)] = row.job
        if freed.any():
            self._state = mark_done(self._state, freed)
        for job in jobs.values():
            self._close_if_abandoned(job)

    def _close_job(self, job: Job, error: ServeError) -> None:
        if not job.closed:
            job.closed = True
            job.events.put(Failed(error))

    def _fail_running(self, error: ServeError) -> None:
        """Fail the requests with a row in a slot or waiting for scores (their waiting rows are dropped);
        queued requests stay."""
        for row in [*self._slots, *(row for row, _ in self._to_score)]:
            if row is not None:
                self._close_job(row.job, error)
        self._to_score = []
        self._slots = [None] * self.settings.slots
        self._waiting = collections.deque(row for row in self._waiting if not row.job.closed)

    def _fail_everything(self, error: ServeError) -> None:
        rows = [*self._slots, *self._waiting, *(row for row, _ in self._to_score)]
        jobs = {id(row.job): row.job for row in rows if row is not None}
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            jobs[id(job)] = job
        for job in jobs.values():
            if not job.closed:
                job.closed = True
                job.events.put(Failed(error))
        self._slots = [None] * self.settings.slots
        self._waiting.clear()
        self._to_score.clear()
