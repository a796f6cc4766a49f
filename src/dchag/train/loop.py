"""The training loop: one process, or one rank of a torchrun launch (layout from `parallel.*`).

`train.batch_size` is the global batch: each data-parallel rank takes batch_size / dp samples, so a config
trains the same model, on the same samples, at any parallel layout.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from dchag.config import Config, ConfigError, to_dict
from dchag.data import build_source
from dchag.data.held_out import held_out_source
from dchag.data.pipeline import step_batches
from dchag.data.row_strip import RowStrip
from dchag.model import build_model
from dchag.model.parts import Parts, freeze_parts, grad_norm_parts, part_square_sums
from dchag.tasks import compute_loss, mask_noise_for_step
from dchag.tasks.channel_subset import channel_keep_for_step
from dchag.tasks.held_out import held_out_loss
from dchag.train.checkpoint import load_checkpoint, read_stats, read_train_state, resolve_resume, save_checkpoint
from dchag.train.guards import BadSteps, decide, findings
from dchag.train.init_from import init_from, report_init
from dchag.train.metrics import MetricsLog
from dchag.train.optim import build_optimizer, lr_at, set_lr
from dchag.train.resume_check import check_resumable
from dchag.train.run_folder import check_out_dir, claim_run_folder, release_lock
from dchag.train.stats import prepare_stats


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
        n = cfg.parallel.tp * cfg.parallel.dp_shard * cfg.parallel.dp_replicate * cfg.parallel.cp
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
        model = build_model(cfg).to(device)
        freeze_parts(model, cfg.train.freeze)
        return cls(model)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        if self.plan is None:
            return float(value.detach())
        v = value.detach().float().clone()
        dist.all_reduce(v)
        return float(v) / dist.get_world_size()

    def rank0_says(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (for decisions taken on one rank's clock)."""
        if self.plan is None:
            return flag
        value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(value, src=0)
        return bool(value.item())

    @property
    def distributed(self) -> bool:
        return self.plan is not None

    def grad_norm(self) -> torch.Tensor:
        """Global gradient norm as a tensor (no host synchronisation)."""
        if self.plan is not None:
            return self.plan.grad_norm()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    def part_grad_norms(self, parts: Parts) -> torch.Tensor:
        """[P] float64: the gradient norm of each part of `parts` (name -> parameter-name prefixes), in
        its order, as the single-device model's gradients give it under any layout (no host sync)."""
        if self.plan is not None:
            return self.plan.part_grad_norms(parts)
        device = next(self.model.parameters()).device
        grads = ((n, p.grad, 0) for n, p in self.model.named_parameters() if p.grad is not None)
        return part_square_sums(grads, parts, 1, device)[:, 0].sqrt()

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


def train(
    cfg: Config,
    out_dir: str | Path | None,
    *,
    progress: bool = True,
    resume: str | None = None,
    overwrite: bool = False,
    resume_changed: bool = False,
) -> dict:
    """Train the configured model; returns the summary (also written to out_dir by rank 0).

    `resume`: "auto" continues from the newest complete checkpoint in out_dir (or starts fresh when there
    is none), a path continues from that checkpoint (or run folder), under any parallel layout; settings
    that would change the run's numbers are refused unless `resume_changed`. A folder that holds another
    run is refused unless `resume` or `overwrite` (see `run_folder`)."""
    out = Path(out_dir) if out_dir else None
    if launched_distributed():  # the run folder is claimed by rank 0 for all ranks
        from dchag.parallel.mesh import init_distributed

        init_distributed(cfg.parallel.timeout_s)
    if out is not None:
        check_out_dir(out)
        claim_run_folder(out, resume=resume, overwrite=overwrite)
    try:
        return _train(cfg, out, progress=progress, resume=resume, resume_changed=resume_changed)
    finally:
        if out is not None:
            release_lock(out)


@dataclass
class RunStart:
    """Where a run starts: fresh, or from a checkpoint."""

    begin: int = 0
    resume_from: Path | None = None
    skipped_steps: int = 0
    changes: list = field(default_factory=list)  # settings changed on resume (--resume-changed)


def _start(cfg: Config, layout: Layout, optimizer, out: Path | None, resume, resume_changed) -> RunStart:
    """Load the checkpoint `resume` names into the model and optimizer, after checking that it continues
    this run; a fresh start when there is none."""
    path = resolve_resume(resume, out)
    if path is None:
        return RunStart()
    state = read_train_state(path)
    changes = check_resumable(state, cfg, path, allow_changed=resume_changed)
    state = load_checkpoint(path, layout.model, layout.plan, optimizer)
    if layout.is_main:
        for key, old, new in changes:
            print(f"dchag: warning: --resume-changed: {key} {old!r} -> {new!r}", file=sys.stderr, flush=True)
        print(f"dchag: resuming from {path} at step {state['step']} of {cfg.train.steps}", file=sys.stderr, flush=True)
    return RunStart(state["step"], path, state.get("skipped_steps", 0), changes)


def _train(cfg: Config, out: Path | None, *, progress: bool, resume: str | None, resume_changed: bool) -> dict:
    t = cfg.train
    device = pick_device(t.device)
    torch.manual_seed(t.seed)  # the initial weights come from train.seed alone (model.init)
    layout = Layout.for_run(cfg, device)
    model, plan = layout.model, layout.plan
    steps = t.rollout_steps if t.task == "forecast" else 1
    source = build_source(cfg, channels=plan.input_channels if plan else None, rollout_steps=steps)
    source = strip_of(source, cfg, plan)  # context parallelism: this rank's rows of every image
    optimizer = build_optimizer(model, t)
    run = _start(cfg, layout, optimizer, out, resume, resume_changed)
    if run.resume_from is None and t.init_from:  # fine-tuning starts from these weights; a resume never does
        report = init_from(cfg, model, plan, t.init_from)
        if layout.is_main:
            report_init(report, out)
    saved = read_stats(run.resume_from) if run.resume_from is not None else None  # reused if the data match
    stats = prepare_stats(source, layout, out, saved=saved)
    write = out is not None and layout.is_main
    if write:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log = MetricsLog(out / "metrics.jsonl" if write else None, keep_before=run.begin)
    history: list[dict] = list(log.kept)
    bad = BadSteps(t.max_bad_steps)
    bad.count = run.skipped_steps  # the limit counts over the whole run
    start = time.perf_counter()
    saves = CheckpointClock(cfg, layout, out)
    validation = Validation(cfg, layout, stats)
    local_batch = t.batch_size // layout.dp_size
    lat_weights = source.lat_weights().to(device) if t.task == "forecast" else None
    rows = slice(layout.dp_rank * local_batch, (layout.dp_rank + 1) * local_batch)
    parts = grad_norm_parts(len(cfg.model.hierarchy.resolved_levels())) if t.log_grad_norms else None
    batches = step_batches(source, cfg.data, local_batch, layout.dp_rank, layout.dp_size, run.begin, t.steps)
    waited = 0.0  # seconds spent waiting for batches since the last metrics record
    train_state = {"config": to_dict(cfg), "channels": cfg.channels, "world_size": layout.world_size}
    checkpoint = None
    model.train()
    bar = _progress_bar(run.begin, t.steps, progress and layout.is_main)
    for step, batch in zip(bar, batches):
        waited += batches.last_wait_s
        seed_dropout(cfg, layout.dp_rank, step)
        lr = lr_at(step, t)
        set_lr(optimizer, lr)
        batch = {k: v.to(device) for k, v in batch.items() if k not in ("index", "worker")}
        keep = channel_keep_for_step(cfg, step, len(cfg.channels))  # train.channel_subset: [C] or None
        if keep is not None:  # the whole band subset on every rank; each applies its own channels' part
            batch["channel_keep"] = keep.to(device)
        noise = (
            mask_noise_for_step(cfg, step, t.batch_size, model.num_patches)[rows].to(device)
            if t.task == "mae"
            else None
        )
        regular_log = step % t.log_every == 0 or step == t.steps - 1
        loss, grad_norm = loss_and_gradients(layout, optimizer, batch, cfg, lat_weights, noise)
        # before clipping; every rank alike (the collectives), on the regular logging steps only
        part_norms = layout.part_grad_norms(parts) if parts and regular_log else None
        skipped = update(layout, optimizer, batch, cfg, step, loss, grad_norm, source.channels)
        if skipped:
            if layout.is_main:
                tqdm.write(f"dchag: skipped {skipped}", file=sys.stderr)
            bad.record(skipped)
        every = cfg.parallel.check_replicas_every
        if plan is not None and every and (step % every == 0 or step == t.steps - 1):
            plan.check_replicas(step)
        val_loss = validation.loss_if_due(step + 1)
        if regular_log or skipped or val_loss is not None:
            record = {
                "step": step,
                "loss": layout.mean_over_ranks(loss),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "elapsed_s": round(time.perf_counter() - start, 3),
                "data_wait_s": round(waited, 4),
                "skipped_steps": bad.count,
                **({"skipped": True} if skipped else {}),
                **({"val_loss": val_loss} if val_loss is not None else {}),
                **({"grad_norms": dict(zip(parts, part_norms.tolist()))} if part_norms is not None else {}),
            }
            waited = 0.0
            history.append(record)
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if saves.due(step + 1):
            state_now = {**train_state, "skipped_steps": bad.count}
            checkpoint = save_checkpoint(out, step + 1, model, plan, optimizer, state_now, stats, t.keep_checkpoints)
            saves.saved()
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
        **_run_facts(cfg, run, history, checkpoint, out),
    }
    if write:
        (out / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


def _run_facts(cfg: Config, run: RunStart, history: list[dict], checkpoint: Path | None, out: Path | None) -> dict:
    """The summary's optional part: where the run resumed and what changed, validation, the checkpoint."""
    facts: dict = {}
    if run.resume_from is not None:
        facts["resumed_from_step"] = run.begin
    facts.update(Validation.summary(history))
    if run.changes:
        facts["resume_changed"] = {k: {"checkpoint": old, "now": new} for k, old, new in run.changes}
    if checkpoint is not None:
        facts["checkpoint"] = str(checkpoint)
    if out is not None:
        facts["parameters"] = sum(p.numel() for p in build_model_meta(cfg).parameters())
    return facts


def _progress_bar(begin: int, steps: int, show: bool) -> tqdm:
    return tqdm(
        range(begin, steps),
        desc="train",
        initial=begin,
        total=steps,
        disable=not show,
        file=sys.stderr,
        mininterval=1.0,
        dynamic_ncols=True,
    )


class Validation:
    """`train.eval_every`: the loss on a fixed validation set (the held-out split, fixed masks and leads)
    under any layout, equal to what `dchag.eval.validation` computes for the same weights on one device.
    Each TP rank reads its own channels; the fixed chunks are dealt out to the data-parallel ranks."""

    CHUNK = 8  # samples per forward: fixed, so the masks and the numbers do not depend on the layout

    def __init__(self, cfg: Config, layout: Layout, stats: dict | None):
        self.cfg, self.layout = cfg, layout
        self.every = cfg.train.eval_every
        if self.every:
            plan = layout.plan
            channels = plan.input_channels if plan else None
            self.source, self.count = held_out_source(cfg, stats, cfg.train.eval_samples, channels)
            self.source = strip_of(self.source, cfg, plan)
            self.lat = self.source.lat_weights() if cfg.train.task == "forecast" else None

    def loss_if_due(self, done: int) -> float | None:
        if not self.every or not (done % self.every == 0 or done == self.cfg.train.steps):
            return None
        layout, plan = self.layout, self.layout.plan
        layout.model.eval()
        total, seen = held_out_loss(
            layout.model,
            self.cfg,
            self.source,
            self.count,
            self.CHUNK,
            self.lat,
            rank=layout.dp_rank,
            ranks=layout.dp_size,
            channel_shard=plan.channel_shard if plan else None,
            strip=plan.strip if plan else None,
        )
        layout.model.train()
        sums = torch.tensor([total, float(seen)], dtype=torch.float64)
        if plan is not None:  # TP peers hold the same sums: the ratio is unchanged by counting them too
            device = "cuda" if dist.get_backend() == "nccl" else "cpu"
            sums = sums.to(device)
            dist.all_reduce(sums)
        return float(sums[0] / sums[1])

    @staticmethod
    def summary(history: list[dict]) -> dict:
        """final_val_loss, best_val_loss and its step, when validation ran."""
        found = [r for r in history if "val_loss" in r]
        if not found:
            return {}
        best = min(found, key=lambda r: r["val_loss"])
        return {
            "final_val_loss": found[-1]["val_loss"],
            "best_val_loss": best["val_loss"],
            "best_val_step": best["step"],
        }


class CheckpointClock:
    """When to save: every `train.checkpoint_every` steps, whenever `train.checkpoint_every_minutes` have
    passed since the last save (so a long run always has something recent to resume from; read every
    `train.log_every` steps), and at the end. Rank 0's clock decides for every rank (one broadcast): a save
    is collective, and clocks differ between ranks."""

    def __init__(self, cfg: Config, layout: Layout, out: Path | None):
        self.t, self.layout, self.out = cfg.train, layout, out
        self.last = time.monotonic()

    def due(self, done: int) -> bool:
        t = self.t
        if self.out is None:
            return False
        if done == t.steps or (t.checkpoint_every and done % t.checkpoint_every == 0):
            return True
        if not t.checkpoint_every_minutes or done % t.log_every:  # the clock is read on logged steps only
            return False
        late = time.monotonic() - self.last >= 60.0 * t.checkpoint_every_minutes
        return self.layout.rank0_says(late)

    def saved(self) -> None:
        self.last = time.monotonic()


def build_model_meta(cfg: Config) -> torch.nn.Module:
    """The single-device model on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return build_model(cfg, init=False)  # shapes are all it is for


def strip_of(source, cfg: Config, plan):
    """The source as this rank reads it: under context parallelism its strip of rows of every image."""
    if plan is None or plan.strip is None:
        return source
    return RowStrip(source, plan.strip.pixel_rows, tuple(cfg.model.img_size))


def loss_and_gradients(layout: Layout, optimizer, batch: dict, cfg: Config, lat_weights, noise):
    """Forward, loss, backward and gradient finishing: (loss, global gradient norm), both tensors. Reads
    no value on the host, so the planner (`dchag.planning`) traces it on fake tensors."""
    model, plan = layout.model, layout.plan
    if optimizer is not None:  # the last step's gradients are spent: free them before the activations come
        optimizer.zero_grad(set_to_none=True)
    # the model's output is not kept (what backward needs, autograd holds): an MAE's loss may build its
    # error in the prediction's storage
    with autocast(cfg, batch["x"].device):
        loss, _ = compute_loss(
            model,
            batch,
            cfg,
            lat_weights=lat_weights,
            mask_noise=noise,
            channel_shard=plan.channel_shard if plan else None,
            dp_mean=plan.dp_mean if plan is not None and plan.dp_size > 1 else None,
            keep_output=False,
            strip=plan.strip if plan else None,
        )
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
    return loss, grad_norm, update(layout, optimizer, batch, cfg, step, loss, grad_norm, channels)


def update(layout: Layout, optimizer, batch: dict, cfg: Config, step: int, loss, grad_norm, channels):
    """The second half of `train_step`, on finished gradients: the failure decision shared by all ranks,
    then clipping and the optimizer step (none when `optimizer` is None). Returns None, or why the step
    was skipped (its gradients are then dropped). The loop reads its diagnostics between the halves."""
    skipped = decide(findings(batch, loss, grad_norm), step, channels, layout.model, distributed=layout.distributed)
    if skipped:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        return skipped
    layout.clip(cfg.train.grad_clip, grad_norm)
    if optimizer is not None:
        optimizer.step()
    return None


def summary_line(summary: dict) -> str:
    return (
        f"done: {summary['steps']} steps on {summary['ranks']} rank(s) in {summary['elapsed_s']:.1f}s, "
        f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f} ({summary['loss_ratio']:.2f}x of first)"
        + (f", checkpoint {summary['checkpoint']}" if "checkpoint" in summary else "")
    )
