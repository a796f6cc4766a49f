"""The named device mesh (dp_replicate, dp_shard, cp, tp) and process-group start-up.

TP groups are consecutive ranks (the innermost mesh dimension); the context-parallel ranks of one sample
(`cp`: each holds a strip of patch rows) come next, so a CP group's members are `tp` ranks apart; data
parallelism runs across ranks with the same (cp, tp) index, as in ORBIT's Hybrid-STOP and torchtitan.
CP ranks share the weights as data-parallel ranks do: under FSDP2 the shard dimension is dp_shard x cp
flattened (`dp_shard_cp`), as in torchtitan.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dchag.config import ConfigError

MESH_DIMS = ("dp_replicate", "dp_shard", "cp", "tp")  # outermost first: tp ranks are neighbours
FSDP_SHARD_CP = "dp_shard_cp"  # dp_shard x cp flattened: FSDP2's shard dimension when cp > 1


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    """The size of each mesh dimension, in MESH_DIMS order (keyword-only: four ints are easy to swap)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @classmethod
    def from_config(cls, parallel_cfg) -> "ParallelDims":
        return cls(**{name: getattr(parallel_cfg, name) for name in MESH_DIMS})

    @property
    def fsdp(self) -> bool:
        """Whether FSDP2 shards the weights: over dp_shard x cp (CP ranks share weights as data-parallel
        ranks do, torchtitan's layout) and dp_replicate (HSDP); off only on one rank of each."""
        return self.dp_replicate * self.dp_shard * self.cp > 1

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def validate(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ConfigError(
                f"parallel.dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x cp={self.cp} x "
                f"tp={self.tp} = "
                f"{self.world_size} ranks, but {world_size} processes were started; make the product equal"
            )


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


_HEALTH_GROUP = None  # a small gloo group for naming unresponsive ranks after a failed collective

# what gloo and NCCL say when a peer died or stopped answering
COMM_FAILURE_MARKERS = ("Timed out", "timed out", "Connection closed", "Connection reset", "Broken pipe", "NCCL")


def init_distributed(timeout_s: float = 600.0) -> None:
    """Start the default process group from torchrun's environment (NCCL on GPUs, gloo on CPU).

    A collective that waits longer than `timeout_s` for a peer raises instead of hanging."""
    global _HEALTH_GROUP
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    if shared_store_with_restarts() and dist.get_rank() == 0:
        print(
            "dchag: warning: torchrun --max-restarts with its shared rendezvous store: a restarted rank may read "
            "the failed attempt's addresses and fail to connect (pytorch/pytorch#135712); export "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun",
            file=sys.stderr,
            flush=True,
        )
    _HEALTH_GROUP = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def shared_store_with_restarts() -> bool:
    """torchrun will restart the ranks and shares one TCPStore across attempts (torch >= 2.5's default)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    return restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def is_comm_failure(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because a peer died or did not answer in time."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError) and any(m in str(err) for m in COMM_FAILURE_MARKERS)
    )


def unresponsive_ranks(timeout_s: float) -> str:
    """After a failed collective: which ranks do not answer a monitored barrier (gloo) within
    `timeout_s`, as rank 0 sees it ("" where this rank cannot tell)."""
    if _HEALTH_GROUP is None or dist.get_rank() != 0:
        return ""
    try:
        dist.monitored_barrier(group=_HEALTH_GROUP, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as err:
        text = str(err)
        if "failed to pass monitoredBarrier" in text:
            return text.split("]:", 1)[-1].split(" failed")[0].strip().lower()  # "ranks 1, 3"
        return ""
    return ""


def build_mesh(dims: ParallelDims, device: str | None = None) -> DeviceMesh:
    """A 4-D mesh named MESH_DIMS (dp_replicate, dp_shard, cp, tp) over all started ranks; with cp > 1
    also the flattened dp_shard x cp dimension FSDP2 shards over."""
    dims.validate(dist.get_world_size())
    mesh = init_device_mesh(
        device or device_type(), (dims.dp_replicate, dims.dp_shard, dims.cp, dims.tp), mesh_dim_names=MESH_DIMS
    )
    if dims.cp > 1:
        mesh["dp_shard", "cp"]._flatten(FSDP_SHARD_CP)
    return mesh


def fsdp_shard_dim(mesh: DeviceMesh) -> str:
    """The mesh dimension FSDP2 shards parameters over: dp_shard, or dp_shard x cp flattened."""
    return FSDP_SHARD_CP if mesh["cp"].size() > 1 else "dp_shard"


def submesh(mesh: DeviceMesh, *names: str) -> DeviceMesh:
    """`mesh[names]`, also for the flattened dp_shard_cp (torch warns that slicing a flattened dimension
    from the root mesh "will be deprecated"; it is how torchtitan names it, and it works)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return mesh[names if len(names) > 1 else names[0]]


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP2/HSDP shards over, 2-D (replicate, shard): context-parallel ranks hold the same
    weights and each computes part of every gradient, so they join the shard dimension."""
    return submesh(mesh, "dp_replicate", fsdp_shard_dim(mesh))


def dp_rank_and_size(mesh: DeviceMesh) -> tuple[int, int]:
    rep, shard = mesh["dp_replicate"], mesh["dp_shard"]
    return rep.get_local_rank() * shard.size() + shard.get_local_rank(), rep.size() * shard.size()


def cp_group_name(mesh) -> str | None:
    """The name of this rank's context-parallel process group (None without context parallelism: a mesh
    dimension of size 1 may share its group's name with another one's)."""
    if "cp" not in (mesh.mesh_dim_names or ()) or mesh["cp"].size() == 1:
        return None
    return str(mesh["cp"].get_group().group_name)
