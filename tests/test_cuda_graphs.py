"""CUDA graphs of the decode step: the replayed steps compute what the eager steps do, for batch 1
and batched rows at different positions, across attended-length steps, with the int4 kernel inside.

The graph tests need a GPU (CI has none; they ran on an H100 with benchmarks/gpu.py's session);
on the CPU the runner must step aside and change nothing."""

import os

import pytest
import torch

import qwenkit
from qwenkit.loading import build_model
from qwenkit.model import Model
from qwenkit.quant import quantize_model
from qwenkit.runtime.cuda_graphs import LENGTH_STEP, use_cuda_graphs
from qwenkit.runtime.decode import decode_step

from .conftest import randomize, tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def loaded_tiny(device, dtype=torch.float32, int4=False) -> Model:
    """Built as load() builds it: float q/k/v and gate/up as joint tensors (qwenkit.runtime.fused), or, with
    `int4`, int4 blocks (group 32) and an int8 head, whose kernels then run inside the graph."""
    config = tiny_config(vocab_size=151936, max_position_embeddings=1024)
    state = randomize(Model(config), seed=5, scale=0.3).state_dict()
    if int4:
        model = build_model(config, state.items(), torch.float32, torch.device("cpu"))
        quantize_model(model, bits=4, group_size=32).to(device=device, dtype=dtype)
    else:
        model = build_model(config, state.items(), dtype, torch.device(device))
    model.generation_config = {}
    return model


def decode_logits(model, lengths, steps):
    """Prefill rows of the given lengths, then `steps` one-token steps of all rows together (through
    the step a Decoder would hold), each fed random tokens (not its argmax: a bf16 near-tie could
    flip and send the runs apart). Returns the logits and the step."""
    gen = torch.Generator().manual_seed(len(lengths))
    cache = model.new_cache(len(lengths), max(lengths) + steps + 1)
    step = decode_step(model, cache)
    out = []
    with torch.inference_mode():
        for row, n in enumerate(lengths):
            ids = torch.randint(0, 5000, (1, n), generator=gen).to(model.device)
            model(ids, torch.arange(n, device=model.device), cache.rows(row, row + 1))
        pos = torch.tensor(lengths, device=model.device)[:, None]
        for _ in range(steps):
            tokens = torch.randint(0, 5000, (len(lengths), 1), generator=gen).to(model.device)
            out.append(step(tokens, pos if len(lengths) > 1 else pos[0], cache).float())
            pos = pos + 1
    return torch.cat(out, dim=1), step


def eager_and_graphed(model, fn):
    use_cuda_graphs(model, False)
    eager = fn()
    use_cuda_graphs(model)
    try:
        return eager, fn()
    finally:
        use_cuda_graphs(model, False)


def test_runner_steps_aside_on_the_cpu():
    model = loaded_tiny("cpu")
    (eager, _), (graphed, step) = eager_and_graphed(model, lambda: decode_logits(model, [7], 4))
    assert torch.equal(graphed, eager) and not step.graphs.captured


@cuda
@pytest.mark.parametrize("dtype,int4", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("lengths", [[5], [LENGTH_STEP - 3], [5, 40, 17]])
def test_replayed_steps_match_eager(dtype, int4, lengths):
    model = loaded_tiny("cuda", dtype, int4)
    steps = 8
    (eager, _), (graphed, step) = eager_and_graphed(model, lambda: decode_logits(model, lengths, steps))
    # The graph attends to a whole LENGTH_STEP of positions, the later ones masked: the same sums
    # in another order, so equal to rounding.
    tolerance = (1e-4 if dtype == torch.float32 else 2e-2) * eager.abs().max()
    assert torch.allclose(graphed, eager, atol=tolerance, rtol=0)
    if dtype == torch.float32:  # the CUDA path itself (SDPA prefill and decode) against the CPU's
        reference, _ = decode_logits(loaded_tiny("cpu"), lengths, steps)
        assert torch.allclose(eager.cpu(), reference, atol=1e-3 * reference.abs().max(), rtol=0)
    crossed = max(lengths) + steps > LENGTH_STEP
    assert len([k for k in step.graphs.captured if k != "pool"]) == 1 + crossed


@cuda
def test_generate_through_graphs_after_a_cache_is_gone(tok):
    model = loaded_tiny("cuda")  # float32: greedy text free of bf16 near-ties
    prompts = [tok.encode("def fib(n):"), tok.encode("hello there, how are you")]

    def run():
        return [r.token_ids for r in qwenkit.generate_batch(model, tok, prompts, temperature=0, max_new_tokens=12)]
    eager, graphed = eager_and_graphed(model, lambda: (run(), run()))  # the second call: a new cache
    assert graphed == eager


@cuda
@pytest.mark.skipif(not os.environ.get("QWENKIT_TEST_COMPILE"),
                    reason="a minute of torch.compile: set QWENKIT_TEST_COMPILE=1 to run")
@pytest.mark.parametrize("lengths", [[5], [5, 40, 17]])
def test_graphs_of_the_compiled_step_match_eager(lengths):
    model = loaded_tiny("cuda")
    use_cuda_graphs(model, False)
    eager, _ = decode_logits(model, lengths, 8)
    use_cuda_graphs(model)
    qwenkit.compile_decode(model, batch_sizes=(1, 3))
    fast, step = decode_logits(model, lengths, 8)
    assert torch.allclose(fast, eager, atol=1e-4 * eager.abs().max(), rtol=0)
    assert len([k for k in step.graphs.captured if k != "pool"]) == 1  # the compiled step was captured, once
