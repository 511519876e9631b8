"""`load()`: any supported source -> (Model, Tokenizer).

Sources: a Hugging Face checkpoint directory, a `.gguf` file, a hub id (Hugging Face or
`modelscope:`), or `demo`. The model is built on the meta device and each tensor is assigned
as it is read, so peak memory stays near the size of the final weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..checkpoint_names import canonical_names
from ..config import ModelConfig, yarn_for_context
from ..errors import CheckpointError, ConfigError, UnsupportedModelError
from ..model import KV_CACHE_KINDS, Model
from ..progress import progress
from ..quant import autogptq
from ..qwen7b import ChatModel
from ..runtime.allocator import keep_freed_memory, onto_huge_pages, release_file_pages, return_freed_memory
from ..tokenizer import Tokenizer
from . import hf, hub

if TYPE_CHECKING:
    from ..parallel import SplitAsLoaded, TensorParallel
    from .gguf import StoredTensor

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto`: the fastest dtype that is still accurate on the device (bf16 where it has bf16 math)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    from ..runtime.cpu_plan import auto_dtype

    return auto_dtype()  # bf16 where the CPU runs it natively, else float32


def load(model: str | Path = "demo", dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
         quantize: str | None = "auto", adapter: str | Path | None = None,
         compile: bool = False, cuda_graphs: bool = True, pack: bool = True,
         rope_scaling: str | dict | None = None, dynamic_ntk: bool | None = None, logn: bool | None = None,
         train_length: int | None = None, window_attention: str | list | None = None,
         context: int | None = None, kv_cache: str = "float",
         tensor_parallel: TensorParallel | None = None,
         devices: str | list[str | torch.device] | None = None) -> tuple[Model, Tokenizer]:
    """Load a Qwen model and its tokenizer. See the module docstring for the accepted sources.

    `quantize`: "auto", None, "int8", "int4" or "gguf" — weight-only quantization of each linear as it
    is read, so the float model never exists (qwenkit.loading.on_load has the table): "int8" and "int4"
    round to nearest (int4 group 128, lm_head int8), except that a GGUF file's 4-bit blocks become
    int4 exactly; "gguf" keeps a GGUF file's own precision mix (4-bit blocks int4 exactly, wider
    blocks int8, float tensors float). "auto" (the default) is "gguf" for a .gguf file on the CPU
    (the file runs as it was quantized, on the CPU plan's kernels) and None otherwise; None (or
    "none") quantizes nothing as it loads: float weights stay float and a GGUF's blocks are
    dequantized, while a quantized checkpoint's layers (GPTQ, `qwenkit quantize`) stay as saved.

    `adapter`: a peft LoRA adapter directory (qwenkit finetune's, or peft's). It is folded into the
    float linears, as `qwenkit merge` does; over quantized linears it stays a separate update.

    `compile`: torch.compile the one-token decode step now (qwenkit.compile_decode: a one-off
    warm-up; see qwenkit/runtime/compiled.py for when it pays).

    `cuda_graphs`: on a CUDA device, replay one-token decode steps as CUDA graphs (qwenkit/runtime/cuda_graphs.py):
    at batch 1 much faster than launching each step's kernels from Python.

    `pack`: on the CPU, hold bf16 linear weights in an inference layout (qwenkit/runtime/packed.py): read by
    qwenkit's bf16 kernel, or packed for oneDNN; faster decode, the same values. Weights a step reads whole
    (all but the embedding) that were read in place from a mapped file move into memory advised for huge pages
    (runtime/allocator.py onto_huge_pages). With dtype="auto" on a CPU without native bf16, the linear weights
    are then stored in bf16 and the activations stay float32 (the CPU plan, qwenkit/runtime/cpu_plan.py). The
    layers are for inference; pack=False keeps plain nn.Linear in `dtype`, where they were read (fine-tuning
    does; quantizers and LoRA unpack a model themselves).

    `rope_scaling`: RoPE scaling over the checkpoint's, "linear:F", "dynamic:F", "yarn:F", a config-style
    dict, or "none" (plain RoPE); None keeps the checkpoint's (qwenkit.config.rope_scaling_of).
    `dynamic_ntk`, `logn`: Qwen's dynamic NTK and LogN attention for any model, past `train_length` (default:
    a Qwen v1 config's seq_length, else max_position_embeddings); None keeps the config's (Model.set_long_context).
    `window_attention`: attention windows per layer over the config's, "SIZE[:LAYERS],..." or "none"
    (Model.set_window_attention). `context`: the context length wanted; past the model's own, YaRN scaling
    stretches it that far (Qwen2.5's documented recipe; not with `rope_scaling` too). `kv_cache`: "float" (the
    model's dtype) or "int8" keys and values (Model.set_kv_cache: about half the memory).

    `tensor_parallel`: this rank's shard only (qwenkit.parallel: started by parallel.start under torchrun). A float
    checkpoint is read a slice at a time; a GGUF file or a quantized checkpoint is read whole, each layer cut to
    this rank's part once it is whole; with an adapter the whole model is loaded, then split.

    `devices`: split the model by layers over several devices of this process (llama.cpp's --split-mode layer,
    qwenkit.parallel's layer split): a list such as ["cuda:0", "cuda:1"], the same as one string
    "cuda:0,cuda:1", or "auto" for every visible GPU (the CPU alone where there is none). Consecutive blocks go
    on each device in proportion to its free memory, the embedding on the first and the final norm and head on
    the last; each tensor is placed on its device as it is read, so no device holds the whole model. The logits
    come back on the first device (model.device); each layer's KV cache is on its layer's device. Instead of
    `device`, not with `tensor_parallel` or `compile`; decode steps run without CUDA graphs (a graph is captured
    on one device). One device is no split: the same as `device`.
    """
    from .on_load import QUANTIZE_MODES

    if quantize not in (None, "auto", "none", *QUANTIZE_MODES):
        raise ValueError(f"quantize={quantize!r}: use 'auto', None, {', '.join(map(repr, QUANTIZE_MODES))}")
    if kv_cache not in KV_CACHE_KINDS:  # before the model loads
        raise ConfigError(f"KV cache {kv_cache!r}: choose {' or '.join(KV_CACHE_KINDS)}")
    if context is not None and rope_scaling is not None:
        raise ConfigError("give the context length or the rope scaling, not both: --context N is YaRN scaling up "
                          "to N tokens")
    if adapter is not None:
        from ..train.lora import read_adapter_config
        read_adapter_config(adapter)  # a bad adapter directory fails before the model loads
    devices = _devices(devices, device, compile, tensor_parallel)
    path = resolve_source(model)
    device = devices[0]
    asked_auto = isinstance(dtype, str) and dtype == "auto"
    dtype = resolve_dtype(dtype, device)
    # What float linear weights are stored in when packed: for dtype="auto" on the CPU the plan's choice
    # (bf16 where the CPU or qwenkit's kernels multiply bf16 weights fast), else the dtype asked for.
    weight_dtype = dtype
    if asked_auto and device.type == "cpu":
        from ..runtime.cpu_plan import auto_weight_dtype
        weight_dtype = auto_weight_dtype()
    if quantize == "auto":
        quantize = "gguf" if path.is_file() and device.type == "cpu" else None
    quantize = None if quantize == "none" else quantize
    for_inference = pack  # (fine-tuning and the quantizers load with pack=False)
    pack = pack and not compile  # the tracer cannot read oneDNN's packed tensors
    # Packed as the weights arrive, unless an adapter must be folded into plain weights first.
    pack_now = pack and adapter is None
    tp = tensor_parallel
    sliced = False  # whether each tensor was cut to this rank's shard as it was read
    split = None  # with tp: a file read whole, each layer cut to this rank's part once it is whole
    if path.is_file():
        net, tokenizer, split = _load_gguf(path, dtype, device, quantize, pack_now, weight_dtype,
                                           tp if adapter is None else None, devices)
    else:
        if quantize == "gguf":
            raise ValueError(f"quantize='gguf' keeps a GGUF file's own block formats, but {path} is a "
                             "checkpoint directory: use quantize='int8' or 'int4'")
        config = ModelConfig.from_file(path / "config.json")
        files = hf.weight_files(path)
        gptq = autogptq.gptq_config(path, config)  # None unless an AutoGPTQ / GPTQModel checkpoint
        prepare = _quantized_layers(gptq or config.extra.get("quantization_config"), quantize, files)
        tokenizer = Tokenizer.from_pretrained(path)
        total = sum(f.stat().st_size for f in files)
        sliced = tp is not None and prepare is None and adapter is None
        if sliced:  # built as this rank's shard, each float tensor's slice read alone
            from ..parallel import read_shard, shard_model
            prepare, tensors = (lambda net: shard_model(net, tp)), read_shard(hf.sliceable_tensors(files), config, tp)
        else:
            tensors = hf.checkpoint_tensors(files)
            if gptq is not None:
                tensors = autogptq.repacked(tensors, gptq, dtype)
            tensors = canonical_names(tensors, config)
            pack_now = pack_now and tp is None  # split first, then packed
            if tp is not None and adapter is None:  # (an adapter is read for the whole model, then split)
                from ..parallel import SplitAsLoaded
                split = SplitAsLoaded(config, tp)
        net = build_model(config, tensors, dtype, device,
                          description=f"loading {path.name}", total_bytes=total, prepare=prepare,
                          quantize=quantize, pack=pack_now, weight_dtype=weight_dtype, split=split, devices=devices)
        net.generation_config = _read_json(path / "generation_config.json")
    if adapter is not None:
        from ..train.lora import load_adapter, merge_lora
        merge_lora(load_adapter(net, adapter), quantized=False)
    if tp is not None:
        from ..parallel import connect, shard_model
        if sliced:
            connect(net, tp, net.config.vocab_size)  # onto the layers the loader swapped in (quantized, packed)
        else:
            shard_model(net, tp, split.split if split is not None else ())
    if pack and (adapter is not None or (tp is not None and not sliced)):
        from ..runtime.packed import pack_linears
        pack_linears(net, weight_dtype)
    if context is not None:
        rope_scaling = yarn_for_context(net.config, context)
    if rope_scaling is not None:
        net.set_rope_scaling(rope_scaling)
    if (dynamic_ntk, logn, train_length) != (None, None, None):
        net.set_long_context(dynamic_ntk, logn, train_length)
    if window_attention is not None:
        net.set_window_attention(window_attention)
    net.set_kv_cache(kv_cache)
    if device.type == "cpu":
        if for_inference:  # every weight a step reads whole; the embedding gives a row per token
            embedding = {id(p) for p in net.model.embed_tokens.parameters()}
            onto_huge_pages([p for p in net.parameters() if id(p) not in embedding])
        # From here on (faster prefill: qwenkit/runtime/allocator.py); not while loading, whose freed
        # temporaries would stay with the process.
        keep_freed_memory()
        from ..runtime.small_ops import use_small_ops
        use_small_ops(net)  # (a compiled step traces the model's own ops instead: inductor fuses them)
    if device.type == "cuda" and cuda_graphs and len(devices) == 1:
        from ..runtime.cuda_graphs import use_cuda_graphs
        use_cuda_graphs(net)
    if compile:
        from ..runtime.compiled import compile_decode
        compile_decode(net)
    return net, tokenizer


def _devices(devices, device, compile: bool, tensor_parallel) -> list[torch.device]:
    """The devices load() puts the model on: `device` alone, or those `devices` names (more than one: a layer
    split), checked before anything loads."""
    if devices is None:
        return [resolve_device(device)]
    from ..parallel import split_devices

    if str(device) != "auto":
        raise ConfigError(f"give device ({device}) or devices ({devices}), not both")
    if tensor_parallel is not None:
        raise ConfigError("a layer split (devices) runs the model in one process; tensor parallelism splits every "
                          "layer over processes: use one of them")
    devices = split_devices(devices)
    if compile and len(devices) > 1:
        raise ConfigError("torch.compile of the decode step with a layer split (devices) is not supported: load "
                          "without compile, or on one device")
    return devices


def resolve_source(model: str | Path) -> Path:
    """A local path for `model`: demo, an existing path, or a hub id (downloaded)."""
    from .demo import demo_gguf_path

    name = str(model)
    if name == "demo":
        return demo_gguf_path()
    path = Path(name).expanduser()
    if path.exists():
        if path.is_dir() and not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ggufs[0]
            raise CheckpointError(f"{path} has no config.json" + (
                f" and {len(ggufs)} .gguf files: pass one of them" if ggufs else
                ": pass a Hugging Face checkpoint directory (config.json + weights) or a .gguf file"))
        if path.is_file() and path.suffix != ".gguf":
            raise CheckpointError(f"{path} is a file but not a .gguf; pass a .gguf file or a checkpoint directory")
        return path
    if hub.looks_like_hub_id(name):
        return resolve_source(hub.download(name))
    raise CheckpointError(f"{name!r} does not exist: pass a checkpoint directory, a .gguf file, "
                          "a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or demo")


def _load_gguf(path: Path, dtype: torch.dtype, device: torch.device, quantize: str | None = None,
               pack: bool = False, weight_dtype: torch.dtype | None = None, tp: TensorParallel | None = None,
               devices: list[torch.device] | None = None) -> tuple[Model, Tokenizer, SplitAsLoaded | None]:
    """The model and tokenizer of a GGUF file; with `tp`, each layer cut to this rank's part as it loads (and not
    packed: the shard is packed afterwards), with the SplitAsLoaded that did it; `devices`: build_model's."""
    from .gguf import GGUFFile

    gguf = GGUFFile(path)
    config = gguf.config()
    split = None
    if tp is not None:
        from ..parallel import SplitAsLoaded
        split = SplitAsLoaded(config, tp)
    tokenizer = Tokenizer.from_gguf_fields(gguf.tokenizer_fields())
    net = build_model(config, gguf.stored_tensors(), dtype, device, description=f"loading {path.name}",
                      total_bytes=path.stat().st_size, quantize=quantize, pack=pack and split is None,
                      weight_dtype=weight_dtype, split=split, devices=devices)
    net.generation_config = dict(GGUF_GENERATION_DEFAULTS[config.arch], eos_token_id=tokenizer.eos_token_id)
    return net, tokenizer, split


# GGUF files carry no generation_config.json: use what the official chat checkpoints of each
# generation ship (Qwen-7B-Chat; Qwen2/2.5-Instruct; Qwen3 in thinking mode).
GGUF_GENERATION_DEFAULTS = {
    "qwen": {"top_p": 0.8, "top_k": 0, "repetition_penalty": 1.1, "max_new_tokens": 512},
    "qwen2": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_new_tokens": 512},
    "qwen3": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 512},
}


def _quantized_layers(qconfig: dict | None, quantize: str | None, files: list[Path],
                      ) -> Callable[[Model], object] | None:
    """What turns the meta-built model's linears into the empty quantized layers a checkpoint's
    quantization_config describes, before its tensors are assigned; None for a float checkpoint."""
    if qconfig is None:
        return None
    from ..quant import apply_quantization_config
    from ..quant.convert import QUANT_METHOD

    method = qconfig.get("quant_method")
    if quantize is not None:
        raise ValueError(f"this checkpoint is already quantized ({method}, {qconfig.get('bits')} bits); "
                         f"load it without quantize={quantize!r}")
    if method == QUANT_METHOD:
        return lambda net: apply_quantization_config(net, qconfig)
    if method == autogptq.QUANT_METHOD:  # the layers the checkpoint has a qweight for
        names = hf.tensor_names(files)
        return lambda net: autogptq.swap_in_layers(net, qconfig, names)
    raise UnsupportedModelError(f"quantization_config.quant_method {method!r} is not supported; qwenkit loads "
                                f"{QUANT_METHOD!r} checkpoints (written by qwenkit quantize) and "
                                f"{autogptq.QUANT_METHOD!r} ones (AutoGPTQ / GPTQModel, 4 or 8 bits)")


def build_model(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor | StoredTensor]],
                dtype: torch.dtype, device: torch.device, description: str = "loading", total_bytes: int = 0,
                prepare: Callable[[Model], object] | None = None, quantize: str | None = None,
                pack: bool = False, weight_dtype: torch.dtype | None = None,
                split: Callable[[Model, str], str | None] | None = None,
                devices: list[torch.device] | None = None) -> Model:
    """Build on the meta device, then assign each (canonical name, tensor) as it arrives.

    `prepare(model)` runs on the meta-built model first, e.g. to swap in empty quantized linears.
    Float tensors are cast to `dtype`; integer ones (quantized weights) keep theirs; GGUF
    StoredTensors are dequantized to `dtype`. `quantize` (see qwenkit.loading.on_load) turns each
    linear into its quantized layer the moment its weight arrives; a tied head gets its own copy.
    `pack` turns each bf16 linear into its CPU inference layout (qwenkit.runtime.packed) as its weight
    arrives, where the CPU runs one; `weight_dtype` (default `dtype`) is what float linear weights are cast
    to, e.g. bf16 weights for float32 activations. Without packing, float q/k/v and gate/up weights are
    copied into one tensor per layer and group. Either way sibling projections may run as one product
    (qwenkit.runtime.fused). `split(model, name)` runs after each tensor is in place and returns the name of a
    layer it replaced by a part of it, or None (tensor parallelism: qwenkit.parallel.SplitAsLoaded).
    `devices` (more than one): the model split over them by layers (qwenkit.parallel.plan_split, planned before
    any tensor is read), each tensor placed on its part's device as it arrives; `device` is then the first.
    """
    from ..runtime.fused import fuse_siblings, lay_out_siblings
    from ..runtime.packed import inference_layout, pack_linears

    layers_on = None  # a layer split: where each part goes
    if devices is not None and len(devices) > 1:
        from ..parallel import plan_split
        layers_on = plan_split(config, devices)
    place = layers_on.device_of if layers_on is not None else lambda name: device  # each tensor's device, by name
    with torch.device("meta"):
        net = ChatModel(config)
    fuse_siblings(net)
    if prepare is not None:
        prepare(net)
    weight_dtype = weight_dtype or dtype
    tied = net.config.tie_word_embeddings  # (after `prepare`, which may untie the head: a tensor-parallel shard)
    pack = pack and weight_dtype == torch.bfloat16 and device.type == "cpu" and inference_layout(dtype)
    weight_dtype = weight_dtype if pack else dtype
    # Laid out before the tensors arrive (nothing to fuse when they become quantized or packed layers);
    # these parameters are filled in place, so the meta check below cannot see which are missing.
    laid_out = lay_out_siblings(net, dtype, place) if quantize is None and not pack and split is None else set()
    unfilled = set(laid_out)
    mapped: dict[str, torch.Tensor] = {}  # tensors the model holds as read from a mapped file, by name
    expected = dict(net.named_parameters())
    if tied:
        expected.pop("lm_head.weight", None)
    unexpected = []
    with progress(description, total_bytes, bytes_=True, show=total_bytes > 256 << 20) as advance:
        for name, tensor in tensors:
            advance(tensor.nbytes)
            if name == "lm_head.weight" and tied:
                continue  # some tied checkpoints store the head too; it equals the embedding
            if name not in expected:
                # AutoGPTQ writes a zero bias for each bias-free linear it quantizes.
                if not (name.endswith(".bias") and isinstance(tensor, torch.Tensor) and not tensor.any()):
                    unexpected.append(name)
                continue
            param = expected[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"tensor {name} has shape {tuple(tensor.shape)} but the config implies "
                                      f"{tuple(param.shape)}: config.json and the weights do not match")
            read = tensor if isinstance(tensor, torch.Tensor) else None  # perhaps a view of a mapped file
            swap = _quantize_embedding if name == "model.embed_tokens.weight" else _quantize_linear
            if quantize is not None and swap(net, name, tensor, quantize, dtype, place):
                del tensor
                if read is not None:
                    release_file_pages(read)
                return_freed_memory()  # the float copy quantizing made and dropped
            else:
                cast = weight_dtype if _linear_of(net, name)[1] is not None else dtype
                if not isinstance(tensor, torch.Tensor):  # a GGUF StoredTensor
                    tensor = tensor.dequantize(cast)
                tensor = tensor.to(device=place(name), dtype=cast if tensor.is_floating_point() else None)
                if name in laid_out:
                    param.data.copy_(tensor)
                    unfilled.discard(name)
                elif pack and _pack_linear(net, name, tensor, dtype):
                    del tensor
                    return_freed_memory()  # the dense copy packing dropped
                else:
                    _assign(net, name, tensor)
                    if read is not None and tensor.data_ptr() == read.data_ptr():
                        mapped[name] = read  # the model holds the tensor as read: a mapped file's pages
                if read is not None and name not in mapped:
                    release_file_pages(read)  # the model holds a copy, not the file's pages
            if split is not None and (layer := split(net, name)) is not None:
                for key in [key for key in mapped if key.startswith(layer + ".")]:
                    release_file_pages(mapped.pop(key))  # the model holds its part, copied
                return_freed_memory()
    if unexpected:
        raise CheckpointError(f"the checkpoint has {len(unexpected)} tensors this architecture does not use, "
                              f"e.g. {', '.join(unexpected[:5])}: is config.json for these weights?")
    if net.config.tie_word_embeddings and type(net.lm_head) is nn.Linear:
        net.lm_head.weight = net.model.embed_tokens.weight
        if pack:
            pack_linears(net, weight_dtype)  # the head, from the embedding (which keeps its dense table)
    missing = sorted(unfilled) + [n for n, p in net.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:5])}: "
                              "the download may be incomplete")
    if layers_on is not None:
        from ..parallel import split_model
        split_model(net, layers_on)  # (everything is in place: a tied head's copy, and the hooks between devices)
    return net.eval()


def _quantize_linear(net: Model, name: str, weight: torch.Tensor | StoredTensor, mode: str,
                     dtype: torch.dtype, place: Callable[[str], torch.device]) -> bool:
    """Swap the nn.Linear whose weight `name` is for its quantized form, on its device (`place(name)`); False
    where it stays as it is."""
    from .on_load import quantized_linear

    module_name, linear = _linear_of(net, name)
    if linear is None:
        return False
    layer = quantized_linear(name, weight, mode, dtype)
    if layer is None:
        return False
    layer = layer.to(place(name))
    layer.bias = linear.bias  # the bias read already, or its meta placeholder
    net.set_submodule(module_name, layer)
    return True


def _pack_linear(net: Model, name: str, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Swap the nn.Linear whose weight `name` is for its inference layout; False where it stays as it is."""
    from ..runtime.packed import inference_linear

    module_name, linear = _linear_of(net, name)
    if linear is None or weight.dtype != torch.bfloat16:
        return False
    layer = inference_linear(weight, linear.bias, dtype)  # the bias read already, or meta
    if layer is None:
        return False
    net.set_submodule(module_name, layer)
    return True


def _linear_of(net: Model, name: str) -> tuple[str, nn.Linear | None]:
    """(module name, the plain nn.Linear) whose weight `name` is; the linear is None for other tensors."""
    module_name, _, attr = name.rpartition(".")
    linear = net.get_submodule(module_name)
    return module_name, linear if attr == "weight" and type(linear) is nn.Linear else None


def _quantize_embedding(net: Model, name: str, weight: torch.Tensor | StoredTensor, mode: str,
                        dtype: torch.dtype, place: Callable[[str], torch.device]) -> bool:
    """A tied head becomes its own quantized layer, from the embedding's weight; the embedding becomes
    an int8 table where qwenkit.loading.on_load says so (False where it stays float). The table is the int8
    head's own where both are on one device."""
    from .on_load import quantized_embedding

    tied = net.config.tie_word_embeddings
    head_quantized = tied and _quantize_linear(net, "lm_head.weight", weight, mode, dtype, place)
    shared = head_quantized and place("lm_head.weight") == place(name)
    embedding = quantized_embedding(weight, mode, dtype, net.lm_head if shared else None)
    if embedding is not None:
        net.model.embed_tokens = embedding.to(place(name))
    if head_quantized and not (embedding is not None and embedding.weight is net.lm_head.weight):
        net.config.tie_word_embeddings = False  # the head has a quantized copy of its own
    return embedding is not None


def _assign(net: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or delete it") from e
