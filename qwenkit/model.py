"""The dense Qwen transformer (v1, 1.5, 2, 2.5, 3) in plain PyTorch.

Module names follow Hugging Face Qwen2 (`model.layers.N.self_attn.q_proj`, ...) so state dicts
and LoRA adapters interoperate with transformers and peft. Quantized linears, LoRA and tensor
parallelism are applied from outside by swapping modules; nothing here knows about them.

Positions are explicit: every forward takes `input_pos` ([T] shared by the batch, or [B, T]
per row) and, when a `KVCache` is passed, writes keys and values at those positions and attends
to everything the cache holds up to them. Prefill and single-token decode are the same call.
Positions may stay on the host (a CPU tensor) for a GPU model: the forward reads how far it
attends from them, so a decode loop can queue its next step without waiting for the last.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig, attention_windows_of, rope_scaling_of
from .errors import ConfigError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before scaling, as every Qwen generation does
        # (F.rms_norm computes x * rsqrt(mean(x²) + eps), the same arithmetic in one call).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


class Int8KV(NamedTuple):
    """Keys or values as an int8 KVCache holds them: int8 `values` [B, G, L, D] and float32 `scales` [B, G, L, 1]."""
    values: torch.Tensor
    scales: torch.Tensor

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.values * self.scales).to(dtype)


class KVCache:
    """Preallocated keys/values, one [batch, kv_heads, max_len, head_dim] tensor per layer, written
    by position; a forward attends to the first `length` positions.

    A layer with an attention window shorter than `max_len` keeps a ring of `window` positions instead
    (`ring[layer]`, position p in slot p % window): its memory stays bounded however long the sequence.
    With `int8`, keys and values are stored as int8 with one float32 scale per row, head and position
    (symmetric, absmax / 127), dequantized to `dtype` as they are read: about half a bf16 cache's memory.
    Keys are stored less a per-row, per-head vector (`k_center`: the mean of the first keys a row's prefill
    writes), which moves every score of a query by the same amount, so leaves attention as it was: Qwen's keys
    carry large per-channel offsets (their bias) that would otherwise take most of the int8 range.

    One tensor per layer rather than a slice of a shared one: torch.compile writes a whole tensor
    it is passed in place, but copies the whole of one that a write reaches through a view.
    `ntk_alpha` holds each row's dynamic-NTK alpha, fixed when that row is prefilled and reused by
    its decode steps (Qwen v1 semantics), on the host.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str | list, int8: bool = False):
        """`device`: one for every layer, or a list with each layer's (a model split over devices)."""
        windows = config.attention_windows or [None] * config.num_layers
        self.ring = [w if w is not None and w < max_len else None for w in windows]
        shapes = [(batch_size, config.num_kv_heads, ring or max_len, config.head_dim) for ring in self.ring]
        devices = device if isinstance(device, (list, tuple)) else [device] * config.num_layers
        stored = torch.int8 if int8 else dtype
        self.k = [torch.zeros(shape, dtype=stored, device=d) for shape, d in zip(shapes, devices)]
        self.v = [torch.zeros(shape, dtype=stored, device=d) for shape, d in zip(shapes, devices)]
        # [batch, kv_heads, positions, 1] each, for keys and for values
        self.k_scale = [torch.zeros(*s[:-1], 1, device=d) for s, d in zip(shapes, devices)] if int8 else None
        self.v_scale = [torch.zeros(*s[:-1], 1, device=d) for s, d in zip(shapes, devices)] if int8 else None
        self.k_center = [torch.zeros(*s[:2], 1, s[3], device=d) for s, d in zip(shapes, devices)] if int8 else None
        self.dtype = dtype
        # On the host: every step reads it there, and a copy from the GPU would wait for the GPU.
        self.ntk_alpha = torch.ones(batch_size, dtype=torch.float32)
        self.max_len = self.length = max_len

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def has_ring(self) -> bool:
        """Whether some layer keeps a ring (its slots hold the newest positions written, not a prefix)."""
        return any(r is not None for r in self.ring)

    @property
    def nbytes(self) -> int:
        """The memory its keys and values (and their scales) take."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor that holds positions of the rows, batch first (keys, values, scales): what moves a row."""
        return self.k + self.v + (self.k_scale + self.v_scale + self.k_center if self.k_scale else [])

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, write_pos: torch.Tensor) -> None:
        """Store k and v [B, kv_heads, T, head_dim] of positions write_pos ([T], or [B, T] per row); a ring keeps
        the last of them that fit."""
        if self.k_center is not None:
            if k.shape[2] > 1:  # a prefill from position 0 sets the row's center (on the device: no host sync)
                starts = (write_pos[..., :1] == 0).reshape(-1, 1, 1, 1)
                center = k[:, :, :CENTER_TOKENS].float().mean(2, keepdim=True)
                self.k_center[layer].copy_(torch.where(starts, center, self.k_center[layer]))
            k = k.float() - self.k_center[layer]
        ring = self.ring[layer]
        if ring is not None:
            keep = max(k.shape[2] - ring, 0)
            k, v, write_pos = k[:, :, keep:], v[:, :, keep:], write_pos[..., keep:] % ring
        targets, values = [self.k[layer], self.v[layer]], [k, v]
        if self.k_scale is not None:
            scales = [t.abs().amax(-1, keepdim=True).float().clamp_min(1e-8) / 127 for t in values]
            values = [(t / scale).round_().to(torch.int8) for t, scale in zip(values, scales)] + scales
            targets += [self.k_scale[layer], self.v_scale[layer]]
        rows = torch.arange(k.shape[0], device=k.device)[:, None] if write_pos.dim() == 2 else None
        for target, value in zip(targets, values):
            if rows is None:  # every row writes the same positions
                target.index_copy_(2, write_pos, value)
            else:
                target[rows, :, write_pos] = value.transpose(1, 2)

    def centered(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """Keys as this cache gives them back: an int8 cache's less the row's center (so that keys read from it
        and keys not yet written attend alike)."""
        return k if self.k_center is None else (k.float() - self.k_center[layer]).to(k.dtype)

    def read(self, layer: int, quantized: bool = False) -> tuple[torch.Tensor | Int8KV, torch.Tensor | Int8KV]:
        """A layer's keys and values as attention reads them: the first `length` positions, or a ring's every
        slot, in `dtype`; with `quantized`, an int8 cache's as it holds them (Int8KV: one-query attention reads
        them so, rather than widening the whole cache every step)."""
        stop = self.k[layer].shape[2] if self.ring[layer] is not None else self.length
        k, v = self.k[layer][:, :, :stop], self.v[layer][:, :, :stop]
        if self.k_scale is None:
            return k, v
        k, v = Int8KV(k, self.k_scale[layer][:, :, :stop]), Int8KV(v, self.v_scale[layer][:, :, :stop])
        return (k, v) if quantized else (k.dequantize(self.dtype), v.dequantize(self.dtype))

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows [start, stop): writes through it land in this cache."""
        if (start, stop) == (0, self.batch_size):
            return self
        view = self._view(self.length)
        for name in ("k", "v", "k_scale", "v_scale", "k_center"):
            tensors = getattr(self, name)
            setattr(view, name, tensors and [t[start:stop] for t in tensors])
        view.ntk_alpha = self.ntk_alpha[start:stop]
        return view

    def prefix(self, length: int) -> "KVCache":
        """The same rows, attending to their first `length` positions."""
        return self._view(length)

    def _view(self, length: int) -> "KVCache":
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.length = length
        return view


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE computed in fp32: the config's rope scaling (linear, dynamic, YaRN) as transformers
    computes it, and Qwen v1's dynamic-NTK base stretching."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dim = config.rotary_dim
        self.base = config.rope_theta
        self.scaling = config.rope_scaling or {}
        self.max_position_embeddings = config.max_position_embeddings
        # YaRN scales cos and sin (so q·k by its square): transformers' attention_scaling.
        self.attention_factor = yarn_attention_factor(self.scaling) if self.scaling.get("rope_type") == "yarn" else 1.0
        self.dynamic = self.scaling.get("rope_type") == "dynamic"
        self._inv_freq: dict[tuple[float, torch.device], torch.Tensor] = {}

    def inv_freq(self, alpha: float, device: torch.device, length: int = 0) -> torch.Tensor:
        """The inverse frequencies for a Qwen v1 NTK `alpha` and, with dynamic scaling, a forward reaching
        `length` positions (transformers' rule: the base grows with the longest position of the call)."""
        kind, stretch = self.scaling.get("rope_type"), self.dim / (self.dim - 2)
        if self.dynamic and length > self.max_position_embeddings:  # a new base each length: not cached
            factor = self.scaling["factor"]
            return 1.0 / self._powers(self.base * (factor * length / self.max_position_embeddings - (factor - 1))
                                      ** stretch, device)
        key = (alpha, device)
        if key not in self._inv_freq:
            powers = self._powers(self.base * alpha ** stretch if alpha != 1 else self.base, device)
            if kind == "linear":
                inv = 1.0 / powers / self.scaling["factor"]
            elif kind == "yarn":
                inv = yarn_inv_freq(powers, self.base, self.dim, self.scaling)
            else:
                inv = 1.0 / powers
            self._inv_freq[key] = inv
        return self._inv_freq[key]

    def _powers(self, base: float, device: torch.device) -> torch.Tensor:
        """base ** (2i / dim) in fp32: one over each dimension pair's frequency."""
        return base ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim)

    def forward(self, positions: torch.Tensor, alphas: torch.Tensor | None,
                length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, dim] in fp32; alphas [B] or None (all 1); `length`: the
        positions the forward reaches (for dynamic scaling).

        `sin` carries rotate-half's signs (its first half negated), so that apply_rotary needs
        one roll of x instead of slicing, negating and concatenating its halves.
        """
        device = positions.device
        if alphas is None or bool((alphas == alphas[0]).all()):
            inv = self.inv_freq(1.0 if alphas is None else float(alphas[0]), device, length)[None]
        else:
            inv = torch.stack([self.inv_freq(float(a), device, length) for a in alphas.tolist()])
        freqs = (positions.float()[:, :, None] * inv[:, None, :])[:, None]
        cos, sin = freqs.cos(), freqs.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(scaling: dict) -> float:
    """YaRN's cos/sin factor: the config's attention_factor, else from mscale as the paper's Eq. 21."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def yarn_inv_freq(powers: torch.Tensor, base: float, dim: int, scaling: dict) -> torch.Tensor:
    """YaRN: high frequencies kept (extrapolated), low ones divided by the factor (interpolated), a linear
    ramp between the dimensions that turn beta_fast and beta_slow times over the original length."""
    original = scaling["original_max_position_embeddings"]

    def dim_of(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(scaling.get("beta_fast") or 32), dim_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=powers.device) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp
    return 1.0 / (scaling["factor"] * powers) * (1 - extrapolated) + 1.0 / powers * extrapolated


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, head_dim]; rotates the first cos.shape[-1] dims in fp32, passes the rest through.

    x·cos + rotate_half(x)·sin, with rotate_half(x)·sin written as roll(x)·sin_signed (RotaryEmbedding).
    """
    rot_dim = cos.shape[-1]
    if rot_dim < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rot_dim], cos, sin), x[..., rot_dim:]), dim=-1)
    x32 = x.float()
    return (x32 * cos + x32.roll(rot_dim // 2, -1) * sin).to(x.dtype)


# Cached keys and values (per row) up to which CPU decode attention multiplies in fp32; see below.
FP32_DECODE_ATTENTION_MAX = 1 << 21


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row against its keys: on the CPU as grouped matmuls with the softmax in fp32.

    SDPA's CPU kernel is slow for a single query. On the CPU small bf16 matmuls cost more than
    converting k and v to fp32, until that conversion's memory traffic dominates (long contexts of
    large models): fp32 up to FP32_DECODE_ATTENTION_MAX cached values. The probabilities are rounded
    to the model dtype before meeting v, as SDPA's kernels do (GPUs call SDPA, below), so that bf16
    greedy text matches transformers and llama.cpp. Measurements: benchmarks/results/README.md,
    "Quantized decode against llama.cpp and transformers" (the decode changes of 2026-11-27).
    q [B, H, 1, D], k/v [B, G, L, D] with H a multiple of G (query head h reads kv head h // (H/G)).
    """
    if isinstance(k, Int8KV):  # an int8 cache (qwenkit's CPU kernel reads it as it is: runtime/small_ops.py)
        k, v = k.dequantize(q.dtype), v.dequantize(q.dtype)
    B, H, _, D = q.shape
    G = k.shape[1]
    if q.device.type != "cpu":
        # GPUs: each kv head's H/G queries as one SDPA call's query rows, so grouped-query models
        # need no expanded k/v; one fused kernel instead of the eight below.
        y = F.scaled_dot_product_attention(q.reshape(B, G, H // G, D), k, v, attn_mask=mask)
        return y.reshape(B, H, 1, D)
    small = G * k.shape[2] * D <= FP32_DECODE_ATTENTION_MAX
    compute = torch.float32 if small else q.dtype
    scores = (q.to(compute).reshape(B, G, H // G, D) @ k.to(compute).transpose(-1, -2)).float()
    if mask is not None:  # [B, 1, 1, L] broadcasts over the groups
        scores = scores.where(mask, float("-inf"))
    probs = (scores * D ** -0.5).softmax(-1).to(q.dtype)
    return (probs.to(compute) @ v.to(compute)).to(q.dtype).reshape(B, H, 1, D)


KV_CACHE_KINDS = ("float", "int8")
CENTER_TOKENS = 64  # the first keys of a row whose mean an int8 cache subtracts from every key (KVCache)

# Queries per block in windowed attention over several tokens: each block's mask and scores span the block
# and its window, not the whole sequence.
WINDOW_QUERY_BLOCK = 1024


def band_mask(q_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """[B, 1, T, L]: whether a query at q_pos [B, T] sees the key at key_pos [B, L] (negative: an empty
    slot) through a window of `window` positions ending at its own, q - window < k <= q, as transformers'
    sliding-window mask."""
    q, k = q_pos[:, None, :, None], key_pos[:, None, None, :]
    return (k <= q) & (k > q - window) & (k >= 0)


class Attention(nn.Module):
    # One query per row (decode); qwenkit.runtime.small_ops gives a module the same arithmetic in one call.
    decode_attention = staticmethod(decode_attention)

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        # Keys this layer's queries see: the last `window` positions, or all (None); Model.set_window_attention.
        self.window = config.attention_windows[layer_idx] if config.attention_windows else None
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:  # Qwen3 normalises each head of q and k before RoPE
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                write_pos: torch.Tensor, cache: KVCache | None, q_scale: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, G = self.num_heads, self.num_kv_heads
        qkv = self.project_qkv(x).view(B, T, H + 2 * G, self.head_dim).transpose(1, 2)  # [B, heads, T, head_dim]
        if self.q_norm is not None:
            qk = torch.cat((self.q_norm(qkv[:, :H]), self.k_norm(qkv[:, H:H + G])), dim=1)
        else:
            qk = qkv[:, :H + G]
        q, k = apply_rotary(qk, *rope).split((H, G), dim=1)  # one rotation for the queries and keys
        v = qkv[:, H + G:]
        if q_scale is not None:  # Qwen v1 LogN: queries past the training length are sharpened
            q = q * q_scale.to(q.dtype)

        ring = cache.ring[self.layer_idx] if cache is not None else None
        if self.window is not None:
            y = self.windowed(q, k, v, write_pos, cache, ring)
        else:
            if cache is not None:
                k, v = self.cached(k, v, write_pos, cache, one_query=T == 1)
            if T == 1:
                y = self.decode_attention(q, k, v, mask)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                   enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def cached(self, k: torch.Tensor, v: torch.Tensor, write_pos: torch.Tensor, cache: KVCache,
               one_query: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k and v at `write_pos` ([T], or [B, T] per row); the keys and values attended (KVCache.read; for
        `one_query`, decode_attention, an int8 cache's as it holds them)."""
        cache.write(self.layer_idx, k, v, write_pos)
        return cache.read(self.layer_idx, quantized=one_query)

    def windowed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, write_pos: torch.Tensor,
                 cache: KVCache | None, ring: int | None) -> torch.Tensor:
        """Attention to the keys at positions q - window < p <= q. The keys are the cache's (a ring's slots, or
        its positions from 0) followed, in a forward of several tokens, by this forward's own; queries go in
        blocks, each against the keys its window can reach, so that memory stays linear in the length."""
        B, _, T, _ = q.shape
        q_pos = write_pos.expand(B, T)  # the queries' positions are those they write
        if cache is None:
            key_pos = q_pos
        elif ring is None:
            k, v = self.cached(k, v, write_pos, cache, one_query=T == 1)
            key_pos = torch.arange(cache.length, device=q.device).expand(B, -1)
        else:
            # The position each slot holds: the newest at or before the last one written (negative: none yet).
            last = (q_pos[:, -1:] if T == 1 else q_pos[:, :1] - 1)
            slots = torch.arange(ring, device=q.device)
            slot_pos = last - (last - slots) % ring
            if T == 1:
                k, v = self.cached(k, v, write_pos, cache, one_query=True)
                key_pos = slot_pos
            else:  # what the ring held before this forward, then this forward's keys
                key_pos = torch.cat((slot_pos, q_pos), dim=1)
                held_k, held_v = cache.read(self.layer_idx)  # (views of the ring: joined before it is written)
                k_new, v_new = k, v
                k = torch.cat((held_k, cache.centered(self.layer_idx, k_new)), dim=2)
                v = torch.cat((held_v, v_new), dim=2)
                cache.write(self.layer_idx, k_new, v_new, write_pos)
        if T == 1:
            return self.decode_attention(q, k, v, band_mask(q_pos, key_pos, self.window))
        ys, held = [], k.shape[2] - T  # keys before this forward's own
        for a in range(0, T, WINDOW_QUERY_BLOCK):
            b = min(a + WINDOW_QUERY_BLOCK, T)
            # The first key column a query of this block may see: a ring's slots are in no order, so all of them.
            lo = 0 if ring is not None and a < self.window - 1 else max(held + a - self.window + 1, 0)
            mask = band_mask(q_pos[:, a:b], key_pos[:, lo:held + b], self.window)
            ys.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, lo:held + b], v[:, :, lo:held + b],
                                                     attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads))
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=2)

    def project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        """q, k and v of x side by side on the last dimension (qwenkit.runtime.fused may run them as
        one product)."""
        return torch.cat((self.q_proj(x), self.k_proj(x), self.v_proj(x)), dim=-1)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project_gate_up(x)
        return self.down_proj(F.silu(gate) * up)

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two projections of one input (qwenkit.runtime.fused may run them as one product)."""
        return self.gate_proj(x), self.up_proj(x)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, write_pos, cache, q_scale):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, write_pos, cache, q_scale)
        return x + self.mlp(self.post_attention_layernorm(x))


class StepInputs(NamedTuple):
    """A forward's inputs beside the tokens, decided on the host (Transformer.step_inputs)."""
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, 1, T, rotary_dim]
    mask: torch.Tensor | None  # [B, 1, T, attended] where a query must not see every cached position
    write_pos: torch.Tensor  # the cache positions written: [T] shared by the rows, or [B, T]
    cache: KVCache | None  # attending to the positions up to the last one written
    q_scale: torch.Tensor | None  # Qwen v1 LogN
    positions: torch.Tensor  # [B, T] on the model's device


class Transformer(nn.Module):
    """Embedding, blocks and final norm: tokens -> hidden states."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Initialised here, and not at all on the meta device where loading builds the model: there
        # nn.Embedding's normal_ would import torch._dynamo, for nothing (benchmarks/results/README.md,
        # "Memory while loading").
        table = torch.empty(config.vocab_size, config.hidden_size)
        if not table.is_meta:
            nn.init.normal_(table)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=table)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)
        # Training: recompute each block in the backward pass instead of keeping its activations.
        self.gradient_checkpointing = False

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        inputs = self.step_inputs(tokens, input_pos, cache)
        return self.blocks(tokens, inputs.rope, inputs.mask, inputs.write_pos, inputs.cache, inputs.q_scale)

    def step_inputs(self, tokens: torch.Tensor, input_pos: torch.Tensor | None,
                    cache: KVCache | None) -> StepInputs:
        """What a forward decides from the positions before any layer runs (reading them on the host,
        where the caller keeps them): the RoPE angles, the mask, the cache positions written and the
        cached positions attended."""
        B, T = tokens.shape
        if input_pos is None:
            if cache is not None:
                raise ValueError("a forward with a KVCache needs input_pos (the positions to write)")
            input_pos = torch.arange(T)
        # Decisions read the positions where the caller keeps them (on the host, no wait for the
        # GPU); the arithmetic uses a device copy (from the host, queued).
        host_pos = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos
        input_pos = input_pos.to(tokens.device, non_blocking=True)
        # Rows that share their positions (batch 1, prefill) write the cache with one index_copy_.
        write_pos = input_pos if input_pos.dim() == 1 else input_pos[0] if B == 1 else input_pos
        positions = input_pos.expand(B, T) if input_pos.dim() == 1 else input_pos
        mask = None
        if cache is not None:
            kv_len = int(host_pos.max()) + 1  # the cached positions this forward attends to
            if kv_len > cache.max_len and None in cache.ring:  # (rings take any position)
                raise ValueError(f"position {kv_len - 1} is past the KV cache length {cache.max_len}")
            cache = cache.prefix(kv_len)
            if kv_len > T and (B > 1 or T > 1):
                # Each query sees the cached keys at positions <= its own. (A prefill from position
                # 0 has kv_len == T and takes SDPA's causal path; one row's one query sees them all.)
                mask = torch.arange(kv_len, device=tokens.device) <= positions[:, None, :, None]
        length = int(host_pos.max()) + 1 if self.rotary.dynamic and T else 0
        rope = self.rotary(positions, self._ntk_alphas(host_pos, cache), length)
        return StepInputs(rope, mask, write_pos, cache, self._logn_scale(positions, host_pos), positions)

    def blocks(self, tokens: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
               write_pos: torch.Tensor, cache: KVCache | None, q_scale: torch.Tensor | None) -> torch.Tensor:
        """The tensor work of a forward once its StepInputs are known (no host syncs): tokens -> hidden
        states. `write_pos` is [T] when every row writes the same cache positions, else [B, T]."""
        x = self.embed_tokens(tokens)
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if checkpointed:
                x = checkpoint(layer, x, rope, mask, write_pos, cache, q_scale, use_reentrant=False)
            else:
                x = layer(x, rope, mask, write_pos, cache, q_scale)
        return self.norm(x)

    def _ntk_alphas(self, input_pos: torch.Tensor, cache: KVCache | None) -> torch.Tensor | None:
        """Qwen v1 dynamic NTK (spec §2.3): alpha from the row's length at prefill, frozen for decode."""
        cfg = self.config
        if not cfg.use_dynamic_ntk or self.training or cfg.seq_length is None:
            return None
        is_prefill = input_pos.shape[1] > 1 or bool((input_pos[:, 0] == 0).all())
        if cache is not None and not is_prefill:
            return cache.ntk_alpha
        lengths = input_pos.max(dim=1).values + 1
        alphas = torch.tensor([ntk_alpha(int(n), cfg.seq_length) for n in lengths.tolist()], dtype=torch.float32)
        if cache is not None:
            cache.ntk_alpha.copy_(alphas)
        return alphas

    def _logn_scale(self, input_pos: torch.Tensor, host_pos: torch.Tensor) -> torch.Tensor | None:
        """Qwen v1 LogN (spec §2.4): q *= log(p+1)/log(seq_length) for positions past seq_length."""
        cfg = self.config
        if not cfg.use_logn_attn or self.training or cfg.seq_length is None:
            return None
        if int(host_pos.max()) + 1 <= cfg.seq_length:
            return None
        return logn_scale(input_pos, cfg.seq_length)[:, None, :, None]


class Model(nn.Module):
    """Transformer plus language-model head: tokens [B, T] -> logits [B, T, vocab]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Transformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # The checkpoint's generation_config.json (load() fills it): sampling defaults, eos, chat format.
        self.generation_config: dict = {}
        self.kv_cache = "float"  # how new caches store keys and values (set_kv_cache)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                cache: KVCache | None = None, *, last_only: bool = False,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """`last_only` computes logits for the final position only (prefill needs no more).
        `logits_at`, a boolean [B, T], computes them only where it is true, as [n, vocab]: training
        needs the positions that predict a label, and the head is a quarter of a small model's work."""
        hidden = self.model(tokens, input_pos, cache)
        if last_only:  # 2-D input: a [B, 1, D] slice of a longer sequence makes matmul copy the head
            return self.lm_head(hidden[:, -1]).unsqueeze(1)
        if logits_at is not None:
            return self.lm_head(hidden[logits_at])
        return self.lm_head(hidden)

    def new_cache(self, batch_size: int = 1, max_len: int | None = None) -> KVCache:
        """A cache whose layers are each on their layer's device (one device, unless the model was split)."""
        devices = [block.input_layernorm.weight.device for block in self.model.layers]
        return KVCache(self.config, batch_size, max_len or self.config.context_length, self.dtype, devices,
                       int8=self.kv_cache == "int8")

    def set_kv_cache(self, kind: str) -> None:
        """How caches made from now on store keys and values: "float" (the model's dtype) or "int8" (KVCache)."""
        if kind not in KV_CACHE_KINDS:
            raise ConfigError(f"KV cache {kind!r}: choose {' or '.join(KV_CACHE_KINDS)}")
        self.kv_cache = kind

    def set_long_context(self, dynamic_ntk: bool | None = None, logn: bool | None = None,
                         train_length: int | None = None) -> None:
        """Qwen's dynamic NTK and LogN (spec §2.3-2.4) for any model: on or off (None keeps the config's), past
        `train_length` (default: the config's seq_length, else max_position_embeddings)."""
        if train_length is not None and (not isinstance(train_length, int) or train_length < 2):
            raise ConfigError(f"train length {train_length!r} must be an integer of at least 2")
        cfg = self.config
        cfg.seq_length = train_length or cfg.seq_length or cfg.max_position_embeddings
        if dynamic_ntk is not None:
            cfg.use_dynamic_ntk = dynamic_ntk
        if logn is not None:
            cfg.use_logn_attn = logn

    def set_window_attention(self, spec: str | list | None) -> None:
        """Attention windows per layer over the config's: "SIZE[:LAYERS],..." (config.attention_windows_of; e.g.
        "2048:4,4096:4", the Qwen-7B tech report's shorter windows below), a per-layer list, or None / "none"
        for full attention everywhere. Caches made afterwards keep a ring for each windowed layer."""
        cfg = self.config
        windows = attention_windows_of(spec, cfg.num_layers)
        wide = [w for w in windows or () if w is not None and w > cfg.context_length]
        if wide and isinstance(spec, str):  # (a config's own windows may pass its context: Qwen2's defaults do)
            raise ConfigError(f"a window of {wide[0]} positions is longer than the model's context "
                              f"({cfg.context_length}); it would change nothing: give a smaller size")
        cfg.attention_windows = windows
        for layer, window in zip(self.model.layers, windows or [None] * cfg.num_layers):
            layer.self_attn.window = window

    def set_rope_scaling(self, spec: str | dict | None) -> None:
        """RoPE scaling over the config's: "linear:F", "dynamic:F", "yarn:F", a rope_scaling dict, or None /
        "none" for plain RoPE (config.rope_scaling_of). The context length follows it."""
        self.config.rope_scaling = rope_scaling_of(spec, self.config.max_position_embeddings)
        self.model.rotary = RotaryEmbedding(self.config)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # The final norm's weight is always in the compute dtype; the embedding may be swapped for an int8 table.
        return self.model.norm.weight.dtype


def ntk_alpha(seq_len: int, train_len: int) -> float:
    """Dynamic NTK alpha: 1 up to train_len, then 3, 7, 15, ... for each doubling of the length."""
    context_value = math.log2(seq_len / train_len) + 1
    return float(max(2 ** math.ceil(context_value) - 1, 1))


def logn_scale(positions: torch.Tensor, train_len: int) -> torch.Tensor:
    """LogN query factor for 0-based positions: log(p+1)/log(train_len) past train_len, else 1."""
    n = (positions + 1).double()
    return torch.where(n > train_len, n.log() / math.log(train_len), torch.ones_like(n)).float()
