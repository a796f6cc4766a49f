"""Entry point of `dchag train`: chooses single-process or distributed training."""

from __future__ import annotations

from dchag.config import Config
from dchag.train.loop import summary_line, train


def run_training(cfg: Config, out_dir: str, *, progress: bool = True) -> int:
    summary = train(cfg, out_dir, progress=progress)
    print(summary_line(summary))
    return 0
