"""ModelConfig: one dataclass for the dense Qwen family (v1, 1.5, 2, 2.5, 3).

Built from a Hugging Face `config.json` (Qwen v1.1 names, Qwen v1.0 names, Qwen2/3 names) or
from GGUF metadata (see `loading/gguf.py`). Unknown keys are ignored; a missing required key is
an error naming the key and the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnsupportedModelError

# model_type -> architecture family we run.
SUPPORTED_MODEL_TYPES = {"qwen": "qwen", "qwen2": "qwen2", "qwen3": "qwen3"}
SUPPORTED_ARCHITECTURES = "qwen (Qwen-7B v1), qwen2 (Qwen1.5, Qwen2, Qwen2.5), qwen3 (dense Qwen3)"


@dataclass
class ModelConfig:
    arch: str  # "qwen" (v1), "qwen2" (also Qwen1.5), "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # width of the SwiGLU branch (Qwen v1: config's intermediate_size // 2)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rotary_dim: int | None = None  # None: the whole head (Qwen v1 rotary_pct < 1 rotates a prefix)
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    o_bias: bool = False
    qk_norm: bool = False
    # Qwen v1 long context (spec §2.3-2.4): training length drives dynamic NTK and LogN.
    seq_length: int | None = None
    use_dynamic_ntk: bool = False
    use_logn_attn: bool = False
    # linear, dynamic or yarn RoPE scaling as transformers applies it, normalized (rope_scaling_of); None: plain
    rope_scaling: dict | None = None
    # Each layer's attention window (a query sees the keys of its last `window` positions, itself included),
    # None for full attention; the whole field None when every layer attends fully (attention_windows_of).
    attention_windows: list[int | None] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict = field(default_factory=dict, repr=False)  # untouched source keys

    def __post_init__(self):
        if self.rotary_dim is None:
            self.rotary_dim = self.head_dim
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config value {name}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(f"rotary dim {self.rotary_dim} must be even and <= head_dim {self.head_dim}")
        self.rope_scaling = rope_scaling_of(self.rope_scaling, self.max_position_embeddings)
        self.attention_windows = attention_windows_of(self.attention_windows, self.num_layers)

    @property
    def context_length(self) -> int:
        """Longest sequence the model is meant to see (what generation checks prompts against): with RoPE
        scaling, the original length times the factor."""
        scaling = self.rope_scaling
        if scaling is None:
            return self.max_position_embeddings
        return max(self.max_position_embeddings, int(scaling["original_max_position_embeddings"] * scaling["factor"]))

    # ------------------------------------------------------------------ writing
    def to_hf_dict(self) -> dict[str, Any]:
        """config.json in Hugging Face Qwen2 / Qwen3 form, which `from_dict` reads back to this config.

        Qwen v1 is written as its Qwen2 equivalent (the weights are saved under canonical names, and
        v1's block is Qwen2's with q/k/v biases), so transformers can load it too. Its long-context
        settings (seq_length, use_dynamic_ntk, use_logn_attn) are kept as extra keys that our loader
        reads and transformers ignores: past seq_length transformers will differ from qwenkit.
        """
        model_type = "qwen3" if self.arch == "qwen3" else "qwen2"
        if model_type == "qwen2" and (not self.qkv_bias or self.o_bias or self.qk_norm):
            raise ConfigError(f"a {self.arch} config with qkv_bias={self.qkv_bias}, o_bias={self.o_bias}, "
                              f"qk_norm={self.qk_norm} has no Qwen2 config.json form (Qwen2 has q/k/v biases only)")
        if model_type == "qwen3" and (self.qkv_bias != self.o_bias or not self.qk_norm):
            raise ConfigError("a qwen3 config needs qk_norm and the same bias on q/k/v and o (attention_bias)")
        d = {
            "architectures": ["Qwen3ForCausalLM" if model_type == "qwen3" else "Qwen2ForCausalLM"],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            **_sliding_window_fields(self.attention_windows),
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if model_type == "qwen3":
            d["attention_bias"] = self.qkv_bias
        if self.rotary_dim != self.head_dim:
            d["partial_rotary_factor"] = self.rotary_dim / self.head_dim
        if self.arch == "qwen":
            d.update(seq_length=self.seq_length, use_dynamic_ntk=self.use_dynamic_ntk, use_logn_attn=self.use_logn_attn)
        return d

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"no config file at {path}: a Hugging Face checkpoint directory needs config.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download the checkpoint's config.json") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a JSON object, found {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type is None:
            archs = d.get("architectures") or []
            if "QWenLMHeadModel" in archs or "n_embd" in d or "kv_channels" in d:
                model_type = "qwen"
            else:
                raise ConfigError(f"missing required key 'model_type' in {source}")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} in {source} is not supported; qwenkit runs "
                f"{SUPPORTED_ARCHITECTURES}")
        if model_type == "qwen":
            return cls._from_qwen_v1(d, source)
        return cls._from_qwen2(d, source, model_type)

    @classmethod
    def _from_qwen_v1(cls, d, source):
        # v1.1 names first, then the v1.0 names (spec §1.1).
        get = _getter(d, source)
        hidden = get("hidden_size", "n_embd")
        heads = get("num_attention_heads", "n_head")
        head_dim = get("kv_channels", default=hidden // heads)
        rotary_pct = float(d.get("rotary_pct", 1.0))
        seq_length = get("seq_length", default=None)
        return cls(
            arch="qwen",
            vocab_size=get("vocab_size", "padded_vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", "ffn_hidden_size") // 2,
            num_layers=get("num_hidden_layers", "n_layer"),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("layer_norm_epsilon", default=1e-6)),
            rope_theta=float(get("rotary_emb_base", "rope_theta", default=10000.0)),
            rotary_dim=int(head_dim * rotary_pct),
            max_position_embeddings=get("max_position_embeddings", "n_positions", default=8192),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True,  # c_attn always carries a bias
            o_bias=not d.get("no_bias", True),
            seq_length=seq_length,
            use_dynamic_ntk=bool(d.get("use_dynamic_ntk", False)),
            use_logn_attn=bool(d.get("use_logn_attn", False)),
            rope_scaling=d.get("rope_scaling"),
            attention_windows=d.get("attention_windows"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            extra=d,
        )

    @classmethod
    def _from_qwen2(cls, d, source, model_type):
        get = _getter(d, source)
        if d.get("num_experts") or d.get("num_experts_per_tok"):
            raise UnsupportedModelError(
                f"{source} describes a mixture-of-experts model; qwenkit runs dense models only: "
                f"{SUPPORTED_ARCHITECTURES}")
        hidden = get("hidden_size")
        heads = get("num_attention_heads")
        head_dim = d.get("head_dim") or hidden // heads
        # transformers >= 5 writes rope_parameters (rope_theta inside), earlier ones rope_scaling.
        rope_scaling = d.get("rope_scaling") or {k: v for k, v in (d.get("rope_parameters") or {}).items()
                                                 if k != "rope_theta"} or None
        attention_bias = d.get("attention_bias")
        return cls(
            arch=model_type,
            vocab_size=get("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", default=heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("rms_norm_eps", default=1e-6)),
            rope_theta=float(_rope_theta(d)),
            max_position_embeddings=get("max_position_embeddings", default=32768),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            # Qwen2/1.5 always carry q/k/v biases; Qwen3 has attention_bias (default false) on all four.
            qkv_bias=True if model_type == "qwen2" else bool(attention_bias),
            o_bias=False if model_type == "qwen2" else bool(attention_bias),
            qk_norm=model_type == "qwen3",
            rotary_dim=int(head_dim * d.get("partial_rotary_factor", 1.0)),
            rope_scaling=rope_scaling,
            attention_windows=d.get("attention_windows") or _sliding_windows(d, source),
            # Qwen v1 long context, when a v1 model was saved in Qwen2 form (see to_hf_dict).
            seq_length=d.get("seq_length"),
            use_dynamic_ntk=bool(d.get("use_dynamic_ntk", False)),
            use_logn_attn=bool(d.get("use_logn_attn", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            extra=d,
        )


ROPE_SCALINGS = ("linear", "dynamic", "yarn")
YARN_KEYS = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")


def rope_scaling_of(spec: dict | str | None, max_position_embeddings: int) -> dict | None:
    """A config's rope_scaling (or a "TYPE:FACTOR" string, as --rope-scaling takes it) in one form:
    {"rope_type", "factor", "original_max_position_embeddings", and YaRN's own keys when given}; None
    for plain RoPE. The original length defaults to max_position_embeddings, as in transformers."""
    if isinstance(spec, str) and spec.strip().lower() in ("none", "default"):
        return None
    if isinstance(spec, str):
        kind, _, factor = spec.partition(":")
        try:
            spec = {"rope_type": kind.strip(), "factor": float(factor)}
        except ValueError:
            raise ConfigError(f"rope scaling {spec!r}: expected TYPE:FACTOR, e.g. yarn:4 or linear:2") from None
    if not spec:
        return None
    kind = spec.get("rope_type", spec.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ROPE_SCALINGS:
        raise UnsupportedModelError(f"rope scaling {kind!r} is not implemented; qwenkit applies "
                                    f"{', '.join(ROPE_SCALINGS)} (as transformers does)")
    original = spec.get("original_max_position_embeddings") or max_position_embeddings
    factor = spec.get("factor")
    if factor is None and kind == "yarn":  # transformers: the ratio of the two lengths
        factor = max_position_embeddings / original
    if not isinstance(factor, (int, float)) or not factor > 0 or not isinstance(original, int) or original <= 0:
        raise ConfigError(f"rope scaling {spec}: factor must be a number > 0 and original_max_position_embeddings "
                          "a positive integer")
    extra = {k: spec[k] for k in YARN_KEYS if kind == "yarn" and spec.get(k) is not None}
    return {"rope_type": kind, "factor": float(factor), "original_max_position_embeddings": original, **extra}


def attention_windows_of(spec: str | list | None, num_layers: int) -> list[int | None] | None:
    """Each layer's attention window from a per-layer list, or from "SIZE[:LAYERS],SIZE[:LAYERS],..." as
    --window-attention takes it: groups of layers from the bottom up, SIZE a number of positions or "full", the
    last group's LAYERS defaulting to every layer left, layers past the groups attending fully ("2048:4,4096:4"
    is the Qwen-7B tech report's example: shorter windows below, longer above). None when no layer is windowed."""
    if isinstance(spec, str):
        text, spec = spec, []
        if text.strip().lower() not in ("", "none", "full"):
            for group in text.split(","):
                size, _, layers = group.strip().partition(":")
                try:
                    count = int(layers) if layers else num_layers - len(spec)
                    window = None if size.strip().lower() == "full" else int(size)
                except ValueError:
                    raise ConfigError(f"window attention {text!r}: expected SIZE[:LAYERS],... with SIZE a number "
                                      "of positions or 'full', e.g. 1024 or 2048:4,4096:4") from None
                if count <= 0:
                    raise ConfigError(f"window attention {text!r}: {group.strip()!r} covers no layer")
                spec += [window] * count
            if len(spec) > num_layers:
                raise ConfigError(f"window attention {text!r} names {len(spec)} layers; the model has {num_layers}")
            spec += [None] * (num_layers - len(spec))
    if not spec or all(w is None for w in spec):
        return None
    if len(spec) != num_layers or any(w is not None and (not isinstance(w, int) or w <= 0) for w in spec):
        raise ConfigError(f"attention windows {spec}: one per layer ({num_layers}), each a positive integer or None")
    return list(spec)


def _sliding_windows(d: dict, source: str) -> list[int | None] | None:
    """Qwen2/Qwen3 sliding-window attention as transformers applies it: with use_sliding_window, the layers
    that layer_types marks "sliding_attention", else those from max_window_layers up, see `sliding_window`
    positions."""
    if not d.get("use_sliding_window"):
        return None
    window, layers = d.get("sliding_window"), d.get("num_hidden_layers")
    if not isinstance(window, int) or window <= 0:
        raise ConfigError(f"{source} sets use_sliding_window=true with sliding_window={window!r}: it must be a "
                          "positive number of positions")
    if d.get("layer_types"):
        return [window if kind == "sliding_attention" else None for kind in d["layer_types"]]
    first = d.get("max_window_layers", 28)
    return [window if i >= first else None for i in range(layers)]


def _sliding_window_fields(windows: list[int | None] | None) -> dict:
    """config.json's form of the windows: Qwen2's sliding-window keys where they express them (one size, on
    the layers from some index up), else qwenkit's own per-layer list (which transformers ignores)."""
    if windows is None:
        return {"use_sliding_window": False}
    sizes = {w for w in windows if w is not None}
    first = next(i for i, w in enumerate(windows) if w is not None)
    if len(sizes) == 1 and all(w is not None for w in windows[first:]):
        return {"use_sliding_window": True, "sliding_window": sizes.pop(), "max_window_layers": first}
    return {"use_sliding_window": False, "attention_windows": windows}


def yarn_for_context(config: ModelConfig, context: int) -> dict | None:
    """The rope scaling that gives `config` a context of `context` tokens: None when it has that already,
    else YaRN over the original trained length (Qwen2.5's recipe for 128K: factor 4 over 32K)."""
    if not isinstance(context, int) or context <= 0:
        raise ConfigError(f"context {context!r} must be a positive number of tokens")
    if context <= config.context_length:
        return None
    original = (config.rope_scaling or {}).get("original_max_position_embeddings") or config.max_position_embeddings
    return {"rope_type": "yarn", "factor": context / original, "original_max_position_embeddings": original}


def _rope_theta(d):
    # transformers >= 5 moves rope_theta into rope_parameters.
    params = d.get("rope_parameters") or {}
    return d.get("rope_theta", params.get("rope_theta", 10000.0))


_MISSING = object()


def _getter(d, source):
    def get(*names, default=_MISSING):
        for name in names:
            if d.get(name) is not None:
                return d[name]
        if default is _MISSING:
            raise ConfigError(f"missing required key {names[0]!r} in {source}"
                              + (f" (also looked for {', '.join(map(repr, names[1:]))})" if len(names) > 1 else ""))
        return default
    return get
