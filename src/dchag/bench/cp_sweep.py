"""The `cp-cpu` sweep: what context parallelism saves per rank as the image grows.

For each context-parallel size it launches that many ranks (gloo on CPU, NCCL when the GPUs are there)
and, on every rank, for every image size, trains the forecasting model (synthetic weather, D-CHAG-L with
the fused front end, tp 1) for a few steps: one warm-up step, one measured step (exact peak tensor memory
of forward, loss, backward, gradient finishing, clipping and AdamW's step; FLOPs; buffer bytes of the
collectives on the CP group, by pass and kind: the keys and values all-gathered for attention (forward,
and again in backward where the exchange recomputes), the reduce-scatters of their gradients, FSDP2's
all-gathers and reduce-scatters where it shards over the CP ranks, the loss's all-reduce), then timed
steps (median). Each CP rank holds a strip of H / (patch x cp) patch rows; attention still covers the
whole image. The table reports the worst rank and its ratios to cp = 1 at the same image size.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from dchag.bench.comm import CommBytesMode, summarize
from dchag.bench.measure import count_flops, memory_tracker, tensor_bytes, tracker_peak
from dchag.bench.sizes import model_overrides
from dchag.bench.variants import variant_overrides


@dataclass
class CPSize:
    """What `cp-cpu` runs (override with `dchag bench --set key=value`; `quick=true`: a test-sized run)."""

    heights: tuple[int, ...] = (64, 128, 256)  # image rows; columns = 2 x rows (a global grid's aspect)
    cp: tuple[int, ...] = (1, 2, 4)
    patch: int = 4
    embed_dim: int = 256
    heads: int = 8
    depth: int = 2
    channels: int = 16
    batch: int = 1
    task: str = "forecast"  # or "mae"
    variant: str = "dchag-L"
    fused: bool = True
    timed_steps: int = 1
    quick: bool = False

    def resolved(self) -> "CPSize":
        import dataclasses

        if not self.quick:
            return self
        return dataclasses.replace(self, heights=(16,), cp=(2,), embed_dim=32, heads=4, depth=1, channels=8)


def cp_config(size: CPSize, height: int, cp: int):
    """The config of one point: `size` at an image of `height` x 2 `height` on `cp` context-parallel ranks."""
    from types import SimpleNamespace

    from dchag.configure import load_config

    shape = SimpleNamespace(img_size=(height, 2 * height), patch=size.patch, embed_dim=size.embed_dim, heads=size.heads)
    return load_config(
        None,
        [
            *model_overrides(shape, size.depth),
            "model.drop_rate=0.0",
            "model.decoder_dim=64",
            "model.decoder_depth=1",
            "model.decoder_heads=4",
            "data.kind=synthetic-weather",
            f"data.channels={size.channels}",
            f"data.num_samples={8 * size.batch}",
            "data.workers=0",
            f"train.batch_size={size.batch}",
            f"train.task={size.task}",
            *variant_overrides(size.variant, size.fused, 1),
            *([f"parallel.cp={cp}"] if cp > 1 else []),
        ],
    )


def measure_rank(size: CPSize, cp: int) -> list[dict]:
    """Runs on every rank of a `cp`-rank group: one record per image height for this rank."""
    return [measure_one(size, cp, height) for height in size.heights]


def measure_one(size: CPSize, cp: int, height: int) -> dict:
    """This rank's record for one image size (everything it built is freed on return)."""
    import torch.distributed as dist

    from dchag.bench.paper_sweep import _device_name
    from dchag.data import batch_indices, build_source
    from dchag.parallel import ParallelDims, build_mesh
    from dchag.parallel.construct import build_parallel_model
    from dchag.parallel.mesh import cp_group_name
    from dchag.tasks import mask_noise_for_step
    from dchag.train.loop import Layout, strip_of, train_step
    from dchag.train.optim import build_optimizer

    cfg = cp_config(size, height, cp)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    mesh = build_mesh(ParallelDims.from_config(cfg.parallel), device.type)
    plan = build_parallel_model(cfg, mesh, device)
    layout = Layout(plan.model, plan)
    source = strip_of(build_source(cfg, channels=plan.input_channels), cfg, plan)  # this rank's rows
    optimizer = build_optimizer(plan.model, cfg.train)
    lat_weights = source.lat_weights().to(device) if cfg.train.task == "forecast" else None
    num_patches = (height // size.patch) * (2 * height // size.patch)

    def inputs(k: int) -> tuple[dict, torch.Tensor | None]:
        """Step k's batch (this rank's rows) and MAE noise, made before the step is measured: the sweep
        measures training, not the synthetic data's generation."""
        indices = batch_indices(source.num_samples, size.batch, k, 0)
        batch = {key: v.to(device) for key, v in source.batch(indices).items() if key not in ("index", "worker")}
        noise = mask_noise_for_step(cfg, k, size.batch, num_patches).to(device) if cfg.train.task == "mae" else None
        return batch, noise

    def step(k: int, batch: dict, noise) -> None:
        train_step(layout, optimizer, batch, cfg, k, lat_weights, noise, source.channels)

    step(0, *inputs(0))  # warm-up: optimizer state and lazy buffers exist before measuring
    batch, noise = inputs(1)
    tracker = memory_tracker()
    tracker.track_external(plan.model, optimizer, *batch.values())
    with CommBytesMode() as comm:
        with tracker:
            flops = count_flops(lambda: step(1, batch, noise))
    del batch, noise
    times = []
    for k in range(2, 2 + size.timed_steps):
        batch, noise = inputs(k)
        if cp > 1:
            dist.barrier()
        start = time.perf_counter()
        step(k, batch, noise)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    group = cp_group_name(mesh)
    cp_comm = summarize(comm.records, group) if group is not None else summarize([])
    local = [p.to_local() if hasattr(p, "to_local") else p for p in plan.model.parameters()]
    return {
        "sweep": "cp-cpu",
        "cp": cp,
        "rank": dist.get_rank(),
        "height": height,
        "width": 2 * height,
        "patch": size.patch,
        "tokens": num_patches,
        "peak_mem_bytes": tracker_peak(tracker),
        "param_bytes": tensor_bytes(local),
        "flops_per_rank": flops,
        "step_time_s": step_time,
        "samples_per_s": size.batch / step_time,
        "comm_bytes": cp_comm["bytes"],
        "comm_ring_bytes": cp_comm["ring_bytes"],
        "comm_by_op": cp_comm["by_op"],
        "device": _device_name(),
        "variant": size.variant,
        "fused": size.fused,
        "task": size.task,
        "channels": size.channels,
        "embed_dim": size.embed_dim,
        "depth": size.depth,
        "batch": size.batch,
    }


def cp_cpu(size: CPSize) -> list[dict]:
    from dchag.bench.fused_sweep import log
    from dchag.config import ConfigError
    from dchag.parallel.launch import spawn

    size = size.resolved()
    if size.task not in ("forecast", "mae"):
        raise ConfigError(f"task={size.task!r} is unknown for sweep 'cp-cpu'; use forecast or mae")
    bad = [(h, cp) for h in size.heights for cp in size.cp if cp < 1 or h % (size.patch * cp)]
    if bad:
        h, cp = bad[0]
        raise ConfigError(
            f"heights={h} is not a multiple of patch {size.patch} x cp {cp}: give every context-parallel rank "
            "the same whole number of patch rows"
        )
    records = []
    for cp in size.cp:
        log(f"cp-cpu: cp={cp}: image heights {list(size.heights)}")
        for rank_records in spawn(measure_rank, cp, size, cp):
            records += rank_records
    return records


def worst_ranks(records: list[dict]) -> dict[tuple[int, int], dict]:
    """(height, cp) -> the record of the rank with the largest whole-step peak, with the slowest rank's
    step time and the most bytes any rank sent."""
    worst: dict[tuple[int, int], dict] = {}
    for r in records:
        w = worst.setdefault((r["height"], r["cp"]), dict(r))
        if r["peak_mem_bytes"] > w["peak_mem_bytes"]:
            w.update(peak_mem_bytes=r["peak_mem_bytes"], rank=r["rank"])
        if r["step_time_s"] > w["step_time_s"]:
            w.update(step_time_s=r["step_time_s"], samples_per_s=r["samples_per_s"])
        w["comm_bytes"] = max(w["comm_bytes"], r["comm_bytes"])
    return worst


def _op_bytes(r: dict, passname: str, kind: str) -> float:
    """Buffer bytes of the CP group's collectives of one pass ("forward", "backward", "" for both) and
    kind ("allgather", "reduce_scatter", "allreduce": any op name containing it)."""
    return sum(v["bytes"] for k, v in r.get("comm_by_op", {}).items() if k.startswith(passname) and kind in k)


def cp_table(records: list[dict]) -> str:
    """Per (image, cp): the worst rank's whole-step peak and step time, as ratios to cp = 1."""
    worst = worst_ranks(records)
    lines = [
        "| image | tokens | cp | whole-step peak / rank | x cp 1 | step s | x cp 1 | TFLOP / rank | "
        "CP all-gather MB fwd | CP all-gather MB bwd | CP reduce-scatter MB bwd | CP all-reduce MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for height, cp in sorted(worst):
        r, base = worst[(height, cp)], worst.get((height, 1))
        mem = f"{r['peak_mem_bytes'] / base['peak_mem_bytes']:.3f}" if base else "-"
        step = f"{r['step_time_s'] / base['step_time_s']:.2f}" if base else "-"
        lines.append(
            f"| {height} x {r['width']} | {r['tokens']:,} | {cp} | {r['peak_mem_bytes'] / 2**20:,.1f} MiB | {mem} | "
            f"{r['step_time_s']:.3f} | {step} | {r['flops_per_rank'] / 1e12:.3f} | "
            f"{_op_bytes(r, 'forward', 'allgather') / 1e6:,.1f} | {_op_bytes(r, 'backward', 'allgather') / 1e6:,.1f} | "
            f"{_op_bytes(r, 'backward', 'reduce_scatter') / 1e6:,.1f} | {_op_bytes(r, '', 'allreduce') / 1e6:,.3f} |"
        )
    return "\n".join(lines)
