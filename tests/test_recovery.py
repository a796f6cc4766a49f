"""Lost ranks under torchrun: a killed rank is restarted and the run finishes as if uninterrupted; a
stuck rank ends the job with an error that names it, never a hang; a killed launcher leaves no rank
running."""

from __future__ import annotations

import json
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


def torchrun(
    out: Path, *extra: str, restarts: int = 0, env: dict | None = None, session: bool = False
) -> subprocess.Popen:
    """`dchag train` on 2 ranks under torchrun; `session`: the agent in a session of its own (so that
    a signal to it alone reaches nobody else)."""
    # a fresh rendezvous store per restart: torchrun's shared store keeps the failed attempt's process-group
    # addresses, which a restarted rank may read (pytorch/pytorch#135712; see docs/reliability.md)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
        **(env or {}),
    }
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "--max-restarts", str(restarts), "-m", "dchag", "train", "--out", str(out), "--no-progress",
        "--resume", "auto", "--set", *LONG_RUN, *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=session
    )


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


def processes_writing_to(run: Path, but: int) -> list[int]:
    """Live processes (not zombies) whose command line names the run folder, except pid `but`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == but:
            continue
        try:
            if str(run).encode() in (entry / "cmdline").read_bytes() and not _gone(int(entry.name)):
                found.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return found


def _folder_state(run: Path) -> list[tuple[str, int]]:
    """Every file under the run folder with its size: any checkpoint or metrics line written shows."""
    return sorted((str(p.relative_to(run)), p.stat().st_size) for p in run.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", ["poll", "signal"])
def test_a_worker_whose_launcher_is_killed_exits_at_once(tmp_path, mode):
    """The polling thread alone (what non-Linux systems get) exits with code 3 and one line naming the
    dead launcher; with the parent-death signal (Linux) the kernel kills the worker at once."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests/orphan_probe.py"), mode, str(tmp_path / "err.txt")],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["armed"] and result["seconds"] < 2, result
    if mode == "poll":
        assert result["exit"] == 3, result
        line = result["stderr"].strip()
        assert line.startswith("dchag: rank ?: the launcher (torchrun agent, pid ") and "is gone" in line, line
    else:
        assert result["exit"] == -signal.SIGKILL, result


def test_a_worker_with_the_launcher_watch_disabled_outlives_its_launcher(tmp_path):
    """Counter-check: DCHAG_NO_PARENT_WATCH=1 leaves the orphan running (the probe then ends it)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests/orphan_probe.py"), "off", str(tmp_path / "err.txt")],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert not result["armed"] and result["exit"] is None, result


@pytest.mark.slow
def test_no_rank_is_left_writing_after_the_torchrun_agent_is_killed(tmp_path):
    """SIGKILL of the agent alone: within 10 s no worker of the run is left and the run folder stops
    changing. Counter-check, in the same launch: a run with DCHAG_NO_PARENT_WATCH=1 keeps training
    (its orphans are killed at the end)."""
    watched, unwatched = tmp_path / "watched", tmp_path / "unwatched"
    procs = {
        watched: torchrun(watched, "train.steps=5000", session=True),
        unwatched: torchrun(unwatched, "train.steps=5000", session=True, env={"DCHAG_NO_PARENT_WATCH": "1"}),
    }
    try:
        for run, proc in procs.items():
            wait_for(lambda: (run / "metrics.jsonl").is_file() or proc.poll() is not None, timeout=300)
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert len(processes_writing_to(run, but=proc.pid)) == 2
        for proc in procs.values():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        wait_for(lambda: not processes_writing_to(watched, but=procs[watched].pid), timeout=10)
        state = _folder_state(watched)
        before = (unwatched / "metrics.jsonl").stat().st_size
        time.sleep(3)
        assert _folder_state(watched) == state  # nothing written once the ranks are gone
        assert len(processes_writing_to(unwatched, but=procs[unwatched].pid)) == 2
        wait_for(lambda: (unwatched / "metrics.jsonl").stat().st_size > before, timeout=60)  # orphans train on
    finally:
        for run, proc in procs.items():
            for pid in processes_writing_to(run, but=proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.stdout.close()
            proc.stderr.close()
