"""A torchrun worker leaves when its launcher is gone.

torchrun starts each worker with `subprocess.Popen(start_new_session=True)`: a SIGKILL of the agent alone
(`kill -9`, the OOM killer, a scheduler that signals only the agent) reaches no worker, and the orphans
train on and keep writing checkpoints and metrics into the run folder a restarted job resumes from. So
`dchag train` under torchrun arms two guards before it trains:

- Linux: `prctl(PR_SET_PDEATHSIG, SIGKILL)`: the kernel kills the worker when the *thread* that started it
  exits. torchrun's agent starts (and restarts) workers from its main thread, the one that runs its
  monitoring loop, so that is when the agent process dies.
- everywhere: a daemon thread polls `os.getppid()` every half second; once the worker has been re-parented
  (to init or a subreaper) it prints one line and leaves with exit code 3 at once (`os._exit`: nothing
  more is written). It also catches an agent that died before the guards were armed.

`DCHAG_NO_PARENT_WATCH=1` turns both off, for a worker that is meant to outlive its launcher.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

DISABLE_ENV = "DCHAG_NO_PARENT_WATCH"
LAUNCHER_GONE_EXIT = 3  # the exit code of a worker whose launcher died
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def under_torchrun() -> bool:
    """This process is a worker that torchrun's elastic agent started (it sets TORCHELASTIC_RUN_ID)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Linux: have the kernel send `sig` to this process when its parent thread exits. False where the
    call is not available (other systems, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _leave(parent: int) -> None:
    rank = os.environ.get("RANK", "?")
    print(
        f"dchag: rank {rank}: the launcher (torchrun agent, pid {parent}) is gone; exiting so that no orphaned "
        f"rank keeps writing into the run folder (set {DISABLE_ENV}=1 to let ranks outlive their launcher)",
        file=sys.stderr,
        flush=True,
    )
    os._exit(LAUNCHER_GONE_EXIT)


def _poll(parent: int, interval_s: float) -> None:
    while True:
        time.sleep(interval_s)
        if os.getppid() != parent:
            _leave(parent)


def watch_launcher(interval_s: float = 0.5, *, death_signal: bool = True) -> bool:
    """Arm the guards (see the module's docstring) unless DCHAG_NO_PARENT_WATCH=1; True when armed.
    `death_signal=False` leaves only the polling thread (what non-Linux systems get)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False
    parent = os.getppid()
    if parent == 1:  # already re-parented to init: the launcher died before we got here
        _leave(parent)
    if death_signal:
        set_parent_death_signal()
    if os.getppid() != parent:  # it died while the signal was being set
        _leave(parent)
    threading.Thread(target=_poll, args=(parent, interval_s), name="dchag-launcher-watch", daemon=True).start()
    return True
