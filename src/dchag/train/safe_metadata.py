"""Read a distributed checkpoint's `.metadata` without running code from the file.

torch.distributed.checkpoint writes its metadata with `pickle` and reads it back with plain
`pickle.load`, which calls whatever callable the file names: a crafted checkpoint could run code on the
machine that loads it. `SafeFileSystemReader` reads the same file through an unpickler that admits only
the classes DCP's metadata is made of (tensor sizes, dtypes, chunk descriptions) and refuses anything
else with a one-line error. The tensor data files themselves are read by DCP with
`torch.load(weights_only=True)`, which is already restricted.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from dchag.config import ConfigError

_ALLOWED: dict[str, set[str]] = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "ChunkStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class CheckpointError(ConfigError):
    """A checkpoint cannot be written, read, or does not fit the model being trained (one line, exit code 2)."""

    kind = "checkpoint error"


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file names something other than checkpoint metadata: it is refused, unread."""


class MetadataUnpickler(pickle.Unpickler):
    """Admits only the types DCP's metadata consists of, plus torch dtypes."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpoint(
            f"checkpoint metadata {self.path!r} refers to {module}.{name}, which checkpoint metadata never "
            "contains; refusing to load it (the file may have been tampered with)"
        )


def read_metadata_safely(path: str | Path) -> Metadata:
    """The `Metadata` object of a DCP `.metadata` file, read with `MetadataUnpickler`."""
    path = str(path)
    try:
        with open(path, "rb") as handle:
            metadata = MetadataUnpickler(handle, path).load()
    except UnsafeCheckpoint:
        raise
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint metadata {path!r} does not exist (incomplete checkpoint?)") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(
            f"checkpoint metadata {path!r} is damaged or truncated ({err}); use another checkpoint"
        ) from err
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"checkpoint metadata {path!r} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file-system reader with `.metadata` read through `MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        metadata = read_metadata_safely(self._get_metadata_path(rank))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
