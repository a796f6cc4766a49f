"""Each rank's share of the model and of its optimizer state, as chunks of the logical tensors.

A checkpoint stores every tensor under its single-device name and shape, whatever the layout that
wrote it: a rank holds some chunks of each logical tensor (a TP slice of heads, an FSDP slice of rows,
the rows of its own channels, which need not be contiguous), and `LogicalShards` describes them to
`torch.distributed.checkpoint` (DCP) through DCP's checkpointable protocol, the one DTensor implements.
So each rank writes and reads only the elements it holds, replicated chunks are written once, and a
checkpoint written at dp_shard 2 x tp 2 loads at tp 4 or in one process (DCP reshards by chunk).

Uneven groups: a linear level's weight [G, k, n_max] is padded to the level's largest group, and the
single-device model holds that padding (zeros, never trained). A rank keeps only the width of its own
largest group, so the slots beyond it belong to no rank's tensor; DCP refuses a save whose chunks do not
tile the logical tensor. The rank that holds a group's rows therefore also writes zero `padding` chunks
for those slots, so that a checkpoint equals the single-device model's state at any layout; they are
never read back (a narrower rank does not ask for them; a wider layout reads the zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.tensor import DTensor


@dataclass
class Chunk:
    offsets: tuple[int, ...]  # where the chunk starts in the logical tensor
    local: torch.Tensor  # a view of the rank's own tensor: writes land in the parameter / state

    @property
    def meta(self) -> ChunkStorageMetadata:
        return ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.local.shape)


class LogicalShards:
    """The chunks of one logical tensor that this rank holds (DCP's checkpointable protocol).

    `padding`: zero chunks of group padding this rank writes but does not hold (see the module text);
    they take part in saving only, never in loading or initialisation.
    """

    def __init__(self, shape: torch.Size, chunks: list[Chunk], padding: list[Chunk] = ()):
        self.shape = torch.Size(shape)
        self.chunks = [c for c in chunks if c.local.numel() > 0]
        self.padding = [c for c in padding if c.local.numel() > 0]
        self._by_offset = {torch.Size(c.offsets): c for c in self.chunks + self.padding}
        if len(self._by_offset) != len(self.chunks) + len(self.padding):
            raise ValueError("two chunks of one logical tensor start at the same offset on this rank")

    def size(self) -> torch.Size:
        return self.shape

    def __create_write_items__(self, fqn: str, _obj) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(c.offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=c.meta, properties=TensorProperties.create_from_tensor(c.local), size=self.shape
                ),
            )
            for c in self.chunks + self.padding
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [c.meta for c in self.chunks]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self._by_offset[torch.Size(index.offset)].local

    @property
    def local_bytes(self) -> int:
        return sum(c.local.numel() * c.local.element_size() for c in self.chunks)


def _runs(indices: list[int]) -> list[tuple[int, int, int]]:
    """Consecutive runs of `indices` as (position in the list, first value, length): [4, 5, 9] ->
    [(0, 4, 2), (2, 9, 1)]."""
    runs: list[tuple[int, int, int]] = []
    for j, i in enumerate(indices):
        if runs and runs[-1][1] + runs[-1][2] == i:
            start, first, n = runs[-1]
            runs[-1] = (start, first, n + 1)
        else:
            runs.append((j, i, 1))
    return runs


def chunks_of(tensor: torch.Tensor, spec=None) -> list[Chunk]:
    """The logical chunks a rank's `tensor` holds. A DTensor (TP, FSDP) contributes its local block at
    the DTensor's global offset; a channel `ShardSpec` (`dim`, `indices`) then maps that block's
    positions along `dim` to logical indices, one chunk per contiguous run."""
    if isinstance(tensor, DTensor):
        offsets = tuple(tensor.__create_chunk_list__()[0].offsets)
        local = tensor.to_local()
    else:
        offsets, local = (0,) * tensor.ndim, tensor
    local = local.detach()
    if spec is None or spec.dim is None:
        return [Chunk(offsets, local)]
    d, start = spec.dim, offsets[spec.dim]
    indices = spec.indices[start : start + local.shape[d]].tolist()
    out = []
    for j, first, n in _runs(indices):
        shifted = list(offsets)
        shifted[d] = first
        out.append(Chunk(tuple(shifted), local.narrow(d, j, n)))
    return out


def padding_of(chunks: list[Chunk], shape: torch.Size, pad_dim: int | None) -> list[Chunk]:
    """Zero chunks for the logical slots along `pad_dim` beyond each chunk (uneven groups' padding that
    the rank's narrower tensor does not hold): together with `chunks` they cover the same rows whole."""
    if pad_dim is None:
        return []
    out = []
    for c in chunks:
        end = c.offsets[pad_dim] + c.local.shape[pad_dim]
        if end < shape[pad_dim]:
            offsets, sizes = list(c.offsets), list(c.local.shape)
            offsets[pad_dim], sizes[pad_dim] = end, shape[pad_dim] - end
            out.append(Chunk(tuple(offsets), c.local.new_zeros(sizes)))
    return out


def logical_name_and_shape(name: str, param: torch.Tensor, plan) -> tuple[str, torch.Size, object]:
    """(single-device name, its shape, the ShardSpec or None) of a rank's parameter `name`."""
    if plan is None:
        return name, param.shape, None
    spec = plan.specs.get(name)
    logical = spec.logical_name if spec is not None else name
    return logical, plan.logical_shapes.get(logical, param.shape), spec


def logical_shards(model: torch.nn.Module, plan, tensor_of) -> dict[str, LogicalShards]:
    """{single-device name: LogicalShards} for `tensor_of(param)` (the parameter itself, or one of its
    optimizer states, which share its layout); parameters for which `tensor_of` gives None are left out."""
    chunks: dict[str, list[Chunk]] = {}
    padding: dict[str, list[Chunk]] = {}
    shapes: dict[str, torch.Size] = {}
    for name, param in model.named_parameters():
        tensor = tensor_of(param)
        if tensor is None:
            continue
        logical, shape, spec = logical_name_and_shape(name, param, plan)
        held = chunks_of(tensor, spec)
        chunks.setdefault(logical, []).extend(held)
        padding.setdefault(logical, []).extend(padding_of(held, torch.Size(shape), getattr(spec, "pad_dim", None)))
        shapes[logical] = torch.Size(shape)
    return {k: LogicalShards(shapes[k], v, padding[k]) for k, v in chunks.items()}
