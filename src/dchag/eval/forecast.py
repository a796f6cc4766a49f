"""`dchag eval` for forecast runs: the trained model against persistence and climatology.

For every output variable and lead time it reports, on held-out data and in the variable's physical
units, the latitude-weighted RMSE (WeatherBench 2: the square root of the weighted MSE averaged over
all forecast times, on the model's grid) and the anomaly correlation (ACC) of the model, of
persistence (the input field as the forecast) and of climatology: WeatherBench 2's, by day of year x
hour of day from the training split, where the split covers a year (else the static training-split
mean; the JSON's "climatology" says which, docs/data.md).

ERA5 runs evaluate the pairs of the chosen split at each lead; synthetic runs evaluate samples the run
never trained on (indices from `data.num_samples` on), with a climatology averaged over training samples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from dchag.config import Config, ConfigError
from dchag.data import build_source
from dchag.data.held_out import HeldOut
from dchag.data.moments import day_of_year_and_hour
from dchag.tasks.channel_subset import keep_of_names
from dchag.tasks.forecast import lat_weighted_mse
from dchag.tasks.metrics import anomaly_correlation
from dchag.train.run_weights import load_run_weights

SYNTHETIC_EVAL_SAMPLES = 64
SYNTHETIC_CLIMATOLOGY_SAMPLES = 128


def load_run(run: str | Path, data_path: str | None = None) -> tuple[Config, torch.nn.Module, dict | None]:
    """(config, model with the weights of the run's newest checkpoint, normalisation statistics) of a run
    folder, single-process (`dchag.train.run_weights`, the loader `dchag.load` shares)."""
    loaded = load_run_weights(run, data_path=data_path)
    return loaded.config, loaded.model, loaded.stats


def _physical(values: torch.Tensor, names: list[str], stats: dict | None) -> torch.Tensor:
    """Undo the normalisation of [B, C, H, W] (synthetic data is used as is)."""
    if stats is None:
        return values.double()
    mean = torch.tensor([stats["channels"][n]["mean"] for n in names], dtype=torch.float64)
    std = torch.tensor([stats["channels"][n]["std"] for n in names], dtype=torch.float64)
    return values.double() * std[None, :, None, None] + mean[None, :, None, None]


def synthetic_climatology(cfg: Config, lead: int) -> torch.Tensor:
    """Mean target field [C_out, H, W] over training samples at `lead`."""
    source = build_source(cfg, lead_hours=lead)
    count = min(cfg.data.num_samples, SYNTHETIC_CLIMATOLOGY_SAMPLES)
    total = None
    for start in range(0, count, 32):
        y = source.batch(list(range(start, min(start + 32, count))))["y"].double()
        total = y.sum(0) if total is None else total + y.sum(0)
    return total / count


def _climatology_of(source, seasonal: dict | None, static: torch.Tensor, outs, start: int, truth) -> torch.Tensor:
    """The climatology [B, C_out, H, W] of the forecasts `start`, start + 1, ... (as many as `truth` holds):
    WeatherBench 2's value for each target's day of year and hour of day when `seasonal` has a table,
    else the static per-cell training mean `static` [C_out, H, W]."""
    if not seasonal:
        return static[None].expand_as(truth)
    return climatology_at(source.target_times(range(start, start + truth.shape[0])), seasonal, static, outs, truth)


def climatology_at(valid_times, seasonal: dict | None, static: torch.Tensor, outs, like) -> torch.Tensor:
    """The climatology [B, C_out, H, W] at `valid_times` (datetime64 [B]): the `seasonal` table's value for
    each day of year and hour of day, else the static per-cell mean `static` [C_out, H, W] (shaped as `like`)."""
    if not seasonal:
        return static[None].expand_as(like)
    doy, hour = day_of_year_and_hour(np.asarray(valid_times))
    slot = np.array([seasonal["hours"].index(int(h)) for h in hour])
    fields = np.stack([seasonal["table"][c][doy, slot] for c in outs], axis=1)  # [B, C_out, H, W]
    return torch.from_numpy(fields).double()


class LeadScores:
    """The sums behind `dchag eval`'s metrics of one lead, per variable: the forecast's, persistence's and
    climatology's latitude-weighted MSE and anomaly correlation, added over forecasts (each forecast
    time counts once; a field with no valid pixel is not scored). `dchag eval --run` and the scoring of
    stored forecasts (`dchag.eval.stored_forecast`) both add their batches here."""

    KEYS = ("mse", "acc", "p_mse", "p_acc", "c_mse")

    def __init__(self, channels: int):
        self.sums = {k: torch.zeros(channels, dtype=torch.float64) for k in self.KEYS}
        self.scored = torch.zeros(channels, dtype=torch.float64)  # per variable: forecasts with a valid pixel
        self.n = 0

    def add(self, pred, truth, persistence, clim, weights, valid=None) -> None:
        """pred, truth, persistence, clim [B, C, H, W] physical; weights [H]; valid [B, C, H, W] or None."""
        zero = torch.zeros_like(clim[0])  # anomalies are taken against `clim` (per forecast time)
        has = valid.flatten(2).any(-1) if valid is not None else torch.ones(truth.shape[:2], dtype=torch.bool)
        terms = {
            "mse": lat_weighted_mse(pred, truth, weights, valid, dims=(2, 3)),
            "acc": anomaly_correlation(pred - clim, truth - clim, zero, weights, valid),
            "p_mse": lat_weighted_mse(persistence, truth, weights, valid, dims=(2, 3)),
            "p_acc": anomaly_correlation(persistence - clim, truth - clim, zero, weights, valid),
            "c_mse": lat_weighted_mse(clim, truth, weights, valid, dims=(2, 3)),
        }
        for key, term in terms.items():  # [B, C]
            self.sums[key] += torch.where(has, term, 0.0).sum(0)
        self.scored += has.sum(0)
        self.n += truth.shape[0]

    def records(self, names: list[str], lead, units) -> list[dict]:
        """One record per variable (the JSON's `metrics` entries); `units(name)` gives its units."""
        out = []
        for k, name in enumerate(names):
            m = self.scored[k]  # n unless data.nan=mask left some forecasts without a valid pixel
            out.append(
                {
                    "variable": name,
                    "lead_hours": int(lead) if float(lead).is_integer() else float(lead),
                    "samples": int(m),
                    "units": units(name),
                    "rmse": float((self.sums["mse"][k] / m).sqrt()),
                    "acc": float(self.sums["acc"][k] / m),
                    "persistence_rmse": float((self.sums["p_mse"][k] / m).sqrt()),
                    "persistence_acc": float(self.sums["p_acc"][k] / m),
                    "climatology_rmse": float((self.sums["c_mse"][k] / m).sqrt()),
                }
            )
        return out


def default_leads(cfg: Config) -> list[int]:
    if cfg.data.kind == "era5":
        low, high = cfg.data.lead_hours
        return sorted({low, high})
    return sorted({cfg.data.lead_step_hours, cfg.data.max_lead_hours})


def evaluate_forecast(
    run: str | Path,
    *,
    split: str = "test",
    lead_hours: list[int] | None = None,
    data_path: str | None = None,
    plots: str | Path | None = None,
    batch_size: int = 8,
    progress: bool = True,
    channels: list[str] | None = None,
) -> dict:
    """Metrics of a forecast run; the JSON document `dchag eval --json` writes. `channels`: the input
    channels the model is given (default all; the others left out, as in `train.channel_subset`)."""
    cfg, model, stats = load_run(run, data_path)
    if cfg.train.task != "forecast":
        raise ConfigError(f"--run {str(run)!r} trained task {cfg.train.task!r}; this evaluation is for forecasts")
    given, channels = channels, cfg.channels
    keep = None if given is None else keep_of_names(channels, list(given), "--channels")
    outs = cfg.out_channels
    persist_index = [channels.index(c) for c in outs]
    records, maps = [], []
    seasonal = None  # WeatherBench 2's climatology by day of year x hour of day, when the data allow it
    for lead in lead_hours or default_leads(cfg):
        if cfg.data.kind == "era5":
            source = build_source(cfg, split=split, lead_hours=lead, stats=stats)
            climatology = torch.tensor(np.array([stats["climatology"][c] for c in outs]), dtype=torch.float64)
            if seasonal is None:
                seasonal = source.seasonal_climatology(outs, stats["climatology"]) or {}
        else:
            source = HeldOut(build_source(cfg, lead_hours=lead), cfg.data.num_samples, SYNTHETIC_EVAL_SAMPLES)
            climatology = synthetic_climatology(cfg, lead)
        weights = source.lat_weights().double()
        scores = LeadScores(len(outs))
        for start in range(0, source.num_samples, batch_size):
            batch = source.batch(list(range(start, min(start + batch_size, source.num_samples))))
            with torch.no_grad():
                pred = model(batch["x"], batch["lead_hours"], channel_keep=keep).pred
            pred, truth = _physical(pred, outs, stats), _physical(batch["y"], outs, stats)
            persistence = _physical(batch["x"][:, persist_index], outs, stats)
            clim = _climatology_of(source, seasonal, climatology, outs, start, truth)  # [B, C_out, H, W]
            scores.add(pred, truth, persistence, clim, weights, batch.get("y_valid"))
            if plots is not None and len(maps) < 3 and start == 0:
                maps.append((lead, truth[0], pred[0]))
        units = source.units if hasattr(source, "units") else (lambda name: "")
        records += scores.records(outs, lead, units)
        if progress:
            print(f"eval: lead {lead} h done ({scores.n} samples)", file=sys.stderr)
    result = {
        "run": str(run),
        "split": split if cfg.data.kind == "era5" else "held-out",
        "climatology": "day_of_year_hour" if seasonal else "static",
        "metrics": records,
    }
    if given is not None:
        result["channels"] = list(given)
    if plots is not None:
        from dchag.viz.maps import forecast_maps

        lat = getattr(getattr(source, "grid", None), "lat", None)
        lon = getattr(getattr(source, "grid", None), "lon", None)
        result["plots"] = [
            str(p) for lead, truth, pred in maps for p in forecast_maps(truth, pred, outs, lead, Path(plots), lat, lon)
        ]
    return result


def format_table(result: dict) -> str:
    lines = [
        f"{result.get('run') or result.get('forecast')} ({result['split']}): latitude-weighted RMSE (physical units) "
        "and ACC",
        f"{'variable':<10} {'lead h':>6} {'n':>5} {'RMSE':>11} {'persist.':>11} {'climat.':>11} "
        f"{'skill vs pers.':>14} {'ACC':>6} {'pers. ACC':>9}",
    ]
    for r in result["metrics"]:
        skill = 1 - r["rmse"] / r["persistence_rmse"] if r["persistence_rmse"] else float("nan")
        lines.append(
            f"{r['variable']:<10} {r['lead_hours']:>6} {r['samples']:>5} {r['rmse']:>11.4g} "
            f"{r['persistence_rmse']:>11.4g} {r['climatology_rmse']:>11.4g} {skill:>13.1%} "
            f"{r['acc']:>6.3f} {r['persistence_acc']:>9.3f}"
        )
    return "\n".join(lines)
