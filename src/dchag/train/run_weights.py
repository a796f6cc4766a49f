"""A run folder's trained model on one device: the one loader behind `dchag eval`, `dchag export`,
`dchag embed` and `dchag.load`.

A run folder holds `config.yaml` and `checkpoints/step-*`; the weights are read as the logical
(single-device) state_dict whatever layout wrote them, the config is reset to one process with data
loaded in the calling process, and the normalisation statistics come from the checkpoint (or the run's
`stats.json`). File-backed runs without statistics are refused: their model cannot be fed correctly.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dchag.config import Config, ConfigError, ParallelConfig
from dchag.configure import load_config
from dchag.data.held_out import FILE_BACKED
from dchag.model import build_model
from dchag.train.checkpoint import (
    complete_checkpoints,
    is_complete,
    read_logical_weights,
    read_stats,
    read_train_state,
)

SINGLE_PROCESS = ["parallel.tp=1", "parallel.dp_shard=1", "parallel.dp_replicate=1", "parallel.cp=1", "data.workers=0"]


@dataclass
class RunWeights:
    config: Config  # single-process config (parallel reset, data.workers=0)
    model: torch.nn.Module  # the single-device model with the checkpoint's weights, eval mode
    stats: dict | None  # normalisation statistics (None: synthetic data, used as generated)
    checkpoint: Path  # the checkpoint folder the weights came from
    step: int  # its training step


def pick_checkpoint(run: str | Path, checkpoint: str | Path | int | None = None, *, option: str = "--run") -> Path:
    """The checkpoint folder of `run`: the newest complete one, or the one `checkpoint` names (a folder,
    or a step number)."""
    run = Path(run)
    found = complete_checkpoints(run)
    if not (run / "config.yaml").is_file() or not found:
        raise ConfigError(
            f"{option} {str(run)!r} is not a run folder with a checkpoint (needs config.yaml and checkpoints/step-*)"
        )
    if checkpoint is None:
        return found[-1]
    if isinstance(checkpoint, int) or str(checkpoint).isdigit():
        steps = {int(read_train_state(p)["step"]): p for p in found}
        if int(checkpoint) not in steps:
            raise ConfigError(
                f"checkpoint step {int(checkpoint)} is not among the complete checkpoints of {str(run)!r} "
                f"(steps {sorted(steps)})"
            )
        return steps[int(checkpoint)]
    path = Path(checkpoint)
    if not is_complete(path):
        raise ConfigError(
            f"checkpoint {str(path)!r} is not a complete checkpoint folder (needs train_state.json); "
            f"give one of {[p.name for p in found]} or a step number"
        )
    return path


def load_run_weights(
    run: str | Path,
    checkpoint: str | Path | int | None = None,
    *,
    data_path: str | None = None,
    option: str = "--run",
) -> RunWeights:
    """The run's model with the weights of `checkpoint` (default: the newest), on the CPU, eval mode.
    `data_path` points the config at another file holding the same variables."""
    run = Path(run)
    chosen = pick_checkpoint(run, checkpoint, option=option)
    overrides = list(SINGLE_PROCESS)
    if data_path is not None:
        overrides.append(f"data.path={data_path}")
    cfg = load_config(run / "config.yaml", overrides)
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig())
    model = build_model(cfg)
    model.load_state_dict(read_logical_weights(chosen))
    stats = read_run_stats(run, chosen, cfg, option=option)
    step = int(read_train_state(chosen)["step"])
    return RunWeights(cfg, model.eval(), stats, chosen, step)


def read_run_stats(run: str | Path, checkpoint: Path, cfg: Config, *, option: str = "--run") -> dict | None:
    """The normalisation statistics of `run`: the checkpoint's, else the run folder's `stats.json`; None for
    synthetic data. A file-backed run without them is refused: its model cannot be fed correctly."""
    run = Path(run)
    stats = read_stats(checkpoint)
    if stats is None and (run / "stats.json").is_file():
        stats = json.loads((run / "stats.json").read_text())
    if stats is None and cfg.data.kind in FILE_BACKED:
        raise ConfigError(
            f"{option} {str(run)!r} has no normalisation statistics (stats.json in {str(checkpoint)!r} or in the "
            "run folder), which its model was trained with; copy them back, or train the run again"
        )
    return stats
