"""Synthetic hyperspectral cubes: a few materials with smooth reflectance spectra, mixed per pixel by
smooth abundance maps, plus sensor noise (the linear mixing model of remote sensing). The materials'
spectra are generated (smooth bumps), or real library spectra (`spectra="library"`: a maple leaf, a
lichen, concrete and a mineral, see `spectral_library.py`) resampled to the requested bands.

Spectra are evaluated only at the wavelengths of the bands asked for, so a rank that owns 64 of 500
bands generates 64 bands.
"""

from __future__ import annotations

import math

import torch

from dchag.data.channels import band_wavelength
from dchag.data.synthetic_weather import observation_noise

NUM_MATERIALS = 6
FEATURES_PER_SPECTRUM = 3
ABUNDANCE_MODES = 3  # spatial frequencies of the abundance maps
MEAN, SCALE = 0.3, 0.2  # rough reflectance mean and spread, used to standardise the cube


class SyntheticHyperspectral:
    """`batch(indices)` -> x [B, C, H, W] (standardised reflectance). `rows` (set on a copy by
    `data/row_strip.py` for a context-parallel rank): only those pixel rows are generated."""

    rows: slice | None = None  # the pixel rows `batch` serves (a context-parallel strip); None: all
    standardisation = (MEAN, SCALE)  # x = (reflectance - MEAN) / SCALE: how to get reflectance back

    def __init__(
        self,
        channels: list[str],
        img_size: tuple[int, int],
        *,
        seed: int = 0,
        num_samples: int = 512,
        noise: float = 0.01,
        spectra: str = "generated",
    ):
        self.channels = list(channels)
        self.height, self.width = img_size
        self.seed, self.num_samples, self.noise = seed, num_samples, noise
        self.wavelengths = torch.tensor([band_wavelength(c) for c in self.channels])  # [C] nm
        self.materials = NUM_MATERIALS
        self._library = None
        if spectra == "library":  # real reflectance spectra (spectral's ECOSTRESS and RELAB samples)
            from dchag.data.spectral_library import library_spectra

            self.material_names, library = library_spectra(self.wavelengths.double().numpy())
            self._library = torch.from_numpy(library).float()  # [M, C]
            self.materials = len(self.material_names)

        g = torch.Generator().manual_seed(seed)
        self._base = 0.1 + 0.3 * torch.rand(NUM_MATERIALS, generator=g)
        self._slope = 0.3 * (torch.rand(NUM_MATERIALS, generator=g) - 0.5)
        self._height = 0.4 * (torch.rand(NUM_MATERIALS, FEATURES_PER_SPECTRUM, generator=g) - 0.3)
        self._center = 400 + 500 * torch.rand(NUM_MATERIALS, FEATURES_PER_SPECTRUM, generator=g)
        self._width = 20 + 80 * torch.rand(NUM_MATERIALS, FEATURES_PER_SPECTRUM, generator=g)

    def spectra(self) -> torch.Tensor:
        """Reflectance of each material at each requested band: [M, C], in (0, 1)."""
        if self._library is not None:
            return self._library
        lam = self.wavelengths[None, None, :]  # [1, 1, C]
        bumps = self._height[..., None] * torch.exp(
            -((lam - self._center[..., None]) ** 2) / (2 * self._width[..., None] ** 2)
        )
        spectra = self._base[:, None] + self._slope[:, None] * (self.wavelengths[None, :] - 650) / 500 + bumps.sum(1)
        return spectra.clamp(0.01, 0.99)

    def _abundances(self, index: int, rows: slice | None = None) -> torch.Tensor:
        """[M, H, W] (`rows`: [M, H_rows, W], pixel by pixel the whole map's values)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        ys = torch.linspace(0, 1, self.height)[rows if rows is not None else slice(None), None]
        xs = torch.linspace(0, 1, self.width)[None, :]
        logits = torch.zeros(self.materials, len(ys), self.width)
        for fy in range(ABUNDANCE_MODES):
            for fx in range(ABUNDANCE_MODES):
                a = torch.randn(self.materials, 1, 1, generator=g) / (1 + fx + fy)
                ph = 2 * math.pi * torch.rand(self.materials, 1, 1, generator=g)
                logits += a * torch.cos(2 * math.pi * (fy * ys + fx * xs) + ph)
        return torch.softmax(4.0 * logits, dim=0)  # [M, H, W]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        abund = torch.stack([self._abundances(i, self.rows) for i in indices])  # [B, M, H, W]
        cube = torch.einsum("bmhw,mc->bchw", abund, self.spectra())  # [B, C, H, W]
        shape = (self.height, self.width)
        cube = cube + self.noise * observation_noise(indices, self.channels, shape, self.seed, "x", self.rows)
        return {"x": (cube - MEAN) / SCALE}
