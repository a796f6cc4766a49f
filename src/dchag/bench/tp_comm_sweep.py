"""The `tp-comm-cpu` sweep: what tensor parallelism communicates per training step and per ViT block.

For each case (task x hierarchy x mode) and TP size it launches that many gloo ranks, runs one warm-up
step and then one measured training step (forward, loss, backward, gradient finishing, gradient norm)
under `CommBytesMode`, and records the collectives on the TP group: count and bytes per pass and op,
ring traffic per rank, and the same for one ViT block's forward + backward on its own. Counts and sizes
are exact and machine-independent, so this sweep is the reference for "how much does TP move".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dchag.bench.comm import CommBytesMode, summarize
from dchag.bench.sizes import model_overrides
from dchag.configure import load_config

# name -> overrides on top of the size
CASES = {
    "forecast dchag-C": ["train.task=forecast", "data.kind=synthetic-weather", "model.hierarchy.preset=dchag-C"],
    "mae dchag-L": ["train.task=mae", "data.kind=synthetic-hyperspectral", "model.hierarchy.preset=dchag-L"],
    "forecast replicated": [
        "train.task=forecast",
        "data.kind=synthetic-weather",
        "model.hierarchy.preset=flat",
        "parallel.mode=replicated",
    ],
}


@dataclass
class TPCommSize:
    """Problem size of the `tp-comm-cpu` sweep (override with `dchag bench --set key=value`)."""

    channels: int = 64
    embed_dim: int = 128
    heads: int = 8
    img_size: tuple[int, int] = (32, 64)
    patch: int = 4
    depth: int = 2
    batch: int = 2
    tp: tuple[int, ...] = (2, 4)


def case_config(case: str, size: TPCommSize, tp: int):
    return load_config(
        None,
        [
            *model_overrides(size, size.depth),
            f"model.hierarchy.groups={tp}",
            f"data.channels={size.channels}",
            f"data.num_samples={4 * size.batch}",
            f"train.batch_size={size.batch}",
            f"parallel.tp={tp}",
            *CASES[case],
        ],
    )


def one_training_step(plan, cfg, source, step: int) -> None:
    """What the training loop does in one step (without the optimizer update)."""
    from dchag.data import batch_indices
    from dchag.tasks import mask_noise_for_step
    from dchag.train.loop import Layout, train_step

    batch = source.batch(batch_indices(source.num_samples, cfg.train.batch_size, step, 0))
    mae = cfg.train.task == "mae"
    noise = mask_noise_for_step(cfg, step, cfg.train.batch_size, plan.model.num_patches) if mae else None
    lat = None if mae else source.lat_weights()
    train_step(Layout(plan.model, plan), None, batch, cfg, step, lat, noise, source.channels)


def measure_rank(size: TPCommSize, tp: int) -> list[dict]:
    """Runs on every rank of a `tp`-rank group: one record per case (every rank sees the same counts)."""
    from dchag.data import build_source
    from dchag.model import build_model
    from dchag.parallel import ParallelDims, build_mesh, parallelize

    records = []
    for case in CASES:
        cfg = case_config(case, size, tp)
        torch.manual_seed(0)
        plan = parallelize(build_model(cfg), cfg, build_mesh(ParallelDims.from_config(cfg.parallel)))
        source = build_source(cfg, channels=plan.input_channels)
        group = str(plan.tp_group.group_name)
        one_training_step(plan, cfg, source, 0)  # warm-up: lazy initialisation stays out of the count
        with CommBytesMode() as mode:
            one_training_step(plan, cfg, source, 1)
        step = summarize(mode.records, group)
        block = plan.model.blocks[0]
        x = torch.randn(size.batch, plan.model.num_patches, size.embed_dim, requires_grad=True)
        with CommBytesMode() as block_mode:
            block(x).square().sum().backward()
        per_block = summarize(block_mode.records, group)
        records.append(
            {
                "case": case,
                "tp": tp,
                "channels": size.channels,
                "embed_dim": size.embed_dim,
                "rank": plan.tp_rank,
                "step_collectives": step["count"],
                "step_bytes": step["bytes"],
                "step_ring_bytes_per_rank": step["ring_bytes"],
                "step_by_op": step["by_op"],
                "block_collectives": per_block["count"],
                "block_bytes": per_block["bytes"],
                "block_by_op": per_block["by_op"],
            }
        )
    return records


def tp_comm_cpu(size: TPCommSize) -> list[dict]:
    from dchag.bench.fused_sweep import log
    from dchag.parallel.launch import spawn

    out = []
    for tp in size.tp:
        log(f"tp-comm-cpu: tp={tp}")
        out += spawn(measure_rank, tp, size, tp)[0]  # identical on every rank: keep rank 0's
    return out


def _mb(n: float) -> str:
    return f"{n / 1e6:,.3f} MB"


def tp_comm_table(records: list[dict]) -> str:
    lines = [
        "| case | tp | collectives / step | bytes / step | ring bytes / rank / step | collectives / block (fwd+bwd) |"
        " block ops |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        ops = ", ".join(f"{k} x{v['count']}" for k, v in r["block_by_op"].items())
        lines.append(
            f"| {r['case']} | {r['tp']} | {r['step_collectives']} | {_mb(r['step_bytes'])} | "
            f"{_mb(r['step_ring_bytes_per_rank'])} | {r['block_collectives']} | {ops} |"
        )
    return "\n".join(lines)
