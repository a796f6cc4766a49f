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

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

from dchag.config import Config, ConfigError, ParallelConfig
from dchag.configure import load_config
from dchag.data import build_source
from dchag.data.held_out import HeldOut
from dchag.data.moments import day_of_year_and_hour
from dchag.model import build_model
from dchag.tasks.forecast import lat_weighted_mse
from dchag.tasks.metrics import anomaly_correlation
from dchag.train.checkpoint import complete_checkpoints, read_logical_weights, read_stats

SYNTHETIC_EVAL_SAMPLES = 64
FILE_BACKED = ("era5", "spectral_cube")  # sources normalised by statistics of their training split
SYNTHETIC_CLIMATOLOGY_SAMPLES = 128


def load_run(run: str | Path, data_path: str | None = None) -> tuple[Config, torch.nn.Module, dict | None]:
    """(config, model with the weights of the run's newest checkpoint, normalisation statistics) of a run
    folder, single-process."""
    run = Path(run)
    checkpoints = complete_checkpoints(run)
    if not (run / "config.yaml").is_file() or not checkpoints:
        raise ConfigError(
            f"--run {str(run)!r} is not a run folder with a checkpoint (needs config.yaml and checkpoints/step-*)"
        )
    overrides = ["parallel.tp=1", "parallel.dp_shard=1", "parallel.dp_replicate=1", "data.workers=0"]
    if data_path is not None:
        overrides.append(f"data.path={data_path}")
    cfg = load_config(run / "config.yaml", overrides)
    cfg = dataclasses.replace(cfg, parallel=ParallelConfig())
    model = build_model(cfg)
    model.load_state_dict(read_logical_weights(checkpoints[-1]))
    stats = read_stats(checkpoints[-1])
    if stats is None and (run / "stats.json").is_file():
        stats = json.loads((run / "stats.json").read_text())
    if stats is None and cfg.data.kind in FILE_BACKED:
        raise ConfigError(
            f"--run {str(run)!r} has no normalisation statistics (stats.json in {str(checkpoints[-1])!r} or in the "
            "run folder), which its model was trained with; copy them back, or train the run again"
        )
    return cfg, model.eval(), stats


def _physical(values: torch.Tensor, names: list[str], stats: dict | None) -> torch.Tensor:
    """Undo the normalisation of [B, C, H, W] (synthetic data is used as is)."""
    if stats is None:
        return values.double()
    mean = torch.tensor([stats["channels"][n]["mean"] for n in names], dtype=torch.float64)
    std = torch.tensor([stats["channels"][n]["std"] for n in names], dtype=torch.float64)
    return values.double() * std[None, :, None, None] + mean[None, :, None, None]


def _synthetic_climatology(cfg: Config, lead: int) -> torch.Tensor:
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
    doy, hour = day_of_year_and_hour(source.target_times(range(start, start + truth.shape[0])))
    slot = np.array([seasonal["hours"].index(int(h)) for h in hour])
    fields = np.stack([seasonal["table"][c][doy, slot] for c in outs], axis=1)  # [B, C_out, H, W]
    return torch.from_numpy(fields).double()


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
) -> dict:
    """Metrics of a forecast run; the JSON document `dchag eval --json` writes."""
    cfg, model, stats = load_run(run, data_path)
    if cfg.train.task != "forecast":
        raise ConfigError(f"--run {str(run)!r} trained task {cfg.train.task!r}; this evaluation is for forecasts")
    outs, channels = cfg.out_channels, cfg.channels
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
            climatology = _synthetic_climatology(cfg, lead)
        weights = source.lat_weights().double()
        sums = {k: torch.zeros(len(outs), dtype=torch.float64) for k in ("mse", "acc", "p_mse", "p_acc", "c_mse")}
        n = 0
        scored = torch.zeros(len(outs), dtype=torch.float64)  # per variable: forecasts with a valid pixel
        for start in range(0, source.num_samples, batch_size):
            batch = source.batch(list(range(start, min(start + batch_size, source.num_samples))))
            with torch.no_grad():
                pred = model(batch["x"], batch["lead_hours"]).pred
            pred, truth = _physical(pred, outs, stats), _physical(batch["y"], outs, stats)
            persistence = _physical(batch["x"][:, persist_index], outs, stats)
            clim = _climatology_of(source, seasonal, climatology, outs, start, truth)  # [B, C_out, H, W]
            zero = torch.zeros_like(climatology)  # anomalies are taken against `clim` (per forecast time) above
            valid = batch.get("y_valid")  # [B, C_out, H, W] under data.nan=mask: score valid pixels only
            has = valid.flatten(2).any(-1) if valid is not None else torch.ones(truth.shape[:2], dtype=torch.bool)
            terms = {
                "mse": lat_weighted_mse(pred, truth, weights, valid, dims=(2, 3)),
                "acc": anomaly_correlation(pred - clim, truth - clim, zero, weights, valid),
                "p_mse": lat_weighted_mse(persistence, truth, weights, valid, dims=(2, 3)),
                "p_acc": anomaly_correlation(persistence - clim, truth - clim, zero, weights, valid),
                "c_mse": lat_weighted_mse(clim, truth, weights, valid, dims=(2, 3)),
            }
            for key, term in terms.items():  # [B, C]; a field with no valid pixel is not scored
                sums[key] += torch.where(has, term, 0.0).sum(0)
            scored += has.sum(0)
            n += truth.shape[0]
            if plots is not None and len(maps) < 3 and start == 0:
                maps.append((lead, truth[0], pred[0]))
        for k, name in enumerate(outs):
            m = scored[k]  # n unless data.nan=mask left some forecasts without a valid pixel
            records.append(
                {
                    "variable": name,
                    "lead_hours": int(lead),
                    "samples": int(m),
                    "units": source.units(name) if hasattr(source, "units") else "",
                    "rmse": float((sums["mse"][k] / m).sqrt()),
                    "acc": float(sums["acc"][k] / m),
                    "persistence_rmse": float((sums["p_mse"][k] / m).sqrt()),
                    "persistence_acc": float(sums["p_acc"][k] / m),
                    "climatology_rmse": float((sums["c_mse"][k] / m).sqrt()),
                }
            )
        if progress:
            print(f"eval: lead {lead} h done ({n} samples)", file=sys.stderr)
    result = {
        "run": str(run),
        "split": split if cfg.data.kind == "era5" else "held-out",
        "climatology": "day_of_year_hour" if seasonal else "static",
        "metrics": records,
    }
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
        f"{result['run']} ({result['split']}): latitude-weighted RMSE (physical units) and ACC",
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
