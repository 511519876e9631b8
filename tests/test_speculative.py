"""Speculative decoding by prompt lookup and by a draft model: greedy output equal to plain decoding token for
token, and sampling exact in distribution (the acceptance rule checked statistically)."""

from __future__ import annotations

import time

import pytest
import torch

from qwenkit.errors import QwenkitError
from qwenkit.generate import Decoder, generate, make_request
from qwenkit.sampling import SamplingParams
from qwenkit.speculative import DraftModel, DraftStats, PromptLookup, lookup_draft, verify_draft_token

from .conftest import V1_TINY, tiny_model

# A prompt that repeats itself, as code edits do: drafts are found all along.
CODE = "def add(a, b):\n    return a + b\n\n" * 6


def test_lookup_draft_takes_what_followed_the_latest_match():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 4) == [7, 8, 1, 2]  # the latest 3-gram match
    assert lookup_draft([5, 6, 4, 6], 2) == [4, 6]  # only a 1-gram matches
    assert lookup_draft([1, 2, 3], 4) == [] and lookup_draft([7], 3) == []


@pytest.mark.parametrize("lookup, ahead", [(1, False), (3, False), (8, False), (4, True)])
def test_greedy_lookup_gives_the_plain_tokens(tiny, tok, lookup, ahead):
    plain = generate(tiny, tok, CODE, max_new_tokens=40, temperature=0.0)
    decoder = Decoder(tiny, tok, 1, 512, draft=PromptLookup(lookup), ahead=ahead)  # ahead: as on a GPU
    row, delta = decoder.add(make_request(tiny, tok, CODE, max_new_tokens=40, temperature=0.0))
    ids = [delta.token_id]
    while decoder.rows:
        ids += [d.token_id for _, d in decoder.step() if d.token_id is not None]
    assert ids == plain.token_ids[:len(ids)] and len(ids) == len(plain.token_ids)
    stats = decoder.speculated
    assert stats.steps > 0 and stats.emitted >= stats.steps  # drafts were checked, each step emitting one or more
    assert stats.emitted - stats.steps <= stats.accepted <= stats.proposed
    assert generate(tiny, tok, CODE, max_new_tokens=40, temperature=0.0, draft=PromptLookup(lookup)).text == plain.text


def test_lookup_steps_aside_for_what_needs_one_token_a_step(tiny, tok):
    decoder = Decoder(tiny, tok, 2, 512, draft=PromptLookup(4))
    for prompt in (CODE, CODE + "x"):  # two rows: plain batched steps
        decoder.add(make_request(tiny, tok, prompt, max_new_tokens=5, temperature=0.0))
    decoder.step()
    assert decoder.speculated == DraftStats()
    logprobs = Decoder(tiny, tok, 1, 512, draft=PromptLookup(4))
    logprobs.add(make_request(tiny, tok, CODE, max_new_tokens=5, temperature=0.0, logprobs=True))
    logprobs.step()
    assert logprobs.speculated == DraftStats()
    for n in (0, -1):
        with pytest.raises(QwenkitError, match="at least 1 token"):
            PromptLookup(n)


def test_the_acceptance_rule_keeps_the_distribution():
    """A draft token kept with its probability, else a draw from the rest: together, exactly p."""
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    p = torch.softmax(logits, dim=-1)
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    for proposed in (0, 3):
        counts = torch.bincount(torch.tensor([verify_draft_token(logits, proposed, params, gen) for _ in range(n)]),
                                minlength=5).double()
        expected = p.double() * n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 20.5, (proposed, counts, expected)  # 4 degrees of freedom: p < 0.0004 by chance
    assert verify_draft_token(logits, 3, SamplingParams(temperature=0.0), gen) == 0  # greedy: the model's choice


def test_sampled_lookup_runs_and_stays_in_the_vocabulary(tiny, tok):
    for draft in (PromptLookup(4), DraftModel(tiny, tok, 3, target=tok)):
        result = generate(tiny, tok, CODE, max_new_tokens=30, temperature=0.8, top_k=50, seed=1, draft=draft)
        assert len(result.token_ids) == 30 and all(0 <= t < tok.vocab_size for t in result.token_ids)


def _decode(model, tok, draft, prompt=CODE, new=40) -> tuple[list[int], DraftStats]:
    decoder = Decoder(model, tok, 1, 512, draft=draft)
    _, delta = decoder.add(make_request(model, tok, prompt, max_new_tokens=new, temperature=0.0))
    ids = [delta.token_id]
    while decoder.rows:
        ids += [d.token_id for _, d in decoder.step() if d.token_id is not None]
    return ids, decoder.speculated


def test_a_draft_model_gives_the_plain_tokens(tiny, tok):
    """A draft that is the model itself is always right; another model of the same vocabulary mostly wrong:
    either way the greedy tokens are the plain ones, and the draft's cache follows the sequence across steps
    and across requests (prefixes reused, rejected tokens overwritten)."""
    plain = generate(tiny, tok, CODE, max_new_tokens=40, temperature=0.0).token_ids
    itself = DraftModel(tiny, tok, 4, target=tok)
    ids, stats = _decode(tiny, tok, itself)
    assert ids == plain and stats.accepted == stats.proposed > 0 and stats.emitted == stats.steps + stats.accepted
    other = tiny_model(seed=11, scale=0.5, **V1_TINY)
    stranger = DraftModel(other, tok, 3, target=tok)
    for prompt in (CODE, CODE + "x = 1\n", "print(1)"):  # one draft model across requests, its cache reused
        ids, stats = _decode(tiny, tok, stranger, prompt)
        assert ids == generate(tiny, tok, prompt, max_new_tokens=40, temperature=0.0).token_ids
        assert stats.steps > 0 and stats.accepted < stats.proposed
    ids, stats = _decode(tiny, tok, DraftModel(other, tok, 8, target=tok), new=3)  # drafts cut to what is left
    assert len(ids) == 3 and stats.proposed <= 2


def test_a_draft_must_share_the_tokenizer(tiny, tok, byte_tokenizer):
    with pytest.raises(QwenkitError, match="draft model's tokenizer is not the model's.*vocabulary tokens differ"):
        DraftModel(tiny, byte_tokenizer, 4, target=tok)
    with pytest.raises(QwenkitError, match="at least 1 token"):
        DraftModel(tiny, tok, 0, target=tok)


def test_the_server_speculates_with_the_drafter_its_settings_make(tiny, tok, byte_tokenizer):
    """serve --draft / --lookup: the drafter is made once the model has loaded; replies are the plain ones,
    streamed or not; a draft of another tokenizer fails the load with a clear /health message."""
    import httpx

    from qwenkit.server import Settings, create_app

    from .conftest import events, live

    body = {"model": "tiny", "prompt": CODE, "max_tokens": 24, "temperature": 0}
    plain = generate(tiny, tok, CODE, max_new_tokens=24, temperature=0.0).text
    made = []

    def itself(tokenizer):
        made.append(DraftModel(tiny, tokenizer, 3, target=tokenizer))
        return made[-1]

    for draft in (itself, lambda tokenizer: PromptLookup(4)):
        app = create_app(lambda: (tiny, tok), Settings(served_model_name="tiny", max_batch=2, draft=draft))
        with live(app) as url:
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == plain
            streamed = httpx.post(f"{url}/v1/completions", json={**body, "stream": True}, timeout=60)
            assert "".join(e["choices"][0]["text"] for e in events(streamed)[:-1] if e["choices"]) == plain
        assert app.state.service.engine.decoder.speculated.steps > 0
    assert len(made) == 1
    strange = Settings(draft=lambda tokenizer: DraftModel(tiny, byte_tokenizer, 3, target=tokenizer))
    with live(create_app(lambda: (tiny, tok), strange), wait_ready=False) as url:
        for _ in range(500):
            health = httpx.get(f"{url}/health")
            if health.status_code == 503 and health.json().get("status") == "error":
                break
            time.sleep(0.02)
        assert "draft model's tokenizer is not the model's" in health.json()["message"]
