"""Tensor-parallel inference on torch.distributed: `torchrun --nproc-per-node N -m qwenkit generate --tp N ...`.

The plan is applied from outside the model by swapping each projection for its shard (model.py stays plain):
- q/k/v and gate/up are split by output rows: rank r holds query heads [r·H/N, (r+1)·H/N), the KV heads those
  queries read (GQA: n_kv/N of them, so the KV cache of a rank holds only its heads) and 1/N of the MLP's width.
  Their biases are split with them. Nothing crosses ranks: each rank attends over its own heads.
- o_proj and down_proj are split by input columns: each rank's product is a partial sum, added across ranks by
  one all-reduce (a forward hook). Their biases stay on rank 0 alone (zero elsewhere), so they are added once.
- lm_head is split over the vocabulary (ceil(V/N) rows a rank); the logits are all-gathered, so every rank
  holds all of them and samples alike. Rank 0 then broadcasts the token ids it drew (generate.Decoder reads
  `model.tensor_parallel`, which `connect` sets) so that the ranks can never diverge.
- The embedding stays whole on every rank: a lookup reads a few rows, so a split table would save memory only
  (1/N of V·D) at the price of one more all-reduce per forward; the tied head gets its own 1/N shard.
- Quantized linears (qwenkit.quant.linear's int8 and int4) split along their stored tensors: int8 rows or
  columns with their per-row scales, int4 packed columns at group boundaries only (an error names the sizes
  where a shard would cut a group). LoRA layers split their base, and A (row layers) or B (column layers).

Module names and types stay those of the plain model, so quantizing or packing a shard as it loads works
unchanged. `shard_model` splits a loaded model; `load(..., tensor_parallel=tp)` (qwenkit.loading) instead reads
only this rank's slice of each tensor of a float safetensors checkpoint (`read_shard`), so a rank holds ~1/N
of the weights (plus the whole embedding); a GGUF file or a quantized checkpoint is read whole, each layer cut
to its shard as soon as it is whole (`SplitAsLoaded`), so a rank never holds more than one whole layer.

The layer split (`--devices cuda:0,cuda:1`: one process, consecutive blocks on each device) is the last section.
"""

from __future__ import annotations

import bisect
import copy
import dataclasses
import functools
import itertools
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .errors import QwenkitError
from .quant.linear import Int4Linear, Int8Linear, frozen

# Ranks wait for each other between a chat's replies (for as long as its user types), and for the slowest to load:
# a rank that dies is noticed through its closed connection, or torchrun stops the rest, not through this timeout.
WAIT = timedelta(days=1)
# Within a forward the ranks meet a layer apart: a rank that does not come in this time is stuck (or stopped), and
# the others end with an error rather than wait for it. QWENKIT_TP_TIMEOUT (seconds) overrides it.
STEP_WAIT = timedelta(minutes=10)

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


@dataclass(frozen=True)
class TensorParallel:
    """This process's place among the `size` ranks torchrun started (the whole world: one model split over all of
    them), and the collectives the plan needs. The forwards' collectives and tokens go through `steps` (a group
    with STEP_WAIT's timeout; None: the default group); waits of any length (inputs, loading) through the
    default group."""
    rank: int
    size: int
    steps: dist.ProcessGroup | None = None
    shared: SharedMemoryCollectives | None = None  # ranks of one machine: the steps' collectives through it

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.shared is not None and self.shared.takes(t, reduce=True):
            return self.shared.all_reduce(t)
        dist.all_reduce(t, group=self.steps)
        return t

    def gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` side by side on the last dimension (equal shapes on every rank)."""
        t = t.contiguous()
        if self.shared is not None and self.shared.takes(t):
            parts = list(self.shared.all_gather(t).view(self.size, *t.shape))
        else:
            parts = [torch.empty_like(t) for _ in range(self.size)]
            dist.all_gather(parts, t, group=self.steps)
        return torch.cat(parts, dim=-1)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` on every rank (in place)."""
        if self.shared is not None and self.shared.takes(t):
            return t.copy_(self.shared.all_gather(t)[0].view(t.shape))
        dist.broadcast(t, src=0, group=self.steps)
        return t

    def from_rank0(self, value):
        """Rank 0's `value` (any picklable object) on every rank."""
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order, on every rank."""
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    @contextmanager
    def together(self, what: str):
        """Run the body on every rank, then agree: if it failed on any rank, every rank raises one error naming
        the ranks and their errors (rank 0 reports it), rather than the others waiting for a rank that left."""
        error = None
        try:
            yield
        except Exception as e:  # (KeyboardInterrupt and exits leave at once: torchrun stops the rest)
            error = f"{type(e).__name__}: {e}"
        failed = [(rank, e) for rank, e in enumerate(self.gather_objects(error)) if e is not None]
        if failed:
            raise QwenkitError(f"{what} failed on {len(failed)} of {self.size} ranks: "
                               + "; ".join(f"rank {rank}: {e}" for rank, e in failed))


class SharedMemoryCollectives:
    """The forwards' collectives of ranks on one machine through one shared memory area (qwenkit's kernels,
    cpu.cpp's "collectives through shared memory"): microseconds where gloo's loopback sockets took ~1.8 ms an
    all-reduce of one token's hidden state (2 ranks, one thread each, this 2-core machine), which a decode step
    meets twice a layer. Rank 0 makes the area (a file in /dev/shm, removed once every rank has mapped it, so
    nothing is left behind); the ranks then count their steps alike. Not while torch.compile traces (the
    compiled step keeps torch.distributed's traceable collectives)."""

    SLOT_BYTES = 4 << 20  # a rank's part of one step; larger tensors take several steps

    def __init__(self, ops, area: torch.Tensor, rank: int, size: int, timeout: float):
        self.ops, self.area, self.rank, self.size, self.timeout = ops, area, rank, size, timeout
        self.step = 1  # the next step (the area's counters start at 0)

    @classmethod
    def open(cls, rank: int, size: int, timeout: float) -> SharedMemoryCollectives | None:
        """Every rank's view of one new area (a collective call); None, on every rank, where qwenkit's kernels
        are not built here."""
        import mmap
        import tempfile

        from .runtime.cpu_plan import kernel_ops

        ops = kernel_ops()
        if not all(TensorParallel(rank, size).gather_objects(ops is not None)):
            return None
        nbytes = 64 * size + 2 * size * cls.SLOT_BYTES
        path = None
        if rank == 0:
            fd, path = tempfile.mkstemp(prefix="qwenkit-tp-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            os.ftruncate(fd, nbytes)
            os.close(fd)
        try:
            shared = TensorParallel(rank, size).from_rank0(path)
            with open(shared, "r+b") as f:
                area = torch.frombuffer(mmap.mmap(f.fileno(), nbytes), dtype=torch.uint8)
            area[64 * rank + 8:64 * rank + 16].view(torch.int64)[0] = os.getpid()  # (so that others see it go)
            dist.barrier()
        finally:  # also when a rank failed to map it: the file would hold its memory until a reboot
            if path is not None:
                os.unlink(path)
        return cls(ops, area, rank, size, timeout)

    def takes(self, t: torch.Tensor, reduce: bool = False) -> bool:
        return t.device.type == "cpu" and t.is_contiguous() and not torch.compiler.is_compiling() and (
            not reduce or t.dtype in (torch.float32, torch.bfloat16))

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        self.step = self.ops.shm_all_reduce(t, self.area, self.rank, self.size, self.SLOT_BYTES, self.step,
                                            self.timeout)
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """[size, t.numel()]: every rank's t."""
        out, self.step = self.ops.shm_all_gather(t, self.area, self.rank, self.size, self.SLOT_BYTES, self.step,
                                                 self.timeout)
        return out


def start(size: int, device: torch.device | str) -> tuple[TensorParallel, torch.device | str]:
    """Join the process group torchrun started for `--tp size`; returns it and the device this rank runs on
    (cuda:LOCAL_RANK for CUDA, else `device`, resolved already: not "auto"). Errors name the fix where torchrun is
    missing or its world differs from `size`."""
    if size < 1:
        raise QwenkitError(f"--tp {size}: give the number of processes to split the model over (1 or more)")
    env = os.environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        raise QwenkitError(f"--tp {size} runs one process per shard, started by torchrun: "
                           f"torchrun --nproc-per-node {size} -m qwenkit ... --tp {size}")
    world, rank, local_rank = int(env["WORLD_SIZE"]), int(env["RANK"]), int(env.get("LOCAL_RANK", 0))
    if world != size:
        raise QwenkitError(f"--tp {size} but torchrun started {world} processes: give --tp {world}, "
                           f"or torchrun --nproc-per-node {size}")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise QwenkitError(f"rank {rank} would use GPU {local_rank} but this machine has "
                               f"{torch.cuda.device_count()}: one GPU per process")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    elif env.get("OMP_NUM_THREADS", "1") == "1":
        # torchrun's default of one thread a rank (most likely not the user's choice): the cores this process may
        # use are divided among this machine's ranks instead, as qwenkit eval does (evals/shards.py).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // int(env.get("LOCAL_WORLD_SIZE", size))))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT)
    step_wait = timedelta(seconds=float(env["QWENKIT_TP_TIMEOUT"])) if "QWENKIT_TP_TIMEOUT" in env else STEP_WAIT
    steps = dist.new_group(timeout=step_wait)
    shared = None
    if not cuda and int(env.get("LOCAL_WORLD_SIZE", size)) == size and env.get("QWENKIT_TP_SHARED_MEMORY") != "0":
        shared = SharedMemoryCollectives.open(rank, size, step_wait.total_seconds())
    if rank:
        # Followers print nothing: rank 0 alone speaks (replies, progress bars, warnings).
        sys.stdout = open(os.devnull, "w")
        os.environ["QWENKIT_NO_PROGRESS"] = "1"
    else:
        # torchrun stops the others with SIGTERM when one fails: say so rather than vanish without a word.
        signal.signal(signal.SIGTERM, _stopped)
    return TensorParallel(rank, size, steps, shared), device


def _stopped(signum, frame):
    print("qwenkit: error: stopped (another rank failed; its error is above)", file=sys.stderr, flush=True)
    os._exit(1)


def finish(code: int) -> int:
    """`code`; a tensor-parallel process leaves at once with it instead (a normal exit could wait on a rank that
    failed, in a collective or in the process group's teardown)."""
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def lost_ranks(error: RuntimeError) -> str | None:
    """What to say when a collective failed because another rank is gone (None: not a tensor-parallel run)."""
    if not dist.is_initialized():
        return None
    return (f"rank {dist.get_rank()} lost the other ranks (one failed? its error comes first): "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}")


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Span:
    """The part of a tensor a rank holds: [start, stop) along `dim` (0: output rows, 1: input columns)."""
    dim: int
    start: int
    stop: int


def plan(config, tp: TensorParallel) -> dict[str, Span]:
    """Module-name suffix -> this rank's span, for the config of the whole model; an error naming the numbers
    where heads, KV heads or the MLP width do not divide by the ranks."""
    n, r = tp.size, tp.rank
    for what, value in (("attention heads", config.num_heads), ("KV heads", config.num_kv_heads),
                        ("MLP width (intermediate_size)", config.intermediate_size)):
        if value % n:
            raise QwenkitError(f"--tp {n}: the model's {value} {what} do not divide among {n} ranks; "
                               f"use a --tp that divides {config.num_heads} heads and {config.num_kv_heads} KV heads")
    q, kv, mlp = config.num_heads // n * config.head_dim, config.num_kv_heads // n * config.head_dim, \
        config.intermediate_size // n
    vocab = vocab_rows(config.vocab_size, n)
    return {"self_attn.q_proj": Span(0, r * q, (r + 1) * q),
            "self_attn.k_proj": Span(0, r * kv, (r + 1) * kv), "self_attn.v_proj": Span(0, r * kv, (r + 1) * kv),
            "mlp.gate_proj": Span(0, r * mlp, (r + 1) * mlp), "mlp.up_proj": Span(0, r * mlp, (r + 1) * mlp),
            "self_attn.o_proj": Span(1, r * q, (r + 1) * q), "mlp.down_proj": Span(1, r * mlp, (r + 1) * mlp),
            "lm_head": Span(0, min(r * vocab, config.vocab_size), min((r + 1) * vocab, config.vocab_size))}


def vocab_rows(vocab_size: int, size: int) -> int:
    """Head rows a rank holds (the last may hold fewer; its logits are padded to this width to be gathered)."""
    return -(-vocab_size // size)


def span_of(module_name: str, spans: dict[str, Span]) -> Span | None:
    """The span of module `module_name` (model.layers.N.self_attn.q_proj, lm_head), or None: held whole."""
    return next((span for suffix, span in spans.items() if module_name == suffix or
                 module_name.endswith("." + suffix)), None)


def local_config(config, tp: TensorParallel):
    """The config of one rank's shard: its heads and MLP width (its KV cache holds its heads alone); the head
    becomes a shard of its own, so it is no longer tied to the (whole) embedding."""
    return dataclasses.replace(config, num_heads=config.num_heads // tp.size,
                               num_kv_heads=config.num_kv_heads // tp.size,
                               intermediate_size=config.intermediate_size // tp.size, tie_word_embeddings=False)


def shard_model(model: nn.Module, tp: TensorParallel, split: Iterable[str] = ()) -> nn.Module:
    """Split `model` (loaded whole, or built on the meta device) in place into this rank's shard and add the
    collectives (`connect`); returns it. `split`: names of layers that are shards already (SplitAsLoaded's).
    Packed CPU layers are unpacked first (pack the shard again afterwards)."""
    from .runtime.fused import JointAttention, JointMLP
    from .runtime.packed import unpack_linears

    config = model.config
    spans = plan(config, tp)
    split = set(split)
    unpack_linears(model)
    for name, module in list(model.named_modules()):
        span = span_of(name, spans)
        if span is not None and name not in split:
            model.set_submodule(name, shard_linear(module, span, keep_bias=span.dim == 0 or tp.rank == 0,
                                                   name=name))
        elif isinstance(module, (JointAttention, JointMLP)):
            module.joint = None  # the joint tensor of the whole siblings: each shard runs its own product
    local = local_config(config, tp)
    for block in model.model.layers:
        block.self_attn.num_heads, block.self_attn.num_kv_heads = local.num_heads, local.num_kv_heads
    model.config = model.model.config = local
    connect(model, tp, config.vocab_size)
    return model


def connect(model: nn.Module, tp: TensorParallel, vocab_size: int) -> None:
    """Hook the collectives onto a shard's current layers (again after a loader swapped them): the all-reduce
    after each row layer, the all-gather of the head's logits; and mark the model for the decode loop."""
    for handle in getattr(model, "_tensor_parallel_hooks", ()):
        handle.remove()
    hooks = [model.lm_head.register_forward_hook(GatherVocab(tp, vocab_size))]
    for block in model.model.layers:
        for layer in (block.self_attn.o_proj, block.mlp.down_proj):
            hooks.append(layer.register_forward_hook(AllReduce(tp)))
    model._tensor_parallel_hooks = hooks
    model.tensor_parallel = tp


class AllReduce:
    """Forward hook of a row-split layer: its output is this rank's partial sum; the sum over ranks replaces it."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp

    def __call__(self, module, inputs, output):
        return self.tp.all_reduce(output)


class GatherVocab:
    """Forward hook of the vocabulary-split head: every rank's logits, padded to one width, gathered and cut to
    the vocabulary."""

    def __init__(self, tp: TensorParallel, vocab_size: int):
        self.tp, self.vocab_size = tp, vocab_size
        self.width = vocab_rows(vocab_size, tp.size)

    def __call__(self, module, inputs, output):
        pad = self.width - output.shape[-1]
        if pad:
            output = torch.nn.functional.pad(output, (0, pad))
        return self.tp.gather_last(output)[..., :self.vocab_size]


# ----------------------------------------------------------------------------- splitting one layer
def shard_linear(layer: nn.Module, span: Span, keep_bias: bool = True, name: str = "") -> nn.Module:
    """This rank's part of `layer`: a layer of the same kind holding `span` of its weight; a row-split layer
    (dim 1) keeps its bias only where `keep_bias` (zero elsewhere, so the all-reduce adds it once)."""
    from .train.lora import LoRALinear

    if isinstance(layer, LoRALinear):
        lora = copy.copy(layer)
        lora._modules = dict(layer._modules, base_layer=shard_linear(layer.base_layer, span, keep_bias, name))
        lora._parameters = dict(layer._parameters)
        part = "lora_B" if span.dim == 0 else "lora_A"  # B's rows are outputs, A's columns inputs
        lora._parameters[part] = nn.Parameter(_part(getattr(layer, part), span).detach(),
                                              requires_grad=getattr(layer, part).requires_grad)
        return lora
    n = span.stop - span.start
    if type(layer) is nn.Linear:
        tensors = {"weight": _part(layer.weight, span)}
    elif isinstance(layer, Int8Linear):
        tensors = {"weight": _part(layer.weight, span),
                   "scales": _part(layer.scales, span) if span.dim == 0 else layer.scales}
    elif isinstance(layer, Int4Linear):
        tensors = _int4_part(layer, span, name)
    else:
        raise QwenkitError(f"tensor parallelism cannot split {name or 'a layer'} of type {type(layer).__name__}: "
                           "it splits nn.Linear, qwenkit's int8 and int4 layers and LoRA layers over them")
    if layer.bias is not None:
        bias = _part(layer.bias, span) if span.dim == 0 else layer.bias
        tensors["bias"] = bias if keep_bias else torch.zeros_like(bias)
    shard = copy.copy(layer)
    shard._parameters = {k: None if v is None else frozen(_owned(tensors.get(k, v)))
                         for k, v in layer._parameters.items()}
    if isinstance(shard, (Int8Linear, Int4Linear)):
        shard._changed()  # (its kernels were made from the whole layer's tensors)
    if span.dim == 0:
        shard.out_features = n
    else:
        shard.in_features = n
    return shard


def _part(t: torch.Tensor, span: Span) -> torch.Tensor:
    return t.narrow(span.dim, span.start, span.stop - span.start)


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A copy of its own (a slice would keep the whole tensor alive); meta tensors as they are."""
    return t.detach() if t.is_meta else t.detach().clone(memory_format=torch.contiguous_format)


def _int4_part(layer: Int4Linear, span: Span, name: str) -> dict[str, torch.Tensor]:
    if span.dim == 0:
        return {k: _part(getattr(layer, k), span) for k in ("qweight", "scales", "zeros")}
    g = layer.group_size
    if span.start % g or span.stop % g:
        raise QwenkitError(f"tensor parallelism would cut {name or 'an int4 layer'}'s groups of {g} inputs: "
                           f"its shard holds inputs {span.start}..{span.stop}; use a --tp that divides "
                           f"{layer.in_features // g} groups, or a smaller group size")
    if layer.perm is not None:
        raise QwenkitError(f"{name or 'an int4 layer'} has act-order groups (scattered over its inputs): "
                           "tensor parallelism cannot split it by input")
    return {"qweight": _part(layer.qweight, Span(1, span.start // 2, span.stop // 2)),
            "scales": _part(layer.scales, Span(1, span.start // g, span.stop // g)),
            "zeros": _part(layer.zeros, Span(1, span.start // g, span.stop // g))}


# ----------------------------------------------------------------------------- loading a shard
def read_shard(stored_tensors: Iterable[tuple[str, Any]], config, tp: TensorParallel,
               ) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, unread tensor) pairs of a float checkpoint (loading.hf.sliceable_tensors) -> (canonical
    name, tensor) pairs of this rank's shard (for a model built by `shard_model` on the meta device), each read a
    slice at a time (safetensors' get_slice): a rank reads ~1/N of the split tensors' bytes. Qwen v1's fused
    c_attn is three blocks (q, k, v): each is cut to its span, not the fused rows. A tied head gets its rows of
    the embedding."""
    from .checkpoint_names import canonical_modules

    spans = plan(config, tp)
    for name, stored in stored_tensors:
        module, _, attr = name.rpartition(".")
        targets = canonical_modules(module, config)
        rows = _shape(stored)[0] // len(targets)  # c_attn: q, k and v of one width, one after another
        for i, target in enumerate(targets):
            span = span_of(target, spans)
            if target == "model.embed_tokens" and config.tie_word_embeddings:
                yield "lm_head.weight", _read(stored, spans["lm_head"])
            if span is None:  # whole (Qwen v1: its block of c_attn)
                part = Span(0, i * rows, (i + 1) * rows)
            elif span.dim == 0:
                part = Span(0, i * rows + span.start, i * rows + span.stop)
            else:  # a row layer: its columns; its bias whole, on rank 0 (added once)
                part = span if attr == "weight" else Span(0, 0, rows)
            tensor = _read(stored, part)
            if span is not None and span.dim == 1 and attr == "bias" and tp.rank:
                tensor = torch.zeros_like(tensor)
            yield f"{target}.{attr}", tensor


def _shape(stored) -> tuple[int, ...]:
    return tuple(stored.get_shape() if hasattr(stored, "get_shape") else stored.shape)


def _read(stored, span: Span) -> torch.Tensor:
    """`span` of a safetensors slice or a tensor, read into memory of its own."""
    index = (slice(span.start, span.stop),) if span.dim == 0 else (slice(None), slice(span.start, span.stop))
    return _owned(stored[index])


class SplitAsLoaded:
    """A file that cannot be read a slice at a time (GGUF blocks, a quantized checkpoint's packed tensors) is read
    whole, but each layer of the plan is cut to this rank's shard the moment its last tensor is in place (qwenkit
    .loading.build_model calls this after each tensor), so that a rank holds its shard and at most the layer
    being read, not the whole model. `split` names the layers cut; shard_model does the rest afterwards."""

    def __init__(self, config, tp: TensorParallel):
        self.spans, self.tp = plan(config, tp), tp  # (errors on heads that do not divide, before any read)
        self.split: set[str] = set()

    def __call__(self, model: nn.Module, tensor_name: str) -> str | None:
        """Cut the layer `tensor_name` belongs to if it is now whole (a tied head made from the embedding
        too); returns the name of the layer cut, else None."""
        for name in (tensor_name.rpartition(".")[0], "lm_head"):
            span = span_of(name, self.spans)
            if span is None or name in self.split:
                continue
            layer = model.get_submodule(name)
            if any(t.is_meta for t in (*layer.parameters(), *layer.buffers())):
                continue
            model.set_submodule(name, shard_linear(layer, span, keep_bias=span.dim == 0 or self.tp.rank == 0,
                                                   name=name))
            self.split.add(name)
            return name
        return None


class LinesFromRank0:
    """A text stream whose lines are rank 0's: rank 0 reads `stream` and sends each line to the others, which
    read it here, so that every rank's chat follows the same inputs."""

    def __init__(self, stream, tp: TensorParallel):
        self.stream, self.tp = stream, tp

    def readline(self) -> str:
        return self.tp.from_rank0(self.stream.readline() if self.tp.rank == 0 else None)

    def read(self) -> str:
        return self.tp.from_rank0(self.stream.read() if self.tp.rank == 0 else None)

    def isatty(self) -> bool:
        return self.tp.from_rank0(self.stream.isatty() if self.tp.rank == 0 else None)


class LeadingDecoder:
    """Rank 0's Decoder under `serve --tp`: every call that runs the model is sent to the other ranks before it is
    made, and their own Decoders (`follow`) make the same call, so that every rank runs the same forwards in the
    same order (rank 0's tokens, which every Decoder takes, keep their rows alike). Everything else reads rank 0's
    Decoder."""

    def __init__(self, decoder, tp: TensorParallel):
        self.decoder, self.tp = decoder, tp
        self._send("decoder", dict(max_batch=decoder.cache.batch_size, max_len=decoder.max_len,
                                   prefill_chunk=decoder.prefill_chunk))

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def _send(self, *call) -> None:
        self.tp.from_rank0(call)

    def begin(self, request):
        self._send("begin", request)
        return self.decoder.begin(request)

    def advance(self):
        self._send("advance")
        return self.decoder.advance()

    def step(self):
        self._send("step")
        return self.decoder.step()

    def cancel(self, row) -> None:
        if row in self.decoder.rows:
            self._send("cancel", self.decoder.rows.index(row))
        self.decoder.cancel(row)

    def embed(self, token_ids):
        self._send("embed", token_ids)
        return self.decoder.embed(token_ids)

    def drop_pending(self) -> None:
        self._send("drop_pending")
        self.decoder.drop_pending()

    def clear(self) -> None:
        self._send("clear")
        self.decoder.clear()


def follow(model: nn.Module, tokenizer, tp: TensorParallel, draft=None) -> None:
    """A rank other than 0 under `serve --tp`: make the Decoder calls rank 0's LeadingDecoder sends, until it
    says stop. `draft`: this rank's drafter, made as rank 0's (qwenkit.speculative), so that both draft the same
    tokens from the same agreed sequence and run the same checking forwards."""
    from .generate import Decoder

    decoder = None
    while True:
        name, *args = tp.from_rank0(None)
        if name == "stop":
            return
        if name == "decoder":
            decoder = Decoder(model, tokenizer, draft=draft, **args[0])
        elif name == "cancel":
            decoder.cancel(decoder.rows[args[0]])
        else:
            try:
                getattr(decoder, name)(*args)
            except Exception:  # (rank 0 meets the same error, in the same state, and ends that request)
                pass


# ----------------------------------------------------------------------------- layer split
# `load(..., devices=["cuda:0", "cuda:1"])` / `--devices cuda:0,cuda:1` (or "auto": every visible GPU) runs the
# model in one process over several devices, llama.cpp's --split-mode layer: consecutive blocks on each device,
# in proportion to its free memory, the embedding on the first and the final norm and head on the last. Like the
# tensor-parallel plan it is applied from outside the model: module moves, and hooks that move the activations
# at the boundaries. The hidden states and logits come back to the first device (model.device, where the decode
# loop keeps its tokens), and each layer's KV cache is made on its layer's device (Model.new_cache).

SPLIT_KINDS = ("cpu", "cuda")


def split_devices(spec: str | Iterable[str | torch.device]) -> list[torch.device]:
    """The devices a layer split runs on: a list, a comma-separated string ("cuda:0,cuda:1"), or "auto" (every
    visible GPU; the CPU alone where there is none). Errors name the fix: an unknown device, a GPU that does not
    exist, one listed twice (the CPU may repeat: its segments share one memory, which checks a split without
    GPUs), devices of different kinds."""
    if isinstance(spec, str) and spec.strip() == "auto":
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())] or [torch.device("cpu")]
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(d) for d in spec]
    if not names or "" in names:
        raise QwenkitError(f"devices {spec!r}: list devices separated by commas, e.g. cuda:0,cuda:1 (or auto)")
    devices = [_split_device(name) for name in names]
    if len({d.type for d in devices}) > 1:
        raise QwenkitError(f"devices {','.join(names)} mix {' and '.join(sorted({d.type for d in devices}))}: a "
                           "layer split runs on devices of one kind")
    twice = next((d for i, d in enumerate(devices) if d.type == "cuda" and d in devices[:i]), None)
    if twice is not None:
        raise QwenkitError(f"devices {','.join(names)} name {twice} twice: list each GPU once")
    return devices


def _split_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise QwenkitError(f"unknown device {name!r}: a layer split runs on cpu or cuda:N devices") from None
    if device.type not in SPLIT_KINDS:
        raise QwenkitError(f"device {name!r}: a layer split runs on cpu or cuda:N devices")
    if device.type == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    index = device.index if device.index is not None else torch.cuda.current_device() if count else 0
    if index >= count:
        raise QwenkitError(f"device {name!r} does not exist: " + (
            f"this machine has {count} GPU{'s' if count > 1 else ''} (cuda:0 to cuda:{count - 1})" if count
            else "no CUDA GPU is visible here"))
    return torch.device("cuda", index)


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: the GPU's (torch.cuda.mem_get_info), or the memory available to processes."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available


def plan_layers(num_layers: int, block_size: int, embed_size: int, head_size: int, free: list[int]) -> list[int]:
    """How many consecutive blocks each device holds, for devices with `free` memory each (in any unit): the
    whole model (embedding on the first device, blocks, final norm and head on the last, sizes in any other
    unit) is laid end to end and cut in proportion to `free`; a block goes to the device its middle falls on.
    Every device holds at least one block."""
    if len(free) > num_layers:
        raise QwenkitError(f"{len(free)} devices for a model of {num_layers} layers: each device holds one layer "
                           f"or more; list at most {num_layers} devices")
    if min(free) <= 0:
        raise QwenkitError(f"device {free.index(min(free))} of the split has no free memory")
    total = embed_size + num_layers * block_size + head_size
    ends = [total * share / sum(free) for share in itertools.accumulate(free)]
    counts = [0] * len(free)
    for j in range(num_layers):
        counts[min(bisect.bisect_left(ends, embed_size + (j + 0.5) * block_size), len(free) - 1)] += 1
    while 0 in counts:  # (a device whose share is smaller than a block) one from the device holding the most
        counts[counts.index(max(counts))] -= 1
        counts[counts.index(0)] += 1
    return counts


@dataclass(frozen=True)
class LayerSplit:
    """Where each part of a model goes: segment i of `counts[i]` consecutive blocks on `devices[i]`."""
    devices: tuple[torch.device, ...]
    counts: tuple[int, ...]

    @functools.cached_property
    def layer_devices(self) -> list[torch.device]:
        return [device for device, n in zip(self.devices, self.counts) for _ in range(n)]

    def device_of(self, name: str) -> torch.device:
        """The device of the model's module or tensor `name`: model.layers.N.* on its block's, the final norm and
        the head on the last device, the rest (the embedding) on the first."""
        if name.startswith("model.layers."):
            return self.layer_devices[int(name.split(".")[2])]
        if name.startswith(("model.norm.", "lm_head.")) or name in ("model.norm", "lm_head"):
            return self.devices[-1]
        return self.devices[0]


def plan_split(config, devices: list[torch.device], free: list[int] | None = None) -> LayerSplit:
    """The split of a model of `config` over `devices` in proportion to their free memory (`free`: measured now
    where not given), sizes counted in parameters."""
    from .model import Block

    with torch.device("meta"):
        block_size = sum(p.numel() for p in Block(config, 0).parameters())
    embed_size = config.vocab_size * config.hidden_size
    free = [free_memory(d) for d in devices] if free is None else free
    counts = plan_layers(config.num_layers, block_size, embed_size, embed_size + config.hidden_size, free)
    return LayerSplit(tuple(devices), tuple(counts))


def split_model(model: nn.Module, split: LayerSplit) -> nn.Module:
    """Move `model`'s parts to their devices (a model loaded with the split has them there already) and hook the
    moves of the activations between them; returns the model. A head tied to the embedding gets its own copy
    on the last device when that is another device."""
    if sum(split.counts) != len(model.model.layers):
        raise QwenkitError(f"a split of {sum(split.counts)} layers for a model of {len(model.model.layers)}")
    first, last = split.devices[0], split.devices[-1]
    if last != first:
        _untie_head(model, last)
    model.model.embed_tokens.to(first)
    for block, device in zip(model.model.layers, split.layer_devices):
        _move(block, device)
    model.model.norm.to(last)
    model.lm_head.to(last)
    for handle in getattr(model, "_layer_split_hooks", ()):
        handle.remove()
    segments, hooks = [], []
    start = split.counts[0]
    for device, n in zip(split.devices[1:], split.counts[1:]):
        inputs = SegmentInputs(device)
        segments.append(inputs)
        hooks += [block.register_forward_pre_hook(inputs) for block in model.model.layers[start:start + n]]
        start += n
    hooks.append(model.model.norm.register_forward_hook(BackToFirst(first, segments)))
    hooks.append(model.lm_head.register_forward_pre_hook(MoveInputs(last)))
    hooks.append(model.lm_head.register_forward_hook(BackToFirst(first)))
    model._layer_split_hooks = hooks
    model.layer_split = split
    return model


def _untie_head(model: nn.Module, device: torch.device) -> None:
    """Give the head copies of its own on `device` of the tensors it shares with the embedding (tied weights; an
    int8 table and its tied int8 head): a module's move moves its Parameters, shared ones included."""
    shared = {id(p) for p in model.model.embed_tokens.parameters()}
    for module in model.lm_head.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if id(param) in shared:
                setattr(module, name, nn.Parameter(param.detach().to(device, copy=True),
                                                   requires_grad=param.requires_grad))
    model.config.tie_word_embeddings = False


def _move(block: nn.Module, device: torch.device) -> None:
    from .runtime.fused import JointAttention, JointMLP

    block.to(device)
    for module in block.modules():
        if isinstance(module, (JointAttention, JointMLP)) and module.joint is not None \
                and module.joint.weight.device != device:
            module.joint = None  # its siblings' joint tensor stayed behind: they run as separate products


def to_device(value, device: torch.device):
    """A block's input on `device`: tensors (and tuples of them) moved; the KV cache (each layer's on its
    device already) and None as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    return value


class SegmentInputs:
    """Forward pre-hook of each block of a segment after the first: the block's input on the segment's device.
    The step inputs (rope, mask, write_pos, cache, q_scale: the same objects for every block of a forward) are
    moved by the segment's first block and reused by the others, so they cross once per segment."""

    def __init__(self, device: torch.device):
        self.device = device
        self.held, self.moved = (), ()

    def __call__(self, module, args):
        x, *inputs = args
        if len(inputs) != len(self.held) or any(a is not b for a, b in zip(inputs, self.held)):
            self.held, self.moved = tuple(inputs), tuple(to_device(v, self.device) for v in inputs)
        return (to_device(x, self.device), *self.moved)

    def clear(self) -> None:
        self.held, self.moved = (), ()


class MoveInputs:
    """Forward pre-hook: the module's inputs on `device` (the head's, from the first device to the last)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, module, args):
        return to_device(args, self.device)


class BackToFirst:
    """Forward hook that moves the output (the final norm's hidden states, the head's logits) to the first device,
    where the callers index and sample them; after the final norm the forward is over, and its segments let go
    of the inputs they moved."""

    def __init__(self, device: torch.device, segments: list[SegmentInputs] = ()):
        self.device, self.segments = device, segments

    def __call__(self, module, inputs, output):
        for segment in self.segments:
            segment.clear()
        return output.to(self.device)
