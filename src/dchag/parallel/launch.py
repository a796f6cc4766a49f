"""Start N local gloo/NCCL processes without torchrun (tests, `dchag check-parity`).

Ranks rendezvous through a file (no fixed ports) and hand their return values back through files.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init_file: str, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(minutes=10)
    )
    try:
        result = fn(*args)
        error = None
        dist.barrier()  # every rank is done with every collective before any rank leaves
    except BaseException as err:  # report the failure to the parent with its traceback
        result, error = None, f"rank {rank}: {type(err).__name__}: {err}\n{traceback.format_exc()}"
    # written whole or not at all: the parent may stop this rank mid-write after a peer failed
    tmp = Path(out_dir, f".rank{rank}.pkl.tmp")
    tmp.write_bytes(pickle.dumps((result, error)))
    os.replace(tmp, Path(out_dir, f"rank{rank}.pkl"))
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter teardown: gloo's worker threads can abort the process from C++ static
    # destructors ("terminate called without an active exception") after the work is done and written.
    # A failed rank exits non-zero, so the parent stops its peers instead of leaving them waiting in a
    # collective the failed rank will never join.
    os._exit(1 if error else 0)


def spawn(fn: Callable, world: int, *args: Any) -> list[Any]:
    """Run `fn(*args)` on `world` ranks; returns each rank's result; raises if any rank failed.

    `fn` must be importable (a module-level function).
    """
    with tempfile.TemporaryDirectory(prefix="dchag-spawn-") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        try:
            mp.start_processes(
                _worker, args=(world, init_file, tmp, fn, args), nprocs=world, join=True, start_method="spawn"
            )
        except mp.ProcessExitedException:
            pass  # a rank failed and its peers were stopped: its error is in its result file
        results, errors = [], []
        for rank in range(world):
            path = Path(tmp, f"rank{rank}.pkl")
            if not path.exists():
                errors.append(f"rank {rank} wrote no result (stopped after a peer failed, or killed)")
                continue
            result, error = pickle.loads(path.read_bytes())
            results.append(result)
            if error:
                errors.append(error)
        if errors:  # the rank that failed first, not the peers that lost their connection to it
            peer_lost = ("Connection reset", "Connection closed", "Broken pipe", "wrote no result")
            errors.sort(key=lambda e: any(s in e for s in peer_lost))
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return results
