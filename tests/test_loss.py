"""qwenkit.train.loss.cross_entropy against F.cross_entropy(logits.float(), targets): values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from qwenkit.train import loss as loss_module
from qwenkit.train.loss import cross_entropy


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("block_bytes", [4 << 20, 3 * 4 * 1000])  # one block; blocks of 3 rows (and a last of 1)
def test_matches_torch(monkeypatch, dtype, reduction, block_bytes):
    monkeypatch.setattr(loss_module, "BLOCK_BYTES", block_bytes)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(10, 1000, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 1000, (10,), generator=gen)
    targets[3] = targets[4]  # repeated targets, and the largest logit as a target
    targets[5] = int(logits[5].argmax())
    grad_out = torch.tensor(0.7)

    ours_in = logits.clone().requires_grad_()
    ours = cross_entropy(ours_in, targets, reduction)
    ours.backward(grad_out)
    ref_in = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_in.float(), targets, reduction=reduction)
    ref.backward(grad_out)

    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    assert ours_in.grad.dtype == dtype
    # fp32 gradients agree to rounding; bf16 ones round the same fp32 values, a last-bit flip at most
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **tol)


def test_refuses_bad_shapes_and_reduction():
    logits, targets = torch.zeros(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, targets, "none")
    with pytest.raises(ValueError, match=r"logits \[n, vocab\]"):
        cross_entropy(logits[None], targets)
    with pytest.raises(ValueError, match=r"targets \[n\]"):
        cross_entropy(logits, targets[:3])
