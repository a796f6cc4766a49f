"""Code that runs inside the spawned ranks of tests/test_fine_tuning.py (importable by the children):
rollout-training parity and fine-tuning (`train.init_from`) under tensor parallelism, in one launch; and
the FSDP2 x TP fine-tuning case of tests/test_tp_training_settings.py's 4-rank launch."""

from __future__ import annotations

import json
from pathlib import Path

import dist_workers as W
import torch
from safetensors.torch import save_file

from dchag.configure import load_config
from dchag.model import build_model
from dchag.parallel import ParallelDims, build_mesh
from dchag.parallel.construct import build_parallel_model
from dchag.parallel.state import logical_state_dict
from dchag.train.checkpoint import complete_checkpoints, read_logical_weights
from dchag.train.export import CONFIG_KEY, resolved_config_dict
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


# a linear level-1 (D-CHAG-L) pretrained on 6 channels in 3 groups of 2; fine-tuned with a channel added to
# the first group (sizes 3, 2, 2): the weight [G, k, n_max] widens, and groups 2 and 3 reduce the same channels
PRETRAIN_LINEAR = BASE + ["data.channels=6", "model.hierarchy.preset=dchag-L", "model.hierarchy.groups=3"]


def grown_first_group() -> list[str]:
    """Overrides of a fine-tuning run whose first linear group gains the channel z_200."""
    pre = load_config(None, PRETRAIN_LINEAR).channels
    names = [*pre[:2], "z_200", *pre[2:]]
    return ["model.hierarchy.preset=dchag-L", "model.hierarchy.groups=3", f"data.channels=[{', '.join(names)}]"]


def fine_tune_config(pretrained: str | Path, *overrides: str):
    return load_config(None, FINE_TUNE + [f"train.init_from={pretrained}", *overrides])


def perturbed_export(overrides: list[str], path: Path) -> Path:
    """A `dchag export`-style .safetensors file of the model `overrides` describe, its initial weights moved
    by seeded noise (a pretrained model without training: no weight equals a fresh one)."""
    cfg = load_config(None, overrides)
    g = torch.Generator().manual_seed(7)
    weights = {
        k: (v + 0.1 * torch.randn(v.shape, generator=g)).contiguous() for k, v in build_model(cfg).state_dict().items()
    }
    save_file(weights, str(path), metadata={CONFIG_KEY: json.dumps(resolved_config_dict(cfg)), "step": "0"})
    return path


def fsdp_fine_tuning(root: str) -> dict:
    """dp_shard 2 x tp 2: the logical weights `init_from` gives (from a linear model whose first group
    grew), and a 2-step run with the ViT blocks frozen: its start and its last checkpoint."""
    cfg = fine_tune_config(
        f"{root}/linear.safetensors",
        *grown_first_group(),
        "parallel.tp=2",
        "parallel.dp_shard=2",
        "train.freeze=[blocks]",
    )
    plan = build_parallel_model(cfg, build_mesh(ParallelDims.from_config(cfg.parallel)), torch.device("cpu"))
    init_from(cfg, plan.model, plan, cfg.train.init_from)
    start = logical_state_dict(plan)
    train(cfg, f"{root}/fsdp", progress=False)
    return {"start": start, "after": read_logical_weights(complete_checkpoints(f"{root}/fsdp")[-1])}


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
