"""compile_decode: the compiled one-token step computes what the eager model does, for batch 1 and
batched rows at different positions, with the int4/int8 kernels inside it, and never recompiles at
new cache lengths or batch sizes after its warm-up.

Inductor needs minutes of CPU for even this tiny model (C++ compiles), far over the fast tier's
budget, so these run only when asked: QWENKIT_TEST_COMPILE=1 pytest tests/test_compiled.py."""

import os

import pytest
import torch

import qwenkit
from qwenkit.loading import build_model
from qwenkit.model import Model
from qwenkit.quant import quantize_model
from qwenkit.quant.linear import Int8Linear
from qwenkit.runtime.decode import decode_setup, decode_step

from .conftest import randomize, tiny_config

pytestmark = pytest.mark.skipif(not os.environ.get("QWENKIT_TEST_COMPILE"),
                                reason="minutes of torch.compile: set QWENKIT_TEST_COMPILE=1 to run")


def loaded_tiny(kind: str) -> Model:
    """Built as load() builds it: float q/k/v and gate/up as joint tensors (qwenkit.runtime.fused), or, for
    "int4", int4 blocks (group 32) and an int8 head, both kernels running inside the compiled step; "windowed",
    float with a 6-position window on layer 0 (a ring cache) and an int8 KV cache."""
    config = tiny_config(vocab_size=151936, hidden_size=64, intermediate_size=128, head_dim=16)
    state = randomize(Model(config), seed=5, scale=0.3).state_dict()
    model = build_model(config, state.items(), torch.float32, torch.device("cpu"))
    model.generation_config = {}
    if kind == "windowed":
        model.set_window_attention("6:1")
        model.set_kv_cache("int8")
    return quantize_model(model, bits=4, group_size=32) if kind == "int4" else model


# float32 activations, so eager and compiled agree to rounding (in bf16, inductor's fused fp32
# arithmetic rounds less often than eager's op-by-op bf16, and logits differ by ~1 %).
@pytest.fixture(scope="module", params=["int4", "float", "windowed"])
def compiled(request):
    model = loaded_tiny(request.param)
    seconds = qwenkit.compile_decode(model, batch_sizes=(1, 3))
    assert seconds > 0 and qwenkit.compile_decode(model) == 0  # idempotent
    return model


def eager_and_compiled(model, fn):
    setup = decode_setup(model)
    compiled, setup.compiled = setup.compiled, None
    try:
        eager = fn()
    finally:
        setup.compiled = compiled
    return eager, fn()


def decode_logits(model, batch, max_len):
    """Prefill rows of different lengths, then three one-token steps; the logits of every step."""
    gen = torch.Generator().manual_seed(batch)
    cache = model.new_cache(batch, max_len)
    step = decode_step(model, cache)  # as a Decoder holds it
    lengths = [5 + 3 * i for i in range(batch)]
    out = []
    with torch.inference_mode():
        for row, n in enumerate(lengths):
            ids = torch.randint(0, 5000, (1, n), generator=gen)
            model(ids, torch.arange(n), cache.rows(row, row + 1))
        pos = torch.tensor(lengths)[:, None]
        tokens = torch.randint(0, 5000, (batch, 1), generator=gen)
        for _ in range(3):
            logits = step(tokens, pos, cache)
            out.append(logits.float())
            tokens, pos = logits[:, -1].argmax(-1, keepdim=True), pos + 1
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("batch,max_len", [(1, 40), (1, 90), (3, 40), (5, 64)])
def test_compiled_step_matches_eager(compiled, batch, max_len):
    eager, fast = eager_and_compiled(compiled, lambda: decode_logits(compiled, batch, max_len))
    assert torch.allclose(fast, eager, atol=1e-4 * eager.abs().max(), rtol=0)
    assert torch.equal(fast.argmax(-1), eager.argmax(-1))


def test_no_recompile_after_warm_up(compiled):
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    for batch, max_len in ((1, 33), (2, 77), (4, 50), (1, 120)):
        decode_logits(compiled, batch, max_len)
    assert counters["stats"]["unique_graphs"] == before


def test_generate_through_the_compiled_step(compiled, tok):
    prompts = [tok.encode("def fib(n):"), tok.encode("hello there, how are you")]
    eager, fast = eager_and_compiled(compiled, lambda: [
        r.token_ids for r in qwenkit.generate_batch(compiled, tok, prompts, temperature=0, max_new_tokens=6)])
    assert fast == eager


def test_a_changed_model_decodes_eagerly_until_compiled_again():
    """The compiled step skips torch.compile's per-call guards on the model's modules; it checks
    them itself once per decode loop's step instead."""
    model = loaded_tiny("float")
    qwenkit.compile_decode(model)
    mlp = model.model.layers[1].mlp
    mlp.down_proj = Int8Linear.from_float(mlp.down_proj)
    with pytest.warns(UserWarning, match="changed after qwenkit.compile_decode"):
        changed = decode_logits(model, 1, 64)
    assert decode_setup(model).compiled is None
    assert torch.equal(changed, decode_logits(model, 1, 64))  # eager from then on
    assert qwenkit.compile_decode(model) > 0
    assert torch.allclose(decode_logits(model, 1, 64), changed, atol=1e-4 * changed.abs().max(), rtol=0)
