"""The named top-level parts of `ChannelViT` (front_end, pos_embed, lead_embed, blocks, norm, head) that
fine-tuning addresses: `train.freeze` leaves parts untrained, `train.lr_scale` gives them their own
learning rate. A parameter belongs to the part its name starts with, under any parallel layout
(tensor parallelism and FSDP2 keep the single-device names' first component).

The gradient-norm diagnostic (`train.log_grad_norms`) reports finer parts, by single-device name prefix:
the tokenizer and each aggregation level apart (`grad_norm_parts`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from dchag.config import MODEL_PARTS


def part_of(name: str) -> str:
    """The part a parameter belongs to: front_end.tokenizer.weight -> front_end, pos_embed -> pos_embed."""
    return name.split(".", 1)[0]


def freeze_parts(model: nn.Module, parts) -> None:
    """Stop gradients for every parameter of `parts` (names checked by the config). A layout calls this
    before FSDP2 wraps the model, so each rank's local parameters carry the flag that FSDP2 shards."""
    frozen = set(parts)
    if not frozen:
        return
    for name, param in model.named_parameters():
        if part_of(name) in frozen:
            param.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# gradient norms per part (train.log_grad_norms): which part of the model the gradient flows into

Parts = Mapping[str, Sequence[str]]  # part name -> prefixes of single-device parameter names


def grad_norm_parts(levels: int) -> dict[str, tuple[str, ...]]:
    """The parts `train.log_grad_norms` reports, by single-device parameter name: the tokenizer (level 0),
    each aggregation level `level1`..`level{levels}` (hierarchy.levels.0 is level 1, as in the docs),
    the ViT `blocks`, the `head`, and `other` (position / lead-time embeddings, final norm). They cover
    every parameter once, so their squares sum to the square of the clipping norm."""
    parts: dict[str, tuple[str, ...]] = {"tokenizer": ("front_end.tokenizer",)}
    for i in range(levels):
        parts[f"level{i + 1}"] = (f"front_end.hierarchy.levels.{i}",)
    parts["blocks"], parts["head"] = ("blocks",), ("head",)
    parts["other"] = tuple(p for p in MODEL_PARTS if p not in ("front_end", "blocks", "head"))
    return parts


def in_part(name: str, prefixes: Sequence[str]) -> bool:
    """Whether parameter `name` is under one of `prefixes` (whole name components: levels.1 is not
    levels.10; the prefix "" holds every parameter)."""
    return any(not p or name == p or name.startswith(p + ".") for p in prefixes)


def part_square_sums(
    grads: Iterable[tuple[str, torch.Tensor, int]], parts: Parts, kinds: int, device: torch.device
) -> torch.Tensor:
    """[P, kinds] float64: per part (in `parts`' order) and per kind, the sum of the squared elements
    of the gradients `grads` (single-device name, local gradient, kind). The kind says how a caller must
    reduce the sum across ranks (`ParallelPlan` buckets by FSDP and TP split; one process has one kind),
    so that all parts' sums go through one pair of collectives. A parameter may be in several parts.
    One foreach kernel per non-empty (part, kind) bucket; no host synchronisation."""
    names = list(parts)
    prefixes = [(parts[n],) if isinstance(parts[n], str) else tuple(parts[n]) for n in names]
    buckets: dict[tuple[int, int], list[torch.Tensor]] = {}
    for name, grad, kind in grads:
        for i, pre in enumerate(prefixes):
            if in_part(name, pre):
                buckets.setdefault((i, kind), []).append(grad.detach())
    sums = torch.zeros(len(names), kinds, dtype=torch.float64, device=device)
    for (i, kind), tensors in buckets.items():
        norms = torch._foreach_norm(tensors)
        sums[i, kind] = torch.stack(norms).to(device, torch.float64).square().sum()
    return sums
