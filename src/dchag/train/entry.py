"""Entry point of `dchag train`: single process, or one rank of a torchrun launch."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from dchag.config import Config
from dchag.parallel.parallelize import ReplicaDivergence
from dchag.train.guards import TrainingFailure
from dchag.train.loop import summary_line, train


def _leave(code: int) -> None:
    """Leave a distributed rank without interpreter teardown: gloo's worker threads can abort a finished
    process from C++ static destructors ("terminate called without an active exception"), which
    torchrun reports as a failed run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_training(cfg: Config, out_dir: str, *, progress: bool = True) -> int:
    try:
        summary = train(cfg, out_dir, progress=progress)
    except (TrainingFailure, ReplicaDivergence) as err:  # a decision every rank took together
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"dchag: training stopped: {err}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            _leave(1)
        return 1
    if not dist.is_initialized():
        print(summary_line(summary), flush=True)
        return 0
    if dist.get_rank() == 0:
        print(summary_line(summary), flush=True)
    dist.barrier()  # every rank has finished every collective and file write
    _leave(0)
    return 0
