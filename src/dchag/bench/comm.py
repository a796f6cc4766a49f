"""Bytes moved by collectives, counted with CommDebugMode.

CommDebugMode counts collectives (c10d ops such as `allreduce_`, `allgather_`, and DTensor's functional
collectives) but not their sizes. `CommBytesMode` adds, per collective, the bytes of its full-size buffer
N (the all-reduced tensor, the all-gather's output, the reduce-scatter's input), the group size T and
the pass (forward or backward). From those it derives what a ring algorithm sends per rank:
all-reduce 2(T-1)/T * N, all-gather and reduce-scatter (T-1)/T * N. Those are the numbers to compare.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor.debug import CommDebugMode
from torch.utils._pytree import tree_leaves

# op name (as CommDebugMode reports it, without namespace) -> ring traffic per rank in units of N
RING_FACTOR = {
    "allreduce_": lambda t: 2 * (t - 1) / t,
    "all_reduce": lambda t: 2 * (t - 1) / t,
    "allgather_": lambda t: (t - 1) / t,
    "_allgather_base_": lambda t: (t - 1) / t,
    "allgather_into_tensor_coalesced_": lambda t: (t - 1) / t,
    "all_gather_into_tensor": lambda t: (t - 1) / t,
    "reduce_scatter_": lambda t: (t - 1) / t,
    "_reduce_scatter_base_": lambda t: (t - 1) / t,
    "reduce_scatter_tensor": lambda t: (t - 1) / t,
    "reduce_scatter_tensor_coalesced_": lambda t: (t - 1) / t,
    "broadcast_": lambda t: (t - 1) / t,
    "all_to_all": lambda t: (t - 1) / t,
}


def _bytes(tree) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))


def _group(args, kwargs) -> tuple[str, int]:
    """(name, size) of the process group a collective runs on: c10d ops take the ProcessGroup, functional
    collectives its registered name."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    for a in [*args, *kwargs.values()]:
        if isinstance(a, torch.Tensor):
            continue
        if isinstance(a, str):
            try:
                a = _resolve_process_group(a)
            except (ValueError, RuntimeError, KeyError):
                continue
        elif isinstance(a, torch.ScriptObject):  # c10d ops receive the boxed ProcessGroup
            try:
                a = dist.ProcessGroup.unbox(a)
            except (TypeError, RuntimeError):
                continue
        if callable(getattr(a, "size", None)) and hasattr(a, "group_name"):
            return str(a.group_name), int(a.size())
    return "", 1


class _PassTracker:
    """Stands in for CommDebugMode's per-module tracker, whose hooks lose their place in models that
    call sub-modules' methods directly (IndexError in its forward hook). It only tells forward from
    backward: autograd runs a graph task exactly while backward runs."""

    name = "Global"
    module_parents_dict = {"Global": {"Global"}}
    activation_checkpointing = False

    @property
    def is_bw(self) -> bool:
        return torch._C._current_graph_task_id() != -1

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


class CommBytesMode(CommDebugMode):
    """CommDebugMode that also records, per collective, its buffer size, group size and pass.

    `records`: [{"op", "group", "group_size", "bytes", "ring_bytes", "backward"}], in the order issued.
    """

    def __init__(self):
        super().__init__()
        self.advanced_module_tracker = _PassTracker()
        self.records: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = sum(self.comm_counts.values())
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if out is not NotImplemented and sum(self.comm_counts.values()) > before:
            name = str(func._overloadpacket).split(".")[-1]
            group, size = _group(args, kwargs)
            n = max(_bytes(args[0]) if args else 0, _bytes(args[1]) if len(args) > 1 else 0, _bytes(out))
            factor = RING_FACTOR.get(name, lambda t: 1.0)(size)
            self.records.append(
                {
                    "op": name,
                    "group": group,
                    "group_size": size,
                    "bytes": n,
                    "ring_bytes": n * factor,
                    "backward": bool(self.advanced_module_tracker.is_bw),
                }
            )
        return out


def summarize(records: list[dict], group: str | None = None) -> dict:
    """Counts and bytes per (pass, op), optionally only for collectives on the process group `group`."""
    out: dict = {"count": 0, "bytes": 0, "ring_bytes": 0.0, "by_op": defaultdict(lambda: [0, 0])}
    for r in records:
        if group is not None and r["group"] != group:
            continue
        key = f"{'backward' if r['backward'] else 'forward'}/{r['op']}"
        out["count"] += 1
        out["bytes"] += r["bytes"]
        out["ring_bytes"] += r["ring_bytes"]
        out["by_op"][key][0] += 1
        out["by_op"][key][1] += r["bytes"]
    out["by_op"] = {k: {"count": c, "bytes": b} for k, (c, b) in sorted(out["by_op"].items())}
    return out
