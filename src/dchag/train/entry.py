"""Entry point of `dchag train`: single process, or one rank of a torchrun launch."""

from __future__ import annotations

import torch.distributed as dist

from dchag.config import Config
from dchag.train.loop import summary_line, train


def run_training(cfg: Config, out_dir: str, *, progress: bool = True) -> int:
    try:
        summary = train(cfg, out_dir, progress=progress)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(summary_line(summary), flush=True)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
