"""Calibration and held-out token sequences for quantization, available offline.

Default source: the Python standard library's own source, present on every Python install: code
with English docstrings and comments, which suits the coder model qwenkit ships as its demo. The
top-level `*.py` files of `sysconfig.get_path("stdlib")` are split by a hash of their file name —
one in five (crc32(name) % 5 == 0) is held out for perplexity, the rest calibrate — so the two
never share a file, on any Python version. Each split is read in a fixed shuffled order.

A user file (`--calib FILE`) is plain text, or, for `.json` / `.jsonl`, conversations in the
fine-tuning formats (see `qwenkit.datasets`) rendered through the model's chat template. Either
way the tokens form one stream, from which `samples` windows of `seq_len` tokens are taken evenly
spaced, so a long file is sampled from end to end. Perplexity is always measured on the held-out
standard-library files, so figures compare across calibration choices.
"""

from __future__ import annotations

import random
import sysconfig
import warnings
import zlib
from pathlib import Path

import torch

from ..datasets import load_dataset, read_text
from ..errors import DataError
from ..tokenizer import Tokenizer

STDLIB = "python-stdlib"
CONVERSATION_SUFFIXES = (".json", ".jsonl")


def stdlib_files(heldout: bool) -> list[Path]:
    """The calibration (or held-out) split of the standard library's top-level source files."""
    root = Path(sysconfig.get_path("stdlib"))
    files = sorted(p for p in root.glob("*.py") if (zlib.crc32(p.name.encode()) % 5 == 0) == heldout)
    if not files:
        raise DataError(f"no Python source files in {root} (a stripped Python install?); pass --calib FILE")
    random.Random(0).shuffle(files)
    return files


def _stdlib_ids(tokenizer: Tokenizer, heldout: bool, max_tokens: int | None = None) -> list[int]:
    ids: list[int] = []
    for path in stdlib_files(heldout):
        # Plain text: a source file's "<|endoftext|>" must not become the control token.
        ids += tokenizer.encode(path.read_text(encoding="utf-8", errors="replace") + "\n\n", allowed_special=set())
        if max_tokens is not None and len(ids) >= max_tokens:
            return ids[:max_tokens]
    return ids


def _file_ids(tokenizer: Tokenizer, path: Path) -> list[int]:
    if path.suffix in CONVERSATION_SUFFIXES:
        examples, _ = load_dataset(path, tokenizer, max_length=1 << 30)
        return [i for example in examples for i in example.input_ids]
    return tokenizer.encode(read_text(path, "calibration file"), allowed_special=set())


def calibration_ids(tokenizer: Tokenizer, source: str | Path | None = None, samples: int = 128,
                    seq_len: int = 512) -> tuple[torch.Tensor, str]:
    """`samples` sequences of `seq_len` token ids [N, L] from `source` (None: the standard library),
    and a one-line description of where they came from (recorded in the checkpoint's config)."""
    if samples < 1 or seq_len < 2:
        raise DataError(f"calibration needs at least 1 sample of 2 tokens, not {samples} x {seq_len}")
    ids = _stdlib_ids(tokenizer, heldout=False) if source is None else _file_ids(tokenizer, Path(source))
    name = STDLIB if source is None else Path(source).name
    available = len(ids) // seq_len
    if available == 0:
        raise DataError(f"calibration text {name} has {len(ids)} tokens, fewer than one sequence of "
                        f"--seq-len {seq_len}: pass a longer file or a smaller --seq-len")
    if available < samples:
        warnings.warn(f"calibration text {name} holds {available} sequences of {seq_len} tokens, "
                      f"not the {samples} asked for; using {available}", stacklevel=2)
        samples = available
    starts = torch.linspace(0, len(ids) - seq_len, samples).long().tolist()
    windows = torch.tensor([ids[s:s + seq_len] for s in starts])
    return windows, f"{name}: {samples} x {seq_len} tokens"


def heldout_ids(tokenizer: Tokenizer, tokens: int = 8192) -> list[int]:
    """The first `tokens` token ids of the held-out standard-library files (disjoint from calibration)."""
    return _stdlib_ids(tokenizer, heldout=True, max_tokens=tokens)
