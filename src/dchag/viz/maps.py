"""Maps of truth, forecast and error for one sample, one PNG per variable."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def forecast_maps(truth, pred, names: list[str], lead: int, folder: Path, lat=None, lon=None) -> list[Path]:
    """truth, pred [C, H, W] (physical units, latitudes ascending) -> PNG paths `folder/NAME_LEADh.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    truth, pred = np.asarray(truth, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    h, w = truth.shape[1:]
    lat = np.linspace(-90, 90, h) if lat is None else np.asarray(lat)
    lon = np.linspace(0, 360, w, endpoint=False) if lon is None else np.asarray(lon)
    extent = (lon[0], lon[-1], lat[0], lat[-1])
    paths = []
    for c, name in enumerate(names):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), constrained_layout=True)
        low, high = np.nanmin(truth[c]), np.nanmax(truth[c])
        error = pred[c] - truth[c]
        bound = np.nanmax(np.abs(error)) or 1.0
        panels = [
            (truth[c], "truth", "viridis", low, high),
            (pred[c], f"forecast (+{lead} h)", "viridis", low, high),
            (error, "forecast - truth", "RdBu_r", -bound, bound),
        ]
        for ax, (field, title, cmap, vmin, vmax) in zip(axes, panels):
            image = ax.imshow(field, origin="lower", extent=extent, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(f"{name}: {title}")
            ax.set_xlabel("longitude")
            ax.set_ylabel("latitude")
            fig.colorbar(image, ax=ax, shrink=0.85)
        path = folder / f"{name}_{lead}h.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
