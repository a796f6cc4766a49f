"""What a resume may change: the layout and the bookkeeping, not the run.

"Exact resume" means the resumed run continues the numbers the uninterrupted run would have produced.
That holds under any parallel layout (the model is defined by its hierarchy, and the data position,
dropout and masks follow from the step), but not when the batch, the data, the model, the precision or
the schedule change. Those changes are refused with the list of differences, unless the user passes
`--resume-changed` (then they are logged and recorded in summary.yaml). Extending `train.steps` is
allowed: it is how a run is continued.
"""

from __future__ import annotations

from pathlib import Path

from dchag.config import Config, ConfigError, config_from_dict, to_dict
from dchag.train.safe_metadata import CheckpointError

# keys (or sections, ending in ".") whose change leaves the run's numbers as they were
MAY_CHANGE = (
    "parallel.",  # the layout, timeouts, activation checkpointing, compile (not bf16_params: see below)
    "train.steps",
    "train.log_every",
    "train.log_grad_norms",  # reads the gradients, never changes them
    "train.checkpoint_every",
    "train.checkpoint_every_minutes",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "train.eval_every",  # validation reads the model, never changes it
    "train.eval_samples",
    "train.device",
    "data.workers",
    "data.prefetch",
    "model.fused_front_end",  # the same function computed without materializing the channel tokens
    "train.rollout_checkpointing",  # the same rollout, its activations recomputed in backward
    "train.init_from",  # read at a fresh start only: a resume continues from its checkpoint
)
CHANGES_NUMBERS = ("parallel.bf16_params",)  # FSDP's parameter dtype: a precision change
SHOWN = 6  # differences named in the one-line error


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key not in ("select", "split", "wavelengths"):  # sections, not values
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _may_change(key: str) -> bool:
    if key in CHANGES_NUMBERS:
        return False
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def _normalised(saved: dict) -> dict:
    """The saved config with today's defaults for fields it predates (an older dchag wrote it)."""
    try:
        return to_dict(config_from_dict(saved))
    except ConfigError:
        return saved


def config_changes(saved: dict, cfg: Config) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every setting that differs and breaks exact resumption."""
    old, new = _flat(_normalised(saved)), _flat(to_dict(cfg))
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k) and not _may_change(k)]


def _short(value: object, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def check_resumable(state: dict, cfg: Config, path: Path, *, allow_changed: bool) -> list[tuple]:
    """Refuse a resume that would not continue the same run; returns the accepted changes (for the
    summary) when `allow_changed`. Also refuses a checkpoint with no steps left to train."""
    saved = state.get("channels")
    if saved is not None and list(saved) != list(cfg.channels):
        differ = next(
            (i for i, (a, b) in enumerate(zip(saved, cfg.channels)) if a != b), min(len(saved), len(cfg.channels))
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} was trained on {len(saved)} channels, this config gives {len(cfg.channels)} "
            f"(first difference at position {differ}); resume with the same data.channels"
        )
    changes = config_changes(state["config"], cfg) if "config" in state else []
    if changes and not allow_changed:
        shown = ", ".join(f"{k} {_short(old)} -> {_short(new)}" for k, old, new in changes[:SHOWN])
        more = f" and {len(changes) - SHOWN} more" if len(changes) > SHOWN else ""
        raise CheckpointError(
            f"checkpoint {str(path)!r} was trained with other settings: {shown}{more}; resuming would not "
            "continue the same run: use its settings, or pass --resume-changed to resume anyway"
        )
    if state["step"] >= cfg.train.steps:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is at step {state['step']}, and train.steps={cfg.train.steps}: nothing is "
            "left to train; raise train.steps to continue"
        )
    return changes
