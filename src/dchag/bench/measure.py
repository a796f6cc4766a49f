"""Measurement helpers: exact tensor memory, FLOPs, saved activations, and robust timing.

Memory comes from torch's MemTracker (a private API: this file is the only place that touches it), which
counts every tensor the tracked modules and the measured function create, on CPU as on GPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _grouped_conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """convolution_backward FLOPs that respect groups: each requested gradient costs what the forward
    costs. (torch's formula counts the weight gradient of a grouped convolution `groups` times over,
    which would inflate the fused front end's per-channel convolutions by up to C.)"""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def peak_tensor_memory(fn: Callable[[], object], *tracked) -> int:
    """Peak bytes of all live tensors while `fn()` runs (parameters, gradients, activations, temporaries).

    `tracked`: modules, optimizers or tensors created before `fn` that count too (e.g. the model and
    its input).
    """
    tracker = memory_tracker()
    tracker.track_external(*tracked)
    with tracker:
        fn()
    return tracker_peak(tracker)


def tracker_peak(tracker) -> int:
    """The largest total of live tensor bytes a memory tracker saw (over devices)."""
    return int(max(device_stats["Total"] for device_stats in tracker.get_tracker_snapshot("peak").values()))


def memory_tracker():
    """A MemTracker (exact tensor memory, per module too) whose per-operation bookkeeping visits only
    the modules running at that moment. Stock MemTracker visits every module it has seen on every
    operation, which makes a depth-32 model with a thousand channels take minutes to trace; the
    numbers are the same (tested)."""
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState

    class ActiveModulesMemTracker(MemTracker):
        _by_fqn: dict = {}

        def _update_peak_stats(self, peak_state: _ModState) -> None:
            snap = self._curr_mem_snap
            if len(self._by_fqn) != len(self.memory_tracking):
                self._by_fqn = {stats.mod_fqn: stats for stats in self.memory_tracking.values()}
            for fqn in self._mod_tracker.parents:
                stats = self._by_fqn.get(fqn)
                if stats is None or peak_state not in stats.snapshots:
                    continue
                for dev, dev_snap in snap.items():
                    if stats.local_peak.get(dev, 0) < dev_snap["Total"]:
                        stats.local_peak[dev] = dev_snap["Total"]
                        stats.snapshots[peak_state][-1][dev] = dict(dev_snap)
            for dev, dev_snap in snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)

    return ActiveModulesMemTracker()


def module_peak(tracker, module) -> int:
    """The largest total tensor memory MemTracker saw while `module` ran forward or backward."""
    stats = tracker.memory_tracking.get(module)
    if stats is None:
        return 0
    peak = 0
    for snapshots in stats.snapshots.values():
        for snap in snapshots:
            for device, values in snap.items():
                if str(device) != "meta":
                    peak = max(peak, int(values["Total"]))
    return peak


def module_forward_added(tracker, module) -> int:
    """The most memory `module`'s forward added above what was live when it began (its activations
    and transients), over its calls, from MemTracker's pre-forward and forward-peak snapshots."""
    from torch.distributed._tools.mem_tracker import _ModState

    stats = tracker.memory_tracking.get(module)
    if stats is None:
        return 0
    added = 0
    for pre, peak in zip(stats.snapshots.get(_ModState.PRE_FW, []), stats.snapshots.get(_ModState.PEAK_FW, [])):
        for device, values in peak.items():
            if str(device) != "meta":
                added = max(added, int(values["Total"]) - int(pre.get(device, {}).get("Total", 0)))
    return added


def tensor_bytes(*groups) -> int:
    """Bytes of the given tensors (iterables of tensors, e.g. parameters() and a list of inputs)."""
    return sum(t.numel() * t.element_size() for group in groups for t in group)


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


# torch's FlopCounterMode has no formula for the CPU flash-attention kernels, which every CPU SDPA without
# dropout runs (and the planner's GPU-target traces stand in for flash attention): attention would count 0
FLOP_FORMULAS = {
    aten.convolution_backward: _grouped_conv_backward_flops,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of `fn()` (forward and any backward it runs), from FlopCounterMode with a group-aware
    convolution backward and the CPU flash-attention kernels counted as torch counts GPU attention."""
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with counter:
        fn()
    return int(counter.get_total_flops())


def saved_activation_bytes(fn: Callable[[], object]) -> int:
    """Bytes autograd saves for backward while `fn()` runs its forward (works on the meta device).

    Parameters saved by reference are not activations and are not counted.
    """
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def median_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, run alternately (a, b, a, b, ...) so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
