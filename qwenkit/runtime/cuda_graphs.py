"""CUDA graphs of the one-token decode step: on by default when a model loads onto a GPU.

    model, tok = qwenkit.load("Qwen/Qwen-7B-Chat", device="cuda")   # graphs on
    qwenkit.load(..., cuda_graphs=False)                           # or --no-cuda-graphs: eager

A batch-1 decode step launches over a thousand kernels, most of them tiny: eagerly, the GPU waits
on Python between them for longer than it spends reading the weights. A captured graph launches them
all at once (benchmarks/results/README.md, "GPU: one H100, 2026-11-27"). Each step copies its
tokens, positions and RoPE angles into the graph's input buffers and replays it.

A graph holds fixed addresses and shapes, so one is captured per KV cache (it lives in the decode
loop's step for that cache, runtime/decode.py, and goes with it), per batch of rows, and per attended
length rounded
up to a multiple of `LENGTH_STEP` positions: the graph attends to that many cached positions and
masks those past each row's own. The first step into a new length runs eagerly (it also prepares
the quantized kernels) and captures; later ones replay. Prefill, training and CPU models never
come here. Float weights changed in place are seen; weights swapped for new tensors, or quantized
layers changed at all, while a cache is in use are not (its graphs keep what they captured): make a
new cache and step (each `generate` call and each `Decoder` makes its own).

With `qwenkit.compile_decode` too, the graphs capture the compiled step.
"""

from __future__ import annotations

import torch

from ..errors import QwenkitError
from ..model import KVCache, Model, StepInputs, Transformer
from .decode import decode_setup

LENGTH_STEP = 256  # attended positions are rounded up to this: few captures, little masked work


def use_cuda_graphs(model: Model, enabled: bool = True) -> None:
    """Replay `model`'s one-token decode steps on CUDA as graphs (or, with enabled=False, stop)."""
    if enabled and getattr(model, "layer_split", None) is not None:
        # A graph is captured from one device's stream: the other devices' kernels would run once, not replay.
        raise QwenkitError("CUDA graphs capture one device's work: a model split over devices decodes without them")
    decode_setup(model).graphs = GraphedBlocks if enabled else None


class GraphedBlocks:
    """A decode step's graphs for one cache: one per (cache rows, attended length, inputs' form)."""

    def __init__(self, net: Transformer):
        self.net = net
        self.captured: dict = {}

    def __call__(self, tokens: torch.Tensor, inputs: StepInputs, blocks) -> torch.Tensor | None:
        """The hidden states of the step `inputs` describe, replayed (or captured, and run), or None
        for a step that is not to be captured: training, the CPU, or a capture of our caller's own."""
        if tokens.device.type != "cuda" or torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
            return None
        cache, write_pos, q_scale = inputs.cache, inputs.write_pos, inputs.q_scale
        length = min(cache.max_len, -(-cache.length // LENGTH_STEP) * LENGTH_STEP)
        key = (cache.k[0].data_ptr(), tuple(cache.k[0].shape), length, write_pos.dim(), q_scale is None,
               torch.is_inference_mode_enabled(), blocks)
        step_inputs = (tokens, *inputs.rope, inputs.positions, write_pos) + (() if q_scale is None else (q_scale,))
        graph = self.captured.get(key)
        if graph is None:
            pool = self.captured.setdefault("pool", torch.cuda.graph_pool_handle())
            graph = self.captured[key] = _CapturedStep(self.net, cache.prefix(length), step_inputs, pool, blocks)
            return graph.first_output
        return graph.replay(step_inputs)


class _CapturedStep:
    """One decode step captured as a CUDA graph, with the input buffers it reads."""

    def __init__(self, net: Transformer, cache: KVCache, inputs: tuple[torch.Tensor, ...], pool, blocks):
        # A graph holds addresses, not tensors: whatever it reads that was made outside it (its
        # inputs, the positions, the cache view) is kept here, or its memory would be reused.
        self.inputs = [t.clone() for t in inputs]
        self.positions = torch.arange(cache.length, device=inputs[0].device)
        self.cache = cache

        def step():
            tokens, cos, sin, input_pos, write_pos, *q_scale = self.inputs
            mask = self.positions <= input_pos[:, None, :, None]  # [B, 1, 1, length]: each row's own positions
            return blocks(tokens, (cos, sin), mask, write_pos, self.cache, q_scale[0] if q_scale else None)

        # Run once outside the capture, on a side stream as torch.cuda.graph asks: this is the real
        # step (it writes this position's keys and values), and it makes what is made lazily (cuBLAS
        # workspaces, quantized kernels' packed weights) before the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.first_output = step()
        torch.cuda.current_stream().wait_stream(side)
        self.first_output.record_stream(torch.cuda.current_stream())
        # The weights it reads too (the quantized layers' kernels, made by the step above, and the
        # joint q/k/v and gate/up tensors of qwenkit.runtime.fused): swapped for new tensors later, they leave
        # this graph stale rather than reading freed memory.
        self.weights = list(net.parameters()) + [getattr(m, name) for m in net.modules() for name in
                                                 ("_kernel", "_fused", "joint") if getattr(m, name, None)]
        self.graph = torch.cuda.CUDAGraph()
        # Graphs of one cache share a memory pool: they never run at once, and each replay's output
        # is copied out before another graph can overwrite it.
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = step()

    def replay(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value)
        self.graph.replay()
        return self.output.clone()
