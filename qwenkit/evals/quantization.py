"""Quantize a model (round-to-nearest or GPTQ), save it as a checkpoint that `qwenkit.load` reads,
and measure what it cost: perplexity, size on disk, memory and speed (`qwenkit quantize` prints it).
It lives with the evaluations, not in `quant/`, because it loads and saves models: `quant/` stays
below `loading/`, which builds its quantized layers.

Each row of the report is measured in a fresh process that loads the model from disk (the source
for "original", the written directory for the quantized one), so its peak RSS is that model's own:
perplexity on held-out text (`quant.calibration.heldout_ids`), then `evals.speed.run_bench`'s
prefill (512-token prompt) and decode (128 tokens) speed.
"""

from __future__ import annotations

import gc
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from ..errors import QwenkitError
from ..quant.linear import INT4_GROUP_SIZES
from .perplexity import perplexity
from .speed import run_bench

METHODS = ("rtn", "gptq")
EVAL_SEQ_LEN = 512


def quantize_checkpoint(model: str, out: str | Path, bits: int = 4, method: str = "gptq", group_size: int = 128,
                        act_order: bool = False, calib: str | Path | None = None, calib_samples: int = 128,
                        seq_len: int = 512, lm_head_bits: int | None = 8, dtype: str = "auto", device: str = "auto",
                        force: bool = False, evaluate: bool = True, eval_tokens: int = 8192) -> dict:
    """Quantize `model`, write it to `out`, and (with `evaluate`) measure both; returns the report.

    method "rtn" rounds each weight to nearest; "gptq" (see quant/gptq.py) uses `calib_samples`
    sequences of `seq_len` tokens from `calib` (a text or conversation file; None: the Python
    standard library, see quant/calibration.py). `act_order`, `calib`, `calib_samples` and
    `seq_len` are GPTQ settings.
    """
    from ..loading import load, resolve_source
    from ..quant import quantize_model
    from ..quant.calibration import calibration_ids
    from ..quant.gptq import DAMP_PERCENT, gptq_quantize_model
    from ..saving import check_out_dir, save_checkpoint

    if bits not in (4, 8):
        raise QwenkitError(f"--bits must be 4 or 8, not {bits}")
    if method not in METHODS:
        raise QwenkitError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if group_size not in INT4_GROUP_SIZES:
        raise QwenkitError(f"--group-size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} "
                           f"(the int4 kernels' sizes), not {group_size}")
    if evaluate and eval_tokens < 2:
        raise QwenkitError(f"--eval-tokens must be at least 2, not {eval_tokens}")
    if method == "rtn" and (act_order or calib is not None):
        raise QwenkitError("--act-order and --calib are GPTQ settings; add --method gptq or drop them")
    check_out_dir(out, force)

    source = resolve_source(model)
    net, tokenizer = load(source, dtype=dtype, device=device, quantize=None, pack=False)  # float, to quantize
    recipe = {"method": method}
    start = time.perf_counter()
    if method == "gptq":
        ids, described = calibration_ids(tokenizer, calib, calib_samples, seq_len)
        gptq_quantize_model(net, ids, bits, group_size, act_order, lm_head_bits)
        # desc_act keeps contiguous groups here (static groups), so no layer stores a permutation.
        recipe["gptq"] = {"desc_act": act_order, "static_groups": act_order, "damp_percent": DAMP_PERCENT,
                          "calibration": described}
    else:
        quantize_model(net, bits, group_size, lm_head_bits)
    seconds = time.perf_counter() - start
    save_checkpoint(net, tokenizer, out, force=force, quantization=recipe)
    del net
    gc.collect()

    report = {"model": str(model), "out": str(out), "bits": bits, "group_size": group_size if bits == 4 else None,
              "lm_head_bits": lm_head_bits, **recipe, "quantize_seconds": round(seconds, 1)}
    if evaluate:
        from ..quant.calibration import heldout_ids

        ids = heldout_ids(tokenizer, eval_tokens)
        report["heldout"] = f"python-stdlib held-out files: {len(ids)} tokens, windows of {EVAL_SEQ_LEN}"
        report["rows"] = [dict(name=name, size_bytes=_size_on_disk(path), **_evaluate_fresh(path, dtype, device, ids))
                          for name, path in (("original", source), (f"int{bits} {method}", Path(out)))]
    return report


def _size_on_disk(path: Path) -> int:
    """A GGUF file's size, or the weight files of a checkpoint directory."""
    from ..loading import hf

    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in hf.weight_files(path))


def _evaluate_fresh(path: Path, dtype: str, device: str, ids: list[int]) -> dict:
    print(f"measuring {path} ...", file=sys.stderr, flush=True)
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_evaluate, str(path), dtype, device, ids).result()


def _evaluate(path: str, dtype: str, device: str, ids: list[int]) -> dict:
    """Runs in a fresh process: load the model at `path`, then `measure`."""
    from ..loading import load

    # The original as float (a GGUF dequantized), the quantized checkpoint as saved.
    return measure(*load(path, dtype=dtype, device=device, quantize=None), ids)


def measure(model, tokenizer, ids: list[int]) -> dict:
    """Perplexity on `ids`, prefill/decode speed and this process's peak RSS."""
    ppl = perplexity(model, ids, seq_len=EVAL_SEQ_LEN)
    speed = run_bench(model, tokenizer, prompt_tokens=512, new_tokens=128)
    return {"perplexity": round(ppl, 4), **{k: speed[k] for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mib",
                                                                  "dtype", "threads")}}

