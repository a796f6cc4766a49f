"""A run folder holds one run and is used by one job at a time; a resume continues the same run.

Refusals with their one-line messages are cases of tests/test_bad_input.py; these tests cover what the
allowed paths do: --overwrite, --resume auto, taking over stale locks, --resume-changed, the order of
checkpoints and timed checkpoints."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from reliability_workers import losses, resume_config

from dchag.config import ConfigError
from dchag.train.checkpoint import complete_checkpoints, resolve_resume
from dchag.train.loop import train
from dchag.train.run_folder import LOCK_FILE, Owner, _process_start


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_overwrite_replaces_the_earlier_run_and_nothing_else(tmp_path):
    train(resume_config("train.steps=8"), tmp_path, progress=False)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already holds a run"):
        train(resume_config("train.steps=2"), tmp_path, progress=False)
    train(resume_config("train.steps=2"), tmp_path, progress=False, overwrite=True)
    assert _steps(tmp_path) == ["step-00000002"]  # the old run's step-4 and step-8 are gone
    assert sorted(losses(tmp_path)) == [0, 1]  # metrics of the new run only
    assert (tmp_path / "notes.txt").read_text() == "mine"  # files dchag did not write are kept
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end


def test_resume_auto_continues_the_run_in_the_folder(tmp_path):
    train(resume_config("train.steps=4"), tmp_path, progress=False)
    summary = train(resume_config("train.steps=8"), tmp_path, progress=False, resume="auto")
    assert summary["resumed_from_step"] == 4
    assert sorted(losses(tmp_path)) == list(range(8))


def test_checkpoints_are_ordered_by_the_step_recorded_inside_them(tmp_path):
    for name, step in (("step-00000300", 3), ("step-00000010", 10)):  # names that sort the other way
        folder = tmp_path / "checkpoints" / name
        folder.mkdir(parents=True)
        (folder / "train_state.json").write_text(json.dumps({"format_version": 1, "step": step}))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000300", "step-00000010"]
    assert resolve_resume("auto", tmp_path).name == "step-00000010"


def _lock(run: Path, owner: Owner) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_FILE).write_text(json.dumps(vars(owner)))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    "owner",
    [
        Owner(socket.gethostname(), _dead_pid(), "2026-01-01T00:00:00+00:00"),  # its process is gone
        Owner(socket.gethostname(), 1, "2026-01-01T00:00:00+00:00", "", "123"),  # pid 1 reused since
        Owner("other-host", 1, "2026-01-01T00:00:00+00:00", "job-7"),  # an earlier attempt of this job
    ],
    ids=["dead-pid", "reused-pid", "same-job-restarted"],
)
def test_a_stale_lock_is_taken_over_and_logged(owner, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-7")
    _lock(tmp_path, owner)
    train(resume_config("train.steps=2"), tmp_path, progress=False)
    assert "taking over the stale lock" in capsys.readouterr().err
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_jobs_lock_is_respected(tmp_path, monkeypatch):
    """The counter-check of the stale cases: the same lock with a live owner refuses the run."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-8")
    _lock(tmp_path, Owner(socket.gethostname(), 1, "2026-01-01T00:00:00+00:00", "job-7", _process_start(1)))
    with pytest.raises(ConfigError, match="in use by another job"):
        train(resume_config("train.steps=2"), tmp_path, progress=False)
    assert (tmp_path / LOCK_FILE).exists()  # not ours to remove
    assert not (tmp_path / "checkpoints").exists()


def test_the_lock_is_released_when_training_fails(tmp_path):
    with pytest.raises(ConfigError, match="launch with: torchrun"):
        train(resume_config("parallel.tp=2"), tmp_path, progress=False)
    assert not (tmp_path / LOCK_FILE).exists()


def test_resume_changed_accepts_the_differences_and_records_them(tmp_path):
    train(resume_config("train.steps=4"), tmp_path, progress=False)
    changed = resume_config("train.steps=8", "train.lr=0.0005")
    summary = train(changed, tmp_path, progress=False, resume="auto", resume_changed=True)
    recorded = yaml.safe_load((tmp_path / "summary.yaml").read_text())["resume_changed"]
    assert recorded == {"train.lr": {"checkpoint": 0.001, "now": 0.0005}} == summary["resume_changed"]


def test_a_resume_that_changes_only_the_layout_or_bookkeeping_is_accepted(tmp_path):
    train(resume_config("train.steps=4"), tmp_path, progress=False)
    allowed = resume_config(
        "train.steps=6", "train.log_every=2", "train.keep_checkpoints=1", "data.workers=1", "train.eval_every=2"
    )
    assert "resume_changed" not in train(allowed, tmp_path, progress=False, resume="auto")


def test_timed_checkpoints_are_written_when_the_minutes_pass(tmp_path):
    cfg = resume_config("train.steps=3", "train.checkpoint_every=0", "train.keep_checkpoints=0")
    timed = resume_config(
        "train.steps=3", "train.checkpoint_every=0", "train.keep_checkpoints=0", "train.checkpoint_every_minutes=1e-9"
    )
    train(timed, tmp_path / "timed", progress=False)
    train(cfg, tmp_path / "untimed", progress=False)  # default 30 min: only the end
    assert _steps(tmp_path / "timed") == ["step-00000001", "step-00000002", "step-00000003"]
    assert _steps(tmp_path / "untimed") == ["step-00000003"]


def test_torchruns_default_job_id_names_no_job(tmp_path, monkeypatch):
    """torchrun without --rdzv-id calls every job "none": another such job's live lock is respected."""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _lock(tmp_path, Owner(socket.gethostname(), 1, "2026-01-01T00:00:00+00:00", "none", _process_start(1)))
    with pytest.raises(ConfigError, match="in use by another job"):
        train(resume_config("train.steps=2"), tmp_path, progress=False)
