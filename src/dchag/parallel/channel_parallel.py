"""Channel parallelism for the front end: place channel groups on TP ranks and insert the D-CHAG gather.

Given the single-device `FrontEnd` and a TP group of T ranks, `ParallelFrontEnd` holds on rank r only
what r needs:

    dchag       rank r tokenizes its block of channels (whole level-1 groups), runs level 1 (and any
                further level whose groups stay inside one rank) on them, all-gathers the few partial
                tokens per patch, then runs the remaining levels; the last level is head-parallel.
    naive       rank r tokenizes its block of channels, all-gathers the raw channel tokens, then runs the
                whole hierarchy (the paper's ablation: the gather moves [B, C, L, D]).
    replicated  every rank tokenizes all channels and runs every level except the head-parallel last
                one (the paper's TP-only baseline).

Every parameter keeps a `ShardSpec` saying where it lives in the single-device model, so gradients and
checkpoints can be put back into the logical layout (`dchag.parallel.state`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dchag.config import ConfigError
from dchag.model.front_end import FrontEnd, check_channel_keep, drop_channels, tokenize_and_aggregate
from dchag.model.groups import split_sizes
from dchag.model.hierarchy import HierarchyLevel, groups_valid
from dchag.parallel.collectives import copy_to_tp, gather_from_tp, gather_to_tp, reduce_from_tp


@dataclass
class ShardSpec:
    """Where a local parameter lives in the single-device model.

    `dim`/`indices`: this rank holds `logical.index_select(dim, indices)`; `dim is None`: the whole tensor.
    `partial_grad`: every TP rank computes only part of this (replicated) parameter's gradient; the
    parts must be summed over TP after backward.
    `tp_disjoint`: TP ranks hold different elements (sum them for a norm); False when every rank holds
    the same slice (the replicated baseline's tokenizer).
    `pad_dim`: along this dimension the rank's tensor may be narrower than the logical one and holds its
    leading slots only; the logical slots beyond are padding of uneven groups (a linear level's weight
    [G, k, n_max] is as wide as the level's largest group, a rank's as its own largest group). The
    single-device model holds that padding as zeros that get no gradient, so no rank needs to hold it.
    """

    logical_name: str
    dim: int | None = None
    indices: torch.Tensor | None = None
    partial_grad: bool = False
    tp_disjoint: bool = True
    pad_dim: int | None = None


@dataclass
class ChannelPlacement:
    """Which channels each TP rank tokenizes and which hierarchy levels run on it alone."""

    mode: str
    channel_ranges: list[tuple[int, int]]  # per rank [start, stop) of the input channels it receives
    local_levels: int  # leading hierarchy levels that run rank-locally
    level_group_ranges: list[list[tuple[int, int]]] = field(default_factory=list)  # [level][rank] -> groups
    gathered_counts: list[int] = field(default_factory=list)  # tokens per rank moved by the gather; [] = none


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    """[2, 1, 3] -> [(0, 2), (2, 3), (3, 6)]."""
    bounds = [0, *accumulate(sizes)]
    return list(zip(bounds[:-1], bounds[1:]))


@dataclass(frozen=True)
class KnobNames:
    """How placement errors name the settings, in the words of whoever asked for the placement: dchag's
    config (`CONFIG_NAMES`) or the Python API (`dchag.parallelize_front_end`). `{tp}` is filled in."""

    tp: str  # the TP size
    dchag: str  # who asks for the D-CHAG placement
    groups: str  # the fix for fewer level-1 groups than ranks
    heads: str  # the fix for aggregator heads that do not split over the ranks
    flat: str  # what to do instead with a one-level hierarchy


CONFIG_NAMES = KnobNames(
    tp="parallel.tp={tp}",
    dchag="parallel.mode=dchag",
    groups="set model.hierarchy.groups >= {tp}",
    heads="set model.hierarchy.heads (default model.num_heads) to a multiple of {tp}",
    flat="use parallel.mode=replicated or naive",
)


def place_channels(front_end: FrontEnd, tp: int, mode: str, names: KnobNames = CONFIG_NAMES) -> ChannelPlacement:
    """Decide the placement; raises a one-line error, worded by `names`, when the hierarchy cannot be
    split this way."""
    levels = list(front_end.hierarchy.levels)
    channels = len(front_end.channel_index)
    size = names.tp.format(tp=tp)
    last = levels[-1]
    if tp > 1 and last.kind == "cross_attention" and last.aggregator.heads % tp:  # see HeadParallelLevel
        raise ConfigError(
            f"the last aggregation level has {last.aggregator.heads} heads, not divisible by {size}: "
            + names.heads.format(tp=tp)
        )
    if mode == "replicated" or tp == 1 and mode != "dchag":
        return ChannelPlacement(mode, [(0, channels)] * tp, 0)
    if mode == "naive":
        if channels < tp:
            raise ConfigError(f"parallel.mode=naive needs at least parallel.tp={tp} channels, got {channels}")
        counts = split_sizes(channels, tp)
        return ChannelPlacement(mode, _ranges(counts), 0, gathered_counts=counts)
    if mode != "dchag":
        raise ConfigError(f"parallel.mode={mode!r} is unknown; use dchag, replicated or naive")

    first = levels[0]
    if len(levels) < 2 and tp > 1:
        raise ConfigError(
            f"{names.dchag} needs a hierarchy of at least two levels (e.g. preset dchag-C); "
            f"the flat model has nothing to distribute: {names.flat.format(tp=tp)}"
        )
    if first.groups < tp:
        raise ConfigError(
            f"level 1 of the hierarchy has {first.groups} groups, fewer than {size}: every rank needs "
            f"at least one group; {names.groups.format(tp=tp)}"
        )
    group_ranges = [_ranges(split_sizes(first.groups, tp))]
    starts = [0, *accumulate(first.sizes)]
    channel_ranges = [(starts[g0], starts[g1]) for g0, g1 in group_ranges[0]]
    owned = [((g1 - g0) * first.tokens) for g0, g1 in group_ranges[0]]  # tokens per rank after level 1

    local = 1
    for level in levels[1:-1]:  # a level is rank-local when its groups never straddle two ranks
        bounds = [0, *accumulate(level.sizes)]
        rank_bounds = [0, *accumulate(owned)]
        if not set(rank_bounds) <= set(bounds):
            break
        ranges = [(bounds.index(a), bounds.index(b)) for a, b in zip(rank_bounds[:-1], rank_bounds[1:])]
        if any(g1 == g0 for g0, g1 in ranges):
            break
        group_ranges.append(ranges)
        owned = [(g1 - g0) * level.tokens for g0, g1 in ranges]
        local += 1
    return ChannelPlacement(mode, channel_ranges, local, group_ranges, owned if tp > 1 else [])


def _narrower_dim(logical: torch.Tensor, local: torch.Tensor) -> int | None:
    """The dimension (after the group dimension 0) along which a rank's group subset of a level
    parameter is narrower than the whole level's: only a linear level's padded member slots can be."""
    narrower = [d for d in range(1, logical.ndim) if local.shape[d] != logical.shape[d]]
    if len(narrower) > 1 or any(local.shape[d] > logical.shape[d] for d in narrower):
        raise ValueError(f"a group subset of shape {list(local.shape)} does not fit in {list(logical.shape)}")
    return narrower[0] if narrower else None


class HeadParallelLevel(nn.Module):
    """The last (single-group) cross-attention level with its heads split over the TP group.

    Rank r keeps heads [r*H/T, (r+1)*H/T): rows of Wq/Wk/Wv and columns of the output projection. The
    input enters through `copy_to_tp` (its gradient is summed over ranks), partial outputs leave through
    `reduce_from_tp`, and the output bias is added once, after the sum.
    """

    def __init__(self, level: HierarchyLevel, rank: int, tp: int, group):
        super().__init__()
        agg = level.aggregator
        if agg.heads % tp:
            raise ConfigError(f"the last aggregation level has {agg.heads} heads, not divisible by parallel.tp={tp}")
        width = agg.wq.shape[1] // tp
        self.rows = torch.arange(rank * width, (rank + 1) * width)
        self.level = copy.deepcopy(level)
        local = self.level.aggregator
        for name in ("wq", "wk", "wv"):
            setattr(local, name, nn.Parameter(getattr(agg, name).detach()[:, self.rows].clone()))
        local.proj_weight = nn.Parameter(agg.proj_weight.detach()[:, :, self.rows].clone())
        self.proj_bias = nn.Parameter(agg.proj_bias.detach().clone())  # [1, D], added after the reduction
        local.proj_bias = None
        self.group = group

    def forward(
        self, tokens: torch.Tensor, entered: bool = False, token_valid: torch.Tensor | None = None
    ) -> torch.Tensor:  # [B, M, L, D] -> [B, k, L, D]
        """`entered`: the tokens already come through a `*_to_tp` collective (the D-CHAG gather), which
        sums their gradient over the TP group; otherwise `copy_to_tp` does. `token_valid` [M]: as
        HierarchyLevel's (every rank knows the whole band subset: no communication)."""
        partial = self.level(tokens if entered else copy_to_tp(tokens, self.group), token_valid)
        return reduce_from_tp(partial, self.group) + self.proj_bias[0]

    def forward_fused(
        self, x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, channel_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """As the first level, straight from pixels (see HierarchyLevel.forward_fused): the tokenizer's
        weight and shift enter through `copy_to_tp`, since each rank's heads give part of their gradient."""
        weight, shift = copy_to_tp(weight, self.group), copy_to_tp(shift, self.group)
        partial = self.level.forward_fused(x, weight, shift, channel_keep)
        return reduce_from_tp(partial, self.group) + self.proj_bias[0]

    def output_valid(self, token_valid: torch.Tensor | None) -> torch.Tensor | None:
        return self.level.output_valid(token_valid)


class ParallelFrontEnd(nn.Module):
    """What one TP rank runs of the front end; input: only this rank's channels [B, C_r, H, W]."""

    def __init__(self, front_end: FrontEnd, placement: ChannelPlacement, rank: int, tp: int, group):
        super().__init__()
        self.group, self.tp, self.rank = group, tp, rank
        self.fused = front_end.fused
        self.specs: dict[str, ShardSpec] = {}
        prefix = "front_end."
        c0, c1 = placement.channel_ranges[rank]
        self.channel_range, self.num_channels = (c0, c1), len(front_end.channel_index)
        vocab_rows = front_end.channel_index[c0:c1].clone()
        tok = front_end.tokenizer
        # parameters shared by all channels (a wavelength tokenizer's projection and encoder) are whole on
        # every rank; outside the replicated baseline each rank's channels give part of their gradient
        split = placement.mode != "replicated"
        self.tokenizer = self._tokenizer_rows(tok, vocab_rows, prefix, disjoint=split, partial=split and tp > 1)
        # vocabulary rows no input channel uses still belong to the model: TP rank 0 keeps them
        unused = sorted(set(range(tok.vocab_size)) - set(front_end.channel_index.tolist()))
        self.spare = self._spare_rows(tok, unused, prefix) if unused and rank == 0 else None

        levels = list(front_end.hierarchy.levels)
        self.local_levels = nn.ModuleList()
        for i in range(placement.local_levels):
            g0, g1 = placement.level_group_ranges[i][rank]
            sub = levels[i].subset(g0, g1)
            self.local_levels.append(sub)
            for name in levels[i].aggregator.group_params:
                self.specs[f"local_levels.{i}.aggregator.{name}"] = ShardSpec(
                    f"{prefix}hierarchy.levels.{i}.aggregator.{name}",
                    0,
                    torch.arange(g0, g1),
                    pad_dim=_narrower_dim(getattr(levels[i].aggregator, name), getattr(sub.aggregator, name)),
                )
            self._spec_rest(sub, f"local_levels.{i}", f"{prefix}hierarchy.levels.{i}", partial=tp > 1)
            # the whole level's group layout: with a band subset, every rank derives the validity of the
            # gathered tokens from the (global) keep mask itself (`gathered_valid`), with no communication
            self.register_buffer(f"layout_{i}", levels[i].index.clone(), persistent=False)

        self.gathered_counts = placement.gathered_counts
        if self.gathered_counts and len(set(self.gathered_counts)) > 1:  # drop the padding after the gather
            n_max = max(self.gathered_counts)
            keep = [r * n_max + j for r, n in enumerate(self.gathered_counts) for j in range(n)]
            device = front_end.channel_index.device
            self.register_buffer("gather_keep", torch.tensor(keep, device=device), persistent=False)
        else:
            self.gather_keep = None

        last = len(levels) - 1
        self.shared_levels = nn.ModuleList(copy.deepcopy(levels[i]) for i in range(placement.local_levels, last))
        for j, i in enumerate(range(placement.local_levels, last)):
            self._spec_rest(self.shared_levels[j], f"shared_levels.{j}", f"{prefix}hierarchy.levels.{i}", partial=False)
        final = levels[last]
        logical = f"{prefix}hierarchy.levels.{last}"
        if placement.local_levels == len(levels):  # tp == 1 with every level local: nothing left
            self.final = None
        elif final.kind == "cross_attention" and tp > 1:
            self.final = HeadParallelLevel(final, rank, tp, group)
            rows = self.final.rows
            for name in ("wq", "wk", "wv"):
                self.specs[f"final.level.aggregator.{name}"] = ShardSpec(f"{logical}.aggregator.{name}", 1, rows)
            self.specs["final.level.aggregator.proj_weight"] = ShardSpec(f"{logical}.aggregator.proj_weight", 2, rows)
            self.specs["final.level.aggregator.query"] = ShardSpec(f"{logical}.aggregator.query", partial_grad=True)
            self.specs["final.proj_bias"] = ShardSpec(f"{logical}.aggregator.proj_bias")
            self._spec_rest(self.final.level, "final.level", logical, partial=True)
        else:  # linear last level, or tp == 1: run it whole on every rank
            self.final = copy.deepcopy(final)
            self._spec_rest(self.final, "final", logical, partial=False)
        # the gather feeds the head-parallel last level directly: one reduce-scatter in backward replaces
        # the last level's all-reduce plus the gather's own-slice copy
        self.gather_into_final = (
            bool(self.gathered_counts) and not len(self.shared_levels) and isinstance(self.final, HeadParallelLevel)
        )

    def _tokenizer_rows(self, tok, rows: torch.Tensor, prefix: str, disjoint: bool, partial: bool) -> nn.Module:
        """The tokenizer of vocabulary rows `rows`: their by-name rows, and the shared parameters whole."""
        local = tok.rows(rows)
        by_row = tok.row_params(rows)  # {parameter: its rows in the logical tensor}
        for pname, _ in local.named_parameters():
            logical = f"{prefix}tokenizer.{pname}"
            if pname in by_row:
                self.specs[f"tokenizer.{pname}"] = ShardSpec(logical, 0, by_row[pname], tp_disjoint=disjoint)
            else:
                self.specs[f"tokenizer.{pname}"] = ShardSpec(logical, partial_grad=partial)
        return local

    def _spare_rows(self, tok, unused: list[int], prefix: str) -> nn.Module | None:
        """The by-name rows of unused vocabulary entries (no computation uses them), or None if none."""
        spare = nn.Module()
        for pname, rows in tok.row_params(unused).items():
            if len(rows):
                param = getattr(tok, pname)
                spare.register_parameter(pname, nn.Parameter(param.detach()[rows.to(param.device)].clone()))
                self.specs[f"spare.{pname}"] = ShardSpec(f"{prefix}tokenizer.{pname}", 0, rows)
        return spare if len(spare._parameters) else None

    def _spec_rest(self, module: nn.Module, local_prefix: str, logical_prefix: str, partial: bool) -> None:
        """Parameters not yet described are whole copies (qk-norm weights, replicated levels)."""
        for name, _ in module.named_parameters():
            key = f"{local_prefix}.{name}"
            if key not in self.specs:
                self.specs[key] = ShardSpec(f"{logical_prefix}.{name}", partial_grad=partial)

    def _gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, n_r, L, D] on each rank -> [B, sum_r n_r, L, D] on every rank."""
        n_max = max(self.gathered_counts)
        padded = F.pad(tokens, (0, 0, 0, 0, 0, n_max - tokens.shape[1])) if tokens.shape[1] < n_max else tokens
        gather = gather_to_tp if self.gather_into_final else gather_from_tp
        gathered = gather(padded, self.group, dim=1)  # [B, T*n_max, L, D]
        return gathered if self.gather_keep is None else gathered.index_select(1, self.gather_keep)

    def input_keep(self, channel_keep: torch.Tensor) -> torch.Tensor:
        """The part of a keep mask [C] over all the model's channels that belongs to this rank's x."""
        return channel_keep[self.channel_range[0] : self.channel_range[1]]

    def gathered_valid(self, channel_keep: torch.Tensor | None) -> torch.Tensor | None:
        """Validity [M] of the tokens after the rank-local levels (and the gather), from the global keep
        mask [C] through the whole levels' group layouts: what every rank would gather, computed locally."""
        valid = channel_keep
        for i, level in enumerate(self.local_levels if channel_keep is not None else ()):
            valid = groups_valid(getattr(self, f"layout_{i}"), valid, level.tokens)
        return valid

    def distributed_part(self, x: torch.Tensor, channel_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Tokenize this rank's channels, run the rank-local levels, gather: [B, C_r, H, W] -> [B, M, L, D].

        This is D-CHAG proper: one all-gather forward; backward either no communication (own slice) or,
        straight into the head-parallel last level, the one reduce-scatter that level needs anyway.
        `channel_keep` [C]: the band subset over all channels; this rank applies its own slice of it.
        """
        keep = None if channel_keep is None else self.input_keep(channel_keep)  # [C_r]
        if self.local_levels:  # tokenizer + level 1, fused unless configured off
            tokens = tokenize_and_aggregate(self.tokenizer, self.local_levels[0], x, None, self.fused, keep)
            valid = self.local_levels[0].output_valid(keep)
            for level in self.local_levels[1:]:
                tokens, valid = level(tokens, valid), level.output_valid(valid)  # [B, n_r, L, D]
        else:  # [B, C_r, L, D]: the local tokenizer holds exactly x's channels
            tokens = self.tokenizer(drop_channels(x, keep), None)
        if self.gathered_counts:
            tokens = self._gather(tokens)  # [B, M, L, D]
        return tokens

    def forward(self, x: torch.Tensor, channel_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C_r, H, W] (this rank's channels) -> [B, L, D] (the same on every rank). `channel_keep`
        [C]: a band subset over all channels (the same on every rank), as FrontEnd's."""
        if channel_keep is not None:  # over all channels, not this rank's: checked alike on every rank
            check_channel_keep(channel_keep, self.num_channels, where="the channel-parallel front end")
        levels = [*self.shared_levels, *([self.final] if self.final is not None else [])]
        if self.fused and not self.local_levels and not self.gathered_counts:
            # replicated baseline: the first level sees every channel here, so it can run fused too
            weight, shift = self.tokenizer.channel_params(None)
            tokens = levels[0].forward_fused(drop_channels(x, channel_keep), weight, shift, channel_keep)
            valid = levels[0].output_valid(channel_keep)  # [B, G*k, L, D] and its validity
            levels = levels[1:]
        else:
            tokens = self.distributed_part(x, channel_keep)  # [B, M, L, D]
            valid = self.gathered_valid(channel_keep)
        if self.gather_into_final:
            tokens = self.final(tokens, entered=True, token_valid=valid)
            levels = []
        for level in levels:
            tokens, valid = level(tokens, token_valid=valid), level.output_valid(valid)
        return rearrange(tokens, "b 1 l d -> b l d")
