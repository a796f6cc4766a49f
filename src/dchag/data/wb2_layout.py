"""Forecasts as WeatherBench 2 stores them: one xarray Dataset / Zarr store per forecast run.

Layout (WeatherBench 2's init-time convention): dimensions `time` (initialisation), `prediction_timedelta`
(the lead, timedelta64), `latitude` (ascending) and `longitude`, plus `level` (hPa) for pressure-level
variables; WeatherBench 2's variable names (`2m_temperature`, `geopotential` at `level` 500, ...) with a
`units` attribute; chunks of one initialisation time (WeatherBench 2 recommends whole fields per chunk and
small chunks in time). Our channel names map to WeatherBench 2's through the alias table the ERA5 reader
resolves names with (`dchag.data.era5.ALIAS_GROUPS`); a channel without a WeatherBench 2 name (synthetic
channels, other variables) keeps its own name and has no `level`. Each variable records the channel
names it holds (`dchag_channels`, one per level, null where a variable shares the `level` axis but was
not forecast at that level: NaN there), so reading a file back gives the names the model used.

Files are written with `xarray.Dataset.to_zarr` into a temporary store beside the target and renamed into
place when complete: a reader never sees half a forecast.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dchag.data.era5 import ALIASES, LAT_NAMES, LEVEL_DIMS, LEVEL_RE, LON_NAMES, closes_circle
from dchag.data.errors import DataError

INIT_NAMES = ("time", "init_time")  # WeatherBench 2 renames `time` to `init_time` internally
LEAD_NAMES = ("prediction_timedelta", "lead_time")
CHANNELS_ATTR = "dchag_channels"  # the model's channel names of a variable (one per level)
# synthetic-weather forecasts: `time` labels held-out sample i as SYNTHETIC_EPOCH + i x SYNTHETIC_SPACING
SYNTHETIC_EPOCH = np.datetime64("2000-01-01T00:00", "ns")
SYNTHETIC_SPACING = np.timedelta64(10, "D")  # longer than any synthetic rollout: valid times never overlap


def synthetic_times(indices) -> np.ndarray:
    """The `time` labels of synthetic samples `indices`."""
    return SYNTHETIC_EPOCH + np.asarray(indices, dtype=np.int64) * SYNTHETIC_SPACING


def synthetic_indices(times, where: str) -> np.ndarray:
    """The sample indices `synthetic_times` labelled `times` with."""
    offset = (np.asarray(times).astype("datetime64[ns]") - SYNTHETIC_EPOCH) / SYNTHETIC_SPACING
    if np.any(offset < 0) or np.any(offset != np.round(offset)):
        raise DataError(
            f"{where}: its times are not synthetic sample labels ({SYNTHETIC_EPOCH} + i x {SYNTHETIC_SPACING}); "
            "was it written by dchag forecast for a synthetic-weather run?"
        )
    return np.round(offset).astype(np.int64)


def lead_timedelta(hours: float) -> np.timedelta64:
    """A lead of `hours` as a timedelta, in whole seconds."""
    return np.timedelta64(int(round(float(hours) * 3600)), "s")


def valid_time_indices(times: np.ndarray, init_times: np.ndarray, hours: float) -> tuple[np.ndarray, np.ndarray]:
    """(index into the ascending time axis `times` of each init + hours, bool [B]: whether `times` holds it);
    the index of a row without its time is meaningless. Forecast inputs and the truth of stored forecasts
    are looked up this way."""
    wanted = np.asarray(init_times) + lead_timedelta(hours)
    found = np.clip(np.searchsorted(times, wanted), 0, len(times) - 1)
    return found, times[found] == wanted


def wb2_variable(channel: str) -> tuple[str, float | None] | None:
    """(WeatherBench 2 variable name, pressure level in hPa or None) of a channel naming a known ERA5 /
    WeatherBench variable (`t2m`, `2m_temperature`, `z_500`, `geopotential_500`); None otherwise.
    ALIAS_GROUPS lists each variable's WeatherBench name last."""
    if channel in ALIASES:
        return ALIASES[channel][-1], None
    match = LEVEL_RE.match(channel)
    if match and match["var"] in ALIASES:
        return ALIASES[match["var"]][-1], float(match["level"])
    return None


def variable_layout(channels: list[str], wb2_names: bool = True) -> dict[str, list[tuple[float | None, str]]]:
    """{variable: [(level or None, channel), ...] in ascending level} for `channels`: WeatherBench 2 names
    where known (`wb2_names`), else the channel's own name."""
    layout: dict[str, list[tuple[float | None, str]]] = {}
    for channel in channels:
        found = wb2_variable(channel) if wb2_names else None
        name, level = found if found else (channel, None)
        layout.setdefault(name, []).append((level, channel))
    for name, entries in layout.items():
        levels = [lev for lev, _ in entries]
        if len(entries) > 1 and (None in levels or len(set(levels)) < len(levels)):
            raise DataError(
                f"channels {[c for _, c in entries]} all map to WeatherBench 2 variable {name!r}"
                + (" at one level" if None not in levels else ", with and without a level")
                + "; forecast only one of them"
            )
        entries.sort(key=lambda e: e[0])
    return layout


def forecast_dataset_of(
    values: dict[str, np.ndarray],
    init_times: np.ndarray,
    lead_hours: list[float],
    lat: np.ndarray,
    lon: np.ndarray,
    *,
    units: dict[str, str] | None = None,
    wb2_names: bool = True,
    attrs: dict | None = None,
):
    """The forecast as an xarray Dataset in WeatherBench 2's layout. `values`: channel -> [N, S, H, W]
    (N initialisation times, S leads, latitudes ascending), physical units; `units`: channel -> units."""
    import xarray as xr

    channels = list(values)
    layout = variable_layout(channels, wb2_names)
    leads = np.array([lead_timedelta(h) for h in lead_hours]).astype("timedelta64[ns]")
    coords = {
        "time": np.asarray(init_times).astype("datetime64[ns]"),
        "prediction_timedelta": leads,
        "latitude": np.asarray(lat, dtype=np.float64),
        "longitude": np.asarray(lon, dtype=np.float64),
    }
    data_vars = {}
    levels_used: set[float] = set()
    for name, entries in layout.items():
        first = entries[0][1]
        var_attrs = {CHANNELS_ATTR: json.dumps([c for _, c in entries])}
        if (units or {}).get(first):
            var_attrs["units"] = units[first]
        if entries[0][0] is None:
            data_vars[name] = (("time", "prediction_timedelta", "latitude", "longitude"), values[first], var_attrs)
        else:
            levels_used.update(lev for lev, _ in entries)
            data_vars[name] = (
                ("time", "prediction_timedelta", "level", "latitude", "longitude"),
                np.stack([values[c] for _, c in entries], axis=2),  # [N, S, levels, H, W]
                var_attrs,
            )
    if levels_used:  # one level coordinate for every pressure-level variable; a variable without a level is NaN
        level = np.array(sorted(levels_used))
        coords["level"] = level.astype(np.int64) if np.all(level == np.round(level)) else level
        for name, entries in layout.items():
            if entries[0][0] is None:
                continue
            dims, data, var_attrs = data_vars[name]
            at = [int(np.searchsorted(level, lev)) for lev, _ in entries]
            names: list[str | None] = [None] * len(level)  # the channel at each level (None: not forecast)
            for i, (_, channel) in zip(at, entries):
                names[i] = channel
            var_attrs[CHANNELS_ATTR] = json.dumps(names)
            if len(entries) != len(level):
                full = np.full((*data.shape[:2], len(level), *data.shape[3:]), np.nan, dtype=data.dtype)
                full[:, :, at] = data
                data_vars[name] = (dims, full, var_attrs)
    ds = xr.Dataset(data_vars, coords=coords, attrs=dict(attrs or {}))
    ds["latitude"].attrs.update(units="degrees_north", long_name="latitude")
    ds["longitude"].attrs.update(units="degrees_east", long_name="longitude")
    ds["time"].attrs["long_name"] = "initialisation time"
    ds["prediction_timedelta"].attrs["long_name"] = "lead time"
    if "level" in ds.coords:
        ds["level"].attrs.update(units="hPa", long_name="pressure level")
    return ds


# ---------------------------------------------------------------------------------------------------
# writing


# fixed time units: left to xarray, they would be inferred from the first piece written (one 00Z init
# gives "days since ..."), and a later piece off that grid (a 06Z init) would be stored wrongly or refused
TIME_ENCODING = {
    "time": {"units": "seconds since 1970-01-01", "dtype": "int64"},
    "prediction_timedelta": {"units": "seconds", "dtype": "int64"},
}


def _encoding(ds) -> dict:
    """One chunk per initialisation time, whole fields and leads inside it; times in whole seconds."""
    return {name: {"chunks": (1, *ds[name].shape[1:])} for name in ds.data_vars} | TIME_ENCODING


class ForecastWriter:
    """Writes a forecast store piece by piece (`append` consecutive initialisation times) into a temporary
    store beside `path`, and `commit` renames it into place. An existing Zarr store at `path` is replaced
    whole; any other file or folder there is refused before any work."""

    def __init__(self, path: str | Path):
        self.path = check_out(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.started = False

    def append(self, ds) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            if not self.started:
                ds.to_zarr(self.tmp, mode="w", encoding=_encoding(ds), zarr_format=2, consolidated=True)
                self.started = True
            else:
                ds.to_zarr(self.tmp, append_dim="time", zarr_format=2, consolidated=True)

    def commit(self) -> Path:
        """Move the finished store to `path` (replacing an earlier forecast there)."""
        if not self.started:
            raise DataError(f"no forecast was written to {str(self.path)!r}: there was no initialisation time")
        old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
        if self.path.exists():
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old.exists():
            shutil.rmtree(old)
        return self.path

    def abort(self) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def check_out(path: str | Path) -> Path:
    """`path` as a Zarr store to write (a forecast, `dchag embed`'s .zarr): new, or an earlier Zarr store
    (replaced); anything else is refused."""
    path = Path(path)
    if path.exists() and not is_zarr_store(path):
        raise DataError(f"--out {str(path)!r} exists and is not a Zarr store; give a new path (FILE.zarr)")
    blocking = next((f for f in path.parents if f.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise DataError(f"cannot write --out {str(path)!r}: {str(blocking)!r} is a file, not a folder")
    return path


def write_forecast(ds, path: str | Path) -> Path:
    """Write the forecast Dataset `ds` to the Zarr store `path`, atomically (temporary store, then rename)."""
    writer = ForecastWriter(path)
    try:
        writer.append(ds)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def is_zarr_store(path: Path) -> bool:
    """A folder with Zarr v3 (zarr.json) or v2 (.zgroup, consolidated .zmetadata) group metadata."""
    return path.is_dir() and any((path / f).exists() for f in ("zarr.json", ".zgroup", ".zmetadata"))


# ---------------------------------------------------------------------------------------------------
# reading


def _find_dim(names: tuple[str, ...], dims, what: str, where: str) -> str:
    for name in names:
        if name in dims:
            return name
    raise DataError(f"{where}: no {what} dimension (looked for {', '.join(names)})")


@dataclass
class ForecastFile:
    """A forecast store opened lazily. `channels` in file order; arrays come out with latitudes ascending
    and longitudes ascending in [0, 360) for a global grid (whatever order the file keeps)."""

    ds: object  # the xarray Dataset
    where: str
    init_times: np.ndarray  # [N] datetime64[ns]
    lead_hours: list[float]  # [S]
    lat: np.ndarray  # [H] ascending
    lon: np.ndarray  # [W] ascending
    channels: list[str]
    dims: dict  # role -> dimension name: init, lead, lat, lon
    fields: dict  # channel -> (variable, {level dim: index} or {})
    _lat_order: np.ndarray
    _lon_order: np.ndarray

    def units(self, channel: str) -> str:
        return str(self.ds[self.fields[channel][0]].attrs.get("units", ""))

    def read(self, channels: list[str], init_index, lead_index: int) -> np.ndarray:
        """[B, C, H, W] float64 of `channels` at initialisation indices `init_index` and one lead."""
        d = self.dims
        out = []
        for channel in channels:
            variable, level = self.fields[channel]
            da = self.ds[variable].isel({d["init"]: np.asarray(init_index), d["lead"]: lead_index, **level})
            block = np.asarray(da.transpose(d["init"], d["lat"], d["lon"]).values, dtype=np.float64)
            out.append(block[:, self._lat_order][:, :, self._lon_order])
        return np.stack(out, axis=1)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every channel as [N, S, H, W] float64 (the whole forecast in memory)."""
        everything = np.arange(len(self.init_times))
        return {
            c: np.stack([self.read([c], everything, s)[:, 0] for s in range(len(self.lead_hours))], axis=1)
            for c in self.channels
        }


def open_forecast(path: str | Path) -> ForecastFile:
    """A forecast store in WeatherBench 2's layout (ours or another model's) as per-channel fields: a
    variable with a level dimension gives one channel per level (its recorded channel name, else
    `VARIABLE_LEVEL`), one without gives one channel (its recorded name, else the variable's)."""
    import xarray as xr

    path = Path(path)
    where = f"--forecast {str(path)!r}"
    if not is_zarr_store(path):
        raise DataError(f"{where} is not a Zarr store (no .zgroup / zarr.json); give the folder dchag forecast wrote")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ds = xr.open_zarr(path, chunks=None)
    dims = {
        "init": _find_dim(INIT_NAMES, ds.dims, "initialisation time", where),
        "lead": _find_dim(LEAD_NAMES, ds.dims, "lead time", where),
        "lat": _find_dim(LAT_NAMES, ds.dims, "latitude", where),
        "lon": _find_dim(LON_NAMES, ds.dims, "longitude", where),
    }
    init_times = np.asarray(ds[dims["init"]].values)
    if not np.issubdtype(init_times.dtype, np.datetime64):
        raise DataError(f"{where}: {dims['init']!r} is not a datetime axis (dtype {init_times.dtype})")
    leads = np.asarray(ds[dims["lead"]].values)
    if not np.issubdtype(leads.dtype, np.timedelta64):
        raise DataError(f"{where}: {dims['lead']!r} is not a timedelta axis (dtype {leads.dtype})")
    lead_hours = [float(v / np.timedelta64(1, "h")) for v in leads]
    lat = ds[dims["lat"]].values.astype(np.float64)
    lon = ds[dims["lon"]].values.astype(np.float64)
    lon = np.mod(lon, 360.0) if closes_circle(lon) else lon
    lat_order, lon_order = np.argsort(lat), np.argsort(lon, kind="stable")
    channels, fields = [], {}
    core = set(dims.values())
    for variable in ds.data_vars:
        da = ds[variable]
        if not core <= set(da.dims):
            continue  # not a forecast field (e.g. a coordinate-like variable)
        level_dim = next((d for d in LEVEL_DIMS if d in da.dims), None)
        extra = set(da.dims) - core - ({level_dim} if level_dim else set())
        if extra:
            raise DataError(
                f"{where}: variable {variable!r} has the extra dimension(s) {sorted(extra)}; dchag scores "
                "deterministic forecasts (select one member first)"
            )
        recorded = json.loads(da.attrs[CHANNELS_ATTR]) if CHANNELS_ATTR in da.attrs else None
        if level_dim is None:
            names, indexers = [recorded[0] if recorded else variable], [{}]
        else:  # recorded: the channel at each level, None where this variable was not forecast
            levels = ds[level_dim].values
            if recorded is None or len(recorded) != len(levels):
                recorded = [f"{variable}_{float(v):g}" for v in levels]
            names = [c for c in recorded if c is not None]
            indexers = [{level_dim: i} for i, c in enumerate(recorded) if c is not None]
        for name, indexer in zip(names, indexers):
            channels.append(name)
            fields[name] = (variable, indexer)
    if not channels:
        raise DataError(f"{where}: no variable has the dimensions {sorted(core)}")
    return ForecastFile(
        ds, where, init_times.astype("datetime64[ns]"), lead_hours, lat[lat_order], lon[lon_order], channels,
        dims, fields, lat_order, lon_order,
    )  # fmt: skip
