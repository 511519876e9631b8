"""The decode loop: stops, streaming, batching, seeds, logprobs, context limits."""

import copy

import pytest
import torch

import qwenkit
from qwenkit.errors import ContextLengthError
from qwenkit.model import Model

from .conftest import V1_TINY, tiny_config


class Scripted(Model):
    """A model whose greedy continuation of any prompt is `script` (drives the loop deterministically)."""

    def __init__(self, script, prompt_len):
        super().__init__(tiny_config(**V1_TINY))
        self.script, self.prompt_len = script, prompt_len
        self.generation_config = {}

    def forward(self, tokens, input_pos=None, cache=None, *, last_only=False):
        pos = input_pos.expand(tokens.shape) if input_pos.dim() == 1 else input_pos
        pos = pos[:, -1:] if last_only else pos
        logits = torch.zeros(*pos.shape, self.config.vocab_size)
        nxt = (pos + 1 - self.prompt_len).clamp(0, len(self.script) - 1)
        logits.scatter_(-1, torch.tensor(self.script)[nxt][..., None], 10.0)
        return logits


def run_script(tok, text, prompt="x", **kw):
    prompt_ids = tok.encode(prompt)
    model = Scripted(tok.encode(text) + [tok.im_end_id], len(prompt_ids))
    return model, prompt_ids, kw


def test_stop_string_split_across_tokens_is_cut(tok):
    model, prompt, _ = run_script(tok, "Answer: 42\nObservation: done")
    assert len(tok.encode("Observation:")) > 1  # the stop string spans several tokens
    result = qwenkit.generate(model, tok, prompt, temperature=0, stop=["Observation:"], max_new_tokens=50)
    assert result.text == "Answer: 42\n" and result.finish_reason == "stop"
    streamed = list(qwenkit.stream_generate(model, tok, prompt, temperature=0, stop="Observation:", max_new_tokens=50))
    assert "".join(d.text for d in streamed) == "Answer: 42\n"
    assert not any("Obs" in d.text for d in streamed)


def test_stop_token_and_length(tok):
    model, prompt, _ = run_script(tok, "one two three")
    done = qwenkit.generate(model, tok, prompt, temperature=0, max_new_tokens=50)
    assert done.text == "one two three" and done.finish_reason == "stop"
    assert tok.im_end_id not in done.token_ids
    cut = qwenkit.generate(model, tok, prompt, temperature=0, max_new_tokens=2)
    assert cut.finish_reason == "length" and len(cut.token_ids) == 2 and cut.text == "one two"


def test_streaming_chinese_and_emoji_never_splits_a_character(tok):
    text = "你好，世界！🫠 🧑‍🚀 𠀋龘𪚥 Ünïcödé 𝔘𝔫𝔦"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens are partial characters
    model = Scripted(ids + [tok.im_end_id], 1)
    deltas = [d.text for d in qwenkit.stream_generate(model, tok, [0], temperature=0, max_new_tokens=100)]
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == text == qwenkit.generate(model, tok, [0], temperature=0, max_new_tokens=100).text


def test_batched_generation_equals_one_by_one(tiny, tok):
    prompts = ["hello world", "a much longer prompt with many more tokens in it, to differ", "短"]
    kw = dict(temperature=0, max_new_tokens=12, stop_token_ids=[], repetition_penalty=1.3)
    single = [qwenkit.generate(tiny, tok, p, **kw).token_ids for p in prompts]
    batched = [r.token_ids for r in qwenkit.generate_batch(tiny, tok, prompts, max_batch=2, **kw)]
    assert batched == single


def test_a_sequence_stops_once_done_when_holds(tiny, tok):
    """Beside sequences that run to their length, in two rows for three prompts: the stopped one's row is
    taken by the third prompt, and every text is a prefix of (or equal to) what it generates alone."""
    prompts = ["hello world", "a much longer prompt with many more tokens in it, to differ", "短"]
    kw = dict(temperature=0, max_new_tokens=24, stop_token_ids=[])
    alone = [qwenkit.generate(tiny, tok, p, **kw) for p in prompts]
    batched = qwenkit.generate_batch(tiny, tok, prompts, max_batch=2, done_when=lambda i, text: i == 0 and
                                     len(text) >= 5, **kw)
    assert [r.token_ids for r in batched[1:]] == [r.token_ids for r in alone[1:]]
    stopped, whole = batched[0], alone[0]
    assert len(stopped.text) >= 5 and whole.text.startswith(stopped.text) and stopped.finish_reason == "stop"
    assert stopped.token_ids == whole.token_ids[:len(stopped.token_ids)] and len(stopped.token_ids) < 24
    assert len(tok.decode(stopped.token_ids[:-1])) < 5  # it stopped at the first token that made it hold


def test_seed_reproduces_and_differs(tiny, tok):
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=16)
    a = qwenkit.generate(tiny, tok, "hello", seed=7, **kw).token_ids
    assert a == qwenkit.generate(tiny, tok, "hello", seed=7, **kw).token_ids
    assert a != qwenkit.generate(tiny, tok, "hello", seed=8, **kw).token_ids


def test_logprobs(tiny, tok):
    r = qwenkit.generate(tiny, tok, "hello", temperature=0, max_new_tokens=5, logprobs=True, top_logprobs=3)
    assert len(r.logprobs) == len(r.top_logprobs) == 5
    for lp, top in zip(r.logprobs, r.top_logprobs):
        assert lp <= 0 and len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
        assert abs(top[0][1] - lp) < 1e-5  # greedy picks the most likely token


def test_prompt_too_long(tiny, tok):
    ids = list(range(300))
    with pytest.raises(ContextLengthError, match="the prompt has 300 tokens but the context holds 256"):
        qwenkit.generate(tiny, tok, ids)
    r = qwenkit.generate(tiny, tok, ids, truncate=True, max_new_tokens=6, temperature=0)
    assert r.prompt_tokens == 250 and len(r.token_ids) <= 6


def test_bad_options(tiny, tok):
    with pytest.raises(ValueError, match="top_p"):
        qwenkit.generate(tiny, tok, "hi", top_p=1.5)
    with pytest.raises(TypeError, match="unknown generation option.*nucleus"):
        qwenkit.generate(tiny, tok, "hi", nucleus=0.5)
    with pytest.raises(ValueError, match="the prompt is empty"):
        qwenkit.generate(tiny, tok, "")


def _run(decoder, request):
    row, delta = decoder.add(request)
    out = [delta]
    while row in decoder.rows:
        out += [d for r, d in decoder.step() if r is row]
    return row, [d.token_id for d in out if d.token_id is not None]


def test_prefix_reuse_gives_the_same_tokens(tiny, tok):
    from qwenkit.generate import Decoder, make_request

    kw = dict(temperature=0, max_new_tokens=6, stop_token_ids=[])
    first = make_request(tiny, tok, "a conversation that goes on", **kw)
    decoder = Decoder(tiny, tok, max_batch=3, max_len=128)
    other = decoder.add(make_request(tiny, tok, "someone else is decoding meanwhile", max_new_tokens=40,
                                     temperature=0, stop_token_ids=[]))[0]
    _, out = _run(decoder, first)
    follow = make_request(tiny, tok, first.prompt_ids + out + tok.encode(" and the next turn"), **kw)
    row, reused = _run(decoder, follow)
    assert row.cached_tokens == len(first.prompt_ids) + len(out) - 1  # everything but the last sampled token
    fresh = _run(Decoder(tiny, tok, max_batch=1, max_len=128), follow)[1]
    assert reused == fresh and other in decoder.rows


def test_a_prompt_prefilled_in_chunks_decodes_as_in_one_forward(tiny, tok):
    """Chunks of 5 tokens (after a reused prefix too) give the one-forward prefill's tokens and logprobs."""
    from qwenkit.generate import Decoder, make_request

    kw = dict(temperature=0, max_new_tokens=8, stop_token_ids=[], logprobs=True)
    prompt = make_request(tiny, tok, "a prompt long enough to be cut into several chunks of five tokens", **kw)
    whole = Decoder(tiny, tok, max_len=128, prefill_chunk=0)
    chunked = Decoder(tiny, tok, max_len=128, prefill_chunk=5)
    assert chunked.prefill_chunk == 5 and len(prompt.prompt_ids) > 12  # 7 reused, then chunks of 5 and 1
    for decoder in (whole, chunked):  # the second request reuses the first's prefix, then prefills the rest
        _run(decoder, make_request(tiny, tok, prompt.prompt_ids[:7], **kw))
    a_row, a = _run(whole, prompt)
    b_row, b = _run(chunked, prompt)
    assert a == b and a_row.cached_tokens == b_row.cached_tokens == 7
    with pytest.raises(ValueError, match="prefill_chunk must be 0"):
        Decoder(tiny, tok, max_len=16, prefill_chunk=-1)


def test_a_windowed_model_decodes_through_its_rings(tiny, tok):
    """With window attention the decode loop prefills in chunks longer than the window into ring caches and
    greedy-decodes what the whole-sequence forward does; a ring reuses no prefix (it holds the newest positions)."""
    from qwenkit.generate import Decoder, make_request

    from .conftest import assert_greedy

    model = copy.deepcopy(tiny)
    model.set_window_attention("4:1")
    kw = dict(temperature=0, max_new_tokens=10, stop_token_ids=[])
    decoder = Decoder(model, tok, max_batch=2, max_len=128, prefill_chunk=6)
    assert decoder.cache.k[0].shape[2] == 4 and decoder.cache.k[1].shape[2] == 128
    first = make_request(model, tok, "a prompt of a dozen tokens or so, past the window", **kw)
    _, out = _run(decoder, first)
    assert_greedy(model, tok, first.prompt_ids, out)
    follow = make_request(model, tok, first.prompt_ids + out + tok.encode(" and more"), **kw)
    row, again = _run(decoder, follow)
    assert row.cached_tokens == 0
    assert_greedy(model, tok, follow.prompt_ids, again)


def _drive(model, tok, requests, ahead, cancel=None):
    """Run `requests` through one two-row Decoder, adding each as a row frees up and cancelling
    request `cancel` once it has three deltas; each request's deltas as tuples."""
    from qwenkit.generate import Decoder

    decoder = Decoder(model, tok, max_batch=2, max_len=128, ahead=ahead)
    waiting, out, index = list(enumerate(requests)), {}, {}

    def record(row, d):
        out.setdefault(index[id(row)], []).append((d.text, d.token_id, d.finish_reason, d.logprob, d.top_logprobs))

    while waiting or decoder.rows:
        while waiting and decoder.free_slots:
            i, request = waiting.pop(0)
            row, delta = decoder.add(request)
            index[id(row)] = i
            record(row, delta)
        for row, delta in decoder.step():
            record(row, delta)
        for row in decoder.rows:
            if index[id(row)] == cancel and len(out[cancel]) >= 3:
                decoder.cancel(row)
    return [out[i] for i in range(len(requests))]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_decoding_ahead_gives_what_stepwise_decoding_gives(tiny, tok, device):
    """The GPU's queued-ahead loop (forced on, on the CPU): the same deltas through stops, cancels,
    adds into freed rows, prefix reuse, penalties, seeds and logprobs."""
    from qwenkit.generate import make_request
    from qwenkit.runtime.cuda_graphs import use_cuda_graphs

    if device == "cuda":
        tiny = copy.deepcopy(tiny).to(device)
        use_cuda_graphs(tiny)
    greedy = qwenkit.generate(tiny, tok, "hello there", temperature=0, max_new_tokens=12, stop_token_ids=[]).token_ids
    stop_text = tok.decode(greedy[6:8])
    kw = dict(stop_token_ids=[])
    requests = [make_request(tiny, tok, p, **{**kw, **o}) for p, o in [
        ("hello there", dict(temperature=0, max_new_tokens=12, stop_token_ids=[greedy[4]], logprobs=True,
                             top_logprobs=3)),
        ("a sampled one", dict(temperature=0.9, top_k=50, seed=5, max_new_tokens=9, repetition_penalty=1.2,
                               presence_penalty=0.5)),
        ("hello there", dict(temperature=0, max_new_tokens=20, stop=[stop_text])),
        ("to be cancelled", dict(temperature=0, max_new_tokens=20)),
        ("one token only", dict(temperature=0.7, seed=1, max_new_tokens=1)),
        ("hello there, again", dict(temperature=0, max_new_tokens=7, logprobs=True)),
    ]]
    stepwise = _drive(tiny, tok, requests, ahead=False, cancel=3)
    ahead = _drive(tiny, tok, requests, ahead=True, cancel=3)
    assert [d[-1][2] for d in stepwise] == ["stop", "length", "stop", None, "length", "length"]
    for a, b in zip(stepwise, ahead):
        assert [d[:3] for d in a] == [d[:3] for d in b]
        assert [d[3] for d in a] == pytest.approx([d[3] for d in b], abs=1e-4)


def test_decoding_ahead_queues_no_step_past_a_length_limit(tiny, tok):
    """One forward a token when a length limit ends the reply; one more (queued for nothing) when
    a stop token does."""
    from qwenkit.generate import Decoder, make_request

    greedy = qwenkit.generate(tiny, tok, "hello", temperature=0, max_new_tokens=6, stop_token_ids=[]).token_ids
    forwards = []
    hook = tiny.register_forward_pre_hook(lambda *_: forwards.append(1))
    try:
        for stop_ids, expected in [([], 6), (greedy[3:4], 4 + 1)]:
            forwards.clear()
            decoder = Decoder(tiny, tok, max_len=64, ahead=True)
            decoder.add(make_request(tiny, tok, "hello", temperature=0, max_new_tokens=6, stop_token_ids=stop_ids))
            while decoder.rows:
                decoder.step()
            assert len(forwards) == expected
    finally:
        hook.remove()
