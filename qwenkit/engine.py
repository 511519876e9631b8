"""The serving engine: a request queue and a scheduler thread doing continuous batching.

The scheduler owns the model. Between decode steps it admits queued requests into free cache
rows (prefilling only what a row does not already hold), drops cancelled ones, and runs jobs
such as embeddings; then all active rows decode together in one batched forward. The HTTP layer
only submits `Request`s and reads `Stream`s.

No request can stop the engine. A failure tied to one sequence (its prefill, its first draw, its
cancellation) ends that sequence with an error and the others go on; a failed batched step ends
the sequences in it, since it cannot be pinned on one of them. Should the scheduler die anyway
(a bug), its supervisor fails the sequences it was running, counts the failure and runs it again
on the same model, queued requests kept; after `MAX_FAILURES` failures within `FAILURE_WINDOW`
seconds it stops for good: `failure` says why, waiting requests fail, `submit` refuses, and
`on_failure` lets the server exit so that a process supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future

import torch

from .errors import QwenkitError
from .generate import Decoder, Delta, Request
from .model import Model
from .speculative import Drafter
from .tokenizer import Tokenizer

log = logging.getLogger("uvicorn.error")  # beside the server's own lines


class QueueFullError(QwenkitError):
    """Too many requests are waiting; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineFailedError(QwenkitError):
    """The engine stopped after failing repeatedly; the server must be restarted."""


class Stream:
    """The deltas of one request, readable from a thread (`for`) or from asyncio (`async for`).

    The last delta has a finish_reason: "stop" or "length", "cancelled" after `cancel()`, or
    "error" with the message in `error`.
    """

    def __init__(self, request: Request):
        self.request = request
        self.prompt_tokens = len(request.prompt_ids)
        self.cached_tokens = 0
        self.error: str | None = None
        self.submitted = time.perf_counter()
        self._cancelled = False
        self._items: deque[Delta] = deque()
        self._cond = threading.Condition()
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def cancel(self) -> None:
        """The reader went away: the engine drops the sequence before its next step."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _push(self, delta: Delta) -> None:
        with self._cond:
            self._items.append(delta)
            self._cond.notify()
            wake = self._wake
        if wake is not None:
            loop, event = wake
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the reader's event loop is closed: nobody is waiting
                pass

    def __iter__(self) -> Iterator[Delta]:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                delta = self._items.popleft()
            yield delta
            if delta.finish_reason:
                return

    async def __aiter__(self) -> AsyncIterator[Delta]:
        event = asyncio.Event()
        with self._cond:
            self._wake = (asyncio.get_running_loop(), event)
        while True:
            event.clear()
            with self._cond:
                items = list(self._items)
                self._items.clear()
            if not items:
                await event.wait()
                continue
            for delta in items:
                yield delta
                if delta.finish_reason:
                    return


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, name: str, help: str, buckets: list[float]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        lines += [f'{self.name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return lines + [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum:.6f}",
                        f"{self.name}_count {self.count}"]


class EngineMetrics:
    """What /metrics reports; updated by the scheduler thread only."""

    COUNTERS = {
        "requests_total": "Requests admitted to the batch.",
        "requests_cancelled_total": "Requests dropped because their client went away.",
        "requests_failed_total": "Requests ended by an error while queued or generating.",
        "engine_failures_total": "Times the scheduler thread died and was run again.",
        "prompt_tokens_total": "Prompt tokens of admitted requests.",
        "cached_prompt_tokens_total": "Prompt tokens served from an earlier request's KV cache.",
        "generation_tokens_total": "Tokens generated.",
        "decode_steps_total": "Batched decode steps run.",
    }

    def __init__(self):
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.queue_depth = 0
        self.running = 0
        self.kv_cache_bytes = 0
        self.batch_size = Histogram("qwenkit_decode_batch_size", "Sequences decoded together per step.",
                                    [1, 2, 4, 8, 16, 32, 64])
        self.ttft = Histogram("qwenkit_time_to_first_token_seconds", "From submission to the first token.",
                              [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        self.token_latency = Histogram("qwenkit_time_per_output_token_seconds", "Duration of one decode step.",
                                       [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1])

    def render(self) -> str:
        lines = []
        for name, help in self.COUNTERS.items():
            lines += [f"# HELP qwenkit_{name} {help}", f"# TYPE qwenkit_{name} counter",
                      f"qwenkit_{name} {self.counters[name]}"]
        for name, value, help in (("queue_depth", self.queue_depth, "Requests waiting for a cache row."),
                                  ("running", self.running, "Sequences in the decode batch."),
                                  ("kv_cache_bytes", self.kv_cache_bytes,
                                   "Memory the KV cache holds (every row, at the full context).")):
            lines += [f"# HELP qwenkit_{name} {help}", f"# TYPE qwenkit_{name} gauge", f"qwenkit_{name} {value}"]
        for hist in (self.batch_size, self.ttft, self.token_latency):
            lines += hist.render()
        return "\n".join(lines) + "\n"


class Engine:
    MAX_FAILURES = 3  # scheduler deaths within FAILURE_WINDOW seconds before the engine gives up
    FAILURE_WINDOW = 60.0

    def __init__(self, model: Model, tokenizer: Tokenizer, max_batch: int = 8, max_queue: int = 64,
                 context_length: int | None = None, on_failure: Callable[[str], None] | None = None,
                 prefill_chunk: int | None = None, draft: Drafter | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.context_length = min(context_length or model.config.context_length, model.config.context_length)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.decoder = Decoder(model, tokenizer, max_batch, self.context_length, prefill_chunk=prefill_chunk,
                               draft=draft)
        self.metrics = EngineMetrics()
        self.metrics.kv_cache_bytes = self.decoder.cache.nbytes
        self.failure: str | None = None  # why the engine stopped for good
        self.on_failure = on_failure
        self._failures: list[float] = []  # when the scheduler died, within the window
        self._queue: deque[Stream] = deque()
        self._jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self._streams: dict[int, Stream] = {}  # id(row) -> its stream
        self._prefilling: Stream | None = None  # the stream whose prompt the decoder is prefilling, a chunk a turn
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public, any thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="qwenkit-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def submit(self, request: Request) -> Stream:
        """Queue a request (made by make_request for this engine's context_length); raises when the
        queue is full or the engine has stopped."""
        stream = Stream(request)
        with self._wake:
            if self.failure:
                raise EngineFailedError(f"the engine has stopped ({self.failure}); restart the server")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"{len(self._queue)} requests are already waiting; retry shortly",
                                     retry_after=1.0)
            self._queue.append(stream)
            self.metrics.queue_depth = len(self._queue)
            self._wake.notify()
        return stream

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the engine thread between decode steps (it owns the model)."""
        future: Future = Future()
        with self._wake:
            if self.failure:
                raise EngineFailedError(f"the engine has stopped ({self.failure}); restart the server")
            self._jobs.append((fn, future))
            self._wake.notify()
        return future

    def embed(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Mean-pooled final hidden states, L2-normalized, one vector per input (Decoder.embed)."""
        return self.call(lambda: self.decoder.embed(token_ids)).result()

    # ------------------------------------------------------------------ the scheduler thread
    def _supervise(self) -> None:
        while True:
            try:
                with torch.inference_mode():
                    self._loop()
                return  # shut down
            except Exception as e:
                if not self._recover(e):
                    return

    def _recover(self, error: Exception) -> bool:
        """After the scheduler died: end what it was running, and say whether to run it again."""
        reason = f"{type(error).__name__}: {error}"
        log.error("the engine failed: %s", reason, exc_info=error)
        now = time.monotonic()
        self._failures = [t for t in self._failures if now - t < self.FAILURE_WINDOW] + [now]
        self.metrics.counters["engine_failures_total"] += 1
        self._reset(error)
        if len(self._failures) < self.MAX_FAILURES:
            return True
        with self._wake:
            self.failure = f"{len(self._failures)} failures within {self.FAILURE_WINDOW:g} s, the last {reason}"
            waiting = list(self._queue)
            self._queue.clear()
            jobs = list(self._jobs)
            self._jobs.clear()
        for stream in waiting:
            self._fail(stream, EngineFailedError(self.failure))
        for _, future in jobs:
            future.set_exception(EngineFailedError(self.failure))
        self.metrics.queue_depth = 0
        log.error("the engine has stopped: %s", self.failure)
        if self.on_failure:
            self.on_failure(self.failure)
        return False

    def _reset(self, error: Exception) -> None:
        """End every running sequence with `error` and start the decoder afresh."""
        for stream in self._streams.values():
            self._fail(stream, error)
        self._streams.clear()
        if self._prefilling is not None:
            self._fail(self._prefilling, error)
            self._prefilling = None
        self.decoder.clear()
        self.metrics.running = 0

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._queue or self._jobs or self.decoder.rows or self._prefilling or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, future in jobs:
                self._run_job(fn, future)
            self._drop_cancelled()
            self._admit()
            if self.decoder.rows:
                self._step()

    def _run_job(self, fn, future: Future) -> None:
        try:
            future.set_result(fn())
        except Exception as e:  # the caller gets it from future.result()
            future.set_exception(e)

    def _drop_cancelled(self) -> None:
        with self._wake:  # waiting ones first, so they stop holding queue places
            left = [s for s in self._queue if s.cancelled]
            if left:
                self._queue = deque(s for s in self._queue if not s.cancelled)
                self.metrics.queue_depth = len(self._queue)
        for stream in left:
            self._end_cancelled(stream)
        if self._prefilling is not None and self._prefilling.cancelled:
            self.decoder.drop_pending()
            self._end_cancelled(self._prefilling)
            self._prefilling = None
        for row in [r for r in self.decoder.rows if self._streams[id(r)].cancelled]:
            stream = self._streams.pop(id(row))
            try:
                self.decoder.cancel(row)
            except Exception as e:  # the rows may be half moved: decode none of them from there
                self._reset(e)
            self._end_cancelled(stream)
        self.metrics.running = len(self.decoder.rows)

    def _admit(self) -> None:
        """Start waiting requests while rows are free. A prompt longer than one prefill chunk takes one chunk
        per turn of the loop, with a decode step of the running sequences between chunks, so their tokens
        keep coming while it prefills."""
        if self._prefilling is not None:
            self._advance()
            return
        while self.decoder.free_slots:
            with self._wake:
                if not self._queue:
                    return
                stream = self._queue.popleft()
                self.metrics.queue_depth = len(self._queue)
            if stream.cancelled:
                self._end_cancelled(stream)
                continue
            try:
                self.decoder.begin(stream.request)
            except Exception as e:  # the decoder has let go of the row: end this request alone
                log.error("a prefill failed: %s: %s", type(e).__name__, e)
                self._fail(stream, e)
                continue
            self._prefilling = stream
            self._advance()
            if self._prefilling is not None:
                return
        self.metrics.running = len(self.decoder.rows)

    def _advance(self) -> None:
        """One chunk of the pending prefill; after its last, the stream runs."""
        stream = self._prefilling
        try:
            done = self.decoder.advance()
        except Exception as e:  # the decoder has let go of the row: end this request alone
            log.error("a prefill failed: %s: %s", type(e).__name__, e)
            self._prefilling = None
            self._fail(stream, e)
            return
        if done is not None:
            self._prefilling = None
            row, delta = done
            self._streams[id(row)] = stream
            stream.cached_tokens = row.cached_tokens
            c = self.metrics.counters
            c["requests_total"] += 1
            c["prompt_tokens_total"] += stream.prompt_tokens
            c["cached_prompt_tokens_total"] += row.cached_tokens
            self.metrics.ttft.observe(time.perf_counter() - stream.submitted)
            self._deliver(row, delta)
        self.metrics.running = len(self.decoder.rows)

    def _step(self) -> None:
        batch = len(self.decoder.rows)
        start = time.perf_counter()
        try:
            events = self.decoder.step()
        except Exception as e:  # it cannot be pinned on one sequence: end the batch, keep serving
            log.error("a decode step of %d sequences failed: %s: %s", batch, type(e).__name__, e)
            self._reset(e)
            return
        self.metrics.token_latency.observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(batch)
        self.metrics.counters["decode_steps_total"] += 1
        for row, delta in events:
            self._deliver(row, delta)
        self.metrics.running = len(self.decoder.rows)

    def _deliver(self, row, delta: Delta) -> None:
        if delta.token_id is not None:
            self.metrics.counters["generation_tokens_total"] += 1
        stream = self._streams[id(row)]
        if delta.finish_reason:
            self._streams.pop(id(row))
        stream._push(delta)

    def _end_cancelled(self, stream: Stream) -> None:
        """A reader still iterating a cancelled stream gets a last delta instead of waiting forever."""
        self.metrics.counters["requests_cancelled_total"] += 1
        stream._push(Delta("", None, finish_reason="cancelled"))

    def _fail(self, stream: Stream, error: Exception) -> None:
        self.metrics.counters["requests_failed_total"] += 1
        stream.error = f"{type(error).__name__}: {error}"
        stream._push(Delta("", None, finish_reason="error"))
