"""ERA5 / WeatherBench reanalysis, read lazily with xarray: a Zarr store (v2 or v3), one netCDF file, or a
folder / glob of netCDF files (WeatherBench's one-folder-per-variable layout included).

A sample is a pair of time steps (input at t, target at t + lead) inside one split. Only the variables
of the requested channels are opened and only the time steps of a batch are read, so a tensor-parallel
rank that asks for its own channels touches only those arrays. Fields are regridded (bilinear, or
conservative for coarsening; periodic in longitude for global fields) to the model's grid and normalised
with per-channel statistics streamed from the training split. docs/data.md describes the naming rules,
splits, leads and statistics.
"""

from __future__ import annotations

import glob
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dchag.config import check_split_dates, split_range
from dchag.data.errors import DataError
from dchag.data.moments import WB2_WINDOW_DAYS, Partial, SeasonalSums, day_of_year_and_hour, merge_partials
from dchag.data.packaged import resolve_path

LEVEL_DIMS = ("level", "pressure_level", "isobaricInhPa", "plev")
LAT_NAMES = ("latitude", "lat")
LON_NAMES = ("longitude", "lon")
TIME_NAMES = ("time", "valid_time", "time_index")

# ERA5 short names, GRIB names and WeatherBench long names of the same variable
ALIAS_GROUPS = [
    ("t2m", "2t", "2m_temperature"),
    ("u10", "10u", "10m_u_component_of_wind"),
    ("v10", "10v", "10m_v_component_of_wind"),
    ("msl", "mean_sea_level_pressure"),
    ("sp", "surface_pressure"),
    ("tp", "total_precipitation"),
    ("tcwv", "total_column_water_vapour"),
    ("tisr", "toa_incident_solar_radiation"),
    ("lsm", "land_sea_mask"),
    ("z", "geopotential"),
    ("t", "temperature"),
    ("q", "specific_humidity"),
    ("r", "relative_humidity"),
    ("u", "u_component_of_wind"),
    ("v", "v_component_of_wind"),
    ("w", "vertical_velocity"),
]
ALIASES = {name: group for group in ALIAS_GROUPS for name in group}
LEVEL_RE = re.compile(r"^(?P<var>.+)_(?P<level>\d+(?:\.\d+)?)$")


def aliases(name: str) -> tuple[str, ...]:
    """Every name of the variable `name` (itself first)."""
    return (name, *[a for a in ALIASES.get(name, ()) if a != name])


def resolve_channel(channel: str, variables: list[str], where: str) -> tuple[str, float | None]:
    """Channel name -> (variable in the dataset, pressure level in hPa or None).

    `NAME` is a variable without a level, `NAME_LEVEL` the variable NAME at LEVEL hPa; NAME may be an
    ERA5 short name or a WeatherBench long name."""
    for candidate in aliases(channel):
        if candidate in variables:
            return candidate, None
    match = LEVEL_RE.match(channel)
    if match:
        for candidate in aliases(match["var"]):
            if candidate in variables:
                return candidate, float(match["level"])
    raise DataError(
        f"{where}: no variable for channel {channel!r} (looked for {', '.join(aliases(channel))}"
        + (f" or {match['var']!r} at level {match['level']}" if match else "")
        + f"); the data has: {', '.join(sorted(variables)) or 'no variables'}"
    )


# ---------------------------------------------------------------------------------------------------
# opening


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or any((path / f).exists() for f in ("zarr.json", ".zgroup", ".zmetadata"))


def _netcdf_files(path: str) -> list[str]:
    p = Path(path)
    if p.is_dir():
        return sorted(str(f) for f in p.rglob("*.nc"))
    return sorted(glob.glob(path))


def _wanted_files(files: list[str], root: str, variables: set[str] | None) -> list[str]:
    """In a one-folder-per-variable layout (WeatherBench), only the folders of the wanted variables."""
    if variables is None or not Path(root).is_dir():
        return files
    folders = {Path(f).relative_to(root).parts[0] for f in files if len(Path(f).relative_to(root).parts) > 1}
    if not folders:
        return files
    names = {a for v in variables for a in aliases(v)} | {a for v in variables for a in _level_stripped(v)}
    keep = [
        f for f in files if len(Path(f).relative_to(root).parts) == 1 or Path(f).relative_to(root).parts[0] in names
    ]
    return keep


def _level_stripped(channel: str) -> tuple[str, ...]:
    match = LEVEL_RE.match(channel)
    return aliases(match["var"]) if match else ()


def open_dataset(path: str, channels: list[str] | None = None):
    """The dataset at `path`, lazily (no array is read). `channels` narrows a per-variable folder layout
    to the folders those channels need. Returns (dataset, list of files or stores opened)."""
    import xarray as xr

    path = resolve_path(path)
    p = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no consolidated metadata": read it directly
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy.*")
        if p.is_dir() and _is_zarr(p):
            return xr.open_zarr(p, chunks=None), [str(p)]
        if p.is_file():
            try:
                return xr.open_dataset(p, chunks=None), [str(p)]
            except (OSError, ValueError) as err:
                raise DataError(f"data.path {path!r}: cannot be read as netCDF ({type(err).__name__}: {err})") from None
        files = _netcdf_files(path)
        if not files:
            raise DataError(f"data.path {path!r}: no Zarr store, netCDF file or *.nc files found there")
        files = _wanted_files(files, path, set(channels) if channels else None)
        if len(files) == 1:
            return xr.open_dataset(files[0], chunks=None), files
        try:
            ds = xr.open_mfdataset(
                files, combine="by_coords", chunks={}, data_vars="minimal", coords="minimal", compat="override"
            )
        except ValueError as err:
            raise DataError(f"data.path {path!r}: the {len(files)} netCDF files do not combine ({err})") from None
        return ds, files


def _find(names: tuple[str, ...], candidates, what: str, where: str) -> str:
    for name in names:
        if name in candidates:
            return name
    raise DataError(f"{where}: no {what} coordinate (looked for {', '.join(names)})")


def decode_time(ds, time_name: str, where: str) -> np.ndarray:
    """The time axis as datetime64[ns]. CF-decoded by xarray when the file says its units; a numeric
    axis whose units sit in the dataset's attributes (`time_units`) is decoded the same way."""
    import xarray as xr

    values = ds[time_name].values
    if np.issubdtype(values.dtype, np.datetime64):
        return values.astype("datetime64[ns]")
    units = ds[time_name].attrs.get("units") or ds.attrs.get("time_units") or ds.attrs.get(f"{time_name}_units")
    if not units:
        raise DataError(f"{where}: the time axis {time_name!r} is numeric and has no units; add CF units to it")
    calendar = "standard"
    match = re.match(r"^(.*?)\s*\((.+)\)\s*$", units)  # "hours since 1940-01-01 00:00 (proleptic_gregorian)"
    if match:
        units, calendar = match.group(1), match.group(2)
    decoded = xr.coding.times.decode_cf_datetime(values, units, calendar)
    return np.asarray(decoded).astype("datetime64[ns]")


# ---------------------------------------------------------------------------------------------------
# grid


@dataclass
class Grid:
    """Latitudes (ascending) and longitudes of the model's grid; `periodic`: the longitudes close the
    circle (interpolation wraps around the dateline)."""

    lat: np.ndarray
    lon: np.ndarray
    periodic: bool


def closes_circle(lon: np.ndarray) -> bool:
    """Whether evenly spaced longitudes cover all 360 degrees (the last one step before the first)."""
    step = float(np.median(np.diff(np.sort(lon)))) if len(lon) > 1 else 0.0
    return float(lon.max() - lon.min()) + step >= 360.0 - 1e-6


def target_grid(lat: np.ndarray, lon: np.ndarray, shape) -> Grid:
    """The model's grid: the native one (`shape` None), WeatherBench's equiangular grid without poles for
    a global field (lat -90 + (i + 1/2) 180/H, lon j 360/W), or an even grid over a regional box."""
    periodic = closes_circle(lon)
    if shape is None:
        return Grid(lat, lon, periodic)
    h, w = shape
    if periodic and lat.max() - lat.min() >= 170.0:
        return Grid(-90.0 + (np.arange(h) + 0.5) * 180.0 / h, np.arange(w) * 360.0 / w, True)
    return Grid(np.linspace(lat.min(), lat.max(), h), np.linspace(lon.min(), lon.max(), w), periodic)


def on_grid(lat: np.ndarray, lon: np.ndarray, grid: Grid) -> bool:
    """Whether fields on (lat, lon) are already on `grid` (regridding leaves them as they are)."""
    same_size = len(lat) == len(grid.lat) and len(lon) == len(grid.lon)
    return same_size and np.allclose(lat, grid.lat) and np.allclose(lon, grid.lon)


def regrid(block: np.ndarray, lat: np.ndarray, lon: np.ndarray, grid: Grid, method: str = "bilinear") -> np.ndarray:
    """Fields [k, lat, lon] (lat ascending, lon ascending) onto `grid`, periodic in longitude for global
    fields: bilinear with xarray.interp, or `method="conservative"` (see `conservative`)."""
    import xarray as xr

    if on_grid(lat, lon, grid):
        return block
    if method == "conservative":
        return conservative(block, lat, lon, grid)
    if grid.periodic:  # wrap one column on each side so that the interpolation is periodic
        block = np.concatenate([block[..., -1:], block, block[..., :1]], axis=-1)
        lon = np.concatenate([lon[-1:] - 360.0, lon, lon[:1] + 360.0])
    da = xr.DataArray(block, dims=("k", "lat", "lon"), coords={"lat": lat, "lon": lon})
    out = da.interp(lat=grid.lat, lon=grid.lon, method="linear", kwargs={"fill_value": None})
    return out.values


def conservative(block: np.ndarray, lat: np.ndarray, lon: np.ndarray, grid: Grid) -> np.ndarray:
    """First-order conservative regridding of fields [k, lat, lon] onto a coarser `grid` with
    xarray-regrid, as WeatherBench 2 makes its coarse grids: each model-grid cell is the mean of the
    source cells it overlaps, weighted by the overlap and by cell area on the sphere (cell edges halfway
    between centres; area from sin(latitude) at the edges, so a nested coarsening keeps the cos-latitude
    weighted global mean). Longitudes wrap around for global fields. A cell that overlaps a NaN is NaN
    (nan_threshold 0), as bilinear regridding spreads NaN to what it touches."""
    import xarray as xr
    import xarray_regrid  # noqa: F401  (registers the .regrid accessor)

    # latitude is named "y", not "lat": the library then does not append pole rows to a global grid
    # without poles (ESMF's Pole="all"), which narrows the first and last bands' cells and breaks
    # conservation there; its spherical area weights are still asked for, by name
    da = xr.DataArray(block, dims=("k", "y", "lon"), coords={"y": lat, "lon": lon})
    target = xr.Dataset(coords={"y": grid.lat, "lon": grid.lon})
    out = da.regrid.conservative(target, latitude_coord="y", time_dim=None, skipna=True, nan_threshold=0.0)
    return out.transpose("k", "y", "lon").values


# ---------------------------------------------------------------------------------------------------
# the source


@dataclass
class _Field:
    """How to read one channel: its variable, the indexers that reduce it to (time, lat, lon)."""

    variable: str
    indexers: dict


class ERA5Source:
    """`batch(indices)` -> x [B, C, H, W] at t, y [B, C_out, H, W] at t + lead (normalised), lead_hours [B].

    `rows` (set on a copy by `data/row_strip.py` for a context-parallel rank): `batch` holds only those
    pixel rows of the model grid, and only the latitudes they need are read from the files: those rows
    on the data's own grid, the source rows around them under bilinear regridding. Conservative
    regridding reads and regrids whole fields, then cuts (`_source_rows`).

    `split` is one of train / val / test; leads are the pairs of time steps whose distance lies in
    `lead_range` (training) or equals `fixed_lead` (evaluation). `pairs=False` makes a reader without
    samples: `read_many` / `fields_at` at any time index (forecast rollouts, scoring stored forecasts);
    `dataset` reads an xarray Dataset already in memory (`path` then only names it in messages).
    """

    rows: slice | None = None  # the pixel rows `batch` serves (a context-parallel strip); None: all

    def __init__(
        self,
        path: str,
        channels: list[str],
        out_channels: list[str],
        img_size: tuple[int, int],
        *,
        grid="native",
        select: dict | None = None,
        split: dict | None = None,
        split_name: str = "train",
        lead_range: tuple[int, int] = (6, 72),
        fixed_lead: int | None = None,
        stats: dict | None = None,
        nan: str = "error",
        regrid: str = "bilinear",
        rollout_steps: int = 1,
        pairs: bool = True,
        dataset=None,
    ):
        self.path = str(path)
        self._given = dataset  # an xarray Dataset already in memory, read instead of opening `path`
        self.rollout_steps = rollout_steps  # K > 1: targets at lead, 2 lead, ..., K lead (rollout training)
        self.nan = nan  # "error": NaN is refused; "mask": NaN pixels are masked out (docs/data.md)
        self.grid_spec = grid
        self.regrid = regrid  # "bilinear" or "conservative" (coarsening only)
        self.channels, self.out_channels = list(channels), list(out_channels)
        self.select = dict(select or {})
        self.split_spec = dict(split or {"train": 0.8, "val": 0.1, "test": 0.1})
        self.split_name = split_name
        self.variables_read: set[str] = set()
        self.read_log: list[tuple[str, tuple[int, ...]]] = []  # (variable, time indices) of every block read
        self.lat_read: list[tuple[int, int]] = []  # the file's latitude indices [start, stop) of each block
        self.files_opened: list[str] = []
        self._ds, self._pid = None, None
        ds = self._dataset()
        where = f"data.path {self.path!r}"
        self.time_name = _find(TIME_NAMES, ds.coords, "time", where)
        self.lat_name = _find(LAT_NAMES, ds.coords, "latitude", where)
        self.lon_name = _find(LON_NAMES, ds.coords, "longitude", where)
        self.times = decode_time(ds, self.time_name, where)
        bad = np.nonzero(np.diff(self.times) <= np.timedelta64(0))[0]
        if len(bad):
            raise DataError(
                f"{where}: the time axis is not strictly increasing at index {int(bad[0]) + 1} "
                f"({self.times[bad[0] + 1]})"
            )
        lat = ds[self.lat_name].values.astype(np.float64)
        if len(lat) > 1 and not (np.all(np.diff(lat) > 0) or np.all(np.diff(lat) < 0)):
            raise DataError(f"{where}: the latitude axis is not monotonic")
        lon = ds[self.lon_name].values.astype(np.float64)
        self._lat_order = np.argsort(lat)  # the model sees latitudes ascending (south first)
        self.src_lat = lat[self._lat_order]
        lon = np.mod(lon, 360.0) if closes_circle(lon) else lon  # -180..180 -> 0..360 around the globe
        self._lon_order = np.argsort(lon, kind="stable")
        self.src_lon = lon[self._lon_order]
        shape = None if grid == "native" else tuple(grid)
        self.grid = target_grid(self.src_lat, self.src_lon, shape)
        self.native = on_grid(self.src_lat, self.src_lon, self.grid)  # no regridding: a strip's rows read alone
        if (len(self.grid.lat), len(self.grid.lon)) != tuple(img_size):
            raise DataError(
                f"{where}: the data grid is {len(self.grid.lat)}x{len(self.grid.lon)} but model.img_size is "
                f"{list(img_size)}; set data.grid: {list(img_size)} to regrid"
            )
        (h, w), (sh, sw) = (len(self.grid.lat), len(self.grid.lon)), (len(self.src_lat), len(self.src_lon))
        if regrid == "conservative" and (h > sh or w > sw):
            raise DataError(
                f"{where}: data.regrid=conservative averages onto a coarser grid, but data.grid {h}x{w} is finer "
                f"than the data's {sh}x{sw}; use data.regrid: bilinear to refine"
            )
        self.fields = {c: self._field(ds, c, where) for c in dict.fromkeys(self.channels + self.out_channels)}
        self.split_indices = split_indices(self.times, self.split_spec, split_name, where)
        if not pairs:  # a reader of fields at any time step (forecasts, scoring stored forecasts): no samples
            self.pairs, self.num_samples, self.stats = np.zeros((0, 3), dtype=np.int64), 0, stats
            return
        pool = self._target_pool(lead_range, fixed_lead)
        self.pairs = lead_pairs(self.times, self.split_indices, lead_range, fixed_lead, where, split_name, pool)
        if rollout_steps > 1:
            targets = pool if pool is not None else self.split_indices
            self.pairs, self.chains = rollout_chains(self.times, self.pairs, rollout_steps, targets, where, split_name)
        self.num_samples = len(self.pairs)
        self.stats = stats

    def _target_pool(self, lead_range, fixed_lead) -> np.ndarray | None:
        """Time indices a target may come from. Fraction splits: the split's own (no target crosses into
        the next split). Date splits name input times, as WeatherBench 2's initialisation times: a target
        may lie up to the largest lead after the split's end, once `check_split_dates` has made sure no
        other split's input lies there."""
        values = list(self.split_spec.values())
        if not values or not isinstance(values[0], (list, tuple)) or not len(self.split_indices):
            return None
        largest = max(lead_range[1], fixed_lead or 0)
        check_split_dates(self.split_spec, largest)
        last = self.times[self.split_indices[-1]] + np.timedelta64(int(largest * 3600), "s")
        return np.arange(self.split_indices[0], np.searchsorted(self.times, last, side="right"))

    # ---- opening, lazily per process (DataLoader workers reopen after fork) -----------------------
    def _dataset(self):
        if self._given is not None:
            return self._given
        if self._ds is None or self._pid != os.getpid():
            self._ds, self.files_opened = open_dataset(self.path, self.channels + self.out_channels)
            self._pid = os.getpid()
        return self._ds

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None  # file handles do not travel to worker processes
        return state

    def _field(self, ds, channel: str, where: str) -> _Field:
        variable, level = resolve_channel(channel, list(ds.data_vars), where)
        da = ds[variable]
        indexers: dict = {}
        dims = set(da.dims) - {self.time_name, self.lat_name, self.lon_name}
        level_dim = next((d for d in LEVEL_DIMS if d in da.dims), None)
        if level is not None:
            if level_dim is None:
                raise DataError(
                    f"{where}: channel {channel!r} asks for level {level:g} but {variable!r} has no level dimension"
                )
            levels = ds[level_dim].values.astype(np.float64)
            scale = 100.0 if ds[level_dim].attrs.get("units", "").lower() in ("pa", "pascal") else 1.0
            found = np.nonzero(np.isclose(levels, level * scale))[0]
            if not len(found):
                raise DataError(
                    f"{where}: variable {variable!r} has no pressure level {level:g} hPa for channel {channel!r} "
                    f"(levels: {', '.join(f'{v / scale:g}' for v in levels)})"
                )
            indexers[level_dim] = int(found[0])
            dims.discard(level_dim)
        for dim in sorted(dims):
            if dim not in self.select:
                raise DataError(
                    f"{where}: variable {variable!r} has the extra dimension {dim!r} (size {da.sizes[dim]}); "
                    f"choose one value with data.select: {{{dim}: VALUE}}"
                )
            values = list(ds[dim].values) if dim in ds.coords else list(range(da.sizes[dim]))
            if self.select[dim] not in values:
                raise DataError(f"{where}: data.select {dim}={self.select[dim]!r} is not among {values[:10]}")
            indexers[dim] = values.index(self.select[dim])
        missing = {self.time_name, self.lat_name, self.lon_name} - set(da.dims)
        if missing:
            raise DataError(f"{where}: variable {variable!r} lacks the dimension(s) {sorted(missing)}")
        return _Field(variable, indexers)

    # ---- reading ---------------------------------------------------------------------------------
    def read(self, channel: str, times: np.ndarray) -> np.ndarray:
        """Physical values of `channel` at time indices `times`, on the model grid: [k, H, W] float32."""
        return self.read_many([channel], times)[channel]

    def read_many(self, channels: list[str], times: np.ndarray, rows: slice | None = None) -> dict:
        """Physical values of several channels at time indices `times`, on the model grid: channel ->
        [k, H, W] float32 (`rows`: only those pixel rows, [k, H_rows, W]). The channels of one variable
        are read in one block for all their pressure levels, so a chunk holding several levels is read
        once, not once per level. `rows` limits the latitudes read (`_source_rows`)."""
        ds = self._dataset()
        src_rows, grid, cut = self._source_rows(rows)
        lat_order = self._lat_order[src_rows]  # the file's latitude index of each source row read
        first, stop = int(lat_order.min()), int(lat_order.max()) + 1  # contiguous: latitudes are monotonic
        window = {self.lat_name: slice(first, stop)}
        unique, inverse = np.unique(np.asarray(times), return_inverse=True)
        groups: dict[tuple, list[str]] = {}  # (variable, level dim, other indexers) -> channels
        for channel in dict.fromkeys(channels):
            field = self.fields[channel]
            level_dim = next((d for d in LEVEL_DIMS if d in field.indexers), None)
            other = tuple(sorted((k, v) for k, v in field.indexers.items() if k != level_dim))
            groups.setdefault((field.variable, level_dim, other), []).append(channel)
        out: dict[str, np.ndarray] = {}
        axes = (self.time_name, self.lat_name, self.lon_name)
        for (variable, level_dim, other), names in groups.items():
            da = ds[variable].isel(dict(other))
            if level_dim is not None:
                levels = [self.fields[c].indexers[level_dim] for c in names]
                da = da.isel({level_dim: levels, self.time_name: unique, **window}).transpose(level_dim, *axes)
                block = np.asarray(da.values, dtype=np.float64)  # [levels, k, lat, lon]
            else:
                da = da.isel({self.time_name: unique, **window}).transpose(*axes)
                block = np.asarray(da.values, dtype=np.float64)[None]
            self.read_log.append((variable, tuple(int(t) for t in unique)))
            self.lat_read.append((first, stop))
            self.variables_read.update(names)
            block = block[:, :, lat_order - first][:, :, :, self._lon_order]
            n_lev, k = block.shape[:2]
            flat = block.reshape(n_lev * k, *block.shape[2:])
            flat = regrid(flat, self.src_lat[src_rows], self.src_lon, grid, self.regrid)
            fields = flat.reshape(n_lev, k, *flat.shape[1:])  # [levels, k, H, W]
            if cut is not None:
                fields = fields[:, :, cut]
            for i, channel in enumerate(names):
                out[channel] = fields[i][inverse].astype(np.float32)
        return out

    def _source_rows(self, rows: slice | None) -> tuple[slice, Grid, slice | None]:
        """(source rows to read, in ascending latitude; the grid they are regridded to; the rows to cut
        afterwards) for the model rows `rows`. On the data's own grid: exactly those rows. Bilinear
        regridding: the source rows that bracket the strip's latitudes (interpolation is point by point,
        so the strip equals those rows of the whole field). Conservative: every row, cut afterwards."""
        n = len(self.src_lat)
        if rows is None:
            return slice(0, n), self.grid, None
        if self.native:
            start, stop, _ = rows.indices(n)
            return slice(start, stop), Grid(self.grid.lat[rows], self.grid.lon, self.grid.periodic), None
        if self.regrid != "bilinear":
            return slice(0, n), self.grid, rows
        lat = self.grid.lat[rows]
        start = max(0, int(np.searchsorted(self.src_lat, lat.min())) - 1)
        stop = min(n, int(np.searchsorted(self.src_lat, lat.max(), side="right")) + 1)
        return slice(start, stop), Grid(lat, self.grid.lon, self.grid.periodic), None

    def _first_nan(self, channel: str, values: np.ndarray, times: np.ndarray) -> tuple[int, str] | None:
        """(time index, one-line message) of the first time step of `values` [k, H, W] holding NaN/Inf."""
        bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1)
        if not bad.any():
            return None
        t = int(np.asarray(times)[np.argmax(bad)])
        when = np.datetime_as_string(self.times[t], unit="m")
        return t, (
            f"data.path {self.path!r}: channel {channel!r} (variable {self.fields[channel].variable!r}) holds NaN at "
            f"{when} (time index {t}); set data.nan: mask to mask NaN pixels out of the loss and the metrics"
        )

    def fields_at(
        self, channels: list[str], times: np.ndarray, rows: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised fields [B, C, H, W] of `channels` at `times`, and under data.nan=mask their validity
        [B, C, H, W] (bool; invalid pixels are set to 0, the channel mean). NaN raises under data.nan=error.
        `rows`: only those pixel rows ([B, C, H_rows, W]), normalised with the whole training data's stats."""
        if self.stats is None:
            raise RuntimeError("normalisation statistics are not set: call compute_stats() or pass stats=")
        values = self.read_many(channels, times, rows)
        out, valid = [], []
        for c in channels:
            s = self.stats["channels"][c]
            v = (values[c] - s["mean"]) / s["std"]  # [B, H, W]
            ok = np.isfinite(v)
            if self.nan == "mask":
                v = np.where(ok, v, 0.0)
                valid.append(ok)
            else:
                found = self._first_nan(c, v, times) if not ok.all() else None
                if found:
                    raise DataError(found[1])
            out.append(torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)))
        fields = torch.stack(out, dim=1)
        return fields, (torch.from_numpy(np.stack(valid, axis=1)) if self.nan == "mask" else None)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """x [B, C, H, W] at t, y [B, C_out, H, W] at t + lead (normalised), lead_hours [B]; under
        data.nan=mask also x_valid, y_valid (bool, same shapes)."""
        pairs = self.pairs[np.asarray(indices, dtype=np.int64)]  # [B, 3]: input index, target index, hours
        x, x_valid = self.fields_at(self.channels, pairs[:, 0], self.rows)
        if self.out_channels:
            y, y_valid = self.fields_at(self.out_channels, pairs[:, 1], self.rows)
        else:  # a tensor-parallel rank that owns no output channel
            y = x.new_zeros(len(indices), 0, *x.shape[2:])
            y_valid = torch.zeros(y.shape, dtype=torch.bool) if x_valid is not None else None
        batch = {"x": x, "y": y, "lead_hours": torch.from_numpy(pairs[:, 2].astype(np.float32))}
        if x_valid is not None:
            batch["x_valid"], batch["y_valid"] = x_valid, y_valid
        if self.rollout_steps > 1:
            self._add_rollout(batch, np.asarray(indices, dtype=np.int64))
        return batch

    def _add_rollout(self, batch: dict, indices: np.ndarray) -> None:
        """Rollout training: y [B, K, C_out, H, W] at lead .. K lead (y_valid alike) and forcings
        [B, K-1, C, H, W], the inputs at the intermediate valid times (NaN set to 0 under data.nan=mask)."""
        chains = self.chains[indices]  # [B, K] time indices: t + lead, ..., t + K lead
        ys, valids, forcings = [batch["y"]], [batch.get("y_valid")], []
        for k in range(1, self.rollout_steps):
            forcings.append(self.fields_at(self.channels, chains[:, k - 1], self.rows)[0])
            if self.out_channels:
                y, valid = self.fields_at(self.out_channels, chains[:, k], self.rows)
            else:
                y, valid = batch["y"], batch.get("y_valid")
            ys.append(y)
            valids.append(valid)
        batch["y"], batch["forcings"] = torch.stack(ys, 1), torch.stack(forcings, 1)
        if "y_valid" in batch:
            batch["y_valid"] = torch.stack(valids, 1)

    def units(self, channel: str) -> str:
        """The physical units of `channel` as the file states them ('' when it does not)."""
        return str(self._dataset()[self.fields[channel].variable].attrs.get("units", ""))

    def lat_weights(self) -> torch.Tensor:
        """cos(latitude) of the model grid normalised to mean 1, [H]."""
        w = np.cos(np.deg2rad(self.grid.lat))
        return torch.from_numpy(w / w.mean()).float()

    # ---- statistics --------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What the statistics depend on besides the channels: a run folder's stats.json is reused only
        when this matches (docs/data.md)."""
        train = split_indices(self.times, self.split_spec, "train", f"data.path {self.path!r}")
        first, last = (self.times[train[0]], self.times[train[-1]]) if len(train) else (None, None)
        return {
            "kind": "era5",
            "path": os.path.abspath(resolve_path(self.path)),
            "split": self.split_spec.get("train"),
            "train_times": [str(first), str(last), int(len(train))],
            "grid": self.grid_spec if self.grid_spec == "native" else list(self.grid_spec),
            "grid_shape": [len(self.grid.lat), len(self.grid.lon)],
            "select": self.select,
            "nan": self.nan,
            # absent for bilinear, as in every stats.json written before data.regrid existed: those stay valid
            **({"regrid": self.regrid} if self.regrid != "bilinear" else {}),
        }

    def partial_stats(
        self, share: int = 0, shares: int = 1, channels: list[str] | None = None, climatology=None, chunk: int = 16
    ) -> Partial:
        """This data-parallel rank's part of the statistics: chunks share, share + shares, ... of the
        training split (`chunk` time steps each, all channels of a chunk read together). Under
        data.nan=error the earliest NaN found is recorded instead (the merge raises it)."""
        train = split_indices(self.times, self.split_spec, "train", f"data.path {self.path!r}")
        channels = list(self.fields) if channels is None else list(channels)
        part = Partial(f"data.path {self.path!r}", share)
        for start in list(range(0, len(train), chunk))[share::shares]:
            times = train[start : start + chunk]
            blocks = self.read_many(channels, times)
            for position, channel in enumerate(channels):
                block = blocks[channel].astype(np.float64)  # [k, H, W]
                if self.nan == "error":
                    found = self._first_nan(channel, block, times)
                    if found:
                        part.refuse((found[0], position), found[1])
                        continue
                part.add(channel, start, block)
                if climatology and channel in climatology:
                    part.add_cells(channel, block)
            if part.error is not None:  # the chunks are in time order: later ones cannot hold an earlier NaN
                break
        return part

    def compute_stats(
        self, channels: list[str] | None = None, climatology: list[str] | None = None, chunk: int = 16
    ) -> dict:
        """Mean and standard deviation of each channel over the training split, streamed `chunk` time
        steps at a time (never the whole array in memory), and the per-cell training mean (the
        climatology) of the `climatology` channels, divided per cell by its count of valid steps.
        Computed on the model grid, in float64, NaN excluded."""
        return merge_partials([self.partial_stats(0, 1, channels, climatology, chunk)])

    def seasonal_climatology(
        self, channels: list[str], static: dict, window_days: int = WB2_WINDOW_DAYS, chunk: int = 16
    ) -> dict | None:
        """WeatherBench 2's climatology of `channels`: per day of year x hour of day and cell, the mean of
        the training split smoothed over `window_days` (physical units, model grid, NaN excluded), as
        {"hours": [...], "table": {channel: [366, hours, H, W] float32}}. None where it cannot be made:
        the training split lacks a day of the year (shorter than a year), or the data holds hours of day
        the training split does not. `static` ({channel: [H, W]}): where a cell has no valid value.
        Streams the training split once; memory 16 bytes x 366 x hours x H x W per channel."""
        train = split_indices(self.times, self.split_spec, "train", f"data.path {self.path!r}")
        doy, hour = day_of_year_and_hour(self.times[train])
        hours = sorted(set(hour.tolist()))
        if len(set(doy.tolist()) & set(range(365))) < 365 or set(day_of_year_and_hour(self.times)[1].tolist()) - set(
            hours
        ):
            return None
        sums = {c: SeasonalSums(hours, (len(self.grid.lat), len(self.grid.lon))) for c in channels}
        for start in range(0, len(train), chunk):
            times = train[start : start + chunk]
            blocks = self.read_many(channels, times)
            for c in channels:
                sums[c].add(self.times[times], blocks[c].astype(np.float64))
        table = {
            c: sums[c].smoothed(window_days, np.asarray(static[c], dtype=np.float64)).astype(np.float32)
            for c in channels
        }
        return {"hours": hours, "table": table}

    def target_times(self, indices) -> np.ndarray:
        """The valid times (datetime64) of the targets of samples `indices`: [B]."""
        return self.times[self.pairs[np.asarray(indices, dtype=np.int64), 1]]


def split_indices(times: np.ndarray, spec: dict, name: str, where: str) -> np.ndarray:
    """Time indices of split `name`: fractions of the axis in time order (train, val, test), or dates
    [start, end] (inclusive; an end given as a bare date includes its whole day)."""
    if name not in spec:
        raise DataError(f"data.split has no {name!r} part (it has {sorted(spec)})")
    n = len(times)
    value = spec[name]
    if isinstance(value, (list, tuple)):
        first, last, exclusive = split_range(value)
        start, end = np.datetime64(first, "ns"), np.datetime64(last, "ns")
        return np.nonzero((times >= start) & ((times < end) if exclusive else (times <= end)))[0]
    begin = 0.0
    for part in ("train", "val", "test"):
        if part == name:
            break
        begin += float(spec.get(part, 0.0))
    a, b = int(round(begin * n)), int(round((begin + float(value)) * n))
    return np.arange(a, min(b, n))


def rollout_chains(times, pairs, steps: int, pool, where: str, split_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(pairs, chains [N, steps]) for rollout training: the pairs (input, target, lead) whose input has a
    time step at every multiple 1..steps of the lead among the time indices `pool` that targets may come
    from (as for one-step targets), and those time indices."""
    hours = (times - times[0]) / np.timedelta64(1, "h")
    allowed = np.zeros(len(times), dtype=bool)
    allowed[np.asarray(pool)] = True
    wanted = hours[pairs[:, 0], None] + pairs[:, 2:3] * np.arange(1, steps + 1)[None, :]  # [N, K] hours
    found = np.clip(np.searchsorted(hours, wanted - 1e-6), 0, len(hours) - 1)  # [N, K]
    ok = (np.abs(hours[found] - wanted) < 1e-6) & allowed[found]
    keep = ok.all(axis=1)
    if not keep.any():
        raise DataError(
            f"{where}: split {split_name!r} holds no input time with targets at {steps} multiples of a lead "
            f"(train.rollout_steps={steps}); lower train.rollout_steps or data.lead_hours, or widen the split"
        )
    return pairs[keep], found[keep]


def lead_pairs(times, indices, lead_range, fixed_lead, where: str, split_name: str, pool=None) -> np.ndarray:
    """[N, 3] int64 (input index, target index, lead hours) of all pairs whose input is in `indices`, whose
    target is in `pool` (contiguous, starting at indices[0]; default: `indices`), and whose lead is
    `fixed_lead`, or lies in `lead_range` (hours). A lead must be a multiple of the time step (on an
    irregular axis: the distance between some two time steps)."""
    hours = (times - times[0]) / np.timedelta64(1, "h")
    steps = np.diff(hours)
    regular = len(steps) > 0 and np.allclose(steps, steps[0])
    step_text = (
        f"{steps[0]:g} h" if regular else (f"{steps.min():g}-{steps.max():g} h" if len(steps) else "one time step")
    )
    leads = [fixed_lead] if fixed_lead is not None else list(lead_range)
    for lead in leads:
        if regular and (lead / steps[0]) % 1:
            raise DataError(f"{where}: lead time {lead} h is not a multiple of the time step ({step_text})")
    low, high = (fixed_lead, fixed_lead) if fixed_lead is not None else lead_range
    inputs = np.asarray(indices)
    idx = np.asarray(pool) if pool is not None and len(inputs) else inputs
    h = hours[idx]
    found = []
    for k in range(1, len(idx)):  # pairs k steps apart; the split's indices are in time order
        diff = h[k:] - h[:-k]
        if diff.min() > high + 1e-6:
            break
        ok = (diff >= low - 1e-6) & (diff <= high + 1e-6) & np.isclose(diff, np.round(diff))
        i = np.nonzero(ok)[0]
        found.append(np.stack([idx[i], idx[i + k], np.round(diff[i]).astype(np.int64)], axis=1))
    pairs = np.concatenate(found).astype(np.int64) if found else np.zeros((0, 3), dtype=np.int64)
    pairs = pairs[np.isin(pairs[:, 0], inputs)] if len(pairs) else pairs
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))] if len(pairs) else pairs
    if not len(pairs):
        wanted = f"at lead {fixed_lead} h" if fixed_lead is not None else f"with a lead in {list(lead_range)} h"
        raise DataError(
            f"{where}: split {split_name!r} ({len(inputs)} time steps) holds no (input, target) pair {wanted}"
            f" (time step {step_text}); widen the split or change the lead"
        )
    return pairs
