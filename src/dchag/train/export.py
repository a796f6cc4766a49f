"""Exports for inference and sharing: the logical (single-device) state_dict as safetensors.

safetensors holds raw tensors and a JSON header, nothing executable, so loading an exported file from
anywhere cannot run code (unlike a pickled `torch.save` file). The run's config travels in the header's
metadata, with the channel names resolved (a spectral cube's `channels: all` becomes its band names), so
`load_exported` can rebuild the model without the run folder or its data.

`export_folder` writes what others need to use the model: `model.safetensors`, `config.yaml`,
`stats.json` (the normalisation statistics, when the run has them) and a `README.md` model card; the
folder appears whole (written beside it, then renamed) or not at all. `dchag.load` reads it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from dchag.config import Config, ConfigError, ParallelConfig, to_dict
from dchag.configure import load_config_dict
from dchag.data.held_out import FILE_BACKED
from dchag.model import build_model
from dchag.train.checkpoint import CheckpointError, complete_checkpoints
from dchag.train.run_weights import SINGLE_PROCESS, RunWeights, load_run_weights

CONFIG_KEY = "dchag_config"
WEIGHTS_FILE, CONFIG_FILE, STATS_FILE, CARD_FILE = "model.safetensors", "config.yaml", "stats.json", "README.md"


def resolved_config_dict(cfg: Config) -> dict:
    """The config as a file holds it, with the channel lists written out by name: it loads without the
    training data (which `data.channels: all` or a channel count would need to name the channels).
    Where a fine-tuned run started is left out (`train.init_from`, and `train.freeze`, which is refused
    without it): it names a path of the training machine that the export does not carry, so training from
    the exported config trains the architecture from scratch (`train.lr_scale`, valid alone, is kept).
    The model card records both."""
    data = to_dict(cfg)
    data["data"]["channels"] = cfg.channels
    data["data"]["out_channels"] = cfg.out_channels
    data["train"].update(init_from=None, freeze=[])
    return data


def export_weights(run: str | Path, out: str | Path | None = None, *, checkpoint: str | Path | None = None) -> Path:
    """Write the weights of `checkpoint` (default: the run's newest) to `out` (default RUN/model.safetensors)."""
    run = Path(run)
    if checkpoint is None:
        found = complete_checkpoints(run)
        if not found:
            raise CheckpointError(f"--run {str(run)!r} has no complete checkpoint in {str(run / 'checkpoints')!r}")
        checkpoint = found[-1]
    checkpoint = Path(checkpoint)
    out = Path(out) if out is not None else run / WEIGHTS_FILE
    if out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a folder; give a file name like model.safetensors")
    loaded = load_run_weights(run, checkpoint)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        _save_weights(loaded, tmp)
        tmp.replace(out)
    except OSError as err:
        raise ConfigError(f"cannot write {str(out)!r}: {err.strerror or err}") from None
    return out


def _save_weights(loaded: RunWeights, path: Path) -> None:
    weights = {k: v.contiguous() for k, v in loaded.model.state_dict().items()}
    config = json.dumps(resolved_config_dict(loaded.config))
    save_file(weights, str(path), metadata={CONFIG_KEY: config, "step": str(loaded.step)})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors writes owner-only; an export is for sharing


def export_folder(
    run: str | Path, out: str | Path, *, checkpoint: str | Path | int | None = None, overwrite: bool = False
) -> Path:
    """Write the export folder `out` (model.safetensors, config.yaml, stats.json, README.md) of the
    weights of `checkpoint` (default: the run's newest). An existing non-empty `out` is replaced only
    with `overwrite`."""
    from dchag.train.model_card import model_card

    run, out = Path(run), Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder (or a name ending in .safetensors)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {str(out)!r} is not empty; give a new or empty folder, or add --overwrite")
    target, own = out.resolve(), run.resolve()
    if target == own or target in own.parents or (own / "checkpoints") in (target, *target.parents):
        raise ConfigError(f"--out {str(out)!r} would replace the run's own files; give a folder outside them")
    if not complete_checkpoints(run):
        raise CheckpointError(f"--run {str(run)!r} has no complete checkpoint in {str(run / 'checkpoints')!r}")
    loaded = load_run_weights(run, checkpoint)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _save_weights(loaded, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(resolved_config_dict(loaded.config), sort_keys=False))
        if loaded.stats is not None:
            (tmp / STATS_FILE).write_text(json.dumps(loaded.stats))
        (tmp / CARD_FILE).write_text(model_card(run, loaded))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(f"cannot write {str(out)!r}: {err.strerror or err}") from None
    return out


def is_export_folder(path: str | Path) -> bool:
    """`path` is an export folder (model.safetensors, no complete checkpoint): a run folder that
    `dchag export --out RUN/model.safetensors` wrote into is still read as a run (its checkpoints win)."""
    path = Path(path)
    return path.is_dir() and not complete_checkpoints(path) and (path / WEIGHTS_FILE).is_file()


def load_export_folder(path: str | Path, *, data_path: str | None = None) -> RunWeights:
    """The model of an export folder on the CPU, eval mode, with its statistics (single process).
    `data_path` points the config at another file holding the same variables (the export names the
    training machine's)."""
    path = Path(path)
    overrides = list(SINGLE_PROCESS) + ([f"data.path={data_path}"] if data_path is not None else [])
    cfg, weights = load_exported(path / WEIGHTS_FILE, overrides=overrides)
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig())
    model = build_model(cfg)
    model.load_state_dict(weights)
    return RunWeights(cfg, model.eval(), export_stats(path, cfg), path / WEIGHTS_FILE, exported_step(path))


def export_stats(path: str | Path, cfg: Config) -> dict | None:
    """The export folder's normalisation statistics (None: synthetic data); refused when a file-backed
    model lacks them."""
    path = Path(path)
    stats = json.loads((path / STATS_FILE).read_text()) if (path / STATS_FILE).is_file() else None
    if stats is None and cfg.data.kind in FILE_BACKED:
        raise ConfigError(
            f"export folder {str(path)!r} has no {STATS_FILE}, the normalisation statistics its model was trained "
            "with; export it again with dchag export"
        )
    return stats


def exported_step(path: str | Path) -> int:
    """The training step of the export folder's weights (-1 when unrecorded)."""
    with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt") as handle:
        return int((handle.metadata() or {}).get("step", -1))


def exported_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """The config in an exported file's header (`overrides` applied), without reading its tensors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise _not_safetensors(path, err) from None
    if CONFIG_KEY not in metadata:
        raise ConfigError(f"weights file {str(path)!r} carries no dchag config; export it with dchag export")
    return load_config_dict(json.loads(metadata[CONFIG_KEY]), overrides)


def _not_safetensors(path: Path, err: Exception) -> ConfigError:
    return ConfigError(
        f"weights file {str(path)!r} is not a safetensors file ({str(err).splitlines()[0][:200]}); "
        "export one with dchag export"
    )


def load_exported(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, dict[str, torch.Tensor]]:
    """(config, state_dict) of an exported file (config `overrides` applied); never unpickles anything."""
    path = Path(path)
    cfg = exported_config(path, overrides)
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise _not_safetensors(path, err) from None
    return cfg, weights
