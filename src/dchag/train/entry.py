"""Entry point of `dchag train`: single process, or one rank of a torchrun launch.

Exit codes: 0 done, 1 training failed (non-finite values, diverged replicas, a lost peer), 2 bad input
(config, data, checkpoint), 3 the torchrun agent that launched this rank is gone (`train/watchdog.py`).
Under `torchrun --max-restarts N` a non-zero exit of any rank restarts all of them; with `--resume auto`
the restart continues from the newest complete checkpoint.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from dchag.config import Config, ConfigError
from dchag.parallel.mesh import is_comm_failure, unresponsive_ranks
from dchag.parallel.parallelize import ReplicaDivergence
from dchag.train.checkpoint import CheckpointError
from dchag.train.guards import TrainingFailure
from dchag.train.loop import summary_line, train
from dchag.train.watchdog import under_torchrun, watch_launcher


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _say(message: str, *, every_rank: bool = False) -> None:
    if every_rank and dist.is_initialized() and dist.get_world_size() > 1:
        message = message.replace("dchag: ", f"dchag: rank {_rank()}: ", 1)
    if every_rank or _rank() == 0:
        print(message, file=sys.stderr, flush=True)


def _leave(code: int) -> int:
    """Leave the process group cleanly: `destroy_process_group` releases gloo's connections before
    interpreter teardown. After a failed collective the group is shut down without waiting for peers."""
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        if code == 0:
            dist.barrier()  # every rank has finished every collective and file write
        dist.destroy_process_group()
    return code


def lost_peer_message(err: BaseException, timeout_s: float) -> str:
    """One line for a collective that failed because a peer died or hung: which ranks do not answer
    (from rank 0's monitored barrier), what gloo/NCCL said, and what to do."""
    said = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    said = said.split("] ", 1)[-1][:200]  # drop the C++ source location
    silent = unresponsive_ranks(min(timeout_s, 30.0))
    who = f"{silent} did not answer" if silent else "a peer rank died or did not answer"
    return (
        f"dchag: lost a peer: {who} within parallel.timeout_s={timeout_s:g}s ({said}); torchrun's report names "
        "any rank that exited; restart with --resume auto to continue from the last checkpoint"
    )


def run_training(cfg: Config, out_dir: str, *, progress: bool = True, **options) -> int:
    """`dchag train` on this process (one rank of a torchrun launch, or alone): the exit code.
    `options` are `train()`'s (resume, overwrite, resume_changed)."""
    if under_torchrun():
        watch_launcher()  # an orphaned rank must not write into the run folder a restart resumes from
    try:
        summary = train(cfg, out_dir, progress=progress, **options)
    except (TrainingFailure, ReplicaDivergence) as err:  # a decision every rank took together
        _say(f"dchag: training stopped: {err}")
        return _leave(1)
    except CheckpointError as err:  # agreed on every rank
        _say(f"dchag: {err.kind}: {err}")
        return _leave(2)
    except ConfigError as err:  # may be this rank's alone (its data files)
        _say(f"dchag: {getattr(err, 'kind', 'config error')}: {err}", every_rank=True)
        return _leave(2)
    except RuntimeError as err:
        if not (dist.is_initialized() and is_comm_failure(err)):
            raise
        _say(lost_peer_message(err, cfg.parallel.timeout_s), every_rank=True)
        dist.destroy_process_group()
        return 1
    if _rank() == 0:
        print(summary_line(summary), flush=True)
    return _leave(0)
