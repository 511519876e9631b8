"""Speculative decoding by prompt lookup: greedy output equal to plain decoding token for token, and
sampling exact in distribution (the acceptance rule checked statistically)."""

from __future__ import annotations

import pytest
import torch

from qwenkit.generate import Decoder, generate, lookup_draft, make_request, verify_draft_token
from qwenkit.sampling import SamplingParams

# A prompt that repeats itself, as code edits do: drafts are found all along.
CODE = "def add(a, b):\n    return a + b\n\n" * 6


def test_lookup_draft_takes_what_followed_the_latest_match():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 4) == [7, 8, 1, 2]  # the latest 3-gram match
    assert lookup_draft([5, 6, 4, 6], 2) == [4, 6]  # only a 1-gram matches
    assert lookup_draft([1, 2, 3], 4) == [] and lookup_draft([7], 3) == []


@pytest.mark.parametrize("lookup, ahead", [(1, False), (3, False), (8, False), (4, True)])
def test_greedy_lookup_gives_the_plain_tokens(tiny, tok, lookup, ahead):
    plain = generate(tiny, tok, CODE, max_new_tokens=40, temperature=0.0)
    decoder = Decoder(tiny, tok, 1, 512, lookup=lookup, ahead=ahead)  # ahead: as on a GPU
    row, delta = decoder.add(make_request(tiny, tok, CODE, max_new_tokens=40, temperature=0.0))
    ids = [delta.token_id]
    while decoder.rows:
        ids += [d.token_id for _, d in decoder.step() if d.token_id is not None]
    assert ids == plain.token_ids[:len(ids)] and len(ids) == len(plain.token_ids)
    steps, emitted = decoder.speculated
    assert steps > 0 and emitted >= steps  # drafts were checked, each step emitting one token or more
    assert generate(tiny, tok, CODE, max_new_tokens=40, temperature=0.0, lookup=lookup).text == plain.text


def test_lookup_steps_aside_for_what_needs_one_token_a_step(tiny, tok):
    decoder = Decoder(tiny, tok, 2, 512, lookup=4)
    for prompt in (CODE, CODE + "x"):  # two rows: plain batched steps
        decoder.add(make_request(tiny, tok, prompt, max_new_tokens=5, temperature=0.0))
    decoder.step()
    assert decoder.speculated == [0, 0]
    logprobs = Decoder(tiny, tok, 1, 512, lookup=4)
    logprobs.add(make_request(tiny, tok, CODE, max_new_tokens=5, temperature=0.0, logprobs=True))
    logprobs.step()
    assert logprobs.speculated == [0, 0]
    with pytest.raises(ValueError, match="lookup must be 0"):
        Decoder(tiny, tok, 1, 64, lookup=-1)


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
    result = generate(tiny, tok, CODE, max_new_tokens=30, temperature=0.8, top_k=50, seed=1, lookup=4)
    assert len(result.token_ids) == 30 and all(0 <= t < tok.vocab_size for t in result.token_ids)
