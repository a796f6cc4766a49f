"""Does the channel aggregation learn? The entropy of each hierarchy level's attention over channels.

A cross-attention level that never leaves uniform attention is an (expensive) average: its normalised
entropy stays 1.000 and its largest weight 1/n. `attention_entropy` reads the weights through the
reference (materializing) path, which computes the same function as the fused one.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def attention_entropy(model: torch.nn.Module, x: torch.Tensor) -> list[dict]:
    """For every cross-attention level of the single-device `model`'s hierarchy, on images x [B, C, H, W]:
    {level, kind, groups, entropy (mean normalised entropy: 1 = uniform, 0 = one channel), max_weight
    (mean largest weight), uniform_max_weight (1/n, averaged like max_weight)}. Groups of one member,
    whose attention is trivially 1, are left out of the means."""
    front = model.front_end
    index = None if front.index_is_identity else front.channel_index
    tokens = front.tokenizer(x, index)  # [B, C, L, D]
    rows = []
    for i, level in enumerate(front.hierarchy.levels):
        if level.kind == "cross_attention":
            attn = level.aggregator.attention(level.group(tokens), level.valid)  # [B, G, L, H, k, n]
            sizes = torch.tensor(level.sizes, dtype=attn.dtype)  # [G] members per group
            entropy = -(attn * attn.clamp_min(1e-30).log()).sum(-1)  # [B, G, L, H, k]
            keep = sizes > 1
            norm = sizes.clamp_min(2).log()[None, :, None, None, None]
            rows.append(
                {
                    "level": i,
                    "kind": level.kind,
                    "groups": level.groups,
                    "entropy": float((entropy / norm)[:, keep].mean()) if keep.any() else math.nan,
                    "max_weight": float(attn.amax(-1)[:, keep].mean()) if keep.any() else math.nan,
                    "uniform_max_weight": float((1 / sizes[keep]).mean()) if keep.any() else math.nan,
                }
            )
        tokens = level(tokens)
    return rows


def run_attention_entropy(run, samples: int = 8) -> list[dict]:
    """`attention_entropy` of a trained run's newest checkpoint on its first held-out samples (what
    `dchag eval` reports as "attention_entropy" and the accuracy sweep records per run)."""
    from dchag.data.held_out import held_out_source
    from dchag.eval.forecast import load_run

    cfg, model, stats = load_run(run)
    source, count = held_out_source(cfg, stats, samples)
    x = source.batch(list(range(min(samples, count))))["x"]  # [B, C, H, W]
    return attention_entropy(model, x)


def entropy_line(rows: list[dict]) -> str:
    """One line for the eval table: each cross-attention level's entropy (1.000 = uniform)."""
    if not rows:
        return "channel attention: no cross-attention level"
    parts = [
        f"level {r['level']} {r['entropy']:.3f} (max weight {r['max_weight']:.3f} vs {r['uniform_max_weight']:.3f})"
        for r in rows
    ]
    return "channel attention entropy (1.000 = uniform): " + "; ".join(parts)
