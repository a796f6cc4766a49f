"""Typed configuration: dataclasses, loaded from YAML, overridden from the command line, validated once.

Every error raised here is a one-line `ConfigError` that names the offending key and value, so a user
can fix a config file without reading the code.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration value is wrong; the message says which key and what would be right."""


AGGREGATOR_KINDS = ("cross_attention", "linear")
HIERARCHY_PRESETS = ("flat", "dchag-L", "dchag-C", "tree")
DATA_KINDS = ("synthetic-weather", "synthetic-hyperspectral", "era5", "spectral_cube")
SPLITS = ("train", "val", "test")
NAN_MODES = ("error", "mask")
SPLIT_BY = ("region", "file")
REGRID_METHODS = ("bilinear", "conservative")  # data.regrid (era5): how fields reach data.grid
TASKS = ("forecast", "mae")
PARALLEL_MODES = ("dchag", "replicated", "naive")
# model.tokenizer: per-channel weights by name, or computed from each channel's spec (model/channel_spec.py)
TOKENIZERS = ("per_channel", "wavelength", "hypernetwork")
# a spectral channel's name: `b` + its central wavelength in nm (b664.6); the data layer names bands so,
# the model reads their wavelengths from it
BAND_RE = re.compile(r"^b(\d+(?:\.\d+)?)$")
# the top-level parts of ChannelViT that train.freeze and train.lr_scale name (lead_embed: forecast only)
MODEL_PARTS = ("front_end", "pos_embed", "lead_embed", "blocks", "norm", "head")


@dataclass
class LevelConfig:
    """One level of the channel hierarchy: split its input tokens into groups, reduce each group."""

    kind: str = "cross_attention"  # "cross_attention" (learned-query attention) or "linear" (weighted sum)
    groups: int | None = None  # number of contiguous groups; or give group_size instead
    group_size: int | None = None  # channels (tokens) per group; the last groups may be one smaller
    tokens: int = 1  # output tokens per group


@dataclass
class HierarchyConfig:
    """How the C channel tokens of a patch become one token.

    `preset` names a standard shape; `levels` (if given) spells the levels out and overrides it.
    - flat:    one cross-attention over all channels (the ClimaX/ORBIT baseline)
    - dchag-L: `groups` linear poolings, then one cross-attention over their outputs (D-CHAG-L)
    - dchag-C: `groups` cross-attentions, then one cross-attention (D-CHAG-C)
    - tree:    2*`groups` cross-attentions, then `groups`, then one (a three-level tree)
    """

    preset: str | None = "dchag-C"
    groups: int = 4
    levels: list[LevelConfig] = field(default_factory=list)
    heads: int | None = None  # attention heads of the aggregators; default: model.num_heads
    qk_norm: bool = False

    def resolved_levels(self) -> list[LevelConfig]:
        if self.levels:
            return [dataclasses.replace(level) for level in self.levels]
        g = self.groups
        if self.preset == "flat":
            return [LevelConfig("cross_attention", groups=1)]
        if self.preset == "dchag-L":
            return [LevelConfig("linear", groups=g), LevelConfig("cross_attention", groups=1)]
        if self.preset == "dchag-C":
            return [LevelConfig("cross_attention", groups=g), LevelConfig("cross_attention", groups=1)]
        if self.preset == "tree":
            return [
                LevelConfig("cross_attention", groups=2 * g),
                LevelConfig("cross_attention", groups=g),
                LevelConfig("cross_attention", groups=1),
            ]
        raise ConfigError(
            f"model.hierarchy.preset={self.preset!r} is unknown; use one of {HIERARCHY_PRESETS} or give levels"
        )


@dataclass
class ModelConfig:
    img_size: list[int] = field(default_factory=lambda: [32, 64])  # [H, W]
    patch_size: int = 4
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    vocabulary: list[str] | None = None  # channel names the embeddings cover; default: the data's channels
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)
    fused_front_end: bool = True  # compute aggregation without materializing [B, C, L, D] where exact
    tokenizer: str = "per_channel"  # TOKENIZERS: weights per channel name, or from wavelengths (docs/design.md)
    channel_specs: list | None = None  # one per channel: wavelength nm, {wavelength, bandwidth} or {name}
    residual_forecast: bool = False  # forecast the change: prediction = head output + the input field
    visible_norm: bool = False  # MAE: standardise each sample's bands by its visible pixels, scale back (RevIN)
    decoder_dim: int = 128  # MAE decoder width
    decoder_depth: int = 2
    decoder_heads: int = 4


@dataclass
class DataConfig:
    kind: str = "synthetic-weather"
    channels: Union[int, str, list[str]] = 16  # a count (synthetic), "all" (spectral_cube) or explicit names
    out_channels: list[str] | None = None  # forecast targets; default: the source's standard targets
    num_samples: int = 512
    seed: int = 0
    max_lead_hours: int = 72  # synthetic: lead time drawn from lead_step_hours .. max_lead_hours
    lead_step_hours: int = 6
    noise: float = 0.01  # synthetic: relative observation noise
    spectra: str = "generated"  # synthetic-hyperspectral: "generated" or "library" (real reflectance spectra)
    # era5 (see docs/data.md): a Zarr store, a netCDF file, or a folder / glob of netCDF files
    path: str | None = None
    select: dict = field(default_factory=dict)  # {dim: value} for extra dimensions (ensemble member, ...)
    grid: Union[str, list[int]] = "native"  # "native" or [H, W]: regridding to the model's grid
    regrid: str = "bilinear"  # era5, how data.grid is reached: "bilinear" or "conservative" (area-weighted, coarsening)
    split: dict = field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})  # fractions or dates
    split_by: str = "region"  # spectral_cube: "region" (tiles of each scene) or "file" (whole files) per split
    lead_hours: list[int] = field(default_factory=lambda: [6, 72])  # era5: [min, max] lead in training
    # spectral_cube (see docs/data.md): band selection, wavelengths, file layout
    bands: list[int] | None = None  # band indices to keep
    wavelength_range: list[float] | None = None  # [min_nm, max_nm] of bands to keep
    wavelengths: dict | None = None  # {start, stop, count} nm: resample the spectrum linearly
    band_wavelengths: list[float] | None = None  # nm per band, when the files do not say
    nodata: float | None = None  # no-data value (default: the file's)
    variable: str | None = None  # array name in .mat / .npz / HDF5 files
    layout: str | None = None  # axis order of array files: "chw", "hwc", ... (default per format)
    workers: int = 2  # DataLoader worker processes per rank (0: load in the training process)
    prefetch: int = 2  # batches each worker prepares ahead
    nan: str = "error"  # NaN in file data: "error" refuses it up front, "mask" masks it out of loss and metrics


@dataclass
class ChannelSubsetConfig:
    """`train.channel_subset`: train on random band subsets (ChannelViT's channel sampling), so that the
    model works with bands missing. A step keeps, with probability `p`, m channels (m uniform in
    [min, max], chosen uniformly), the others left out of the input; drawn from (train.seed, step)."""

    p: float = 0.0  # share of the steps trained on a subset (0: off, every step sees every channel)
    min: int = 1  # fewest channels a subset keeps (>= 1)
    max: int | None = None  # most channels a subset keeps (default: every channel)


@dataclass
class TrainConfig:
    task: str = "forecast"
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    bf16: bool = False
    mask_ratio: float = 0.75  # MAE
    mae_loss_on: str = "all"  # "all" pixels (the paper) or "masked" patches only
    log_every: int = 10
    log_grad_norms: bool = False  # grad_norms {part: norm} before clipping in metrics.jsonl at log_every steps
    checkpoint_every: int = 0  # steps between sharded checkpoints (0: only at the end)
    eval_every: int = 0  # steps between validation losses (val_loss in metrics.jsonl; 0: never)
    eval_samples: int = 64  # held-out samples in that validation set
    checkpoint_every_minutes: float = 30.0  # also save when this much time passed since the last save (0: never)
    keep_checkpoints: int = 3  # complete checkpoints kept in RUN/checkpoints (0: keep all)
    max_bad_steps: int = 10  # steps with a non-finite loss or gradient skipped before training stops
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda"
    rollout_steps: int = 1  # forecast: the loss averaged over this many autoregressive steps at the drawn lead
    rollout_checkpointing: bool = False  # recompute each rollout step's activations in backward
    channel_subset: ChannelSubsetConfig = field(default_factory=ChannelSubsetConfig)  # random band subsets
    init_from: str | None = None  # fine-tuning: weights by name from a run folder, an export folder or a .safetensors
    freeze: list[str] = field(default_factory=list)  # model parts left untrained (MODEL_PARTS)
    lr_scale: dict = field(default_factory=dict)  # {model part: learning-rate multiplier}


@dataclass
class ParallelConfig:
    tp: int = 1
    dp_shard: int = 1
    dp_replicate: int = 1
    cp: int = 1  # context parallelism: each of cp ranks holds a strip of patch rows (docs/design.md)
    mode: str = "dchag"  # "dchag", "replicated" (TP-only baseline), "naive" (gather raw tokens)
    activation_checkpointing: bool = False
    compile: bool = False
    bf16_params: bool = False  # FSDP2 MixedPrecisionPolicy(param_dtype=bf16)
    check_replicas_every: int = 100  # steps between checks that TP (and CP) replicated weights agree (0: never)
    timeout_s: float = 600.0  # a collective waiting longer than this for a peer ends the job with an error


@dataclass(frozen=True)
class ChannelLists:
    """The channel names a config resolves to: set by `dchag.configure` (the data layer names them,
    e.g. by reading a spectral cube's wavelengths), never written in a file."""

    channels: tuple[str, ...]
    out_channels: tuple[str, ...]


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    resolved: ChannelLists | None = field(default=None, repr=False)  # set by dchag.configure.resolve

    # ---- derived from `resolved` ----------------------------------------------------------------
    def _lists(self) -> ChannelLists:
        if self.resolved is None:
            raise ConfigError("the config's channels are not resolved yet: load it with dchag.configure.load_config")
        return self.resolved

    @property
    def channels(self) -> list[str]:
        return list(self._lists().channels)

    @property
    def vocabulary(self) -> list[str]:
        return list(self.model.vocabulary) if self.model.vocabulary else self.channels

    @property
    def out_channels(self) -> list[str]:
        return list(self._lists().out_channels)


# ---------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type (expected {_type_name(tp)})")
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, dict) or value is None:
            raise ConfigError(f"{key}={value!r} must be a list")
        if not isinstance(value, (list, tuple)):  # `--set key=5` where a list is expected: a list of one
            value = [value]
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return dict(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} must be a string")
        return value
    return value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """The config dataclass `cls` (training or probe) from a mapping: each value coerced to its field's type,
    an unknown key refused naming the keys known there; nothing else is checked (that is `validate`'s job)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "resolved"]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key {full!r} (known keys here: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """The config as a file holds it (resolved channel lists left out)."""
    data = dataclasses.asdict(cfg)
    data.pop("resolved", None)
    return data


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.embed_dim=256` -> (["model", "embed_dim"], 256); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str) and _FLOAT_RE.match(value):  # YAML 1.1 reads "1e-3" as a string
        value = float(value)
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return data


def parse_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults), apply `key=value` overrides, check every field.
    The channel names are resolved on top of this by `dchag.configure.load_config`."""
    data = read_yaml_mapping(path) if path is not None else {}
    return config_from_dict(data, overrides)


def read_yaml_mapping(path: str | Path) -> dict:
    """The mapping a YAML config file holds (any config kind: training, probe), with one-line errors for a
    missing file, a folder, a binary file, invalid YAML and a top level that is not a mapping."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text file; give a YAML config") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}: {problem}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a folder; give a YAML file") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return loaded or {}


def config_from_dict(data: dict, overrides: list[str] | None = None) -> Config:
    """A config from a mapping (as `to_dict` writes it), with `key=value` overrides, fields checked."""
    data = apply_overrides(dict(data), overrides or [])
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------
# validation


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def check_finite(section: Any, prefix: str) -> None:
    """Every float field of the config section (training or probe) is a finite number (NaN and Inf pass
    most range checks)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            check_finite(value, key)
        elif isinstance(value, float):
            _check(math.isfinite(value), f"{key}={value} must be a finite number")


def _check_nan_mode(d) -> None:
    """data.nan decides what NaN pixels in file data do (docs/data.md)."""
    _check(d.nan in NAN_MODES, f"data.nan={d.nan!r} is unknown; use 'error' (refuse NaN) or 'mask' (mask it out)")


def validate(cfg: Config) -> None:
    """Check every field once, section by section; the first problem raises a one-line ConfigError."""
    for name in ("model", "data", "train", "parallel"):
        check_finite(getattr(cfg, name), name)
    _validate_model(cfg.model)
    _validate_data(cfg.data, cfg.model)
    _validate_train(cfg.train)
    _validate_parallel(cfg.parallel, cfg.model, cfg.train)


def _validate_model(m: ModelConfig) -> None:
    _check(len(m.img_size) == 2, f"model.img_size={m.img_size} must be [height, width]")
    _check(m.patch_size >= 1, f"model.patch_size={m.patch_size} must be >= 1")
    for name, size in zip(("height", "width"), m.img_size):
        _check(
            size > 0 and size % m.patch_size == 0,
            f"model.img_size {name} {size} is not divisible by model.patch_size={m.patch_size}",
        )
    _check(
        m.embed_dim >= 1 and m.depth >= 0, f"model.embed_dim={m.embed_dim} and model.depth={m.depth} must be positive"
    )
    _check(
        m.num_heads >= 1 and m.embed_dim % m.num_heads == 0,
        f"model.num_heads={m.num_heads} does not divide model.embed_dim={m.embed_dim}",
    )
    agg_heads = m.hierarchy.heads or m.num_heads
    _check(
        agg_heads >= 1 and m.embed_dim % agg_heads == 0,
        f"model.hierarchy.heads={agg_heads} does not divide model.embed_dim={m.embed_dim}",
    )
    _check(
        m.decoder_heads >= 1 and m.decoder_dim % m.decoder_heads == 0,
        f"model.decoder_heads={m.decoder_heads} does not divide model.decoder_dim={m.decoder_dim}",
    )
    _check(0.0 <= m.drop_rate < 1.0, f"model.drop_rate={m.drop_rate} must be in [0, 1)")
    _check(m.mlp_ratio > 0, f"model.mlp_ratio={m.mlp_ratio} must be > 0")
    _check(
        m.decoder_dim >= 1 and m.decoder_depth >= 0,
        f"model.decoder_dim={m.decoder_dim} must be >= 1 and model.decoder_depth={m.decoder_depth} >= 0",
    )
    if m.hierarchy.preset is not None and not m.hierarchy.levels:
        _check(
            m.hierarchy.preset in HIERARCHY_PRESETS,
            f"model.hierarchy.preset={m.hierarchy.preset!r} is unknown; use one of {HIERARCHY_PRESETS} or give levels",
        )
    _check(m.hierarchy.preset is not None or bool(m.hierarchy.levels), "model.hierarchy: give a preset or levels")
    _check(m.tokenizer in TOKENIZERS, f"model.tokenizer={m.tokenizer!r} is unknown; use one of {TOKENIZERS}")
    _check(
        m.channel_specs is None or m.tokenizer != "per_channel",
        "model.channel_specs is set but model.tokenizer=per_channel never reads it (its weights are per channel "
        "name); set model.tokenizer: wavelength (or hypernetwork), or drop model.channel_specs",
    )


def _validate_data(d: DataConfig, m: ModelConfig) -> None:
    _check(d.kind in DATA_KINDS, f"data.kind={d.kind!r} is unknown; use one of {DATA_KINDS}")
    if isinstance(d.channels, str):
        _check(
            d.channels == "all" and d.kind == "spectral_cube",
            f"data.channels={d.channels!r}: a string is only allowed as 'all' with data.kind=spectral_cube",
        )
    elif d.kind == "spectral_cube" and isinstance(d.channels, int):
        raise ConfigError("data.kind=spectral_cube needs data.channels: all, or a list of band names like b664.6")
    elif isinstance(d.channels, int):
        _check(d.channels >= 1, f"data.channels={d.channels} must be >= 1")
    else:
        _check(len(d.channels) >= 1, "data.channels is empty")
        dupes = sorted({c for c in d.channels if d.channels.count(c) > 1})
        _check(not dupes, f"data.channels lists {dupes} more than once")
    _check(d.num_samples >= 1, f"data.num_samples={d.num_samples} must be >= 1")
    _check(d.noise >= 0, f"data.noise={d.noise} must be >= 0")
    _check(d.spectra in ("generated", "library"), f"data.spectra={d.spectra!r} must be 'generated' or 'library'")
    _check(d.workers >= 0, f"data.workers={d.workers} must be >= 0 (0 loads in the training process)")
    _check(d.prefetch >= 1, f"data.prefetch={d.prefetch} must be >= 1")
    _check_nan_mode(d)
    _check(
        not (m.visible_norm and d.nan == "mask"),
        "model.visible_norm=true with data.nan=mask: the visible-pixel statistics would count masked NaN "
        "pixels; set data.nan=error or model.visible_norm=false",
    )
    _check(
        d.regrid in REGRID_METHODS,
        f"data.regrid={d.regrid!r} is unknown; use 'bilinear' or 'conservative' (area-weighted, for coarsening)",
    )
    if d.kind == "spectral_cube":
        _validate_spectral_cube(d)
    if d.kind == "era5":
        _validate_era5(d, m)
    _check(
        d.lead_step_hours >= 1 and d.max_lead_hours >= d.lead_step_hours,
        f"data.max_lead_hours={d.max_lead_hours} must be >= data.lead_step_hours={d.lead_step_hours} >= 1",
    )


def _validate_spectral_cube(d: DataConfig) -> None:
    _check(bool(d.path), "data.kind=spectral_cube needs data.path (a cube file, a folder or a glob)")
    chosen = [k for k in ("bands", "wavelength_range", "wavelengths") if getattr(d, k) is not None]
    _check(len(chosen) <= 1, f"data: give at most one of bands, wavelength_range, wavelengths (got {chosen})")
    if d.wavelengths is not None:
        _check(
            set(d.wavelengths) == {"start", "stop", "count"} and int(d.wavelengths["count"]) >= 1,
            f"data.wavelengths={d.wavelengths} must be {{start: NM, stop: NM, count: N}}",
        )
    _check_cube_split(d)


def _check_cube_split(d: DataConfig) -> None:
    """A cube is split by area (tiles) or by file, so its split gives fractions, never dates."""
    _check(d.split_by in SPLIT_BY, f"data.split_by={d.split_by!r} is unknown; use 'region' (tiles) or 'file'")
    bad = sorted(set(d.split) - set(SPLITS))
    _check(not bad, f"data.split has unknown parts {bad}; use {SPLITS}")
    fractions = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.split.values())
    _check(
        fractions and d.split.get("train", 0) > 0 and min(d.split.values()) >= 0 and sum(d.split.values()) <= 1 + 1e-9,
        f"data.split={d.split} must give fractions of the scene area (or files) with train > 0, adding up to at most 1",
    )


def split_range(value) -> tuple[_dt.datetime, _dt.datetime, bool]:
    """(start, end, end_exclusive) of a date-range split part [START, END]. A bare date as END means the
    whole day (end: the next midnight, exclusive); an explicit timestamp keeps its meaning (inclusive)."""
    start, end = (_as_datetime(v) for v in value)
    if _is_bare_date(value[1]):
        return start, end + _dt.timedelta(days=1), True
    return start, end, False


def _is_bare_date(value) -> bool:
    if isinstance(value, _dt.datetime):
        return False
    return isinstance(value, _dt.date) or bool(re.fullmatch(r"\s*\d{4}-\d{2}-\d{2}\s*", str(value)))


def _as_datetime(value) -> _dt.datetime:
    if isinstance(value, _dt.datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, _dt.date):
        return _dt.datetime(value.year, value.month, value.day)
    try:
        return _dt.datetime.fromisoformat(str(value).strip()).replace(tzinfo=None)
    except ValueError:
        raise ConfigError(f"data.split date {value!r} is not a date (YYYY-MM-DD) or a timestamp (YYYY-MM-DDTHH:MM)")


def _fmt(t: _dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M")


def check_split_dates(split: dict, max_lead_hours: float) -> None:
    """Date-range splits name input (initialisation) times; a target may lie up to the lead after its
    split's end, as in WeatherBench 2. Refused: two parts that share a time, and a part whose targets
    (its last input + `max_lead_hours`) reach another part's inputs (that target would be trained on,
    or scored, on both sides)."""
    ranges = sorted((split_range(v) + (k,) for k, v in split.items()), key=lambda r: r[0])
    minute, lead = _dt.timedelta(minutes=1), _dt.timedelta(hours=max_lead_hours)
    for i, (start_a, end_a, excl_a, a) in enumerate(ranges):
        last_a = end_a - minute if excl_a else end_a  # the last input time, as the user reads it
        reach = last_a + lead  # its latest target
        for start_b, end_b, excl_b, b in ranges[i + 1 :]:
            last_b = end_b - minute if excl_b else end_b
            if start_b < end_a or start_b == end_a and not excl_a:
                raise ConfigError(
                    f"data.split parts {a!r} and {b!r} overlap from {_fmt(start_b)} to {_fmt(min(last_a, last_b))}; "
                    "make their date ranges disjoint"
                )
            if start_b < end_a + lead or start_b == end_a + lead and not excl_a:
                raise ConfigError(
                    f"data.split: {a!r} ends {_fmt(last_a)} and its targets reach {max_lead_hours:g} h later, into "
                    f"{b!r} inputs from {_fmt(start_b)} to {_fmt(min(reach, last_b))}; start {b!r} after "
                    f"{_fmt(reach)} or end {a!r} earlier"
                )


def _validate_era5(d: DataConfig, m: ModelConfig) -> None:
    _check(bool(d.path), "data.kind=era5 needs data.path (a Zarr store, a netCDF file, or a folder/glob of them)")
    _check(
        len(d.lead_hours) == 2 and 0 < d.lead_hours[0] <= d.lead_hours[1],
        f"data.lead_hours={d.lead_hours} must be [min, max] with 0 < min <= max (hours)",
    )
    _check(
        d.grid == "native" or (isinstance(d.grid, list) and len(d.grid) == 2 and min(d.grid) > 0),
        f"data.grid={d.grid!r} must be 'native' or [height, width]",
    )
    if d.grid != "native":
        _check(
            list(d.grid) == list(m.img_size),
            f"data.grid={d.grid} differs from model.img_size={m.img_size}; make them equal",
        )
    bad = sorted(set(d.split) - set(SPLITS))
    _check(not bad, f"data.split has unknown parts {bad}; use {SPLITS}")
    _check("train" in d.split, "data.split needs a 'train' part")
    fractions = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.split.values())
    dates = all(isinstance(v, (list, tuple)) and len(v) == 2 for v in d.split.values())
    _check(fractions or dates, f"data.split={d.split} must give every part a fraction or a [start, end] date pair")
    if fractions:
        _check(
            all(v >= 0 for v in d.split.values()) and sum(d.split.values()) <= 1 + 1e-9,
            f"data.split fractions {d.split} must be >= 0 and add up to at most 1",
        )
    if dates:
        check_split_dates(d.split, d.lead_hours[1])
    _check(
        not isinstance(d.channels, int),
        "data.kind=era5 needs data.channels as a list of names, e.g. [t2m, u10, z_500, t_850]",
    )


def _validate_train(t: TrainConfig) -> None:
    _check(t.task in TASKS, f"train.task={t.task!r} is unknown; use one of {TASKS}")
    _check(
        t.steps >= 1 and t.batch_size >= 1, f"train.steps={t.steps} and train.batch_size={t.batch_size} must be >= 1"
    )
    _check(t.lr > 0, f"train.lr={t.lr} must be > 0")
    _check(0 <= t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}]")
    _check(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0")
    _check(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    _check(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 switches clipping off)")
    _check(t.checkpoint_every >= 0, f"train.checkpoint_every={t.checkpoint_every} must be >= 0 (0: only at the end)")
    _check(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0: no validation during training)")
    _check(t.eval_samples >= 1, f"train.eval_samples={t.eval_samples} must be >= 1")
    _check(
        t.checkpoint_every_minutes >= 0,
        f"train.checkpoint_every_minutes={t.checkpoint_every_minutes} must be >= 0 (0: by steps only)",
    )
    _check(t.keep_checkpoints >= 0, f"train.keep_checkpoints={t.keep_checkpoints} must be >= 0 (0: keep all)")
    _check(t.max_bad_steps >= 0, f"train.max_bad_steps={t.max_bad_steps} must be >= 0")
    _check(0.0 < t.mask_ratio < 1.0, f"train.mask_ratio={t.mask_ratio} must be in (0, 1)")
    _check(t.mae_loss_on in ("all", "masked"), f"train.mae_loss_on={t.mae_loss_on!r} must be 'all' or 'masked'")
    _check(t.log_every >= 1, f"train.log_every={t.log_every} must be >= 1")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device={t.device!r} must be auto, cpu or cuda")
    _validate_channel_subset(t.channel_subset)
    _validate_fine_tuning(t)


def _validate_channel_subset(c: ChannelSubsetConfig) -> None:
    """train.channel_subset's own fields (against the channel count: dchag.configure.check_channels)."""
    key = "train.channel_subset"
    _check(0.0 <= c.p <= 1.0, f"{key}.p={c.p} must be in [0, 1] (the share of steps on a band subset; 0: off)")
    _check(c.min >= 1, f"{key}.min={c.min} must be >= 1: a step keeps at least one channel")
    _check(c.max is None or c.max >= c.min, f"{key}.max={c.max} must be >= {key}.min={c.min} (or left out: all)")


def _validate_fine_tuning(t: TrainConfig) -> None:
    """train.rollout_steps, train.freeze and train.lr_scale (train.init_from is checked when training starts)."""
    _check(t.rollout_steps >= 1, f"train.rollout_steps={t.rollout_steps} must be >= 1 (1: one-step forecasts)")
    _check(
        t.rollout_steps == 1 or t.task == "forecast",
        f"train.rollout_steps={t.rollout_steps} needs train.task=forecast ({t.task} has no forecast to roll out)",
    )
    parts = [p for p in MODEL_PARTS if p != "lead_embed" or t.task == "forecast"]
    for key, names in (("train.freeze", list(t.freeze)), ("train.lr_scale", list(t.lr_scale))):
        bad = [n for n in names if n not in parts]
        _check(not bad, f"{key} names unknown model part(s) {bad}; use some of {parts}")
    _check(len(set(t.freeze)) < len(parts), f"train.freeze={t.freeze} freezes every part: nothing is left to train")
    for part, scale in t.lr_scale.items():
        ok = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0
        _check(ok, f"train.lr_scale.{part}={scale!r} must be a number > 0 (to stop training a part: train.freeze)")
    _check(t.init_from is None or bool(t.init_from.strip()), "train.init_from is empty; give a run folder or omit it")
    _check(
        not t.freeze or t.init_from is not None,
        f"train.freeze={t.freeze} without train.init_from would freeze random initial weights; "
        "set train.init_from to a trained run, or leave train.freeze out",
    )


def _validate_parallel(p: ParallelConfig, m: ModelConfig, t: TrainConfig) -> None:
    for name in ("tp", "dp_shard", "dp_replicate", "cp"):
        _check(getattr(p, name) >= 1, f"parallel.{name}={getattr(p, name)} must be >= 1")
    rows = m.img_size[0] // m.patch_size
    _check(
        p.cp <= rows,
        f"parallel.cp={p.cp} exceeds the {rows} patch rows (model.img_size height {m.img_size[0]} / "
        f"model.patch_size={m.patch_size}): every context-parallel rank needs at least one row",
    )
    _check(
        p.cp == 1 or m.drop_rate == 0.0 or t.task == "forecast",
        f"model.drop_rate={m.drop_rate} with parallel.cp={p.cp} and train.task=mae: dropout of a "
        "context-parallel MAE is not supported (forecasting is); set model.drop_rate=0 or parallel.cp=1",
    )
    _check(
        not m.visible_norm or t.task == "mae",
        f"model.visible_norm=true with train.task={t.task!r}: it standardises an MAE's input by its visible "
        "pixels; set model.visible_norm=false (a forecast model reads every pixel)",
    )
    _check(
        p.cp == 1 or not p.compile,
        f"parallel.compile=true with parallel.cp={p.cp}: compiling blocks with the context-parallel key/value "
        "exchange is not tested; set parallel.compile=false or parallel.cp=1",
    )
    _check(
        p.check_replicas_every >= 0,
        f"parallel.check_replicas_every={p.check_replicas_every} must be >= 0 (0 switches the check off)",
    )
    _check(p.timeout_s > 0, f"parallel.timeout_s={p.timeout_s} must be > 0 (seconds)")
    _check(p.mode in PARALLEL_MODES, f"parallel.mode={p.mode!r} is unknown; use one of {PARALLEL_MODES}")
    _check(
        m.num_heads % p.tp == 0,
        f"model.num_heads={m.num_heads} is not divisible by parallel.tp={p.tp}: TP splits the heads",
    )
    hidden = int(m.embed_dim * m.mlp_ratio)
    _check(
        hidden % p.tp == 0,
        f"the MLP width {hidden} (model.embed_dim x model.mlp_ratio) is not divisible by parallel.tp={p.tp}",
    )
    dp = p.dp_shard * p.dp_replicate
    _check(
        t.batch_size % dp == 0,
        f"train.batch_size={t.batch_size} (the global batch) is not divisible by the {dp} data-parallel ranks",
    )
