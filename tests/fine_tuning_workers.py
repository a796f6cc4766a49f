"""Code that runs inside the spawned ranks of tests/test_fine_tuning.py (importable by the children):
rollout-training parity and fine-tuning (`train.init_from`) under tensor parallelism, in one launch."""

from __future__ import annotations

import json
from pathlib import Path

import dist_workers as W
import torch

from dchag.configure import load_config
from dchag.parallel import ParallelDims, build_mesh
from dchag.parallel.construct import build_parallel_model
from dchag.parallel.state import logical_state_dict
from dchag.train.init_from import init_from
from dchag.train.loop import train

BASE = W.SMALL_MODEL + ["train.batch_size=4", "data.workers=0", "model.hierarchy.preset=dchag-C"]
# pretrained: MAE on 6 channels in 3 level-1 groups; fine-tuned: forecasts on those plus 2 more, in 4 groups
PRETRAIN = BASE + ["data.channels=6", "model.hierarchy.groups=3", "train.task=mae", "train.steps=3"]
FINE_TUNE = BASE + ["data.channels=8", "model.hierarchy.groups=4", "train.task=forecast", "train.steps=2"]

ROLLOUT = ["model.hierarchy.preset=dchag-C", *W.SPLITS["uneven"], "train.rollout_steps=2"]
ROLLOUT_CASES = {
    "rollout/tp2": ([*ROLLOUT, "parallel.tp=2"], "none"),
    "rollout/tp2/residual": ([*ROLLOUT, "parallel.tp=2", "model.residual_forecast=true"], "none"),
    "rollout/tp2/checkpointing+dropout": (
        [*ROLLOUT, "parallel.tp=2", "train.rollout_checkpointing=true", "model.drop_rate=0.2"],
        "none",
    ),
    "fault/rollout/tp2/data-fed": ([*ROLLOUT, "parallel.tp=2"], "rollout-data-fed"),
    "fault/rollout/tp2/channel-map": (
        [*ROLLOUT, "parallel.tp=2", "model.residual_forecast=true"],
        "rollout-channel-map",
    ),
}


def fine_tune_config(pretrained: str | Path, *overrides: str):
    return load_config(None, FINE_TUNE + [f"train.init_from={pretrained}", *overrides])


def two_rank_suite(root: str) -> dict:
    """Rollout parity at tp=2 (with two deliberate rollout bugs), the logical weights `init_from` gives a
    tp=2 model, and a tp=2 fine-tuning run from the MAE run with two added channels."""
    parity = W.parity_matrix({}, ROLLOUT_CASES)
    cfg = fine_tune_config(f"{root}/mae", "parallel.tp=2")
    plan = build_parallel_model(cfg, build_mesh(ParallelDims.from_config(cfg.parallel)), torch.device("cpu"))
    init_from(cfg, plan.model, plan, cfg.train.init_from)
    weights = logical_state_dict(plan)
    tuned = fine_tune_config(f"{root}/mae", "parallel.tp=2", "train.rollout_steps=2")
    summary = train(tuned, f"{root}/tp2", progress=False)
    report = json.loads(Path(root, "tp2", "init_from.json").read_text())
    return {"parity": parity, "weights": weights, "summary": summary, "report": report}
