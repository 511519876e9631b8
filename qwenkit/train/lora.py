"""LoRA, applied from outside the model by swapping linears; adapters saved and read in peft's format.

`apply_lora` freezes the model and wraps each target linear (float, or a quantized one from
`qwenkit.quant`: Q-LoRA) in a `LoRALinear`. Module names are transformers' Qwen2 names for every
Qwen generation, so `save_adapter` writes exactly what peft writes for `Qwen2ForCausalLM`:

    adapter_config.json           peft's LoraConfig (peft_type LORA, r, lora_alpha, target_modules, ...)
    adapter_model.safetensors     base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight  [r, in]
                                  base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight  [out, r]
                                  base_model.model.model.embed_tokens.weight  (modules_to_save)

`load_adapter` reads such adapters made by peft elsewhere, including ones trained with the Qwen v1
scripts on `transformer.h.N.attn.c_attn` and friends (mapped to the canonical modules), and
`merge_lora` folds the updates into plain float linears.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from ..checkpoint_names import canonical_modules
from ..errors import AdapterError, CheckpointError
from ..model import Model
from ..quant import QuantizedLinear
from ..runtime.packed import unpack_linears

LAYER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The Qwen v1 scripts' target names (spec §7.3): their c_proj matches both attention and MLP output.
QWEN7B_TARGETS = {"c_attn": ("q_proj", "k_proj", "v_proj"), "c_proj": ("o_proj", "down_proj"),
                "attn.c_proj": ("o_proj",), "mlp.c_proj": ("down_proj",), "w1": ("up_proj",), "w2": ("gate_proj",)}
EXTRA_MODULES = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head"}  # peft modules_to_save names
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # what peft puts before the base model's own names


class LoRADropout(nn.Dropout):
    """nn.Dropout whose keep mask is drawn as 15-bit integers on the CPU, four from each random 64-bit
    word: bernoulli_'s masks (seven per layer) were a large share of a LoRA step, and this takes a
    fraction of their time (benchmarks/results/README.md, "Fine-tuning against transformers + peft").
    The drop probability is rounded to a multiple of 2^-15 and the scale follows it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.p or x.device.type != "cpu":
            return super().forward(x)
        threshold = round(self.p * (1 << 15))
        n = x.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()  # 63 random bits each
        fields = words.view(torch.int16)[:n].bitwise_and_(0x7FFF)  # uniform over 0 .. 2^15 - 1
        keep = (fields >= threshold).view(x.shape)
        return x * keep * ((1 << 15) / ((1 << 15) - threshold))


class LoRALinear(nn.Module):
    """y = base_layer(x) + scaling · dropout(x) Aᵀ Bᵀ: a frozen linear plus a trainable low-rank update.

    `base_layer` is an nn.Linear or a qwenkit.quant QuantizedLinear (whose float fallback carries
    gradients to x). lora_A [r, in] starts as peft's (Kaiming uniform), lora_B [out, r] at zero, so
    a new adapter changes nothing. scaling = alpha / r, or alpha / sqrt(r) with rsLoRA. The update
    runs in the adapter's dtype (float32 by default) and is added in the base output's dtype.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = _device_of(base_layer)
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = LoRADropout(dropout) if dropout else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):  # (autocast picks the matmul dtype itself)
            x = x.to(self.lora_A.dtype)
        update = x @ self.lora_A.t() @ self.lora_B.t()
        return y + (update * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing base + update. A float base is that linear, updated in place (its
        weight may be a block of a joint q/k/v or gate/up tensor, qwenkit.runtime.fused, which stays whole). A
        quantized base is dequantized: the result is a float linear in the dtype of its scales
        (quantize the merged model again if wanted)."""
        base = self.base_layer
        update = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        if not isinstance(base, QuantizedLinear):
            base.weight.copy_(base.weight.float() + update)
            return base
        weight = base.dequantize(torch.float32) + update
        dtype = base.scales.dtype
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _device_of(module: nn.Module) -> torch.device:
    return next(t.device for t in module.parameters())


# ----------------------------------------------------------------------------- applying

def resolve_targets(model: Model, targets: str | Sequence[str] = "all-linear") -> list[str]:
    """Target names -> the module names of the model's linears they select, in model order.

    `all-linear` is q/k/v/o/gate/up/down in every layer (not lm_head); canonical names (q_proj, ...),
    the Qwen v1 names (c_attn -> q,k,v; c_proj -> o_proj and down_proj; attn.c_proj; mlp.c_proj;
    w1 -> up_proj; w2 -> gate_proj) and fnmatch patterns over module names (`model.layers.1*.mlp.*`,
    `self_attn.*`) are accepted; a comma-separated string or a list.
    """
    candidates = [name for name, m in model.named_modules()
                  if name.rpartition(".")[2] in LAYER_LINEARS and isinstance(m, (nn.Linear, QuantizedLinear))]
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    chosen = set()
    for item in (t.strip() for t in items if t.strip()):
        kinds = LAYER_LINEARS if item == "all-linear" else (item,) if item in LAYER_LINEARS else QWEN7B_TARGETS.get(item)
        if kinds is not None:
            chosen.update(n for n in candidates if n.rpartition(".")[2] in kinds)
            continue
        matched = [n for n in candidates if fnmatch(n, item) or fnmatch(n, "*." + item)]
        if not matched:
            raise AdapterError(f"LoRA target {item!r} matches no linear layer: use all-linear, "
                               f"{', '.join(LAYER_LINEARS)}, the Qwen v1 names {', '.join(QWEN7B_TARGETS)}, or a "
                               "pattern over module names such as 'model.layers.*.self_attn.*'")
        chosen.update(matched)
    if not chosen:
        raise AdapterError(f"no LoRA targets given (targets={targets!r}); the default is all-linear")
    return [n for n in candidates if n in chosen]


def apply_lora(model: Model, targets: str | Sequence[str] = "all-linear", r: int = 64, alpha: float = 16,
               dropout: float = 0.05, train_embeddings: bool = False, train_head: bool = False,
               use_rslora: bool = False, dtype: torch.dtype = torch.float32) -> Model:
    """Freeze `model` and wrap its target linears in LoRALinear, in place; returns the model.

    `train_embeddings` / `train_head` also train the full embedding / lm_head (peft's modules_to_save):
    a base model needs them to learn the ChatML tokens (<|im_end|>) it has never produced. With tied
    embeddings the two are one matrix.
    """
    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise AdapterError(f"LoRA needs r >= 1, alpha > 0 and 0 <= dropout < 1 (got r={r}, alpha={alpha}, "
                           f"dropout={dropout})")
    if lora_layers(model):
        raise AdapterError("the model already has LoRA layers: merge_lora() them first, or load_adapter() "
                           "into them, or start from a freshly loaded model")
    unpack_linears(model)  # LoRA wraps plain nn.Linear (a CPU load packs them)
    names = resolve_targets(model, targets)
    model.requires_grad_(False)
    for name in names:
        model.set_submodule(name, LoRALinear(model.get_submodule(name), r, alpha, dropout, use_rslora, dtype))
    _train_extras(model, train_embeddings, train_head)
    return model


def _train_extras(model: Model, embeddings: bool, head: bool) -> None:
    if head and not isinstance(model.lm_head, nn.Linear):
        raise AdapterError(f"train_head needs a float lm_head, but it is a {type(model.lm_head).__name__}: "
                           "load the model without quantize=, or leave the head frozen")
    if embeddings:
        model.model.embed_tokens.weight.requires_grad_(True)
    if head:
        model.lm_head.weight.requires_grad_(True)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The trainable parameters (LoRA matrices, and embedding / head when trained), by name."""
    return ((name, p) for name, p in model.named_parameters() if p.requires_grad)


def merge_lora(model: Model, quantized: bool = True) -> Model:
    """Fold LoRA updates into their linears, in place: each LoRALinear becomes a plain float nn.Linear.
    A quantized base is dequantized first (a float layer in its scales' dtype); `quantized=False`
    leaves those unmerged instead, keeping their memory saving. Returns the model, all frozen."""
    for name, layer in lora_layers(model).items():
        if quantized or not isinstance(layer.base_layer, QuantizedLinear):
            model.set_submodule(name, layer.merged())
    return model.requires_grad_(False)


# ----------------------------------------------------------------------------- peft format

def _extras_saved(model: Model) -> list[str]:
    """peft modules_to_save names of the trained embedding / head (both when tied: they are one matrix)."""
    return [short for short, module in EXTRA_MODULES.items()
            if getattr(model.get_submodule(module), "weight", None) is not None
            and model.get_submodule(module).weight.requires_grad]


def save_adapter(model: Model, out_dir: str | Path, base_model_name: str | None = None) -> Path:
    """Write the model's LoRA layers (and trained embedding / head) as a peft adapter directory."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers to save: apply_lora() or load_adapter() first")
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    extras = _extras_saved(model)
    for short in extras:
        weight = model.get_submodule(EXTRA_MODULES[short]).weight.detach()
        tied = any(t.data_ptr() == weight.data_ptr() for t in tensors.values())
        tensors[f"{PREFIX}{EXTRA_MODULES[short]}.weight"] = weight.clone() if tied else weight  # safetensors refuses shared memory

    first = next(iter(layers.values()))
    rank_pattern = {n: m.r for n, m in layers.items() if m.r != first.r}
    alpha_pattern = {n: m.alpha for n, m in layers.items() if m.alpha != first.alpha}
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
        "revision": None, "inference_mode": True, "r": first.r, "lora_alpha": first.alpha,
        "lora_dropout": dropout, "target_modules": sorted(layers), "modules_to_save": extras or None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": first.use_rslora,
        "fan_in_fan_out": False, "bias": "none", "use_dora": False, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None,
        "ensure_weight_tying": bool(extras) and model.config.tie_word_embeddings,  # peft keeps them one matrix
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Temporary names renamed into place: an interrupted save never leaves a half-written file.
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json, checked for what qwenkit can apply (plain LoRA on linears)."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} is not a peft adapter directory: it has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON ({e}); fix or re-save the adapter") from None
    unsupported = {
        "peft_type": (config.get("peft_type", "LORA") != "LORA", "only LORA adapters are supported"),
        "use_dora": (bool(config.get("use_dora")), "DoRA adapters are not supported; merge them with peft"),
        "fan_in_fan_out": (bool(config.get("fan_in_fan_out")),
                           "fan_in_fan_out is for GPT-2 style Conv1D layers; Qwen's linears are nn.Linear"),
        "bias": (config.get("bias", "none") != "none",
                 "adapters that train biases (bias != 'none') are not supported; merge them with peft"),
        "lora_bias": (bool(config.get("lora_bias")), "lora_bias adapters are not supported"),
        "trainable_token_indices": (bool(config.get("trainable_token_indices")),
                                    "trainable_token_indices is not supported; use modules_to_save"),
    }
    for key, (bad, why) in unsupported.items():
        if bad:
            raise AdapterError(f"{path}: {key}={config.get(key)!r}: {why}")
    return config


def _read_adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = adapter_dir / WEIGHTS_FILE
    try:
        if path.is_file():
            return load_file(str(path))
        if (adapter_dir / "adapter_model.bin").is_file():  # what peft wrote before safetensors
            return torch.load(str(adapter_dir / "adapter_model.bin"), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot read the adapter weights in {adapter_dir} ({e}); re-save them") from None
    raise AdapterError(f"{adapter_dir} has {CONFIG_FILE} but no {WEIGHTS_FILE} (or adapter_model.bin)")


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapter(model: Model, adapter_dir: str | Path) -> Model:
    """Apply a peft LoRA adapter directory to `model`, in place (unmerged; see merge_lora).

    Modules already wrapped by apply_lora() get the saved weights; the others are wrapped now, frozen
    base and float32 adapter. Saved embeddings / head (modules_to_save) replace the model's.
    """
    adapter_dir = Path(adapter_dir)
    config = read_adapter_config(adapter_dir)
    tensors = _read_adapter_tensors(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    replaced: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PREFIX)
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if m is None:  # a modules_to_save tensor, under its own name (older peft: ...modules_to_save.default...)
            module, _, attr = name.replace(".modules_to_save.default", "").rpartition(".")
            for target in canonical_modules(module, model.config):
                replaced[f"{target}.{attr}"] = tensor
            continue
        targets = canonical_modules(m[1], model.config)
        rows = _row_split(model, targets) if m[2] == "B" else [slice(None)] * len(targets)
        for target, part in zip(targets, rows):  # v1's fused c_attn: A is shared, B's rows split q/k/v
            pairs.setdefault(target, {})[m[2]] = tensor[part]
    if not pairs:
        raise AdapterError(f"{adapter_dir}: the adapter holds no LoRA weights")

    existing = lora_layers(model)
    alpha_default = config.get("lora_alpha", 8)  # peft's default; the rank is the saved matrices' own
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{adapter_dir}: {name} has lora_{''.join(ab)} but not both A and B; re-save it")
        layer = existing.get(name)
        if layer is None:
            base = _module(model, name, adapter_dir)
            if not isinstance(base, (nn.Linear, QuantizedLinear)):
                raise AdapterError(f"{adapter_dir}: {name} is a {type(base).__name__}; qwenkit applies LoRA to "
                                   "linear layers only")
            alpha = _pattern_value(config.get("alpha_pattern") or {}, name, alpha_default)
            layer = LoRALinear(base, ab["A"].shape[0], alpha, 0.0, bool(config.get("use_rslora")))
            model.set_submodule(name, layer)
        _copy(layer.lora_A, ab["A"], f"{name}.lora_A", adapter_dir)
        _copy(layer.lora_B, ab["B"], f"{name}.lora_B", adapter_dir)
    for name, tensor in replaced.items():
        module, _, attr = name.rpartition(".")
        _copy(getattr(_module(model, module, adapter_dir), attr), tensor, name, adapter_dir)
    return model


def _module(model: Model, name: str, adapter_dir: Path) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise AdapterError(f"{adapter_dir}: the adapter is for a module {name!r} this model does not have; "
                           "was it made for another architecture?") from None


def _row_split(model: Model, targets: list[str]) -> list[slice]:
    if len(targets) == 1:
        return [slice(None)]
    sizes = [model.get_submodule(t).out_features for t in targets]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice(s, s + n) for s, n in zip(starts, sizes)]


@torch.no_grad()
def _copy(param: torch.Tensor, tensor: torch.Tensor, name: str, adapter_dir: Path) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise AdapterError(f"{adapter_dir}: {name} has shape {tuple(tensor.shape)} but this model needs "
                           f"{tuple(param.shape)}: the adapter was made for another model (its "
                           "base_model_name_or_path says which)")
    param.copy_(tensor)
