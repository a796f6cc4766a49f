"""The `fused-cpu` sweep: fused vs materializing front end on one device.

It compares the materializing (reference) and fused front ends of flat, dchag-L and dchag-C on
one device: the front end alone (peak tensor memory of forward + backward, both in total and on top of
what is resident before the step, i.e. its parameters and input; FLOPs; saved activations) and the whole
training step (peak memory, median step time, reference and fused alternating in one process). It adds the same
FLOP and saved-activation comparison at the paper's scale, on the meta device (no memory needed).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch

from dchag.bench.measure import count_flops, median_times, peak_tensor_memory, saved_activation_bytes, tensor_bytes
from dchag.bench.sizes import model_overrides
from dchag.configure import load_config
from dchag.model import build_model
from dchag.train.optim import build_optimizer

VARIANTS = {"flat": "flat", "dchag-L": "dchag-L", "dchag-C": "dchag-C"}


@dataclass
class FusedSweepSize:
    """Problem size of the `fused-cpu` sweep (override with `dchag bench --set key=value`)."""

    channels: int = 512
    embed_dim: int = 256
    heads: int = 8
    img_size: tuple[int, int] = (64, 128)
    patch: int = 4
    batch: int = 2
    depth: int = 4
    groups: int = 4
    repeats: int = 3
    warmup: int = 1
    paper_scale: bool = True  # also compute the meta-device comparison at D 2048, 32 heads, 1024 ch, 128x256


def variant_config(variant: str, size, fused: bool, *, groups: int, depth: int, task: str = "mae", extra=()):
    """A validated config for one benchmark variant (MAE task: the loss covers every channel).

    `size` gives channels, embed_dim, heads, img_size, patch and batch."""
    return load_config(
        None,
        [
            *model_overrides(size, depth),
            f"model.hierarchy.preset={VARIANTS[variant]}",
            f"model.hierarchy.groups={groups}",
            f"model.fused_front_end={str(fused).lower()}",
            "data.kind=synthetic-hyperspectral",
            f"data.channels={size.channels}",
            f"train.batch_size={size.batch}",
            f"train.task={task}",
            *extra,
        ],
    )


def _front_end_step(model, x, cotangent) -> Callable[[], None]:
    def run():
        model.zero_grad(set_to_none=True)
        out = model.front_end(x)  # [B, L, D]
        (out * cotangent).sum().backward()

    return run


def _train_step(model, optimizer, x, noise) -> Callable[[], None]:
    def run():
        optimizer.zero_grad(set_to_none=True)
        out = model(x, mask_noise=noise)
        ((out.pred - x) ** 2).mean().backward()
        optimizer.step()

    return run


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fused_cpu(size: FusedSweepSize) -> list[dict]:
    records = []
    g = torch.Generator().manual_seed(0)
    h, w = size.img_size
    x = torch.randn(size.batch, size.channels, h, w, generator=g)
    for variant in VARIANTS:
        models = {}
        for fused in (False, True):
            torch.manual_seed(0)
            models[fused] = build_model(variant_config(variant, size, fused, groups=size.groups, depth=size.depth))
        models[True].load_state_dict(models[False].state_dict())
        num_patches = models[False].num_patches
        noise = torch.rand(size.batch, num_patches, generator=g)
        cotangent = torch.randn(size.batch, num_patches, size.embed_dim, generator=g)
        steps, rows = {}, {}
        for fused, model in models.items():
            log(f"[bench] {variant} {'fused' if fused else 'reference'}: memory and FLOPs")
            front = _front_end_step(model, x, cotangent)
            train_cfg = variant_config(variant, size, fused, groups=size.groups, depth=size.depth).train
            optimizer = build_optimizer(model, train_cfg)
            step = _train_step(model, optimizer, x, noise)
            step()  # optimizer state exists before memory is measured
            rows[fused] = {
                "sweep": "fused-cpu",
                "scale": "bench",
                "device": "cpu",
                "variant": variant,
                "fused": fused,
                "channels": size.channels,
                "tp": 1,
                "embed_dim": size.embed_dim,
                "heads": size.heads,
                "img_size": list(size.img_size),
                "patch": size.patch,
                "batch": size.batch,
                "depth": size.depth,
                "groups": size.groups if variant != "flat" else 1,
                "front_end_peak_mem_bytes": peak_tensor_memory(front, model.front_end, x, cotangent),
                "front_end_resident_bytes": tensor_bytes(model.front_end.parameters(), [x, cotangent]),
                "front_end_flops": count_flops(front),
                "front_end_saved_activation_bytes": saved_activation_bytes(lambda m=model: m.front_end(x)),
                "peak_mem_bytes": peak_tensor_memory(step, model, optimizer, x, noise),
            }
            row = rows[fused]
            row["front_end_peak_added_bytes"] = row["front_end_peak_mem_bytes"] - row["front_end_resident_bytes"]
            steps[fused] = step
        log(f"[bench] {variant}: timing {size.repeats} steps each, alternating")
        times = median_times({"reference": steps[False], "fused": steps[True]}, size.repeats, size.warmup)
        rows[False]["step_time_s"], rows[True]["step_time_s"] = times["reference"], times["fused"]
        records += [rows[False], rows[True]]
    if size.paper_scale:
        records += fused_paper_meta()
    return records


def fused_paper_meta(batch: int = 2) -> list[dict]:
    """FLOPs and saved activations of the front end at the paper's scale, on the meta device."""
    paper = FusedSweepSize(
        channels=1024, embed_dim=2048, heads=32, img_size=(128, 256), patch=4, batch=batch, depth=1, groups=8
    )
    records = []
    for variant in VARIANTS:
        for fused in (False, True):
            log(f"[bench] paper scale (meta) {variant} {'fused' if fused else 'reference'}")
            with torch.device("meta"):
                model = build_model(variant_config(variant, paper, fused, groups=paper.groups, depth=paper.depth))
                x = torch.empty(batch, paper.channels, *paper.img_size)
                cotangent = torch.empty(batch, model.num_patches, paper.embed_dim)
            front = _front_end_step(model, x, cotangent)
            records.append(
                {
                    "sweep": "fused-cpu",
                    "scale": "paper",
                    "device": "meta",
                    "variant": variant,
                    "fused": fused,
                    "channels": paper.channels,
                    "tp": 1,
                    "embed_dim": paper.embed_dim,
                    "heads": paper.heads,
                    "img_size": list(paper.img_size),
                    "patch": paper.patch,
                    "batch": batch,
                    "groups": paper.groups if variant != "flat" else 1,
                    "front_end_flops": count_flops(front),
                    "front_end_saved_activation_bytes": saved_activation_bytes(lambda m=model: m.front_end(x)),
                }
            )
    return records
