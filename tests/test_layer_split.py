"""Layer split (qwenkit.parallel, "layer split"): a model's blocks over several devices of one process.

This machine has no GPU, so the split runs over "cpu" listed several times: every hook and per-layer placement runs
(nothing moves), and the outputs must equal the unsplit model's bit for bit. Moves to another device are checked on
the meta device, where nothing computes."""

from __future__ import annotations

import copy
import json
from unittest import mock

import pytest
import torch

from qwenkit.errors import QwenkitError
from qwenkit.parallel import LayerSplit, SegmentInputs, plan_layers, plan_split, split_devices, split_model

from .conftest import BYTE_VOCAB, tiny_model, write_byte_tokenizer
from .test_parallel import _NoTokenizer

CPU, META = torch.device("cpu"), torch.device("meta")
THREE = [CPU] * 3  # 4 layers -> segments of 1, 2 and 1 blocks (the embedding and head weigh on the ends)
PROMPTS = [[3, 14, 15, 92, 65, 35, 89, 79, 32], [2, 71, 82, 81, 82, 84, 59, 4, 5]]
STEPS = 4

# name -> (architecture fields, quantization bits, KV cache kind)
CASES = {
    "qwen2": (dict(qkv_bias=True), None, "float"),
    "qwen3-tied": (dict(arch="qwen3", qk_norm=True, qkv_bias=False, tie_word_embeddings=True), None, "float"),
    "qwen-v1": (dict(arch="qwen", num_kv_heads=4, qkv_bias=True, seq_length=8, use_dynamic_ntk=True,
                     use_logn_attn=True), None, "float"),  # past 8 positions: NTK alphas and LogN's q_scale
    "qwen2-int8": (dict(), 8, "float"),
    "qwen2-int4": (dict(), 4, "float"),
    "qwen2-int8-kv": (dict(), None, "int8"),
    "qwen2-window": (dict(attention_windows=[None, 6, None, 6]), None, "float"),  # ring caches
}


def model_of(case: str):
    fields, bits, kv_cache = CASES[case]
    model = tiny_model(seed=7, scale=0.2, vocab_size=301, num_layers=4, **fields)
    if bits:
        from qwenkit.quant.convert import quantize_model
        quantize_model(model, bits=bits, group_size=32, lm_head_bits=8)
    model.set_kv_cache(kv_cache)
    model.generation_config = {}
    return model


@torch.inference_mode()
def outputs(model) -> dict:
    """Prefill logits of two rows, STEPS decode steps' logits through the KV cache (positions per row), and the
    greedy tokens of two rows decoded together by the decode loop."""
    from qwenkit.generate import Decoder, Request
    from qwenkit.sampling import SamplingParams

    cache = model.new_cache(2, 32)
    n = len(PROMPTS[0])
    logits = [model(torch.tensor(PROMPTS), torch.arange(n), cache)]
    for i in range(STEPS):
        logits.append(model(logits[-1][:, -1:].argmax(-1), torch.tensor([[n + i]] * 2), cache))
    decoder = Decoder(model, _NoTokenizer(), 2, 64)
    tokens = {}
    for prompt in PROMPTS:
        row, delta = decoder.add(Request(prompt, 10, SamplingParams(temperature=0.0)))
        tokens[row] = [delta.token_id]
    while decoder.rows:
        for row, delta in decoder.step():
            tokens[row].append(delta.token_id)
    return {"logits": torch.cat(logits, 1), "tokens": list(tokens.values()), "logits_device": logits[0].device}


@pytest.mark.parametrize("case", CASES)
def test_split_over_three_devices_equals_one(case):
    whole = model_of(case)
    split = split_model(copy.deepcopy(whole), plan_split(whole.config, THREE))
    assert split.layer_split.counts == (1, 2, 1)
    expected, got = outputs(whole), outputs(split)
    assert torch.equal(got["logits"], expected["logits"])
    assert got["tokens"] == expected["tokens"] and got["logits_device"] == CPU


# ----------------------------------------------------------------------------- the planner
def test_blocks_follow_free_memory():
    assert plan_layers(8, 10, 0, 0, [1, 1]) == [4, 4]
    assert plan_layers(8, 10, 0, 0, [3, 1]) == [6, 2]
    assert plan_layers(9, 10, 0, 0, [1, 1, 1]) == [3, 3, 3]


def test_embedding_counts_on_the_first_device_and_head_on_the_last():
    assert plan_layers(8, 10, 40, 0, [1, 1]) == [2, 6]  # 120 in all: the first half is the embedding and 2 blocks
    assert plan_layers(8, 10, 0, 40, [1, 1]) == [6, 2]
    assert plan_layers(8, 10, 40, 40, [1, 1]) == [4, 4]


def test_every_device_holds_a_block():
    assert plan_layers(4, 10, 0, 0, [1000, 1]) == [3, 1]
    assert plan_layers(4, 10, 100, 0, [1, 1, 1]) == [1, 1, 2]  # the embedding alone would fill the first two


def test_planner_errors():
    with pytest.raises(QwenkitError, match="3 devices for a model of 2 layers"):
        plan_layers(2, 10, 0, 0, [1, 1, 1])
    with pytest.raises(QwenkitError, match="device 1 of the split has no free memory"):
        plan_layers(4, 10, 0, 0, [1, 0])


def test_plan_of_a_config_counts_parameters():
    model = tiny_model(num_layers=8)
    assert plan_split(model.config, [CPU, META], free=[1, 1]).counts == (4, 4)
    assert plan_split(model.config, [CPU, META], free=[3, 1]).counts == (6, 2)
    split = LayerSplit((CPU, META), (3, 5))
    assert [split.device_of(n) for n in ("model.embed_tokens.weight", "model.layers.2.mlp.up_proj.weight",
                                         "model.layers.3", "model.norm.weight", "lm_head.weight")] == \
        [CPU, CPU, META, META, META]


# ----------------------------------------------------------------------------- devices named
def test_devices_named():
    assert split_devices("cpu, cpu") == [CPU, CPU] and split_devices(["cpu", CPU]) == [CPU, CPU]
    with mock.patch("torch.cuda.device_count", return_value=2):
        assert split_devices("cuda:1,cuda:0") == [torch.device("cuda", 1), torch.device("cuda", 0)]
        assert split_devices("auto") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    with mock.patch("torch.cuda.device_count", return_value=0):
        assert split_devices("auto") == [CPU]  # no GPU: the CPU alone, no split


@pytest.mark.parametrize("spec, gpus, message", [
    ("gpu:0,cpu", 0, "unknown device 'gpu:0'"),
    ("cpu,,cpu", 0, "list devices separated by commas"),
    ("mps,cpu", 0, "device 'mps': a layer split runs on cpu or cuda:N"),
    ("cuda:0,cuda:3", 2, r"'cuda:3' does not exist: this machine has 2 GPUs \(cuda:0 to cuda:1\)"),
    ("cuda:0,cuda:1", 0, "'cuda:0' does not exist: no CUDA GPU is visible here"),
    ("cuda:0,cuda:1,cuda:0", 2, "name cuda:0 twice"),
    ("cuda:0,cpu", 2, "mix cpu and cuda"),
])
def test_bad_devices(spec, gpus, message):
    with mock.patch("torch.cuda.device_count", return_value=gpus), pytest.raises(QwenkitError, match=message):
        split_devices(spec)


# ----------------------------------------------------------------------------- what moves where
def test_moves_to_another_device():
    """A split whose last part is on the meta device: the parts land where the plan says, a tied head gets a copy
    of its own there, quantized layers drop the kernels made for their old tensors, a moved block's joint q/k/v
    tensor (left behind) is dropped, and each layer's KV cache is made on its layer's device."""
    from qwenkit.loading import build_model
    from qwenkit.quant.linear import Int4Linear

    whole = tiny_model(seed=7, scale=0.2, vocab_size=301, num_layers=4, tie_word_embeddings=True)
    state = {k: v for k, v in whole.state_dict().items() if k != "lm_head.weight"}
    model = build_model(whole.config, state.items(), torch.float32, CPU)  # q/k/v and gate/up laid out jointly
    mlp = model.model.layers[3].mlp
    down = mlp.down_proj = Int4Linear.from_float(mlp.down_proj, group_size=32)
    with torch.inference_mode():
        down(torch.randn(1, 256))  # (its kernel, made for the CPU tensors)
    assert down._kernel is not None and model.lm_head.weight is model.model.embed_tokens.weight
    split_model(model, LayerSplit((CPU, CPU, META), (1, 2, 1)))
    assert model.model.embed_tokens.weight.device == CPU and model.device == CPU
    assert [p.device for p in (model.lm_head.weight, model.model.norm.weight)] == [META, META]
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    assert {p.device for p in model.model.layers[3].parameters()} == {META} and down._kernel is None
    assert [b.self_attn.joint is not None for b in model.model.layers] == [True, True, True, False]
    cache = model.new_cache(2, 16)
    assert [k.device for k in cache.k] == [CPU, CPU, CPU, META] == [v.device for v in cache.v]


def test_each_later_segment_moves_its_inputs_once(monkeypatch):
    """Blocks of the first segment run where the step inputs are made; each block after it has a pre-hook, one per
    segment shared by its blocks, and a forward moves the step inputs once per segment, not once per block."""
    import qwenkit.parallel as parallel

    model = split_model(model_of("qwen2"), LayerSplit(tuple(THREE), (1, 2, 1)))
    hooks = [list(block._forward_pre_hooks.values()) for block in model.model.layers]
    assert hooks[0] == [] and all(len(h) == 1 and isinstance(h[0], SegmentInputs) for h in hooks[1:])
    assert hooks[1][0] is hooks[2][0] and hooks[3][0] is not hooks[1][0]
    moved = []
    real = parallel.to_device
    monkeypatch.setattr(parallel, "to_device", lambda value, device: moved.append(value) or real(value, device))
    with torch.inference_mode():
        model(torch.tensor(PROMPTS), torch.arange(len(PROMPTS[0])), model.new_cache(2, 16))
    ropes = [v for v in moved if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], torch.Tensor)]
    assert len(ropes) == 2  # segments 2 and 3; block 2 of segment 2 reuses its segment's copies
    assert all(segment.held == () for segment in (hooks[1][0], hooks[3][0]))  # let go after the forward


def test_splitting_again_replaces_the_hooks():
    model = model_of("qwen2")
    split_model(model, LayerSplit(tuple(THREE), (1, 2, 1)))
    split_model(model, LayerSplit((CPU, CPU), (3, 1)))
    assert [len(b._forward_pre_hooks) for b in model.model.layers] == [0, 0, 0, 1]


# ----------------------------------------------------------------------------- loading and the command line
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tied 4-layer Qwen2 checkpoint with a byte-level tokenizer (text in, text out)."""
    from safetensors.torch import save_file

    model = tiny_model(seed=7, scale=0.2, num_layers=4, tie_word_embeddings=True, **BYTE_VOCAB)
    directory = write_byte_tokenizer(tmp_path_factory.mktemp("split"))
    (directory / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_load_splits_as_it_loads(checkpoint, quantize):
    from qwenkit.loading import load

    whole, _ = load(checkpoint, dtype="float32", device="cpu", quantize=quantize)
    split, _ = load(checkpoint, dtype="float32", devices="cpu,cpu,cpu", quantize=quantize)
    assert split.layer_split.counts == (1, 2, 1) and not hasattr(whole, "layer_split")
    tokens = torch.tensor(PROMPTS)
    with torch.inference_mode():
        assert torch.equal(split(tokens), whole(tokens))


def test_tied_gguf_splits_with_its_own_mix(tmp_path):
    """A tied GGUF under quantize="gguf": split or not, the same logits; where the head's device is not the
    embedding's, each holds an int8 table of its own (on one device they share one)."""
    from qwenkit.loading import _quantize_embedding, build_model
    from qwenkit.loading.gguf import GGUFFile
    from qwenkit.qwen7b import ChatModel

    from .test_gguf import layer_tensors, model_meta, write_gguf

    path = tmp_path / "tied.gguf"
    write_gguf(path, "qwen2", model_meta("qwen2", **{"attention.head_count_kv": 2}), layer_tensors("qwen2", 64, 32, 16))
    whole, split = (build_model(GGUFFile(path).config(), GGUFFile(path).stored_tensors(), torch.float32, CPU,
                                quantize="gguf", devices=devices) for devices in (None, [CPU, CPU]))
    tokens = torch.tensor(PROMPTS) % 128
    with torch.inference_mode():
        assert torch.equal(split(tokens), whole(tokens))
    assert split.layer_split.counts == (1, 1) and split.lm_head.weight is split.model.embed_tokens.weight
    gguf = GGUFFile(path)
    with torch.device("meta"):
        net = ChatModel(gguf.config())
    tensors = gguf.stored_tensors()  # (its file is open while it is)
    embedding = next(t for name, t in tensors if name == "model.embed_tokens.weight")
    _quantize_embedding(net, "model.embed_tokens.weight", embedding, "gguf", torch.float32,
                        lambda name: META if name.startswith("lm_head") else CPU)
    assert (net.model.embed_tokens.weight.device, net.lm_head.weight.device) == (CPU, META)
    assert not net.config.tie_word_embeddings


def test_auto_without_a_gpu_is_the_cpu(checkpoint):
    from qwenkit.loading import load

    model, _ = load(checkpoint, dtype="float32", devices="auto")
    assert model.device == CPU and not hasattr(model, "layer_split")


def test_load_refuses_before_loading(checkpoint):
    from qwenkit.loading import load

    with pytest.raises(QwenkitError, match="5 devices for a model of 4 layers"):
        load(checkpoint, devices=["cpu"] * 5)
    with pytest.raises(QwenkitError, match="give device"):
        load(checkpoint, device="cpu", devices="cpu,cpu")
    with pytest.raises(QwenkitError, match="torch.compile of the decode step with a layer split"):
        load(checkpoint, devices="cpu,cpu", compile=True)
    with pytest.raises(QwenkitError, match="tensor parallelism"):
        load(checkpoint, devices="cpu,cpu", tensor_parallel=object())


def test_compile_and_cuda_graphs_refuse_a_split_model():
    from qwenkit.runtime.compiled import compile_decode
    from qwenkit.runtime.cuda_graphs import use_cuda_graphs

    model = split_model(model_of("qwen2"), LayerSplit((CPU, CPU), (2, 2)))
    with pytest.raises(QwenkitError, match="does not compile a model split over devices"):
        compile_decode(model)
    with pytest.raises(QwenkitError, match="CUDA graphs capture one device's work"):
        use_cuda_graphs(model)


def test_generate_with_devices_prints_the_same_text(checkpoint, capsys):
    from qwenkit.cli import main

    argv = ["generate", "-m", str(checkpoint), "--dtype", "float32", "--prompt", "the answer is",
            "--max-new-tokens", "12", "--temperature", "0.8", "--seed", "5"]
    assert main(argv + ["--device", "cpu"]) == 0
    whole = capsys.readouterr().out
    assert main(argv + ["--devices", "cpu,cpu"]) == 0
    assert capsys.readouterr().out == whole and whole.strip()


@pytest.mark.parametrize("extra, message", [
    (["--devices", "gpu:0,cpu"], "unknown device 'gpu:0'"),
    (["--devices", "cpu,cpu", "--tp", "2"], "--tp splits every layer over processes"),
    (["--devices", "cpu,cpu", "--device", "cpu"], "--device cpu and --devices/--device-map cpu,cpu"),
    (["--devices", "cpu,cpu", "--compile"], "--compile with a layer split"),
    (["--devices", "cpu,cpu", "--device-map", "auto"], "--devices and --device-map"),
])
def test_generate_refuses_bad_devices(checkpoint, capsys, extra, message):
    from qwenkit.cli import main

    with mock.patch("qwenkit.loading.load", side_effect=AssertionError("loaded")):
        assert main(["generate", "-m", str(checkpoint), "--prompt", "x", *extra]) == 2
    assert message in capsys.readouterr().err


def test_serve_reads_devices_from_the_environment(monkeypatch):
    from qwenkit.cli import build_parser

    monkeypatch.setenv("QWENKIT_DEVICES", "cuda:0,cuda:1")
    monkeypatch.setenv("QWENKIT_DEVICE_MAP", "auto")
    args = build_parser().parse_args(["serve"])
    assert (args.devices, args.device_map) == ("cuda:0,cuda:1", "auto")
