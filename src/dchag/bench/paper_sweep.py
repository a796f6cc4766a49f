"""The `paper-cpu` sweep: the whole training step per rank, for the paper's comparisons (Figs. 7-9, 13).

For each TP size it launches that many ranks (gloo on CPU, NCCL when the GPUs are there) and, on every
rank, for every channel count and variant, trains the MAE model (the paper's hyperspectral task: the
loss covers every channel) for a few steps: one warm-up step (AdamW's state exists afterwards), one
measured step (exact peak tensor memory of forward, loss, backward, gradient finishing, clipping and the
optimizer step, and inside it the front end's own peak; FLOPs; bytes moved by collectives), then timed
steps (median). Variants: the TP-only baseline (`replicated`: every rank tokenizes and aggregates all
channels, flat hierarchy), the paper's `naive` ablation (raw channel tokens gathered), D-CHAG-L and
D-CHAG-C with level-1 groups = tp x `groups_per_rank`, each with the materializing and the fused front
end (`naive` keeps the materializing one by definition), and with each `tokenizer` (model.tokenizer:
per_channel, wavelength, hypernetwork; `--set "tokenizer=[per_channel, wavelength]"` puts them side by
side). The table reports the worst rank.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from dchag.bench.comm import CommBytesMode, summarize
from dchag.bench.measure import count_flops, memory_tracker, module_peak, tensor_bytes, tracker_peak
from dchag.bench.sizes import model_overrides
from dchag.bench.variants import VARIANTS, variant_overrides, variant_pairs


@dataclass
class PaperSize:
    """What `paper-cpu` runs (override with `dchag bench --set key=value`; `quick=true`: a test-sized
    subset)."""

    channels: tuple[int, ...] = (64, 128, 256, 512)
    tp: tuple[int, ...] = (1, 2, 4)
    variants: tuple[str, ...] = tuple(VARIANTS)
    fused: tuple[bool, ...] = (False, True)
    tokenizer: tuple[str, ...] = ("per_channel",)  # model.tokenizer values to measure
    img_size: tuple[int, int] = (64, 128)
    patch: int = 4
    embed_dim: int = 256
    heads: int = 8
    depth: int = 4
    batch: int = 2
    groups_per_rank: int = 1
    timed_steps: int = 2
    bf16: bool = False  # bf16 autocast (the paper's precision; for GPU runs)
    quick: bool = False
    simulate_tp: int = 0  # > 0: run one rank of this TP size in this process (collectives faked)
    simulate_rank: int = 0  # which rank to simulate

    def resolved(self) -> "PaperSize":
        import dataclasses

        size = self
        if self.quick:
            size = dataclasses.replace(
                size, channels=(16,), tp=(2,), img_size=(16, 32), embed_dim=32, heads=4, depth=1, timed_steps=1
            )
        return dataclasses.replace(size, tp=(size.simulate_tp,)) if size.simulate_tp else size


def paper_config(size: PaperSize, variant: str, fused: bool, channels: int, tp: int, tokenizer: str = "per_channel"):
    from dchag.configure import load_config

    return load_config(
        None,
        [
            *model_overrides(size, size.depth),
            "model.decoder_dim=64",
            "model.decoder_depth=1",
            "model.decoder_heads=4",
            "data.kind=synthetic-hyperspectral",
            f"data.channels={channels}",
            f"data.num_samples={8 * size.batch}",
            "data.workers=0",
            f"train.batch_size={size.batch}",
            "train.task=mae",
            f"train.bf16={str(size.bf16).lower()}",
            f"model.tokenizer={tokenizer}",
            *variant_overrides(variant, fused, tp, size.groups_per_rank),
        ],
    )


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    import platform

    return f"cpu ({platform.machine()}, gloo)"


def measure_rank(size: PaperSize, tp: int) -> list[dict]:
    """Runs on every rank of a `tp`-rank group: one record per (channels, variant, fused, tokenizer) for
    this rank."""
    records = []
    for channels in size.channels:
        for tokenizer in size.tokenizer:
            for variant, fused in variant_pairs(size.variants, size.fused):
                records.append(measure_one(size, tp, variant, fused, channels, tokenizer))
    return records


def measure_one(size: PaperSize, tp: int, variant: str, fused: bool, channels: int, tokenizer: str) -> dict:
    """This rank's record for one configuration (everything it built is freed on return)."""
    import torch.distributed as dist

    from dchag.data import batch_indices, build_source
    from dchag.parallel import ParallelDims, build_mesh
    from dchag.parallel.construct import build_parallel_model
    from dchag.tasks import mask_noise_for_step
    from dchag.train.loop import Layout, train_step
    from dchag.train.optim import build_optimizer

    cfg = paper_config(size, variant, fused, channels, tp, tokenizer)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    # the rank builds only its shards: at paper scale the whole model need not fit this device
    plan = build_parallel_model(cfg, build_mesh(ParallelDims.from_config(cfg.parallel), device.type), device)
    layout = Layout(plan.model, plan)
    source = build_source(cfg, channels=plan.input_channels)
    optimizer = build_optimizer(plan.model, cfg.train)

    def step(k: int) -> None:
        batch = {
            key: v.to(device)
            for key, v in source.batch(batch_indices(source.num_samples, size.batch, k, 0)).items()
            if key not in ("index", "worker")
        }
        noise = mask_noise_for_step(cfg, k, size.batch, plan.model.num_patches).to(device)
        train_step(layout, optimizer, batch, cfg, k, None, noise, source.channels)

    step(0)  # warm-up: optimizer state and lazy buffers exist before measuring
    tracker = memory_tracker()
    tracker.track_external(plan.model, optimizer)
    with CommBytesMode() as comm:
        with tracker:
            flops = count_flops(lambda: step(1))
    times = []
    for k in range(2, 2 + size.timed_steps):
        if tp > 1:
            dist.barrier(group=plan.tp_group)
        start = time.perf_counter()
        step(k)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in plan.model.parameters()]
    return {
        "sweep": "paper-cpu",
        "variant": variant,
        "fused": fused,
        "tokenizer": tokenizer,
        "channels": channels,
        "tp": tp,
        "dp": 1,
        "rank": plan.tp_rank,
        "peak_mem_bytes": tracker_peak(tracker),
        "front_end_peak_mem_bytes": module_peak(tracker, plan.model.front_end),
        "param_bytes": tensor_bytes(local),
        "flops_per_rank": flops,
        "step_time_s": step_time,
        "samples_per_s": size.batch / step_time,
        "comm_bytes": summarize(comm.records, str(plan.tp_group.group_name))["bytes"],
        "device": _device_name(),
        "embed_dim": size.embed_dim,
        "depth": size.depth,
        "img_size": list(size.img_size),
        "batch": size.batch,
        "bf16": size.bf16,
    }


def simulate_rank(size: PaperSize) -> list[dict]:
    """Rank `simulate_rank` of a `simulate_tp`-way layout, alone in this process: torch's fake process
    group stands in for the peers (every collective returns tensors of the right shapes and moves
    nothing), so the rank builds exactly its shards and runs exactly its step, and its memory and time
    are measured on one device without the other ranks. The values the fake collectives return are
    not the real ones: the loss is meaningless, the memory and FLOPs are the rank's."""
    from dchag.bench.fake_group import fake_process_group

    tp, rank = size.simulate_tp, size.simulate_rank
    with fake_process_group(tp, rank):
        records = measure_rank(size, tp)
    for r in records:
        r["device"] = f"simulated rank {rank} of {tp} on {r['device']}"
        r["simulated"] = True
    return records


def paper_cpu(size: PaperSize) -> list[dict]:
    from dchag.bench.fused_sweep import log
    from dchag.config import TOKENIZERS, ConfigError
    from dchag.parallel.launch import spawn

    size = size.resolved()
    unknown = [t for t in size.tokenizer if t not in TOKENIZERS]
    if unknown:
        raise ConfigError(f"bench setting tokenizer={unknown[0]!r} is unknown; use one or more of {TOKENIZERS}")
    if size.simulate_tp and not 0 <= size.simulate_rank < size.simulate_tp:
        raise ConfigError(f"simulate_rank={size.simulate_rank} must be in [0, simulate_tp={size.simulate_tp})")
    if size.simulate_tp:
        log(f"paper-cpu: simulating rank {size.simulate_rank} of tp={size.simulate_tp}")
        return simulate_rank(size)
    records = []
    for tp in size.tp:
        log(f"paper-cpu: tp={tp}: {len(size.channels)} channel counts x {len(size.variants)} variants")
        for rank_records in spawn(measure_rank, tp, size, tp):
            records += rank_records
    return records


def worst_ranks(records: list[dict]) -> dict[tuple, dict]:
    """(channels, tp, variant, fused, tokenizer) -> the record of the rank with the largest whole-step
    peak, with the slowest rank's step time."""
    worst: dict[tuple, dict] = {}
    for r in records:
        key = (r["channels"], r["tp"], r["variant"], r["fused"], r.get("tokenizer", "per_channel"))
        w = worst.setdefault(key, dict(r))
        if r["peak_mem_bytes"] > w["peak_mem_bytes"]:
            w.update(peak_mem_bytes=r["peak_mem_bytes"], front_end_peak_mem_bytes=r["front_end_peak_mem_bytes"])
        if r["step_time_s"] > w["step_time_s"]:
            w.update(step_time_s=r["step_time_s"], samples_per_s=r["samples_per_s"])
    return worst


def paper_table(records: list[dict]) -> str:
    """Per (channels, tp): each variant's worst-rank whole-step peak and throughput, as ratios to the
    paper's baseline (replicated, materializing, per-channel tokenizer) and to our strongest (replicated,
    fused, per-channel); with several tokenizers, each variant's rows follow each other."""
    worst = worst_ranks(records)
    lines = [
        "| channels | tp | variant | fused | tokenizer | whole-step peak / rank | live while front end runs | "
        "memory vs replicated | vs replicated fused | samples/s | x replicated | x replicated fused | "
        "TFLOP / rank | comm MB / rank |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tokenizers = list(dict.fromkeys(k[4] for k in worst))
    baseline = "per_channel" if "per_channel" in tokenizers else tokenizers[0] if tokenizers else None
    for key in sorted(worst, key=lambda k: (k[0], k[1], list(VARIANTS).index(k[2]), k[3], tokenizers.index(k[4]))):
        channels, tp, variant, fused, tokenizer = key
        r = worst[key]
        base = worst.get((channels, tp, "replicated", False, baseline))
        strong = worst.get((channels, tp, "replicated", True, baseline))

        def ratio(ref, field, inverse=False):
            if ref is None:
                return "-"
            value = r[field] / ref[field] if not inverse else ref[field] / r[field]
            return f"{value:.2f}"

        mem_base = f"{100 * (r['peak_mem_bytes'] / base['peak_mem_bytes'] - 1):+.1f}%" if base else "-"
        mem_strong = f"{100 * (r['peak_mem_bytes'] / strong['peak_mem_bytes'] - 1):+.1f}%" if strong else "-"
        lines.append(
            f"| {channels} | {tp} | {variant} | {'yes' if fused else 'no'} | {tokenizer} | "
            f"{r['peak_mem_bytes'] / 2**20:,.1f} MiB | "
            f"{r['front_end_peak_mem_bytes'] / 2**20:,.1f} MiB | {mem_base} | {mem_strong} | "
            f"{r['samples_per_s']:.2f} | {ratio(base, 'samples_per_s')} | {ratio(strong, 'samples_per_s')} | "
            f"{r['flops_per_rank'] / 1e12:.3f} | {r['comm_bytes'] / 1e6:,.1f} |"
        )
    return "\n".join(lines)
