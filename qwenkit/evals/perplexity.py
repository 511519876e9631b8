"""Perplexity of a model on a token stream, scored in windows."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..model import Model


@torch.no_grad()
def perplexity(model: Model, ids: Sequence[int] | torch.Tensor, seq_len: int = 512, stride: int | None = None) -> float:
    """exp(mean negative log-likelihood) of the tokens of `ids`, scored in windows of `seq_len`.

    Windows start `stride` apart (default `seq_len`: no overlap). Each scores the tokens that no
    earlier window did and that have context inside it (so with no overlap the first token of each
    window goes unscored, as in transformers' perplexity recipe). A smaller stride gives the scored
    tokens more context: closer to the model's best, and seq_len/stride times slower.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    n, stride = ids.numel(), stride or seq_len
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must be in 1..seq_len ({seq_len}), not {stride}")
    if n < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    nll, scored, scored_until = 0.0, 0, 1  # tokens before scored_until are done (token 0 never is)
    for begin in range(0, n - 1, stride):
        end = min(begin + seq_len, n)
        window = ids[begin:end].to(model.device)
        new = min(end - scored_until, window.numel() - 1)
        logits = model(window[None])[0, -new - 1:-1].float()
        nll += float(F.cross_entropy(logits, window[-new:], reduction="sum"))
        scored, scored_until = scored + new, end
        if end == n:
            break
    return math.exp(nll / scored)
