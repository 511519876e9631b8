"""GPTQ (Frantar et al. 2022, as AutoGPTQ runs it): quantize each linear so that its *outputs* on
calibration data move as little as possible, instead of rounding each weight on its own (RTN).

Per linear with inputs X (tokens x K): H = 2·XᵀX/n. Columns are quantized one at a time, left to
right, and each column's rounding error is spread over the columns not yet quantized in the way
that H says cancels it best (the inverse Hessian's Cholesky factor gives the weights). Updates go
to the rest of the current block of 128 columns at once and to the columns after it once per
block ("lazy batch"), so the work is a few GEMMs per block. Damping adds 1 % of H's mean diagonal;
columns whose input is always zero ("dead") are zeroed and skipped.

The grids are those of RTN (`rtn.py`), so the results are plain Int4Linear / Int8Linear layers:
int4 asymmetric per group of `group_size` inputs (scale and zero from the group's min and max),
int8 symmetric per output channel. Int4 groups without act-order take their scale and zero from
the weights as updated so far, as AutoGPTQ does. Act-order (`desc_act`) quantizes the columns in
order of decreasing H diagonal (the inputs with the most energy first) but keeps each group's
columns contiguous in the original order — AutoGPTQ's "static groups": every group's scale and
zero come from the original weights before any column is quantized, so no permutation is stored.

The model is processed block by block, so only one block's Hessians and the calibration
activations are in memory at a time: the calibration batches run through the embedding, then each
block's linears see the block's inputs (q/k/v share one Hessian, gate/up another), are quantized,
and the quantized block's outputs become the next block's inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import QwenkitError
from ..model import Model
from ..progress import progress
from ..runtime.packed import unpack_linears
from .convert import check_settings, quantize_model
from .linear import Int4Linear, Int8Linear, frozen, pack_int4
from .rtn import quantize_int4, quantize_int8

DAMP_PERCENT = 0.01
BLOCK_SIZE = 128
# Linears of a decoder block that read the same input share its Hessian: name -> the one measuring it.
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


@torch.no_grad()
def gptq_quantize_model(model: Model, calibration: torch.Tensor, bits: int = 4, group_size: int = 128,
                        act_order: bool = False, lm_head_bits: int | None = 8, batch_size: int = 8,
                        damp_percent: float = DAMP_PERCENT, show_progress: bool = True) -> Model:
    """GPTQ-quantize the decoder blocks' linears of `model` in place; returns the model.

    calibration: token ids [N, L], N sequences of L tokens.
    bits, group_size: 4 (asymmetric, per group of 32/64/128/256 inputs) or 8 (symmetric per channel).
    act_order: quantize columns by decreasing Hessian diagonal (static groups; see module docstring).
    lm_head_bits: the head is rounded to nearest (8, 4, or None to keep it float), as quantize_model
        does, untying it from the embedding if they were tied.
    batch_size: calibration sequences per forward pass.
    """
    check_settings(bits, group_size, lm_head_bits)
    unpack_linears(model)  # GPTQ reads and replaces plain nn.Linear (a CPU load packs them)
    if calibration.dim() != 2 or calibration.numel() == 0:
        raise QwenkitError("calibration ids must be a non-empty [sequences, tokens] tensor, "
                           f"not {tuple(calibration.shape)}")
    captured = [_block_inputs(model, batch.to(model.device)) for batch in calibration.split(batch_size)]
    inputs = [x for x, _, _ in captured]
    call_args = [(args, kwargs) for _, args, kwargs in captured]
    del captured
    layers = model.model.layers
    with progress("GPTQ", len(layers), show=show_progress) as advance:
        for block in layers:
            hessians = _hessians(block, inputs, call_args)
            for name, linear in list(block.named_modules()):
                if type(linear) is not nn.Linear:
                    continue
                if bits == 4 and linear.in_features % group_size:
                    warnings.warn(f"{name} stays in float: its {linear.in_features} inputs are not a multiple of "
                                  f"the int4 group size {group_size}", stacklevel=2)
                    continue
                H = hessians[SHARED_INPUT.get(name, name)]
                block.set_submodule(name, gptq_linear(linear, H, bits, group_size, act_order, damp_percent))
            del hessians
            inputs = [block(x, *args, **kwargs) for x, (args, kwargs) in zip(inputs, call_args)]
            advance()
    return quantize_model(model, bits, group_size, lm_head_bits, skip=["model.*"])


class _Captured(Exception):
    """Raised by the hook on the first block once it has its inputs: nothing after it needs to run."""


def _block_inputs(model: Model, tokens: torch.Tensor) -> tuple[torch.Tensor, tuple, dict]:
    """What the first decoder block receives for `tokens`: its hidden states and its other arguments
    (RoPE tables, positions, ...), exactly as the model computes them."""
    captured = {}

    def hook(module, args, kwargs):
        captured["x"], captured["args"], captured["kwargs"] = args[0], args[1:], kwargs
        raise _Captured

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.model(tokens)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["x"], captured["args"], captured["kwargs"]


def _hessians(block: nn.Module, inputs: Sequence[torch.Tensor], call_args: Sequence[tuple]) -> dict[str, torch.Tensor]:
    """H = 2·XᵀX/n for the input X of each linear in `block` (one per shared input), in float32."""
    hessians, counts, handles = {}, {}, []
    for name, linear in block.named_modules():
        if type(linear) is not nn.Linear or name in SHARED_INPUT:
            continue
        hessians[name] = torch.zeros(linear.in_features, linear.in_features, device=linear.weight.device)
        counts[name] = 0

        def accumulate(module, args, name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            hessians[name].addmm_(x.T, x)
            counts[name] += x.shape[0]

        handles.append(linear.register_forward_pre_hook(accumulate))
    try:
        for x, (args, kwargs) in zip(inputs, call_args):
            block(x, *args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: H.mul_(2 / counts[name]) for name, H in hessians.items()}


def gptq_linear(linear: nn.Linear, H: torch.Tensor, bits: int = 4, group_size: int = 128,
                act_order: bool = False, damp_percent: float = DAMP_PERCENT) -> Int4Linear | Int8Linear:
    """One linear quantized by GPTQ against the Hessian H [K, K] of its inputs."""
    q, scales, zeros = gptq_quantize(linear.weight, H, bits, group_size, act_order, damp_percent)
    n, k = linear.weight.shape
    dtype, device = linear.weight.dtype, linear.weight.device
    if bits == 4:
        layer = Int4Linear(k, n, linear.bias is not None, group_size, dtype, "meta")
        layer.qweight, layer.zeros = frozen(pack_int4(q)), frozen(zeros)
    else:
        layer = Int8Linear(k, n, linear.bias is not None, dtype, "meta")
        layer.weight = frozen(q)
    layer.scales = frozen(scales)
    if linear.bias is not None:
        layer.bias = frozen(linear.bias.detach())
    return layer.to(device)


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128,
                  act_order: bool = False, damp_percent: float = DAMP_PERCENT,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The GPTQ algorithm on one weight [N, K] with input Hessian H [K, K].

    Returns the integer weights in the layout of the RTN quantizers: int4 (q uint8 [N, K] in 0..15,
    scales [N, K/g], zeros [N, K/g]) or int8 (q int8 [N, K], scales [N], None), scales and zeros
    in the weight's dtype; W ≈ (q − zeros)·scales per group, or q·scales per row.
    """
    n, k = weight.shape
    # Transposed, [K, N]: each column GPTQ visits is a contiguous row, which the CPU loop reads much faster.
    Wt = weight.detach().float().T.contiguous()
    H = H.float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    Wt[dead] = 0

    # The grid: per group, the scale and zero (in q units) of each output, transposed [groups, N].
    # Int8 (one group) and act-order groups take them from the weights before any update; other int4
    # groups from the weights as updated when quantizing reaches them.
    if bits == 8:
        qmin, qmax = -127, 127
        _, row_scales = quantize_int8(Wt.T, weight.dtype)
        grid_scale, grid_zero = row_scales.float()[None], torch.zeros(1, n, device=Wt.device)
        group_of = torch.zeros(k, dtype=torch.long)
    else:
        qmin, qmax = 0, 15
        grid_scale = torch.empty(k // group_size, n, device=Wt.device)
        grid_zero = torch.empty_like(grid_scale)
        if act_order:
            _, scales, zeros = quantize_int4(Wt.T, group_size, weight.dtype)
            grid_scale[:], grid_zero[:] = scales.T.float(), zeros.T.float()
        group_of = torch.arange(k) // group_size

    perm = torch.argsort(H.diagonal(), descending=True).cpu() if act_order else torch.arange(k)
    Wt, H, group_of = Wt[perm.to(Wt.device)], H[perm][:, perm], group_of[perm].tolist()
    Hinv = _inverse_hessian_factor(H, damp_percent)

    Qt = torch.zeros_like(Wt)
    dynamic_groups = bits == 4 and not act_order
    block_size = max(BLOCK_SIZE, group_size)  # a group never straddles two blocks
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, Err1, Hinv1 = Wt[i1:i2].clone(), torch.zeros_like(Wt[i1:i2]), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, g = i1 + i, group_of[i1 + i]
            if dynamic_groups and col % group_size == 0:
                _, scales, zeros = quantize_int4(W1[i:i + group_size].T, group_size, weight.dtype)
                grid_scale[g], grid_zero[g] = scales[:, 0].float(), zeros[:, 0].float()
            w, scale, zero = W1[i], grid_scale[g], grid_zero[g]
            q = (w / scale + zero).round_().clamp_(qmin, qmax)
            Qt[col] = q
            err = (w - (q - zero) * scale) / Hinv1[i, i]
            W1[i:] -= Hinv1[i, i:, None] * err
            Err1[i] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].T @ Err1

    Q = Qt[torch.argsort(perm).to(Qt.device)].T
    if bits == 8:
        return Q.to(torch.int8), row_scales, None
    return Q.to(torch.uint8), grid_scale.T.to(weight.dtype), grid_zero.T.to(weight.dtype)


def _inverse_hessian_factor(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping·I)⁻¹ = UᵀU: row i holds how column i's error spreads
    to the columns after it. U = J·L⁻¹·J where L = cholesky(J·H·J) and J reverses the order, which
    costs a Cholesky and a triangular solve instead of a full inverse (faster; benchmarks/results/README.md,
    "Quality of each quantization")."""
    H = H.clone()
    H.diagonal().add_(damp_percent * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H.flip(0, 1))
    if info:
        raise QwenkitError("GPTQ: the calibration inputs' Hessian is not positive definite even with damping; "
                           "use more (or more varied) calibration data")
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
