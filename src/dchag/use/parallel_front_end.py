"""`dchag.parallelize_front_end`: a `dchag.FrontEnd` with its channels spread over a tensor-parallel group.

Each rank tokenizes and aggregates only its own block of channels (whole level-1 groups), one
all-gather joins the partial tokens, the last level runs head-parallel; the output [B, L, D] is the
single-device front end's, identical on every rank of the group. So a backbone that receives it can be
replicated over the group, or parallelized over other mesh dimensions (DDP, FSDP), without knowing about
the front end. What the caller must do: feed each rank its channels (or all of them: the module takes
its own slice), and call `finish_gradients()` after backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from dchag.config import ConfigError
from dchag.model.front_end import check_channel_keep
from dchag.parallel.channel_parallel import KnobNames, ParallelFrontEnd, place_channels
from dchag.parallel.gradients import finish_gradients
from dchag.parallel.state import logical_tensors
from dchag.use.front_end import FrontEnd

PREFIX = "front_end."  # ParallelFrontEnd names the single-device parameters as inside dchag's model
API_NAMES = KnobNames(  # placement errors in this API's words (no config keys, no parallel.mode here)
    tp="the mesh's tp size {tp}",
    dchag="parallelize_front_end",
    groups="build the FrontEnd with groups >= {tp} (a preset) or a hierarchy whose level 1 has >= {tp} groups",
    heads="build the FrontEnd with heads= a multiple of {tp} that divides embed_dim",
    flat="run the dchag.FrontEnd whole on every rank instead (no parallelize_front_end)",
)


def tp_submesh(mesh: DeviceMesh) -> DeviceMesh:
    """The tensor-parallel dimension: a 1-D mesh itself, or the "tp" dimension of a named mesh."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"parallelize_front_end(mesh={mesh!r}) must be a DeviceMesh (1-D, or with a 'tp' dimension)")
    names = mesh.mesh_dim_names or ()
    if "tp" in names:
        return mesh["tp"] if mesh.ndim > 1 else mesh
    if mesh.ndim == 1:
        return mesh
    raise ConfigError(
        f"parallelize_front_end: the mesh has {mesh.ndim} dimensions {list(names)} and none is named 'tp'; "
        "pass a 1-D mesh or name the front end's dimension 'tp'"
    )


class ChannelParallelFrontEnd(nn.Module):
    """One TP rank's part of a `dchag.FrontEnd`; forward gives the single-device front end's [B, L, D].

    `channel_slice` / `input_channels`: the input channels this rank tokenizes; forward takes either just
    those, [B, C_r, H, W], or every channel, [B, C, H, W] (it slices). After backward and before the
    optimizer step, call `finish_gradients()`: parameters that every rank holds whole (the last level's
    query, the levels after the gather) get only part of their gradient on each rank, and it sums them
    over the group (one all-reduce); it also gives a zero gradient to a parameter that got none.
    """

    def __init__(self, front_end: FrontEnd, mesh: DeviceMesh):
        super().__init__()
        tp_mesh = tp_submesh(mesh)
        self.tp, self.tp_rank = tp_mesh.size(), tp_mesh.get_local_rank()
        self._group = tp_mesh.get_group()
        self.logical_shapes = {PREFIX + k: v.shape for k, v in front_end.state_dict().items()}
        placement = place_channels(front_end, self.tp, "dchag", API_NAMES)
        # building a rank's part constructs modules of rank-dependent sizes, whose default initialisation
        # draws from the global RNG (the values are then overwritten): without the fork, the ranks' RNG
        # streams would part here, and any data or dropout mask drawn afterwards would differ between them
        with torch.random.fork_rng(devices=[]):
            self.front_end = ParallelFrontEnd(front_end, placement, self.tp_rank, self.tp, self._group)
        self.specs = {PREFIX + k: v for k, v in self.front_end.specs.items()}
        c0, c1 = placement.channel_ranges[self.tp_rank]
        self.channel_slice = slice(c0, c1)
        self.input_channels = front_end.channels[c0:c1]
        self.num_channels = front_end.num_channels
        self.img_size, self.embed_dim, self.patch_size = front_end.img_size, front_end.embed_dim, front_end.patch_size
        self.grid_size, self.num_patches = front_end.grid_size, front_end.num_patches

    @property
    def model(self) -> nn.Module:  # the layout protocol of dchag.parallel.state (parameter names, specs)
        return self

    @property
    def tp_group(self):
        return self._group

    def forward(self, x: torch.Tensor, channel_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C_r, H, W] (this rank's channels) or [B, C, H, W] (all) -> [B, L, D], the same on every rank.
        `channel_keep` [C] (bool, over all channels, the same on every rank): a band subset, as FrontEnd's."""
        if channel_keep is not None:  # before anything: every rank checks the same mask alike, none hangs
            check_channel_keep(channel_keep, self.num_channels, values=True, where="the channel-parallel front end")
        mine = self.channel_slice.stop - self.channel_slice.start
        if x.ndim == 4 and x.shape[1] == self.num_channels and mine != self.num_channels:
            x = x[:, self.channel_slice]
        if x.ndim != 4 or x.shape[1] != mine or tuple(x.shape[2:]) != tuple(self.img_size):
            raise ValueError(
                f"TP rank {self.tp_rank}'s front end got x of shape {list(x.shape)}; it takes [B, {mine}, "
                f"{self.img_size[0]}, {self.img_size[1]}] (its input channels {self.channel_slice.start}:"
                f"{self.channel_slice.stop}) or all {self.num_channels} channels"
            )
        return self.front_end(x, channel_keep)

    def finish_gradients(self) -> None:
        """Make this rank's gradients those of the single-device front end (its own shards). Every rank of
        the group must call it, after backward and before the optimizer step (or gradient clipping)."""
        finish_gradients(self.named_parameters(), self.specs, self._group, self.tp)

    def _single_device(self, getter) -> dict[str, torch.Tensor]:
        full = logical_tensors(self, getter)
        return {k[len(PREFIX) :]: v for k, v in full.items()}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The single-device FrontEnd's state dict (on CPU), assembled from every rank's shards; every rank
        of the group must call it (one all-gather)."""
        return self._single_device(lambda p: p)

    def full_grads(self) -> dict[str, torch.Tensor]:
        """The single-device FrontEnd's gradients, by parameter name (after `finish_gradients`)."""
        return self._single_device(lambda p: p.grad)


def parallelize_front_end(front_end: FrontEnd, mesh: DeviceMesh) -> ChannelParallelFrontEnd:
    """Spread `front_end`'s channels over `mesh` (a 1-D DeviceMesh, or a mesh with a "tp" dimension):
    this rank's part, with its weights copied from `front_end` (build it with the same seed on every rank).
    The given module is left unchanged."""
    if not isinstance(front_end, FrontEnd):
        raise TypeError(f"parallelize_front_end takes a dchag.FrontEnd, got {type(front_end).__name__}")
    return ChannelParallelFrontEnd(front_end, mesh)
