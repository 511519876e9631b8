"""The serving engine: continuous batching, cancellation, queue limits, prefix reuse, metrics."""

import asyncio
import math
import time

import pytest

import qwenkit
from qwenkit.engine import Engine, EngineFailedError, QueueFullError
from qwenkit.errors import ContextLengthError, RequestError
from qwenkit.generate import Decoder, make_request
from qwenkit.sampling import MAX_TOP_K, SamplingParams


@pytest.fixture
def engine(tiny, tok):
    eng = Engine(tiny, tok, max_batch=4, max_queue=6, context_length=200)
    eng.start()
    yield eng
    eng.shutdown()


def request(model, tok, text, n=12, **kw):
    return make_request(model, tok, text, max_new_tokens=n, temperature=0, stop_token_ids=[], **kw)


def collect(stream):
    deltas = list(stream)
    return [d.token_id for d in deltas if d.token_id is not None], deltas[-1].finish_reason


def test_batched_streams_equal_single_generation(engine, tiny, tok):
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


def test_running_streams_keep_decoding_while_a_long_prompt_prefills(tiny, tok, monkeypatch):
    """A prompt of many chunks is prefilled a chunk per turn: the running stream gets tokens between the
    chunks, the long one's tokens equal a plain generation's, and so do the runner's after rows moved."""
    events = []
    forward = tiny.forward

    def recorded(tokens, *args, **kwargs):  # a prefill chunk has several tokens, a decode step one per row
        events.append("chunk" if tokens.shape[1] > 1 else "step")
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(tiny, "forward", recorded)
    eng = Engine(tiny, tok, max_batch=3, context_length=400, prefill_chunk=8)
    eng.start()
    try:
        short = eng.submit(request(tiny, tok, "short", n=60))
        first = iter(short)
        started = next(first).token_id  # running
        long_text = " ".join(f"word{i}" for i in range(60))
        long = eng.submit(request(tiny, tok, long_text, n=6))
        long_ids, reason = collect(long)
        short_ids = [started] + [d.token_id for d in [*first] if d.token_id is not None]
    finally:
        eng.shutdown()
    chunks = [i for i, e in enumerate(events) if e == "chunk"][1:]  # the long prompt's (the first: "short")
    assert len(chunks) >= 8 and reason == "length"
    between = events[chunks[0]:chunks[-1]]
    assert between.count("step") >= len(chunks) - 1  # a decode step for the running stream between chunks
    plain = dict(max_new_tokens=6, temperature=0, stop_token_ids=[])
    monkeypatch.setattr(tiny, "forward", forward)
    assert long_ids == qwenkit.generate(tiny, tok, long_text, **plain).token_ids
    assert short_ids == qwenkit.generate(tiny, tok, "short", **{**plain, "max_new_tokens": 60}).token_ids


def test_cancel_frees_the_row(engine, tiny, tok, monkeypatch):
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


def test_queue_full(tiny, tok):
    eng = Engine(tiny, tok, max_batch=1, max_queue=2, context_length=64)  # not started: nothing drains
    eng.submit(request(tiny, tok, "a"))
    eng.submit(request(tiny, tok, "b"))
    with pytest.raises(QueueFullError):
        eng.submit(request(tiny, tok, "c"))


def test_context_rules_live_in_make_request(tiny, tok):
    prompt = tok.encode("d")
    with pytest.raises(ContextLengthError, match=f"100 new tokens were asked for but the context holds 64 tokens "
                                                 f"and the prompt uses {len(prompt)}") as e:
        request(tiny, tok, "d", n=100, context_length=64, max_new_tokens_must_fit=True)
    assert e.value.param == "max_new_tokens"
    with pytest.raises(ContextLengthError, match="the prompt has 70 tokens but the context holds 64") as e:
        request(tiny, tok, [1] * 70, context_length=64)
    assert e.value.param == "prompt"
    # Without must_fit the new tokens are cut to the room left; a too-long prompt can be truncated.
    assert request(tiny, tok, "d", n=100, context_length=64).max_new_tokens == 64 - len(prompt)
    assert len(request(tiny, tok, [1] * 70, n=4, context_length=64, truncate=True).prompt_ids) == 60
    with pytest.raises(RequestError, match="token id 999999 is not in the vocabulary") as e:
        request(tiny, tok, [1, 999999])
    assert e.value.param == "prompt"
    with pytest.raises(RequestError, match="top_p") as e:
        request(tiny, tok, "d", top_p=2.0)
    assert e.value.param == "top_p"


def test_async_iteration_and_prefix_reuse(engine, tiny, tok):
    first = request(tiny, tok, "the start of a conversation", n=5)

    async def run(req):
        return [d async for d in engine.submit(req)]

    out = asyncio.run(run(first))
    ids = [d.token_id for d in out if d.token_id is not None]
    follow = request(tiny, tok, first.prompt_ids + ids + tok.encode(" next turn"), n=5)
    stream = engine.submit(follow)
    assert collect(stream)[1] == "length"
    assert stream.cached_tokens == len(first.prompt_ids) + len(ids) - 1


def test_embeddings_are_normalized(engine, tok):
    vectors = engine.embed([tok.encode("hello"), tok.encode("a longer text to embed")])
    assert len(vectors) == 2 and len(vectors[0]) == 32
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)


# ---------------------------------------------------------------------- failures and cancellation

def reference(model, tok, text, n=12, **kw):
    """What `collect` gives for the same request run alone (the stop token that ends a reply counted)."""
    result = qwenkit.generate(model, tok, text, max_new_tokens=n, temperature=0, stop_token_ids=[], **kw)
    return result.token_ids + ([None] if result.finish_reason == "stop" else []), result.finish_reason


def strip(result):
    """(tokens, finish_reason) without the token that stopped the reply, which differs in the two."""
    tokens, reason = result
    return (tokens[:-1] if reason == "stop" else tokens), reason


class Tripwire:
    """Wraps a model's forward: slows every call, and raises (or runs `on_call`) on chosen calls."""

    def __init__(self, model, monkeypatch, delay=0.002):
        self.forward, self.delay, self.fail_when, self.on_call = model.forward, delay, None, None
        monkeypatch.setattr(model, "forward", self)

    def __call__(self, tokens, *args, **kwargs):
        time.sleep(self.delay)
        if self.on_call:
            self.on_call(tokens)
        if self.fail_when and self.fail_when(tokens):
            raise RuntimeError("the forward failed")
        return self.forward(tokens, *args, **kwargs)


def test_a_failing_prefill_ends_only_its_request(engine, tiny, tok, monkeypatch):
    wire = Tripwire(tiny, monkeypatch)
    poison = tok.encode(" poison prompt here")
    wire.fail_when = lambda tokens: tokens.shape[1] > 1 and tokens[0, -len(poison):].tolist() == poison
    good = ["first prompt", "second prompt", "third"]
    streams = [engine.submit(request(tiny, tok, p, n=20)) for p in good[:2]]
    bad = engine.submit(request(tiny, tok, "a poison prompt here"))
    streams.append(engine.submit(request(tiny, tok, good[2], n=20)))
    assert collect(bad)[1] == "error" and "the forward failed" in bad.error
    wire.fail_when = None
    for p, stream in zip(good, streams):
        assert strip(collect(stream)) == strip(reference(tiny, tok, p, n=20))
    assert engine.metrics.counters["requests_failed_total"] == 1 and engine.metrics.running == 0
    # Its half-written cache row is not offered for prefix reuse.
    poisoned = request(tiny, tok, "a poison prompt here").prompt_ids
    assert all(held[:len(poisoned) - 1] != poisoned[:-1] for held in engine.decoder.slot_tokens)


def test_a_failing_step_ends_its_batch_and_the_engine_goes_on(engine, tiny, tok, monkeypatch):
    wire = Tripwire(tiny, monkeypatch)
    streams = [engine.submit(request(tiny, tok, p, n=40)) for p in ("one", "two")]
    for s in streams:
        next(iter(s))
    wire.fail_when = lambda tokens: tokens.shape[1] == 1  # the next decode step
    assert [collect(s)[1] for s in streams] == ["error", "error"]
    wire.fail_when = None
    assert strip(collect(engine.submit(request(tiny, tok, "three")))) == strip(reference(tiny, tok, "three"))
    assert engine.alive and engine.metrics.counters["engine_failures_total"] == 0


@pytest.mark.parametrize("when", ["queued", "prefilling", "first row", "last row", "several"])
def test_cancel_at_any_point_leaves_the_others_untouched(tiny, tok, monkeypatch, when):
    eng = Engine(tiny, tok, max_batch=3, max_queue=8, context_length=200)
    wire = Tripwire(tiny, monkeypatch)
    prompts = ["alpha beta", "gamma", "delta epsilon zeta", "eta", "theta iota"]
    penalized = dict(repetition_penalty=1.2)  # rows with penalties carry a TokenHistory, moved on a cancel
    requests = [request(tiny, tok, p, n=30, **penalized) for p in prompts]
    leaving = {"queued": [4], "prefilling": [1], "first row": [0], "last row": [2], "several": [0, 2, 3]}[when]
    streams = [eng.submit(r) for r in requests]
    if when == "prefilling":  # cancelled by the forward of its own prefill
        target = requests[1].prompt_ids
        wire.on_call = lambda tokens: tokens[0].tolist() == target and streams[1].cancel()
    else:
        for i in leaving:
            streams[i].cancel()
    eng.start()
    try:
        for i, (p, stream) in enumerate(zip(prompts, streams)):
            tokens, reason = collect(stream)
            if i in leaving:
                assert reason == "cancelled"
            else:
                assert strip((tokens, reason)) == strip(reference(tiny, tok, p, n=30, **penalized))
        assert eng.metrics.counters["requests_cancelled_total"] == len(leaving)
        assert eng.metrics.running == 0 and eng.metrics.queue_depth == 0
    finally:
        eng.shutdown()


def test_cancel_mid_decode_moves_penalized_rows(tiny, tok, monkeypatch):
    """Cancelling the first of several decoding rows that carry penalties (the server's old killer)."""
    eng = Engine(tiny, tok, max_batch=4, max_queue=8, context_length=200)
    Tripwire(tiny, monkeypatch)
    prompts = ["one two", "three", "gamma", "seven"]
    streams = [eng.submit(request(tiny, tok, p, n=40, presence_penalty=0.5)) for p in prompts]
    eng.start()
    try:
        readers = [iter(s) for s in streams]
        firsts = [next(r) for r in readers]
        assert not any(d.finish_reason for d in firsts)
        streams[0].cancel()
        streams[1].cancel()
        assert [d.finish_reason for d in readers[0]][-1] == "cancelled"
        for p, first, reader in zip(prompts[2:], firsts[2:], readers[2:]):
            deltas = [first, *reader]
            tokens = [d.token_id for d in deltas if d.token_id is not None]
            want = reference(tiny, tok, p, n=40, presence_penalty=0.5)
            assert strip((tokens, deltas[-1].finish_reason)) == strip(want)
        assert eng.alive and eng.metrics.counters["engine_failures_total"] == 0
    finally:
        eng.shutdown()


def test_a_dead_scheduler_is_run_again_then_given_up(tiny, tok, monkeypatch):
    stopped = []
    eng = Engine(tiny, tok, max_batch=2, max_queue=8, context_length=200, on_failure=stopped.append)
    monkeypatch.setattr(eng, "FAILURE_WINDOW", 60.0)
    real, deaths = eng._admit, {"left": 1}

    def admit():
        if deaths["left"]:
            deaths["left"] -= 1
            raise RuntimeError("a scheduler bug")
        real()

    eng._admit = admit
    eng.start()
    try:
        assert collect(eng.submit(request(tiny, tok, "queued through a death")))[1] == "length"
        assert eng.alive and eng.metrics.counters["engine_failures_total"] == 1 and not stopped
        deaths["left"] = 10**6
        stream = eng.submit(request(tiny, tok, "never served"))
        assert collect(stream)[1] == "error" and "3 failures" in stream.error
        eng._thread.join(5)  # the streams hear of the failure before on_failure is called
        assert not eng.alive and stopped and "a scheduler bug" in stopped[0]
        with pytest.raises(EngineFailedError, match="restart the server"):
            eng.submit(request(tiny, tok, "refused"))
    finally:
        eng.shutdown()


def test_sampling_bounds_keep_numbers_machine_sized():
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=10**30).validate()
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64).validate()
    SamplingParams(top_k=MAX_TOP_K, seed=2**64 - 1).validate()


def test_the_decoder_can_cancel_outside_inference_mode(tiny, tok):
    """Any caller, not only the engine's thread, may drop a row whose batch carries penalties."""
    decoder = Decoder(tiny, tok, 2, 100)
    requests = [request(tiny, tok, p, n=10, presence_penalty=0.5) for p in ("one two", "three")]
    (first, _), (second, delta) = (decoder.add(r) for r in requests)
    tokens = [delta.token_id]
    tokens += [d.token_id for row, d in decoder.step() if row is second]
    decoder.cancel(first)
    while decoder.rows:
        tokens += [d.token_id for row, d in decoder.step() if row is second]
    assert strip((tokens, "length")) == strip(reference(tiny, tok, "three", n=10, presence_penalty=0.5))
