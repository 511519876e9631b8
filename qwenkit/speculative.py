"""Speculative decoding: a draft of the next few tokens, checked by the model in one forward (generate.Decoder).

Two drafters propose tokens for a sequence decoding alone:
- `PromptLookup(n)`: what followed the latest earlier occurrence of the sequence's last 1-3 tokens (code edits,
  quotes and summaries repeat their input); no second model.
- `DraftModel(model, tokenizer, n)`: a smaller model sharing the tokenizer (e.g. Qwen2.5-0.5B-Instruct for
  Qwen2.5-7B-Instruct) drafts greedily, in its own one-row KV cache that keeps what it computed last time.

Both drafts are deterministic proposals, so the one-token acceptance rule (`verify_draft_token`: keep a draft
token with its probability under the model, else draw from the other tokens renormalized) keeps sampling's
distribution exactly; greedy decoding keeps every draft token the model would have chosen itself. A draft
only changes the speed, never the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import QwenkitError
from .model import Model
from .runtime.decode import decode_step
from .sampling import SamplingParams, argmax
from .tokenizer import Tokenizer


@dataclass
class DraftStats:
    """What a decoder's drafts did: speculative steps, tokens they emitted, draft tokens proposed and kept."""
    steps: int = 0
    emitted: int = 0
    proposed: int = 0
    accepted: int = 0

    def report(self) -> dict:
        return {"draft_steps": self.steps,
                "draft_tokens_per_step": round(self.emitted / self.steps, 2) if self.steps else 0.0,
                "draft_acceptance": round(self.accepted / self.proposed, 3) if self.proposed else 0.0}


def _check_count(n: int) -> int:
    if not isinstance(n, int) or n < 1:
        raise QwenkitError(f"a draft needs at least 1 token to propose, not {n!r}")
    return n


class PromptLookup:
    """Drafts up to `n` tokens by prompt lookup (`lookup_draft`)."""

    def __init__(self, n: int):
        self.n = _check_count(n)

    def __str__(self) -> str:
        return f"prompt lookup, {self.n} tokens"

    def propose(self, tokens: list[int], room: int, max_len: int) -> list[int]:
        return lookup_draft(tokens, min(self.n, room))


class DraftModel:
    """Drafts up to `n` tokens greedily with a smaller model of the same tokenizer (`check_same_tokenizer`).

    Its cache row holds the tokens it was last fed; the next draft feeds only what follows their common prefix
    with the sequence (the tokens the model kept, and its own next one), so a draft costs about n one-token steps
    of the small model."""

    def __init__(self, model: Model, tokenizer: Tokenizer, n: int = 4, target: Tokenizer | None = None,
                 name: str = "draft model"):
        if target is not None:
            check_same_tokenizer(tokenizer, target)
        self.model, self.vocab_size, self.n, self.name = model, tokenizer.vocab_size, _check_count(n), name
        self.cache = None
        self.step = None
        self.held: list[int] = []  # the tokens whose keys and values the cache row holds

    def __str__(self) -> str:
        return f"{self.name}, {self.n} tokens"

    @torch.inference_mode()
    def propose(self, tokens: list[int], room: int, max_len: int) -> list[int]:
        n = min(self.n, room)
        max_len = min(max_len, self.model.config.context_length)
        if n < 1 or len(tokens) + n > max_len:
            return []
        if self.cache is None or self.cache.max_len < max_len:
            self.cache, self.held = self.model.new_cache(1, max_len), []
            self.step = decode_step(self.model, self.cache)
        keep = min(common_prefix(self.held, tokens), len(tokens) - 1)
        device = self.model.device
        ids = torch.tensor([tokens[keep:]], device=device)
        logits = self.model(ids, torch.arange(keep, len(tokens)), self.cache.rows(0, 1), last_only=True)[:, -1]
        draft = [self._greedy(logits)]
        for pos in range(len(tokens), len(tokens) + n - 1):
            logits = self.step(torch.tensor([[draft[-1]]], device=device), torch.tensor([[pos]]),
                               self.cache.rows(0, 1))[:, -1]
            draft.append(self._greedy(logits))
        self.held = tokens + draft[:-1]
        return draft

    def _greedy(self, logits: torch.Tensor) -> int:
        return int(argmax(logits[:, :self.vocab_size].float())[0])


Drafter = PromptLookup | DraftModel


def check_same_tokenizer(draft: Tokenizer, target: Tokenizer) -> None:
    """A draft's token ids must mean the model's: the same byte-level vocabulary and split pattern, and the same
    ids for the special tokens both have."""
    differs = []
    if draft._ranked != target._ranked:
        other = sum(target._ranked.get(piece) != i for piece, i in draft._ranked.items())
        differs.append(f"{other + max(0, len(target._ranked) - len(draft._ranked))} vocabulary tokens differ")
    if draft.pattern != target.pattern:
        differs.append("its pre-tokenizer pattern differs")
    specials = [s for s, i in draft.special_tokens.items() if target.special_tokens.get(s, i) != i]
    if specials:
        differs.append(f"special tokens {', '.join(specials[:3])} have other ids")
    if differs:
        raise QwenkitError(f"the draft model's tokenizer is not the model's ({'; '.join(differs)}): a draft must "
                           "share the model's tokenizer, e.g. Qwen2.5-0.5B-Instruct for Qwen2.5-7B-Instruct")


def lookup_draft(tokens: list[int], n: int, max_ngram: int = 3) -> list[int]:
    """Up to `n` tokens that followed the latest earlier occurrence of the sequence's last 3, 2 or 1 tokens
    (prompt lookup: code edits and summaries repeat their input)."""
    seq = np.asarray(tokens)
    for size in range(min(max_ngram, len(seq) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], size)
        found = np.flatnonzero((windows == seq[-size:]).all(axis=1))
        if len(found):
            start = int(found[-1]) + size
            return seq[start:start + n].tolist()
    return []


def verify_draft_token(logits: torch.Tensor, proposed: int | None, params: SamplingParams,
                       generator: torch.Generator | None) -> int:
    """The token to emit at a position whose processed `logits` are known and whose draft token is
    `proposed` (None past the draft): greedy, the model's own choice; sampled, `proposed` with its
    probability, else a draw from the other tokens renormalized (exactly the model's distribution)."""
    if params.greedy:
        return int(argmax(logits[None])[0])
    probs = torch.softmax(logits, dim=-1)
    if proposed is not None:
        if float(torch.rand((), generator=generator, device=probs.device)) < float(probs[proposed]):
            return proposed
        probs = probs.clone()
        probs[proposed] = 0
    return int(torch.multinomial(probs, 1, generator=generator))


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
