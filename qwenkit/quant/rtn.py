"""Round-to-nearest quantizers: float weight [N, K] -> the portable integer tensors.

Both work through the rows in chunks, writing into preallocated results, so a large matrix (a
151936-row lm_head) never needs a full float32 copy or a second copy of its result. Scales (and
zero points) are rounded to their storage dtype *before* the weights are rounded against them,
so dequantizing the stored tensors reproduces exactly what the rounding aimed at.
"""

from __future__ import annotations

import torch

ROWS_PER_CHUNK = 4096  # 4096 x 4864 float32 is 80 MB of scratch at most


def _storable(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` in `dtype`, with zeros (all-zero rows, underflow) replaced by 1 so division is safe."""
    stored = scale.to(dtype)
    return torch.where(stored == 0, torch.ones_like(stored), stored)


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight ≈ q * scales[:, None], q in -127..127.

    Returns (q int8 [N, K], scales [N] in `scale_dtype`, default the weight's dtype).
    """
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=scale_dtype or weight.dtype, device=weight.device)
    for start in range(0, weight.shape[0], ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        w = weight[rows].float()
        scales[rows] = _storable(w.abs().amax(dim=1) / 127, scales.dtype)
        q[rows] = (w / scales[rows].float()[:, None]).round_().clamp_(-127, 127)
    return q, scales


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` inputs: weight ≈ (q - zeros) * scales, q in 0..15.

    Each group's min maps to q = 0 and its max to q = 15; the zero point is a float in q units,
    so neither end of the range is lost to rounding the zero point to an integer.
    Returns (q uint8 [N, K] unpacked, scales [N, K/g], zeros [N, K/g]), the last two in `scale_dtype`.
    """
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    q = torch.empty(n, k // group_size, group_size, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, k // group_size, dtype=scale_dtype or weight.dtype, device=weight.device)
    zeros = torch.empty_like(scales)
    for start in range(0, n, ROWS_PER_CHUNK):
        rows = slice(start, start + ROWS_PER_CHUNK)
        w = weight[rows].float().view(-1, k // group_size, group_size)
        lo, hi = w.amin(dim=-1), w.amax(dim=-1)
        scales[rows] = _storable((hi - lo) / 15, scales.dtype)
        scale = scales[rows].float()
        zeros[rows] = -lo / scale
        q[rows] = (w / scale[..., None] + zeros[rows].float()[..., None]).round_().clamp_(0, 15)
    return q.view(n, k), scales, zeros
