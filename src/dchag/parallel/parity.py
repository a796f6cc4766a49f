"""Parity of a parallel layout with the single-device model: one step, same weights, same batch.

Every rank builds the single-device reference itself (same seed), runs it on the global batch, then
parallelizes a copy and runs its own share. Loss, outputs and every parameter's gradient (put back into
the single-device layout) are compared as max |a - b| / max |b| per tensor.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

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
    grad_rel: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max([self.loss_rel, self.output_rel, *self.grad_rel.values()])

    def worst_grads(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.grad_rel.items(), key=lambda kv: -kv[1])[:n]


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-12) -> float:
    """max |a - b| / max |b|; `floor` bounds the denominator from below."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp(min=floor))


# Denominator floors, as fractions of the largest gradient in the model. The key bias of a
# self-attention has a gradient that is zero in exact arithmetic (softmax ignores a shift common to all
# keys), so both sides are rounding noise: it is measured against 1e-3 of the model's gradient scale.
# Every other tensor is measured against its own size (floor 1e-6, only to avoid 0/0).
GRAD_FLOOR = 1e-6
ZERO_GRAD_FLOOR = 1e-3
ZERO_GRAD_SUFFIXES = ("attn.wk.bias",)


def randomize_parameters_(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Add seeded noise to every parameter so that zero-initialised ones (queries, biases) take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _inject(fault: str, plan):
    """Deliberate bugs that a parity check must catch; returns a function that undoes the fault."""
    if fault == "gather-reduce-scatter":
        import torch.distributed.nn.functional as dnn

        from dchag.parallel import channel_parallel

        right = channel_parallel.gather_from_tp

        def wrong_gather(x, group, dim):  # torch's autograd all-gather: reduce-scatter backward
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return torch.cat(dnn.all_gather(x.contiguous(), group=group), dim=dim)

        channel_parallel.gather_from_tp = wrong_gather
        return lambda: setattr(channel_parallel, "gather_from_tp", right)
    if fault == "grad-scale":
        for name, p in plan.model.named_parameters():
            if name.startswith("front_end.tokenizer") and p.grad is not None:
                p.grad.mul_(plan.tp)


def run_parity(cfg, fault: str = "none", seed: int = 0) -> ParityReport:
    """Run on every rank of an initialized process group; returns the same report on every rank."""
    dims = ParallelDims.from_config(cfg.parallel)
    mesh = build_mesh(dims)
    device = mesh.device_type
    torch.manual_seed(seed)
    reference = build_model(cfg)
    randomize_parameters_(reference, seed + 1)
    reference.to(device)
    parallel_model = copy.deepcopy(reference)

    if cfg.train.batch_size % dims.dp:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} (global) is not divisible by the {dims.dp} data-parallel ranks")
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
    scale = max(float(g.abs().max()) for g in ref_grads.values())

    plan = parallelize(parallel_model, cfg, mesh)
    restore = _inject(fault, plan) if fault == "gather-reduce-scatter" else None
    rows = slice(plan.dp_rank * batch_size, (plan.dp_rank + 1) * batch_size)
    c0, c1 = plan.placement.channel_ranges[plan.tp_rank]
    local = {k: v[rows] for k, v in batch.items()}
    local["x"] = local["x"][:, c0:c1]  # only this rank's channels
    local_noise = noise[rows] if noise is not None else None
    try:
        loss, out = compute_loss(plan.model, local, cfg, lat_weights=lat_weights, mask_noise=local_noise, channel_shard=plan.channel_shard)
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
    report = ParityReport(
        loss_rel=rel_err(mean_loss, ref_loss),
        output_rel=rel_err(out.pred, ref_out.pred[rows]),
        grad_rel={
            name: rel_err(grads[name], g, scale * (ZERO_GRAD_FLOOR if name.endswith(ZERO_GRAD_SUFFIXES) else GRAD_FLOOR))
            for name, g in ref_grads.items()
        },
    )
    # the worst case over ranks, so every rank returns the same verdict
    worst = torch.tensor([report.output_rel])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    report.output_rel = float(worst)
    return report
