"""The serving engine: continuous batching, cancellation, queue limits, prefix reuse, metrics."""

import asyncio
import math
import time

import pytest

import qwenkit
from qwenkit.engine import Engine, QueueFullError
from qwenkit.generate import ContextLengthError, make_request

from .test_generate import tiny, tok  # noqa: F401  (fixtures)


@pytest.fixture
def engine(tiny, tok):  # noqa: F811
    eng = Engine(tiny, tok, max_batch=4, max_queue=6, context_length=200)
    eng.start()
    yield eng
    eng.shutdown()


def request(model, tok, text, n=12, **kw):  # noqa: F811
    return make_request(model, tok, text, max_new_tokens=n, temperature=0, stop_token_ids=[], **kw)


def collect(stream):
    deltas = list(stream)
    return [d.token_id for d in deltas if d.token_id is not None], deltas[-1].finish_reason


def test_batched_streams_equal_single_generation(engine, tiny, tok):  # noqa: F811
    prompts = ["first prompt", "a second, longer prompt with more words", "三", "four", "five five", "six"]
    streams = [engine.submit(request(tiny, tok, p)) for p in prompts]
    results = [collect(s) for s in streams]
    for p, (ids, reason) in zip(prompts, results):
        assert reason == "length"
        assert ids == qwenkit.generate(tiny, tok, p, max_new_tokens=12, temperature=0, stop_token_ids=[]).token_ids
    text = engine.metrics.render()
    assert "qwenkit_requests_total 6" in text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    single = int(values['qwenkit_decode_batch_size_bucket{le="1"}'])
    assert single < int(values["qwenkit_decode_steps_total"])  # some steps decoded more than one sequence


def test_cancel_frees_the_row(engine, tiny, tok, monkeypatch):  # noqa: F811
    forward = tiny.forward

    def slow_forward(*args, **kwargs):  # so the request is surely still running when cancelled
        time.sleep(0.005)
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny, "forward", slow_forward)
    stream = engine.submit(request(tiny, tok, "long one", n=150))
    it = iter(stream)
    next(it)
    stream.cancel()
    deadline = time.time() + 10
    while not engine.metrics.counters["requests_cancelled_total"] and time.time() < deadline:
        time.sleep(0.01)
    assert engine.metrics.counters["requests_cancelled_total"] == 1 and engine.metrics.running == 0
    assert collect(engine.submit(request(tiny, tok, "next")))[1] in ("stop", "length")


def test_queue_full_and_context_errors(tiny, tok):  # noqa: F811
    eng = Engine(tiny, tok, max_batch=1, max_queue=2, context_length=64)  # not started: nothing drains
    eng.submit(request(tiny, tok, "a"))
    eng.submit(request(tiny, tok, "b"))
    with pytest.raises(QueueFullError):
        eng.submit(request(tiny, tok, "c"))
    with pytest.raises(ContextLengthError, match="max_tokens is 100, more than the context of 64"):
        eng.submit(request(tiny, tok, "d", n=100))


def test_async_iteration_and_prefix_reuse(engine, tiny, tok):  # noqa: F811
    first = request(tiny, tok, "the start of a conversation", n=5)

    async def run(req):
        return [d async for d in engine.submit(req)]

    out = asyncio.run(run(first))
    ids = [d.token_id for d in out if d.token_id is not None]
    follow = request(tiny, tok, first.prompt_ids + ids + tok.encode(" next turn"), n=5)
    stream = engine.submit(follow)
    assert collect(stream)[1] == "length"
    assert stream.cached_tokens == len(first.prompt_ids) + len(ids) - 1


def test_embeddings_are_normalized(engine, tok):  # noqa: F811
    vectors = engine.embed([tok.encode("hello"), tok.encode("a longer text to embed")])
    assert len(vectors) == 2 and len(vectors[0]) == 32
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)
