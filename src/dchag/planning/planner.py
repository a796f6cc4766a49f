"""`dchag plan`: every variant x every (tp, cp, dp_shard, dp_replicate) layout of N GPUs, traced.

For each candidate the config is rewritten to that variant and layout (`variants.variant_overrides`),
checked exactly as `dchag train` checks it, and its widest ranks are traced (`trace.trace_rank`). The
per-GPU peak is the traced tensor peak; a candidate fits when that peak stays below the GPU's memory
less `headroom` (the CUDA/ROCm context, communicator buffers and allocator fragmentation, which a
tensor trace does not see). Throughput is predicted from the traced work of a rank, with the stated
machine speeds: step time = FLOPs / tflops + TP bytes / tp_gbs + CP bytes / cp_gbs + data-parallel
bytes / dp_gbs (no overlap assumed), samples/s = local batch x data-parallel size / step time.

Context parallelism (`cp`) needs no model of its own: the traced rank holds its strip of patch rows, so
its activations, its front end's work and the keys and values it gathers for attention (forward
all-gather, backward reduce-scatter over the CP group) are in the trace as they are in the step.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import asdict, dataclass

from dchag.bench.variants import VARIANTS, variant_overrides, variant_pairs
from dchag.config import Config, ConfigError, to_dict
from dchag.planning.jobs import run_jobs

GIB = 2**30


@dataclass
class Machine:
    """What the planner assumes of the GPUs (every speed is a flag; none is fitted to measurements)."""

    gpus: int
    gpu_mem_gib: float
    headroom: float = 0.10  # fraction of GPU memory kept for what a tensor trace does not see
    tflops: float = 100.0  # sustained dense TFLOP/s per GPU
    tp_gbs: float = 100.0  # GB/s each GPU sends within its TP group (intra-node links)
    dp_gbs: float = 25.0  # GB/s each GPU sends to its data-parallel peers (often across nodes)
    cp_gbs: float = 100.0  # GB/s each GPU sends within its context-parallel group (keys and values)

    def check(self) -> None:
        if self.gpus < 1:
            raise ConfigError(f"--gpus {self.gpus} must be at least 1")
        if not self.gpu_mem_gib > 0:
            raise ConfigError(f"--gpu-mem {self.gpu_mem_gib} must be a positive number of GiB")
        if not 0 <= self.headroom < 1:
            raise ConfigError(f"--headroom {self.headroom} must be in [0, 1)")
        for name in ("tflops", "tp_gbs", "dp_gbs", "cp_gbs"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be positive")

    @property
    def usable_bytes(self) -> float:
        return self.gpu_mem_gib * GIB * (1 - self.headroom)


@dataclass(frozen=True)
class Candidate:
    variant: str
    fused: bool
    tp: int
    dp_shard: int
    dp_replicate: int
    cp: int = 1  # context parallelism: ranks sharing one sample's sequence, each a strip of patch rows

    @property
    def dp(self) -> int:
        return self.dp_shard * self.dp_replicate

    @classmethod
    def of(cls, record: dict) -> "Candidate":
        return cls(
            record["variant"], record["fused"], record["tp"], record["dp_shard"], record["dp_replicate"],
            record.get("cp", 1),
        )  # fmt: skip

    def label(self) -> str:
        fused = " fused" if self.fused else ""
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        return f"{self.variant}{fused} tp={self.tp}{cp} dp_shard={self.dp_shard} dp_replicate={self.dp_replicate}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(gpus: int) -> list[tuple[int, int, int, int]]:
    """Every (tp, cp, dp_shard, dp_replicate) whose product is `gpus`."""
    return [
        (tp, cp, shard, gpus // (tp * cp * shard))
        for tp in _divisors(gpus)
        for cp in _divisors(gpus // tp)
        for shard in _divisors(gpus // (tp * cp))
    ]


def candidates(
    gpus: int, variants=tuple(VARIANTS), fused=(False, True), cp_sizes=None, tp_sizes=None
) -> list[Candidate]:
    """Every variant on every layout (with cp in `cp_sizes` and tp in `tp_sizes`, default any); `naive`
    only with tp > 1 (at tp = 1 it is the replicated model)."""
    return [
        Candidate(v, f, tp, shard, rep, cp)
        for tp, cp, shard, rep in layouts(gpus)
        if (cp_sizes is None or cp in cp_sizes) and (tp_sizes is None or tp in tp_sizes)
        for v, f in variant_pairs(variants, fused)
        if not (v == "naive" and tp == 1)
    ]


def candidate_config(base: dict, cand: Candidate, dtype: str | None, global_batch: int | None = None) -> Config:
    """The config `base` (as `to_dict` writes it) as `cand` (variant and layout) in `dtype` ("bf16":
    autocast and bf16 FSDP parameters; "fp32"; None: as the config says), with `global_batch` if given,
    checked as `dchag train` would check it."""
    from dchag.configure import load_config_dict

    overrides = [
        *variant_overrides(cand.variant, cand.fused, cand.tp),
        f"parallel.dp_shard={cand.dp_shard}",
        f"parallel.dp_replicate={cand.dp_replicate}",
        f"parallel.cp={cand.cp}",
    ]
    if global_batch is not None:
        overrides.append(f"train.batch_size={global_batch}")
    if dtype is not None:
        bf16 = str(dtype == "bf16").lower()
        overrides += [f"train.bf16={bf16}", f"parallel.bf16_params={bf16}"]
    return load_config_dict(copy.deepcopy(base), overrides)  # overrides are applied in place: keep `base`


def plan_one(base_dict: dict, cand: Candidate, machine: Machine, dtype: str | None, local_batch: int | None) -> dict:
    """The record of one candidate: traced memory, FLOPs and bytes, predicted speed, fits or why invalid."""
    from dchag.planning.trace import ranks_to_trace, trace_rank

    record = {**asdict(cand), "gpus": machine.gpus, "dtype": dtype or "config"}
    global_batch = base_dict["train"]["batch_size"]
    try:
        if local_batch is None and global_batch % cand.dp:
            raise ConfigError(
                f"train.batch_size={global_batch} is not divisible by dp={cand.dp}; "
                "give --local-batch (samples per data-parallel rank)"
            )
        batch = local_batch or global_batch // cand.dp
        cfg = candidate_config(base_dict, cand, dtype, global_batch=batch * cand.dp)
        traces = [trace_rank(cfg, batch, r) for r in ranks_to_trace(cfg)]
    except ConfigError as err:
        return {**record, "fits": False, "invalid": str(err)}
    worst = max(traces, key=lambda t: t.peak_mem_bytes)
    flops = max(t.flops for t in traces)
    tp_bytes, dp_bytes = max(t.tp_comm_bytes for t in traces), max(t.dp_comm_bytes for t in traces)
    cp_bytes = max(t.cp_comm_bytes for t in traces)
    step_s = (
        flops / (machine.tflops * 1e12)
        + tp_bytes / (machine.tp_gbs * 1e9)
        + cp_bytes / (machine.cp_gbs * 1e9)
        + dp_bytes / (machine.dp_gbs * 1e9)
    )
    return {
        **record,
        "local_batch": batch,
        "global_batch": batch * cand.dp,
        "predicted_peak_mem_bytes": worst.peak_mem_bytes,
        "front_end_peak_mem_bytes": worst.front_end_peak_mem_bytes,
        "front_end_bytes": worst.front_end_bytes,
        "front_end_share": worst.front_end_bytes / worst.peak_mem_bytes if worst.peak_mem_bytes else 0.0,
        "param_bytes": worst.param_bytes,
        "flops_per_rank": flops,
        "tp_comm_bytes": tp_bytes,
        "cp_comm_bytes": cp_bytes,
        "dp_comm_bytes": dp_bytes,
        "predicted_step_time_s": step_s,
        "predicted_samples_per_s": batch * cand.dp / step_s,
        "fits": worst.peak_mem_bytes <= machine.usable_bytes,
        "traced_tp_ranks": [t.tp_rank for t in traces],
        "worst_tp_rank": worst.tp_rank,
    }


def plan(
    base: Config,
    machine: Machine,
    *,
    dtype: str | None = None,
    local_batch: int | None = None,
    variants=tuple(VARIANTS),
    cp_sizes: tuple[int, ...] | None = None,
    tp_sizes: tuple[int, ...] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> list[dict]:
    """Records for every candidate (context- and tensor-parallel sizes in `cp_sizes` and `tp_sizes`,
    default every divisor of the GPUs), ranked: fitting ones by predicted samples/s (fastest first), then
    the rest by memory, then invalid ones."""
    machine.check()
    if dtype not in (None, "bf16", "fp32"):
        raise ConfigError(f"--dtype {dtype!r} is unknown; use bf16 or fp32 (or leave it out: the config's)")
    if local_batch is not None and local_batch < 1:
        raise ConfigError(f"--local-batch {local_batch} must be at least 1")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants {unknown[0]!r} is unknown; use some of {list(VARIANTS)}")
    for flag, sizes in (("--cp", cp_sizes), ("--tp", tp_sizes)):
        bad = [n for n in sizes or () if n < 1 or machine.gpus % n]
        if bad:
            raise ConfigError(f"{flag} {bad[0]} must be a positive divisor of --gpus {machine.gpus}")
    todo = candidates(machine.gpus, variants, cp_sizes=cp_sizes, tp_sizes=tp_sizes)
    base_dict = to_dict(base)

    def report(done: int, record: dict) -> None:
        if progress:
            print(f"[plan] {done}/{len(todo)} {_progress_line(record)}", file=sys.stderr, flush=True)

    jobs = [(base_dict, cand, machine, dtype, local_batch) for cand in todo]
    return rank(run_jobs(plan_one, jobs, workers, report))


def _progress_line(r: dict) -> str:
    cand = Candidate.of(r)
    if "invalid" in r:
        return f"{cand.label()}: not possible ({r['invalid']})"
    fits = "fits" if r["fits"] else "does not fit"
    return f"{cand.label()}: {size_text(r['predicted_peak_mem_bytes'])} per GPU, {fits}"


def size_text(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if n >= GIB else f"{n / 2**20:,.1f} MiB"


def rank(records: list[dict]) -> list[dict]:
    def key(r: dict):
        if "invalid" in r:
            return (2, 0.0)
        if r["fits"]:
            return (0, -r["predicted_samples_per_s"])
        return (1, r["predicted_peak_mem_bytes"])

    return sorted(records, key=key)


def plan_table(records: list[dict], machine: Machine) -> str:
    """A Markdown table of the ranked candidates, and the impossible ones with their reasons."""
    lines = [
        f"{machine.gpus} GPUs x {machine.gpu_mem_gib:g} GiB, {machine.headroom:.0%} kept free: a layout fits below "
        f"{machine.usable_bytes / GIB:.1f} GiB per GPU. Speeds assumed: {machine.tflops:g} TFLOP/s, "
        f"TP {machine.tp_gbs:g} GB/s, CP {machine.cp_gbs:g} GB/s, data-parallel {machine.dp_gbs:g} GB/s per GPU.",
        "",
        "| # | variant | fused | tp | cp | dp_shard | dp_replicate | per-GPU peak | of GPU | front end | fits | "
        "samples/s (pred.) | step s (pred.) | TFLOP / GPU | TP GB / GPU | CP GB / GPU | DP GB / GPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    invalid = []
    for i, r in enumerate(records, 1):
        if "invalid" in r:
            invalid.append(r)
            continue
        lines.append(
            f"| {i} | {r['variant']} | {'yes' if r['fused'] else 'no'} | {r['tp']} | {r.get('cp', 1)} | "
            f"{r['dp_shard']} | {r['dp_replicate']} | {size_text(r['predicted_peak_mem_bytes'])} | "
            f"{r['predicted_peak_mem_bytes'] / (machine.gpu_mem_gib * GIB):.0%} | {r['front_end_share']:.0%} | "
            f"{'yes' if r['fits'] else '**no**'} | {r['predicted_samples_per_s']:,.4g} | "
            f"{r['predicted_step_time_s']:.3g} | {r['flops_per_rank'] / 1e12:.3g} | "
            f"{r['tp_comm_bytes'] / 1e9:.3g} | {r.get('cp_comm_bytes', 0) / 1e9:.3g} | {r['dp_comm_bytes'] / 1e9:.3g} |"
        )
    if invalid:
        lines += ["", "Not possible with this config:"]
        for r in invalid:
            cand = Candidate.of(r)
            lines.append(f"- {cand.label()}: {r['invalid']}")
    best = next((r for r in records if r.get("fits")), None)
    lines.append("")
    if best is None:
        lines.append("No layout fits: raise --gpus, shrink the model or the batch, or enable activation checkpointing.")
    else:
        cand = Candidate.of(best)
        lines.append(
            f"Fastest that fits: {cand.label()}: {size_text(best['predicted_peak_mem_bytes'])} per GPU, "
            f"{best['predicted_samples_per_s']:,.4g} samples/s predicted."
        )
    return "\n".join(lines)
