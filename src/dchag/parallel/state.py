"""Put parameters (or their gradients) of a parallelized model back into the single-device layout.

Used for checkpoints (a model trained at tp=2 loads at tp=1 or 4) and for parity checks (distributed
gradients compared name by name with the single-device model's).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

# full_tensor() of an FSDP2 x TP parameter gathers in two steps and warns that this is suboptimal;
# checkpoints and parity checks are off the hot path, so that advice is noise here.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _pad_to(t: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    """Zero-pad every dimension but `dim` up to `shape` (uneven linear groups keep a narrower weight)."""
    pads = []
    for d in reversed(range(t.ndim)):
        pads += [0, 0 if d == dim else shape[d] - t.shape[d]]
    return F.pad(t, pads) if any(pads) else t


def logical_tensors(plan, getter: Callable[[torch.nn.Parameter], torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """{single-device name: full tensor} on every rank, for `getter(param)` (the parameter or its grad).

    Every rank of the mesh must call this (it runs collectives).
    """
    out: dict[str, torch.Tensor] = {}
    pieces: dict[str, list] = defaultdict(list)
    for name, param in plan.model.named_parameters():
        value = getter(param)
        # no gradient: zeros of the parameter's global shape (a DTensor's .shape is already global)
        value = _full(value).detach() if value is not None else torch.zeros(param.shape, dtype=param.dtype)
        value = value.cpu()
        spec = plan.specs.get(name)
        if spec is None:
            out[name] = value
        elif spec.dim is None:
            out[spec.logical_name] = value
        else:
            pieces[spec.logical_name].append((spec.dim, spec.indices.cpu(), value))
    everyone = [dict(pieces)]
    if plan.tp > 1:
        everyone = [None] * plan.tp
        dist.all_gather_object(everyone, dict(pieces), group=plan.tp_group)
    for rank_pieces in everyone:
        for logical, parts in rank_pieces.items():
            if logical not in out:  # in the parameters' dtype (float64 in parity checks)
                out[logical] = torch.zeros(plan.logical_shapes[logical], dtype=parts[0][2].dtype)
            for dim, indices, value in parts:
                out[logical].index_copy_(dim, indices, _pad_to(value, out[logical].shape, dim))
    return out


def logical_state_dict(plan) -> dict[str, torch.Tensor]:
    """The model's weights as the single-device `build_model(cfg).state_dict()` would hold them."""
    return logical_tensors(plan, lambda p: p)


def logical_grads(plan) -> dict[str, torch.Tensor]:
    return logical_tensors(plan, lambda p: p.grad)
