"""Speed of one model on this machine: prefill, decode, time to first token, GB/s, peak RSS."""

from __future__ import annotations

import resource
import sys
import time

import torch
from torch import nn

from ..generate import Decoder, Request, default_stop_ids
from ..grammar import Grammar
from ..model import KVCache, Model
from ..runtime.packed import packed_bytes
from ..sampling import SamplingParams
from ..speculative import Drafter
from ..tokenizer import Tokenizer


def decode_bytes_per_token(model: Model, context: int = 0, cache: KVCache | None = None) -> int:
    """Bytes a batch-1 decode step reads: every weight but the embedding table (unless the head reads
    it), packed ones included, plus `cache`'s first `context` positions (a ring's every slot)."""
    head_reads_embedding = type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                  if n != "model.embed_tokens.weight" or head_reads_embedding)
    weights += packed_bytes(model)
    kv = sum(t[:1].nbytes // t.shape[2] * min(t.shape[2], context) for t in cache.tensors()) if cache else 0
    return weights + kv


def peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's ru_maxrss survives exec (a child started by a big
    parent would report the parent's peak), so /proc's VmHWM comes first."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _sync(model: Model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def run_bench(model: Model, tokenizer: Tokenizer, prompt_tokens: int = 512, new_tokens: int = 128,
              warmup: bool = True, ahead: bool | None = None, prompt: list[int] | None = None,
              draft: Drafter | None = None, grammar: Grammar | None = None) -> dict:
    """Greedy decode of `new_tokens` after a random `prompt_tokens` prompt, never stopping early; or after
    `prompt`, stopping where the model ends its reply. `ahead` as in Decoder (default: steps queued ahead on a
    GPU); `draft` as in Decoder, with what the drafts did reported (DraftStats.report); `grammar` constrains the
    reply (ending it where the grammar's text is complete)."""
    greedy = SamplingParams(temperature=0.0)
    if prompt is None:
        gen = torch.Generator().manual_seed(0)
        high = min(20000, model.config.vocab_size)  # (a small test model's vocabulary has fewer ids)
        prompt = torch.randint(min(1000, high // 4), high, (prompt_tokens,), generator=gen).tolist()
        request = Request(prompt, new_tokens, greedy, grammar=grammar)
    else:
        request = Request(prompt, new_tokens, greedy, default_stop_ids(model, tokenizer), grammar=grammar)
    if warmup:
        _timed_run(model, tokenizer, Request(prompt[:32], 4, greedy), ahead, draft)
    ttft, decode_s, produced, decoder = _timed_run(model, tokenizer, request, ahead, draft)
    decode_tok_s = (produced - 1) / decode_s
    bytes_per_token = decode_bytes_per_token(model, len(prompt) + new_tokens // 2, decoder.cache)
    return {
        "prefill_tok_s": round(len(prompt) / ttft, 2),
        "decode_tok_s": round(decode_tok_s, 2),
        "ttft_s": round(ttft, 4),
        "gb_per_s": round(bytes_per_token * decode_tok_s / 1e9, 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "kv_cache_mib": round(decoder.cache.nbytes / 2**20, 1),
        "kv_cache": model.kv_cache,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": str(model.device),
        "threads": torch.get_num_threads(),
        "new_tokens": produced,
        **({"draft": str(draft), **decoder.speculated.report()} if draft is not None else {}),
        **(_cpu_plan() if model.device.type == "cpu" else {}),
    }


def _cpu_plan() -> dict:
    from ..runtime.cpu_plan import plan

    p = plan()
    return {"cpu_class": p.cpu_class, "quantized_kernels": p.kernels or "torch"}


def _timed_run(model: Model, tokenizer: Tokenizer, request: Request, ahead: bool | None,
               draft: Drafter | None = None) -> tuple[float, float, int, Decoder]:
    decoder = Decoder(model, tokenizer, 1, len(request.prompt_ids) + request.max_new_tokens, ahead=ahead,
                      draft=draft)
    start = time.perf_counter()
    decoder.add(request)
    _sync(model)
    first = time.perf_counter()
    produced = 1
    while decoder.rows:
        produced += len(decoder.step())
    _sync(model)
    return first - start, time.perf_counter() - first, produced, decoder

