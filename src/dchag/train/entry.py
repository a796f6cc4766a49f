"""Entry point of `dchag train`: single process, or one rank of a torchrun launch."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist

from dchag.config import Config
from dchag.train.loop import summary_line, train


def run_training(cfg: Config, out_dir: str, *, progress: bool = True) -> int:
    summary = train(cfg, out_dir, progress=progress)
    if not dist.is_initialized():
        print(summary_line(summary), flush=True)
        return 0
    if dist.get_rank() == 0:
        print(summary_line(summary), flush=True)
    dist.barrier()  # every rank has finished every collective and file write
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter teardown: gloo's worker threads can abort a finished process from C++
    # static destructors ("terminate called without an active exception"), which torchrun reports as a
    # failed run.
    os._exit(0)
