"""Context-parallel checks that run inside spawned gloo ranks (importable by the children).

Strips are uneven throughout: the test image has 20 pixel rows at patch 4, so 5 patch rows, which two CP
ranks split 3 + 2; channel groups are uneven too (11 channels in 5 groups).
"""

from __future__ import annotations

import dist_workers as W
import reliability_workers as RW
import torch
import torch.distributed as dist

from dchag.checks.parity import reference_and_parallel, run_parity
from dchag.parallel.collectives import gather_to_cp

UNEVEN_STRIPS = "model.img_size=[20, 32]"  # 5 patch rows: strips of 3 and 2 rows at cp 2
TASKS = {"forecast": "train.task=forecast", "mae": "train.task=mae"}
FOUR_RANK_LAYOUTS = {"cp2xtp2": ["parallel.cp=2", "parallel.tp=2"], "cp2xdp2": ["parallel.cp=2", "parallel.dp_shard=2"]}


def matrix(layouts: dict[str, list[str]], kinds: tuple[str, ...] = ("L", "C")) -> dict[str, tuple]:
    """{name: (overrides, fault)}: both tasks on every layout, uneven groups and strips; the level-1 kind
    alternates (layout i, task j: kinds[(i + j) % len(kinds)]), so each layout sees both kinds."""
    return {
        f"{lname}/{task}/{kinds[(i + j) % len(kinds)]}": (
            [W.KINDS[kinds[(i + j) % len(kinds)]], *W.SPLITS["uneven"], UNEVEN_STRIPS, task_set, *layout],
            "none",
        )
        for i, (lname, layout) in enumerate(layouts.items())
        for j, (task, task_set) in enumerate(TASKS.items())
    }


def run_cases(cases: dict[str, tuple]) -> dict[str, tuple]:
    """{name: (worst relative difference, worst tensors)} of `run_parity` for every case."""
    out = {}
    for name, (overrides, fault) in cases.items():
        report = run_parity(W.config(*overrides), fault)
        out[name] = (report.worst, report.worst_grads(3))
    return out


def four_rank_cases() -> dict[str, tuple]:
    lin, cross = W.KINDS["L"], W.KINDS["C"]
    cp_tp, cp_dp = FOUR_RANK_LAYOUTS["cp2xtp2"], FOUR_RANK_LAYOUTS["cp2xdp2"]
    base = [*W.SPLITS["uneven"], UNEVEN_STRIPS]
    mae, checkpointing, dropout = "train.task=mae", "parallel.activation_checkpointing=true", "model.drop_rate=0.3"
    return {
        **matrix(FOUR_RANK_LAYOUTS),
        "settings/even-strips": ([lin, *W.SPLITS["uneven"], *cp_tp], "none"),
        "settings/materializing": ([cross, *base, "model.fused_front_end=false", *cp_tp], "none"),
        "settings/masked-loss": ([cross, *base, mae, "train.mae_loss_on=masked", *cp_dp], "none"),
        "settings/rollout": ([cross, *base, "model.residual_forecast=true", "train.rollout_steps=2", *cp_dp], "none"),
        "settings/checkpointing/mae": ([cross, *base, mae, checkpointing, *cp_dp], "none"),
        "settings/dropout": ([cross, *base, dropout, checkpointing, *cp_tp], "none"),
        "bf16/forecast": ([cross, *base, "train.bf16=true", *cp_tp], "none"),
        "bf16/mae": ([lin, *base, mae, "train.bf16=true", *cp_dp], "none"),
        "fault/cp-grad-sum": ([cross, *base, mae, *cp_tp], "cp-grad-sum"),
        "fault/cp-kv-own-slice": ([lin, *base, *cp_tp], "cp-kv-own-slice"),
        "fault/cp-dropout-streams": ([cross, *base, dropout, *cp_tp], "cp-dropout-streams"),
    }


def exchange_both_directions() -> dict:
    """`gather_to_cp` on the whole world: forward concatenates every rank's part in rank order, backward
    sums every rank's gradient of this rank's part (rank r weighs the gathered tensor by r + 1)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = gather_to_cp(x, dist.group.WORLD, dim=1)  # [2, 3 * world]
    weight = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
    (gathered * weight * (rank + 1)).sum().backward()
    expected = torch.cat([torch.full((2, 3), float(r + 1)) for r in range(world)], 1)
    summed = weight[:, rank * 3 : (rank + 1) * 3] * sum(r + 1 for r in range(world))
    return {"forward": torch.equal(gathered.detach(), expected), "backward": torch.equal(x.grad, summed)}


def block_communication() -> dict:
    """Collectives of one ViT block's forward and backward at cp 2 x tp 2, on the CP and the TP group:
    {group: {pass/op: {count, bytes}}}, and the bytes of the whole sequence's keys and values."""
    from dchag.bench.comm import CommBytesMode, summarize

    cfg = W.config(W.KINDS["L"], *W.SPLITS["uneven"], UNEVEN_STRIPS, *FOUR_RANK_LAYOUTS["cp2xtp2"])
    _, plan = reference_and_parallel(cfg)
    tokens = plan.strip.token_counts[plan.strip.rank]
    x = torch.randn(2, tokens, cfg.model.embed_dim, requires_grad=True)
    with CommBytesMode() as mode:
        plan.model.blocks[0](x).square().sum().backward()
    padded = max(plan.strip.token_counts) * 2  # the largest strip's tokens, from both CP ranks
    return {
        "all": summarize(mode.records)["by_op"],
        "cp": summarize(mode.records, str(plan.mesh["cp"].get_group().group_name))["by_op"],
        "kv_bytes": 2 * 2 * padded * (cfg.model.embed_dim // plan.tp) * 4,  # K and V [B, H/tp, L, e] fp32
    }


def four_rank_suite() -> dict:
    return {
        "parity": run_cases(four_rank_cases()),
        "exchange": exchange_both_directions(),
        "block_comm": block_communication(),
    }


def resume_config(*overrides: str):
    """The resume tests' small forecasting run (8 steps, checkpoints every 4) on uneven strips, with a
    validation loss every 4 steps."""
    return RW.resume_config(UNEVEN_STRIPS, "train.eval_every=4", "train.eval_samples=8", *overrides)


def two_rank_suite(root: str) -> dict:
    """cp = 2 alone: parity on both tasks, training runs (fresh, and resumed from the one-process run's
    step-4 checkpoint) and an MAE training run."""
    parity = run_cases(matrix({"cp2": ["parallel.cp=2"]}))  # forecast with D-CHAG-L, MAE with D-CHAG-C
    from dchag.train.loop import train

    cp2 = resume_config("parallel.cp=2")
    train(cp2, f"{root}/cp2", progress=False)
    train(cp2, f"{root}/cp2-from-1", progress=False, resume=f"{root}/one/checkpoints/step-00000004")
    train(resume_config("parallel.cp=2", "train.task=mae"), f"{root}/cp2-mae", progress=False)
    return {"parity": parity, "rank": dist.get_rank()}
