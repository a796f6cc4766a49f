"""Parity of a parallel layout with the single-device model: one step, same weights, same batch.

Every rank builds the single-device reference itself (same seed), runs it on the global batch, then
parallelizes a copy and runs its own share. Loss, outputs and every parameter's gradient (put back into
the single-device layout) are compared as max |a - b| / max |b| per tensor.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dchag.compare import GRAD_FLOOR, grad_errors, rel_err
from dchag.config import ConfigError
from dchag.data import batch_indices, build_source
from dchag.data.row_strip import cut_rows
from dchag.model import build_model
from dchag.model.parts import grad_norm_parts, part_square_sums
from dchag.parallel.context_parallel import set_dropout_strips
from dchag.parallel.mesh import ParallelDims, build_mesh, submesh
from dchag.parallel.parallelize import parallelize
from dchag.parallel.state import logical_grads
from dchag.tasks import compute_loss, mask_noise_for_step
from dchag.tasks.channel_subset import channel_keep_for_step
from dchag.train.loop import autocast

FAULTS = (
    "none",
    "gather-reduce-scatter",
    "gather-own-slice",
    "grad-scale",
    "rollout-data-fed",  # rollout faults: run with train.rollout_steps > 1
    "rollout-channel-map",
    "channel-subset-seed",  # TP rank 1 draws its band subset (train.channel_subset) from another step
    "cp-grad-sum",  # context parallelism: FSDP2 shards over dp_shard alone, the CP ranks' gradient parts unsummed
    "cp-kv-own-slice",  # the key/value gather keeps its own slice in backward instead of reduce-scattering
    "cp-dropout-streams",  # every CP rank draws its dropout masks from strip 0's streams
)


# Tolerances on max |a - b| / max |b| per tensor. fp32: summation order alone (TP splits every
# reduction) leaves ~1e-7..1e-6. bf16 (autocast; weights, reductions and the loss stay fp32): every
# matmul rounds its output to bf16, whose unit roundoff is u = 2**-8, so the two sides differ by a few u
# per rounding and the differences grow along the depth of the network. 8 u (~3.1e-2) is the bound;
# what is measured is in docs/benchmarks.md. A real defect (a wrong gradient scale, a missing sum over
# ranks) is an error of order 1, far above both.
FP32_TOLERANCE = 1e-5
BF16_UNIT_ROUNDOFF = 2.0**-8  # torch.finfo(torch.bfloat16).eps / 2
BF16_TOLERANCE = 8 * BF16_UNIT_ROUNDOFF


@dataclass
class ParityReport:
    loss_rel: float
    output_rel: float
    grad_norm_rel: float  # the global gradient norm used for clipping
    grad_rel: dict[str, float] = field(default_factory=dict)
    part_norm_rel: dict[str, float] = field(default_factory=dict)  # train.log_grad_norms' norm per part

    @property
    def worst(self) -> float:
        return max(
            [self.loss_rel, self.output_rel, self.grad_norm_rel, *self.grad_rel.values(), *self.part_norm_rel.values()]
        )

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
    """Deliberate bugs that a parity check must catch, applied before the step; returns a function that
    undoes them ("grad-scale" acts after backward: see `_scale_grads`)."""
    from dchag.parallel import channel_parallel
    from dchag.parallel.collectives import gather_from_tp, gather_to_tp

    front = plan.model.front_end
    before = (channel_parallel.gather_from_tp, channel_parallel.gather_to_tp, front.gather_into_final)

    def restore():
        channel_parallel.gather_from_tp, channel_parallel.gather_to_tp, front.gather_into_final = before

    if fault.startswith("rollout-"):
        return _inject_rollout(fault)
    if fault == "cp-kv-own-slice":
        return _inject_kv_own_slice()
    if fault == "cp-dropout-streams":
        own = (plan.strip.token_counts[plan.strip.rank],)
        set_dropout_strips(plan.model, 0, own)
        return lambda: set_dropout_strips(plan.model, plan.strip.rank, own)
    if fault == "gather-reduce-scatter":
        # torch's autograd all-gather (reduce-scatter backward) where the gradient is already complete:
        # the last level keeps its own all-reduce, so front-end gradients come out tp times too large
        front.gather_into_final = False
        channel_parallel.gather_from_tp = gather_to_tp
    elif fault == "gather-own-slice":
        # the opposite mistake: own-slice backward where the last level's gradient is partial, so the
        # front end sees only this rank's heads' share of its gradient
        front.gather_into_final = bool(front.gathered_counts) and front.final is not None
        channel_parallel.gather_to_tp = gather_from_tp
    return restore


def _inject_kv_own_slice():
    """The "cp-kv-own-slice" fault: the context-parallel key/value gather keeps its own slice in backward,
    so the gradient other strips' queries send to this rank's keys and values is lost."""
    from dchag.parallel import context_parallel
    from dchag.parallel.collectives import gather_from_tp

    original = context_parallel.gather_to_cp
    context_parallel.gather_to_cp = gather_from_tp

    def restore():
        context_parallel.gather_to_cp = original

    return restore


@contextlib.contextmanager
def _built_with(fault: str):
    """Faults in how the model is parallelized: under "cp-grad-sum" FSDP2 shards over dp_shard alone (CP
    ranks left out of its mesh, as if they did not share the weights), so nothing sums the CP ranks'
    parts of each gradient."""
    if fault != "cp-grad-sum":
        yield
        return
    module = importlib.import_module("dchag.parallel.parallelize")  # the module, not the package's function
    original = module.dp_mesh
    module.dp_mesh = lambda mesh: submesh(mesh, "dp_replicate", "dp_shard")
    try:
        yield
    finally:
        module.dp_mesh = original


def _inject_rollout(fault: str):
    """Deliberate rollout bugs (train.rollout_steps > 1): "rollout-data-fed" starts every later step from
    the data at its valid time instead of the previous prediction (teacher forcing); "rollout-channel-map"
    feeds each prediction into the next input channel instead of its own."""
    from dchag.tasks import step

    before = (step.rollout, step.input_positions)

    def restore():
        step.rollout, step.input_positions = before

    if fault == "rollout-data-fed":

        def data_fed(model, x, lead_hours, steps, *, in_out_index, forcings=None, checkpointing=False, **kw):
            return [model(inputs, lead_hours, **kw).pred for inputs in [x, *(forcings or [])][:steps]]

        step.rollout = data_fed
    else:

        def shifted(channels, out_channels, channel_shard=None):
            width = len(channels) if channel_shard is None else channel_shard.stop - channel_shard.start
            return [(i + 1) % width for i in before[1](channels, out_channels, channel_shard)]

        step.input_positions = shifted
    return restore


def _scale_grads(plan) -> None:
    """The "grad-scale" fault: front-end tokenizer gradients multiplied by tp."""
    for name, p in plan.model.named_parameters():
        if name.startswith("front_end.tokenizer") and p.grad is not None:
            p.grad.mul_(plan.tp)


def run_parity(cfg, fault: str = "none", seed: int = 0, reference_materializing: bool = False) -> ParityReport:
    """Run on every rank of an initialized process group; returns the same report on every rank.

    Runs in the config's precision (bf16 autocast when train.bf16) and with its dropout: the reference
    draws its attention-dropout masks per block of H/tp heads (`model.vit.attend`) and every rank starts
    from the same generator state, so both sides drop exactly the same elements (context parallelism:
    per strip of queries and tokens, `set_dropout_strips`). Dropout needs no data parallelism
    (data-parallel ranks draw different masks by design); `layout_for` switches it off otherwise.

    `reference_materializing`: the single-device reference uses the materializing front end
    (model.fused_front_end=false) whatever the config says, so a fused distributed model is compared
    with the plain reference implementation.
    """
    dims = ParallelDims.from_config(cfg.parallel)
    if cfg.model.drop_rate > 0 and dims.dp > 1:
        raise ConfigError("parity with dropout needs parallel.dp_shard = dp_replicate = 1 (DP ranks draw other masks)")
    with _built_with(fault):
        reference, plan = reference_and_parallel(cfg, seed)
    device = plan.mesh.device_type
    if reference_materializing:
        reference.front_end.fused = False
    for block in reference.blocks:  # the masks of a tp-way layout (see model.vit.attend)
        block.attn.dropout_streams = (0, dims.tp)
    if plan.strip is not None and cfg.train.task == "forecast":  # ... and of a cp-way one
        set_dropout_strips(reference, 0, plan.strip.token_counts)
    reference.train()
    plan.model.train()

    batch_size = cfg.train.batch_size // dims.dp  # per data-parallel rank
    steps = cfg.train.rollout_steps if cfg.train.task == "forecast" else 1
    source = build_source(cfg, rollout_steps=steps)
    if hasattr(source, "compute_stats"):  # file-backed data: normalised by its training statistics
        source.stats = source.compute_stats()
    global_indices = batch_indices(source.num_samples, cfg.train.batch_size, 0, cfg.data.seed)
    batch = {k: v.to(device) for k, v in source.batch(global_indices).items()}
    lat_weights = source.lat_weights().to(device) if cfg.train.task == "forecast" else None
    noise = None
    if cfg.train.task == "mae":
        noise = mask_noise_for_step(cfg, 0, cfg.train.batch_size, reference.num_patches).to(device)
    # train.channel_subset: the step's band subset, over all channels on every rank (each applies its part)
    ref_keep = channel_keep_for_step(cfg, 0, len(cfg.channels))
    wrong = fault == "channel-subset-seed" and plan.tp_rank == 1
    keep = channel_keep_for_step(cfg, 1, len(cfg.channels)) if wrong else ref_keep
    ref_subset, subset = ({} if k is None else {"channel_keep": k.to(device)} for k in (ref_keep, keep))

    torch.manual_seed(seed + 12345)  # the dropout masks: the same generator state on both sides
    with autocast(cfg, torch.device(device)):
        ref_loss, ref_out = compute_loss(
            reference, {**batch, **ref_subset}, cfg, lat_weights=lat_weights, mask_noise=noise
        )
    ref_loss.backward()
    ref_grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in reference.named_parameters()}

    restore = _inject(fault, plan)
    rows = slice(plan.dp_rank * batch_size, (plan.dp_rank + 1) * batch_size)
    c0, c1 = plan.placement.channel_ranges[plan.tp_rank]
    local = {k: v[rows] for k, v in batch.items()}
    for key in ("x", "x_valid", "forcings"):
        if key in local:  # only this rank's channels (forcings [B, K-1, C, H, W]: along dim 2)
            local[key] = local[key][:, :, c0:c1] if key == "forcings" else local[key][:, c0:c1]
    if plan.channel_shard is not None and cfg.train.task == "forecast":
        owned = torch.tensor(plan.channel_shard.out_index, dtype=torch.long, device=device)
        for key in ("y", "y_valid"):  # and only its own targets (rollout: [B, K, C_out, H, W])
            if key in local:
                local[key] = local[key].index_select(local[key].dim() - 3, owned)
    local_noise = noise[rows] if noise is not None else None  # MAE: the whole image's noise, also under CP
    local.update(subset)
    local_lat = lat_weights
    if plan.strip is not None:  # context parallelism: this rank's rows of every image
        local = {k: cut_rows(v, plan.strip.pixel_rows, cfg.model.img_size) for k, v in local.items()}
        local_lat = lat_weights[plan.strip.pixel_rows] if lat_weights is not None else None
    torch.manual_seed(seed + 12345)
    try:
        with autocast(cfg, torch.device(device)):
            loss, out = compute_loss(
                plan.model,
                local,
                cfg,
                lat_weights=local_lat,
                mask_noise=local_noise,
                channel_shard=plan.channel_shard,
                dp_mean=plan.dp_mean if plan.dp_size > 1 else None,
                strip=plan.strip,
            )
        (loss / plan.dp_size).backward()
    finally:
        restore()
    plan.finish_gradients()
    if fault == "grad-scale":
        _scale_grads(plan)

    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss = mean_loss / dims.world_size  # equal on TP peers: the mean over ranks is the DP mean
    expected = ref_out.pred[rows]
    if plan.channel_shard is not None:  # a channel-parallel model predicts only this rank's channels
        if cfg.train.task == "mae":
            expected = expected[:, c0:c1]
        else:  # [B, C_out, H, W], or [B, K, C_out, H, W] for a rollout
            owned = torch.tensor(plan.channel_shard.out_index, dtype=torch.long, device=expected.device)
            expected = expected.index_select(expected.dim() - 3, owned)
    if plan.strip is not None:  # a context-parallel rank predicts its strip of rows
        expected = expected[..., plan.strip.pixel_rows, :]
    grads = logical_grads(plan)
    ref_norm = torch.stack([g.double().square().sum() for g in ref_grads.values()]).sum().sqrt()
    # the per-part norms (every rank calls part_grad_norms: it is collective) against the reference's,
    # taken in float64: a float32 norm of a whole tensor is ~1e-6 off on the CPU, the parallel side's shards less
    parts = grad_norm_parts(len(cfg.model.hierarchy.resolved_levels()))
    exact = ((n, g.double(), 0) for n, g in ref_grads.items())
    ref_parts = part_square_sums(exact, parts, 1, ref_norm.device)[:, 0].sqrt()
    part_norms, floor = plan.part_grad_norms(parts), GRAD_FLOOR * float(ref_parts.max())
    report = ParityReport(
        loss_rel=rel_err(mean_loss, ref_loss),
        output_rel=rel_err(out.pred, expected),
        grad_norm_rel=rel_err(plan.grad_norm(), ref_norm),
        grad_rel=grad_errors(grads, ref_grads),
        part_norm_rel={p: rel_err(a, b, floor) for p, a, b in zip(parts, part_norms, ref_parts)},
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
    if p.tp * p.dp_shard * p.dp_replicate * p.cp == 1 and nproc > 1:
        p = dataclasses.replace(p, tp=nproc)
    if p.tp * p.dp_shard * p.dp_replicate * p.cp != nproc:
        raise ConfigError(
            f"--nproc {nproc} does not match parallel.dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} "
            f"x cp={p.cp} x tp={p.tp}; set them so that their product is the process count"
        )
    from dchag.config import validate
    from dchag.configure import check_channels

    checked = dataclasses.replace(cfg, parallel=p)
    if cfg.model.drop_rate > 0 and p.dp_shard * p.dp_replicate > 1:  # DP ranks draw other masks by design
        checked = dataclasses.replace(checked, model=dataclasses.replace(cfg.model, drop_rate=0.0))
    validate(checked)
    check_channels(checked)  # the layout against the hierarchy's groups
    return checked


def default_tolerance(cfg) -> float:
    """FP32_TOLERANCE, or BF16_TOLERANCE when the config trains in bf16 (see their definitions)."""
    return BF16_TOLERANCE if cfg.train.bf16 else FP32_TOLERANCE


def check_parity(cfg, nproc: int, tolerance: float | None = None, fault: str = "none") -> tuple[bool, str]:
    """Run the parity check on `nproc` local processes in the config's precision and with its dropout;
    returns (passed, printable report). `tolerance` defaults to `default_tolerance(cfg)`."""
    from dchag.parallel.launch import spawn

    dropout_requested = cfg.model.drop_rate
    cfg = layout_for(cfg, nproc)
    tolerance = default_tolerance(cfg) if tolerance is None else tolerance
    report = spawn(run_parity, nproc, cfg, fault)[0]
    p = cfg.parallel
    lines = [
        f"parity: {cfg.model.hierarchy.preset or 'custom'} hierarchy, mode {p.mode}, "
        f"dp_replicate={p.dp_replicate} dp_shard={p.dp_shard} cp={p.cp} tp={p.tp}, task {cfg.train.task}"
        + f", {'bf16' if cfg.train.bf16 else 'fp32'}, dropout {cfg.model.drop_rate:g}"
        + (" (off: data-parallel ranks draw other masks)" if dropout_requested and not cfg.model.drop_rate else "")
        + (f", injected fault: {fault}" if fault != "none" else ""),
        f"  max relative difference (tolerance {tolerance:g}):",
        f"    loss       {report.loss_rel:.3e}",
        f"    outputs    {report.output_rel:.3e}",
        f"    grad norm  {report.grad_norm_rel:.3e}",
        f"    part norms {max(report.part_norm_rel.values()):.3e}  (worst of {len(report.part_norm_rel)} parts: "
        + ", ".join(report.part_norm_rel)
        + ")",
        f"    gradients  {max(report.grad_rel.values()):.3e}  (worst of {len(report.grad_rel)} parameters)",
    ]
    lines += [f"      {name:<56} {err:.3e}" for name, err in report.worst_grads(5)]
    passed = report.worst <= tolerance
    lines.append("PASS" if passed else f"FAIL: {report.worst:.3e} > {tolerance:g}")
    return passed, "\n".join(lines)
