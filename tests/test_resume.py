"""Checkpoints and resume: a run stopped at step k and resumed continues exactly as if never stopped,
under the same layout (bit for bit) or another one (within 1e-6), and each rank writes only its share."""

from __future__ import annotations

import errno
import json
import os

import pytest
import reliability_workers as RW
import torch

from dchag.data.pipeline import step_batches
from dchag.data.sources import build_source
from dchag.parallel.launch import spawn
from dchag.train.checkpoint import CheckpointError, complete_checkpoints, read_logical_weights
from dchag.train.loop import train
from dchag.train.metrics import read_metrics


@pytest.fixture(scope="module")
def four_rank_runs(tmp_path_factory):
    """One launch at dp_shard 2 x tp 2 (full run, resumed run, base run), one at tp 4 resuming the base
    run, and one process resuming it."""
    root = str(tmp_path_factory.mktemp("resume"))
    dp2_tp2 = spawn(RW.dp2_tp2_suite, 4, root)
    tp4 = spawn(RW.tp4_resume, 4, root)[0]
    train(RW.resume_config(), f"{root}/single", progress=False, resume=f"{root}/base/checkpoints/step-00000004")
    return {"root": root, "ranks": dp2_tp2, "tp4": tp4, "single": RW.losses(f"{root}/single")}


def test_resume_under_the_same_layout_is_bit_exact_with_dropout_and_clipping(four_rank_runs):
    full, resumed = four_rank_runs["ranks"][0]["full"], four_rank_runs["ranks"][0]["resumed"]
    assert sorted(resumed) == [4, 5, 6, 7]
    assert [resumed[s] for s in range(4, 8)] == [full[s] for s in range(4, 8)]  # bit for bit


@pytest.mark.parametrize("layout", ["tp4", "single"])
def test_resume_under_another_layout_matches_within_1e_6(four_rank_runs, layout):
    base, resumed = four_rank_runs["ranks"][0]["base"], four_rank_runs[layout]
    assert sorted(resumed) == [4, 5, 6, 7]
    worst = max(abs(resumed[s] - base[s]) / abs(base[s]) for s in range(4, 8))
    assert worst <= 1e-6, (resumed, base)


def test_each_rank_writes_its_share_never_the_whole_model(four_rank_runs):
    """Exact tensor memory of the step-4 save on every rank: DCP's staging copies of the rank's own
    chunks plus a little planning state, far from the whole model and optimizer."""
    for result in four_rank_runs["ranks"]:
        m = result["measured"]
        assert m["own_bytes"] < 0.35 * m["whole_bytes"]  # the rank holds about a quarter
        assert m["extra_bytes"] <= m["own_bytes"] + 512 * 1024, m
        assert m["extra_bytes"] < 0.5 * m["whole_bytes"], m


def test_a_distributed_checkpoint_loads_in_one_process_in_the_logical_layout(four_rank_runs):
    from dchag.model import build_model

    weights = read_logical_weights(f"{four_rank_runs['root']}/base/checkpoints/step-00000008")
    model = build_model(RW.resume_config())
    model.load_state_dict(weights, strict=True)


def test_resume_on_one_process_is_bit_exact_and_the_metrics_read_as_one_run(tmp_path):
    cfg = RW.resume_config("model.drop_rate=0.1", "train.task=mae", "data.kind=synthetic-hyperspectral")
    train(cfg, tmp_path / "full", progress=False)
    # an interrupted attempt: trained to step 8, but its newest checkpoint is step 4
    train(cfg, tmp_path / "cut", progress=False)
    ckpt_dir = tmp_path / "cut/checkpoints"
    for path in ckpt_dir.iterdir():
        if path.name != "step-00000004":
            os.rename(path, ckpt_dir / f".partial-{path.name}")  # as if killed before the commit
    summary = train(cfg, tmp_path / "cut", progress=False, resume="auto")
    assert summary["resumed_from_step"] == 4
    full = read_metrics(tmp_path / "full/metrics.jsonl")
    cut = read_metrics(tmp_path / "cut/metrics.jsonl")
    assert [r["step"] for r in cut] == list(range(8))  # each step once: the redone steps replaced
    assert [r["loss"] for r in cut] == [r["loss"] for r in full]
    a = read_logical_weights(complete_checkpoints(tmp_path / "full")[-1])
    b = read_logical_weights(complete_checkpoints(tmp_path / "cut")[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(p.name.startswith(".partial-") for p in ckpt_dir.iterdir())  # the next save removed them


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    summary = train(RW.resume_config("train.steps=2"), tmp_path, progress=False, resume="auto")
    assert "resumed_from_step" not in summary and summary["steps"] == 2


def test_resumed_batches_neither_repeat_nor_skip_a_sample(tmp_path):
    """Steps [k, n) through the worker pipeline are exactly the uninterrupted run's steps [k, n): each
    sample of an epoch is seen once over the epoch, whichever step the run resumed at."""
    cfg = RW.resume_config("data.num_samples=24", "data.workers=2")
    source = build_source(cfg)
    whole = [b["index"].tolist() for b in step_batches(source, cfg.data, 4, 0, 1, 0, 12)]
    resumed = [b["index"].tolist() for b in step_batches(source, cfg.data, 4, 0, 1, 5, 12)]
    assert resumed == whole[5:]
    first_epoch = [i for batch in whole[:6] for i in batch]
    assert sorted(first_epoch) == list(range(24))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    train(RW.resume_config("train.checkpoint_every=2", "train.keep_checkpoints=2"), tmp_path, progress=False)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000006", "step-00000008"]


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    """A full disk during the step-8 save: one-line error, the step-4 checkpoint untouched and loadable,
    no partial folder left behind."""
    from torch.distributed.checkpoint import FileSystemWriter

    original = FileSystemWriter.write_data
    calls = {"n": 0}

    def write_data(self, plan, planner):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", write_data)
    with pytest.raises(CheckpointError, match=r"No space left on device.*step-00000004' is intact"):
        train(RW.resume_config(), tmp_path, progress=False)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-00000004"]
    assert os.listdir(tmp_path / "checkpoints") == ["step-00000004"]
    assert read_logical_weights(tmp_path / "checkpoints/step-00000004")
    assert json.loads((tmp_path / "checkpoints/step-00000004/train_state.json").read_text())["step"] == 4


def test_the_lr_schedule_reaches_min_lr_at_the_last_step():
    from dchag.train.optim import lr_at

    t = RW.resume_config("train.steps=10", "train.warmup_steps=3", "train.lr=1e-3", "train.min_lr=1e-5").train
    assert lr_at(9, t) == pytest.approx(1e-5, rel=1e-12)
    assert lr_at(2, t) == pytest.approx(1e-3)
    assert lr_at(3, t) == pytest.approx(1e-3)  # cosine starts at lr after warm-up
    assert all(lr_at(s, t) > lr_at(s + 1, t) for s in range(3, 9))
