"""Data sources: synthetic weather and hyperspectral generators that produce only the channels asked for."""

from __future__ import annotations

from dchag.data.channels import FORECAST_TARGETS, band_names, weather_names


def channel_names(data_cfg) -> list[str]:
    """The ordered channel names a data config describes (a count becomes the source's standard names;
    "all" the selected bands of a spectral cube, read from its files)."""
    if data_cfg.channels == "all":
        from dchag.data.spectral_cube import selected_channels

        return selected_channels(data_cfg)
    if not isinstance(data_cfg.channels, int):
        return list(data_cfg.channels)
    if data_cfg.kind == "synthetic-weather":
        return weather_names(data_cfg.channels)
    return band_names(data_cfg.channels)


def default_out_channels(data_cfg, channels: list[str]) -> list[str]:
    """Forecast targets when the config names none: the paper's five where present, else the first five."""
    if data_cfg.kind in ("synthetic-weather", "era5"):
        targets = [c for c in FORECAST_TARGETS if c in channels]
        return targets or channels[: min(5, len(channels))]
    return list(channels)


from dchag.data.sources import batch_indices, build_source  # noqa: E402

__all__ = ["channel_names", "default_out_channels", "build_source", "batch_indices"]
