"""Sharded, atomic training checkpoints (torch.distributed.checkpoint) and resuming from them.

A checkpoint is a folder `RUN/checkpoints/step-00000100/` holding
    .metadata, __<rank>_0.distcp   the model's weights and AdamW's state, by logical (single-device)
                                   name and shape; each rank wrote only the chunks it holds
    train_state.json               step, config, layout, format version (all a resume needs besides
                                   tensors: the data position and every random draw follow from the
                                   step and the seed)
    stats.json                     the data's normalisation statistics (file-backed sources)

Every rank writes into `RUN/checkpoints/.partial-step-...`; when all have finished, rank 0 adds
train_state.json (written last, fsynced) and renames the folder to its final name, an atomic step on
POSIX file systems. A crash or a full disk before the rename leaves only a `.partial-` folder, which is
never read and is removed by the next save; the previous checkpoints are untouched. Only the newest
`train.keep_checkpoints` complete checkpoints are kept.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.fsdp import FSDPModule

from dchag.config import ConfigError
from dchag.parallel.logical_shards import LogicalShards, logical_shards
from dchag.train.safe_metadata import CheckpointError, SafeFileSystemReader, read_metadata_safely

FORMAT_VERSION = 1
STATE_FILE = "train_state.json"
STATS_FILE = "stats.json"
CHECKPOINTS = "checkpoints"


@contextlib.contextmanager
def _dcp_call():
    """DCP warns that it "assumes a single process" when no process group runs: that is our intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoint_dir(run: str | Path, step: int) -> Path:
    return Path(run) / CHECKPOINTS / f"step-{step:08d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / STATE_FILE).is_file()


def _recorded_step(path: Path) -> int:
    try:
        return int(json.loads((path / STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1  # unreadable: never taken as the newest


def complete_checkpoints(run: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first by the step recorded inside them (not by name)."""
    root = Path(run) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and is_complete(p)]
    return sorted(found, key=lambda p: (_recorded_step(p), p.name))


def resolve_resume(resume: str | None, run: str | Path | None) -> Path | None:
    """The checkpoint folder `--resume` names: "auto" (the run's newest complete checkpoint, or None to
    start fresh), a checkpoint folder, or a run folder (its newest)."""
    if resume is None:
        return None
    if resume == "auto":
        if run is None:
            raise CheckpointError("--resume auto needs --out (the run folder whose checkpoints to resume)")
        found = complete_checkpoints(run)
        return found[-1] if found else None
    path = Path(resume)
    if is_complete(path):
        return path
    if path.is_dir() and complete_checkpoints(path):
        return complete_checkpoints(path)[-1]
    if path.is_dir() and (path / ".metadata").is_file():
        raise CheckpointError(f"--resume {resume!r}: the checkpoint has no {STATE_FILE} (an incomplete save?)")
    raise CheckpointError(f"--resume {resume!r} is neither a checkpoint folder nor a run folder with checkpoints")


# ---------------------------------------------------------------------------------------------------
# what a checkpoint holds


def ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter AdamW's initial state (step 0, zero moments) where it has none yet, so that
    every rank saves and loads the same keys. AdamW treats this state exactly like its own first one."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and not optimizer.state[p]:
                optimizer.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }


def checkpoint_tensors(model: torch.nn.Module, plan, optimizer: torch.optim.Optimizer | None) -> dict:
    """{key: LogicalShards or tensor}: `model.<name>` weights, `optim.<state>.<name>` moments under their
    single-device names, and `optim.step` (AdamW's step count, the same for every parameter)."""
    for module in model.modules():  # FSDP2 leaves the root's weights gathered after a no-grad forward
        if isinstance(module, FSDPModule):  # (validation): its registered parameters are then not the
            module.reshard()  # sharded ones the optimizer holds, and their moments would be left out
    tensors: dict = {f"model.{k}": v for k, v in logical_shards(model, plan, lambda p: p).items()}
    if optimizer is None:
        return tensors
    ensure_optimizer_state(optimizer)
    keys = sorted({k for state in optimizer.state.values() for k in state if k != "step"})
    for key in keys:
        shards = logical_shards(
            model, plan, lambda p, key=key: optimizer.state[p].get(key) if p in optimizer.state else None
        )
        tensors.update({f"optim.{key}.{k}": v for k, v in shards.items()})
    steps = [state["step"] for state in optimizer.state.values() if "step" in state]
    tensors["optim.step"] = steps[0].detach().clone().float().cpu() if steps else torch.tensor(0.0)
    return tensors


class _SavePlanner(DefaultSavePlanner):
    """DCP's planner, for a flat state dict whose values may be `LogicalShards` (DCP's own flattening
    would not keep them)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index):
        obj = self.state_dict[index.fqn]
        return obj.__get_tensor_shard__(index) if isinstance(obj, LogicalShards) else super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        shards = dict(state_dict)
        super().set_up_planner(state_dict, metadata, is_coordinator)
        # DCP's meta-tensor initialisation replaces values it does not know (ours) by None: put them back
        self.state_dict.update(shards)

    def lookup_tensor(self, index):
        obj = self.state_dict[index.fqn]
        return obj.__get_tensor_shard__(index) if isinstance(obj, LogicalShards) else super().lookup_tensor(index)


# ---------------------------------------------------------------------------------------------------
# saving


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(value, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def agree(error: str, exc: type[Exception] = CheckpointError) -> None:
    """Raise the first rank's error on every rank as `exc` (a failed file operation on rank 0 must not
    leave the others waiting in the next collective)."""
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    found = [e for e in errors if e]
    if found:
        raise exc(found[0])


def save_checkpoint(
    run: str | Path,
    step: int,
    model: torch.nn.Module,
    plan,
    optimizer: torch.optim.Optimizer | None,
    train_state: dict,
    stats: dict | None,
    keep: int,
) -> Path:
    """Write the checkpoint of `step` (every rank calls this); returns its folder."""
    run = Path(run)
    final = checkpoint_dir(run, step)
    partial = final.with_name(f".partial-{final.name}")
    main = not dist.is_initialized() or dist.get_rank() == 0
    error = ""
    if main:
        try:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        except OSError as err:
            error = f"cannot create checkpoint folder {str(partial)!r}: {err.strerror or err}"
    agree(error)
    try:
        with _dcp_call():
            dcp.save(
                checkpoint_tensors(model, plan, optimizer),
                storage_writer=FileSystemWriter(partial, single_file_per_rank=True, sync_files=True),
                planner=_SavePlanner(),
            )
    except (Exception, CheckpointException) as err:  # DCP raises any rank's failure on every rank
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        previous = complete_checkpoints(run)
        kept = f"; the previous checkpoint {str(previous[-1])!r} is intact" if previous else ""
        raise CheckpointError(
            f"writing checkpoint {str(final)!r} failed: {_first_line(err)}{kept} ({_save_hint(err, plan)})"
        ) from err
    if main:
        try:
            if stats is not None:
                write_json_atomic(partial / STATS_FILE, stats)
            write_json_atomic(partial / STATE_FILE, {"format_version": FORMAT_VERSION, "step": step, **train_state})
            _fsync_dir(partial)
            replaced = final.with_name(f".replaced-{final.name}")
            if final.exists():  # a checkpoint of this step from an earlier attempt: swap it out
                shutil.rmtree(replaced, ignore_errors=True)
                os.rename(final, replaced)
            os.rename(partial, final)
            _fsync_dir(final.parent)
            shutil.rmtree(replaced, ignore_errors=True)
            for old in complete_checkpoints(run)[:-keep] if keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as err:
            error = f"committing checkpoint {str(final)!r} failed: {err.strerror or err}"
    agree(error)
    return final


def _first_line(err: BaseException) -> str:
    """The cause of a DCP failure in one line: the first failing rank's exception (DCP wraps them)."""
    if isinstance(err, CheckpointException) and err.failures:
        rank, (cause, _) = next(iter(sorted(err.failures.items(), key=lambda kv: kv[0])))
        return f"rank {rank}: {_first_line(cause)}"
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}" + (f" ({err.filename})" if err.filename else "")
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def _cause(err: BaseException) -> BaseException:
    """The exception behind DCP's wrapping: the lowest failing rank's."""
    while isinstance(err, CheckpointException) and err.failures:
        err = min(err.failures.items(), key=lambda kv: kv[0])[1][0]
    return err


def _file_system_hint(cause: OSError, folder: str) -> str:
    """What to do about a failed file operation, by its kind (only these name disk space or permissions)."""
    if cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return f"free disk space on the file system of {folder}"
    if cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"fix the permissions of {folder} (or give another folder)"
    if cause.errno == errno.ENOENT:
        return f"a file of {folder} is missing: was it moved or deleted meanwhile?"
    return f"a file-system error in {folder}: check that file system"


def _layout(plan) -> str:
    if plan is None:
        return "one process"
    d = plan.dims
    return f"parallel.tp={d.tp} dp_shard={d.dp_shard} dp_replicate={d.dp_replicate} cp={d.cp}"


def _save_hint(err: BaseException, plan) -> str:
    """Name the real cause of a failed save: the file system (with its kind), host memory, or, for
    anything else (DCP refusing our shard plan, a planning exception), a bug of dchag's layout code."""
    cause = _cause(err)
    if isinstance(cause, OSError):
        return _file_system_hint(cause, "the run folder")
    if isinstance(cause, MemoryError):
        return "out of host memory while staging the checkpoint: lower train.batch_size or use more ranks"
    what = (
        "the ranks' shards do not tile the model's tensors"
        if "validate global plan" in str(cause)
        else "the checkpoint could not be planned"
    )
    return f"internal error: {what} under {_layout(plan)}; please report it with the config"


def _read_hint(err: BaseException) -> str:
    """Name the real cause of a failed read: the file system, a damaged data file, or a bug."""
    cause = _cause(err)
    if isinstance(cause, OSError):
        return _file_system_hint(cause, "the checkpoint folder")
    if isinstance(cause, (EOFError, pickle.UnpicklingError)) or "PytorchStreamReader" in str(cause):
        return "a damaged or truncated data file? resume from an older checkpoint"
    return "internal error: the checkpoint's chunks could not be read into this layout; please report it"


# ---------------------------------------------------------------------------------------------------
# loading


def read_train_state(path: str | Path) -> dict:
    """The checkpoint's train_state.json, checked for format version."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist (or is not a folder)")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {str(path)!r} has no {STATE_FILE} (an incomplete save?)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r}: {STATE_FILE} is damaged ({err})") from err
    version = state.get("format_version") if isinstance(state, dict) else None
    if not isinstance(version, int):
        raise CheckpointError(f"checkpoint {str(path)!r}: {STATE_FILE} has no format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version}, newer than this dchag reads ({FORMAT_VERSION}); "
            "upgrade dchag"
        )
    return state


def read_stats(path: str | Path) -> dict | None:
    file = Path(path) / STATS_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def check_fits(path: Path, tensors: dict) -> None:
    """One-line errors for a checkpoint of another model: keys missing or unexpected, shapes differing."""
    metadata = read_metadata_safely(path / ".metadata").state_dict_metadata
    wanted = {k for k in tensors if k.startswith("model.")}
    saved = {k for k in metadata if k.startswith("model.")}
    missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
    hint = "(saved from another model or channel list? resume with the config that wrote it)"
    if missing:
        raise CheckpointError(
            f"checkpoint {str(path)!r} lacks {len(missing)} weight(s) of this model, e.g. {missing[0][6:]!r} {hint}"
        )
    if unexpected:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds {len(unexpected)} weight(s) this model has not, e.g. "
            f"{unexpected[0][6:]!r} {hint}"
        )
    for key, value in tensors.items():
        md = metadata.get(key)
        if md is None:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks {key!r} (written without optimizer state?)")
        if hasattr(md, "size") and tuple(md.size) != tuple(value.size()):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: {key[6:] if key.startswith('model.') else key} has shape "
                f"{list(md.size)}, this model {list(value.size())} {hint}"
            )


def _read(path: Path, tensors: dict, **load_kwargs) -> None:
    """DCP's load through the safe metadata reader; any failure as one line."""
    try:
        with _dcp_call():
            dcp.load(tensors, storage_reader=SafeFileSystemReader(path), **load_kwargs)
    except ConfigError:
        raise
    except (Exception, CheckpointException) as err:
        raise CheckpointError(
            f"reading checkpoint {str(path)!r} failed: {_first_line(err)} ({_read_hint(err)})"
        ) from err


def load_checkpoint(path: str | Path, model: torch.nn.Module, plan, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load weights (and AdamW's state) into this rank's shards, in place; returns train_state.json.
    Every rank calls this; each reads only the chunks it holds, whatever layout wrote them."""
    path = Path(path)
    state = read_train_state(path)
    tensors = checkpoint_tensors(model, plan, optimizer)
    check_fits(path, tensors)
    _read(path, tensors, planner=_LoadPlanner())
    if optimizer is not None:
        for p_state in optimizer.state.values():
            p_state["step"].copy_(tensors["optim.step"])
    return state


def read_shards(path: str | Path, shards: dict[str, LogicalShards]) -> None:
    """Read the chunks `shards` describe ({logical weight name: this rank's chunks}, in the checkpoint's
    shapes) from checkpoint `path` into their tensors, in place; every rank calls this (fine-tuning's
    `train.init_from`, which maps a new model's rows onto a pretrained model's)."""
    _read(Path(path), {f"model.{k}": v for k, v in shards.items()}, planner=_LoadPlanner())


def read_logical_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The whole model as the single-device state_dict (one process; for eval and export)."""
    path = Path(path)
    read_train_state(path)
    metadata = read_metadata_safely(path / ".metadata").state_dict_metadata
    tensors = {
        k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in metadata.items() if k.startswith("model.")
    }
    _read(path, tensors, no_dist=True)
    return {k[len("model.") :]: v for k, v in tensors.items()}
