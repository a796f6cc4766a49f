"""Parity of a parallel layout with the single-device model: one step, same weights, same batch.

Every rank builds the single-device reference itself (same seed), runs it on the global batch, then
parallelizes a copy and runs its own share. Loss, outputs and every parameter's gradient (put back into
the single-device layout) are compared as max |a - b| / max |b| per tensor.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dchag.compare import grad_errors, rel_err
from dchag.config import ConfigError
from dchag.data import batch_indices, build_source
from dchag.model import build_model
from dchag.parallel.mesh import ParallelDims, build_mesh
from dchag.parallel.parallelize import parallelize
from dchag.parallel.state import logical_grads
from dchag.tasks import compute_loss
from dchag.train.loop import mask_noise_for_step

FAULTS = ("none", "gather-reduce-scatter", "grad-scale")


@dataclass
class ParityReport:
    loss_rel: float
    output_rel: float
    grad_norm_rel: float  # the global gradient norm used for clipping
    grad_rel: dict[str, float] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max([self.loss_rel, self.output_rel, self.grad_norm_rel, *self.grad_rel.values()])

    def worst_grads(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.grad_rel.items(), key=lambda kv: -kv[1])[:n]


def randomize_parameters_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter so that zero-initialised ones (queries, biases) take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def reference_and_parallel(cfg, seed: int = 0):
    """(single-device reference, ParallelPlan of an identical copy) with the same random weights on every
    rank; the mesh comes from `cfg.parallel`. The reference lives on the mesh's device type."""
    mesh = build_mesh(ParallelDims.from_config(cfg.parallel))
    torch.manual_seed(seed)
    reference = build_model(cfg)
    randomize_parameters_(reference, seed + 1)
    reference.to(mesh.device_type)
    plan = parallelize(copy.deepcopy(reference), cfg, mesh)
    return reference, plan


def _inject(fault: str, plan):
    """Deliberate bugs that a parity check must catch; returns a function that undoes the fault."""
    if fault == "gather-reduce-scatter":
        from dchag.parallel import channel_parallel

        right = channel_parallel.gather_from_tp

        class GatherReduceScatter(torch.autograd.Function):
            """What torch's autograd all-gathers do: all-gather forward, reduce-scatter backward."""

            @staticmethod
            def forward(ctx, x, group, dim):
                ctx.group, ctx.dim, ctx.size = group, dim, x.shape[dim]
                parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, x.contiguous(), group=group)
                return torch.cat(parts, dim=dim)

            @staticmethod
            def backward(ctx, grad):
                total = grad.contiguous().clone()
                dist.all_reduce(total, group=ctx.group)  # reduce-scatter = all-reduce, keep own slice
                rank = dist.get_rank(ctx.group)
                return total.narrow(ctx.dim, rank * ctx.size, ctx.size), None, None

        def wrong_gather(x, group, dim):
            return GatherReduceScatter.apply(x, group, dim)

        channel_parallel.gather_from_tp = wrong_gather
        return lambda: setattr(channel_parallel, "gather_from_tp", right)
    if fault == "grad-scale":
        for name, p in plan.model.named_parameters():
            if name.startswith("front_end.tokenizer") and p.grad is not None:
                p.grad.mul_(plan.tp)


def run_parity(cfg, fault: str = "none", seed: int = 0, reference_materializing: bool = False) -> ParityReport:
    """Run on every rank of an initialized process group; returns the same report on every rank.

    `reference_materializing`: the single-device reference uses the materializing front end
    (model.fused_front_end=false) whatever the config says, so a fused distributed model is compared
    with the plain reference implementation.
    """
    dims = ParallelDims.from_config(cfg.parallel)
    reference, plan = reference_and_parallel(cfg, seed)
    device = plan.mesh.device_type
    if reference_materializing:
        reference.front_end.fused = False

    batch_size = cfg.train.batch_size // dims.dp  # per data-parallel rank
    source = build_source(cfg)
    global_indices = batch_indices(source.num_samples, cfg.train.batch_size, 0, cfg.data.seed)
    batch = {k: v.to(device) for k, v in source.batch(global_indices).items()}
    lat_weights = source.lat_weights().to(device) if cfg.train.task == "forecast" else None
    noise = None
    if cfg.train.task == "mae":
        noise = mask_noise_for_step(cfg, 0, cfg.train.batch_size, reference.num_patches).to(device)

    ref_loss, ref_out = compute_loss(reference, batch, cfg, lat_weights=lat_weights, mask_noise=noise)
    ref_loss.backward()
    ref_grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in reference.named_parameters()}

    restore = _inject(fault, plan) if fault == "gather-reduce-scatter" else None
    rows = slice(plan.dp_rank * batch_size, (plan.dp_rank + 1) * batch_size)
    c0, c1 = plan.placement.channel_ranges[plan.tp_rank]
    local = {k: v[rows] for k, v in batch.items()}
    local["x"] = local["x"][:, c0:c1]  # only this rank's channels
    local_noise = noise[rows] if noise is not None else None
    try:
        loss, out = compute_loss(
            plan.model, local, cfg, lat_weights=lat_weights, mask_noise=local_noise, channel_shard=plan.channel_shard
        )
        (loss / plan.dp_size).backward()
    finally:
        if restore is not None:
            restore()
    plan.finish_gradients()
    if fault == "grad-scale":
        _inject(fault, plan)

    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss = mean_loss / dims.world_size  # equal on TP peers: the mean over ranks is the DP mean
    grads = logical_grads(plan)
    ref_norm = torch.stack([g.double().square().sum() for g in ref_grads.values()]).sum().sqrt()
    report = ParityReport(
        loss_rel=rel_err(mean_loss, ref_loss),
        output_rel=rel_err(out.pred, ref_out.pred[rows]),
        grad_norm_rel=rel_err(plan.grad_norm(), ref_norm),
        grad_rel=grad_errors(grads, ref_grads),
    )
    # the worst case over ranks, so every rank returns the same verdict
    worst = torch.tensor([report.output_rel], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    report.output_rel = float(worst)
    return report


def layout_for(cfg, nproc: int):
    """The config with a parallel layout for `nproc` ranks: its own if it names one, else tp = nproc."""
    import dataclasses

    p = cfg.parallel
    if p.tp * p.dp_shard * p.dp_replicate == 1 and nproc > 1:
        p = dataclasses.replace(p, tp=nproc)
    if p.tp * p.dp_shard * p.dp_replicate != nproc:
        raise ConfigError(
            f"--nproc {nproc} does not match parallel.dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} "
            f"x tp={p.tp}; set them so that their product is the process count"
        )
    from dchag.config import validate

    model = dataclasses.replace(cfg.model, drop_rate=0.0)  # parity is checked without dropout, in fp32
    train = dataclasses.replace(cfg.train, bf16=False)
    checked = dataclasses.replace(cfg, parallel=p, model=model, train=train)
    validate(checked)
    return checked


def check_parity(cfg, nproc: int, tolerance: float = 1e-5, fault: str = "none") -> tuple[bool, str]:
    """Run the parity check on `nproc` local processes; returns (passed, printable report)."""
    from dchag.parallel.launch import spawn

    cfg = layout_for(cfg, nproc)
    report = spawn(run_parity, nproc, cfg, fault)[0]
    p = cfg.parallel
    lines = [
        f"parity: {cfg.model.hierarchy.preset or 'custom'} hierarchy, mode {p.mode}, "
        f"dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} tp={p.tp}, task {cfg.train.task}"
        + (f", injected fault: {fault}" if fault != "none" else ""),
        f"  max relative difference (tolerance {tolerance:g}):",
        f"    loss       {report.loss_rel:.3e}",
        f"    outputs    {report.output_rel:.3e}",
        f"    grad norm  {report.grad_norm_rel:.3e}",
        f"    gradients  {max(report.grad_rel.values()):.3e}  (worst of {len(report.grad_rel)} parameters)",
    ]
    lines += [f"      {name:<56} {err:.3e}" for name, err in report.worst_grads(5)]
    passed = report.worst <= tolerance
    lines.append("PASS" if passed else f"FAIL: {report.worst:.3e} > {tolerance:g}")
    return passed, "\n".join(lines)
