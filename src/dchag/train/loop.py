"""The training loop: one process, or one rank of a torchrun launch (layout from `parallel.*`).

`train.batch_size` is the global batch: each data-parallel rank takes batch_size / dp samples, so a config
trains the same model, on the same samples, at any parallel layout.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from dchag.config import Config, ConfigError, to_dict
from dchag.data import build_source
from dchag.data.pipeline import step_batches
from dchag.model import build_model
from dchag.tasks import compute_loss, mask_noise_for_step
from dchag.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_stats,
    resolve_resume,
    save_checkpoint,
)
from dchag.train.guards import BadSteps, decide, findings
from dchag.train.metrics import MetricsLog
from dchag.train.optim import build_optimizer, lr_at, set_lr


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but no CUDA device is visible; use train.device=cpu or auto")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def seed_dropout(cfg: Config, dp_rank: int, step: int = 0) -> None:
    """Seed the global RNG (dropout) from (seed, data-parallel rank, step): TP peers draw the same masks,
    DP ranks differ, and a run resumed at any step draws what the uninterrupted run drew (the random
    state is a function of the step, so a checkpoint needs none)."""
    torch.manual_seed(cfg.train.seed + 7919 * (dp_rank + 1) + 1_000_003 * step)


def autocast(cfg: Config, device: torch.device):
    if not cfg.train.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or dist.is_initialized()


class Layout:
    """What the loop needs of the parallel layout: a `ParallelPlan`, or None for one process."""

    def __init__(self, model: torch.nn.Module, plan=None):
        self.model, self.plan = model, plan
        self.rank = dist.get_rank() if plan is not None else 0
        self.dp_rank, self.dp_size = (plan.dp_rank, plan.dp_size) if plan is not None else (0, 1)

    @classmethod
    def for_run(cls, cfg: Config, device: torch.device) -> "Layout":
        """The model of this run: on several ranks (torchrun) each builds only its own shards
        (`parallel.construct`), never the whole model; on one process the single-device model."""
        n = cfg.parallel.tp * cfg.parallel.dp_shard * cfg.parallel.dp_replicate
        if launched_distributed():
            from dchag.parallel import ParallelDims, build_mesh
            from dchag.parallel.construct import build_parallel_model
            from dchag.parallel.mesh import init_distributed

            init_distributed(cfg.parallel.timeout_s)
            mesh = build_mesh(ParallelDims.from_config(cfg.parallel), device.type)
            plan = build_parallel_model(cfg, mesh, device)
            return cls(plan.model, plan)
        if n > 1:
            raise ConfigError(
                f"parallel.* asks for {n} ranks; launch with: torchrun --nproc-per-node {n} -m dchag train ..."
            )
        return cls(build_model(cfg).to(device))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.plan is None:
            return float(value.detach())
        v = value.detach().float().clone()
        dist.all_reduce(v)
        return float(v) / dist.get_world_size()

    @property
    def distributed(self) -> bool:
        return self.plan is not None

    def grad_norm(self) -> torch.Tensor:
        """Global gradient norm as a tensor (no host synchronisation)."""
        if self.plan is not None:
            return self.plan.grad_norm()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    def clip(self, max_norm: float, norm: torch.Tensor) -> None:
        if max_norm <= 0:
            return
        if self.plan is not None:
            self.plan.clip_grad_norm_(max_norm, norm)
        else:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), max_norm, norm, foreach=True)

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.plan is not None else 1


def train(cfg: Config, out_dir: str | Path | None, *, progress: bool = True, resume: str | None = None) -> dict:
    """Train the configured model; returns the summary (also written to out_dir by rank 0).

    `resume`: "auto" continues from the newest complete checkpoint in out_dir (or starts fresh when there
    is none), a path continues from that checkpoint (or run folder), under any parallel layout."""
    out = Path(out_dir) if out_dir else None
    if out is not None:
        check_out_dir(out)
    t = cfg.train
    device = pick_device(t.device)
    torch.manual_seed(t.seed)  # the initial weights come from train.seed alone (model.init)
    layout = Layout.for_run(cfg, device)
    model, plan = layout.model, layout.plan
    source = build_source(cfg, channels=plan.input_channels if plan else None)
    optimizer = build_optimizer(model, t)
    resume_from = resolve_resume(resume, out)
    begin = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, plan, optimizer)
        check_resumable(state, cfg, resume_from)
        begin = state["step"]
        source.stats = stats = read_stats(resume_from)
        if stats is None:
            stats = prepare_stats(source, layout, out)
        elif out is not None and layout.is_main:  # check_out_dir created the run folder
            (out / "stats.json").write_text(json.dumps(stats))
    else:
        stats = prepare_stats(source, layout, out)
    local_batch = t.batch_size // layout.dp_size
    lat_weights = source.lat_weights().to(device) if t.task == "forecast" else None
    write = out is not None and layout.is_main
    if write:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log = MetricsLog(out / "metrics.jsonl" if write else None, keep_before=begin)
    history: list[dict] = list(log.kept)
    if resume_from is not None and layout.is_main:
        print(f"dchag: resuming from {resume_from} at step {begin} of {t.steps}", file=sys.stderr, flush=True)
    bad = BadSteps(t.max_bad_steps)
    if resume_from is not None:
        bad.count = state.get("skipped_steps", 0)  # the limit counts over the whole run
    start = time.perf_counter()
    bar = tqdm(
        range(begin, t.steps),
        desc="train",
        initial=begin,
        total=t.steps,
        disable=not (progress and layout.is_main),
        file=sys.stderr,
        mininterval=1.0,
        dynamic_ncols=True,
    )
    model.train()
    rows = slice(layout.dp_rank * local_batch, (layout.dp_rank + 1) * local_batch)
    batches = step_batches(source, cfg.data, local_batch, layout.dp_rank, layout.dp_size, begin, t.steps)
    waited = 0.0  # seconds spent waiting for batches since the last metrics record
    train_state = {"config": to_dict(cfg), "channels": cfg.channels, "world_size": layout.world_size}
    checkpoint = None
    for step, batch in zip(bar, batches):
        waited += batches.last_wait_s
        seed_dropout(cfg, layout.dp_rank, step)
        lr = lr_at(step, t)
        set_lr(optimizer, lr)
        batch = {k: v.to(device) for k, v in batch.items() if k not in ("index", "worker")}
        noise = (
            mask_noise_for_step(cfg, step, t.batch_size, model.num_patches)[rows].to(device)
            if t.task == "mae"
            else None
        )
        loss, grad_norm, skipped = train_step(layout, optimizer, batch, cfg, step, lat_weights, noise, source.channels)
        if skipped:
            if layout.is_main:
                tqdm.write(f"dchag: skipped {skipped}", file=sys.stderr)
            bad.record(skipped)
        every = cfg.parallel.check_replicas_every
        if plan is not None and every and (step % every == 0 or step == t.steps - 1):
            plan.check_replicas(step)
        if step % t.log_every == 0 or step == t.steps - 1 or skipped:
            record = {
                "step": step,
                "loss": layout.mean_over_ranks(loss),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "elapsed_s": round(time.perf_counter() - start, 3),
                "data_wait_s": round(waited, 4),
                "skipped_steps": bad.count,
            }
            if skipped:
                record["skipped"] = True
            waited = 0.0
            history.append(record)
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        done = step + 1
        if out is not None and (done == t.steps or (t.checkpoint_every and done % t.checkpoint_every == 0)):
            state_now = {**train_state, "skipped_steps": bad.count}
            checkpoint = save_checkpoint(out, done, model, plan, optimizer, state_now, stats, t.keep_checkpoints)
    log.close()
    summary = {
        "steps": t.steps,
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "loss_ratio": history[-1]["loss"] / history[0]["loss"],
        "elapsed_s": round(time.perf_counter() - start, 2),
        "data_wait_s": round(batches.total_wait_s, 3),
        "ranks": layout.world_size,
        "skipped_steps": bad.count,
    }
    if resume_from is not None:
        summary["resumed_from_step"] = begin
    if checkpoint is not None:
        summary["checkpoint"] = str(checkpoint)
    if out is not None:
        summary["parameters"] = sum(p.numel() for p in build_model_meta(cfg).parameters())
        if write:
            (out / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


def check_out_dir(out: Path) -> None:
    """The run folder exists (created if needed) and is writable, before any work is done."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder for the run")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the run folder --out {str(out)!r}: {err.strerror or err}") from None
    probe = out / f".dchag-write-probe-{os.getpid()}"
    try:  # a real write: permission bits say nothing for root or read-only mounts
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            f"the run folder --out {str(out)!r} is not writable ({err.strerror or err}); choose another folder"
        ) from None


def build_model_meta(cfg: Config) -> torch.nn.Module:
    """The single-device model on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return build_model(cfg)


def check_resumable(state: dict, cfg: Config, path: Path) -> None:
    """The checkpoint must come from the same channels and still have steps left to train."""
    saved = state.get("channels")
    if saved is not None and list(saved) != list(cfg.channels):
        differ = next(
            (i for i, (a, b) in enumerate(zip(saved, cfg.channels)) if a != b), min(len(saved), len(cfg.channels))
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} was trained on {len(saved)} channels, this config gives {len(cfg.channels)} "
            f"(first difference at position {differ}); resume with the same data.channels"
        )
    if state["step"] >= cfg.train.steps:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is at step {state['step']}, and train.steps={cfg.train.steps}: nothing is "
            "left to train; raise train.steps to continue"
        )


def loss_and_gradients(layout: Layout, optimizer, batch: dict, cfg: Config, lat_weights, noise):
    """Forward, loss, backward and gradient finishing: (loss, global gradient norm), both tensors. Reads
    no value on the host, so the planner (`dchag.planning`) traces it on fake tensors."""
    model, plan = layout.model, layout.plan
    with autocast(cfg, batch["x"].device):
        loss, _ = compute_loss(
            model,
            batch,
            cfg,
            lat_weights=lat_weights,
            mask_noise=noise,
            channel_shard=plan.channel_shard if plan else None,
        )
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    (loss / layout.dp_size).backward()  # gradients are summed over DP ranks: this makes them a mean
    if plan is not None:
        plan.finish_gradients()
    return loss, layout.grad_norm()


def train_step(layout: Layout, optimizer, batch: dict, cfg: Config, step: int, lat_weights, noise, channels):
    """Forward, backward, gradient finishing, one failure decision shared by all ranks, clipping and the
    optimizer step (skipped when `optimizer` is None). Returns (loss, gradient norm before clipping,
    None or why the step was skipped), loss and norm as tensors: nothing here waits for the device
    except the failure decision."""
    loss, grad_norm = loss_and_gradients(layout, optimizer, batch, cfg, lat_weights, noise)
    skipped = decide(findings(batch, loss, grad_norm), step, channels, layout.model, distributed=layout.distributed)
    if skipped:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, skipped
    layout.clip(cfg.train.grad_clip, grad_norm)
    if optimizer is not None:
        optimizer.step()
    return loss, grad_norm, None


def prepare_stats(source, layout: Layout, out: Path | None) -> dict | None:
    """Normalisation statistics for file-backed sources: read from `out/stats.json` when the run folder
    has them, else streamed from the training split (each rank its own channels, merged over all
    ranks) and written there by rank 0. Sets them on the source; None for synthetic sources."""
    if not hasattr(source, "compute_stats"):
        return None
    path = out / "stats.json" if out is not None else None
    stats = json.loads(path.read_text()) if path is not None and path.is_file() else None
    needed = set(source.channels) | set(source.out_channels)
    reuse = (
        stats is not None and needed <= set(stats["channels"]) and set(source.out_channels) <= set(stats["climatology"])
    )
    if layout.distributed:  # every rank decides the same way, before rank 0 may write a new file
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces device tensors only
        flag = torch.tensor([int(reuse)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        reuse = bool(flag)
    if not reuse:
        stats = source.compute_stats(climatology=source.out_channels)
        if layout.distributed:
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, stats)
            stats = {part: {k: v for s in everyone for k, v in s[part].items()} for part in ("channels", "climatology")}
        if path is not None and layout.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(stats))
    source.stats = stats
    return stats


def summary_line(summary: dict) -> str:
    return (
        f"done: {summary['steps']} steps on {summary['ranks']} rank(s) in {summary['elapsed_s']:.1f}s, "
        f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} ({summary['loss_ratio']:.2f}x of first)"
        + (f", checkpoint {summary['checkpoint']}" if "checkpoint" in summary else "")
    )
