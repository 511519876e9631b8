"""`qwenkit finetune`: options from the command line and a YAML file, run by `train.finetune`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..errors import QwenkitError
from ..train.finetune import METHOD_LR, FinetuneOptions
from .args import add_model_arg

DEFAULTS = {field.name: field.default for field in dataclasses.fields(FinetuneOptions)}

HELP = "full, LoRA or Q-LoRA fine-tuning on conversations"
DESCRIPTION = ("Fine-tune on a conversation file: --method full, lora (default) or qlora (LoRA on an int4 base). "
               "Checkpoints are written atomically every --save-every steps and on Ctrl-C; --resume auto continues "
               "exactly where a run stopped.")
EPILOG = """examples:
  qwenkit finetune -m demo --data conv.json --out run1
  qwenkit finetune --config run.yaml --lr 1e-4    (flags override the file)
  qwenkit finetune ... --out run1 --resume auto
  torchrun --nproc-per-node 2 -m qwenkit finetune ... --fsdp
  qwenkit finetune ... --deepspeed ds_config_zero2.json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # The options default to None, so that one given on the command line can be told from one left out, and
    # wins over the --config file; FinetuneOptions holds the defaults, which the help shows.
    def default(name: str) -> str:
        return f"(default: {DEFAULTS[name]})"

    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the epilog's examples keep their lines
    flag = argparse.BooleanOptionalAction
    parser.add_argument("--config", metavar="YAML", help="options from a YAML file whose keys are the long option "
                        "names (lora-r or lora_r); flags on the command line win. No short form: -c is "
                        "--checkpoint-path, as on every verb")
    add_model_arg(parser, f"base model: checkpoint directory, .gguf file, hub id or demo {default('model')}")
    parser.add_argument("--data", help="training conversations: the Qwen JSON ([{id, conversations}]), JSONL of "
                                       "such records, or OpenAI {messages} JSONL (required)")
    parser.add_argument("--out", help="output directory: checkpoints, loss curve, and the adapter or model (required)")
    parser.add_argument("--method", choices=("full", "lora", "qlora"), help=f"what trains {default('method')}")
    parser.add_argument("--eval-data", help="held-out conversations: their loss is measured with each checkpoint")

    group = parser.add_argument_group("schedule")
    group.add_argument("--epochs", type=int, help=f"passes over the data {default('epochs')}")
    group.add_argument("--max-steps", type=int, help="optimizer steps to run instead of --epochs")
    group.add_argument("--lr", type=float, help="peak learning rate (default: "
                       + ", ".join(f"{lr:g} {method}" for method, lr in METHOD_LR.items()) + ")")
    group.add_argument("--batch-size", type=int,
                       help=f"conversations per micro-batch, per process {default('batch_size')}")
    group.add_argument("--grad-accum", type=int,
                       help=f"micro-batches per optimizer step {default('grad_accum')}")
    group.add_argument("--max-length", type=int, help=f"tokens kept of each conversation {default('max_length')}")
    group.add_argument("--warmup-ratio", type=float,
                       help=f"share of the steps spent warming up {default('warmup_ratio')}")
    group.add_argument("--warmup-steps", type=int, help="warmup steps, instead of --warmup-ratio")
    group.add_argument("--weight-decay", type=float,
                       help=f"AdamW weight decay on matrices (default: {DEFAULTS['weight_decay']}; β2 is 0.95)")
    group.add_argument("--max-grad-norm", type=float, help=f"gradient clipping {default('max_grad_norm')}")
    group.add_argument("--seed", type=int, help=f"seeds the data order, initialisation and dropout {default('seed')}")

    group = parser.add_argument_group("LoRA (lora, qlora)")
    group.add_argument("--lora-r", type=int, help=f"rank {default('lora_r')}")
    group.add_argument("--lora-alpha", type=float,
                       help=f"scaling numerator, scaling = alpha / r {default('lora_alpha')}")
    group.add_argument("--lora-dropout", type=float, help=f"dropout on the LoRA input {default('lora_dropout')}")
    group.add_argument("--lora-targets", help="all-linear (default), names such as q_proj,v_proj, the Qwen v1 names "
                                              "c_attn,c_proj,w1,w2, or patterns over module names")
    group.add_argument("--train-embeddings", action=flag, help="also train the whole embedding table")
    group.add_argument("--train-head", action=flag, help="also train the whole lm_head. A base (not chat) model has "
                       "never produced <|im_start|> / <|im_end|>; without trainable embeddings and head it cannot "
                       "learn to end its turns, and never stops (the Qwen-7B scripts train both for base models)")

    group = parser.add_argument_group("checkpoints and logs")
    group.add_argument("--save-every", type=int, help=f"steps between checkpoints (default: {DEFAULTS['save_every']}; "
                                                      "one is also saved at the end and on Ctrl-C)")
    group.add_argument("--keep", type=int,
                       help=f"checkpoints kept, the newest (default: {DEFAULTS['keep']}; 0 keeps all)")
    group.add_argument("--eval-every", type=int, help="steps between evaluations (default: with each checkpoint)")
    group.add_argument("--log-every", type=int,
                       help=f"steps between log lines when no progress bar is drawn {default('log_every')}")
    group.add_argument("--resume", metavar="DIR|auto", help="continue from a checkpoint directory, or auto: the "
                                                            "newest in --out (a fresh start if it has none)")
    group.add_argument("--overwrite", action=flag, help="start over in an --out that holds a run (deletes its "
                                                        "checkpoints, loss curve and saved weights)")

    group = parser.add_argument_group("data, precision, devices")
    group.add_argument("--skip-bad", action=flag,
                       help="drop malformed records (counted) instead of stopping at the first")
    group.add_argument("--gradient-checkpointing", action=flag,
                       help="recompute each block in the backward pass: much less memory, about a third more time")
    group.add_argument("--dtype", help="compute dtype: auto (bfloat16 where supported), bfloat16 or float32 "
                                       f"{default('dtype')}; trainable weights and optimizer state are always float32")
    group.add_argument("--device", help=f"cpu, cuda, cuda:1 or auto (default: {DEFAULTS['device']}; under torchrun "
                                        "each process takes cuda:LOCAL_RANK)")
    group.add_argument("--fsdp", action=flag, help="shard the model over the torchrun processes with FSDP2 "
                                                   "(torchrun --nproc-per-node N -m qwenkit finetune ... --fsdp)")
    group.add_argument("--deepspeed", metavar="CONFIG", help="DeepSpeed ZeRO-2/3 with this JSON config, e.g. the "
                       "Qwen-7B scripts' ds_config_zero2.json (\"auto\" values come from these options)")


def run(args: argparse.Namespace) -> int:
    from ..train.distributed import is_main_process
    from ..train.finetune import FinetuneOptions, finetune
    from ..train.trainer import TrainingInterrupted

    options = FinetuneOptions(**given_options(args))
    try:
        written = finetune(options)
    except TrainingInterrupted as e:
        if is_main_process():
            print(f"qwenkit: {e}. Continue with the same command plus --resume auto", file=sys.stderr)
        return 128 + e.signum
    if not is_main_process():
        return 0
    if options.method == "full":
        print(f"wrote the fine-tuned model to {written}; chat with: qwenkit chat -m {written}")
    else:
        print(f"wrote the adapter to {written}; chat with: qwenkit chat -m {options.model} --adapter {written}")
    return 0


def given_options(args: argparse.Namespace) -> dict:
    """The options given on the command line, then those in the --config file; the rest are left out
    (FinetuneOptions fills them in)."""
    actions = option_actions()
    from_file = read_config_file(args.config, actions) if args.config else {}
    given = {dest: getattr(args, dest) if getattr(args, dest) is not None else from_file.get(dest) for dest in actions}
    for required in ("data", "out"):
        if given[required] is None:
            raise QwenkitError(f"--{required} is required (on the command line or in the --config file)")
    return {dest: value for dest, value in given.items() if value is not None}


def option_actions() -> dict[str, argparse.Action]:
    """finetune's options by name, --config and --help aside: the keys a --config file may hold."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}


def read_config_file(path: str, actions: dict[str, argparse.Action]) -> dict:
    """The --config YAML file as {option name: value}, each checked and converted as its flag would be."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise QwenkitError(f"--config {path}: cannot read it as YAML ({e})") from None
    if not isinstance(data, dict):
        raise QwenkitError(f"--config {path}: the file must be a mapping of option names to values")
    values = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            raise QwenkitError(f"--config {path}: unknown option {key!r}; the keys are the long option names: "
                               f"{', '.join(sorted(k.replace('_', '-') for k in actions))}")
        action = actions[dest]
        try:
            if value is not None and action.type is not None and not isinstance(value, bool):
                value = action.type(value)
        except (TypeError, ValueError):
            raise QwenkitError(f"--config {path}: {key}: {value!r} is not a valid {action.type.__name__}") from None
        if isinstance(action, argparse.BooleanOptionalAction) and not isinstance(value, bool):
            raise QwenkitError(f"--config {path}: {key} takes true or false, not {value!r}")
        if action.choices and value not in action.choices:
            raise QwenkitError(f"--config {path}: {key}: {value!r} is not one of {', '.join(action.choices)}")
        values[dest] = value
    return values
