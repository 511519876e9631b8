"""Cross entropy over a large vocabulary without fp32 copies of the whole logits tensor.

`F.cross_entropy(logits.float(), targets)`, the usual way to take the loss of bf16 logits in fp32,
makes four [n, vocab] fp32 tensors a step: the upcast, log_softmax's output, nll's zero-filled
gradient and log_softmax's gradient (~270 MB each for 444 label tokens of Qwen's 152k vocabulary),
and then casts the gradient back. `cross_entropy` upcasts a few rows at a time instead: the log-sum-exp
of each row in the forward, softmax − one-hot written straight into a gradient of the logits' dtype
in the backward. The values are the same (in fp32, up to summation order), in far less time and
memory (benchmarks/results/README.md, "Fine-tuning against transformers + peft").
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..datasets import predicting_positions

BLOCK_BYTES = 4 << 20  # fp32 rows upcast at once: cache-sized


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy of `logits` [n, vocab] (any float dtype) against `targets` [n], computed in fp32:
    the mean (or, with reduction="sum", the sum) over the n rows. Every target must be a valid id."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy takes logits [n, vocab] and targets [n], not {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    return _CrossEntropy.apply(logits, targets, reduction == "mean")


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of logits [B, T, vocab]: the logits at t predict labels[t + 1]
    (IGNORE_INDEX ignored)."""
    mask, targets = predicting_positions(labels)
    return cross_entropy(logits[mask], targets)


def _row_blocks(logits: torch.Tensor):
    step = max(1, BLOCK_BYTES // (4 * logits.shape[1]))
    return (slice(r, r + step) for r in range(0, logits.shape[0], step))


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, mean: bool) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for rows in _row_blocks(logits):
            lse[rows] = logits[rows].float().logsumexp(-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, targets, lse)
        ctx.mean = mean
        losses = lse - picked
        return losses.mean() if mean else losses.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        scale = grad / logits.shape[0] if ctx.mean else grad
        out = torch.empty_like(logits)
        for rows in _row_blocks(logits):
            probs = logits[rows].float().sub_(lse[rows, None]).exp_()  # softmax
            probs[torch.arange(probs.shape[0], device=probs.device), targets[rows]] -= 1
            out[rows] = probs.mul_(scale)
        return out, None, None
