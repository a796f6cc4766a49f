"""Synthetic sources are deterministic, generate only the channels asked for, and carry real signal."""

import torch

from dchag.data.channels import ERA5_84, band_names, weather_names
from dchag.data.synthetic_hyperspectral import SyntheticHyperspectral
from dchag.data.synthetic_weather import SyntheticWeather


def weather(channels, out=("t2m",), **kw):
    return SyntheticWeather(list(channels), list(out), (16, 32), **kw)


def test_era5_vocabulary_has_the_papers_84_channels():
    assert len(ERA5_84) == 84 and len(set(ERA5_84)) == 84
    assert weather_names(86)[-2:] == ["x_085", "x_086"]


def test_same_seed_same_batch_other_seed_other_batch():
    a, b, c = weather(ERA5_84[:5]), weather(ERA5_84[:5]), weather(ERA5_84[:5], seed=1)
    assert torch.equal(a.batch([3, 4])["x"], b.batch([3, 4])["x"])
    assert not torch.allclose(a.batch([3, 4])["x"], c.batch([3, 4])["x"])


def test_a_channel_subset_equals_those_channels_of_the_full_set():
    full = weather(ERA5_84[:20], noise=0.0).batch([0, 1])["x"]
    part = weather(ERA5_84[5:9], noise=0.0).batch([0, 1])["x"]
    torch.testing.assert_close(part, full[:, 5:9])


def test_weather_future_is_predictable_from_the_present():
    """With no noise, the target at lead 0 hours would equal the input: changes come only from advection."""
    src = weather(["t2m", "z_500"], out=["t2m", "z_500"], noise=0.0, max_lead_hours=72)
    batch = src.batch(list(range(8)))
    amp, _ = src._sample_state(0)
    now = src._latents(amp[None], torch.zeros(1))
    later = src._latents(amp[None], torch.tensor([6.0]))
    much_later = src._latents(amp[None], torch.tensor([72.0]))
    small, large = (later - now).abs().mean(), (much_later - now).abs().mean()
    assert small < 0.5 * large  # change grows with lead time: short leads are nearly persistence
    assert batch["y"].shape == (8, 2, 16, 32) and batch["lead_hours"].min() >= 6


def test_hyperspectral_bands_are_generated_at_their_wavelengths_only():
    names = band_names(50)
    full = SyntheticHyperspectral(names, (12, 12), noise=0.0).batch([2])["x"]
    part = SyntheticHyperspectral(names[10:13], (12, 12), noise=0.0).batch([2])["x"]
    torch.testing.assert_close(part, full[:, 10:13])
    # neighbouring bands are strongly correlated, as in real spectra
    flat = full[0].flatten(1)
    corr = torch.corrcoef(flat[20:22])[0, 1]
    assert corr > 0.9


def test_library_spectra_are_real_reflectance_with_a_vegetation_red_edge():
    from dchag.data.spectral_library import library_spectra

    names, spectra = library_spectra([650.0, 800.0])
    assert "Acer rubrum" in names and len(names) == 4
    leaf = spectra[names.index("Acer rubrum")]
    assert leaf[1] > 2 * leaf[0]  # chlorophyll absorbs red, leaf structure reflects near-infrared
    assert ((spectra >= 0) & (spectra <= 1)).all()


def test_cubes_mixed_from_library_spectra_generate_only_the_bands_asked_for():
    bands = band_names(500)
    full = SyntheticHyperspectral(bands, (12, 12), noise=0.0, spectra="library").batch([0, 1])["x"]
    part = SyntheticHyperspectral(bands[100:164], (12, 12), noise=0.0, spectra="library").batch([0, 1])["x"]
    assert full.shape == (2, 500, 12, 12)
    torch.testing.assert_close(part, full[:, 100:164])
