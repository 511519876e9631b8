"""The one-token decode step a decode loop runs: a plain forward, or one the speed-ups wrap.

`decode_step(model, cache)` makes the step a Decoder holds for its KV cache:
`step(tokens, input_pos, cache_view) -> logits`, the same as `model(tokens, input_pos, cache_view)`.
`qwenkit.compile_decode` gives a model compiled tensor work (its Transformer.blocks) and
`use_cuda_graphs` has it replayed as CUDA graphs; both are recorded here per model (DecodeSetup),
outside the model. What a step builds for its cache (captured graphs, the compiled code's check of
the model) lives in the step, and goes when its Decoder does.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..model import KVCache, Model

if TYPE_CHECKING:
    from .compiled import CompiledBlocks
    from .cuda_graphs import GraphedBlocks


@dataclass
class DecodeSetup:
    """The speed-ups applied to one model's decode steps."""
    compiled: CompiledBlocks | None = None  # qwenkit.compile_decode's Transformer.blocks
    graphs: type[GraphedBlocks] | None = None  # use_cuda_graphs: what replays a step's graphs (on a GPU)


# Keyed weakly by the model: a setup refers to the model's parts, never to the model itself.
_SETUPS: weakref.WeakKeyDictionary[Model, DecodeSetup] = weakref.WeakKeyDictionary()


def decode_setup(model: Model) -> DecodeSetup:
    """The model's setup, made (with nothing applied) on first use."""
    return _SETUPS.setdefault(model, DecodeSetup())


def decode_step(model: Model, cache: KVCache) -> Callable[[torch.Tensor, torch.Tensor, KVCache], torch.Tensor]:
    """The step a loop decoding into `cache` (and views of it) calls for each one-token step."""
    setup = _SETUPS.get(model)
    if setup is None or (setup.compiled is None and setup.graphs is None):
        return model
    return WrappedStep(model, setup)


class WrappedStep:
    """One-token steps through the compiled blocks and/or CUDA graphs; other calls run the plain forward."""

    def __init__(self, model: Model, setup: DecodeSetup):
        self.model, self.setup = model, setup
        self.graphs = setup.graphs(model.model) if setup.graphs is not None else None
        self.checked = False  # whether the compiled blocks were found to fit the model

    def __call__(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if tokens.shape[1] != 1:
            return self.model(tokens, input_pos, cache)
        net = self.model.model
        blocks = self._blocks()
        inputs = net.step_inputs(tokens, input_pos, cache)
        hidden = self.graphs(tokens, inputs, blocks) if self.graphs is not None else None
        if hidden is None:
            hidden = blocks(tokens, inputs.rope, inputs.mask, inputs.write_pos, inputs.cache, inputs.q_scale)
        return self.model.lm_head(hidden)

    def _blocks(self) -> Callable:
        compiled = self.setup.compiled
        if compiled is None:
            return self.model.model.blocks
        if not self.checked:  # once per step (per cache), not per call: see compiled.py
            if not compiled.fits(self.model.model):
                self.setup.compiled = None
                return self.model.model.blocks
            self.checked = True
        return compiled
