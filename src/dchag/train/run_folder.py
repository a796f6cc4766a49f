"""The run folder belongs to one run and to one job at a time.

A run folder holds one run's checkpoints, metrics and statistics. Training into a folder that already
holds another run would mix them (an older run's `step-00000300` outliving a new 50-step run, pruning
deleting the new run's checkpoints first, a stale `stats.json`), so a new run into a used folder is
refused unless the user says `--resume` (continue it) or `--overwrite` (remove the old run's files).

A lock file `RUN/dchag.lock` names the job that owns the folder (host, pid, start time, job id); a second
job into a locked folder is refused. A lock whose owner is gone (the pid is dead or was reused on this
host, or it is the previous attempt of the same torchrun/Slurm job) is taken over, and that is logged.
Rank 0 claims the folder; every rank raises the same error (`agree`), so no rank is left waiting.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from dchag.config import ConfigError
from dchag.train.checkpoint import CHECKPOINTS, STATS_FILE, agree, complete_checkpoints

LOCK_FILE = "dchag.lock"
# what `dchag train` writes into a run folder, and so what --overwrite removes (nothing else is touched)
RUN_FILES = ("metrics.jsonl", "summary.yaml", "config.yaml", STATS_FILE)


def check_out_dir(out: Path) -> None:
    """The run folder exists (created if needed) and is writable, before any work is done."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the run folder --out {str(out)!r}: {err.strerror or err}") from None
    probe = out / f".dchag-write-probe-{os.getpid()}"
    try:  # a real write: permission bits say nothing for root or read-only mounts
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"the run folder --out {str(out)!r} is not writable ({err.strerror or err}); choose another folder"
        ) from None


# ---------------------------------------------------------------------------------------------------
# the lock


def _job_id() -> str:
    """The scheduler's or launcher's id of this job (the same for every restart of a torchrun job). torchrun
    without --standalone or --rdzv-id calls every job "none": that names no job."""
    torchrun = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return os.environ.get("SLURM_JOB_ID") or (torchrun if torchrun != "none" else "")


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), which tells a reused pid apart; None if
    no such process (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5), counted after the command name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass
class Owner:
    host: str
    pid: int
    started: str  # ISO time
    job: str = ""
    proc_start: str | None = None

    @classmethod
    def me(cls) -> "Owner":
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(socket.gethostname(), os.getpid(), now, _job_id(), _process_start(os.getpid()))

    def describe(self) -> str:
        job = f", job {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, started {self.started}"

    def gone(self) -> bool:
        """True when the owning process has certainly ended: a dead or reused pid on this host, or an
        earlier attempt of this very job (torchrun stops every worker before it restarts them)."""
        if self.job and self.job == _job_id():
            return True
        if self.host != socket.gethostname():
            return False  # another machine's process: cannot be checked from here
        if not _alive(self.pid):
            return True
        return self.proc_start is not None and _process_start(self.pid) != self.proc_start


def read_owner(out: Path) -> Owner | None:
    try:
        data = json.loads((out / LOCK_FILE).read_text())
        return Owner(**{k: data.get(k) for k in ("host", "pid", "started", "job", "proc_start")})
    except (OSError, ValueError, TypeError):
        return None


def _take_lock(out: Path) -> str:
    """Create the lock (atomically, O_EXCL), taking over a stale one; '' or why the folder is taken."""
    path = out / LOCK_FILE
    me = Owner.me()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = read_owner(out)
            if owner is None or owner.gone():
                was = owner.describe() if owner else "unreadable"
                print(f"dchag: taking over the stale lock of run folder {str(out)!r} ({was})", file=sys.stderr)
                path.unlink(missing_ok=True)
                continue
            return (
                f"run folder --out {str(out)!r} is in use by another job ({owner.describe()}); wait for it to end "
                f"or choose another --out (if that job is gone, delete {str(path)!r})"
            )
        with os.fdopen(fd, "w") as handle:
            json.dump(vars(me), handle)
        return ""
    return f"cannot take the lock {str(path)!r}: another job keeps creating it"


def release_lock(out: Path) -> None:
    """Remove the lock if this process holds it (rank 0 at the end of a run, whatever the outcome)."""
    owner = read_owner(out)
    if owner is not None and owner.pid == os.getpid() and owner.host == socket.gethostname():
        (out / LOCK_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------
# one run per folder


def held_run(out: Path) -> str | None:
    """What of an earlier run the folder holds (for the refusal), or None if it holds none."""
    checkpoints = complete_checkpoints(out)
    if checkpoints:
        return f"{len(checkpoints)} checkpoint(s), the newest {checkpoints[-1].name}"
    found = [name for name in RUN_FILES if (out / name).is_file()]
    return f"{', '.join(found)}" if found else None


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in (path.resolve(), *path.resolve().parents)


def reuse_problem(out: Path, resume: str | None, overwrite: bool) -> str:
    """'' when this run may use `out`, else why not (one line)."""
    if overwrite and resume == "auto":
        return "--overwrite starts afresh and --resume auto continues the run in --out: give one of them"
    if overwrite and resume is not None and _inside(Path(resume), out):
        return f"--overwrite would delete the checkpoint --resume {resume!r} names; give a new --out"
    if overwrite or resume == "auto":
        return ""
    if resume is not None and _inside(Path(resume), out):
        return ""
    held = held_run(out)
    if held is None:
        return ""
    return (
        f"--out {str(out)!r} already holds a run ({held}); continue it with --resume auto, start afresh with "
        "--overwrite (removes its checkpoints, metrics and statistics), or choose another --out"
    )


def clear_run(out: Path) -> None:
    """Remove what `dchag train` wrote into `out` (checkpoints, metrics, summary, config, statistics)."""
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def claim_run_folder(out: Path, *, resume: str | None, overwrite: bool) -> None:
    """Rank 0 takes the lock, checks the folder may hold this run and clears it for --overwrite; every
    rank raises the same ConfigError, or returns once the folder is ready (all ranks in step)."""
    main = not dist.is_initialized() or dist.get_rank() == 0
    error = ""
    if main:
        error = _take_lock(out)
        if not error:
            error = reuse_problem(out, resume, overwrite)
            if error:
                release_lock(out)
            elif overwrite and held_run(out):
                print(f"dchag: --overwrite: removing the earlier run in {str(out)!r}", file=sys.stderr)
                clear_run(out)
    agree(error, ConfigError)
