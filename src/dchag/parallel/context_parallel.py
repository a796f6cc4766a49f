"""Context parallelism (CP): the ranks of a CP group share each sample, each holding a strip of patch rows.

The image's grid of G_h x G_w patches is split into `cp` contiguous strips of whole patch rows (uneven
when cp does not divide G_h: the first G_h % cp strips get one row more). CP rank j:

- reads its strip's pixel rows of the input (of its own channels under TP) and of the targets;
- tokenizes and aggregates them: the channel front end works patch by patch, so it runs unchanged on the
  strip, over the rank's TP group;
- adds its rows of the position embedding (`ChannelViT.token_slice`);
- runs the ViT blocks on its tokens [B, L_j, D] with attention over the whole sequence: each attention
  layer gathers every rank's keys and values (`KVExchange`: one all-gather forward, one reduce-scatter of
  their gradients backward, `collectives.gather_to_cp`). The gather and the attention are recomputed in
  backward (one more all-gather), so what a block keeps for backward is strip-sized: the whole
  sequence's keys and values exist only while one attention layer runs;
- predicts its strip (the forecast head and the MAE decoder work per token); the loss adds the strips'
  sums over the group (`StripLayout.sum_over_ranks`).

MAE: the mask is the single-device model's. Every rank holds the mask noise of its data-parallel rows for
the whole image, so it knows every strip's visible tokens: `StripMasker`, the model's `masking` hook,
keeps its own (padded to the group's largest count, so that the gather moves equal shapes) and orders the
gathered keys as one device orders its visible tokens. The decoder (`MAEDecoder.assemble`) builds its
strip's tokens (visible ones and mask tokens) and attends over every strip's decoder tokens the same way.

Parameters are sharded by FSDP2 over dp_shard x cp (`parallelize`); each rank computes its strip's part
of every gradient and FSDP2's reduce-scatter sums them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dchag.model import vit
from dchag.model.groups import split_sizes
from dchag.model.heads import MaskLayout, random_masking
from dchag.model.vit import Attention, StripDropout
from dchag.parallel.collectives import gather_to_cp, reduce_from_cp


def row_strips(grid_rows: int, cp: int) -> list[tuple[int, int]]:
    """The patch rows [start, stop) of each of `cp` contiguous strips: 5 rows, cp 2 -> [(0, 3), (3, 5)]."""
    bounds = [0]
    for n in split_sizes(grid_rows, cp):
        bounds.append(bounds[-1] + n)
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass
class StripLayout:
    """Where this CP rank's strip lies in the image, for the data it reads and the losses it adds up."""

    rank: int
    rows: list[tuple[int, int]]  # patch rows [start, stop) of every CP rank's strip
    grid_w: int  # patches per row
    patch: int
    group: object  # the CP process group

    @property
    def pixel_rows(self) -> slice:
        """This rank's rows of the image (inputs, targets, latitude weights)."""
        start, stop = self.rows[self.rank]
        return slice(start * self.patch, stop * self.patch)

    @property
    def tokens(self) -> slice:
        """This rank's patch tokens, in the row-major order of the whole image."""
        start, stop = self.rows[self.rank]
        return slice(start * self.grid_w, stop * self.grid_w)

    @property
    def token_counts(self) -> list[int]:
        return [(stop - start) * self.grid_w for start, stop in self.rows]

    @property
    def height(self) -> int:
        """Pixel rows of the whole image."""
        return self.rows[-1][1] * self.patch

    def sum_over_ranks(self, partial: torch.Tensor) -> torch.Tensor:
        """A loss's sums over every strip (all-reduce forward, identity backward)."""
        return reduce_from_cp(partial, self.group)


class KVExchange:
    """Attention of this rank's queries over the whole sequence (set as `Attention.kv_exchange`): the
    keys and values [B, H, n, e] of every rank, stacked, in one all-gather forward and one reduce-scatter
    of their gradients backward (`gather_to_cp`), over the CP group.

    Every rank contributes the same number of tokens to the gather (the padded largest count); `order`
    then picks the real tokens of the gathered [cp * n_max] in the order one device holds them: None when
    every rank holds n_max real ones, a static [L] for uneven strips, or per sample [B, L] (MAE's visible
    tokens, set for each forward by `StripMasker`). The keys are then exactly one device's, with no
    padding left, so attention needs no mask and any SDPA kernel applies.

    `recompute`: the gather and the attention run inside a (non-reentrant) activation checkpoint, so
    backward keeps only this rank's queries, keys and values and the attention's output (strip-sized),
    and gathers again (same inputs, same random state: the same keys and dropout masks on every rank).
    Off where the whole block is recomputed anyway (`parallel.activation_checkpointing`).
    """

    def __init__(self, group, counts: list[int] | None = None, recompute: bool = True):
        """`counts`: tokens each rank holds, for fixed strips; None when the caller pads (MAE)."""
        self.group, self.recompute = group, recompute
        self.n_max = max(counts) if counts else None
        self.order: torch.Tensor | None = None
        self._on_device: dict[torch.device, torch.Tensor] = {}
        if counts and len(set(counts)) > 1:  # uneven strips: drop each strip's padding
            self.order = torch.tensor([r * self.n_max + i for r, n in enumerate(counts) for i in range(n)])

    def set_order(self, order: torch.Tensor | None) -> None:
        self.order, self._on_device = order, {}

    def _order(self, device: torch.device) -> torch.Tensor | None:
        if self.order is None:
            return None
        if device not in self._on_device:
            self._on_device[device] = self.order.to(device)
        return self._on_device[device]

    def gather(self, k: torch.Tensor, v: torch.Tensor, order: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's keys and values [B, H, L, e], in one device's order, from this rank's [B, H, n, e]."""
        kv = torch.stack([k, v])  # [2, B, H, n, e]: one collective for both
        if self.n_max is not None and kv.shape[3] < self.n_max:  # a shorter strip: pad to equal shapes
            kv = F.pad(kv, (0, 0, 0, self.n_max - kv.shape[3]))
        every = gather_to_cp(kv, self.group, dim=3)  # [2, B, H, cp * n_max, e]
        if order is not None and order.dim() == 1:
            every = every.index_select(3, order)  # [2, B, H, L, e]
        elif order is not None:  # per sample [B, L]
            two, b, h, _, e = every.shape
            every = torch.gather(every, 3, order[None, :, None, :, None].expand(two, b, h, order.shape[1], e))
        return every[0], every[1]

    def _attend(self, q, k, v, order, dropout, streams, strips) -> torch.Tensor:
        k, v = self.gather(k, v, order)
        return vit.attend(q, k, v, dropout, streams, strips)  # [B, H, n, e]

    def __call__(self, q, k, v, dropout: float, streams, strips) -> torch.Tensor:
        """`vit.attend(q, k, v, ...)` with this rank's queries q [B, H, n, e] and every rank's keys and
        values (this rank's: k, v [B, H, n, e])."""
        order = self._order(k.device)
        args = (q, k, v, order, dropout, streams, strips)
        if self.recompute and torch.is_grad_enabled():
            return checkpoint(self._attend, *args, use_reentrant=False)
        return self._attend(*args)


@dataclass
class StripMasking(MaskLayout):
    """This rank's part of one MAE mask (the single-device `random_masking` of the whole image): the
    `MaskLayout` of its strip, whose `visible` are padded to the group's largest count `n_max` (0 as
    padding), and where the gathered keys of the visible tokens are."""

    key_order: torch.Tensor  # [B, L_keep] where each visible token, in one device's order, is in the gather


def visible_slots(counts: torch.Tensor) -> int:
    """How many visible tokens every rank holds (padded): the largest count of any strip and sample
    [B, cp], read on the host (one synchronisation per step; the shapes that follow depend on it)."""
    return int(counts.max())


def strip_masking(noise: torch.Tensor, ratio: float, strip: StripLayout) -> StripMasking:
    """The whole image's MAE mask from `noise` [B, L] (exactly one device's), as this rank holds it."""
    keep, _, mask = random_masking(noise, ratio)  # keep [B, L_keep]: positions, one device's order
    starts = torch.tensor([start * strip.grid_w for start, _ in strip.rows[1:]], device=keep.device)
    owner = torch.bucketize(keep.contiguous(), starts, right=True)  # [B, L_keep]: the strip of each token
    member = F.one_hot(owner, len(strip.rows))  # [B, L_keep, cp]
    slot = (member.cumsum(1) - 1).gather(2, owner[..., None])[..., 0]  # [B, L_keep]: order within its strip
    n_max = visible_slots(member.sum(1))
    mine = owner == strip.rank
    first = strip.tokens.start
    b = keep.shape[0]
    local = keep.new_zeros(b, n_max + 1)  # the last column collects the other strips' tokens
    local.scatter_(1, torch.where(mine, slot, n_max), torch.where(mine, keep - first, 0))
    slots = keep.new_full(noise.shape, n_max)  # [B, L]: masked positions read the mask token (slot n_max)
    slots.scatter_(1, keep, slot)
    return StripMasking(local[:, :n_max], slots[:, strip.tokens], mask[:, strip.tokens], owner * n_max + slot)


class StripMasker:
    """An MAE's `masking` hook on a CP rank (the single-device one is `heads.mask_layout`): this rank's
    part of the whole image's mask, and the encoder's key order for it."""

    def __init__(self, strip: StripLayout, encoder: KVExchange):
        self.strip, self.encoder = strip, encoder

    def __call__(self, noise: torch.Tensor, ratio: float) -> MaskLayout:
        """noise [B, L]: the whole image's (every rank of the group holds the same)."""
        layout = strip_masking(noise, ratio, self.strip)
        self.encoder.set_order(layout.key_order)
        return layout


def apply_context_parallel(model, cfg, cp_mesh) -> StripLayout:
    """Make the single-device `model` this CP rank's part, in place (attributes only: no parameter
    changes), and return its strip."""
    rank, group = cp_mesh.get_local_rank(), cp_mesh.get_group()
    grid_h, grid_w = model.grid
    strip = StripLayout(rank, row_strips(grid_h, cp_mesh.size()), grid_w, cfg.model.patch_size, group)
    model.token_slice = strip.tokens
    blocks_recomputed = cfg.parallel.activation_checkpointing  # the encoder's blocks (parallelize)
    if cfg.train.task == "forecast":
        exchange = KVExchange(group, strip.token_counts, recompute=not blocks_recomputed)
        for block in model.blocks:
            block.attn.kv_exchange = exchange
        set_dropout_strips(model, rank, (strip.token_counts[rank],))
        return strip
    encoder = KVExchange(group, recompute=not blocks_recomputed)
    decoder = KVExchange(group, strip.token_counts)
    for block in model.blocks:
        block.attn.kv_exchange = encoder
    for block in model.head.blocks:
        block.attn.kv_exchange = decoder
    model.masking = StripMasker(strip, encoder)
    model.sum_over_strips = strip.sum_over_ranks  # model.visible_norm: visible-pixel sums of the whole image
    return strip


def set_dropout_strips(model, first: int, sizes: tuple[int, ...]) -> None:
    """Draw every dropout mask of the model's token sequence per strip (`model.vit.attend`,
    `StripDropout`): a CP rank with (rank, (its token count,)), and the single-device reference of a
    cp-way layout with (0, every strip's token count), which then draws exactly the masks of that layout.
    Forecasting only: an MAE's encoder tokens are its visible ones, whose strips differ per sample."""
    for module in model.modules():
        if isinstance(module, StripDropout):
            module.strips = (first, tuple(sizes))
        elif isinstance(module, Attention):
            module.dropout_strips = (first, tuple(sizes))
