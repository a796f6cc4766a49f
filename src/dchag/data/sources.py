"""Build a data source from the config and walk it in batches."""

from __future__ import annotations

import functools

import torch

from dchag.config import ConfigError
from dchag.data.synthetic_hyperspectral import SyntheticHyperspectral
from dchag.data.synthetic_weather import SyntheticWeather


def build_source(
    cfg,
    channels: list[str] | None = None,
    *,
    split: str = "train",
    lead_hours: int | None = None,
    stats=None,
    rollout_steps: int = 1,
    pairs: bool = True,
    dataset=None,
):
    """The configured source for `channels` (default: all of the config's channels).

    Forecast targets are the output channels among `channels`: under channel parallelism a rank reads
    (or generates) only its own channels, inputs and targets alike. `split` (train / val / test: dates
    or fractions of the time steps for era5, regions or files for spectral_cube), `lead_hours` (a fixed
    lead for evaluation) and `stats` (normalisation) apply to file-backed sources. Synthetic sources have
    no split: evaluation takes sample indices from data.num_samples on, which training never draws.
    `rollout_steps` K > 1 (forecast sources): targets y [B, K, C_out, H, W] at K multiples of the lead and
    the inputs at the K-1 intermediate valid times (`forcings`), for rollout training.
    era5 only: `pairs=False` gives a reader of fields at any time step without samples, `dataset` an
    xarray Dataset in memory read instead of data.path (forecast rollouts, `dchag.use.rollout`)."""
    d = cfg.data
    if rollout_steps > 1 and d.kind not in ("era5", "synthetic-weather"):
        raise ConfigError(
            f"train.rollout_steps={rollout_steps} needs forecast data (data.kind era5 or synthetic-weather), "
            f"not data.kind={d.kind}"
        )
    channels = cfg.channels if channels is None else list(channels)
    outs = [c for c in cfg.out_channels if c in channels] if cfg.train.task == "forecast" else []
    size = tuple(cfg.model.img_size)
    if d.kind == "era5":
        from dchag.data.era5 import ERA5Source

        return ERA5Source(
            d.path,
            channels,
            outs,
            size,
            grid=d.grid,
            select=d.select,
            split=d.split,
            split_name=split,
            lead_range=tuple(d.lead_hours),
            fixed_lead=lead_hours,
            stats=stats,
            nan=d.nan,
            regrid=d.regrid,
            rollout_steps=rollout_steps,
            pairs=pairs,
            dataset=dataset,
        )
    if d.kind == "spectral_cube":
        from dchag.data.spectral_cube import SpectralCubeSource

        return SpectralCubeSource(
            d.path,
            size,
            channels=channels,
            bands=d.bands,
            wavelength_range=d.wavelength_range,
            resample=d.wavelengths,
            band_wavelengths=d.band_wavelengths,
            variable=d.variable,
            layout=d.layout,
            nodata=d.nodata,
            seed=d.seed,
            num_samples=d.num_samples,
            stats=stats,
            nan=d.nan,
            split=d.split,
            split_name=split,
            split_by=d.split_by,
        )
    if d.kind == "synthetic-weather":
        return SyntheticWeather(
            channels,
            outs,
            size,
            seed=d.seed,
            num_samples=d.num_samples,
            max_lead_hours=d.max_lead_hours,
            lead_step_hours=d.lead_step_hours,
            noise=d.noise,
            fixed_lead=lead_hours,
            rollout_steps=rollout_steps,
        )
    return SyntheticHyperspectral(
        channels, size, seed=d.seed, num_samples=d.num_samples, noise=d.noise, spectra=d.spectra
    )


def batch_indices(
    num_samples: int, batch_size: int, step: int, seed: int, *, rank: int = 0, world: int = 1
) -> list[int]:
    """Sample indices of one step: epochs are seeded permutations; data-parallel ranks take disjoint slices.

    Depends only on (step, seed, rank), so a resumed or re-launched run sees the same batches.
    """
    global_batch = batch_size * world
    start = step * global_batch + rank * batch_size
    return [
        _epoch_order(num_samples, seed, pos // num_samples)[pos % num_samples]
        for pos in range(start, start + batch_size)
    ]


@functools.lru_cache(maxsize=4)
def _epoch_order(num_samples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The seeded sample order of one epoch."""
    return tuple(torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 65_537 + epoch)).tolist())
