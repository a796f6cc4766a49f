"""False-colour composites of a cube (original / masked input / reconstruction) and pixel spectra."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COMPOSITES = {"true colour (R, G, B)": (665.0, 560.0, 490.0), "false colour (NIR, R, G)": (842.0, 665.0, 560.0)}


def _rgb(cube: np.ndarray, bands: list[int], limits) -> np.ndarray:
    """[C, H, W] -> [H, W, 3] scaled by the original's 2nd-98th percentiles per band."""
    image = np.stack([(cube[b] - lo) / (hi - lo + 1e-12) for b, (lo, hi) in zip(bands, limits)], axis=-1)
    return np.clip(image, 0, 1)


def reconstruction_figures(original, masked, reconstruction, wavelengths: list[float], folder: Path) -> list[Path]:
    """PNG composites (bands nearest to each colour's wavelength) and a plot of a few pixels' spectra."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    wl = np.asarray(wavelengths)
    paths = []
    for title, targets in COMPOSITES.items():
        bands = [int(np.argmin(np.abs(wl - t))) for t in targets]
        if len(set(bands)) < 3:
            continue  # the sensor does not separate these colours
        limits = [np.percentile(original[b], [2, 98]) for b in bands]
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), constrained_layout=True)
        for ax, cube, name in zip(
            axes, (original, masked, reconstruction), ("original", "masked input", "reconstruction")
        ):
            ax.imshow(_rgb(cube, bands, limits))
            ax.set_title(name)
            ax.axis("off")
        fig.suptitle(f"{title}: bands {', '.join(f'{wl[b]:g} nm' for b in bands)}")
        path = folder / f"composite_{'rgb' if 'true' in title else 'nir'}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    h, w = original.shape[1:]
    pixels = [(h // 4, w // 4), (h // 2, w // 2), (3 * h // 4, 3 * w // 4)]
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    order = np.argsort(wl)
    for k, (r, c) in enumerate(pixels):
        line = ax.plot(wl[order], original[order, r, c], "-", label=f"pixel ({r}, {c}) original")[0]
        ax.plot(wl[order], reconstruction[order, r, c], "--", color=line.get_color(), label="reconstructed")
    ax.set_xlabel("wavelength (nm)")
    ax.set_ylabel("value (data units)")
    ax.legend(fontsize=7)
    path = folder / "spectra.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [*paths, path]
