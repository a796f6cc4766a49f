"""A failed save or read names its real cause: disk space or permissions only for file-system errors of
that kind, a damaged file for a truncated one, and an internal error (a bug to report) when DCP refuses
the shard plan."""

from __future__ import annotations

import errno
import shutil

import pytest
import torch
from conftest import small_config
from torch.distributed.checkpoint import FileSystemWriter

import dchag.train.checkpoint as checkpoint
from dchag.model import build_model
from dchag.parallel.logical_shards import Chunk, LogicalShards
from dchag.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def _save(run, step: int = 1):
    model = build_model(small_config())
    return save_checkpoint(run, step, model, None, None, {}, None, keep=0)


def _failing_write(code: int):
    def write_data(self, plan, planner):
        raise OSError(code, {errno.ENOSPC: "No space left on device", errno.EACCES: "Permission denied"}[code])

    return write_data


def test_a_full_disk_says_free_disk_space(tmp_path, monkeypatch):
    monkeypatch.setattr(FileSystemWriter, "write_data", _failing_write(errno.ENOSPC))
    with pytest.raises(CheckpointError, match=r"No space left on device \(free disk space on the file system of "):
        _save(tmp_path)


def test_a_permission_error_says_fix_permissions_not_disk_space(tmp_path, monkeypatch):
    monkeypatch.setattr(FileSystemWriter, "write_data", _failing_write(errno.EACCES))
    with pytest.raises(CheckpointError, match=r"Permission denied \(fix the permissions of the run folder") as err:
        _save(tmp_path)
    assert "disk" not in str(err.value)


def test_shards_that_do_not_tile_a_tensor_are_an_internal_error_not_a_disk_problem(tmp_path, monkeypatch):
    """DCP's refusal of a shard plan, in one process: two chunks of one tensor overlap (with several ranks,
    a hole, as in issue 17, is refused the same way). Counter-check: chunks that tile the tensor save."""
    whole = torch.arange(4.0)
    overlapping = {"t": LogicalShards((4,), [Chunk((0,), whole[:3]), Chunk((2,), whole[2:])])}
    monkeypatch.setattr(checkpoint, "checkpoint_tensors", lambda *a: overlapping)
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path / "overlap")
    message = str(err.value)
    assert "Failed to validate global plan: key:t has overlapping chunks" in message
    assert message.endswith(
        "(internal error: the ranks' shards do not tile the model's tensors under one process; please report it "
        "with the config)"
    )
    assert "disk" not in message and "permission" not in message
    tiling = {"t": LogicalShards((4,), [Chunk((0,), whole[:3])], padding=[Chunk((3,), whole[3:])])}
    monkeypatch.setattr(checkpoint, "checkpoint_tensors", lambda *a: tiling)
    assert (_save(tmp_path / "whole") / "train_state.json").is_file()


def test_a_missing_data_file_is_named_as_missing_not_as_damaged(tmp_path):
    path = _save(tmp_path)
    shutil.copytree(path, tmp_path / "copy")
    (tmp_path / "copy/__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"a file of the checkpoint folder is missing") as err:
        load_checkpoint(tmp_path / "copy", build_model(small_config()), None, None)
    assert "damaged" not in str(err.value)
