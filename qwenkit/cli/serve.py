"""`qwenkit serve`: the OpenAI-compatible HTTP server; every option can come from the environment."""

from __future__ import annotations

import argparse
import signal

from ..errors import QwenkitError
from .args import (add_adapter_arg, add_devices_args, add_load_args, add_parallel_arg, add_speed_args,
                   check_draft_args, devices_arg, drafter_for, load_for, read_env_defaults, start_parallel)

HELP = "OpenAI-compatible HTTP server with continuous batching"
DESCRIPTION = ("Serve the OpenAI API (/v1/chat/completions with tools and streaming, /v1/completions, "
               "/v1/embeddings, /v1/models), /tokenize, /detokenize, /health, /metrics, /openapi.json and the web "
               "chat page at /. The server listens at once and loads the model in the background: /health answers "
               "503 until ready, and again if the engine stops for good, when serve exits non-zero so that a "
               "supervisor restarts it.")
EPILOG = ("Every option can also be set by the environment variable named after it, e.g. QWENKIT_PORT=9000 or "
          "QWENKIT_API_KEY=secret; a flag wins over the variable.")
POSITIVE_OPTIONS = ("max_batch", "max_queue", "request_timeout", "max_body_bytes", "max_header_bytes")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_load_args(parser)
    add_speed_args(parser)
    add_parallel_arg(parser)
    add_devices_args(parser)
    add_adapter_arg(parser)
    parser.add_argument("--host", "--server-name", default="127.0.0.1",
                        help="address to listen on; 0.0.0.0 exposes the server (default: %(default)s)")
    parser.add_argument("--port", "--server-port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer API_KEY' on the API (not on /health or /)")
    parser.add_argument("--api-auth", metavar="USER:PASS", help="require HTTP Basic credentials, as the Qwen "
                        "openai_api.py --api-auth (may be combined with --api-key)")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a batch slot before new ones get 503 (default: %(default)s)")
    parser.add_argument("--ctx", type=int, help="context length to serve, prompt plus reply (default: --context "
                                                "when given, else the model's, at most 8192)")
    parser.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                        help="prefill long prompts this many tokens per forward, so memory grows with the chunk, not "
                             "the prompt (default: 512 on a CPU, 4096 on a GPU; 0: one forward per prompt)")
    parser.add_argument("--cors-origins", help="comma-separated origins allowed to call the API from a browser, "
                                               "or * (default: none)")
    parser.add_argument("--served-model-name", help="the model name clients use and /v1/models lists "
                                                    "(default: the -m argument's last part, or qwenkit)")
    parser.add_argument("--request-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="time a client has to send a request's head, and then its body; a slower one gets 408 "
                             "(default: %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=8 << 20,
                        help="larger request bodies get 413 (default: %(default)s)")
    parser.add_argument("--max-header-bytes", type=int, default=16 << 10,
                        help="longer request heads (request line and headers) get 431 (default: %(default)s)")
    read_env_defaults(parser)  # last: it covers every option above


def run(args: argparse.Namespace) -> int:
    from ..server import Settings, serve, served_name

    if args.api_auth is not None and ":" not in args.api_auth:
        raise QwenkitError("--api-auth takes USER:PASS")
    for option in POSITIVE_OPTIONS:
        if not getattr(args, option) > 0:
            raise QwenkitError(f"--{option.replace('_', '-')} must be more than 0, got {getattr(args, option)}")
    check_draft_args(args)
    devices_arg(args)  # (the model loads after the server listens: a bad --devices fails first)
    if args.prefill_chunk is not None and args.prefill_chunk < 0:
        raise QwenkitError(f"--prefill-chunk must be 0 (off) or a number of tokens, got {args.prefill_chunk}")
    origins = tuple(o.strip() for o in (args.cors_origins or "").split(",") if o.strip())
    settings = Settings(
        served_model_name=args.served_model_name or served_name(args.model),
        model_aliases=(args.model,) if args.model else (), api_key=args.api_key or None,
        api_auth=args.api_auth or None, max_batch=args.max_batch, max_queue=args.max_queue,
        context_length=args.ctx or args.context, prefill_chunk=args.prefill_chunk,
        draft=(lambda tokenizer: drafter_for(args, tokenizer)) if args.lookup or args.draft else None,
        cors_origins=origins,
        request_timeout=args.request_timeout,
        max_body_bytes=args.max_body_bytes, max_header_bytes=args.max_header_bytes)
    tp, _ = start_parallel(args)
    if tp is None:
        return serve(lambda: load_for(args), settings, host=args.host, port=args.port)
    from ..parallel import follow
    if tp.rank:  # no HTTP here: the model's share of rank 0's work, step by step, until it stops
        model, tokenizer = load_for(args)
        follow(model, tokenizer, tp, drafter_for(args, tokenizer))  # drafts as rank 0's, made from the same tokens
        return 0
    # uvicorn stops the server on SIGTERM, then raises it again once done: the other ranks need their stop first.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        return serve(lambda: load_for(args), settings, host=args.host, port=args.port)
    finally:
        tp.from_rank0(("stop",))  # (the engine has stopped: no other collective is under way)
