"""Fine-tuning's start (`train.init_from`): a pretrained model's weights, by name, into a new run's model
under any parallel layout, each rank reading only the chunks it holds.

The source is a run folder (its newest checkpoint), a checkpoint folder, a `dchag export` folder or a
`.safetensors` file written by `dchag export`. Weights are matched by their single-device name; those
whose rows belong to channels are matched row by row by channel NAME, so the two models may differ in
their channels:
- the tokenizer (`front_end.tokenizer.*`: one row per vocabulary name): names the pretrained vocabulary
  lacks keep this run's fresh rows and channel embeddings; pretrained names this run lacks are ignored.
  A wavelength / hypernetwork tokenizer's weights are shared by all channels and load whole, whatever
  the channels; only its rows for channels without a wavelength (`channel_embed`, `name_weight`, and the
  wavelength-conditioned MAE output's `head.pred.name_*`) match by name, and the hierarchy's group
  weights load by position (the same number of groups: they do not belong to channels there), except a
  linear first level's weight [G, k, n_max], whose slots are its groups' channels: where the groups' channels
  differ it still loads by position, so its slots bind to other bands, and the report lists it under
  `positional` (a warning). Only channels without a wavelength count as new channels there: the others
  get no fresh weights;
- the task heads' output rows (the forecast head's per output channel, the MAE decoder's per channel);
- the hierarchy's aggregators (`front_end.hierarchy.levels.*`: one row per group): a group takes the
  pretrained group's rows only when it reduces the same tokens (the same channels, in the same order,
  through the same groups below it); a changed group stays fresh, never silently misaligned. A linear
  level's weight [G, k, n_max] is padded to its largest group, so a group that grows changes n_max: each
  matched group then takes the slots of its own channels, `[:size]`, and the padding stays as built.
A weight the other model has not (a new head after switching MAE -> forecast, `lead_embed`) keeps its
fresh initial values; one whose other dimensions differ is reported as shape-mismatched and stays fresh.
A part named in `train.freeze` must not hold such a fresh tensor: freezing it would keep random weights
for the whole run, so that is refused before anything is read.

Reading goes through the same machinery as resuming: each rank's parameters are described as chunks of
the logical tensors (`parallel.logical_shards`), and a chunk of rows maps to the pretrained tensor's rows,
which DCP (checkpoints) or safetensors' slices (exports) read straight into the parameter.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dchag.config import Config, ConfigError, config_from_dict
from dchag.data import channel_names, default_out_channels
from dchag.model import build_model
from dchag.model.channel_spec import named_rows, vocabulary_specs
from dchag.model.groups import resolve_level_groups, split_sizes
from dchag.model.parts import part_of
from dchag.parallel.logical_shards import Chunk, LogicalShards, logical_shards
from dchag.train.checkpoint import complete_checkpoints, is_complete, read_shards, read_train_state
from dchag.train.export import CONFIG_KEY
from dchag.train.safe_metadata import read_metadata_safely

REPORT_FILE = "init_from.json"
TOKENIZER = "front_end.tokenizer."
LEVELS = "front_end.hierarchy.levels."
BY_NAME = ("channel_embed", "name_weight")  # wavelength / hypernetwork tokenizers' rows by name
GROUP_PARAMS = {  # per-group tensors of each aggregator kind (first dimension: the group)
    "cross_attention": ("query", "wq", "wk", "wv", "proj_weight", "proj_bias"),
    "linear": ("weight", "bias"),
}


# ---------------------------------------------------------------------------------------------------
# the pretrained side


@dataclass
class Layout:
    """What the row matching needs to know of a model: its names for rows."""

    task: str
    channels: list[str]
    out_channels: list[str]
    vocabulary: list[str]
    tokenizer: str  # model.tokenizer
    named: list[str]  # the rows of a wavelength model's by-name tables: its vocabulary's channels without one
    patch: int
    groups: list[list[tuple]]  # per level, per group: the group's key (see `group_keys`)
    kinds: list[str]  # per level: the aggregator kind
    visible_norm: bool = False  # model.visible_norm: the encoder read per-sample standardised bands

    @classmethod
    def of(cls, cfg: Config, channels: list[str], out_channels: list[str]) -> "Layout":
        levels = cfg.model.hierarchy.resolved_levels()
        vocabulary = list(cfg.model.vocabulary) if cfg.model.vocabulary else list(channels)
        return cls(
            task=cfg.train.task,
            channels=list(channels),
            out_channels=list(out_channels) if cfg.train.task == "forecast" else [],
            vocabulary=vocabulary,
            tokenizer=cfg.model.tokenizer,
            named=named_rows(vocabulary_specs(vocabulary, list(channels), cfg.model.channel_specs)),
            patch=cfg.model.patch_size,
            groups=group_keys(levels, channels),
            kinds=[level.kind for level in levels],
            visible_norm=cfg.model.visible_norm,
        )


def group_keys(levels, channels: list[str]) -> list[list[tuple]]:
    """Per level, per group, a key naming exactly what the group reduces: level 1's groups by the channel
    names they hold; a later level's by (key of the group below, output token) of each token it holds."""
    keys: list[list[tuple]] = []
    tokens: list = list(channels)  # what the level receives, token by token
    for i, ((count, groups), level) in enumerate(zip(resolve_level_groups(levels, len(channels)), levels)):
        start, level_keys = 0, []
        for size in split_sizes(count, groups):
            level_keys.append((i, level.kind, level.tokens, tuple(tokens[start : start + size])))
            start += size
        keys.append(level_keys)
        tokens = [(key, t) for key in level_keys for t in range(level.tokens)]
    return keys


@dataclass
class Pretrained:
    """The source of `train.init_from`: its tensors' shapes, its layout, and a reader of row chunks."""

    path: Path  # the checkpoint folder or the safetensors file read
    kind: str  # "checkpoint" or "safetensors"
    shapes: dict[str, torch.Size]
    layout: Layout
    step: int | None

    def read(self, shards: dict[str, LogicalShards]) -> None:
        """Fill the chunks of `shards` (by pretrained name) from the source; every rank calls this once."""
        if self.kind == "checkpoint":
            read_shards(self.path, shards)
            return
        with safe_open(str(self.path), framework="pt") as handle:
            for name, shard in shards.items():
                part = handle.get_slice(name)
                for chunk in shard.chunks:
                    index = tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.local.shape))
                    chunk.local.copy_(part[index])


def _pretrained_channels(config: dict, where: str, channels=None) -> tuple[Config, list[str], list[str]]:
    """(config, channels, out_channels) of a pretrained model's config dict."""
    try:
        cfg = config_from_dict(config)
        channels = list(channels) if channels is not None else channel_names(cfg.data)
    except (ConfigError, OSError, ValueError) as err:
        raise ConfigError(f"train.init_from={where!r}: its config cannot be read ({err})") from None
    outs = list(cfg.data.out_channels) if cfg.data.out_channels else default_out_channels(cfg.data, channels)
    return cfg, channels, outs


def _not_a_source(where: str) -> ConfigError:
    return ConfigError(
        f"train.init_from={where!r} is not a run folder with a checkpoint, a checkpoint folder, an export folder "
        "(model.safetensors) or a .safetensors file from dchag export"
    )


def open_pretrained(path: str | Path) -> Pretrained:
    """The pretrained source `path` names (see the module text); one-line errors for anything else."""
    where = str(path)
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"train.init_from={where!r} does not exist; give a run folder, an export folder or a .safetensors file"
        )
    if path.is_dir() and not is_complete(path):
        found = complete_checkpoints(path)
        if found:
            path = found[-1]
        elif (path / "model.safetensors").is_file():
            path = path / "model.safetensors"
        else:
            raise _not_a_source(where)
    if path.is_dir():
        state = read_train_state(path)
        if "config" not in state:
            raise ConfigError(f"train.init_from={where!r}: checkpoint {str(path)!r} records no config")
        metadata = read_metadata_safely(path / ".metadata").state_dict_metadata
        shapes = {k[len("model.") :]: torch.Size(md.size) for k, md in metadata.items() if k.startswith("model.")}
        cfg, channels, outs = _pretrained_channels(state["config"], where, state.get("channels"))
        return Pretrained(path, "checkpoint", shapes, Layout.of(cfg, channels, outs), int(state["step"]))
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            shapes = {k: torch.Size(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except (SafetensorError, OSError, ValueError):
        raise _not_a_source(where) from None
    if CONFIG_KEY not in header:
        raise ConfigError(f"train.init_from={where!r} carries no dchag config; export the run with dchag export")
    cfg, channels, outs = _pretrained_channels(json.loads(header[CONFIG_KEY]), where)
    step = int(header["step"]) if str(header.get("step", "")).lstrip("-").isdigit() else None
    return Pretrained(path, "safetensors", shapes, Layout.of(cfg, channels, outs), step)


# ---------------------------------------------------------------------------------------------------
# matching


def _by_name(now: list, then: list, block: int = 1) -> list[int | None]:
    """Row map for tensors with `block` rows per name: this model's row -> the pretrained row, or None."""
    position = {name: i for i, name in enumerate(then)}
    rows = []
    for name in now:
        i = position.get(name)
        rows += [None] * block if i is None else list(range(i * block, (i + 1) * block))
    return rows


def _level_param(name: str) -> tuple[int, str] | None:
    """(level, parameter) of an aggregator weight `front_end.hierarchy.levels.<i>.aggregator.<param>`."""
    if not name.startswith(LEVELS):
        return None
    level, _, param = name[len(LEVELS) :].partition(".aggregator.")
    return (int(level), param) if param and level.isdigit() else None


def row_map(name: str, now: Layout, then: Layout) -> list[int | None] | None:
    """How the rows (first dimension) of weight `name` match: None when they match as they are,
    else per row of this model the pretrained row (None: no pretrained row)."""
    if name.startswith(TOKENIZER):
        if now.tokenizer == "per_channel":  # every tokenizer weight: one row per vocabulary name
            return _by_name(now.vocabulary, then.vocabulary if then.tokenizer == "per_channel" else then.named)
        if name[len(TOKENIZER) :] in BY_NAME:  # a wavelength model's rows for channels without a wavelength
            return _by_name(now.named, then.vocabulary if then.tokenizer == "per_channel" else then.named)
        return None  # shared by all channels: no rows to match
    if name in ("head.pred.name_weight", "head.pred.name_bias") and now.task == then.task == "mae":
        return _by_name(now.named, then.named)  # the wavelength-conditioned output's by-name rows
    if name in ("head.out.weight", "head.out.bias") and now.task == then.task == "forecast":
        return _by_name(now.out_channels, then.out_channels, now.patch**2)
    if name in ("head.pred.weight", "head.pred.bias") and now.task == then.task == "mae":
        return _by_name(now.channels, then.channels, now.patch**2)
    level = _level_param(name)
    if level is not None and now.tokenizer != "per_channel" and then.tokenizer != "per_channel":
        return None  # wavelength models: a group's weights do not belong to its channels; they load by position
    if level is not None:
        i, param = level
        if param in GROUP_PARAMS.get(now.kinds[i], ()) and i < len(then.groups):
            return _by_name(now.groups[i], then.groups[i])
    return None


def group_widths(name: str, now: Layout) -> list[int] | None:
    """Per row (group) of a linear level's weight [G, k, n_max], the group's size: the slots that hold its
    channels (a matched group has the same size in both models); None for every other weight."""
    level = _level_param(name)
    if level is None or level[1] != "weight" or now.kinds[level[0]] != "linear":
        return None
    return [len(key[3]) for key in now.groups[level[0]]]


@dataclass
class Report:
    """What `train.init_from` did, by logical weight name (the same on every rank)."""

    source: str
    kind: str
    pretrained_step: int | None
    loaded: list[str] = field(default_factory=list)  # every element from the pretrained model
    partial: dict[str, dict] = field(default_factory=dict)  # some rows pretrained, the others fresh
    new: list[str] = field(default_factory=list)  # fresh: the pretrained model has no such weight or rows
    unused: list[str] = field(default_factory=list)  # pretrained weights this model has not
    shape_mismatch: dict[str, dict] = field(default_factory=dict)  # same name, other shape: fresh
    new_channels: list[str] = field(default_factory=list)  # names with fresh rows: the pretrained model lacks
    # them (a wavelength model: only its channels without a wavelength; the others have no rows)
    positional: list[str] = field(default_factory=list)  # wavelength models' linear-level weights loaded by
    # position although their groups' channels differ: their slots hold other bands' weights
    dropped_channels: list[str] = field(default_factory=list)  # pretrained names this model does not use
    frozen_partial: list[str] = field(default_factory=list)  # train.freeze tensors with some fresh rows
    # (pretrained, this run) model.visible_norm when they differ: the weights learned other input units
    visible_norm_changed: list[bool] | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def line(self) -> str:
        channels = f"; new channels {self.new_channels}" if self.new_channels else ""
        channels += f"; {len(self.positional)} by position (see the warning)" if self.positional else ""
        return (
            f"init_from {self.source}: {len(self.loaded)} tensors loaded, {len(self.partial)} partly (fresh rows "
            f"for new channels or groups), {len(self.new)} new, {len(self.unused)} unused, "
            f"{len(self.shape_mismatch)} shape-mismatched{channels}"
        )


def plan_loading(shapes_now: dict[str, torch.Size], pretrained: Pretrained, now: Layout):
    """(report, {name: (row map or None, per-row widths or None)} of the weights to read)."""
    then = pretrained.layout
    report = Report(str(pretrained.path), pretrained.kind, pretrained.step)
    if now.tokenizer == "per_channel":
        report.new_channels = [c for c in now.vocabulary if c not in then.vocabulary]
    else:  # only the rows of channels without a wavelength are per channel
        known = then.vocabulary if then.tokenizer == "per_channel" else then.named
        report.new_channels = [c for c in now.named if c not in known]
    report.dropped_channels = [c for c in then.vocabulary if c not in now.vocabulary]
    report.unused = sorted(set(pretrained.shapes) - set(shapes_now))
    to_read: dict[str, tuple[list | None, list | None]] = {}
    for name, shape in shapes_now.items():
        old = pretrained.shapes.get(name)
        if old is None:
            report.new.append(name)
            continue
        rows = row_map(name, now, then)
        # a linear level whose largest group changed: matched groups read their own slots, [:size]
        widths = group_widths(name, now) if rows is not None and len(old) == len(shape) == 3 else None
        if widths is not None and old[-1] == shape[-1]:
            widths = None
        same = slice(1, -1) if widths is not None else slice(1, None)  # the dimensions that must agree
        if len(old) != len(shape) or tuple(old[same]) != tuple(shape[same]) or (rows is None and old[0] != shape[0]):
            report.shape_mismatch[name] = {"pretrained": list(old), "now": list(shape)}
            continue
        if rows is not None and len(rows) != shape[0]:  # a layout this model does not describe: refuse to guess
            report.shape_mismatch[name] = {"pretrained": list(old), "now": list(shape)}
            continue
        found = shape[0] if rows is None else sum(r is not None for r in rows)
        if found == 0:
            report.new.append(name)
            continue
        level = _level_param(name)
        # level 1 only: its slots are channels (a later level's are the groups' tokens below, by position)
        moved = level is not None and level[0] == 0 and then.groups[:1] != now.groups[:1]
        if rows is None and moved and group_widths(name, now) is not None:
            report.positional.append(name)  # a wavelength model's linear level over other channels
            to_read[name] = (rows, widths)
            continue
        identity = widths is None and (rows is None or (old[0] == shape[0] and rows == list(range(shape[0]))))
        if found == shape[0] and identity:
            report.loaded.append(name)
            rows = None
        elif found < shape[0]:
            report.partial[name] = {"rows_loaded": found, "rows_new": shape[0] - found}
        else:
            report.loaded.append(name)  # every row pretrained, in another order
        to_read[name] = (rows, widths)
    return report, to_read


def check_frozen(report: Report, freeze: list[str], names: list[str], source: str) -> None:
    """Refuse a `train.freeze` part holding a tensor that `init_from` leaves wholly fresh (new or
    shape-mismatched): it would train with random weights that never change. Tensors of frozen parts
    with only some fresh rows (new channels, changed groups) are recorded in `report.frozen_partial`."""
    frozen = set(freeze)
    fresh = [n for n in names if part_of(n) in frozen and (n in report.new or n in report.shape_mismatch)]
    if fresh:
        parts = sorted({part_of(n) for n in fresh})
        shown = ", ".join(fresh[:4]) + (f" (+{len(fresh) - 4} more)" if len(fresh) > 4 else "")
        raise ConfigError(
            f"train.freeze={list(freeze)} would keep random weights: train.init_from={source!r} has no "
            f"weights for {shown}; leave {parts} out of train.freeze"
        )
    report.frozen_partial = [n for n in names if part_of(n) in frozen and n in report.partial]


def _read_chunks(chunk: Chunk, rows: list | None, widths: list | None = None) -> list[Chunk]:
    """The pretrained chunks that fill `chunk` (a rank's block of this model's tensor): one per run of
    consecutive rows that map to consecutive pretrained rows (and have the same width), each a view of
    the parameter's storage; with `widths`, each row's view is narrowed to its first `width` slots."""
    if rows is None:
        return [chunk]
    start, n = chunk.offsets[0], chunk.local.shape[0]
    out, j = [], 0
    while j < n:
        src = rows[start + j]
        if src is None:
            j += 1
            continue
        width = None if widths is None else widths[start + j]
        length = 1
        while (
            j + length < n
            and rows[start + j + length] == src + length
            and (widths is None or widths[start + j + length] == width)
        ):
            length += 1
        local = chunk.local.narrow(0, j, length)
        if width is not None:
            local = local.narrow(-1, 0, width)  # [length, k, size]: the group's channels, not the padding
        out.append(Chunk((src, *chunk.offsets[1:]), local))
        j += length
    return out


# ---------------------------------------------------------------------------------------------------
# the entry point


def init_from(cfg: Config, model: torch.nn.Module, plan, path: str | Path) -> Report:
    """Load the pretrained weights `path` names into this rank's part of `model` (the single-device model
    when `plan` is None), in place; every rank calls this. Returns the report (the same on every rank)."""
    pretrained = open_pretrained(path)
    now = Layout.of(cfg, cfg.channels, cfg.out_channels)
    with torch.device("meta"):  # the single-device shapes, no memory
        shapes = {n: p.shape for n, p in build_model(cfg, init=False).named_parameters()}
    report, to_read = plan_loading(shapes, pretrained, now)
    if pretrained.layout.visible_norm != now.visible_norm:
        report.visible_norm_changed = [pretrained.layout.visible_norm, now.visible_norm]
    check_frozen(report, cfg.train.freeze, list(shapes), str(path))
    mine = logical_shards(model, plan, lambda p: p)
    shards = {}
    for name, (rows, widths) in to_read.items():
        held = mine[name].chunks if name in mine else ()
        chunks = [c for h in held for c in _read_chunks(h, rows, widths)]
        if chunks:
            shards[name] = LogicalShards(pretrained.shapes[name], chunks)
    with torch.no_grad():
        pretrained.read(shards)
    return report


def report_init(report: Report, out: Path | None) -> None:
    """Print the report's line (and the new tensors) and write it to RUN/init_from.json (rank 0 calls this)."""
    print(f"dchag: {report.line()}", file=sys.stderr, flush=True)
    if report.new:
        shown = ", ".join(report.new[:8]) + (f" (+{len(report.new) - 8} more)" if len(report.new) > 8 else "")
        print(f"dchag: init_from: new tensors: {shown}", file=sys.stderr, flush=True)
    if report.positional:
        print(
            f"dchag: warning: init_from: {report.positional} (linear hierarchy levels) load by position: their "
            "slots are the pretrained groups' channels, not this run's; cross-attention levels "
            "(model.hierarchy.preset: dchag-C) do not depend on the channels",
            file=sys.stderr,
            flush=True,
        )
    if report.frozen_partial:
        print(
            f"dchag: warning: train.freeze keeps the fresh rows (new channels or groups) of {report.frozen_partial} "
            "at their initial values",
            file=sys.stderr,
            flush=True,
        )
    if report.visible_norm_changed is not None:
        before, after = report.visible_norm_changed
        print(
            f"dchag: warning: init_from: the pretrained model had model.visible_norm={str(before).lower()}, this run "
            f"has {str(after).lower()}: its weights learned other input units (per-sample standardised bands or "
            "the data's), so expect a worse start than from matching settings",
            file=sys.stderr,
            flush=True,
        )
    if out is not None:
        (out / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=1))
