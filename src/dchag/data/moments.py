"""Normalisation statistics from parts: each data-parallel rank streams its share of the training data
into a `Partial`, and `merge_partials` combines the parts of every rank into the statistics.

A part holds, per channel, the (count, mean, sum of squared deviations) of each chunk of data it read
(a chunk of time steps, or one crop), keyed by the chunk's position. The merge sorts the chunks of a
channel by position and combines them in that order (Chan et al.'s pairwise update), so the result does
not depend on how the chunks were shared out: one process and 2 ranks give the same numbers. The
climatology is a per-cell sum and count of valid values, divided per cell by the count; `SeasonalSums`
keeps them per day of year and hour of day for WeatherBench 2's climatology (docs/data.md).
"""

from __future__ import annotations

import math

import numpy as np

from dchag.data.errors import DataError


def chunk_moments(values: np.ndarray) -> tuple[int, float, float]:
    """(count, mean, sum of squared deviations from the mean) of the finite `values`, in float64."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0, 0.0, 0.0
    mean = float(v.mean())
    return int(v.size), mean, float(((v - mean) ** 2).sum())


def combine(a: tuple[int, float, float], b: tuple[int, float, float]) -> tuple[int, float, float]:
    """Chan et al.'s merge of two (count, mean, M2) triples (exact up to rounding, no cancellation)."""
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    if nb == 0:
        return a
    if na == 0:
        return b
    delta = mb - ma
    return n, ma + delta * nb / n, m2a + m2b + delta * delta * na * nb / n


class Partial:
    """One rank's share of the statistics: chunk moments per channel, climatology sums per channel, and
    the earliest NaN found where NaN is refused (`error`: (sort key, one-line message))."""

    def __init__(self, where: str, share: int = 0):
        self.where, self.share = where, share  # share: the data-parallel rank that read it
        self.chunks: dict[str, dict[int, tuple[int, float, float]]] = {}
        self.cells: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # channel -> (sum [H, W], count [H, W])
        self.error: tuple[tuple, str] | None = None

    def add(self, channel: str, key: int, values: np.ndarray) -> None:
        """The values of one chunk of `channel` ([k, ...], NaN = invalid)."""
        self.chunks.setdefault(channel, {})[key] = chunk_moments(values)

    def add_cells(self, channel: str, block: np.ndarray) -> None:
        """Climatology sums of a block [k, H, W]: per cell, the sum and the count of its finite values."""
        finite = np.isfinite(block)
        total = np.where(finite, block, 0.0).sum(axis=0, dtype=np.float64)
        count = finite.sum(axis=0).astype(np.int64)
        if channel in self.cells:
            old_total, old_count = self.cells[channel]
            total, count = old_total + total, old_count + count
        self.cells[channel] = (total, count)

    def refuse(self, key: tuple, message: str) -> None:
        """Remember the earliest NaN found (by `key`); the merge raises it on every rank alike."""
        if self.error is None or key < self.error[0]:
            self.error = (key, message)


def merge_partials(parts: list[Partial]) -> dict:
    """{"channels": {name: {mean, std}}, "climatology": {name: [[...]]}} from the parts of every rank.

    Raises the earliest refused NaN of any part, or a channel with no valid value, as a DataError: the
    same message on every rank that merges the same parts."""
    errors = [p.error for p in parts if p.error is not None]
    if errors:
        raise DataError(min(errors)[1])
    chunks: dict[str, dict[int, tuple[int, float, float]]] = {}
    cells: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for p in parts:
        for name, by_key in p.chunks.items():
            chunks.setdefault(name, {}).update(by_key)  # two ranks with the same chunk hold the same values
        for name, pair in p.cells.items():
            cells.setdefault(name, {})[p.share] = pair  # TP peers replicating a channel read the same share
    where = parts[0].where if parts else "data"
    out: dict = {"channels": {}, "climatology": {}}
    for name, by_key in chunks.items():
        total = (0, 0.0, 0.0)
        for key in sorted(by_key):
            total = combine(total, by_key[key])
        count, mean, m2 = total
        if count == 0:
            raise DataError(f"{where}: channel {name!r} is all NaN in the training split")
        out["channels"][name] = {"mean": mean, "std": math.sqrt(m2 / count) or 1.0}
    for name, by_share in cells.items():
        total = sum(by_share[k][0] for k in sorted(by_share))
        count = sum(by_share[k][1] for k in sorted(by_share))
        mean = out["channels"][name]["mean"]
        # cells never valid in training (land under a sea field) get the channel mean: finite, never scored
        out["climatology"][name] = np.where(count > 0, total / np.maximum(count, 1), mean).tolist()
    return out


# ---------------------------------------------------------------------------------------------------
# climatology by day of year and hour of day (WeatherBench 2)

WB2_WINDOW_DAYS = 61  # WeatherBench 2's ERA5 climatology: a 61-day triangular window (compute_climatology.py)


def day_of_year_and_hour(times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(day of year 0..365, hour of day 0..23) of datetime64 `times` [k], as xarray's `time.dt.dayofyear`
    (1..366, minus one) and `time.dt.hour` count them (so 1 March is day 59 in common years, 60 in leap
    years, as in WeatherBench 2)."""
    t = np.asarray(times).astype("datetime64[ns]")
    day = t.astype("datetime64[D]")
    doy = (day - day.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64)
    hour = ((t - day) // np.timedelta64(1, "h")).astype(np.int64)
    return doy, hour


class SeasonalSums:
    """Per (day of year, hour of day, cell) sums and counts of the finite values of one field: the raw
    material of a climatology by day of year x hour of day. `hours`: the hours of day kept (a slot each)."""

    def __init__(self, hours: list[int], shape: tuple[int, int]):
        self.hours = sorted(hours)
        self.slot = {h: i for i, h in enumerate(self.hours)}
        self.sum = np.zeros((366, len(self.hours), *shape), dtype=np.float64)  # [day, hour slot, H, W]
        self.count = np.zeros((366, len(self.hours), *shape), dtype=np.int64)

    def add(self, times: np.ndarray, block: np.ndarray) -> None:
        """Values `block` [k, H, W] (NaN = invalid) at datetime64 `times` [k]."""
        doy, hour = day_of_year_and_hour(times)
        slots = np.array([self.slot[int(h)] for h in hour], dtype=np.int64)
        finite = np.isfinite(block)
        np.add.at(self.sum, (doy, slots), np.where(finite, block, 0.0))
        np.add.at(self.count, (doy, slots), finite.astype(np.int64))

    def smoothed(self, window_days: int, fallback: np.ndarray) -> np.ndarray:
        """The climatology [366, hours, H, W]: for each day d, the mean of the values of days d - w .. d + w
        (w = window_days // 2, circular over the year) weighted by WeatherBench 2's triangular window
        (1 at d, falling linearly to 0 at d +- w, as its create_window_weights), over all years, NaN
        excluded; cells with no value in the window get `fallback` [H, W] (the static mean)."""
        half = window_days // 2
        weights = np.concatenate([np.linspace(0, 1, half + 1), np.linspace(1, 0, half + 1)[1:]])
        total = np.zeros_like(self.sum)
        count = np.zeros(self.sum.shape, dtype=np.float64)
        for offset, w in zip(range(-half, half + 1), weights, strict=True):
            if w:
                total += w * np.roll(self.sum, -offset, axis=0)
                count += w * np.roll(self.count, -offset, axis=0)
        return np.where(count > 0, total / np.maximum(count, 1e-300), fallback[None, None])
