"""The `channel-parallel-cpu` sweep: front-end memory per TP rank for the paper's comparison points.

For each TP size it launches that many gloo ranks and measures, on every rank, the exact peak tensor
memory of the front end's forward + backward (tokenizer + hierarchy + gather, with each rank's own input
channels), the front-end parameters the rank holds, and the elements its gather receives. Variants:
the TP-only baseline (`replicated`, flat hierarchy), the paper's naive ablation (`naive`: gather raw
channel tokens), D-CHAG-L and D-CHAG-C with level-1 groups = tp (the paper's setting), each with the
materializing front end, plus the fused front end for D-CHAG and the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dchag.bench.fused_sweep import log, variant_config
from dchag.bench.measure import peak_tensor_memory, tensor_bytes
from dchag.model import build_model

# name -> (hierarchy preset, parallel mode, fused front end)
VARIANTS = {
    "baseline": ("flat", "replicated", False),
    "naive": ("flat", "naive", False),
    "dchag-L": ("dchag-L", "dchag", False),
    "dchag-C": ("dchag-C", "dchag", False),
    "baseline fused": ("flat", "replicated", True),
    "dchag-L fused": ("dchag-L", "dchag", True),
    "dchag-C fused": ("dchag-C", "dchag", True),
}


@dataclass
class ChannelParallelSize:
    """Problem size of the `channel-parallel-cpu` sweep (override with `dchag bench --set key=value`)."""

    channels: int = 512
    embed_dim: int = 128
    heads: int = 8
    img_size: tuple[int, int] = (64, 128)
    patch: int = 4
    batch: int = 2
    groups_per_rank: int = 1  # level-1 groups = tp x this (the paper: one group per rank)
    tp: tuple[int, ...] = (1, 2, 4)


def measure_rank(size: ChannelParallelSize, tp: int) -> list[dict]:
    """Runs on every rank of a `tp`-rank group: one record per variant for this rank."""
    from dchag.parallel import ParallelDims, build_mesh, parallelize

    records = []
    h, w = size.img_size
    for name, (preset, mode, fused) in VARIANTS.items():
        extra = (f"parallel.tp={tp}", f"parallel.mode={mode}")
        cfg = variant_config(preset, size, fused, groups=tp * size.groups_per_rank, depth=1, extra=extra)
        mesh = build_mesh(ParallelDims.from_config(cfg.parallel))
        torch.manual_seed(0)
        plan = parallelize(build_model(cfg), cfg, mesh)
        front = plan.model.front_end
        c0, c1 = plan.placement.channel_ranges[plan.tp_rank]
        g = torch.Generator().manual_seed(plan.tp_rank)
        x = torch.randn(size.batch, c1 - c0, h, w, generator=g)
        cotangent = torch.randn(size.batch, plan.model.num_patches, size.embed_dim, generator=g)

        def step():
            front.zero_grad(set_to_none=True)
            (front(x) * cotangent).sum().backward()

        step()  # warm: lazily created state exists before measuring
        counts = plan.placement.gathered_counts
        records.append(
            {
                "sweep": "channel-parallel-cpu",
                "variant": name,
                "preset": preset,
                "mode": mode,
                "fused": fused,
                "tp": tp,
                "rank": plan.tp_rank,
                "channels": size.channels,
                "rank_channels": c1 - c0,
                "embed_dim": size.embed_dim,
                "img_size": list(size.img_size),
                "patch": size.patch,
                "batch": size.batch,
                "front_end_peak_mem_bytes": peak_tensor_memory(step, front, x, cotangent),
                "front_end_param_bytes": tensor_bytes(front.parameters()),
                "gathered_elements": sum(counts) * size.batch * plan.model.num_patches * size.embed_dim,
            }
        )
    return records


def channel_parallel_cpu(size: ChannelParallelSize) -> list[dict]:
    from dchag.parallel.launch import spawn

    records = []
    for tp in size.tp:
        log(f"[bench] channel-parallel: {tp} rank(s), {len(VARIANTS)} variants")
        for rank_records in spawn(measure_rank, tp, size, tp):
            records += rank_records
    return records


def channel_parallel_table(records: list[dict]) -> str:
    """Per TP size and variant: the largest per-rank front-end peak, and its ratio to the baseline."""
    worst: dict[tuple[int, str], dict] = {}
    for r in records:
        key = (r["tp"], r["variant"])
        if key not in worst or r["front_end_peak_mem_bytes"] > worst[key]["front_end_peak_mem_bytes"]:
            worst[key] = r
    lines = [
        "| tp | variant | front-end peak / rank | baseline / this | front-end params / rank | gathered elements |",
        "|---|---|---|---|---|---|",
    ]
    for (tp, name), r in sorted(worst.items(), key=lambda kv: (kv[0][0], list(VARIANTS).index(kv[0][1]))):
        base = worst.get((tp, "baseline"))
        ratio = base["front_end_peak_mem_bytes"] / r["front_end_peak_mem_bytes"] if base else float("nan")
        lines.append(
            f"| {tp} | {name} | {r['front_end_peak_mem_bytes'] / 2**20:,.1f} MiB | {ratio:.2f}x | "
            f"{r['front_end_param_bytes'] / 2**20:,.2f} MiB | {r['gathered_elements']:,} |"
        )
    return "\n".join(lines)
