"""The training loop (single process; distributed runs enter through `dchag.train.distributed`)."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from dchag.config import Config, to_dict
from dchag.data import batch_indices, build_source
from dchag.model import build_model
from dchag.tasks import compute_loss
from dchag.train.batches import check_finite
from dchag.train.checkpoint import save_atomic
from dchag.train.metrics import MetricsLog
from dchag.train.optim import build_optimizer, lr_at, set_lr


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device='cuda' but no CUDA device is visible; use train.device=cpu or auto")
    return torch.device(name)


def mask_noise_for_step(cfg: Config, step: int, batch: int, num_patches: int, dp_rank: int = 0) -> torch.Tensor:
    """MAE mask noise [B, L] from (seed, step, data-parallel rank): equal on TP peers, distinct across DP."""
    g = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + step * 4099 + dp_rank)
    return torch.rand(batch, num_patches, generator=g)


def autocast(cfg: Config, device: torch.device):
    if not cfg.train.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train(cfg: Config, out_dir: str | Path | None, *, progress: bool = True) -> dict:
    """Train the configured model on one device; returns the summary (also written to out_dir)."""
    out = Path(out_dir) if out_dir else None
    t = cfg.train
    device = pick_device(t.device)
    torch.manual_seed(t.seed)
    model = build_model(cfg).to(device)
    source = build_source(cfg)
    optimizer = build_optimizer(model, t)
    lat_weights = source.lat_weights().to(device) if t.task == "forecast" else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log = MetricsLog(out / "metrics.jsonl" if out else None)
    history: list[dict] = []
    start = time.perf_counter()
    bar = tqdm(range(t.steps), desc="train", disable=not progress, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    model.train()
    for step in bar:
        lr = lr_at(step, t)
        set_lr(optimizer, lr)
        indices = batch_indices(source.num_samples, t.batch_size, step, cfg.data.seed)
        batch = source.batch(indices)
        check_finite(batch, step, cfg.channels)
        batch = {k: v.to(device) for k, v in batch.items()}
        noise = mask_noise_for_step(cfg, step, t.batch_size, model.num_patches).to(device) if t.task == "mae" else None
        with autocast(cfg, device):
            loss, _ = compute_loss(model, batch, cfg, lat_weights=lat_weights, mask_noise=noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}; lower train.lr={t.lr} or enable train.grad_clip")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
        optimizer.step()
        if step % t.log_every == 0 or step == t.steps - 1:
            record = {
                "step": step,
                "loss": loss.item(),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "elapsed_s": round(time.perf_counter() - start, 3),
            }
            history.append(record)
            log.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if out is not None and t.checkpoint_every and (step + 1) % t.checkpoint_every == 0:
            save_atomic(checkpoint_state(model, cfg, step + 1), out / "checkpoint.pt")
    log.close()
    summary = {
        "steps": t.steps,
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "loss_ratio": history[-1]["loss"] / history[0]["loss"],
        "elapsed_s": round(time.perf_counter() - start, 2),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if out is not None:
        summary["checkpoint"] = str(save_atomic(checkpoint_state(model, cfg, t.steps), out / "checkpoint.pt"))
        (out / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


def checkpoint_state(model: torch.nn.Module, cfg: Config, step: int) -> dict:
    """Model weights in the logical single-device layout, the config that built them, and the step."""
    return {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": to_dict(cfg), "step": step}


def summary_line(summary: dict) -> str:
    return (
        f"done: {summary['steps']} steps in {summary['elapsed_s']:.1f}s, loss {summary['first_loss']:.4f} -> "
        f"{summary['final_loss']:.4f} ({summary['loss_ratio']:.2f}x of first)"
        + (f", checkpoint {summary['checkpoint']}" if "checkpoint" in summary else "")
    )
