"""Parameter counts and FLOPs of a configured model, computed on the meta device (no memory needed)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from dchag.model import build_model


def meta_batch(cfg, batch_size: int, device: str | torch.device = "meta") -> dict:
    h, w = cfg.model.img_size
    batch = {"x": torch.empty(batch_size, len(cfg.channels), h, w, device=device)}
    if cfg.train.task == "forecast":
        batch["lead_hours"] = torch.full((batch_size,), 24.0, device=device)
    return batch


def forward_flops(model: torch.nn.Module, batch: dict) -> tuple[int, dict[str, int]]:
    """Total forward FLOPs and FLOPs per top-level module (front_end, blocks, head, ...)."""
    counter = FlopCounterMode(display=False)
    with counter:
        if "lead_hours" in batch:
            model(batch["x"], batch["lead_hours"])
        else:
            model(batch["x"], mask_noise=torch.rand(batch["x"].shape[0], model.num_patches, device=batch["x"].device))
    # counts are per module path ("ChannelViT.blocks.0.attn", ...), parents including children: sum the
    # shallowest entries under each top-level child (blocks.0, blocks.1, ... for the ModuleList "blocks")
    by_child: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for name, counts in counter.get_flop_counts().items():
        parts = name.split(".")
        if len(parts) >= 2:
            by_child[parts[1]][len(parts)] += sum(counts.values())
    per_module = {child: depths[min(depths)] for child, depths in by_child.items()}
    return counter.get_total_flops(), per_module


def parameter_table(model: torch.nn.Module) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for name, param in model.named_parameters():
        parts = name.split(".")
        if parts[0] != "front_end":
            key = parts[0]
        elif parts[1] == "hierarchy":  # one row per level
            key = ".".join(parts[:4])
        else:
            key = ".".join(parts[:2])
        counts[key] += param.numel()
    return dict(counts)


def model_info(cfg, batch_size: int = 1) -> dict:
    with torch.device("meta"):
        model = build_model(cfg)
    total, per_module = forward_flops(model, meta_batch(cfg, batch_size))
    h, w = cfg.model.img_size
    tokens = len(cfg.channels) * (h // cfg.model.patch_size) * (w // cfg.model.patch_size) * cfg.model.embed_dim
    return {
        "channels": len(cfg.channels),
        "levels": [(lvl.kind, len(lvl.sizes), lvl.tokens) for lvl in model.front_end.hierarchy.levels],
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameters_by_part": parameter_table(model),
        "batch_size": batch_size,
        "forward_flops": total,
        "forward_flops_by_part": per_module,
        "channel_tokens_bytes_fp32": tokens * batch_size * 4,
    }


def format_info(info: dict) -> str:
    lines = [
        f"channels: {info['channels']}",
        "hierarchy levels (kind, groups, tokens/group): " + ", ".join(map(str, info["levels"])),
    ]
    lines.append(f"parameters: {info['parameters']:,}")
    for part, n in info["parameters_by_part"].items():
        lines.append(f"  {part:<32} {n:>15,}")
    lines.append(f"forward FLOPs (batch {info['batch_size']}): {info['forward_flops']:.4g}")
    for part, n in info["forward_flops_by_part"].items():
        lines.append(f"  {part:<32} {n:>15.4g}  ({n / max(info['forward_flops'], 1):.1%})")
    lines.append(f"per-channel tokens [B, C, L, D] in fp32: {info['channel_tokens_bytes_fp32'] / 2**20:,.1f} MiB")
    return "\n".join(lines)
