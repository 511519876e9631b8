"""Turning logits into tokens: penalties, filters, seeded draws and logprobs.

Small composable functions in the gpt-fast / mlx-lm style, shared by single-sequence generation
and the continuous-batching server, where every row of the batch carries its own SamplingParams.
Each filter takes its per-row value as a tensor [B] (or one number for every row), so a batch
pays one tensor op per filter rather than a Python loop over rows, and `process_logits` /
`sample` skip a filter entirely when no row uses it: batch-1 greedy decoding is one argmax.

Order of operations (Hugging Face's, plus the OpenAI penalties):
    process_logits: repetition penalty -> presence/frequency penalties -> logit_bias
                    (logprobs are reported from these values)
    sample:         greedy rows: argmax
                    other rows:  temperature -> top_k -> top_p -> min_p -> seeded draw
Filtered-out logits become -inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import RequestError

_NEG_INF = float("-inf")
MAX_TOP_K = 2**31 - 1  # any k past the vocabulary keeps every token; this bound keeps k a machine integer
GREEDY_BELOW = 1e-5  # a lower temperature is greedy: dividing by it would overflow the logits to inf
MIN_REPETITION_PENALTY = 0.01  # a smaller one divides logits into inf too


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) => greedy (argmax)
    top_k: int = 0  # 0 => off
    top_p: float = 1.0  # 1.0 => off
    min_p: float = 0.0  # 0 => off
    repetition_penalty: float = 1.0  # HF rule over prompt AND output: positive logits /, negative *
    presence_penalty: float = 0.0  # OpenAI rule over OUTPUT: logit -= presence_penalty * (count > 0)
    frequency_penalty: float = 0.0  # OpenAI rule over OUTPUT: logit -= frequency_penalty * count
    logit_bias: dict[int, float] | None = None  # token id -> value added to its logit (-100..100)
    seed: int | None = None

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ValueError naming the first bad field; return self so calls can chain.

        Comparisons are written as `not (lo <= x <= hi)` so NaN is rejected too.
        """
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            _bad("temperature", self.temperature, "a finite number >= 0 (0 means greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or not 0 <= self.top_k <= MAX_TOP_K:
            _bad("top_k", self.top_k, f"an integer in [0, {MAX_TOP_K}] (0 means off)")
        if not (0 < self.top_p <= 1):
            _bad("top_p", self.top_p, "in (0, 1] (1 means off)")
        if not (0 <= self.min_p <= 1):
            _bad("min_p", self.min_p, "in [0, 1] (0 means off)")
        if not (MIN_REPETITION_PENALTY <= self.repetition_penalty <= 100):
            _bad("repetition_penalty", self.repetition_penalty, f"in [{MIN_REPETITION_PENALTY}, 100] (1 means off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2 <= getattr(self, name) <= 2):
                _bad(name, getattr(self, name), "in [-2, 2] (0 means off)")
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0 or (
                vocab_size is not None and token >= vocab_size
            ):
                top = "" if vocab_size is None else f", < {vocab_size}"
                _bad("logit_bias", token, f"keyed by token ids (integers >= 0{top})")
            if not (-100 <= bias <= 100):
                _bad(f"logit_bias[{token}]", bias, "in [-100, 100]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**64):
            _bad("seed", self.seed, "an integer in [0, 2**64) or None")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _bad(name: str, value, allowed: str):
    raise RequestError(f"sampling parameter {name}={value!r} is invalid: must be {allowed}", name.partition("[")[0])


class TokenHistory:
    """Per-row token statistics the penalties need: which ids occurred in prompt+output (repetition
    penalty) and output counts (presence/frequency). Tensors [B, V] on the logits' device; rows can
    be reset/replaced individually (the server reuses batch slots).

    `seen`   bool  [B, V]: the id occurred in the row's prompt or output.
    `counts` int32 [B, V]: how many times the id was generated (output only).
    V must be the logits' last dimension (the lm_head width, which may exceed the tokenizer's).
    """

    def __init__(self, batch_size: int, vocab_size: int, device):
        self.vocab_size = vocab_size
        self.seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(batch_size, vocab_size, dtype=torch.int32, device=device)

    def reset_row(self, row: int, prompt_ids: Sequence[int]) -> None:
        """Start slot `row` afresh for a request whose prompt is `prompt_ids`."""
        # Checked on the host, before the copy, so a bad id is a clear error, not a device assert.
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < self.vocab_size):
            raise ValueError(f"prompt_ids must be token ids in [0, {self.vocab_size}), "
                             f"got values in [{int(ids.min())}, {int(ids.max())}]")
        self.seen[row] = False
        self.seen[row, ids.to(self.seen.device)] = True
        self.counts[row] = 0

    def add(self, tokens: torch.Tensor) -> None:
        """Record one generated token per row; rows with token < 0 (inactive slots) are ignored."""
        tokens = tokens.to(device=self.seen.device, dtype=torch.long).reshape(-1, 1)
        active = tokens >= 0
        # Scatter-based so that nothing waits on the device: inactive rows point at id 0 and
        # add zero to its count / write back the flag it already had.
        ids = tokens.clamp(min=0)
        self.counts.scatter_add_(1, ids, active.to(self.counts.dtype))
        self.seen.scatter_(1, ids, self.seen.gather(1, ids) | active)

    def rows(self, start: int, stop: int) -> TokenHistory:
        """A view of rows [start, stop): updates through it land in this history."""
        view = object.__new__(TokenHistory)
        view.vocab_size, view.seen, view.counts = self.vocab_size, self.seen[start:stop], self.counts[start:stop]
        return view

    def copy_row(self, src: int, dst: int) -> None:
        """Move a sequence's statistics to another slot (the decoder keeps active rows a prefix)."""
        self.seen[dst], self.counts[dst] = self.seen[src], self.counts[src]


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator seeded for one request, or None to draw from torch's global RNG."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# ---------------------------------------------------------------------------------------------
# Pure per-row operations: logits [B, V] in, new logits [B, V] out. Per-row values are tensors
# [B] (or one number for all rows); a row whose value means "off" comes out unchanged.
# ---------------------------------------------------------------------------------------------


def _per_row(value, logits: torch.Tensor) -> torch.Tensor:
    """A per-row value as a column [B, 1] on the logits' device (a number is broadcast)."""
    value = torch.as_tensor(value, dtype=logits.dtype, device=logits.device)
    return value.reshape(-1, 1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty) -> torch.Tensor:
    """HF RepetitionPenaltyLogitsProcessor: for ids in `seen` [B, V] (prompt + output), positive
    logits are divided by the penalty and negative ones multiplied, so penalty > 1 always
    makes a repeat less likely. Penalty 1 leaves the row unchanged."""
    penalty = _per_row(penalty, logits)
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        # Only the seen ids, through numpy: ~80 µs a token over a 151,936-token vocabulary where the
        # vocabulary-wide torch ops below take 430 (2026-12-06). The same float32 arithmetic.
        out = logits.clone()
        values, flags = out.numpy(), seen.cpu().numpy()
        for row, factor in enumerate(np.float32(penalty.flatten().numpy())):
            ids = np.flatnonzero(flags[row])
            x = values[row, ids]
            values[row, ids] = np.where(x < 0, x * factor, x / factor)
        return out
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence, frequency) -> torch.Tensor:
    """OpenAI penalties over output counts [B, V]: logit -= frequency * count + presence * (count > 0)."""
    counts = counts.to(logits.dtype)
    return logits - _per_row(frequency, logits) * counts - _per_row(presence, logits) * (counts > 0)


def apply_logit_bias(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add values[i] to logits[rows[i], ids[i]]: the biases of all rows as one sparse update."""
    return logits.index_put((rows, ids), values.to(logits), accumulate=True)


def apply_temperature(logits: torch.Tensor, temperature) -> torch.Tensor:
    """HF TemperatureLogitsWarper: logits / temperature (temperature > 0; greedy rows never get here)."""
    return logits / _per_row(temperature, logits)


def apply_top_k(logits: torch.Tensor, k) -> torch.Tensor:
    """HF TopKLogitsWarper: keep the tokens whose logit is >= the row's k-th largest; k = 0 is off.

    Ties: every token equal to the k-th largest logit is kept, so a row may keep more than k
    tokens (HF does the same). k larger than the vocabulary keeps everything.
    """
    # max_k must be a host int for topk: pass k as a CPU tensor (as `sample` does) or a number
    # so this costs no device sync. A k that keeps the whole vocabulary is off: no sort for nothing.
    k = torch.as_tensor(k, dtype=torch.long).reshape(-1)
    k = k.masked_fill(k >= logits.shape[-1], 0)
    max_k = int(k.max())
    if max_k == 0:
        return logits
    k = k.to(logits.device).expand(logits.shape[0]).reshape(-1, 1)
    kth_largest = logits.topk(max_k, dim=-1).values.gather(1, (k - 1).clamp(min=0))
    threshold = torch.where(k > 0, kth_largest, _NEG_INF)
    return logits.masked_fill(logits < threshold, _NEG_INF)


def apply_top_p(logits: torch.Tensor, p) -> torch.Tensor:
    """HF TopPLogitsWarper: keep the smallest set of most-probable tokens whose cumulative
    probability reaches p (at least one token always stays); p = 1 is off.

    Done as HF does it: sort ascending and drop the tokens whose cumulative probability from the
    bottom is <= 1 - p; ties are broken by torch.sort's order, as in HF.
    """
    p = _per_row(p, logits)
    sorted_logits, sorted_ids = logits.sort(dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= 1 - p
    remove[:, -1] = False  # the most probable token always stays
    # HF with p = 1 would still drop tokens of probability exactly 0; leaving those rows alone
    # keeps a row's result independent of its batch-mates.
    remove &= p < 1
    return logits.masked_fill(remove.scatter(1, sorted_ids, remove), _NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p) -> torch.Tensor:
    """HF MinPLogitsWarper: keep tokens with prob >= min_p * (the row's top prob); 0 is off.
    The top token always passes (min_p <= 1), so nothing else is needed to keep one."""
    probs = logits.softmax(dim=-1)
    threshold = _per_row(min_p, logits) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, _NEG_INF)


# ---------------------------------------------------------------------------------------------
# What the decode loop calls.
# ---------------------------------------------------------------------------------------------


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams], history: TokenHistory | None) -> torch.Tensor:
    """logits [B, V] float32 -> logits with penalties and logit_bias applied: the values logprobs
    are reported from (before temperature and filters).

    Never modifies `logits` in place; returns it as is when no row uses a penalty or a bias.
    `history` may be None only if no row uses a penalty.
    """
    _check_batch(logits, params, "params")
    repetition = [p.repetition_penalty for p in params]
    presence = [p.presence_penalty for p in params]
    frequency = [p.frequency_penalty for p in params]
    use_repetition = any(x != 1 for x in repetition)
    use_presence_frequency = any(presence) or any(frequency)
    if use_repetition or use_presence_frequency:
        if history is None:
            raise ValueError("repetition/presence/frequency penalties need a TokenHistory, but history is None")
        if history.seen.shape != logits.shape:
            raise ValueError(f"TokenHistory is {tuple(history.seen.shape)} but logits are {tuple(logits.shape)}")

    if use_repetition:
        logits = apply_repetition_penalty(logits, history.seen, repetition)
    if use_presence_frequency:
        logits = apply_presence_frequency(logits, history.counts, presence, frequency)
    biases = [(row, token, bias) for row, p in enumerate(params) for token, bias in (p.logit_bias or {}).items()]
    if biases:
        rows, ids, values = zip(*biases)
        logits = apply_logit_bias(logits, torch.tensor(rows, device=logits.device),
                                  torch.tensor(ids, device=logits.device), torch.tensor(values))
    return logits


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Processed logits [B, V] -> token ids [B] (long).

    Greedy rows (temperature 0) take the argmax and never touch their generator. The other rows
    go through temperature, top_k, top_p and min_p (each skipped when no row uses it) and are
    drawn with their own generator, so a seeded row's draws depend only on its seed and its own
    logits, not on the rest of the batch.
    """
    _check_batch(logits, params, "params")
    _check_batch(logits, generators, "generators")
    tokens = argmax(logits)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens

    # Rows with a top_k draw over their top-k tokens only; the others over the whole vocabulary.
    few = [i for i in rows if 0 < params[i].top_k <= MAX_CANDIDATES]
    for group, candidates in ((few, True), ([i for i in rows if i not in few], False)):
        if not group:
            continue
        index = torch.tensor(group, device=logits.device)
        drawn = _sample_rows(logits if len(group) == len(params) else logits[index],
                             [params[i] for i in group], [generators[i] for i in group], candidates)
        tokens = drawn if len(group) == len(params) else tokens.index_copy(0, index, drawn)
    return tokens


def _sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                 candidates: bool) -> torch.Tensor:
    vocab, ids = logits.shape[-1], None
    if candidates:
        logits, ids = top_k_candidates(logits, [p.top_k for p in params])
    logits = apply_temperature(logits, [p.temperature for p in params])
    if any(p.top_k > 0 for p in params):
        logits = apply_top_k(logits, torch.tensor([p.top_k for p in params]))
    if any(p.top_p < 1 for p in params):
        logits = apply_top_p(logits, [p.top_p for p in params])
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, [p.min_p for p in params])
    return _draw(logits.softmax(dim=-1), generators, vocab, ids)


MAX_CANDIDATES = 4096  # a larger top_k filters the whole vocabulary


def top_k_candidates(logits: torch.Tensor, top_k: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens top_k keeps in each row (k > 0; ties with the k-th included, as top_k keeps them),
    largest first: their logits [B, C] and ids [B, C], C the most any row keeps (past its own
    count, a row's candidates are tokens its top_k removes).

    Every filter after top_k leaves a token it removed at -inf, and -inf takes no share of a softmax,
    so top_p, min_p and the draw over these candidates give each token the probability they give it
    over the whole vocabulary. The chat defaults (top_k 20) then sort over 20 values instead of
    150k: ~1 ms a token instead of ~6 on a CPU.
    """
    k = torch.tensor(top_k).clamp(max=logits.shape[-1]).reshape(-1, 1)
    values, ids = logits.topk(int(k.max()), dim=-1)
    kept = int((logits >= values.gather(1, k.to(logits.device) - 1)).sum(dim=-1).max())
    if kept > values.shape[-1]:  # ties past the k-th
        values, ids = logits.topk(kept, dim=-1)
    return values, ids


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) for x [B, V]. On the CPU through numpy: its vectorised argmax takes 10 µs over a
    151,936-token row where torch's takes 134 (2026-12-06); both return the first maximum, NaN first."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and not (x.requires_grad or torch.compiler.is_compiling()):
        return torch.from_numpy(x.numpy().argmax(-1))
    return x.argmax(dim=-1)


def _draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None], vocab: int,
          ids: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row with probability probs[row] over the tokens `ids[row]` (None: the whole
    vocabulary), by the exponential race (as gpt-fast): argmax(p_i / E_i) with E_i ~ Exp(1) i.i.d.
    picks i with probability p_i (the Gumbel-max trick in disguise). Chosen over torch.multinomial
    because it is plain elementwise ops + argmax, so the draw never waits on the device.

    E = -log(1 - U), with one uniform U per token of the vocabulary (torch.rand is 5x faster on a
    CPU than Tensor.exponential_). Each row's numbers come from that row's generator (None: torch's
    global RNG), and a token always meets the number drawn for its id, so a seed reproduces
    regardless of batch composition, and of a tiny change in the logits that reorders the
    candidates. A batch with no generator at all draws in one call.
    """
    if all(generator is None for generator in generators):
        uniform = torch.rand(probs.shape[0], vocab, device=probs.device)  # nothing to reproduce
    else:
        uniform = torch.stack([torch.rand(vocab, generator=generator, device=probs.device)
                               for generator in generators])
    if ids is not None:
        uniform = uniform.gather(1, ids)
    noise = uniform.neg_().log1p_().neg_()
    # An exact 0 (U = 0) would give 0/0 = NaN on a filtered token, and argmax picks NaN.
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    drawn = argmax(probs / noise)
    return drawn if ids is None else ids.gather(1, drawn[:, None]).squeeze(1)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, top_n: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log_softmax of the processed logits [B, V]: the chosen tokens' logprobs [B] and, when
    top_n > 0, the top_n logprobs [B, n] (sorted descending) with their ids [B, n]; else None, None.
    top_n is capped at the vocabulary size."""
    if top_n < 0:
        raise ValueError(f"top_n={top_n!r} is invalid: must be an integer >= 0")
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens.to(logprobs.device).reshape(-1, 1).long()).squeeze(1)
    if top_n == 0:
        return chosen, None, None
    values, ids = logprobs.topk(min(top_n, logprobs.shape[-1]), dim=-1)
    return chosen, values, ids


def _check_batch(logits: torch.Tensor, per_row: Sequence, name: str) -> None:
    if logits.dim() != 2 or len(per_row) != logits.shape[0]:
        raise ValueError(f"logits must be [B, V] with one entry of {name} per row; "
                         f"got logits {tuple(logits.shape)} and {len(per_row)} {name}")
