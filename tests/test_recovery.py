"""Lost ranks under torchrun: a killed rank is restarted and the run finishes as if uninterrupted; a
stuck rank ends the job with an error that names it, never a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import reliability_workers as RW
import torch

from dchag.parallel.launch import spawn
from dchag.train.checkpoint import complete_checkpoints, read_logical_weights
from dchag.train.metrics import read_metrics

ROOT = Path(__file__).parents[1]
LONG_RUN = RW.RESUME_MODEL + ["parallel.tp=2", "train.steps=200", "train.checkpoint_every=20"]


def torchrun(out: Path, *extra: str, restarts: int = 0) -> subprocess.Popen:
    # a fresh rendezvous store per restart: torchrun's shared store keeps the failed attempt's process-group
    # addresses, which a restarted rank may read (pytorch/pytorch#135712; see docs/reliability.md)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", str(restarts), "-m", "dchag", "train", "--out", str(out), "--no-progress",
        "--resume", "auto", "--set", *LONG_RUN, *extra,
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker_pid(agent: int, rank: int) -> int:
    """The pid of the training process with RANK=`rank` among torchrun's children."""
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no worker with RANK={rank} among {children}")


def wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _uninterrupted(out: str) -> None:
    from dchag.configure import load_config
    from dchag.train.loop import train

    train(load_config(None, LONG_RUN), out, progress=False)


@pytest.mark.slow
def test_a_killed_rank_is_restarted_and_the_run_finishes_as_if_never_interrupted(tmp_path):
    run = tmp_path / "killed"
    proc = torchrun(run, restarts=1)
    wait_for(lambda: bool(complete_checkpoints(run)) or proc.poll() is not None)
    os.kill(worker_pid(proc.pid, 1), signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "resuming from" in err  # the restart continued from the checkpoint
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == list(range(200))  # no gap, nothing twice: the redone steps replaced the lost ones

    spawn(_uninterrupted, 2, str(tmp_path / "uninterrupted"))
    got = read_logical_weights(complete_checkpoints(run)[-1])
    expected = read_logical_weights(complete_checkpoints(tmp_path / "uninterrupted")[-1])
    assert complete_checkpoints(run)[-1].name == "step-00000200"
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # same layout, fp32: bit for bit


@pytest.mark.slow
def test_a_stuck_rank_ends_the_job_with_an_error_naming_it(tmp_path):
    run = tmp_path / "stuck"
    proc = torchrun(run, "parallel.timeout_s=3", "train.steps=5000")
    wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run / "metrics.jsonl")) > 2)
    stuck, watcher = worker_pid(proc.pid, 1), worker_pid(proc.pid, 0)
    os.kill(stuck, signal.SIGSTOP)  # alive but silent, like a hung node
    try:  # rank 0 gives up after the timeout (and its monitored barrier), well before a minute
        wait_for(lambda: _gone(watcher) or proc.poll() is not None, timeout=60)
    finally:
        os.kill(stuck, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    line = next(x for x in err.splitlines() if "lost a peer" in x)
    assert "rank 0" in line and "ranks 1 did not answer" in line and "parallel.timeout_s=3s" in line, line
    assert "Traceback" not in err.split("lost a peer")[0]


def _gone(pid: int) -> bool:
    """Exited (a zombie not yet reaped by torchrun counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True
