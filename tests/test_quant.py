"""Weight-only int8/int4: packing, the quantizers, the kernels against their dequantized reference,
whole-model accuracy, the portable state dict and its round trip, load(quantize=...)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qwenkit
from qwenkit.cli import build_parser
from qwenkit.loading import _assign
from qwenkit.model import Model
from qwenkit.quant import (
    Int4Linear,
    Int8Linear,
    apply_quantization_config,
    pack_int4,
    quantization_config,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
)
from qwenkit.saving import save_checkpoint

from .conftest import BYTE_VOCAB, assert_greedy, random_tokens, rel_err, tiny_config, tiny_model, write_checkpoint

# Relative error of a quantized layer against F.linear on its own dequantized weight. torch's kernels
# accumulate in fp32, so only the output rounding of the activation dtype remains; qwenkit's also
# round the activations to int8 per block of 32 (tests/test_kernels.py checks that rounding itself).
KERNEL_TOL = {"torch": {torch.float32: 1e-5, torch.bfloat16: 1e-2},
              "qwenkit": {torch.float32: 1e-2, torch.bfloat16: 1.5e-2}}


@pytest.fixture(params=["qwenkit", "torch"])
def kernels(request, monkeypatch):
    """Which CPU kernels the quantized layers run; returns their tolerances."""
    if request.param == "torch":
        monkeypatch.setattr("qwenkit.quant.linear._qwenkit_ops", lambda device, dtype: None)
    else:
        from qwenkit.runtime.cpu_plan import kernel_ops

        if kernel_ops() is None:
            pytest.skip("qwenkit's CPU kernels are not built here")
    return KERNEL_TOL[request.param]


def float_linear(n_out=64, n_in=256, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n_out, n_in, generator=gen) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(n_out, generator=gen))
    return linear


def reference(layer, x):
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.dequantize(torch.float32), bias)


def test_int4_packing_is_low_nibble_first_along_k():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x21, 0x43], [0x0F, 0xF0]]
    rand = torch.randint(0, 16, (48, 96), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(rand)), rand)


def test_rtn_quantizers_round_to_nearest():
    w = torch.randn(40, 256) * 0.1
    w[3] = 0  # an all-zero row must not divide by zero
    q, scales = quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scales.shape == (40,)
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()
    assert (q[3] == 0).all()

    q, scales, zeros = quantize_int4(w, 64, torch.float32)
    assert q.dtype == torch.uint8 and q.max() <= 15 and scales.shape == zeros.shape == (40, 4)
    deq = (q.float().view(40, 4, 64) - zeros[..., None]) * scales[..., None]
    assert ((deq - w.view(40, 4, 64)).abs() <= scales[..., None] / 2 + 1e-6).all()
    assert (deq.reshape(40, 256)[3] == 0).all()
    # Each group's range is kept: its min and max land on q = 0 and q = 15.
    groups = w.view(40, 4, 64)[torch.arange(40) != 3]
    ends = deq[torch.arange(40) != 3]
    assert torch.allclose(ends.amin(-1), groups.amin(-1), atol=1e-6)
    assert torch.allclose(ends.amax(-1), groups.amax(-1), atol=1e-6)


LAYERS = [(Int8Linear, {}), (Int4Linear, {"group_size": 32}), (Int4Linear, {"group_size": 64}),
          (Int4Linear, {"group_size": 128})]


@pytest.mark.parametrize("cls,kwargs", LAYERS, ids=["int8", "int4-g32", "int4-g64", "int4-g128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_layer_matches_its_dequantized_reference(cls, kwargs, dtype, bias, kernels):
    layer = cls.from_float(float_linear(bias=bias).to(dtype), **kwargs)
    assert layer.scales.dtype == dtype
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 256), (5, 3, 256)]:
        x = torch.randn(shape, generator=gen).to(dtype)
        with torch.no_grad():
            fast = layer(x)
        assert layer._kernel[1] is not None, "the CPU kernel should have been used"
        assert fast.shape == (*shape[:-1], 64) and fast.dtype == dtype
        assert rel_err(fast, reference(layer, x)) < kernels[dtype]
        # The fallback, taken under autograd (the kernels have no backward), computes the same.
        x_grad = x.clone().requires_grad_()
        slow = layer(x_grad)
        slow.float().sum().backward()
        assert x_grad.grad is not None and rel_err(slow, fast) < 2 * kernels[dtype]


@pytest.mark.parametrize("layer", [
    Int8Linear.from_float(float_linear(n_in=40).to(torch.bfloat16)),   # bf16 int8 kernel needs K % 16
    Int4Linear.from_float(float_linear(n_out=24), group_size=32),      # int4 packers need N % 16
], ids=["int8-K40", "int4-N24"])
def test_shapes_a_kernel_refuses_fall_back(layer, torch_quant_kernels):
    x = torch.randn(3, layer.in_features, dtype=layer.scales.dtype)
    with torch.no_grad():
        y = layer(x)
    assert layer._kernel[1] is None
    assert rel_err(y, reference(layer, x)) < KERNEL_TOL["torch"][x.dtype]


@pytest.mark.parametrize("cls,kwargs", LAYERS[:2], ids=["int8", "int4-g32"])
def test_large_batches_dequantize_in_chunks_for_the_float_gemm(cls, kwargs, monkeypatch):
    from qwenkit.quant import linear

    monkeypatch.setattr(linear, "int_gemm_prefill", lambda: False)  # as on a CPU without AVX2's integer GEMM
    layer = cls.from_float(float_linear(n_out=100), **kwargs)
    x = torch.randn(2, cls.gemm_min_rows, 256)
    with torch.no_grad():
        whole = layer(x)
        assert layer._kernel is None  # never needed
        layer.dequant_chunk = 256 * 16  # 16 output rows at a time: 7 chunks, the last one short
        assert torch.allclose(layer(x), whole, atol=1e-5)
    assert rel_err(whole, reference(layer, x)) < KERNEL_TOL["torch"][torch.float32]


def test_new_weights_replace_the_prepared_kernel(kernels):
    layer, other = (Int4Linear.from_float(float_linear(seed=s), group_size=64) for s in (0, 1))
    x = torch.randn(2, 256)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict(other.state_dict())  # copies in place
        assert rel_err(layer(x), reference(other, x)) < kernels[torch.float32]
        q = torch.randint(0, 16, (64, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
        layer.qweight = nn.Parameter(pack_int4(q), requires_grad=False)
        assert rel_err(layer(x), reference(layer, x)) < kernels[torch.float32]


def test_a_quantized_model_that_ran_pickles_and_deep_copies(kernels):
    """After its kernels were prepared (a forward), a quantized model saves with torch.save, and a deep copy
    computes with its own tensors: where the kernels read the stored tensors as they are (qwenkit's), changing
    the copy's weights in place changes the copy's outputs only."""
    import copy
    import io

    from qwenkit.quant import linear
    from qwenkit.runtime.fused import fuse_siblings

    model = quantize_model(tiny_model(), bits=4, group_size=32)
    fuse_siblings(model)
    x = torch.randint(0, model.config.vocab_size, (1, 3))
    with torch.no_grad():
        want = model(x)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        assert torch.equal(torch.load(buffer, weights_only=False)(x), want)
        twin = copy.deepcopy(model)
        assert torch.equal(twin(x), want)
        if linear._qwenkit_ops(x.device, torch.float32) is None:
            return  # torch's kernels read a packed copy made once
        for layer in twin.modules():
            if isinstance(layer, Int4Linear):
                layer.scales.mul_(2)  # in place: no new Parameter, so nothing tells the layer
        assert not torch.allclose(twin(x), want) and torch.equal(model(x), want)


def test_siblings_sharing_an_input_run_as_one_fused_kernel(monkeypatch):
    """q/k/v and gate/up as one int4 kernel: the same outputs as the layers run one by one, remade
    when a layer's tensors change, and no fusing across layer kinds, group sizes or for many rows where
    the float GEMM takes them."""
    from qwenkit.quant import linear
    from qwenkit.runtime.fused import joint_product

    def joint(x, *layers):
        y = joint_product(None, x, layers)
        return None if y is None else y.split([layer.out_features for layer in layers], dim=-1)

    q, k, v = (Int4Linear.from_float(float_linear(n_out=n, seed=s), group_size=64)
               for s, n in ((0, 64), (1, 32), (2, 32)))
    x = torch.randn(1, 1, 256)
    with torch.no_grad():
        alone = [layer(x) for layer in (q, k, v)]
        fused = joint(x, q, k, v)
        assert q._fused is not None and q._fused[1] is not None  # the fused kernel ran
        for a, b in zip(fused, alone):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)

        k.load_state_dict(Int4Linear.from_float(float_linear(n_out=32, seed=7), group_size=64).state_dict())
        assert torch.allclose(joint(x, q, k, v)[1], k(x), atol=1e-5)

        other_group = Int4Linear.from_float(float_linear(n_out=32, seed=2), group_size=32)
        int8 = Int8Linear.from_float(float_linear(n_out=32, seed=2))
        for sibling in (other_group, int8, float_linear(n_out=32, seed=2)):
            assert joint(x, q, k, sibling) is None and q._fused[1] is None
        many_rows = torch.randn(1, q.gemm_min_rows, 256)
        monkeypatch.setattr(linear, "int_gemm_prefill", lambda: False)
        assert joint(many_rows, q, k, v) is None  # the float GEMM path instead (tests/test_kernels.py: the integer one)


def test_a_fused_model_runs_quantized_siblings_as_one_kernel():
    """Through the model (runtime.fused's joint projections): q/k/v and gate/up of a quantized model
    take the fused kernel, with the logits of the layers run one by one."""
    from qwenkit.runtime.fused import fuse_siblings

    model = tiny_model()
    quantize_model(model, bits=4, group_size=32)
    x = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        alone = model(x)
        fuse_siblings(model)
        together = model(x)
    attn = model.model.layers[0].self_attn
    for first in (attn.q_proj, model.model.layers[0].mlp.gate_proj):
        assert first._fused is not None and first._fused[1] is not None
    assert torch.allclose(together, alone, atol=1e-4)


def test_glibc_keeps_freed_memory_unless_turned_off():
    code = "from qwenkit.runtime.allocator import keep_freed_memory as k; print(k(), k())"
    for env, expected in (({}, "True True"), ({"QWENKIT_MALLOC_TUNING": "0"}, "False False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.split("\n")[0]
        assert out == expected


# glibc's own accounting (mallinfo2) of a 64 MiB tensor, made and freed: `mapped` bytes in glibc's mmap
# blocks while it lives, `kept` free bytes the heap, or LargeBlocks where the kernels build, holds after it
# is freed.
_MALLINFO = """if True:
    import ctypes, sys, torch
    from qwenkit.runtime.allocator import keep_all_freed_memory, large_block_stats

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    on = keep_all_freed_memory() if sys.argv[1] == "1" else False
    before = libc.mallinfo2()
    block = torch.ones(64 << 20, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd - before.hblkhd
    del block
    print(on, mapped, libc.mallinfo2().fordblks - before.fordblks + large_block_stats()[1])"""


def glibc_version() -> tuple[int, ...]:
    """(major, minor) of the C library if it is glibc, else ()."""
    try:
        name = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):  # not a POSIX system, or no such name
        name = ""
    return tuple(int(x) for x in name.split()[1].split(".")[:2]) if name.startswith("glibc ") else ()


@pytest.mark.skipif(glibc_version() < (2, 33), reason="reads glibc's mallinfo2 (glibc 2.33 or later)")
def test_training_keeps_large_freed_blocks_too():
    """A 64 MiB tensor is above glibc's largest mmap threshold: by default it is its own mapping, given
    back when freed (and faulted in again page by page when made again); keep_all_freed_memory, for
    training, takes it from the heap (or LargeBlocks) and keeps it there once freed. benchmarks/allocator.py
    counts the page faults this saves."""
    seen = {}
    for mode in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", _MALLINFO, mode], capture_output=True, text=True, check=True)
        on, mapped, kept = out.stdout.split()
        seen[mode] = (on, int(mapped), int(kept))
    assert seen["0"][0] == "False" and seen["0"][1] >= 64 << 20, seen
    # (kept: the block less the free heap memory it took first, a few hundred KiB)
    assert seen["1"][0] == "True" and seen["1"][1] == 0 and seen["1"][2] > 48 << 20, seen


def mapped_rss(path) -> int:
    """Bytes of `path` resident in this process's mappings (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) << 10
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_converted_tensors_give_back_the_file_pages_they_were_read_from(tmp_path):
    """A bf16 tensor read from a mapped safetensors file and converted to float32 left the file's pages in
    the process's RSS beside the copy (a bf16 embedding: 270 MiB for the demo) until loading released them."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qwenkit.runtime.allocator import release_file_pages

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(2048, 4096).bfloat16()}, str(path))  # 16 MiB
    with safe_open(str(path), framework="pt") as f:
        read = f.get_tensor("w")
        copy = read.float()
        assert mapped_rss(path) > 15 << 20
        release_file_pages(read)
        assert mapped_rss(path) < 1 << 20
        assert torch.equal(read.float(), copy)  # read again from the file when touched


def mapping_of(address: int) -> tuple[str, str]:
    """The path (or "" for anonymous memory) and the VmFlags of the mapping holding `address` (/proc/self/smaps)."""
    found = None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if line[0] in "0123456789abcdef" and "-" in fields[0]:
                lo, hi = (int(v, 16) for v in fields[0].split("-"))
                found = (fields[5] if len(fields) > 5 else "") if lo <= address < hi else None
            elif found is not None and line.startswith("VmFlags:"):
                return found, line
    raise LookupError(hex(address))


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"),
                    reason="a Linux kernel with transparent huge pages")
def test_a_checkpoint_read_in_place_moves_onto_huge_pages(tmp_path, byte_tokenizer):
    """A quantized checkpoint's layers are read in place from its mapped file, at the file's offsets on 4 KiB
    pages; loading for inference moves them into one anonymous mapping advised for huge pages, each at a
    64-byte boundary (decode ~12-20 % faster on the demo). The embedding, read a row at a time, stays; so does
    everything when loading for training (pack=False)."""
    model = tiny_model(**BYTE_VOCAB, tie_word_embeddings=False)
    quantize_model(model, bits=4, group_size=32, lm_head_bits=4)
    save_checkpoint(model, byte_tokenizer, tmp_path / "q")
    weights = str(tmp_path / "q" / "model.safetensors")

    served, _ = qwenkit.load(tmp_path / "q", dtype="float32", device="cpu")
    trained, _ = qwenkit.load(tmp_path / "q", dtype="float32", device="cpu", pack=False)
    moved = [p for n, p in served.named_parameters() if not n.startswith("model.embed_tokens")]
    assert {mapping_of(p.data_ptr())[0] for p in moved} == {""}
    assert all(p.data_ptr() % 64 == 0 for p in moved)
    assert " hg" in mapping_of(moved[0].data_ptr())[1]  # madvise(MADV_HUGEPAGE)
    assert mapping_of(served.model.embed_tokens.weight.data_ptr())[0] == weights
    assert {mapping_of(p.data_ptr())[0] for p in trained.parameters()} == {weights}
    for (name, a), b in zip(served.named_parameters(), trained.parameters()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(served(IDS[:, :64] % 320), trained(IDS[:, :64] % 320))
    saved, _ = qwenkit.load(save_checkpoint(served, byte_tokenizer, tmp_path / "again"), dtype="float32", device="cpu",
                            pack=False)
    for (name, a), b in zip(saved.named_parameters(), trained.parameters()):
        assert torch.equal(a, b), name


VOCAB = tiny_config().vocab_size
IDS = random_tokens(VOCAB)  # the prompt every logits comparison runs


PORTABLE = {Int8Linear: {"weight": torch.int8, "scales": torch.float32},
            Int4Linear: {"qweight": torch.uint8, "scales": torch.float32, "zeros": torch.float32}}


# Random weights are a worst case: every linear adds its rounding noise (about 0.6 % of its output
# in int8, 6 % in int4 with groups of 64) and nothing in the model damps it. Swapped nibbles or a
# wrong zero point give errors of 100 % and more.
@pytest.mark.parametrize("bits,tol", [(8, 0.05), (4, 0.4)])
def test_quantized_model_keeps_logits_and_saves_only_portable_tensors(bits, tol):
    model = tiny_model()
    with torch.no_grad():
        ref = model(IDS)
        quantize_model(model, bits=bits, group_size=64)
        logits = model(IDS)
    assert rel_err(logits, ref) < tol

    assert type(model.lm_head) is Int8Linear
    assert type(model.model.layers[0].mlp.down_proj) is (Int8Linear if bits == 8 else Int4Linear)
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            own = {k.removeprefix(name + "."): v for k, v in state.items() if k.startswith(name + ".")}
            expected = dict(PORTABLE[type(module)], **({"bias": torch.float32} if module.bias is not None else {}))
            assert {k: v.dtype for k, v in own.items()} == expected, name
    assert quantization_config(model) == {"quant_method": "qwenkit", "bits": bits,
                                          "group_size": 64 if bits == 4 else None, "lm_head_bits": 8,
                                          "modules_not_converted": [], "act_order": False}


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_round_trip_through_meta_model(bits):
    model = quantize_model(tiny_model(tie_word_embeddings=True), bits=bits, group_size=32,
                           skip=["model.layers.1.mlp.down_proj"])
    assert not model.config.tie_word_embeddings  # the head has its own int8 copy now
    assert model.lm_head.weight.dtype == torch.int8 and model.model.embed_tokens.weight.dtype == torch.float32
    qconfig = quantization_config(model)
    assert qconfig["modules_not_converted"] == ["model.layers.1.mlp.down_proj"]

    with torch.device("meta"):
        fresh = Model(model.config)
    apply_quantization_config(fresh, qconfig)
    for name, tensor in model.state_dict().items():
        _assign(fresh, name, tensor.clone())
    assert not [n for n, p in fresh.named_parameters() if p.is_meta]
    assert type(fresh.model.layers[1].mlp.down_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(fresh(IDS), model(IDS))


def test_small_inputs_stay_float_and_bad_arguments_are_refused():
    model = tiny_model()
    with pytest.warns(UserWarning, match="stays in float"):
        quantize_model(model, bits=4, group_size=256)  # the 128-wide layers cannot hold a 256 group
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert type(model.model.layers[0].mlp.down_proj) is Int4Linear
    with pytest.raises(ValueError, match="bits"):
        quantize_model(tiny_model(), bits=3)
    with pytest.raises(ValueError, match="group_size"):
        quantize_model(tiny_model(), bits=4, group_size=48)
    with pytest.raises(ValueError, match="quant_method"):
        apply_quantization_config(tiny_model(), {"quant_method": "gptq", "bits": 4})


def test_load_quantized_checkpoint_generates(tmp_path):
    model = tiny_model()
    config = {"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 256,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False}
    path = write_checkpoint(tmp_path / "tiny", config, model.state_dict())
    with pytest.raises(ValueError, match="int8"):
        qwenkit.load(path, quantize="int3")
    quantized, tok = qwenkit.load(path, dtype="bfloat16", device="cpu", quantize="int4")
    assert type(quantized.model.layers[0].self_attn.q_proj) is Int4Linear
    assert type(quantized.lm_head) is Int8Linear
    result = qwenkit.generate(quantized, tok, [1, 2, 3], temperature=0, max_new_tokens=5)
    assert len(result.token_ids) == 5
    assert_greedy(quantized, tok, [1, 2, 3], result.token_ids)  # the quantized model's own choices
    with torch.no_grad():
        assert rel_err(quantized(IDS), model(IDS)) < 0.4


def test_cli_verbs_take_quantize():
    parser = build_parser()
    for verb in ("chat", "generate", "bench"):
        assert parser.parse_args([verb, "--quantize", "int4"]).quantize == "int4"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--quantize", "int2"])


def test_a_kernel_failing_its_self_check_falls_back():
    class Garbled(Int4Linear):  # a kernel whose conventions differ, as an untested build might
        def _build_kernel(self, device, dtype):
            run = super()._build_kernel(device, dtype)
            return lambda x: -run(x)

    layer = Garbled.from_float(float_linear(), group_size=64)
    x = torch.randn(3, 256)
    with pytest.warns(RuntimeWarning, match="self-check"), torch.no_grad():
        y = layer(x)
    assert layer._kernel[1] is None
    assert rel_err(y, reference(layer, x)) < 1e-5
