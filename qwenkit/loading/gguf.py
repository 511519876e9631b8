"""GGUF files (llama.cpp) -> metadata, ModelConfig and canonical (Hugging Face Qwen2-named) tensors.

The header is parsed here rather than with `gguf.GGUFReader`, which takes seconds on a 150k-token
vocabulary and maps the whole file. Tensor bytes are read one tensor at a time with seek + readinto,
so resident memory stays near the weights being built plus one raw tensor, and are dequantized in
torch (vectorized over blocks, in chunks, straight into an output of the target dtype).

Name mapping (gguf/tensor_mapping.py, gguf/constants.py MODEL_TENSORS): Qwen v1's fused
`attn.c_attn` is `attn_qkv` (weight + bias, q/k/v stacked by rows), `mlp.w2` (the SiLU branch) is
`ffn_gate`, `mlp.w1` is `ffn_up`, `mlp.c_proj` is `ffn_down`. llama.cpp runs qwen, qwen2 and qwen3
with NeoX-style RoPE and stores their q/k unpermuted (transformers only un-permutes GGUF q/k for
llama), so q/k are used as stored.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from ..config import SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES, ModelConfig
from ..errors import CheckpointError, ConfigError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct formats (little-endian); 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9


class TensorInfo(NamedTuple):
    qtype: Q
    shape: tuple[int, ...]  # torch order: [out, in] for matrices
    offset: int  # absolute, in the file
    nbytes: int


# ---------------------------------------------------------------------- header
class _Header:
    """A cursor over the (memory-mapped) file that decodes GGUF header values."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if n > len(self.buf) - self.pos:
            raise ValueError(f"a header field at byte {self.pos} runs past the end of the file")
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.unpack("<I"), self.unpack("<Q")
            if itype in _SCALARS:  # one read for the whole array (token types, scores)
                dtype = np.dtype(_SCALARS[itype])
                return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()
            return [self.value(itype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos}")
        value = self.unpack(_SCALARS[vtype])
        # Converters write decimal values as float32; the shortest float32 repr gives them back
        # (layer_norm_rms_epsilon 1e-6 rather than 9.99999997e-07).
        return float(str(np.float32(value))) if vtype == _FLOAT32 else value


def _parse(path: Path, buf) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    h = _Header(buf)
    if h.take(4) != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    version = h.unpack("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path} is GGUF version {version}; qwenkit reads little-endian versions 2 and 3: "
                              "convert it again with a current llama.cpp")
    n_tensors, n_kv = h.unpack("<Q"), h.unpack("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = h.string()
        metadata[key] = h.value(h.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = h.string()
        dims = [h.unpack("<Q") for _ in range(h.unpack("<I"))]
        type_id, offset = h.unpack("<I"), h.unpack("<Q")
        infos.append((name, dims, type_id, offset))

    alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path} has general.alignment={alignment!r}; it must be a power of two")
    data_start = -(-h.pos // alignment) * alignment
    tensors = {}
    for name, dims, type_id, offset in infos:
        try:
            qtype = Q(type_id)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name} has unknown ggml type {type_id}") from None
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        n = math.prod(dims)
        if dims and dims[0] % block_size:
            raise CheckpointError(f"{path}: tensor {name} has rows of {dims[0]} values, not a multiple of "
                                  f"the {qtype.name} block size {block_size}")
        info = TensorInfo(qtype, tuple(reversed(dims)), data_start + offset, n // block_size * type_size)
        if info.offset + info.nbytes > len(buf):
            raise CheckpointError(
                f"{path} is truncated: tensor {name} needs bytes up to {info.offset + info.nbytes} but the file "
                f"has {len(buf)}; re-download it")
        tensors[name] = info
    return metadata, tensors


# ---------------------------------------------------------------------- dequantization
# Each function takes [n, type_size] uint8 blocks and returns [n, block_size] float32, with the
# same operations in the same order as gguf/quants.py so results match it bit for bit.
_NIBBLE_SHIFTS = torch.tensor([0, 4], dtype=torch.uint8).view(2, 1)
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)
_CRUMB_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n, 2] bytes holding one fp16 each -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 2, k]: all low nibbles, then all high nibbles."""
    return (qs.unsqueeze(-2) >> _NIBBLE_SHIFTS) & 15


def _bit_planes(qh: torch.Tensor) -> torch.Tensor:
    """[..., k] bytes -> [..., 8, k]: plane i holds bit i of every byte."""
    return (qh.unsqueeze(-2) >> _BIT_SHIFTS.view(8, 1)) & 1


def _bits_le32(qh: torch.Tensor) -> torch.Tensor:
    """[n, 4] bytes of a little-endian uint32 -> its 32 bits, bit 0 first."""
    return ((qh.unsqueeze(-1) >> _BIT_SHIFTS) & 1).reshape(len(qh), 32)


# The 4-bit formats hold, per group of 32 values, a code q in 0..15 and w = scale·q − offset.
# Their decoders return (q uint8 [n, block], scale and offset float32 [n, block / 32]) so that
# qwenkit.loading.on_load can keep them as int4 exactly; dequantizing is the same arithmetic.
def _q4_0_groups(b):
    d, qs = b.split([2, 16], 1)
    d = _f16(d)
    return _nibbles(qs).reshape(len(b), 32), d, 8 * d


def _q4_1_groups(b):
    d, m, qs = b.split([2, 2, 16], 1)
    return _nibbles(qs).reshape(len(b), 32), _f16(d), -_f16(m)


def _q4_k_groups(b):
    scale, offset = _k_scales(b)
    return _nibbles(b[:, 16:].reshape(-1, 4, 32)).reshape(len(b), 256), scale[..., 0], offset[..., 0]


def _affine(groups):
    def dequantize(b):
        q, scale, offset = groups(b)
        q = q.view(len(b), scale.shape[1], 32).float()
        return (scale[..., None] * q - offset[..., None]).reshape(len(b), -1)
    return dequantize


def _q5(qh, qs):
    return _nibbles(qs).reshape(len(qs), 32) | (_bits_le32(qh) << 4)


def _q5_0(b):
    d, qh, qs = b.split([2, 4, 16], 1)
    return (_q5(qh, qs).to(torch.int8) - 16).float() * _f16(d)


def _q5_1(b):
    d, m, qh, qs = b.split([2, 2, 4, 16], 1)
    return _f16(d) * _q5(qh, qs).float() + _f16(m)


def _q8_0(b):
    d, qs = b.split([2, 32], 1)
    return qs.view(torch.int8).float() * _f16(d)


def _k_scales(b):
    """d, dmin and the eight 6-bit (scale, min) pairs of a Q4_K/Q5_K block -> [n, 8, 1] each."""
    d, dmin, scales = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16]
    lo, hi, mix = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], 1)
    mn = torch.cat([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], 1)
    return (d * sc.float()).unsqueeze(-1), (dmin * mn.float()).unsqueeze(-1)


def _q5_k(b):
    scale, offset = _k_scales(b)
    ql = _nibbles(b[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    q = (ql | (_bit_planes(b[:, 16:48]) << 4)).float()
    return (scale * q - offset).reshape(-1, 256)


def _q6_k(b):
    ql, qh, scales, d = b.split([128, 64, 16, 2], 1)
    low = _nibbles(ql.reshape(-1, 2, 64)).reshape(-1, 8, 32)
    high = ((qh.reshape(-1, 2, 1, 32) >> _CRUMB_SHIFTS) & 3).reshape(-1, 8, 32)
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(-1, 16, 16).float()
    return ((_f16(d) * scales.view(torch.int8).float()).unsqueeze(-1) * q).reshape(-1, 256)


_FLOATS = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
FOUR_BIT_GROUPS = {Q.Q4_0: _q4_0_groups, Q.Q4_1: _q4_1_groups, Q.Q4_K: _q4_k_groups}
_BLOCKS = {Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q8_0: _q8_0, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
           **{qtype: _affine(groups) for qtype, groups in FOUR_BIT_GROUPS.items()}}
FLOAT_TYPES = frozenset(_FLOATS)
SUPPORTED_TYPES = FLOAT_TYPES | frozenset(_BLOCKS)

# Values dequantized per step: bounds the float32 temporaries (4 MiB each) whatever the tensor size.
# Smaller steps page-fault less but run more (OpenMP-parallel) torch ops, which stall badly when
# other processes compete for the cores.
_CHUNK_VALUES = 1 << 20


def dequantize(raw: torch.Tensor, qtype: Q, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Raw uint8 bytes of one tensor (a type in SUPPORTED_TYPES) -> a `dtype` tensor of `shape`."""
    if qtype in _FLOATS:
        return raw.view(_FLOATS[qtype]).view(shape).to(dtype)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.view(-1, type_size)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1, block_size)
    step = _CHUNK_VALUES // block_size
    for i in range(0, len(blocks), step):
        flat[i:i + step] = _BLOCKS[qtype](blocks[i:i + step])
    return out


# ---------------------------------------------------------------------- names
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)$")


def canonical_name(gguf_name: str) -> str:
    """`blk.3.ffn_gate.weight` -> `model.layers.3.mlp.gate_proj.weight`. Names it does not know (and
    Qwen v1's `attn_qkv`, which tensors() splits) come back unchanged."""
    m = _NAME.match(gguf_name)
    if not m:
        return gguf_name
    layer, base, kind = m.groups()
    if layer is None and base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    if layer is not None and base in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[base]}.{kind}"
    return gguf_name


# ---------------------------------------------------------------------- file
class GGUFFile:
    """A parsed GGUF header; tensors are read from the file on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                # Only the header's pages are touched; the map is closed before any tensor is read.
                self.metadata, self._tensors = _parse(self.path, buf)
        except CheckpointError:
            raise
        except (OSError, ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
            raise CheckpointError(f"{self.path} has an unreadable GGUF header ({e}); the file is corrupt "
                                  "or truncated: re-download it") from e
        if "general.architecture" not in self.metadata:
            raise ConfigError(f"missing required key 'general.architecture' in {self.path}")
        self.architecture: str = self.metadata["general.architecture"]
        self.tensor_names: list[str] = list(self._tensors)

    def _arch(self) -> str:
        if self.architecture not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{self.path} holds a GGUF of architecture {self.architecture!r}, which is not supported; "
                f"qwenkit runs {SUPPORTED_ARCHITECTURES}")
        return self.architecture

    def config(self) -> ModelConfig:
        arch = self._arch()
        meta, tensors = self.metadata, self._tensors

        def get(key, *default):
            if f"{arch}.{key}" in meta:
                return meta[f"{arch}.{key}"]
            if default:
                return default[0]
            raise ConfigError(f"missing required key '{arch}.{key}' in {self.path}")

        if "token_embd.weight" not in tensors:
            raise CheckpointError(f"{self.path} has no token_embd.weight tensor; it is not a complete model")
        hidden, heads = get("embedding_length"), get("attention.head_count")
        intermediate = get("feed_forward_length")
        if arch == "qwen":
            # convert_hf_to_gguf's QwenModel writes the HF intermediate_size, twice the SwiGLU width
            # (llama.cpp builds ffn_gate/ffn_up with n_ff/2). seq_length, use_dynamic_ntk and
            # use_logn_attn are not stored in GGUF, so v1 long-context extrapolation stays off.
            intermediate //= 2
        return ModelConfig(
            arch=arch,
            vocab_size=tensors["token_embd.weight"].shape[0],
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_layers=get("block_count"),
            num_heads=heads,
            num_kv_heads=get("attention.head_count_kv", heads),
            head_dim=get("attention.key_length", hidden // heads),
            rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rotary_dim=get("rope.dimension_count", None),
            max_position_embeddings=get("context_length"),
            tie_word_embeddings="output.weight" not in tensors,
            qkv_bias="blk.0.attn_q.bias" in tensors or "blk.0.attn_qkv.bias" in tensors,
            o_bias="blk.0.attn_output.bias" in tensors,
            qk_norm="blk.0.attn_q_norm.weight" in tensors,
            rope_scaling=self._rope_scaling(arch),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            extra={k: v for k, v in meta.items() if not k.startswith("tokenizer.")},
        )

    def _rope_scaling(self, arch: str) -> dict | None:
        prefix = f"{arch}.rope.scaling."
        fields = {k.removeprefix(prefix): v for k, v in self.metadata.items() if k.startswith(prefix)}
        kind = fields.pop("type", None)
        if kind in (None, "none"):
            return None
        if "original_context_length" in fields:  # the Hugging Face name
            fields["original_max_position_embeddings"] = fields.pop("original_context_length")
        return {"rope_type": kind, **fields}

    def tokenizer_fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.metadata.items() if k.startswith("tokenizer.")}

    def tensor_info(self, gguf_name: str) -> TensorInfo:
        try:
            return self._tensors[gguf_name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {gguf_name!r}") from None

    def raw_tensor(self, gguf_name: str) -> tuple[torch.Tensor, Q, tuple[int, ...]]:
        """The stored bytes (uint8), ggml type and torch-order shape of one tensor."""
        info = self.tensor_info(gguf_name)
        with open(self.path, "rb") as f:
            return StoredTensor(self.path, f, gguf_name, info).raw(), info.qtype, info.shape

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """(canonical name, tensor) in file order, dequantized to `dtype`. Each tensor is read and
        dequantized as it is requested, and its raw bytes are freed before the next one is read."""
        for name, stored in self.stored_tensors():
            yield name, stored.dequantize(dtype)

    def stored_tensors(self) -> Iterator[tuple[str, StoredTensor]]:
        """(canonical name, StoredTensor) in file order: each read only when asked, while iterating."""
        config = self.config()
        unsupported = [f"{n} ({i.qtype.name})" for n, i in self._tensors.items() if i.qtype not in SUPPORTED_TYPES]
        if unsupported:
            raise CheckpointError(
                f"{self.path} stores tensors in ggml types qwenkit cannot dequantize: {', '.join(unsupported[:5])}; "
                f"supported: {', '.join(sorted(t.name for t in SUPPORTED_TYPES))}")
        with open(self.path, "rb") as f:
            for name, info in self._tensors.items():
                stored = StoredTensor(self.path, f, name, info)
                if name.endswith((".attn_qkv.weight", ".attn_qkv.bias")):
                    yield from self._split_qkv(name, stored, config)
                else:
                    yield canonical_name(name), stored

    def _split_qkv(self, name: str, stored: StoredTensor, config: ModelConfig):
        """Qwen v1's fused c_attn: q, k and v stacked by rows."""
        layer, kind = name.split(".")[1], name.rsplit(".", 1)[1]
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        if stored.shape[0] != q + 2 * kv:
            raise CheckpointError(f"{self.path}: {name} has {stored.shape[0]} rows, expected {q + 2 * kv} (q, k, v)")
        for proj, part in zip("qkv", stored.split_rows([q, kv, kv])):
            yield f"model.layers.{layer}.self_attn.{proj}_proj.{kind}", part


class StoredTensor:
    """One tensor as the file stores it, read on demand (whole, or a range of rows) while `f` is open.

    Reading rows a chunk at a time lets a quantizer convert a vocabulary-sized matrix without holding
    its raw bytes and a float copy at once.
    """

    def __init__(self, path: Path, f, name: str, info: TensorInfo):
        self.path, self.f, self.name, self.info = path, f, name, info

    @property
    def qtype(self) -> Q:
        return self.info.qtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def _row_bytes(self) -> int:
        row_bytes, rest = divmod(self.info.nbytes, self.shape[0])
        if rest:  # a 1-D block-quantized tensor: its blocks span several "rows"
            raise CheckpointError(f"{self.path}: tensor {self.name} ({self.qtype.name}, shape {self.shape}) "
                                  "cannot be read by rows")
        return row_bytes

    def raw(self, rows: slice = slice(None)) -> torch.Tensor:
        """The stored bytes (uint8, 1-D) of the given rows (dimension 0, torch order)."""
        start, stop, _ = rows.indices(self.shape[0])
        if (start, stop) == (0, self.shape[0]):
            offset, nbytes = self.info.offset, self.info.nbytes
        else:
            row_bytes = self._row_bytes()
            offset, nbytes = self.info.offset + start * row_bytes, (stop - start) * row_bytes
        raw = torch.empty(nbytes, dtype=torch.uint8)
        self.f.seek(offset)
        if self.f.readinto(raw.numpy()) != nbytes:
            raise CheckpointError(f"{self.path} ended inside tensor {self.name}; it changed while being read "
                                  "or is truncated: re-download it")
        return raw

    def dequantize(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        return dequantize(self.raw(rows), self.qtype, (stop - start, *self.shape[1:]), dtype)

    def split_rows(self, sizes: list[int]) -> list[StoredTensor]:
        """Consecutive row ranges of this tensor, each a StoredTensor of its own."""
        row_bytes, parts, start = self._row_bytes(), [], 0
        for size in sizes:
            info = self.info._replace(shape=(size, *self.shape[1:]), offset=self.info.offset + start * row_bytes,
                                      nbytes=size * row_bytes)
            parts.append(StoredTensor(self.path, self.f, self.name, info))
            start += size
        return parts
