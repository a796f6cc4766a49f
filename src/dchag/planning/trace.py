"""Trace one rank's training step on fake tensors: what it holds, computes and sends, at any scale.

The rank is built exactly as `dchag train` builds it (`parallel.construct`: meta model, `parallelize`,
only its own shards allocated), but inside torch's `FakeTensorMode`, so every tensor has its real shape,
dtype and size and none has storage or values. Torch's fake process group (world size = the layout's)
stands in for the peers: collectives return tensors of the right shapes. The step is the training
loop's own `loss_and_gradients` followed by clipping and AdamW's step, starting from the state of
every step after the first (last step's gradients and AdamW's moments exist), measured with MemTracker
(exact tensor bytes: parameters, gradients, optimizer states, activations, FSDP's all-gather buffers
and temporaries alike), FlopCounterMode and CommBytesMode. Nothing is fitted: the numbers are those
of the traced step.

Not seen by a tensor trace (left to `--headroom`): the CUDA/ROCm context, communicator buffers inside
NCCL/RCCL, and the caching allocator's fragmentation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dchag.bench.fake_group import fake_process_group
from dchag.parallel.mesh import cp_group_name


@dataclass
class RankTrace:
    """One traced rank's step."""

    tp_rank: int
    peak_mem_bytes: int  # all live tensors at the step's peak
    front_end_peak_mem_bytes: int  # all live tensors at the peak while the front end runs (forward or backward)
    front_end_bytes: int  # what the front end itself holds: its forward's activations and transients, plus
    #                       its parameters, their gradients and AdamW moments
    param_bytes: int  # this rank's parameters
    flops: int  # forward + backward (+ recomputation under activation checkpointing)
    tp_comm_bytes: int  # bytes this rank sends through collectives on its TP group (ring algorithms)
    dp_comm_bytes: int  # the same on its data-parallel groups (FSDP all-gathers and reduce-scatters)
    cp_comm_bytes: int = 0  # the same on its context-parallel group (keys and values of attention)


def ranks_to_trace(cfg) -> list[int]:
    """The TP ranks whose memory can differ from the others' and may be the largest: rank 0 (it keeps
    the vocabulary rows no channel uses) and the rank that holds the most channels."""
    from dchag.model import build_model
    from dchag.parallel.channel_parallel import place_channels
    from dchag.parallel.construct import parameters_on_meta

    tp = cfg.parallel.tp
    if tp == 1:
        return [0]
    with parameters_on_meta():
        front_end = build_model(cfg, init=False).front_end
    ranges = place_channels(front_end, tp, cfg.parallel.mode).channel_ranges
    widest = max(range(tp), key=lambda r: ranges[r][1] - ranges[r][0])
    return sorted({0, widest})


def _rows(cfg, plan) -> int:
    """The image rows this rank reads: all of them, or its strip's under context parallelism."""
    strip = getattr(plan, "strip", None)
    if strip is None:
        return cfg.model.img_size[0]
    return strip.pixel_rows.stop - strip.pixel_rows.start


def _batch_shapes(cfg, plan, local_batch: int) -> dict[str, tuple[int, ...]]:
    """The shapes of this rank's batch: its own input channels (and rows, under context parallelism)
    and, for forecasting, its targets; rollout training (`train.rollout_steps` K > 1) has K targets
    and the inputs at the K - 1 intermediate valid times, as the data sources give them."""
    h, w = _rows(cfg, plan), cfg.model.img_size[1]
    inputs = len(plan.input_channels)
    shapes = {"x": (local_batch, inputs, h, w)}
    if cfg.train.task == "forecast":
        shard = plan.channel_shard
        outputs = len(shard.out_index) if shard is not None and shard.out_index is not None else len(cfg.out_channels)
        steps = cfg.train.rollout_steps
        shapes["y"] = (local_batch, outputs, h, w) if steps == 1 else (local_batch, steps, outputs, h, w)
        if steps > 1:
            shapes["forcings"] = (local_batch, steps - 1, inputs, h, w)
        shapes["lead_hours"] = (local_batch,)
    return shapes


def trace_rank(cfg, local_batch: int, tp_rank: int = 0, target: str = "cuda", fake: bool = True) -> RankTrace:
    """Trace TP rank `tp_rank` (data-parallel coordinates 0; context-parallel rank 0, whose strip of
    patch rows is the widest) of the layout in `cfg.parallel`.

    `target`: the device the step is traced for. "cuda": AdamW with multi-tensor (foreach) kernels and
    flash attention, as torch runs them on GPUs; "cpu": as torch runs them on CPU (to compare with
    measurements on this machine). `fake=False` runs the same step on real (uninitialised) CPU tensors:
    the check that fake tensors account for memory as real ones do."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dchag.bench.comm import CommBytesMode
    from dchag.bench.measure import (
        count_flops,
        memory_tracker,
        module_forward_added,
        module_peak,
        tensor_bytes,
        tracker_peak,
    )
    from dchag.model import build_model
    from dchag.parallel import ParallelDims, build_mesh
    from dchag.parallel.construct import allocate, parameters_on_meta
    from dchag.parallel.parallelize import parallelize
    from dchag.train.loop import Layout, loss_and_gradients
    from dchag.train.optim import build_optimizer

    dims = ParallelDims.from_config(cfg.parallel)
    on_gpu = target == "cuda"
    with fake_process_group(dims.world_size, tp_rank), gpu_attention() if on_gpu else contextlib.nullcontext():
        mesh = build_mesh(dims, "cpu")
        with parameters_on_meta():
            model = build_model(cfg, init=False)
        plan = parallelize(model, cfg, mesh)  # on meta: channel shards, TP slices, FSDP shards
        noise = _mask_noise(cfg, plan, local_batch)  # real values: a CP rank's shapes depend on the mask
        # real index buffers become fake on use
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
        real_values = _visible_slots_of(cfg, plan, noise) if fake else contextlib.nullcontext()
        with real_values, _unseeded_strip_dropout() if fake else contextlib.nullcontext(), fake_mode:
            allocate(plan.model, torch.device("cpu"))
            layout = Layout(plan.model, plan)
            optimizer = build_optimizer(plan.model, cfg.train, foreach=True if on_gpu else None)
            # the state every step after the first starts from: gradients of the last step (every
            # parameter has one, see ParallelPlan.finish_gradients) and AdamW's moments
            for p in plan.model.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
            shapes = _batch_shapes(cfg, plan, local_batch)
            lat_weights = torch.ones(_rows(cfg, plan)) if cfg.train.task == "forecast" else None

            def step() -> None:
                batch = {k: torch.randn(shape) for k, shape in shapes.items()}
                step_noise = noise.clone() if noise is not None else None  # made in the step, as training does
                _, norm = loss_and_gradients(layout, optimizer, batch, cfg, lat_weights, step_noise)
                layout.clip(cfg.train.grad_clip, norm)
                optimizer.step()

            tracker = memory_tracker()
            tracker.track_external(plan.model, optimizer)
            rollout = _calls_in_one_step(tracker) if cfg.train.rollout_steps > 1 else contextlib.nullcontext()
            with CommBytesMode() as comm, tracker, rollout:
                flops = count_flops(step)
            peak = tracker_peak(tracker)
            front_end = plan.model.front_end
            front_end_peak = module_peak(tracker, front_end)
            state = [t for p in front_end.parameters() for t in (p, p.grad, *optimizer.state[p].values())]
            front_end_bytes = module_forward_added(tracker, front_end) + tensor_bytes(
                [_local(t) for t in state if isinstance(t, torch.Tensor)]
            )
            local = [_local(p) for p in plan.model.parameters()]
            tp_group, cp_group = str(plan.tp_group.group_name), cp_group_name(mesh)
            tp_bytes = sum(r["ring_bytes"] for r in comm.records if r["group"] == tp_group)
            cp_bytes = sum(r["ring_bytes"] for r in comm.records if r["group"] == cp_group)
            dp_bytes = sum(r["ring_bytes"] for r in comm.records if r["group"] not in (tp_group, cp_group))
            return RankTrace(
                tp_rank,
                peak,
                front_end_peak,
                front_end_bytes,
                tensor_bytes(local),
                flops,
                int(tp_bytes),
                int(dp_bytes),
                int(cp_bytes),
            )


@contextlib.contextmanager
def _calls_in_one_step(tracker):
    """Rollout training calls the model K times in one step. MemTracker takes a root module's second
    forward for the next iteration and refuses it; a submodule called several times in one iteration it
    tracks. Inside this context the model has a parent on the tracker's module stack (a name no module
    has, which the peak bookkeeping skips), so its K calls are tracked as one step's."""
    parents = tracker._mod_tracker.parents
    parents.add(_ROLLOUT_PARENT)
    try:
        yield
    finally:
        parents.discard(_ROLLOUT_PARENT)


_ROLLOUT_PARENT = "<rollout step>"


def _mask_noise(cfg, plan, local_batch: int) -> torch.Tensor | None:
    """An MAE step's mask noise [B, L] (seeded: every trace of a layout draws the same mask)."""
    if cfg.train.task != "mae":
        return None
    return torch.rand(local_batch, plan.model.num_patches, generator=torch.Generator().manual_seed(0))


@contextlib.contextmanager
def _visible_slots_of(cfg, plan, noise):
    """A context-parallel MAE rank pads its visible tokens to the most any strip holds, a number read
    from the mask (`context_parallel.visible_slots`), which fake tensors do not have: it is computed here
    from the step's real noise, as the rank computes it, and given to the traced step."""
    strip = getattr(plan, "strip", None)
    if noise is None or strip is None:
        yield
        return
    from dchag.parallel import context_parallel

    slots = context_parallel.strip_masking(noise, cfg.train.mask_ratio, strip).visible.shape[1]
    original = context_parallel.visible_slots
    context_parallel.visible_slots = lambda counts: slots
    try:
        yield slots
    finally:
        context_parallel.visible_slots = original


@contextlib.contextmanager
def _unseeded_strip_dropout():
    """A context-parallel rank's token dropout (`vit.StripDropout`, one strip) seeds its mask from a
    number drawn on the host, which fake tensors do not have; traced as plain dropout, which holds the
    same mask and output (the seed chooses which elements drop, not how much memory they take)."""
    import torch.nn.functional as F

    from dchag.model import vit

    original = vit.StripDropout.forward
    vit.StripDropout.forward = lambda self, x: F.dropout(x, self.p, self.training)
    try:
        yield
    finally:
        vit.StripDropout.forward = original


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _flash_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float, *streams) -> torch.Tensor:
    """Attention as GPUs run it (flash attention, dropout inside the kernel): saves the output and the
    log-sum-exp [B, H, L], never the [B, H, L, L] scores. (On CPU, torch takes the math path whenever
    dropout is on, which holds the scores; no GPU run does.) `streams`: `attend`'s dropout streams (and
    strips), which change which masks are drawn, not what is held."""
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout)
    return out


@contextlib.contextmanager
def gpu_attention():
    """Trace every ViT attention (`model.vit.attend`) as the flash-attention kernel."""
    from dchag.model import vit

    original = vit.attend
    vit.attend = _flash_attend
    try:
        yield
    finally:
        vit.attend = original
