"""How a worker ends when its launcher is SIGKILLed (run as a script by test_recovery.py).

This process makes itself a subreaper (so the orphaned worker becomes its child and its exit status can
be read), starts a launcher that starts one worker in a session of its own, as torchrun does; the worker
arms `dchag.train.watchdog.watch_launcher` and sleeps. The launcher is SIGKILLed; the worker's end is
printed as JSON: {"armed", "exit" (exit code, -N for signal N, null: still running after 5 s),
"seconds", "stderr"}.

usage: python orphan_probe.py poll|signal|off STDERR_FILE
  poll: the polling thread alone; signal: the parent-death signal too; off: DCHAG_NO_PARENT_WATCH=1
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

WORKER = """
import sys, time
from dchag.train.watchdog import watch_launcher
print(watch_launcher(0.1, death_signal=sys.argv[1] == "signal"), flush=True)
time.sleep(30)
"""

LAUNCHER = """
import subprocess, sys, time
err = open(sys.argv[2], "w")
worker = subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[1]], stdout=subprocess.PIPE, stderr=err,
                          text=True, start_new_session=True)
print(worker.pid, worker.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


def main(mode: str, stderr_file: str) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    env = {**os.environ, "DCHAG_NO_PARENT_WATCH": "1" if mode == "off" else "0"}
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, mode, stderr_file, WORKER], stdout=subprocess.PIPE, text=True, env=env
    )
    pid, armed = launcher.stdout.readline().split()
    worker = int(pid)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    killed = time.monotonic()
    status = None
    while status is None and time.monotonic() - killed < 5:
        done, raw = os.waitpid(worker, os.WNOHANG)
        status = os.waitstatus_to_exitcode(raw) if done else None
        time.sleep(0.02)
    seconds = time.monotonic() - killed
    if status is None:  # still running: end it here
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
    return {"armed": armed == "True", "exit": status, "seconds": seconds, "stderr": Path(stderr_file).read_text()}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:])))
