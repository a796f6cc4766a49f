"""Functions the reliability tests run on every rank of a spawned gloo group (importable by the ranks)."""

from __future__ import annotations

from pathlib import Path

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
