"""`dchag eval --forecast FILE.zarr`: score a stored forecast in WeatherBench 2's layout (written by
`dchag forecast` or by another model) against the truth, with the metrics of `dchag eval --run`
(`dchag.eval.forecast.LeadScores`: latitude-weighted RMSE, ACC, persistence, climatology).

Each forecast (initialisation time, lead) is scored where the truth holds its valid time and its
initialisation time (persistence is the truth at initialisation); a lead with no such forecast is left
out with a note. Pixels where the forecast or the truth is not finite are not scored; where the truth at
initialisation is not finite, persistence is the channel's training mean, as in `dchag eval --run`
(whose normalised inputs hold 0 there), so that the two agree under data.nan=mask too.

The truth is either a data file (`--data-path`: a Zarr store, netCDF file or folder the ERA5 reader
opens, variables found by the same names; regridded bilinearly onto the forecast's grid when it differs),
with a climatology from the file's time steps before the first initialisation time, or a run's data
(`--run`: its data.path, or `--data-path` in its place, on its grid, with its training split's
climatology; a synthetic-weather run regenerates its held-out samples), which scores a rollout's first
step exactly as `dchag eval --run` scores the run at that lead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from dchag.config import ConfigError
from dchag.data import build_source
from dchag.data.era5 import ERA5Source, Grid, closes_circle
from dchag.data.errors import DataError
from dchag.data.wb2_layout import ForecastFile, lead_timedelta, open_forecast, synthetic_indices, valid_time_indices
from dchag.eval.forecast import LeadScores, climatology_at, synthetic_climatology


class FileTruth:
    """The truth from an ERA5 / WeatherBench reader (`pairs=False`) on the forecast's grid, with the
    climatology of the reader's `train` split (static per-cell mean, or by day of year and hour of day
    where that split covers a year, as `dchag eval --run` chooses). `stats`: the normalisation statistics
    whose channel means fill persistence where it is not finite (default: the `train` split's)."""

    def __init__(self, reader: ERA5Source, channels: list[str], forecast: ForecastFile, stats: dict | None = None):
        self.reader, self.channels = reader, list(channels)
        same = len(reader.grid.lat) == len(forecast.lat) and len(reader.grid.lon) == len(forecast.lon)
        if not (same and np.allclose(reader.grid.lat, forecast.lat) and np.allclose(reader.grid.lon, forecast.lon)):
            reader.grid = Grid(forecast.lat, forecast.lon, closes_circle(forecast.lon))  # regrid onto it
        train = reader.split_indices
        if not len(train):
            raise DataError(f"{reader.path!r}: no time step to build the climatology from (its 'train' split is empty)")
        stats_here = reader.compute_stats(self.channels, climatology=self.channels)
        static = {c: np.asarray(stats_here["climatology"][c]) for c in self.channels}
        self.static = torch.tensor(np.stack([static[c] for c in self.channels]), dtype=torch.float64)  # [C, H, W]
        self.seasonal = reader.seasonal_climatology(self.channels, static) or {}
        given = (stats or {}).get("channels", {})  # keyed by the run's names; another model's names: computed here
        means = [given.get(c, stats_here["channels"][c])["mean"] for c in self.channels]
        self.means = torch.tensor(means, dtype=torch.float64)  # [C]

    def values(self, init_times: np.ndarray, hours: float) -> tuple[torch.Tensor, np.ndarray]:
        """(fields [B', C, H, W] float64 at init + hours, for the rows that have that time: bool [B])."""
        found, has = valid_time_indices(self.reader.times, init_times, hours)
        if not has.any():
            return torch.zeros(0), has
        blocks = self.reader.read_many(self.channels, found[has])  # channel -> [B', H, W] float32
        return torch.from_numpy(np.stack([blocks[c] for c in self.channels], axis=1)).double(), has

    def persistence(self, init_times: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The truth at initialisation, non-finite pixels at the channel mean (`values` at 0 h otherwise)."""
        fields, has = self.values(init_times, 0.0)
        if has.any():
            fields = torch.where(torch.isfinite(fields), fields, self.means[None, :, None, None])
        return fields, has

    def climatology(self, init_times: np.ndarray, hours: float, like: torch.Tensor) -> torch.Tensor:
        valid_times = init_times + lead_timedelta(hours)
        return climatology_at(valid_times, self.seasonal, self.static, self.channels, like)

    def lat_weights(self) -> torch.Tensor:
        return self.reader.lat_weights().double()

    def units(self, channel: str) -> str:
        return self.reader.units(channel)

    @property
    def kind(self) -> str:
        return "day_of_year_hour" if self.seasonal else "static"


class SyntheticTruth:
    """The truth of a synthetic-weather run: its generator at the held-out samples the forecast's times
    label (`dchag.data.wb2_layout.synthetic_times`), at each lead as `dchag eval --run --lead-hours` reads it,
    and its climatology (the mean training target at that lead)."""

    kind = "static"

    def __init__(self, cfg, forecast: ForecastFile):
        channels, where = forecast.channels, forecast.where
        missing = [c for c in channels if c not in cfg.out_channels]
        if missing:
            raise DataError(f"{where}: variables {missing} are not output channels of the run ({cfg.out_channels})")
        if (len(forecast.lat), len(forecast.lon)) != tuple(cfg.model.img_size):
            raise DataError(
                f"{where}: its grid is {len(forecast.lat)} x {len(forecast.lon)}, the run's "
                f"{cfg.model.img_size[0]} x {cfg.model.img_size[1]}; score it against the run that wrote it"
            )
        self.cfg, self.channels = cfg, list(channels)
        self.where = where
        self.out_index = [cfg.out_channels.index(c) for c in channels]
        self.in_index = [cfg.channels.index(c) for c in channels]
        self._clim: dict[float, torch.Tensor] = {}
        self._weights = build_source(cfg).lat_weights().double()

    def values(self, init_times: np.ndarray, hours: float) -> tuple[torch.Tensor, np.ndarray]:
        indices = synthetic_indices(init_times, self.where).tolist()
        batch = build_source(self.cfg, lead_hours=self._whole(hours)).batch(indices)
        return batch["y"][:, self.out_index].double(), np.ones(len(indices), dtype=bool)

    def persistence(self, init_times: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """The input fields of the samples (generated: always finite)."""
        indices = synthetic_indices(init_times, self.where).tolist()
        return build_source(self.cfg).batch(indices)["x"][:, self.in_index].double(), np.ones(len(indices), bool)

    def climatology(self, init_times: np.ndarray, hours: float, like: torch.Tensor) -> torch.Tensor:
        if hours not in self._clim:
            self._clim[hours] = synthetic_climatology(self.cfg, self._whole(hours))[self.out_index]
        return self._clim[hours][None].expand_as(like)

    def _whole(self, hours: float) -> int:
        """The generator's lead: whole hours only (another lead would be scored against the wrong truth)."""
        if float(hours) != int(hours):
            raise DataError(
                f"{self.where}: lead {float(hours):g} h is not a whole number of hours, which a "
                f"{self.cfg.data.kind} run's generator needs; pick whole-hour leads with --lead-hours"
            )
        return int(hours)

    def lat_weights(self) -> torch.Tensor:
        return self._weights

    def units(self, channel: str) -> str:
        return "1"


def _truth_of(forecast: ForecastFile, data_path: str | None, run: str | None):
    """(truth, what it is) for the forecast's channels."""
    channels = forecast.channels
    if run is not None:
        from dchag.train.run_weights import load_run_weights

        loaded = load_run_weights(run, data_path=data_path)
        cfg = loaded.config
        if cfg.data.kind != "era5":
            if data_path is not None:
                raise ConfigError(f"--data-path applies to runs on files; --run {run!r} is a {cfg.data.kind} run")
            return SyntheticTruth(cfg, forecast), f"{cfg.data.kind} samples of run {run}"
        reader = build_source(cfg, channels, split="train", pairs=False)
        truth = FileTruth(reader, channels, forecast, loaded.stats)  # persistence filled as the run's inputs are
        return truth, f"{cfg.data.path} (run {run}'s data and training split)"
    shape = (len(forecast.lat), len(forecast.lon))

    def reader(split: dict) -> ERA5Source:  # opened lazily: only the time axis and metadata are read here
        return ERA5Source(data_path, channels, [], shape, grid=list(shape), split=split, nan="mask", pairs=False)

    times = reader({"train": 1.0}).times
    first = forecast.init_times.min()
    before = times[times < first]
    if not len(before):
        raise DataError(
            f"--data-path {data_path!r} has no time step before the forecast's first initialisation time "
            f"{np.datetime_as_string(first, unit='m')} to build a climatology from; give a truth file that starts "
            "earlier, or --run RUN to use that run's training split"
        )
    period = [np.datetime_as_string(before[0], unit="s"), np.datetime_as_string(before[-1], unit="s")]
    truth = FileTruth(reader({"train": period}), channels, forecast)  # climatology: the truth before the forecasts
    return truth, f"{data_path} (climatology {period[0]} .. {period[1]})"


def evaluate_stored_forecast(
    forecast: str | Path,
    *,
    data_path: str | None = None,
    run: str | None = None,
    lead_hours: list[float] | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Metrics of a stored forecast per variable and lead: the JSON document `dchag eval --forecast --json`
    writes (`metrics` records as `dchag eval --run`'s)."""
    if data_path is None and run is None:
        raise ConfigError("dchag eval --forecast needs the truth: --data-path FILE (or --run RUN for a run's data)")
    fc = open_forecast(forecast)
    truth, what = _truth_of(fc, data_path, run)
    leads = list(range(len(fc.lead_hours)))
    if lead_hours is not None:
        missing = [h for h in lead_hours if float(h) not in fc.lead_hours]
        if missing:
            raise ConfigError(f"--lead-hours {missing} are not leads of {str(forecast)!r} (it has {fc.lead_hours})")
        leads = [fc.lead_hours.index(float(h)) for h in lead_hours]
    weights = truth.lat_weights()
    records, skipped = [], []
    for s in leads:
        hours = fc.lead_hours[s]
        scores = LeadScores(len(fc.channels))
        for start in range(0, len(fc.init_times), batch_size):
            rows = np.arange(start, min(start + batch_size, len(fc.init_times)))
            inits = fc.init_times[rows]
            target, has_target = truth.values(inits, hours)
            persistence, has_input = truth.persistence(inits)
            ok = has_target & has_input  # scored: the truth holds the valid time and the initialisation time
            if not ok.any():
                continue
            target = target[torch.from_numpy(ok[has_target])]
            persistence = persistence[torch.from_numpy(ok[has_input])]
            pred = torch.from_numpy(fc.read(fc.channels, rows[ok], s))  # [B, C, H, W] float64
            clim = truth.climatology(inits[ok], hours, pred)
            valid = torch.isfinite(pred) & torch.isfinite(target)  # as eval --run: persistence is filled
            if valid.all():
                valid = None
            else:  # unscored pixels: set to 0 so that no NaN reaches a sum
                pred, target, persistence = (torch.where(valid, t, 0.0) for t in (pred, target, persistence))
            scores.add(pred, target, persistence, clim, weights, valid)
        if not scores.n:
            skipped.append(hours)
            continue
        records += scores.records(fc.channels, hours, lambda c: fc.units(c) or truth.units(c))
        if progress:
            print(f"eval: lead {hours:g} h done ({scores.n} forecasts)", file=sys.stderr)
    if skipped and progress:
        print(f"eval: no forecast at lead(s) {skipped} h has its valid time in the truth: not scored", file=sys.stderr)
    if not records:
        raise DataError(
            f"--forecast {str(forecast)!r}: no forecast's valid time and initialisation time are both in the truth "
            f"({what}); check that they cover the same period"
        )
    return {
        "forecast": str(forecast),
        "truth": what,
        "split": f"{len(fc.init_times)} initialisation times",
        "climatology": truth.kind,
        "metrics": records,
    }
