"""Code that runs inside spawned gloo ranks for the distributed tests (importable by the children).

Each function runs on every rank and returns plain data; tests launch them once per world size and
assert on the results, so process start-up is paid a few times, not once per case.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode

from dchag.checks.parity import reference_and_parallel, run_parity
from dchag.configure import load_config
from dchag.model import build_model
from dchag.parallel import ParallelDims, build_mesh, parallelize
from dchag.parallel.collectives import copy_to_tp, gather_from_tp, reduce_from_tp
from dchag.parallel.state import logical_state_dict
from dchag.tasks import mask_noise_for_step
from dchag.train.loop import seed_dropout

SMALL_MODEL = [  # shared with conftest.small_config
    "model.img_size=[16, 32]",
    "model.patch_size=4",
    "model.embed_dim=32",
    "model.depth=1",
    "model.num_heads=4",
    "model.decoder_dim=16",
    "model.decoder_depth=1",
    "model.decoder_heads=2",
]
BASE = SMALL_MODEL + ["train.batch_size=4"]
SPLITS = {
    "even": ["data.channels=16", "model.hierarchy.groups=4"],
    "uneven": ["data.channels=11", "model.hierarchy.groups=5"],
}
KINDS = {"L": "model.hierarchy.preset=dchag-L", "C": "model.hierarchy.preset=dchag-C"}


def config(*overrides):
    return load_config(None, BASE + list(overrides))


def parity_matrix(layouts: dict[str, list[str]], extra_cases: dict[str, tuple] | None = None) -> dict:
    """{case name: (worst relative difference, worst tensors, output difference)} for every kind x
    split x layout, plus `extra_cases` {name: (overrides, fault[, reference_materializing])}."""
    cases = {}
    for lname, layout in layouts.items():
        for kind, kind_set in KINDS.items():
            for split, split_set in SPLITS.items():
                cases[f"{lname}/{kind}/{split}"] = ([kind_set, *split_set, *layout], "none")
                # the same against the materializing single-device reference (distributed side fused)
                cases[f"{lname}/{kind}/{split}/fused-vs-materializing"] = (
                    [kind_set, *split_set, *layout],
                    "none",
                    True,
                )
    cases.update(extra_cases or {})
    out = {}
    for name, (overrides, fault, *materializing) in cases.items():
        report = run_parity(config(*overrides), fault, reference_materializing=bool(materializing and materializing[0]))
        out[name] = (report.worst, report.worst_grads(3), report.output_rel)
    return out


def collectives_both_directions() -> dict:
    """The three autograd collectives, checked directly on a 2-rank group."""
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = gather_from_tp(x, group, dim=1)  # [2, 3 * world]
    weight = torch.arange(gathered.numel(), dtype=torch.float32).view_as(gathered)
    (gathered * weight).sum().backward()
    gather_ok = torch.equal(gathered.detach(), torch.cat([torch.full((2, 3), float(r + 1)) for r in range(world)], 1))
    gather_grad_ok = torch.equal(x.grad, weight[:, rank * 3 : (rank + 1) * 3])  # own slice, not summed

    y = torch.full((2,), float(rank + 1), requires_grad=True)
    (copy_to_tp(y, group) * (rank + 1)).sum().backward()
    copy_ok = torch.equal(y.grad, torch.full((2,), float(sum(r + 1 for r in range(world)))))

    z = torch.full((2,), float(rank + 1), requires_grad=True)
    reduced = reduce_from_tp(z, group)
    reduced.sum().backward()
    reduce_ok = torch.equal(
        reduced.detach(), torch.full((2,), float(sum(r + 1 for r in range(world))))
    ) and torch.equal(z.grad, torch.ones(2))
    return {
        "gather_forward": gather_ok,
        "gather_backward_own_slice": gather_grad_ok,
        "copy_backward_sums": copy_ok,
        "reduce_forward_sums": reduce_ok,
    }


def _counts(mode) -> dict:
    """{op name: count} from a CommDebugMode, without namespaces."""
    return {str(k).split(".")[-1]: v for k, v in mode.get_comm_counts().items()}


def front_end_communication(*overrides) -> dict:
    """Collectives of the front end's forward and backward (CommDebugMode), and of the D-CHAG part alone."""
    cfg = config(*overrides)
    _, plan = reference_and_parallel(cfg)
    c0, c1 = plan.placement.channel_ranges[plan.tp_rank]
    x = torch.randn(2, len(cfg.channels), 16, 32)[:, c0:c1]
    with CommDebugMode() as part:
        plan.model.front_end.distributed_part(x)
    with CommDebugMode() as forward:
        z = plan.model.front_end(x)
    with CommDebugMode() as backward:
        z.square().sum().backward()
    return {"part_forward": _counts(part), "forward": _counts(forward), "backward": _counts(backward)}


def step_communication(*overrides) -> dict:
    """Collectives of one training step (after a warm-up step) and of one ViT block's forward + backward."""
    from dchag.bench.comm import CommBytesMode, summarize
    from dchag.bench.tp_comm_sweep import one_training_step
    from dchag.data import build_source

    cfg = config(*overrides)
    _, plan = reference_and_parallel(cfg)
    source = build_source(cfg, channels=plan.input_channels)
    one_training_step(plan, cfg, source, 0)
    with CommBytesMode() as step_mode:
        one_training_step(plan, cfg, source, 1)
    x = torch.randn(2, plan.model.num_patches, cfg.model.embed_dim, requires_grad=True)
    with CommBytesMode() as block_mode:
        plan.model.blocks[0](x).square().sum().backward()
    group = str(plan.tp_group.group_name)
    return {
        "step": summarize(step_mode.records, group)["by_op"],
        "block": summarize(block_mode.records, group)["by_op"],
    }


def front_end_parameter_share(*overrides) -> dict:
    """Tokenizer + level-1 parameters on this rank vs the single-device model."""
    cfg = config(*overrides)
    reference, plan = reference_and_parallel(cfg)
    single = sum(p.numel() for p in reference.front_end.tokenizer.parameters()) + sum(
        p.numel() for p in reference.front_end.hierarchy.levels[0].parameters()
    )
    fe = plan.model.front_end
    local = sum(p.numel() for p in fe.tokenizer.parameters()) + sum(p.numel() for p in fe.local_levels[0].parameters())
    return {"single": single, "local": local, "tp": plan.tp}


def random_state_consistency(*overrides) -> dict:
    """The encoder's output (a replicated activation, after every dropout) and MAE masks on a
    (dp_shard=2, tp=2) mesh, same input on every rank."""
    cfg = config(*overrides)
    _, plan = reference_and_parallel(cfg)
    model = plan.model.train()
    c0, c1 = plan.placement.channel_ranges[plan.tp_rank]
    x = torch.randn(2, len(cfg.channels), 16, 32, generator=torch.Generator().manual_seed(5))[:, c0:c1]
    seed_dropout(cfg, plan.dp_rank)
    rows = slice(plan.dp_rank * 2, plan.dp_rank * 2 + 2)
    noise = mask_noise_for_step(cfg, 3, 4, model.num_patches)[rows]
    latent = []
    hook = model.norm.register_forward_hook(lambda module, args, out: latent.append(out.detach()))
    out = model(x, mask_noise=noise)
    hook.remove()
    return {"tp_rank": plan.tp_rank, "dp_rank": plan.dp_rank, "latent": latent[0], "mask": out.mask}


def layout_round_trip() -> dict:
    """Weights changed under (dp_shard=2, tp=2) are saved in the logical layout and load at tp=4 and tp=1."""
    split = ["model.hierarchy.preset=dchag-C", *SPLITS["uneven"]]
    cfg = config(*split, "parallel.tp=2", "parallel.dp_shard=2")
    _, plan = reference_and_parallel(cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a stand-in for training: every local shard changes differently
        for p in plan.model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.add_(0.02 * torch.randn(local.shape, generator=g))
    # replicated parameters must stay equal on TP peers: take rank-0-of-TP's values everywhere
    # (what an optimizer step on equal gradients would give)
    for name, p in plan.model.named_parameters():
        spec = plan.specs.get(name)
        if spec is None or spec.dim is None:
            local = p.to_local() if hasattr(p, "to_local") else p
            dist.broadcast(local.data, src=dist.get_global_rank(plan.tp_group, 0), group=plan.tp_group)
    weights = logical_state_dict(plan)
    x = torch.randn(2, 11, 16, 32, generator=torch.Generator().manual_seed(0))
    lead = torch.tensor([6.0, 12.0])
    c0, c1 = plan.placement.channel_ranges[plan.tp_rank]
    # the dp ranks hold the same 2 samples here; each TP rank predicts its own output channels
    trained = plan.model.eval()(x[:, c0:c1], lead).pred
    owned = plan.channel_shard.out_index

    single = build_model(cfg).eval()
    keys = single.load_state_dict(weights, strict=True)
    expected = single(x, lead).pred[:, owned]

    tp4 = config(*split, "parallel.tp=4")
    model4 = build_model(tp4)
    model4.load_state_dict(weights)
    plan4 = parallelize(model4, tp4, build_mesh(ParallelDims.from_config(tp4.parallel)))
    c0, c1 = plan4.placement.channel_ranges[plan4.tp_rank]
    got4 = plan4.model.eval()(x[:, c0:c1], lead).pred  # tp 4 owns other output channels than tp 2
    got4 = gather_outputs(got4, plan4)[:, owned]
    resaved = logical_state_dict(plan4)
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max())  # noqa: E731
    return {
        "strict_load": not keys.missing_keys and not keys.unexpected_keys,
        "tp1_vs_tp2": rel(expected, trained),
        "tp4_vs_tp2": rel(got4, trained),
        "resave_exact": all(torch.equal(resaved[k], weights[k]) for k in weights),
    }


def gather_outputs(pred: torch.Tensor, plan) -> torch.Tensor:
    """Every TP rank's output channels [B, C_out_r, H, W] -> all of them [B, C_out, H, W], in order."""
    parts = [None] * plan.tp
    dist.all_gather_object(parts, (plan.channel_shard.out_index, pred.detach()), group=plan.tp_group)
    full = torch.empty(pred.shape[0], plan.channel_shard.total_out, *pred.shape[2:])
    for index, values in parts:
        full[:, index] = values
    return full


def bf16_parameters_step(*overrides) -> dict:
    """One forward/backward with FSDP2 bf16 parameters against the fp32 single-device loss."""
    from dchag.tasks import compute_loss

    cfg = config(*overrides, "parallel.bf16_params=true")
    reference, plan = reference_and_parallel(cfg)
    x = torch.randn(4, len(cfg.channels), 16, 32, generator=torch.Generator().manual_seed(1))
    rows = slice(plan.dp_rank * 2, plan.dp_rank * 2 + 2)
    c0, c1 = plan.placement.channel_ranges[plan.tp_rank]
    if cfg.train.task == "mae":  # e.g. a wavelength model: float32 encodings meet bf16 weights
        noise = mask_noise_for_step(cfg, 0, 4, reference.num_patches)
        expected, _ = compute_loss(reference, {"x": x}, cfg, mask_noise=noise)
        local, extra = {"x": x[rows, c0:c1]}, {"mask_noise": noise[rows]}
    else:
        lead = torch.tensor([6.0, 12.0, 18.0, 24.0])
        y = torch.zeros(4, len(cfg.out_channels), 16, 32)
        expected, _ = compute_loss(reference, {"x": x, "y": y, "lead_hours": lead}, cfg)
        local = {"x": x[rows, c0:c1], "y": y[rows][:, plan.channel_shard.out_index], "lead_hours": lead[rows]}
        extra = {}
    loss, _ = compute_loss(plan.model, local, cfg, channel_shard=plan.channel_shard, **extra)
    (loss / plan.dp_size).backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    mean = mean / dist.get_world_size()
    finite = all(
        bool(torch.isfinite(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).all())
        for p in plan.model.parameters()
        if p.grad is not None
    )
    return {"loss_rel": float((mean - expected).abs() / expected.abs()), "finite": finite}


def fail_on_rank_one() -> int:
    if dist.get_rank() == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()
    return dist.get_rank()


def attention_dropout_streams() -> dict:
    """`attend` on the same q/k/v on every rank: rank r's heads (block r of T) against the single-device
    call that draws T blocks, and against the other ranks."""
    from dchag.model.vit import attend

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2 * world, 6, 4, generator=g) for _ in range(3))  # [B, H, L, e]
    heads = slice(2 * rank, 2 * rank + 2)
    torch.manual_seed(11)
    mine = attend(q[:, heads], k[:, heads], v[:, heads], 0.5, (rank, 1))
    after_mine = torch.rand(3)  # the global generator after the call: must be in step on every rank
    torch.manual_seed(11)
    single = attend(q, k, v, 0.5, (0, world))
    after_single = torch.rand(3)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine.contiguous())
    return {
        "equals_single_device_block": torch.equal(mine, single[:, heads]),
        "differs_from_rank0": rank == 0 or not torch.equal(mine, everyone[0]),
        "generator_in_step": torch.equal(after_mine, after_single),
    }


def replica_check(*overrides) -> dict:
    """Training steps keep replicas identical (the check passes); a divergence injected on TP rank 1
    ends every rank with the same message."""
    from dchag.data import build_source
    from dchag.parallel.parallelize import ReplicaDivergence
    from dchag.train.loop import Layout, train_step
    from dchag.train.optim import build_optimizer

    cfg = config(*overrides)
    _, plan = reference_and_parallel(cfg)
    source = build_source(cfg, channels=plan.input_channels)
    optimizer = build_optimizer(plan.model, cfg.train)
    seed_dropout(cfg, plan.dp_rank)
    for step in range(3):
        batch = source.batch(list(range(step * 4, step * 4 + 4))[plan.dp_rank * 2 : plan.dp_rank * 2 + 2])
        train_step(Layout(plan.model, plan), optimizer, batch, cfg, step, source.lat_weights(), None, source.channels)
        plan.check_replicas(step)
    names, _ = plan.replica_checksums()
    target = "blocks.0.norm1.weight"
    assert target in names
    if plan.tp_rank == 1:
        with torch.no_grad():
            dict(plan.model.named_parameters())[target].to_local()[0] += 1e-6
    try:
        plan.check_replicas(3)
        message = None
    except ReplicaDivergence as err:
        message = str(err)
    return {"message": message, "replicated": len(names)}


def nan_in_one_rank(*overrides, bad_rank: int = 2) -> dict:
    """NaN in one input channel of one TP rank: every rank stops in the same step with the same message."""
    import time

    from dchag.data import build_source
    from dchag.train.guards import TrainingFailure
    from dchag.train.loop import Layout, train_step
    from dchag.train.optim import build_optimizer

    cfg = config(*overrides)
    _, plan = reference_and_parallel(cfg)
    source = build_source(cfg, channels=plan.input_channels)
    optimizer = build_optimizer(plan.model, cfg.train)
    start = time.perf_counter()
    for step in range(3):
        batch = source.batch([0, 1, 2, 3])
        if step == 1 and dist.get_rank() == bad_rank:
            batch["x"][1, 1, 2, 3] = float("nan")  # the second channel this rank holds
        try:
            train_step(
                Layout(plan.model, plan), optimizer, batch, cfg, step, source.lat_weights(), None, source.channels
            )
        except TrainingFailure as err:
            return {
                "step": step,
                "message": str(err),
                "seconds": time.perf_counter() - start,
                "channels": source.channels,
            }
    return {"step": None, "message": None, "seconds": time.perf_counter() - start, "channels": source.channels}


def optimizer_steps_match(*overrides, steps: int = 3) -> dict:
    """`steps` training steps (AdamW with weight decay, the config's clipping) single-device and parallel
    on the same batches: logical weights afterwards, and whether clipping engaged."""
    from dchag.data import batch_indices, build_source
    from dchag.parallel.state import logical_state_dict
    from dchag.train.loop import Layout, train_step
    from dchag.train.optim import build_optimizer

    cfg = config(*overrides)
    reference, plan = reference_and_parallel(cfg)
    full_source = build_source(cfg)
    local_source = build_source(cfg, channels=plan.input_channels)
    ref_opt, opt = build_optimizer(reference, cfg.train), build_optimizer(plan.model, cfg.train)
    local = 4 // plan.dp_size
    rows = slice(plan.dp_rank * local, (plan.dp_rank + 1) * local)
    lat = full_source.lat_weights() if cfg.train.task == "forecast" else None
    norms = []
    for step in range(steps):
        indices = batch_indices(full_source.num_samples, 4, step, 0)
        ref_batch, batch = full_source.batch(indices), local_source.batch(indices[rows])
        noise = mask_noise_for_step(cfg, step, 4, reference.num_patches) if cfg.train.task == "mae" else None
        _, ref_norm, _ = train_step(Layout(reference), ref_opt, ref_batch, cfg, step, lat, noise, full_source.channels)
        local_noise = noise[rows] if noise is not None else None
        train_step(Layout(plan.model, plan), opt, batch, cfg, step, lat, local_noise, local_source.channels)
        norms.append(float(ref_norm))
    got, expected = logical_state_dict(plan), reference.state_dict()
    rel = {k: float((got[k] - v).abs().max() / v.abs().max().clamp(min=1e-12)) for k, v in expected.items()}
    return {
        "worst": max(rel.values()),
        "worst_name": max(rel, key=rel.get),
        "norms": norms,
        "clip": cfg.train.grad_clip,
    }


def consumed_and_kept_gradients(*overrides) -> dict:
    """One MAE step of the parallel model as training runs it (keep_output=False: the loss's gradient is
    written into the prediction's storage) and as evaluation and the parity check run it
    (keep_output=True): {"loss_equal", "grads_equal"} (bit-identical), and the same comparison against a
    kept step on other mask noise, which must differ (the counter-check)."""
    from dchag.tasks import compute_loss
    from dchag.train.loop import autocast

    cfg = config(*overrides)
    _, plan = reference_and_parallel(cfg)
    g = torch.Generator().manual_seed(7)
    b = cfg.train.batch_size
    x = torch.randn(b, len(cfg.channels), *cfg.model.img_size, generator=g)
    c0, c1 = plan.placement.channel_ranges[plan.tp_rank]

    def step(keep: bool, noise_step: int):
        plan.model.zero_grad(set_to_none=True)
        noise = mask_noise_for_step(cfg, noise_step, b, plan.model.num_patches)
        with autocast(cfg, torch.device("cpu")):
            loss, _ = compute_loss(
                plan.model, {"x": x[:, c0:c1]}, cfg, mask_noise=noise, channel_shard=plan.channel_shard,
                keep_output=keep,
            )
        loss.backward()
        grads = {n: p.grad for n, p in plan.model.named_parameters() if p.grad is not None}
        return loss.detach(), {n: (v.to_local() if hasattr(v, "to_local") else v).clone() for n, v in grads.items()}

    kept, consumed, other = step(True, 0), step(False, 0), step(True, 1)

    def same(a, b) -> bool:
        return a[1].keys() == b[1].keys() and all(torch.equal(a[1][n], b[1][n]) for n in a[1])

    return {
        "loss_equal": bool(torch.equal(kept[0], consumed[0])),
        "grads_equal": same(kept, consumed),
        "grads": len(kept[1]),
        "other_noise_equal": same(kept, other),
    }
