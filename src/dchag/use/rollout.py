"""Forecast rollouts in WeatherBench 2's layout: `forecast_dataset` (Python) and `dchag forecast` (CLI).

A rollout is autoregressive: the model forecasts `lead_hours` ahead, its predicted channels become the
next step's inputs, and so on for `steps` steps (`dchag.tasks.rollout.rollout`, the same function rollout
training uses). An input channel the model does not predict (a forcing such as precipitation, or a
static field) is taken from the data at each step's valid time when the data hold that time; where they
do not, it keeps its last known value (static fields have no time and stay as they are). Values go in and
come out in physical units: normalised with the run's statistics, de-normalised after each step.

One process runs the single-device model on the CPU, as `dchag eval --run` does (their scores then agree
to float32 storage). Under torchrun with N processes the model is split N ways over channels (tensor
parallelism, parallel.tp = N, as in training): each rank loads only its weight shards and reads only its
own channels (inputs and forcings), predicts the output channels it owns (all among its own inputs, so
the feedback stays on the rank), and rank 0 gathers each batch and writes it.

Synthetic-weather runs forecast held-out samples (indices from data.num_samples on, as `dchag eval`);
their inputs and forcings come from the generator, their channels keep their own names, and `time`
labels sample i (`dchag.data.wb2_layout.synthetic_times`; each sample is its own trajectory).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dchag.config import ConfigError
from dchag.data import build_source
from dchag.data.errors import DataError
from dchag.data.wb2_layout import ForecastWriter, check_out, forecast_dataset_of, synthetic_times, valid_time_indices
from dchag.tasks.rollout import input_positions, rollout

SYNTHETIC_SAMPLES = 64  # held-out samples a synthetic run forecasts by default (as dchag eval scores)
FORCING_RULE = (
    "predicted channels feed the next step; other inputs are the data's at each valid time when the data "
    "hold it, else their last known value"
)


@dataclass
class RankModel:
    """The forecaster as this process holds it: the whole model, or one tensor-parallel rank's part."""

    trained: object  # dchag.use.trained.TrainedModel (its model may be a rank's part)
    inputs: list[str]  # the channels this process feeds the model, in model order
    outputs: list[str]  # the output channels it predicts, in order
    in_out_index: list[int]  # position among `inputs` of each of `outputs`
    distributed: bool = False
    owns_group: bool = False  # this process group was started here (torchrun) and is ended here


def _check_forecast_task(cfg, where: str) -> None:
    if cfg.train.task != "forecast":
        raise ConfigError(f"{where} trained task {cfg.train.task!r}; forecasts need a forecast run")


def single_process(trained, where: str | None = None) -> RankModel:
    """The whole model of `trained` in this process; `where` names it in errors (default its folder)."""
    _check_forecast_task(trained.config, where or repr(str(trained.source)))
    channels, outs = list(trained.channels), list(trained.out_channels)
    return RankModel(trained, channels, outs, input_positions(channels, outs))


def single_process_run(run: str | Path, data_path: str | None = None) -> RankModel:
    """The whole model of a run folder or an export folder (`dchag.load`'s loader) in this process, on
    the CPU as `dchag eval --run` runs it (so that a rollout's first step is bit-comparable with its
    scores); `data_path` replaces data.path before the config is resolved."""
    from dchag.use.trained import load_trained

    trained = load_trained(run, option="--run", data_path=data_path)
    return single_process(trained, f"--run {str(run)!r}")


def sharded(run: str | Path, data_path: str | None = None) -> RankModel:
    """This torchrun rank's part of the model of a run folder or an export folder, split over all ranks
    by channel (tp = world size); each rank reads only the weight shards it holds (an export's through
    safetensors slices, as `train.init_from` reads them)."""
    from dchag.parallel.mesh import init_distributed
    from dchag.train.export import is_export_folder
    from dchag.train.run_weights import pick_checkpoint

    run = Path(run)
    checkpoint = None if is_export_folder(run) else pick_checkpoint(run)
    owns_group = not dist.is_initialized()
    init_distributed()
    try:
        return _sharded_model(run, checkpoint, data_path, owns_group)
    except BaseException:
        if owns_group:  # leave the group before the error ends this rank (no waiting for peers)
            dist.destroy_process_group()
        raise


def _sharded_model(run: Path, checkpoint: Path | None, data_path: str | None, owns_group: bool) -> RankModel:
    """`checkpoint` None: `run` is an export folder."""
    from dchag.configure import load_config
    from dchag.parallel import ParallelDims, build_mesh
    from dchag.parallel.construct import build_parallel_model
    from dchag.train.checkpoint import load_checkpoint, read_train_state
    from dchag.train.export import WEIGHTS_FILE, export_stats, exported_config, exported_step
    from dchag.train.loop import pick_device
    from dchag.train.run_weights import SINGLE_PROCESS, read_run_stats
    from dchag.use.trained import TrainedModel

    world = dist.get_world_size()
    overrides = [o for o in SINGLE_PROCESS if not o.startswith("parallel.tp=")] + [f"parallel.tp={world}"]
    if data_path is not None:
        overrides.append(f"data.path={data_path}")
    if checkpoint is None:
        cfg = exported_config(run / WEIGHTS_FILE, overrides)
    else:
        cfg = load_config(run / "config.yaml", overrides)
    _check_forecast_task(cfg, f"--run {str(run)!r}")
    device = pick_device(cfg.train.device)
    plan = build_parallel_model(cfg, build_mesh(ParallelDims.from_config(cfg.parallel), device.type), device)
    if checkpoint is None:
        _read_export_shards(run, cfg, plan)
        stats, step = export_stats(run, cfg), exported_step(run)
    else:
        load_checkpoint(checkpoint, plan.model, plan, None)  # each rank reads only its chunks
        stats, step = read_run_stats(run, checkpoint, cfg), int(read_train_state(checkpoint)["step"])
    shard = plan.channel_shard
    outputs = [cfg.out_channels[k] for k in shard.out_index] if shard is not None else list(cfg.out_channels)
    trained = TrainedModel.of(cfg, plan.model, stats, run, step)
    index = input_positions(cfg.channels, cfg.out_channels, shard)
    return RankModel(trained, list(plan.input_channels), outputs, index, distributed=True, owns_group=owns_group)


def _read_export_shards(folder: Path, cfg, plan) -> None:
    """Fill this rank's part of `plan.model` from the export folder's model.safetensors (only the slices
    it holds), with `train.init_from`'s reader; the export's own config built the model, so every weight
    must load whole: one that would stay fresh means the file does not match its config."""
    from dchag.train.init_from import init_from

    report = init_from(cfg, plan.model, plan, folder)
    fresh = [*report.new, *report.partial, *report.shape_mismatch]
    if fresh:
        raise ConfigError(
            f"--run {str(folder)!r}: its model.safetensors lacks or mis-shapes {fresh[:4]} of the model its own "
            "config builds; export the run again with dchag export"
        )


# ---------------------------------------------------------------------------------------------------
# inputs: normalised fields of this rank's channels at the initialisation times and later valid times


class FileInputs:
    """Inputs from an ERA5 / WeatherBench reader (`build_source(..., pairs=False)`) at time indices."""

    def __init__(self, reader, init_index: np.ndarray):
        self.reader, self.init_index = reader, np.asarray(init_index, dtype=np.int64)
        self.init_times = reader.times[self.init_index]
        self.lat, self.lon = reader.grid.lat, reader.grid.lon

    def initial(self, rows: np.ndarray) -> torch.Tensor:
        return self.reader.fields_at(self.reader.channels, self.init_index[rows])[0]  # [B, C, H, W]

    def at(self, rows: np.ndarray, hours: float) -> tuple[torch.Tensor | None, np.ndarray]:
        """(fields [B, C, H, W] at init + hours where the data hold that time, which rows do)."""
        found, has = valid_time_indices(self.reader.times, self.init_times[rows], hours)
        if not has.any():
            return None, has
        fields = self.reader.fields_at(self.reader.channels, found[has])[0]
        out = fields.new_zeros(len(rows), *fields.shape[1:])
        out[torch.from_numpy(has)] = fields
        return out, has

    def units(self, channel: str) -> str:
        return self.reader.units(channel)


class SyntheticInputs:
    """Inputs of held-out synthetic samples: the generator at time 0 and at any later hour."""

    def __init__(self, cfg, channels: list[str], indices: np.ndarray):
        self.cfg, self.channels, self.indices = cfg, list(channels), np.asarray(indices, dtype=np.int64)
        self.init_times = synthetic_times(self.indices)
        source = build_source(cfg, self.channels)
        self.lat = source.lat_deg.double().numpy()
        self.lon = np.arange(source.width) * 360.0 / source.width

    def initial(self, rows: np.ndarray) -> torch.Tensor:
        return build_source(self.cfg, self.channels).batch(self.indices[rows].tolist())["x"]

    def at(self, rows: np.ndarray, hours: float) -> tuple[torch.Tensor, np.ndarray]:
        source = build_source(self.cfg, self.channels, lead_hours=int(hours))  # whole hours (run_forecast)
        source.out_channels = list(self.channels)  # every channel at the valid time, not only the targets
        return source.batch(self.indices[rows].tolist())["y"], np.ones(len(rows), dtype=bool)

    def units(self, channel: str) -> str:
        return "1"  # generated in model units: dimensionless


# ---------------------------------------------------------------------------------------------------
# the rollout


@torch.no_grad()
def roll(rank: RankModel, inputs, rows: np.ndarray, lead_hours: float, steps: int) -> np.ndarray:
    """The forecast of initialisations `rows`: [B, steps, C_out_r, H, W] float32, physical units, for
    this rank's output channels."""
    trained = rank.trained
    device = next(trained.model.parameters()).device
    x = inputs.initial(rows).to(device)  # [B, C, H, W] normalised
    forcings, last = [], x
    for s in range(1, steps):  # inputs at each intermediate valid time: the data's, else the last known
        data, has = inputs.at(rows, s * lead_hours)
        if data is not None:
            last = torch.where(torch.from_numpy(has).to(device)[:, None, None, None], data.to(device), last)
        forcings.append(last)
    lead = torch.full((len(rows),), float(lead_hours), dtype=torch.float32, device=device)
    preds = rollout(trained.model, x, lead, steps, in_out_index=rank.in_out_index, forcings=forcings or None)
    physical = [trained.denormalise(p.double(), rank.outputs).float().cpu() for p in preds]  # [B, C_out_r, H, W]
    return torch.stack(physical, dim=1).numpy()


def _batches(count: int, batch_size: int, progress: bool):
    starts = range(0, count, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="forecast", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    for start in starts:
        yield np.arange(start, min(start + batch_size, count))


def _gathered(rank: RankModel, block: np.ndarray) -> dict[str, np.ndarray] | None:
    """{output channel: [B, S, H, W]} of one batch over all ranks, on rank 0 (None elsewhere)."""
    local = {c: block[:, :, k] for k, c in enumerate(rank.outputs)}
    if not rank.distributed:
        return local
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, everyone, dst=0)
    if everyone is None:
        return None
    merged = {c: v for part in everyone for c, v in part.items()}
    return {c: merged[c] for c in rank.trained.out_channels}


def _dataset_attrs(rank: RankModel, lead_hours: float, steps: int, data: str) -> dict:
    trained = rank.trained
    return {
        "source": "dchag forecast",
        "dchag_run": str(trained.source),
        "dchag_step": int(trained.step),
        "dchag_data": data,
        "dchag_lead_hours": float(lead_hours),
        "dchag_steps": int(steps),
        "dchag_rollout": FORCING_RULE,
    }


def _check_steps(lead_hours: float, steps: int, batch_size: int, batch_option: str = "--batch-size") -> None:
    if not lead_hours > 0:
        raise ConfigError(f"--lead-hours {lead_hours:g} must be > 0")
    if steps < 1:
        raise ConfigError(f"--steps {steps} must be >= 1")
    if batch_size < 1:
        raise ConfigError(f"{batch_option} {batch_size} must be >= 1")


def rollout_dataset_batches(rank: RankModel, inputs, lead_hours: float, steps: int, *, batch_size=8, progress=False,
                            attrs: dict | None = None):  # fmt: skip
    """Each batch of the forecast as a WeatherBench 2 Dataset (on rank 0; None on other ranks)."""
    trained = rank.trained
    wb2 = trained.config.data.kind == "era5"
    leads = [lead_hours * (s + 1) for s in range(steps)]
    units = {c: inputs.units(c) for c in rank.outputs}
    if rank.distributed:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, units)
        units = {c: u for part in everyone for c, u in part.items()}
    show = progress and (not rank.distributed or dist.get_rank() == 0)
    for rows in _batches(len(inputs.init_times), batch_size, show):
        values = _gathered(rank, roll(rank, inputs, rows, lead_hours, steps))
        if values is None:
            yield None
            continue
        yield forecast_dataset_of(
            values, inputs.init_times[rows], leads, inputs.lat, inputs.lon, units=units, wb2_names=wb2, attrs=attrs
        )


# ---------------------------------------------------------------------------------------------------
# the Python API


def forecast_dataset(trained, ds, lead_hours, steps: int = 1, init_times=None, batch_size: int = 8):
    """Autoregressive forecast of the xarray Dataset `ds` (physical units, the run's variables named as its
    training data named them: ERA5 short names, WeatherBench names, `NAME_LEVEL`, on any grid the run's
    data.grid regrids) from each time of `ds` (or `init_times`), `steps` steps of `lead_hours`: an
    xarray Dataset in WeatherBench 2's layout (physical units). Later times of `ds` serve as forcings."""
    import xarray as xr

    rank = single_process(trained)
    _check_steps(float(lead_hours), int(steps), int(batch_size), "batch_size")
    if not isinstance(ds, xr.Dataset):
        raise DataError(f"forecast needs an xarray.Dataset, not a {type(ds).__name__}")
    cfg = trained.config
    stats = trained.stats
    if cfg.data.kind != "era5":  # synthetic weather: read as a file would be, in model units already
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, kind="era5", grid="native"))
        stats = {"channels": {c: {"mean": 0.0, "std": 1.0} for c in rank.inputs}}
    reader = build_source(cfg, rank.inputs, split=next(iter(cfg.data.split)), stats=stats, pairs=False, dataset=ds)
    index = np.arange(len(reader.times)) if init_times is None else _indices_of(reader, init_times, "init_times")
    attrs = _dataset_attrs(rank, float(lead_hours), int(steps), "an xarray Dataset")
    parts = list(rollout_dataset_batches(rank, FileInputs(reader, index), float(lead_hours), int(steps),
                                         batch_size=batch_size, attrs=attrs))  # fmt: skip
    if not parts:
        raise DataError("forecast: no initialisation time (the dataset's time axis is empty)")
    return xr.concat(parts, dim="time") if len(parts) > 1 else parts[0]


def _indices_of(reader, init_times, option: str) -> np.ndarray:
    """Time indices of `init_times` on the reader's axis; a time the data lack is refused by name."""
    times = reader.times
    out = []
    for value in init_times:
        try:
            t = np.datetime64(str(value) if not isinstance(value, np.datetime64) else value, "ns")
        except ValueError:
            raise DataError(f"{option} {value!r} is not a date-time (write e.g. 2026-03-28T06:00)") from None
        i = int(np.clip(np.searchsorted(times, t), 0, len(times) - 1))
        if times[i] != t:
            near = times[max(i - 1, 0) : i + 1]
            raise DataError(
                f"{option} {value!r} is not a time step of the data (nearest: "
                f"{', '.join(np.datetime_as_string(n, unit='m') for n in near)})"
            )
        out.append(i)
    return np.asarray(out, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------
# the command line engine


def run_forecast(
    run: str | Path,
    out: str | Path,
    *,
    lead_hours: float,
    steps: int = 1,
    data_path: str | None = None,
    split: str | None = None,
    init_times: list[str] | None = None,
    max_inits: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """`dchag forecast`: the rollout of a run written to the Zarr store `out` (rank 0 writes; under
    torchrun the model is split over the ranks). Returns a summary on rank 0."""
    from dchag.train.loop import launched_distributed

    _check_steps(float(lead_hours), int(steps), int(batch_size))
    if max_inits is not None and max_inits < 1:
        raise ConfigError(f"--max-inits {max_inits} must be >= 1")
    check_out(out)  # before any work
    rank = sharded(run, data_path) if launched_distributed() else single_process_run(run, data_path)
    ranks = dist.get_world_size() if rank.distributed else 1
    main = not rank.distributed or dist.get_rank() == 0
    writer = None
    try:
        inputs, data = _inputs_of(rank, run, lead_hours, data_path, split, init_times, max_inits)
        writer = ForecastWriter(out) if main else None
        attrs = _dataset_attrs(rank, float(lead_hours), int(steps), data)
        for part in rollout_dataset_batches(rank, inputs, float(lead_hours), int(steps), batch_size=batch_size,
                                            progress=progress, attrs=attrs):  # fmt: skip
            if writer is not None:
                writer.append(part)
        path = writer.commit() if writer is not None else None
        if rank.distributed:
            dist.barrier()  # every rank is done with every collective before the group goes
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        if rank.owns_group:  # also after a refused option: no rank waits for peers that are gone
            dist.destroy_process_group()
    if not main:
        return {}
    return {
        "out": str(path),
        "init_times": len(inputs.init_times),
        "lead_hours": [float(lead_hours) * (s + 1) for s in range(steps)],
        "variables": list(rank.trained.out_channels),
        "ranks": ranks,
    }


def _inputs_of(rank: RankModel, run, lead_hours: float, data_path, split, init_times, max_inits):
    """(the inputs to forecast from, what they are) for `dchag forecast`'s options."""
    cfg = rank.trained.config
    if cfg.data.kind == "era5":
        name = split or ("test" if not init_times else next(iter(cfg.data.split)))
        reader = build_source(cfg, rank.inputs, split=name, stats=rank.trained.stats, pairs=False)
        index = _indices_of(reader, init_times, "--init-times") if init_times else reader.split_indices
        inputs, data = FileInputs(reader, index[:max_inits]), str(cfg.data.path)
    else:
        if split is not None or init_times or data_path is not None:
            raise ConfigError(
                f"--split, --init-times and --data-path apply to runs on files; --run {str(run)!r} is a "
                f"{cfg.data.kind} run, forecast from held-out samples (data.num_samples on): use --max-inits N"
            )
        if float(lead_hours) != int(lead_hours):  # the generator's forcings, truth and climatology: whole hours
            raise ConfigError(
                f"--lead-hours {float(lead_hours):g}: --run {str(run)!r} is a {cfg.data.kind} run, whose generator "
                f"has whole-hour leads only; give a whole number of hours (e.g. {max(round(lead_hours), 1)})"
            )
        count = SYNTHETIC_SAMPLES if max_inits is None else max_inits
        inputs = SyntheticInputs(cfg, rank.inputs, cfg.data.num_samples + np.arange(count))
        data = f"{cfg.data.kind} held-out samples {cfg.data.num_samples}..{cfg.data.num_samples + count - 1}"
    if not len(inputs.init_times):
        raise DataError(f"--split {split!r} of {data!r} holds no time step to forecast from")
    return inputs, data
