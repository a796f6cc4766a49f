"""Channel names: the ERA5-style weather vocabulary and wavelength-named hyperspectral bands.

Names matter because the model looks channel embeddings (and per-channel tokenizers) up by name, so two
datasets with different channel subsets can share one model.
"""

from __future__ import annotations

from dchag.config import BAND_RE  # noqa: F401  (re-exported; defined with the config: the model reads it too)

SURFACE = ["t2m", "u10", "v10"]
Z_LEVELS = [50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000]
ATMOS_LEVELS = [10, 20, 30, 50, 70, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000]

# The 84 channels of the paper's runnable ERA5 configuration: 3 surface variables, geopotential at 13
# levels, specific humidity, temperature and both wind components at 17 levels each.
ERA5_84 = SURFACE + [f"z_{p}" for p in Z_LEVELS] + [f"{var}_{p}" for var in ("q", "t", "u", "v") for p in ATMOS_LEVELS]
FORECAST_TARGETS = ["z_500", "t_850", "t2m", "u10", "v10"]



def weather_names(count: int) -> list[str]:
    """The first `count` ERA5 names; beyond 84, extra synthetic variables `x_085`, `x_086`, ..."""
    names = ERA5_84[:count]
    names += [f"x_{i:03d}" for i in range(len(names) + 1, count + 1)]
    return names


def band_names(count: int, start_nm: float = 400.0, stop_nm: float = 900.0) -> list[str]:
    """`count` bands evenly spaced over [start_nm, stop_nm], named by wavelength: b400.0, ..."""
    if count == 1:
        return [f"b{start_nm:.1f}"]
    step = (stop_nm - start_nm) / (count - 1)
    return [f"b{start_nm + i * step:.1f}" for i in range(count)]


def band_wavelength(name: str) -> float:
    match = BAND_RE.match(name)
    if match is None:
        raise ValueError(f"hyperspectral channel {name!r} is not a band name like 'b550.0' (wavelength in nm)")
    return float(match.group(1))
