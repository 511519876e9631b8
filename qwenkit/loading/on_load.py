"""Quantize while loading: each linear weight becomes its quantized layer as soon as it is read.

`qwenkit.load(..., quantize=MODE)` hands every linear weight it reads to `quantized_linear`, so the
float model never exists: memory peaks near the quantized weights plus a few MiB of scratch. A
weight is a float tensor (a Hugging Face checkpoint) or a GGUF `StoredTensor`, converted a chunk of
rows at a time (a 151936-row head is never expanded to float whole).

What each mode makes of a linear weight, by how it is stored:

| stored as                                | int8 | int4            | gguf            |
|------------------------------------------|------|-----------------|-----------------|
| float (HF checkpoint, GGUF F32/F16/BF16) | int8 | int4 g128       | float           |
| GGUF Q4_0, Q4_1, Q4_K                    | int8 | int4 g32, exact | int4 g32, exact |
| GGUF Q5_0, Q5_1, Q5_K, Q6_K, Q8_0        | int8 | int4 g128       | int8            |

int8 is symmetric per output channel and int4 g128 asymmetric, both round-to-nearest from the
(dequantized) values. The lm_head is int8 under int8 and int4 (see convert.py for why) and follows
the table under gguf, which keeps a file's own precision mix: its 4-bit blocks exactly, the wider
ones in int8, which adds little to their own rounding error (benchmarks/results/README.md, "Quality
of each quantization").

The token embedding stays float, except under gguf, where a block-quantized table becomes int8 rows
(Int8Embedding: half the bytes of bfloat16), sharing a tied int8 head's table.

The 4-bit formats store, per group of 32 inputs, codes q in 0..15 with w = scale·q − offset
(Q4_K: scale = d·sc, offset = dmin·m). Int4Linear's w = (q − zero)·scale holds that exactly with
zero = offset / scale. A group with scale 0 is the constant −offset: q = 0, zero = 1, scale = offset.
"""

from __future__ import annotations

import warnings

import torch
from gguf.constants import GGML_QUANT_SIZES
from torch import nn

from ..quant.embedding import Int8Embedding
from ..quant.linear import Int4Linear, Int8Linear, QuantizedLinear, pack_int4
from ..quant.rtn import quantize_int4, quantize_int8
from .gguf import FLOAT_TYPES, FOUR_BIT_GROUPS, StoredTensor

QUANTIZE_MODES = ("int8", "int4", "gguf")
RTN_GROUP_SIZE = 128  # int4 group size when rounding (exact GGUF blocks keep their 32)
_CHUNK_VALUES = 1 << 20  # weights converted per step: 4 MiB of float32 scratch, reused


def quantized_linear(name: str, weight: torch.Tensor | StoredTensor, mode: str,
                     dtype: torch.dtype) -> QuantizedLinear | None:
    """The layer (without bias) that the linear weight `name` becomes under `mode`, or None where it
    stays float. Rounded layers keep their scales in `dtype`, exact ones in float32."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize={mode!r}: use None, {', '.join(map(repr, QUANTIZE_MODES))}")
    qtype = weight.qtype if isinstance(weight, StoredTensor) else None
    if qtype in FOUR_BIT_GROUPS and (mode == "gguf" or (mode == "int4" and name != "lm_head.weight")):
        return int4_from_blocks(weight)
    if mode == "gguf" and (qtype is None or qtype in FLOAT_TYPES):
        return None
    if mode == "int4" and name != "lm_head.weight":
        if weight.shape[1] % RTN_GROUP_SIZE:
            warnings.warn(f"{name} stays in float: its {weight.shape[1]} inputs are not a multiple of "
                          f"the int4 group size {RTN_GROUP_SIZE}", stacklevel=2)
            return None
        return requantize(weight, 4, dtype)
    return requantize(weight, 8, dtype)


def quantized_embedding(weight: torch.Tensor | StoredTensor, mode: str, dtype: torch.dtype,
                        head: nn.Module | None = None) -> Int8Embedding | None:
    """The token embedding under `mode`, or None where it stays float. Only gguf quantizes it: a
    block-quantized table becomes int8 rows, the tied int8 head's own table when there is one. Under
    int8 and int4 it stays float, as fine-tuning (LoRA on the embedding, Q-LoRA) needs it."""
    if mode != "gguf" or not isinstance(weight, StoredTensor) or weight.qtype in FLOAT_TYPES:
        return None
    return Int8Embedding.from_int8_linear(head if isinstance(head, Int8Linear) else requantize(weight, 8, dtype))


@torch.no_grad()
def requantize(weight: torch.Tensor | StoredTensor, bits: int, dtype: torch.dtype,
               group_size: int = RTN_GROUP_SIZE) -> QuantizedLinear:
    """Round-to-nearest int8 (per channel) or int4 (per group) of a float or GGUF weight, by rows."""
    n, k = weight.shape
    if bits == 8:
        layer = Int8Linear(k, n, bias=False, dtype=dtype, device="cpu")
    else:
        layer = Int4Linear(k, n, bias=False, group_size=group_size, dtype=dtype, device="cpu")
    for rows in _row_chunks(n, k):
        w = weight.dequantize(torch.float32, rows) if isinstance(weight, StoredTensor) else weight[rows]
        if bits == 8:
            layer.weight[rows], layer.scales[rows] = quantize_int8(w, dtype)
        else:
            q, layer.scales[rows], layer.zeros[rows] = quantize_int4(w, group_size, dtype)
            layer.qweight[rows] = pack_int4(q)
    return layer


@torch.no_grad()
def int4_from_blocks(weight: StoredTensor) -> Int4Linear:
    """A Q4_0 / Q4_1 / Q4_K weight as Int4Linear with group size 32, exactly (see the module docstring).

    Scales and zeros stay float32: in bfloat16 they would add error to the exact weights (see
    benchmarks/results/README.md, "Quality of each quantization") to save 4 bytes per 32 weights.
    The kernels round them to the activation dtype anyway, but then as one (scale, offset) pair,
    rounded once."""
    n, k = weight.shape
    groups_of, type_size = FOUR_BIT_GROUPS[weight.qtype], GGML_QUANT_SIZES[weight.qtype][1]
    layer = Int4Linear(k, n, bias=False, group_size=32, dtype=torch.float32, device="cpu")
    for rows in _row_chunks(n, k):
        q, scale, offset = groups_of(weight.raw(rows).view(-1, type_size))
        q, scale, offset = q.view(-1, 32), scale.reshape(-1, 1), offset.reshape(-1, 1)
        constant = scale == 0
        q = q.masked_fill(constant, 0)
        zero = torch.where(constant, 1.0, offset / scale)
        scale = torch.where(constant, offset, scale)
        count = q.numel() // k
        layer.qweight[rows] = pack_int4(q.view(count, k))
        layer.scales[rows], layer.zeros[rows] = scale.view(count, -1), zero.view(count, -1)
    return layer


def _row_chunks(n: int, k: int):
    step = max(1, _CHUNK_VALUES // k)
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))
