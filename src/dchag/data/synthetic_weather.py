"""Synthetic weather: smooth global fields that are advected eastward and diffused, so the future is
predictable from the present.

A handful of latent fields (zonal waves times smooth meridional shapes) move east at a
latitude-dependent speed and lose small scales over time. Every channel is its own fixed mixture of the
latents plus a latitude profile, so channels are correlated like physical variables. A channel's
mixture depends only on its name and the seed: generating 10 channels or 1000 gives the same values for
the channels they share, and a rank asking for its own channels pays only for those.
"""

from __future__ import annotations

import hashlib
import math

import torch

NUM_LATENTS = 8
ZONAL_WAVES = 4  # zonal wavenumbers 1..4
MERIDIONAL_MODES = 4
HOURS_PER_DAY = 24.0


def _name_seed(name: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def observation_noise(
    indices: list[int], names: list[str], shape, seed: int, stream: str, rows: slice | None = None
) -> torch.Tensor:
    """Unit Gaussian noise [B, C, H, W], seeded per (sample, channel): any channel subset or batch split
    sees exactly the noise the full dataset has there. `rows`: only those rows [B, C, H_rows, W] (each
    image is drawn whole, one at a time, so a strip holds exactly the whole image's values)."""
    rows = rows if rows is not None else slice(None)
    h = len(range(shape[0])[rows])
    out = torch.empty(len(indices), len(names), h, *shape[1:])
    for b, index in enumerate(indices):
        for c, name in enumerate(names):
            g = torch.Generator().manual_seed(_name_seed(f"{stream}:{index}:{name}", seed))
            out[b, c] = torch.randn(*shape, generator=g)[rows]
    return out


class SyntheticWeather:
    """`batch(indices)` -> x [B, C, H, W] at time 0, y [B, C_out, H, W] at the lead time, lead_hours [B].

    With `rollout_steps` K > 1 (rollout training): y [B, K, C_out, H, W] at lead, 2 lead, ..., K lead and
    forcings [B, K-1, C, H, W], the input channels at each intermediate valid time. The first step's
    target is the one-step source's y; every later time has its own observation noise.
    `rows` (set on a copy by `data/row_strip.py` for a context-parallel rank): only those pixel rows are
    generated; `lat_weights` stays the whole image's.
    """

    rows: slice | None = None  # the pixel rows `batch` serves (a context-parallel strip); None: all

    def __init__(
        self,
        channels: list[str],
        out_channels: list[str],
        img_size: tuple[int, int],
        *,
        seed: int = 0,
        num_samples: int = 512,
        max_lead_hours: int = 72,
        lead_step_hours: int = 6,
        noise: float = 0.01,
        fixed_lead: int | None = None,
        rollout_steps: int = 1,
    ):
        self.channels = list(channels)
        self.rollout_steps = rollout_steps
        self.fixed_lead = fixed_lead  # evaluation: every sample at this lead (hours)
        self.out_channels = list(out_channels)
        self.height, self.width = img_size
        self.seed, self.num_samples, self.noise = seed, num_samples, noise
        self.lead_choices = torch.arange(lead_step_hours, max_lead_hours + 1, lead_step_hours, dtype=torch.float32)

        dlat = 180.0 / self.height
        self.lat_deg = torch.linspace(-90 + dlat / 2, 90 - dlat / 2, self.height)  # [H]
        lat = torch.deg2rad(self.lat_deg)
        lon = torch.linspace(0, 2 * math.pi, self.width + 1)[:-1]  # [W]
        self._lon = lon
        colat = lat + math.pi / 2  # [0, pi]
        self._meridional = torch.stack([torch.cos(j * colat) for j in range(MERIDIONAL_MODES)])  # [J, H]

        g = torch.Generator().manual_seed(seed)
        # eastward angular speed of each latent, radians per hour, faster in mid-latitudes (a jet)
        base = 2 * math.pi / (20 * HOURS_PER_DAY)  # 18 degrees of longitude per day
        speed = 0.5 + torch.rand(NUM_LATENTS, generator=g)  # [K]
        jet = 0.6 + torch.sin(2 * lat).abs()  # [H]
        self._omega = base * speed[:, None] * jet[None, :]  # [K, H]
        self._diffusion = 0.5 / (ZONAL_WAVES**2 * 72.0)  # damping rate per hour per (wavenumber^2)

    # ---- per-channel mixtures ------------------------------------------------------------------
    def _channel_params(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        weights, profiles = [], []
        for name in names:
            g = torch.Generator().manual_seed(_name_seed(name, self.seed))
            w = torch.randn(NUM_LATENTS, generator=g)
            weights.append(w / w.norm())
            coef = torch.rand(MERIDIONAL_MODES, generator=g) * 2 - 1
            profiles.append(coef @ self._meridional)  # [H]
        return torch.stack(weights), torch.stack(profiles)  # [C, K], [C, H]

    # ---- latent fields -------------------------------------------------------------------------
    def _sample_state(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        amp = torch.randn(NUM_LATENTS, ZONAL_WAVES, MERIDIONAL_MODES, 2, generator=g)
        amp = amp / math.sqrt(ZONAL_WAVES * MERIDIONAL_MODES)
        lead = self.lead_choices[torch.randint(len(self.lead_choices), (1,), generator=g)]
        if self.fixed_lead is not None:
            lead = torch.tensor([float(self.fixed_lead)])
        return torch.complex(amp[..., 0], amp[..., 1]), lead  # [K, M, J], [1]

    def _latents(self, amp: torch.Tensor, hours: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """amp [B, K, M, J] complex, hours [B] -> latent fields [B, K, H, W] at those times (`rows`: only
        those rows, [B, K, H_rows, W]; the profiles, small, are computed whole and cut, so a strip equals
        the whole field's rows bit for bit)."""
        rows = rows if rows is not None else slice(None)
        m = torch.arange(1, ZONAL_WAVES + 1, dtype=torch.float32)  # [M]
        profile = torch.einsum("bkmj,jh->bkmh", amp, self._meridional.to(amp.dtype))[..., rows]  # [B, K, M, h]
        shift = self._omega[None, :, None, rows] * hours[:, None, None, None]  # [B, K, 1, h]
        damp = torch.exp(-self._diffusion * m[None, None, :, None] ** 2 * hours[:, None, None, None])
        phase = m[None, None, :, None, None] * (self._lon[None, None, None, None, :] - shift[..., None])
        waves = profile[..., None] * damp[..., None] * torch.exp(1j * phase)  # [B, K, M, H, W]
        return waves.real.sum(dim=2) * 2.0  # [B, K, H, W]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        states = [self._sample_state(i) for i in indices]
        amp = torch.stack([s[0] for s in states])  # [B, K, M, J]
        lead = torch.cat([s[1] for s in states])  # [B]
        zero, rows = torch.zeros_like(lead), self.rows
        now, later = self._latents(amp, zero, rows), self._latents(amp, lead, rows)  # [B, K, H, W] each
        shape = (self.height, self.width)

        def mix(fields: torch.Tensor, names: list[str], stream: str) -> torch.Tensor:
            w, prof = self._channel_params(names)  # [C, K], [C, H]
            rows_of = prof[:, rows] if rows is not None else prof
            out = torch.einsum("ck,bkhw->bchw", w, fields) + rows_of[None, :, :, None]
            return out + self.noise * observation_noise(indices, names, shape, self.seed, stream, rows)

        x = mix(now, self.channels, "x")
        y = mix(later, self.out_channels, "y") if self.out_channels else x.new_zeros(len(indices), 0, *x.shape[2:])
        if self.rollout_steps == 1:
            return {"x": x, "y": y, "lead_hours": lead}
        ys, forcings = [y], []
        for k in range(2, self.rollout_steps + 1):  # valid times 2 lead .. K lead
            forcings.append(mix(self._latents(amp, (k - 1) * lead, rows), self.channels, f"x{k - 1}"))
            fields = self._latents(amp, k * lead, rows)
            ys.append(mix(fields, self.out_channels, f"y{k}") if self.out_channels else y)
        # y [B, K, C_out, H, W]; forcings [B, K-1, C, H, W]
        return {"x": x, "y": torch.stack(ys, 1), "forcings": torch.stack(forcings, 1), "lead_hours": lead}

    def lat_weights(self) -> torch.Tensor:
        """cos(latitude) normalised to mean 1, [H]: the weights of a latitude-weighted loss."""
        w = torch.cos(torch.deg2rad(self.lat_deg))
        return w / w.mean()
