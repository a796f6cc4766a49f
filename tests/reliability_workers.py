"""Functions the reliability tests run on every rank of a spawned gloo group (importable by the ranks)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from dist_workers import SMALL_MODEL

from dchag.configure import load_config
from dchag.train.metrics import read_metrics

# 12 channels in 4 level-1 groups: dchag places whole groups at tp 2 and at tp 4
RESUME_MODEL = SMALL_MODEL + [
    "data.channels=12",
    "model.hierarchy.groups=4",
    "train.batch_size=4",
    "train.steps=8",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.checkpoint_every=4",
    "train.grad_clip=0.05",  # clipping engaged in every step
    "data.workers=0",
]


def resume_config(*overrides: str):
    return load_config(None, RESUME_MODEL + list(overrides))


def losses(run: str | Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run) / "metrics.jsonl")}


def train_and_resume_same_layout(root: str, layout: list[str]) -> dict:
    """Uninterrupted run (dropout on) with a checkpoint at step 4, then a second run resumed from that
    checkpoint under the same layout; also the extra bytes the step-4 save allocated on this rank."""
    from dchag.bench.measure import peak_tensor_memory
    from dchag.train import checkpoint as ckpt
    from dchag.train.loop import train

    cfg = resume_config(*layout, "model.drop_rate=0.1", "model.embed_dim=96")
    measured: dict = {}
    original_save = ckpt.save_checkpoint

    def measuring_save(run, step, model, plan, optimizer, *args, **kwargs):
        if step != 4:
            return original_save(run, step, model, plan, optimizer, *args, **kwargs)
        tensors = ckpt.checkpoint_tensors(model, plan, optimizer)
        own = [c.local for shards in tensors.values() if hasattr(shards, "chunks") for c in shards.chunks]
        whole = sum(v.size().numel() * 4 for v in tensors.values())  # fp32: every logical tensor, in full
        result = {}
        extra = peak_tensor_memory(
            lambda: result.setdefault("path", original_save(run, step, model, plan, optimizer, *args, **kwargs))
        )
        measured.update(
            extra_bytes=extra,
            own_bytes=sum(t.numel() * t.element_size() for t in own),
            whole_bytes=whole,
        )
        return result["path"]

    import dchag.train.loop as loop

    loop.save_checkpoint = measuring_save
    try:
        train(cfg, f"{root}/full", progress=False)
    finally:
        loop.save_checkpoint = original_save
    train(cfg, f"{root}/resumed", progress=False, resume=f"{root}/full/checkpoints/step-00000004")
    return {"measured": measured, "full": losses(f"{root}/full"), "resumed": losses(f"{root}/resumed")}


def train_without_dropout(root: str, layout: list[str]) -> dict:
    """The uninterrupted fp32 run (no dropout: masks depend on the layout) that other layouts resume."""
    from dchag.train.loop import train

    train(resume_config(*layout), f"{root}/base", progress=False)
    return losses(f"{root}/base")


def resume_under(root: str, layout: list[str], name: str) -> dict:
    from dchag.train.loop import train

    train(resume_config(*layout), f"{root}/{name}", progress=False, resume=f"{root}/base/checkpoints/step-00000004")
    return losses(f"{root}/{name}")


def dp2_tp2_suite(root: str) -> dict:
    """Everything the 4-rank resume test needs from the dp_shard 2 x tp 2 layout, in one launch."""
    layout = ["parallel.tp=2", "parallel.dp_shard=2"]
    same = train_and_resume_same_layout(root, layout)
    dist.barrier()
    base = train_without_dropout(root, layout)
    return {**same, "base": base, "rank": dist.get_rank()}


def tp4_resume(root: str) -> dict:
    return resume_under(root, ["parallel.tp=4"], "tp4")


def sharded_construction(*overrides: str, ref_seed: int | None = None) -> dict:
    """Build this rank's model shard by shard; its logical weights, and the exact peak tensor memory of
    building against the rank's own parameters and the largest logical parameter."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from dchag.model import build_model
    from dchag.parallel.construct import build_parallel_model
    from dchag.parallel.mesh import ParallelDims, build_mesh
    from dchag.parallel.state import logical_state_dict

    cfg = resume_config(*overrides)
    mesh = build_mesh(ParallelDims.from_config(cfg.parallel), "cpu")
    tracker = MemTracker()
    with tracker:
        plan = build_parallel_model(cfg, mesh, torch.device("cpu"))
        kept = tracker.get_tracker_snapshot("current")  # what the rank keeps: parameters, buffers, bookkeeping

    def cpu(snapshot) -> int:
        return max(v["Total"] for dev, v in snapshot.items() if str(dev) != "meta")

    peak, kept = cpu(tracker.get_tracker_snapshot("peak")), cpu(kept)

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    own = sum(local(p).numel() * local(p).element_size() for p in plan.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in plan.model.buffers())
    ref_cfg = cfg if ref_seed is None else resume_config(*overrides, f"train.seed={ref_seed}")
    reference = build_model(ref_cfg).state_dict()
    largest = max(v.numel() * v.element_size() for v in reference.values())
    got = logical_state_dict(plan)
    equal = sorted(k for k, v in reference.items() if torch.equal(got[k], v))
    return {
        "peak": peak,
        "kept": kept,
        "own": own,
        "buffers": buffers,
        "largest": largest,
        "whole": sum(v.numel() * v.element_size() for v in reference.values()),
        "equal": len(equal),
        "total": len(reference),
        "differ": sorted(set(reference) - set(equal))[:5],
    }


def sharded_construction_suite() -> dict:
    """Three 4-rank layouts built shard by shard, and one built with another seed (the check must fail)."""
    layouts = {
        "dp2-tp2-dchag-C-forecast": ["parallel.tp=2", "parallel.dp_shard=2"],
        "tp4-dchag-L-mae": ["parallel.tp=4", "train.task=mae", "data.kind=synthetic-hyperspectral",
                            "model.hierarchy.preset=dchag-L"],
        "tp4-replicated": ["parallel.tp=4", "parallel.mode=replicated"],
    }  # fmt: skip
    results = {name: sharded_construction(*layout, "model.embed_dim=96") for name, layout in layouts.items()}
    results["other-seed"] = sharded_construction("parallel.tp=4", "model.embed_dim=96", "train.seed=1", ref_seed=0)
    return results
