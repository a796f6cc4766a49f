"""Small ERA5-like files the tests write: every layout and naming convention the loader must read.

Fields are analytic, so what a reader returns (native or regridded) can be checked against formulas.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LEVELS = [250, 500, 850]
START = np.datetime64("2020-01-01T00:00", "ns")


def tri(lon: np.ndarray) -> np.ndarray:
    """A periodic triangle wave over longitude, linear between 0, 180 and 360 degrees."""
    return np.abs(np.mod(lon, 360.0) - 180.0) / 180.0


def field(lat: np.ndarray, lon: np.ndarray, time_index: int = 0, level: float = 0.0) -> np.ndarray:
    """[lat, lon]: bilinear in (lat, tri(lon)) on every cell of a grid that has 0 and 180 degrees, so
    bilinear regridding reproduces it exactly."""
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    return 3.0 + 0.02 * la + 0.5 * tri(lo) + 0.001 * la * tri(lo) + 0.1 * time_index + 0.01 * level


def grid(step: float = 10.0, descending_lat: bool = True, lon_180: bool = False):
    lat = np.arange(-90.0, 90.0 + step / 2, step)
    lat = lat[::-1] if descending_lat else lat
    lon = np.arange(-180.0, 180.0, step) if lon_180 else np.arange(0.0, 360.0, step)
    return lat, lon


def dataset(
    times: int = 12,
    step_hours: int = 6,
    *,
    descending_lat: bool = True,
    lon_180: bool = False,
    level_dim: str = "level",
    level_units: str | None = None,
    long_names: bool = False,
    extra_dim: str | None = None,
    grid_step: float = 10.0,
):
    """An xarray Dataset with a surface variable (t2m) and a pressure-level variable (z)."""
    import xarray as xr

    lat, lon = grid(grid_step, descending_lat, lon_180)
    t = START + np.arange(times) * np.timedelta64(step_hours, "h")
    surface = np.stack([field(lat, lon, i) for i in range(times)])  # [T, lat, lon]
    upper = np.stack([np.stack([field(lat, lon, i, p) for p in LEVELS]) for i in range(times)])  # [T, P, lat, lon]
    levels = np.array(LEVELS, dtype=np.float64) * (100.0 if level_units == "Pa" else 1.0)
    names = ("2m_temperature", "geopotential") if long_names else ("t2m", "z")
    coords = {"time": t, "latitude": lat, "longitude": lon, level_dim: levels}
    data_vars = {
        names[0]: (("time", "latitude", "longitude"), surface.astype(np.float32), {"units": "K"}),
        names[1]: (("time", level_dim, "latitude", "longitude"), upper.astype(np.float32), {"units": "m**2 s**-2"}),
    }
    ds = xr.Dataset(data_vars, coords=coords)
    if level_units:
        ds[level_dim].attrs["units"] = level_units
    if extra_dim:
        ds = xr.concat([ds, ds + 1000.0], dim=extra_dim).assign_coords({extra_dim: [0, 1]})
    return ds


def write(ds, path: Path, fmt: str) -> Path:
    """Write `ds` as "zarr2", "zarr3", "netcdf" (one file) or "folders" (WeatherBench: one folder per
    variable, one file per day)."""
    if fmt in ("zarr2", "zarr3"):
        ds.to_zarr(path, zarr_format=int(fmt[-1]), mode="w", consolidated=fmt == "zarr2")
        return path
    if fmt == "netcdf":
        ds.to_netcdf(path)
        return path
    path.mkdir(parents=True, exist_ok=True)
    days = ds["time"].dt.floor("D").values
    for name in ds.data_vars:
        folder = path / name
        folder.mkdir(exist_ok=True)
        for day in np.unique(days):
            ds[[name]].sel(time=ds["time"].dt.floor("D") == day).to_netcdf(folder / f"{name}_{str(day)[:10]}.nc")
    return path


LAND = {"lat": (10.0, 50.0), "lon": (0.0, 60.0)}  # the "land" box a sea field is NaN over


def land_mask(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """[lat, lon] bool: True over the land box."""
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    return (la >= LAND["lat"][0]) & (la <= LAND["lat"][1]) & (lo >= LAND["lon"][0]) & (lo <= LAND["lon"][1])


def with_sea_field(ds, name: str = "sst", from_time: int = 0):
    """`ds` plus a sea-surface field `name` (t2m + 270) that is NaN over the land box from time index
    `from_time` on, as SST is over land."""
    values = ds["t2m"].values.astype(np.float64) + 270.0  # [T, lat, lon]
    land = land_mask(ds["latitude"].values, np.mod(ds["longitude"].values, 360.0))
    values[from_time:, land] = np.nan
    return ds.assign({name: (("time", "latitude", "longitude"), values.astype(np.float32), {"units": "K"})})


def era5_config(path, *extra):
    """A small forecaster on the files above (t2m and geopotential, regridded to 16 x 32); `extra`
    overrides come last, so a test changes channels, groups or anything else."""
    from dchag.configure import load_config

    return load_config(
        None,
        [
            "data.kind=era5",
            f"data.path={path}",
            "data.channels=[t2m, z_250, z_500, z_850]",
            "data.out_channels=[t2m, z_500]",
            "data.split={train: 0.75, test: 0.25}",
            "data.lead_hours=[6, 6]",
            "model.img_size=[16, 32]",
            "data.grid=[16, 32]",
            "model.patch_size=4",
            "model.embed_dim=32",
            "model.depth=1",
            "model.num_heads=4",
            "model.hierarchy.groups=4",
            "train.batch_size=4",
            *extra,
        ],
    )
