"""Normalisation statistics of a run: reused from the run folder (or the checkpoint resumed from) when
they describe the same data, else computed once per data-parallel group and shared.

Every data-parallel rank streams only its share of the training data (every dp-th chunk of time steps,
or crop) for its own channels; the parts of all ranks are gathered and merged in chunk order, so every
rank ends with the statistics one process would compute. `stats.json` carries a fingerprint of the data
(kind, path, training split, grid, selection, crop, NaN mode...): statistics whose fingerprint differs
are recomputed, and rank 0 says once what differed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dchag.config import ConfigError
from dchag.data.moments import Partial, merge_partials
from dchag.train.checkpoint import write_json_atomic

# fingerprint keys that are not spelled data.KEY in the config
FINGERPRINT_NAMES = {
    "train_times": "the training split's time steps",
    "grid_shape": "model.img_size",
    "crop": "model.img_size",
    "stat_crops": "data.num_samples",
    "split": "data.split.train",
}


def fingerprint_of(source) -> dict:
    """The source's fingerprint in the form it takes after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(source.fingerprint(), default=str))


def why_not_reusable(stats: dict | None, source, fingerprint: dict) -> str | None:
    """None when `stats` serve `source` (the same data fingerprint, every channel present); else what
    differs, in words ("" when there are no statistics at all)."""
    if stats is None:
        return ""
    saved = stats.get("fingerprint")
    if saved is None:
        return "stats.json has no data fingerprint (written by an older dchag)"
    for key in sorted(set(saved) | set(fingerprint)):
        old, new = saved.get(key), fingerprint.get(key)
        if json.dumps(old, sort_keys=True) != json.dumps(new, sort_keys=True):  # NaN equals NaN here
            return f"{FINGERPRINT_NAMES.get(key, f'data.{key}')} changed ({_short(old)} -> {_short(new)})"
    needed = list(dict.fromkeys(list(source.channels) + list(source.out_channels)))
    missing = [c for c in needed if c not in stats.get("channels", {})]
    missing += [c for c in source.out_channels if c not in stats.get("climatology", {})]
    if missing:
        return f"data.channels changed (the statistics lack {', '.join(map(repr, missing[:3]))})"
    return None


def _short(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _agree(layout, ok: bool) -> bool:
    """True only when every rank says True (one MIN all-reduce)."""
    if not layout.distributed:
        return ok
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces device tensors only
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def shared_stats(source, layout) -> dict:
    """The statistics of `source`'s channels and of every other rank's, computed once per
    data-parallel group: this rank streams its share, the parts of all ranks are gathered and merged.
    A data error found on any rank is raised on every rank alike (no rank left waiting)."""
    try:
        part = source.partial_stats(layout.dp_rank, layout.dp_size, climatology=source.out_channels)
    except ConfigError as err:  # raised here, it would leave the other ranks waiting in the gather
        part = Partial(f"data.path {getattr(source, 'path', '?')!r}", layout.dp_rank)
        part.refuse((-1,), str(err))
    parts = [part]
    if layout.distributed:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
    return merge_partials(parts)


def prepare_stats(source, layout, out: Path | None, saved: dict | None = None) -> dict | None:
    """Normalisation statistics for file-backed sources; None for synthetic ones. `saved` (the
    statistics of a checkpoint being resumed), else `out/stats.json`, are reused when their data
    fingerprint and channels match; otherwise they are computed (`shared_stats`) and rank 0 says once
    why. Rank 0 writes them to `out/stats.json`. Sets them on the source."""
    if not hasattr(source, "compute_stats"):
        return None
    path = out / "stats.json" if out is not None else None
    on_disk = json.loads(path.read_text()) if path is not None and path.is_file() else None
    fingerprint = fingerprint_of(source)
    stats, reason = None, None
    for candidate in (saved, on_disk):
        why = why_not_reusable(candidate, source, fingerprint)
        if why is None:
            stats = candidate
            break
        reason = reason or why
    if not _agree(layout, stats is not None):  # every rank decides the same way, before rank 0 may write
        if reason and layout.is_main:
            print(f"dchag: {reason}: recomputing normalisation statistics", file=sys.stderr, flush=True)
        stats = {**shared_stats(source, layout), "fingerprint": fingerprint}
    if path is not None and layout.is_main and stats != on_disk:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, stats)
    source.stats = stats
    return stats
