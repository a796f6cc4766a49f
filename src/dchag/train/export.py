"""Single-file weights for inference and sharing: the logical (single-device) state_dict as safetensors.

safetensors holds raw tensors and a JSON header, nothing executable, so loading an exported file from
anywhere cannot run code (unlike a pickled `torch.save` file). The run's config travels in the header's
metadata, so `load_exported` can rebuild the model without the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dchag.config import Config, ConfigError
from dchag.configure import load_config_dict
from dchag.train.checkpoint import CheckpointError, complete_checkpoints, read_logical_weights, read_train_state

CONFIG_KEY = "dchag_config"


def export_weights(run: str | Path, out: str | Path | None = None, *, checkpoint: str | Path | None = None) -> Path:
    """Write the weights of `checkpoint` (default: the run's newest) to `out` (default RUN/model.safetensors)."""
    run = Path(run)
    if checkpoint is None:
        found = complete_checkpoints(run)
        if not found:
            raise CheckpointError(f"--run {str(run)!r} has no complete checkpoint in {str(run / 'checkpoints')!r}")
        checkpoint = found[-1]
    checkpoint = Path(checkpoint)
    state = read_train_state(checkpoint)
    weights = {k: v.contiguous() for k, v in read_logical_weights(checkpoint).items()}
    out = Path(out) if out is not None else run / "model.safetensors"
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give a file name like model.safetensors")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        save_file(weights, str(tmp), metadata={CONFIG_KEY: json.dumps(state["config"]), "step": str(state["step"])})
        tmp.replace(out)
    except OSError as err:
        raise ConfigError(f"cannot write {str(out)!r}: {err.strerror or err}") from None
    return out


def load_exported(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, state_dict) of an exported file; never unpickles anything."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(
            f"weights file {str(path)!r} is not a safetensors file ({str(err).splitlines()[0][:200]}); "
            "export one with dchag export"
        ) from None
    if CONFIG_KEY not in metadata:
        raise ConfigError(f"weights file {str(path)!r} carries no dchag config; export it with dchag export")
    return load_config_dict(json.loads(metadata[CONFIG_KEY])), weights
