"""`qwenkit eval` across processes: `torchrun --nproc-per-node N -m qwenkit eval ...`.

Every rank loads the model (on its own GPU, cuda:LOCAL_RANK, or on its share of the CPU cores) and makes
the records of its share of each task's missing items. Rank 0 writes its records to the task's file as
one process does, rank r > 0 its own to OUT/{task}-{mode}.rank{r}.jsonl (the same setup line first), each
record as it is made, so an interrupted run loses nothing. At the end of a task the records reach rank 0
over torch.distributed (gloo on the CPU, NCCL on GPUs); rank 0 appends them to the task's file, deletes
the rank files, scores and writes the results. Any run, with any number of processes, also reads the
rank files an interrupted run left. Without torchrun (or with one process) the world is this process.

With `--tp N` the N ranks hold one model between them (qwenkit.parallel) and make the same records together:
the world's shares are its models, not its ranks, and a model's first rank alone writes its records (its other
ranks, which run the same forwards, write nowhere). Today one model spans the whole world (N = WORLD_SIZE).
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import QwenkitError

# The ranks meet between tasks only, and one may finish its share of a task hours before another (a long task
# on the CPU): the default 10-30 minutes would stop a healthy run. A rank that dies takes the others down
# through torchrun, not this timeout.
WAIT = timedelta(days=1)


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    local_size: int  # ranks on this machine
    model_ranks: int = 1  # ranks holding one model between them (--tp)

    @property
    def shares(self) -> int:
        """How many shares each task is made in: one a model."""
        return self.size // self.model_ranks

    @property
    def share(self) -> int:
        return self.rank // self.model_ranks

    @property
    def writes(self) -> bool:
        """Whether this rank writes its share's records (its model's first rank)."""
        return self.rank % self.model_ranks == 0


_model_ranks = 1  # joined's, for world()


def world() -> World:
    """This process's place among those torchrun started (rank 0 of 1 without torchrun)."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)),
                 int(env.get("LOCAL_WORLD_SIZE", 1)), _model_ranks)


@contextmanager
def joined(device: str | None, model_ranks: int = 1):
    """The body run in torchrun's process group; yields the device this rank loads the model on (`device`,
    or cuda:LOCAL_RANK for a CUDA one; None: no model). `model_ranks`: --tp, the ranks that hold one model
    (all of them). A rank that fails prints its error and exits at once (leaving normally could wait forever on
    a collective, or on NCCL's teardown); torchrun then stops the rest."""
    global _model_ranks
    w = world()
    if model_ranks != 1 and model_ranks != w.size:
        raise QwenkitError(f"--tp {model_ranks} but torchrun started {w.size} processes: eval splits one model "
                           f"over all of them, so give --tp {w.size} (or torchrun --nproc-per-node {model_ranks})")
    _model_ranks = model_ranks
    try:
        if w.size == 1:
            yield device
            return
        from ..loading import resolve_device

        cuda = device is not None and resolve_device(device).type == "cuda"
        if cuda:
            if w.local_rank >= torch.cuda.device_count():
                raise QwenkitError(f"{w.local_size} processes on this machine and {torch.cuda.device_count()} GPUs: "
                                   "each process takes a GPU of its own (--nproc-per-node at most the GPUs)")
            device = f"cuda:{w.local_rank}"
            torch.cuda.set_device(device)
        elif device is not None and os.environ.get("OMP_NUM_THREADS", "1") == "1":
            # torchrun sets OMP_NUM_THREADS=1 where the user did not (so a 1 is most likely its default, one core
            # a rank): the cores this process may use are divided among this machine's ranks. Other values stay.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // w.local_size))
        if w.rank:  # rank 0 alone reports: the same model's warnings and bars once
            os.environ["QWENKIT_NO_PROGRESS"] = "1"
            warnings.simplefilter("ignore")
        created = not dist.is_initialized()
        if created:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT)
        try:
            yield device
        except BaseException as error:
            _exit(error, w)
        if created:
            dist.destroy_process_group()
    finally:
        _model_ranks = 1


def _exit(error: BaseException, w: World) -> None:
    if isinstance(error, (QwenkitError, ValueError)):
        message, code = str(error), 2
    elif isinstance(error, KeyboardInterrupt):
        message, code = "interrupted", 130
    else:
        message, code = traceback.format_exc(), 1
    sys.stdout.flush()
    print(f"qwenkit: error (rank {w.rank} of {w.size}): {message}", file=sys.stderr, flush=True)
    os._exit(code)


@contextmanager
def _together():
    """A collective's failure, said plainly: most likely a rank died, and its own error comes first."""
    try:
        yield
    except RuntimeError as error:
        raise QwenkitError(f"lost the other ranks (one failed? its error comes first): {str(error).splitlines()[0]}"
                           ) from None


def my_share(items: list) -> list:
    """This rank's contiguous share of `items` (the first shares take one more when they do not divide evenly:
    a task of one item, ppl, runs on rank 0). Contiguous rather than strided: a multiple-choice subject's
    questions stay together on one rank (two at a boundary), which computes the subject's few-shot prefix once
    and reuses it (backend.LocalModel); strided shares would have every rank compute every subject's prefix."""
    w = world()
    size, extra = divmod(len(items), w.shares)
    start = w.share * size + min(w.share, extra)
    return items[start:start + size + (w.share < extra)]


def from_rank0(make):
    """make() run on rank 0 alone; its result on every rank."""
    w = world()
    if w.size == 1:
        return make()
    box = [make() if w.rank == 0 else None]
    with _together():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def to_rank0(value) -> list | None:
    """Every rank's `value`, in rank order, on rank 0; None on the others."""
    w = world()
    if w.size == 1:
        return [value]
    values = [None] * w.size if w.rank == 0 else None
    with _together():
        dist.gather_object(value, values, dst=0)
    return values


def agreed(setup: dict) -> dict:
    """Rank 0's setup, which every rank's records are written under; an error where a rank loaded the model
    otherwise (beyond its GPU's number)."""
    w = world()
    if w.size == 1:
        return setup
    setups = [None] * w.size
    with _together():
        dist.all_gather_object(setups, setup)

    def alike(s: dict) -> dict:
        return {**s, "device": s["device"].partition(":")[0]} if "device" in s else s

    for rank, other in enumerate(setups):
        if alike(other) != alike(setups[0]):
            raise QwenkitError(f"rank {rank} loaded the model otherwise than rank 0 ({other}; rank 0: {setups[0]})")
    return setups[0]


def own_file(path: Path) -> Path:
    """Where this rank writes the records of the task whose file is `path` (nowhere, os.devnull, for a rank
    whose model's first rank writes the same records)."""
    w = world()
    if not w.writes:
        return Path(os.devnull)
    return path if w.share == 0 else path.with_suffix(f".rank{w.share}.jsonl")


def rank_files(path: Path) -> list[Path]:
    """The rank files of the task whose file is `path`: this run's, or an interrupted run's."""
    return sorted(path.parent.glob(f"{path.stem}.rank*.jsonl"))
