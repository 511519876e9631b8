"""qwenkit.sampling: hand-made kept sets, agreement with transformers' warpers, per-row batching,
penalties, seeds, validation and logprobs."""

import math

import pytest
import torch

from qwenkit.sampling import (
    SamplingParams,
    TokenHistory,
    apply_logit_bias,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    argmax,
    logprobs_of,
    make_generator,
    process_logits,
    sample,
    top_k_candidates,
)

hf = pytest.importorskip("transformers.generation.logits_process")

# probs of [3, 2, 1, 0]: 0.644, 0.237, 0.087, 0.032; cumulative from the top: 0.644, 0.881, 0.968, 1.
LOGITS = torch.tensor([[3.0, 2.0, 1.0, 0.0]])


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in logits]


def random_logits(batch=4, vocab=1000, seed=0):
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


# --- each filter on hand-made logits -------------------------------------------------------------


@pytest.mark.parametrize("k, expected", [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (0, {0, 1, 2, 3}), (10, {0, 1, 2, 3})])
def test_top_k_kept_set(k, expected):
    assert kept(apply_top_k(LOGITS, k)) == [expected]


def test_top_k_keeps_every_tie_with_the_kth_logit():
    assert kept(apply_top_k(torch.tensor([[3.0, 2.0, 2.0, 0.0]]), 2)) == [{0, 1, 2}]


@pytest.mark.parametrize("p, expected", [
    (0.01, {0}), (0.6, {0}), (0.7, {0, 1}), (0.9, {0, 1, 2}), (0.99, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3}),
])
def test_top_p_kept_set(p, expected):
    assert kept(apply_top_p(LOGITS, p)) == [expected]


@pytest.mark.parametrize("min_p, expected", [
    (0.0, {0, 1, 2, 3}), (0.04, {0, 1, 2, 3}), (0.1, {0, 1, 2}), (0.3, {0, 1}), (0.5, {0}), (1.0, {0}),
])
def test_min_p_kept_set(min_p, expected):
    assert kept(apply_min_p(LOGITS, min_p)) == [expected]


def test_filters_leave_kept_logits_untouched():
    # top_p sees the renormalised survivors of top_k: 0.665, 0.245, 0.090 -> 0.95 keeps all three.
    out = apply_top_p(apply_top_k(LOGITS, 3), 0.95)
    assert torch.equal(out, torch.tensor([[3.0, 2.0, 1.0, float("-inf")]]))


# --- agreement with transformers on random logits ---------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 50, 999, 1000, 5000])
def test_top_k_matches_transformers(k):
    logits = random_logits()
    assert torch.equal(apply_top_k(logits, k), hf.TopKLogitsWarper(k)(None, logits.clone()))


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.95, 0.999])
def test_top_p_matches_transformers(p):
    logits = random_logits()
    assert torch.equal(apply_top_p(logits, p), hf.TopPLogitsWarper(p)(None, logits.clone()))


@pytest.mark.parametrize("min_p", [0.0, 0.01, 0.1, 0.3, 0.9, 1.0])
def test_min_p_matches_transformers(min_p):
    logits = random_logits()
    assert torch.equal(apply_min_p(logits, min_p), hf.MinPLogitsWarper(min_p)(None, logits.clone()))


@pytest.mark.parametrize("t", [0.1, 0.7, 1.0, 1.5])
def test_temperature_matches_transformers(t):
    logits = random_logits()
    assert torch.equal(apply_temperature(logits, t), hf.TemperatureLogitsWarper(t)(None, logits.clone()))


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    logits = random_logits(batch=2, vocab=50)
    input_ids = torch.tensor([[1, 2, 3, 3, 7, 40], [0, 49, 5, 5, 5, 9]])  # prompt (4) + output (2)
    history = TokenHistory(2, 50, "cpu")
    for row in range(2):
        history.reset_row(row, input_ids[row, :4].tolist())
    for step in (4, 5):
        history.add(input_ids[:, step])
    ours = process_logits(logits, [SamplingParams(repetition_penalty=penalty)] * 2, history)
    expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(input_ids, logits.clone())
    assert torch.allclose(ours, expected, rtol=0, atol=0)


def test_hugging_face_pipeline_order_matches():
    """temperature -> top_k -> top_p -> min_p, as transformers chains them."""
    logits = random_logits(batch=1)
    ours = apply_min_p(apply_top_p(apply_top_k(apply_temperature(logits, 0.8), 40), 0.9), 0.05)
    theirs = logits.clone()
    for warper in (hf.TemperatureLogitsWarper(0.8), hf.TopKLogitsWarper(40), hf.TopPLogitsWarper(0.9),
                   hf.MinPLogitsWarper(0.05)):
        theirs = warper(None, theirs)
    assert torch.equal(ours, theirs)


# --- per-row parameters in one batch ------------------------------------------------------------

ROW_PARAMS = [
    SamplingParams(temperature=0.0, repetition_penalty=1.2),
    SamplingParams(temperature=0.7, top_k=20, seed=1, presence_penalty=0.5),
    SamplingParams(temperature=1.0, top_p=0.8, min_p=0.05, seed=2, frequency_penalty=1.0, logit_bias={3: 5.0}),
    SamplingParams(temperature=1.3, top_k=5, top_p=0.5, seed=3, logit_bias={7: -100.0, 8: 100.0}),
    SamplingParams(temperature=0.9, seed=4),
]


def test_per_row_filters_equal_each_row_alone():
    logits = random_logits(batch=3)
    ks, ps, min_ps = torch.tensor([0, 5, 300]), torch.tensor([1.0, 0.3, 0.9]), torch.tensor([0.0, 0.2, 0.01])
    batched = [apply_top_k(logits, ks), apply_top_p(logits, ps), apply_min_p(logits, min_ps)]
    for row in range(3):
        alone = [apply_top_k(logits[row:row + 1], int(ks[row])), apply_top_p(logits[row:row + 1], float(ps[row])),
                 apply_min_p(logits[row:row + 1], float(min_ps[row]))]
        for b, a in zip(batched, alone):
            assert torch.equal(b[row:row + 1], a)


def test_batched_decode_equals_each_row_alone():
    vocab, steps = 64, 12
    prompts = [[1, 2, 3], [4, 4, 5], [6], [7, 8, 9, 10], [11]]
    step_logits = [random_logits(batch=len(ROW_PARAMS), vocab=vocab, seed=100 + s) for s in range(steps)]

    def decode(rows):
        history = TokenHistory(len(rows), vocab, "cpu")
        for i, row in enumerate(rows):
            history.reset_row(i, prompts[row])
        params = [ROW_PARAMS[row] for row in rows]
        generators = [make_generator(p.seed, "cpu") for p in params]
        out = []
        for logits in step_logits:
            processed = process_logits(logits[rows], params, history)
            tokens = sample(processed, params, generators)
            history.add(tokens)
            out.append(tokens)
        return torch.stack(out, dim=1)

    batched = decode(list(range(len(ROW_PARAMS))))
    for row in range(len(ROW_PARAMS)):
        assert torch.equal(batched[row], decode([row])[0]), f"row {row}"


# --- penalties and logit_bias -------------------------------------------------------------------


def test_repetition_penalty_sign_rule_over_prompt_and_output():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0]])
    history = TokenHistory(1, 5, "cpu")
    history.reset_row(0, [0, 1])  # prompt
    history.add(torch.tensor([3]))  # output
    out = process_logits(logits, [SamplingParams(repetition_penalty=2.0)], history)
    assert out.tolist() == [[1.0, -4.0, 2.0, -4.0, 1.0]]


def test_presence_and_frequency_count_output_only():
    logits = torch.zeros(1, 5)
    history = TokenHistory(1, 5, "cpu")
    history.reset_row(0, [0, 4])  # prompt tokens are not penalised by presence/frequency
    for token in (1, 1, 1, 2, 4):
        history.add(torch.tensor([token]))
    out = process_logits(logits, [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)], history)
    # id 1: count 3 -> -(0.5 + 0.75); id 2: count 1 -> -(0.5 + 0.25); id 4: count 1 (output only).
    assert out.tolist() == [[0.0, -1.25, -0.75, 0.0, -0.75]]
    assert history.counts.tolist() == [[0, 3, 1, 0, 1]]


def test_negative_presence_frequency_encourage():
    out = apply_presence_frequency(torch.zeros(1, 3), torch.tensor([[0, 2, 1]]), -1.0, -0.5)
    assert out.tolist() == [[0.0, 2.0, 1.5]]


def test_apply_repetition_penalty_per_row():
    logits = torch.tensor([[2.0, -2.0], [2.0, -2.0]])
    seen = torch.tensor([[True, True], [True, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 4.0]))
    assert out.tolist() == [[1.0, -4.0], [0.5, -2.0]]


def test_logit_bias_adds():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    params = [SamplingParams(logit_bias={0: 10.0, 2: -100.0}), SamplingParams(logit_bias={1: 0.5})]
    assert process_logits(logits, params, None).tolist() == [[11.0, 2.0, -97.0], [1.0, 2.5, 3.0]]
    out = apply_logit_bias(logits, torch.tensor([1]), torch.tensor([0]), torch.tensor([-1.0]))
    assert out.tolist() == [[1.0, 2.0, 3.0], [0.0, 2.0, 3.0]]


def test_logit_bias_forces_a_token():
    params = [SamplingParams(temperature=1.0, seed=0, logit_bias={5: 100.0})]
    processed = process_logits(random_logits(batch=1, vocab=10), params, None)
    assert sample(processed, params, [make_generator(0, "cpu")]).item() == 5


def test_process_logits_never_modifies_its_input():
    logits = random_logits(batch=2, vocab=20)
    before = logits.clone()
    assert process_logits(logits, [SamplingParams(), SamplingParams(temperature=0)], None) is logits
    history = TokenHistory(2, 20, "cpu")
    history.reset_row(0, [1, 2])
    history.reset_row(1, [3])
    process_logits(logits, [SamplingParams(repetition_penalty=1.5, logit_bias={4: 1.0}),
                            SamplingParams(frequency_penalty=1.0)], history)
    assert torch.equal(logits, before)


def test_penalties_without_history_is_an_error():
    with pytest.raises(ValueError, match="TokenHistory"):
        process_logits(torch.zeros(1, 4), [SamplingParams(presence_penalty=1.0)], None)


def test_token_history_rows_and_inactive_slots():
    history = TokenHistory(3, 6, "cpu")
    history.reset_row(0, [1])
    history.reset_row(1, [2, 2])
    history.add(torch.tensor([3, -1, 0]))  # row 1 inactive
    history.add(torch.tensor([3, 5, -1]))  # row 2 inactive
    assert history.counts.tolist() == [[0, 0, 0, 2, 0, 0], [0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]]
    assert [set(r.nonzero().flatten().tolist()) for r in history.seen] == [{1, 3}, {2, 5}, {0}]
    history.reset_row(1, [4])  # the slot is reused by a new request
    assert history.counts[1].sum() == 0 and history.seen[1].nonzero().flatten().tolist() == [4]
    assert history.counts[0].tolist() == [0, 0, 0, 2, 0, 0]
    with pytest.raises(ValueError, match="prompt_ids"):
        history.reset_row(0, [6])


# --- sample(): greedy, filters after temperature, seeds -------------------------------------------


def test_greedy_is_argmax_and_ignores_seeds():
    logits = random_logits(batch=3)
    params = [SamplingParams(temperature=0.0, seed=s) for s in (1, 2, None)]
    generators = [make_generator(p.seed, "cpu") for p in params]
    state = generators[0].get_state()
    assert torch.equal(sample(logits, params, generators), logits.argmax(-1))
    assert torch.equal(generators[0].get_state(), state)  # no random numbers were drawn


def test_min_p_is_applied_after_temperature():
    # At temperature 2, [3, 2, 1, 0] -> probs relative to the top: 1, 0.61, 0.37, 0.22; min_p 0.5 keeps {0, 1}.
    # (Before temperature it would keep only {0}.)
    params = [SamplingParams(temperature=2.0, min_p=0.5)] * 400
    torch.manual_seed(0)
    tokens = sample(LOGITS.expand(400, 4), params, [None] * 400)
    assert set(tokens.tolist()) == {0, 1}


def test_draws_follow_the_distribution():
    n = 4000
    torch.manual_seed(0)
    tokens = sample(LOGITS.expand(n, 4), [SamplingParams()] * n, [None] * n)
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert torch.allclose(freq, LOGITS.softmax(-1)[0], atol=0.03)


@pytest.mark.parametrize("tie", [False, True])
def test_top_k_rows_draw_over_their_candidates_as_transformers_filters_the_vocabulary(tie):
    """With top_k the filters and the draw run over the tokens top_k keeps; the frequencies match
    transformers' warpers over the whole vocabulary, ties with the k-th token included."""
    logits = random_logits(batch=1, vocab=300, seed=3)
    if tie:
        order = logits[0].argsort(descending=True)
        logits[0, order[5]] = logits[0, order[4]]
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.95)
    expected = logits.clone()
    for warper in (hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(5), hf.TopPLogitsWarper(0.95)):
        expected = warper(None, expected)
    assert torch.isfinite(expected).sum() == 5 + tie
    n = 6000
    torch.manual_seed(0)
    tokens = sample(logits.expand(n, -1), [params] * n, [None] * n)
    freq = torch.bincount(tokens, minlength=300).float() / n
    assert set(tokens.tolist()) <= set(torch.isfinite(expected[0]).nonzero().flatten().tolist())
    assert torch.allclose(freq, expected.softmax(-1)[0], atol=0.02)


def test_argmax_is_torchs():
    x = random_logits(batch=4, vocab=5000)
    x[1, 7] = float("nan")  # NaN wins, as in torch
    x[2] = 1.0  # ties: the first
    x[3, 100:102] = x[3].max() + 1
    assert torch.equal(argmax(x), x.argmax(-1)) and argmax(x).tolist()[1:3] == [7, 0]
    assert torch.equal(argmax(x[:, ::2]), x[:, ::2].argmax(-1))  # strided


def test_top_k_candidates():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0], [3.0, 2.0, 9.0, -1.0]])
    values, ids = top_k_candidates(logits, [2, 1])
    assert ids.tolist() == [[1, 3], [2, 0]] and values.tolist() == [[5.0, 4.0], [9.0, 3.0]]
    logits[1, 3] = 3.0
    values, ids = top_k_candidates(logits, [1, 2])  # row 1's second place is a tie: both kept
    assert sorted(ids[1].tolist()) == [0, 2, 3] and values.shape == (2, 3)


def _draws(seed, steps=30, params=None):
    params = params or SamplingParams(temperature=1.0, seed=seed)
    generator = make_generator(seed, "cpu")
    logits = random_logits(batch=1, vocab=50)
    return [sample(logits, [params], [generator]).item() for _ in range(steps)]


def test_same_seed_same_draws_different_seed_differs():
    assert _draws(7) == _draws(7)
    assert _draws(7) != _draws(8)
    assert len(set(_draws(7))) > 1  # the generator advances between draws


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(3, "cpu"), make_generator(3, "cpu")
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# --- validate() --------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_k", -1), ("top_k", 2.5),
    ("top_p", 0.0), ("top_p", 1.1), ("top_p", -0.5), ("top_p", float("nan")),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {100: 1.0}), ("logit_bias", {"5": 1.0}),
    ("logit_bias", {5: 100.5}), ("logit_bias", {5: -101.0}),
    ("seed", 1.5),
])
def test_validate_rejects_and_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate(vocab_size=100)


def test_validate_accepts_edges_and_returns_self():
    params = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=1.0, repetition_penalty=0.5,
                            presence_penalty=-2.0, frequency_penalty=2.0, logit_bias={0: -100, 99: 100}, seed=0)
    assert params.validate(vocab_size=100) is params
    assert params.greedy and not SamplingParams().greedy
    SamplingParams(logit_bias={10**6: 1.0}).validate()  # no vocab size: any id >= 0


# --- logprobs_of -------------------------------------------------------------------------------


def test_logprobs_of():
    logits = random_logits(batch=3, vocab=30)
    tokens = torch.tensor([0, 5, 29])
    chosen, values, ids = logprobs_of(logits, tokens, top_n=30)
    assert torch.allclose(values.exp().sum(-1), torch.ones(3))
    assert torch.allclose(chosen, torch.log_softmax(logits, -1)[torch.arange(3), tokens])
    assert (values[:, :-1] >= values[:, 1:]).all()
    assert torch.equal(ids[:, 0], logits.argmax(-1))

    chosen5, values5, ids5 = logprobs_of(logits, tokens, top_n=5)
    assert values5.shape == ids5.shape == (3, 5) and torch.equal(chosen5, chosen)
    assert torch.equal(values5, values[:, :5]) and torch.equal(ids5, ids[:, :5])
    assert torch.equal(values5, torch.log_softmax(logits, -1).gather(1, ids5))
    assert logprobs_of(logits, tokens)[1:] == (None, None)
    assert math.isclose(logprobs_of(LOGITS, torch.tensor([0]))[0].item(), math.log(LOGITS.softmax(-1)[0, 0].item()),
                        rel_tol=1e-6)
