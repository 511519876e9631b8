"""AutoGPTQ / GPTQModel checkpoints (Qwen-7B-Chat-Int4, Qwen2.5-*-GPTQ-Int4) -> Int4Linear / Int8Linear.

The classic "gptq" layout (spec §8.1), per quantized linear with K inputs, N outputs, b bits:

    qweight  int32 [K·b/32, N]   b-bit values packed along K, low bits first
    qzeros   int32 [G, N·b/32]   zero points packed along N, stored minus one
    scales   fp16  [G, N]
    g_idx    int32 [K]           each input's group: k // group_size, or scattered with desc_act
    bias     [N]                 AutoGPTQ writes one for every layer, zeros where there was none

    W[n, k] = scales[g_idx[k], n] · (q[k, n] − (qzeros[g_idx[k], n] + 1))

4-bit layers become Int4Linear exactly: our zeros are floats in q units, so the stored zero + 1
is kept as it is (also the 16 that AutoGPTQ's "minus one" makes of a zero point of 0). Our
groups must be contiguous in K and of 32..256 inputs: act-order layers keep their inputs sorted
by group in `perm` (see Int4Linear), and a GPTQ group larger than 256 (group_size -1: one group
per row) is split into groups of the largest size our kernels take that divides it and K, with
the scale and zero repeated, which changes nothing. 8-bit layers become Int8Linear, whose one
symmetric scale per output channel holds a GPTQ layer exactly only when it is symmetric with one
group per row; otherwise the weights are dequantized and re-quantized per channel (rounding error
at most half a per-channel step, see quantize_int8).

Layers are converted one at a time as their tensors stream in, so memory stays near the size of
the quantized weights.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..checkpoint_names import canonical_modules
from ..config import ModelConfig
from ..errors import CheckpointError, UnsupportedModelError
from .linear import INT4_GROUP_SIZES, Int4Linear, Int8Linear, pack_int4
from .rtn import quantize_int8

QUANT_METHOD = "gptq"
QUANTIZE_CONFIG = "quantize_config.json"  # AutoGPTQ's own file, beside or instead of config.json's block
FORMAT = "gptq"  # the classic layout; gptq_v2 stores zero points without the minus one
BITS = (4, 8)
PARTS = ("qweight", "qzeros", "scales", "g_idx")


def gptq_config(directory: Path, config: ModelConfig) -> dict | None:
    """The checkpoint's GPTQ settings, checked and reduced to what loading needs:
    {"quant_method": "gptq", "bits", "group_size" (-1: one group per row), "act_order"}.

    Read from config.json's quantization_config when its quant_method is "gptq", else from
    quantize_config.json. None when the checkpoint is not a GPTQ one.
    """
    qconfig, source = config.extra.get("quantization_config"), "config.json quantization_config"
    if qconfig is None and (directory / QUANTIZE_CONFIG).is_file():
        source = str(directory / QUANTIZE_CONFIG)
        try:
            qconfig = json.loads((directory / QUANTIZE_CONFIG).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{source} is not valid JSON ({e}); re-download it") from e
        if isinstance(qconfig, dict):
            qconfig.setdefault("quant_method", QUANT_METHOD)  # AutoGPTQ's file predates the key
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != QUANT_METHOD:
        return None

    def unsupported(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{source}: {what} is not supported; qwenkit loads AutoGPTQ / GPTQModel checkpoints in the "
            f"classic layout (checkpoint_format \"gptq\", int32 packing) with bits 4 or 8")

    bits = qconfig.get("bits")
    if bits not in BITS:
        raise unsupported(f"bits={bits!r}")
    checkpoint_format = qconfig.get("checkpoint_format", qconfig.get("format", FORMAT))
    if checkpoint_format != FORMAT:
        raise unsupported(f"checkpoint_format {checkpoint_format!r}")
    if qconfig.get("is_marlin_format"):
        raise unsupported("the Marlin layout (is_marlin_format)")
    if qconfig.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
        raise unsupported(f"pack_dtype {qconfig['pack_dtype']!r}")
    # GPTQModel's per-module rules: "-pattern" only skips modules (seen in the tensors); others
    # override bits or group size per module, which this loader does not track.
    overrides = [rule for rule in qconfig.get("dynamic") or {} if not rule.startswith("-")]
    if overrides:
        raise unsupported(f"per-module overrides in \"dynamic\" ({', '.join(overrides)})")
    group_size = qconfig.get("group_size", 128)
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise CheckpointError(f"{source}: group_size {group_size!r} must be a positive integer or -1")
    return {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size,
            # Static groups are computed in the original column order: g_idx stays k // group_size.
            "act_order": bool(qconfig.get("desc_act")) and not qconfig.get("static_groups")}


def int4_group_size(in_features: int, gptq: dict) -> int:
    """Our group size for a GPTQ layer: the largest our kernels take that divides both its group
    size and K, so that each of our groups lies inside one GPTQ group."""
    span = in_features if gptq["group_size"] == -1 else gptq["group_size"]
    for size in sorted(INT4_GROUP_SIZES, reverse=True):
        if span % size == 0 and in_features % size == 0:
            return size
    raise UnsupportedModelError(
        f"GPTQ group_size {gptq['group_size']} with {in_features} inputs: qwenkit's int4 layers need groups "
        f"of {', '.join(map(str, INT4_GROUP_SIZES))} inputs, or a multiple of one of them that divides K")


def swap_in_layers(model: nn.Module, gptq: dict, tensor_names: Iterable[str]) -> nn.Module:
    """Replace the linears the checkpoint quantizes (those with a `qweight`) by empty Int4Linear /
    Int8Linear modules, in place, for the repacked tensors to be assigned to; returns the model."""
    modules = {canonical for name in tensor_names if name.endswith(".qweight")
               for canonical in canonical_modules(name.removesuffix(".qweight"), model.config)}
    for name in sorted(modules):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if type(linear) is not nn.Linear:
            raise CheckpointError(f"the checkpoint quantizes {name}, which is not a linear layer of this "
                                  "architecture: is config.json for these weights?")
        shape = (linear.in_features, linear.out_features, linear.bias is not None)
        if gptq["bits"] == 4:
            layer = Int4Linear(*shape, group_size=int4_group_size(linear.in_features, gptq),
                               dtype=linear.weight.dtype, device="meta", act_order=gptq["act_order"])
        else:
            layer = Int8Linear(*shape, dtype=linear.weight.dtype, device="meta")
        model.set_submodule(name, layer)
    if "lm_head" in modules and model.config.tie_word_embeddings:
        model.config.tie_word_embeddings = False  # the head has its own (quantized) weights
    return model


def repacked(tensors: Iterable[tuple[str, torch.Tensor]], gptq: dict, dtype: torch.dtype,
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's (name, tensor) pairs with each GPTQ linear's qweight / qzeros / scales /
    g_idx replaced by our layer's tensors as soon as all four have arrived; others pass through.

    `dtype`: what the float tensors will be cast to (int8 re-quantization rounds against scales
    in that dtype)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        module, _, part = name.rpartition(".")
        if part not in PARTS:
            yield name, tensor
            continue
        parts = pending.setdefault(module, {})
        parts[part] = tensor
        if len(parts) == len(PARTS):
            yield from _layer_tensors(module, pending.pop(module), gptq, dtype)
    for module, parts in pending.items():
        missing = [p for p in PARTS if p not in parts]
        if missing != ["g_idx"]:  # checkpoints older than AutoGPTQ's g_idx have trivial groups
            raise CheckpointError(f"the checkpoint has {', '.join(parts)} for the GPTQ layer {module} but no "
                                  f"{', '.join(missing)}: the download may be incomplete")
        yield from _layer_tensors(module, parts, gptq, dtype)


def _layer_tensors(module: str, parts: dict[str, torch.Tensor], gptq: dict, dtype: torch.dtype,
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    bits, qweight, qzeros, scales = gptq["bits"], parts["qweight"], parts["qzeros"], parts["scales"]
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    g_idx = parts.get("g_idx")
    if g_idx is None:
        g_idx = torch.arange(k) // (k if gptq["group_size"] == -1 else gptq["group_size"])
    groups = scales.shape[0]
    if (qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or tuple(g_idx.shape) != (k,)
            or tuple(qzeros.shape) != (groups, n * bits // 32) or scales.shape[1] != n
            or g_idx.min() < 0 or g_idx.max() >= groups):
        raise CheckpointError(
            f"the GPTQ tensors of {module} do not fit together as {bits}-bit: qweight {_desc(qweight)}, qzeros "
            f"{_desc(qzeros)}, scales {_desc(scales)}, g_idx {_desc(g_idx)}; is quantize_config.json for them?")
    q = unpack(qweight.t(), bits)  # [N, K]
    zeros = unpack(qzeros, bits)[:, :n] + 1  # [G, N], the stored minus one undone
    if bits == 4:
        layer = repack_int4(q, zeros, scales, g_idx, int4_group_size(k, gptq), gptq["act_order"], module)
    else:
        layer = repack_int8(q, zeros, scales, g_idx, dtype)
    for attr, tensor in layer.items():
        yield f"{module}.{attr}", tensor


def _desc(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., W] holding 32/bits values per word, low bits first -> int32 [..., W·32/bits]."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def repack_int4(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                group_size: int, act_order: bool, module: str = "layer") -> dict[str, torch.Tensor]:
    """GPTQ values q [N, K], zero points [G, N] (as used: stored + 1), scales [G, N] and g_idx [K]
    -> Int4Linear's qweight, scales, zeros [N, K/group_size] (and perm with act_order)."""
    order = torch.argsort(g_idx, stable=True)
    in_order = bool((order == torch.arange(len(order))).all())
    if not act_order and not in_order:
        raise CheckpointError(f"{module}: g_idx scatters the groups over the inputs (act-order) but the "
                              "quantize config has desc_act false (or static_groups true)")
    ours = g_idx[order].view(-1, group_size)  # each of our groups: which GPTQ group its inputs are in
    if not (ours == ours[:, :1]).all():
        raise CheckpointError(f"{module}: the GPTQ groups in g_idx are not runs of {group_size} inputs; "
                              "is group_size in the quantize config right?")
    group = ours[:, 0].long()
    layer = {"qweight": pack_int4(q if in_order else q[:, order]),
             "scales": scales[group].t().contiguous(),
             "zeros": zeros[group].t().float().contiguous()}
    if act_order:
        layer["perm"] = order.int()
    return layer


def repack_int8(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """GPTQ 8-bit values q [N, K], zero points [G, N] (stored + 1), scales [G, N] and g_idx [K]
    -> Int8Linear's weight and scales: exact when symmetric with one scale per output channel,
    otherwise re-quantized per channel from the dequantized weights."""
    if (zeros == 128).all() and (scales == scales[:1]).all():
        return {"weight": (q - 128).to(torch.int8), "scales": scales[0].contiguous()}
    weight, channel_scales = quantize_int8(dequantize(q, zeros, scales, g_idx), dtype)
    return {"weight": weight, "scales": channel_scales}


def dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """W [N, K] float32 from GPTQ values q [N, K], zero points [G, N] (stored + 1), scales [G, N], g_idx [K]."""
    group = g_idx.long()
    return scales.float()[group].t() * (q - zeros[group].t()).float()
