"""The named top-level parts of `ChannelViT` (front_end, pos_embed, lead_embed, blocks, norm, head) that
fine-tuning addresses: `train.freeze` leaves parts untrained, `train.lr_scale` gives them their own
learning rate. A parameter belongs to the part its name starts with, under any parallel layout
(tensor parallelism and FSDP2 keep the single-device names' first component)."""

from __future__ import annotations

from torch import nn


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
