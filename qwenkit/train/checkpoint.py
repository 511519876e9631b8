"""Training checkpoints on disk: written atomically, found again, pruned to the last K.

A checkpoint is a directory `<out>/checkpoints/step-NNNNNNNN/`. It is filled under a temporary
name (`.step-NNNNNNNN.tmp`), every file and the directory are fsynced, and only then is it
renamed into place, so a `step-*` directory on disk is always complete: a process killed while
saving leaves at most a temporary directory, which the next run deletes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(out)
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def remove_partial(out: Path) -> None:
    """Delete what a save interrupted by a crash left behind."""
    root = checkpoint_dir(out)
    for p in root.glob(".step-*.tmp") if root.is_dir() else ():
        shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: str | Path, out: Path) -> Path | None:
    """`auto` -> the latest checkpoint in `out` (None when there is none yet); a path -> that checkpoint."""
    if str(resume) == "auto":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and not (path / "trainer_state.json").is_file() and list_checkpoints(path):
        return list_checkpoints(path)[-1]  # a run's --out directory: its latest checkpoint
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"--resume {path}: not a training checkpoint (no trainer_state.json); pass a "
                              f"{checkpoint_dir(Path('OUT'))}/step-N directory, the run's --out directory, or auto")
    return path


def write_atomically(final: Path, write: Callable[[Path], None], is_writer: bool = True,
                     barrier: Callable[[], None] = lambda: None) -> Path:
    """Run `write(tmp_dir)`, make it durable, then rename tmp_dir to `final`.

    In a multi-process run every rank calls this: each may write its own files into tmp_dir, and
    `is_writer` (rank 0) creates and renames the directory; `barrier` keeps them in step.
    """
    tmp = final.with_name(f".{final.name}.tmp")
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write(tmp)
    barrier()
    if is_writer:
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        _fsync(tmp)
        if final.exists():  # the same step saved again (a resumed run interrupted at once)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(final.parent)
    barrier()
    return final


def prune(out: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0 keeps all)."""
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
