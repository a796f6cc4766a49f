"""The distributed command line: torchrun training equals single-device training; check-parity works."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dchag.configure import load_config
from dchag.model import build_model
from dchag.train.checkpoint import complete_checkpoints, read_logical_weights
from dchag.train.loop import train
from dchag.train.metrics import read_metrics

ROOT = Path(__file__).parents[1]
TINY_WEATHER = str(ROOT / "configs/tiny-weather.yaml")


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_four_ranks_match_the_single_device_loss_curve(tmp_path):
    """tp=2 x dp_shard=2 under torchrun, 20 steps with gradient clipping engaged in every step: the same
    losses as one process, and a checkpoint in the single-device layout."""
    steps = ["train.steps=20", "train.log_every=1", "train.grad_clip=2e-4", "parallel.check_replicas_every=5"]
    steps += ["train.log_grad_norms=true"]
    proc = run(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "4",
            "-m",
            "dchag",
            "train",
            "--config",
            TINY_WEATHER,
            "--out",
            str(tmp_path / "dist"),
            "--no-progress",
            "--set",
            *steps,
            "parallel.tp=2",
            "parallel.dp_shard=2",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 4 rank(s)" in proc.stdout
    assert "terminate called" not in proc.stderr and "Abort" not in proc.stderr  # a clean leave on every rank
    cfg = load_config(TINY_WEATHER, steps)
    train(cfg, tmp_path / "single", progress=False)
    dist_curve = [r["loss"] for r in read_metrics(tmp_path / "dist/metrics.jsonl")]
    single_curve = [r["loss"] for r in read_metrics(tmp_path / "single/metrics.jsonl")]
    assert len(dist_curve) == len(single_curve) == 20
    worst = max(abs(a - b) / abs(b) for a, b in zip(dist_curve, single_curve))
    assert worst <= 1e-4, (dist_curve, single_curve)
    # the clipping norm too (it counts TP-split, FSDP-split and replicated gradients each once)
    dist_norms = [r["grad_norm"] for r in read_metrics(tmp_path / "dist/metrics.jsonl")]
    single_norms = [r["grad_norm"] for r in read_metrics(tmp_path / "single/metrics.jsonl")]
    assert max(abs(a - b) / b for a, b in zip(dist_norms, single_norms)) <= 1e-4
    assert min(single_norms) > 2e-4  # the clipped (scaled) path ran in every step
    # and the norm per part (train.log_grad_norms), before clipping
    dist_parts = [r["grad_norms"] for r in read_metrics(tmp_path / "dist/metrics.jsonl")]
    single_parts = [r["grad_norms"] for r in read_metrics(tmp_path / "single/metrics.jsonl")]
    assert list(dist_parts[0]) == list(single_parts[0]) == ["tokenizer", "level1", "level2", "blocks", "head", "other"]
    worst_part = max(abs(a[p] - b[p]) / b[p] for a, b in zip(dist_parts, single_parts) for p in b)
    assert worst_part <= 1e-4, (dist_parts, single_parts)

    dist_weights = read_logical_weights(complete_checkpoints(tmp_path / "dist")[-1])
    model = build_model(cfg)
    model.load_state_dict(dist_weights, strict=True)  # logical layout: loads into one process
    single = read_logical_weights(complete_checkpoints(tmp_path / "single")[-1])
    for name, value in single.items():
        torch.testing.assert_close(dist_weights[name], value, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-weather", "tiny-hyperspectral"])
def test_check_parity_passes_for_the_tiny_presets(preset):
    proc = run(["-m", "dchag", "check-parity", "--nproc", "4", "--config", str(ROOT / f"configs/{preset}.yaml")])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "PASS" in proc.stdout and "gradients" in proc.stdout


def test_check_parity_fails_loudly_on_a_wrong_gradient_scale():
    proc = run(
        [
            "-m",
            "dchag",
            "check-parity",
            "--nproc",
            "4",
            "--config",
            TINY_WEATHER,
            "--set",
            "parallel.tp=2",
            "parallel.dp_shard=2",
            "--fault",
            "grad-scale",
        ]
    )
    assert proc.returncode == 1
    assert "FAIL" in proc.stdout and "front_end.tokenizer" in proc.stdout


def test_a_layout_that_does_not_match_the_process_count_is_refused():
    proc = run(["-m", "dchag", "check-parity", "--nproc", "2", "--config", TINY_WEATHER, "--set", "parallel.tp=4"])
    assert proc.returncode != 0
    assert proc.returncode == 2 and "--nproc 2" in proc.stderr and "Traceback" not in proc.stderr
