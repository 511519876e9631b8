"""One engine, one measurement, in a fresh process so peak RSS belongs to that engine alone.

    python benchmarks/engines.py ENGINE DTYPE [--prompt-tokens 512] [--new-tokens 128]
                                 [--model DIR] [--quantize int8|int4] [--compile]

ENGINE is qwenkit, transformers or llama.cpp (llama-cpp-python, with DTYPE gguf: the demo file's
own Q4_K_M blocks, or q8_0: that file requantized to Q8_0 by llama.cpp's own quantizer, made once
beside it, the 8-bit peer of qwenkit's int8); prints one JSON object: load_s, prefill_tok_s (best
of 3), ttft_s, decode_tok_s (greedy, eos ignored), gb_per_s, peak_rss_mib (qwenkit with --compile
adds compile_s, the warm-up). The benchmarks in this folder run it once per engine and print the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from qwenkit.evals.speed import peak_rss_mib


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def weight_bytes(model, exclude_embedding: bool) -> int:
    """Bytes of the model's weights: its parameters, and qwenkit's packed bf16 linears (whose weights
    are held outside the parameters; a tied head's packed copy counts too)."""
    from qwenkit.runtime.packed import packed_bytes

    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (exclude_embedding and "embed_tokens" in name):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total + packed_bytes(model)


def layer_shapes(cfg, joined: bool) -> list[tuple[int, int, bool]]:
    """(K, N, bias) of one decoder layer's linears in the order a forward runs them; `joined`: q/k/v
    and gate/up as one product each (as qwenkit's int4 layers run them), else one each (its int8 and
    packed bf16 layers)."""
    h, q, kv, ffn, bias = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, \
        cfg.intermediate_size, cfg.qkv_bias
    qkv = [(h, q + 2 * kv, bias)] if joined else [(h, q, bias), (h, kv, bias), (h, kv, bias)]
    gate_up = [(h, 2 * ffn, False)] if joined else [(h, ffn, False), (h, ffn, False)]
    return qkv + [(q, h, False)] + gate_up + [(ffn, h, False)]


def prompt_ids(n: int) -> list[int]:
    return torch.randint(1000, 20000, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def run_qwenkit(dtype: str, n_prompt: int, n_new: int, quantize: str | None = None, compile: bool = False,
                source: str = "demo", once: bool = False, kv_cache: str = "float") -> dict:
    import qwenkit
    from qwenkit.evals.speed import run_bench
    from qwenkit.loading.demo import demo_gguf_path

    demo_gguf_path()  # assemble outside the timed load
    rss_before = rss_mib()
    start = time.perf_counter()
    model, tokenizer = qwenkit.load(source, dtype=dtype, device="cpu", quantize=quantize, kv_cache=kv_cache)
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_mib()
    extra = {"compile_s": qwenkit.compile_decode(model)} if compile else {}
    if not once:  # the prompt as one forward, best of three (`once`: the bench's own, chunked prefill)
        ids = torch.tensor([prompt_ids(n_prompt)])
        with torch.inference_mode():
            model(ids[:, :32], last_only=True)
            prefill = min(_timed(lambda: model(ids, last_only=True)) for _ in range(3))
    result = run_bench(model, tokenizer, prompt_tokens=n_prompt, new_tokens=n_new)
    prefill_tok_s = result["prefill_tok_s"] if once else n_prompt / prefill
    return {"load_s": load_s, "rss_before_load_mib": rss_before, "rss_after_load_mib": rss_loaded,
            "prefill_tok_s": prefill_tok_s, "ttft_s": result["ttft_s"], "decode_tok_s": result["decode_tok_s"],
            "gb_per_s": result["gb_per_s"], "kv_cache_mib": result["kv_cache_mib"],
            "weight_mib": weight_bytes(model, False) / 2**20, "peak_rss_mib": peak_rss_mib(), **extra}


def run_transformers(dtype: str, n_prompt: int, n_new: int, once: bool = False) -> dict:
    import transformers

    from qwenkit.loading.demo import demo_gguf_path

    path = demo_gguf_path()
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]  # (auto is qwenkit's)
    rss_before = rss_mib()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch_dtype).eval()
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_mib()
    ids = torch.tensor([prompt_ids(n_prompt)])
    greedy = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model(ids[:, :32])
        prefill = min(_timed(lambda: model(ids, logits_to_keep=1)) for _ in range(1 if once else 3))
        if once:  # a long prompt: its prefill alone (generate would prefill it twice more)
            return {"load_s": load_s, "rss_before_load_mib": rss_before, "rss_after_load_mib": rss_loaded,
                    "prefill_tok_s": n_prompt / prefill, "ttft_s": prefill, "weight_mib": weight_bytes(model, False)
                    / 2**20, "peak_rss_mib": peak_rss_mib()}
        ttft = _timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **greedy))
        total = _timed(lambda: model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **greedy))
    decode = (n_new - 1) / (total - ttft)
    c = model.config
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) \
        * model.dtype.itemsize * (n_prompt + n_new // 2)
    return {"load_s": load_s, "rss_before_load_mib": rss_before, "rss_after_load_mib": rss_loaded,
            "prefill_tok_s": n_prompt / prefill, "ttft_s": ttft, "decode_tok_s": decode,
            "gb_per_s": (weight_bytes(model, not c.tie_word_embeddings) + kv) * decode / 1e9,
            "weight_mib": weight_bytes(model, False) / 2**20, "peak_rss_mib": peak_rss_mib()}


def llama_cpp_gguf(dtype: str):
    """The demo GGUF llama.cpp runs: as it is (`gguf`, Q4_K_M), or requantized to Q8_0 (`q8_0`) by
    llama.cpp's quantizer from the same weights, as qwenkit's int8 is; made once, beside the demo file."""
    import ctypes

    import llama_cpp

    from qwenkit.loading.demo import demo_gguf_path

    path = demo_gguf_path()
    if dtype == "gguf":
        return path
    out = path.with_name(f"{path.stem}-requantized-{dtype}.gguf")
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True
        partial = out.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(path).encode(), str(partial).encode(), ctypes.byref(params)):
            raise RuntimeError(f"llama.cpp could not requantize {path} to {dtype}")
        partial.rename(out)
    return out


def run_llama_cpp(dtype: str, n_prompt: int, n_new: int, once: bool = False) -> dict:
    import gguf
    import numpy as np
    from llama_cpp import Llama

    path = llama_cpp_gguf(dtype)
    rss_before = rss_mib()
    start = time.perf_counter()
    llm = Llama(str(path), n_ctx=n_prompt + n_new, n_batch=n_prompt, n_threads=torch.get_num_threads(),
                verbose=False)
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_mib()
    ids = prompt_ids(n_prompt)

    def prefill():
        llm.reset()
        llm.eval(ids)

    def next_token() -> int:  # greedy from the last evaluated position's logits
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    llm.eval(ids[:32])
    if once:  # a long prompt: one prefill, which is the time to the first token
        ttft = prefill_s = _timed(lambda: (prefill(), next_token()))
    else:
        prefill_s = min(_timed(prefill) for _ in range(3))
        ttft = _timed(lambda: (prefill(), next_token()))
    token = next_token()
    start = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([token])
        token = next_token()
    decode = (n_new - 1) / (time.perf_counter() - start)
    tensors = gguf.GGUFReader(path).tensors
    weights = sum(int(t.n_bytes) for t in tensors)
    embedding = sum(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")
    c = llm.metadata
    layers, kv_heads = int(c["qwen2.block_count"]), int(c["qwen2.attention.head_count_kv"])
    head_dim = int(c["qwen2.embedding_length"]) // int(c["qwen2.attention.head_count"])
    kv = 2 * layers * kv_heads * head_dim * 2 * (n_prompt + n_new // 2)  # f16 cache
    return {"load_s": load_s, "rss_before_load_mib": rss_before, "rss_after_load_mib": rss_loaded,
            "prefill_tok_s": n_prompt / prefill_s, "ttft_s": ttft, "decode_tok_s": decode,
            "gb_per_s": (weights - embedding + kv) * decode / 1e9, "weight_mib": weights / 2**20,
            "peak_rss_mib": peak_rss_mib()}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(engine: str, dtype: str, n_prompt: int = 512, n_new: int = 128, quantize: str | None = None,
            compile: bool = False, model: str | None = None, env: dict | None = None, once: bool = False,
            kv_cache: str | None = None) -> dict:
    """Run one engine in a child process (with `env` added to its environment) and return its JSON
    result (with an `error` on failure). `once`: prefill the prompt once (long prompts)."""
    cmd = [sys.executable, __file__, engine, dtype, "--prompt-tokens", str(n_prompt), "--new-tokens", str(n_new)]
    cmd += (["--quantize", quantize] if quantize else []) + (["--compile"] if compile else [])
    cmd += (["--model", model] if model else []) + (["--once"] if once else [])
    cmd += ["--kv-cache", kv_cache] if kv_cache else []
    meta = {"engine": engine, "dtype": dtype, **({"quantize": quantize} if quantize else {}),
            **({"compile": True} if compile else {}), **({"model": model} if model else {}),
            **({"kv_cache": kv_cache} if kv_cache else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode:
        return {**meta, "error": out.stderr.strip().splitlines()[-1:]}
    return {**meta, **json.loads(out.stdout.strip().splitlines()[-1])}


def machine() -> dict:
    import platform
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor() or platform.machine(),
            "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("engine", choices=["qwenkit", "transformers", "llama.cpp"])
    parser.add_argument("dtype", choices=["auto", "bfloat16", "float32", "gguf", "q8_0"])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--quantize", choices=["auto", "int8", "int4", "gguf"],
                        help="qwenkit only (default: none, float weights)")
    parser.add_argument("--compile", action="store_true", help="qwenkit only: compile the decode step")
    parser.add_argument("--model", default="demo", help="qwenkit only: what qwenkit.load takes (default demo)")
    parser.add_argument("--kv-cache", default="float", help="qwenkit only: float or int8")
    parser.add_argument("--once", action="store_true",
                        help="prefill once (a long prompt): qwenkit times its chunked prefill, transformers its "
                             "prefill alone")
    a = parser.parse_args()
    if (a.quantize or a.compile or a.model != "demo" or a.kv_cache != "float") and a.engine != "qwenkit":
        parser.error("--quantize, --compile, --model and --kv-cache are qwenkit options")
    if (a.engine == "llama.cpp") != (a.dtype in ("gguf", "q8_0")):
        parser.error("llama.cpp runs the GGUF file as it is (dtype gguf) or requantized to Q8_0 (q8_0); "
                     "the others take auto, bfloat16 or float32")
    if a.engine == "qwenkit":
        result = run_qwenkit(a.dtype, a.prompt_tokens, a.new_tokens, a.quantize, a.compile, a.model, a.once,
                             a.kv_cache)
    else:
        run = run_transformers if a.engine == "transformers" else run_llama_cpp
        result = run(a.dtype, a.prompt_tokens, a.new_tokens, a.once)
    print(json.dumps({k: round(v, 3) for k, v in result.items()}))


def report(name: str, rows: list[dict], columns: list[tuple[str, str, str]], ratios: dict, **meta) -> None:
    """Print `rows` as a table (columns: key, header, format), then the ratios of rows[0] to rows[1]
    (if any), and write everything to benchmarks/results/NAME-DATE.json (NAME-DATE-HHMM.json when a run of
    the same day is there already: results the README cites are never overwritten)."""
    from pathlib import Path

    width = max(14, *(len(r.get("name", r["engine"])) + 2 for r in rows))
    print(f"{'engine':<{width}}" + "".join(f"{h:>{len(h) + 2}}" for _, h, _ in columns))
    for r in rows:  # a row's `name` labels it (default: the engine); a value it lacks prints as -
        cells = "".join(f"{r[k]:>{len(h) + 2}{fmt}}" if k in r else f"{'-':>{len(h) + 2}}" for k, h, fmt in columns) \
            if "error" not in r else f" failed: {r['error']}"
        print(f"{r.get('name', r['engine']):<{width}}{cells}")
    ours, ref = rows[0], rows[1]
    if ratios and "error" not in ours and "error" not in ref:
        values = {k: f(ours, ref) for k, f in ratios.items()}
        print("  ".join(f"{k} {v:.2f}x" for k, v in values.items()))
        rows = rows + [{"ratios": values}]
    out = Path(__file__).parent / "results" / f"{name}-{time.strftime('%Y-%m-%d')}.json"
    if out.exists():
        out = out.with_name(f"{name}-{time.strftime('%Y-%m-%d-%H%M')}.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **meta, "results": rows}, indent=2) + "\n")
    print(f"written to {out}")
