"""`dchag.load`: a trained model as one object that takes and returns physical units.

A run folder (`dchag train --out`) or an export folder (`dchag export --out DIR`) becomes a
`TrainedModel`: the single-device model in eval mode, its config, the channel names as the training data
resolved them (wavelengths where the channels are spectral bands), and the normalisation statistics, so
a caller can forecast, reconstruct or embed without knowing how the data were normalised. Inputs are
checked up front (channels, image size, NaN) with one-line errors naming the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dchag.config import Config, ConfigError
from dchag.data.channels import BAND_RE, band_wavelength
from dchag.data.errors import DataError
from dchag.tasks.channel_subset import keep_of_names
from dchag.train.export import is_export_folder, load_export_folder
from dchag.train.run_weights import load_run_weights

SPECTRAL_KINDS = ("spectral_cube", "synthetic-hyperspectral")  # channels named by wavelength (b664.6)
POOLS = ("none", "mean")


@dataclass
class Reconstruction:
    """An MAE reconstruction in physical units: `cube` [B, C, H, W] (or [C, H, W] for one cube), every
    pixel predicted; `mask` [B, H, W] True where the patch was hidden from the model; `patch_mask` [B, L]."""

    cube: torch.Tensor | np.ndarray
    mask: torch.Tensor | np.ndarray
    patch_mask: torch.Tensor | np.ndarray
    mask_ratio: float


@dataclass
class TrainedModel:
    config: Config  # single-device config (parallel reset), data.workers=0
    model: torch.nn.Module  # ChannelViT, eval mode, on `device`
    stats: dict | None  # normalisation statistics (as stats.json / read_stats give them)
    channels: list[str]  # input channel names, in model order
    out_channels: list[str]  # forecast targets ([] for MAE)
    wavelengths_nm: list[float] | None
    source: Path  # the run folder or export folder it came from
    step: int  # training step of the weights

    @classmethod
    def of(cls, cfg: Config, model: torch.nn.Module, stats: dict | None, source: Path, step: int) -> "TrainedModel":
        """The trained model `model` (put in eval mode) of config `cfg`, its channel lists and wavelengths
        read from the config."""
        out_channels = cfg.out_channels if cfg.train.task == "forecast" else []
        wavelengths = wavelengths_of(cfg, cfg.channels)
        return cls(cfg, model.eval(), stats, cfg.channels, out_channels, wavelengths, source, step)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def task(self) -> str:
        return self.config.train.task

    # ---- units ----------------------------------------------------------------------------------
    def _moments(self, channels: list[str], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) [1, C, 1, 1] that map physical values of `channels` to model units."""
        unknown = [c for c in channels if c not in self.channels and c not in self.out_channels]
        if unknown:
            raise DataError(f"channels {unknown[:5]} are not channels of this model ({_short_list(self.channels)})")
        if self.stats is not None:
            mean = [self.stats["channels"][c]["mean"] for c in channels]
            std = [self.stats["channels"][c]["std"] for c in channels]
        elif self.config.data.kind == "synthetic-hyperspectral":  # standardised with one (mean, scale)
            from dchag.data.synthetic_hyperspectral import SyntheticHyperspectral

            offset, scale = SyntheticHyperspectral.standardisation
            mean, std = [offset] * len(channels), [scale] * len(channels)
        else:  # synthetic weather is generated in model units
            mean, std = [0.0] * len(channels), [1.0] * len(channels)
        as_tensor = lambda v: torch.tensor(v, dtype=like.dtype, device=like.device)[None, :, None, None]
        return as_tensor(mean), as_tensor(std)

    def normalise(self, x: torch.Tensor, channels: list[str]) -> torch.Tensor:
        """Physical -> model units of x [B, C, H, W] whose channels are `channels`."""
        x = x if x.is_floating_point() else x.float()
        mean, std = self._moments(channels, x)
        return (x - mean) / std

    def denormalise(self, x: torch.Tensor, channels: list[str]) -> torch.Tensor:
        """Model -> physical units of x [B, C, H, W] whose channels are `channels`."""
        mean, std = self._moments(channels, x)
        return x * std + mean

    # ---- inputs ---------------------------------------------------------------------------------
    def _model_input(self, x, what: str, channels: list[str] | None = None):
        """(x [B, C, H, W] in model units on the model's device, was it numpy, was it one [C, H, W] cube,
        keep mask [C] or None). `channels`: the names of x's channels when x holds only some of the model's
        (any subset, any order); the others are left out (`channel_keep`), their slots zero."""
        keep = None if channels is None else keep_of_names(self.channels, list(channels), "channels", DataError)
        given = self.channels if channels is None else list(channels)
        numpy = isinstance(x, np.ndarray)
        if not numpy and not isinstance(x, torch.Tensor):
            raise DataError(f"{what} is a {type(x).__name__}; give a numpy array or torch tensor [(B,) C, H, W]")
        t = torch.from_numpy(np.asarray(x)) if numpy else x
        if t.ndim not in (3, 4):
            raise DataError(f"{what} has shape {list(t.shape)}; give [C, H, W] or [B, C, H, W]")
        single = t.ndim == 3
        t = (t[None] if single else t).float()
        count, size = t.shape[1], list(t.shape[2:])
        if channels is not None and count != len(given):
            raise DataError(f"{what} has {count} channels and channels= names {len(given)}; give one name per channel")
        if count != len(given):
            raise DataError(
                f"{what} has {count} channels; the model takes {len(self.channels)} "
                f"({_short_list(self.channels)}), in that order (or name a subset with channels=[...])"
            )
        if size != list(self.config.model.img_size):
            h, w = self.config.model.img_size
            raise DataError(
                f"{what} is {size[0]} x {size[1]} pixels; the model takes {h} x {w} (model.img_size): crop or regrid it"
            )
        bad = torch.isnan(t)
        if bad.any() and self.config.data.nan != "mask":
            first = [int(i) for i in bad.nonzero()[0]]
            raise DataError(
                f"{what} holds {int(bad.sum())} NaN value(s), the first at [B, C, H, W] index {first}; fill them "
                "(the run was trained with data.nan=error)"
            )
        t = self.normalise(t.to(self.device), given)
        t = torch.where(torch.isnan(t), 0.0, t)  # data.nan=mask: NaN at the channel mean
        if keep is not None:  # into the model's channel order; left-out slots stay zero
            full = t.new_zeros(t.shape[0], len(self.channels), *t.shape[2:])
            full[:, [self.channels.index(c) for c in given]] = t
            t, keep = full, keep.to(self.device)
        return t, numpy, single, keep

    def default_lead_hours(self) -> int:
        """The shortest lead the run trained on (forecast runs' embeddings are taken at it)."""
        d = self.config.data
        return int(d.lead_hours[0]) if d.kind == "era5" else int(d.lead_step_hours)

    # ---- what the model does --------------------------------------------------------------------
    def forecast(self, ds, lead_hours, steps=1):
        """Autoregressive forecast of an xarray Dataset in physical units (`dchag.use.rollout`)."""
        from dchag.use.rollout import forecast_dataset

        return forecast_dataset(self, ds, lead_hours, steps)

    def reconstruct(
        self, cube, mask_ratio: float | None = None, seed: int = 0, channels: list[str] | None = None
    ) -> Reconstruction:
        """MAE reconstruction of `cube` [C, H, W] or [B, C, H, W] (physical units, numpy or torch) with
        `mask_ratio` of the patches hidden (default: the trained ratio), the mask drawn from `seed`.
        `channels`: names of the cube's bands when it holds only some of the model's; the reconstruction
        still covers every band of the model (the missing ones predicted from the others)."""
        if self.task != "mae":
            raise ConfigError(
                f"reconstruct needs a masked-autoencoder run; {str(self.source)!r} trained task {self.task!r} "
                "(use forecast or embed)"
            )
        ratio = self.config.train.mask_ratio if mask_ratio is None else float(mask_ratio)
        if not 0.0 <= ratio < 1.0:
            raise DataError(f"mask_ratio={mask_ratio} must be in [0, 1)")
        x, numpy, single, keep = self._model_input(cube, "cube", channels)
        noise = torch.rand(x.shape[0], self.model.num_patches, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            out = self.model(x, mask_noise=noise.to(x.device), mask_ratio=ratio, channel_keep=keep)
        pred = self.denormalise(out.pred, self.channels)  # [B, C, H, W] physical
        gh, gw = self.model.grid
        p = self.config.model.patch_size
        pixels = out.mask.reshape(-1, gh, 1, gw, 1).expand(-1, gh, p, gw, p).reshape(-1, gh * p, gw * p).bool()
        parts = [pred, pixels, out.mask.bool()]
        if single:
            parts = [t[0] for t in parts]
        if numpy:
            parts = [t.cpu().numpy() for t in parts]
        return Reconstruction(*parts, mask_ratio=ratio)

    def embed(self, x, pool: str = "none", lead_hours: float | None = None, channels: list[str] | None = None):
        """Encoder tokens after the ViT blocks of x [C, H, W] or [B, C, H, W] (physical units): [B, L, D]
        (L patches in row-major order), or [B, D] with pool="mean". MAE runs embed every patch (no
        masking); forecast runs at `lead_hours` (default: the shortest trained lead). `channels`: names of
        x's channels when it holds only some of the model's."""
        if pool not in POOLS:
            raise DataError(f"pool={pool!r} is unknown; use one of {POOLS}")
        z, numpy, single, keep = self._model_input(x, "x", channels)
        out = self.embed_normalised(z, pool, lead_hours, keep)
        out = out[0] if single else out
        return out.cpu().numpy() if numpy else out

    def embed_normalised(
        self, z: torch.Tensor, pool: str = "none", lead_hours: float | None = None, channel_keep=None
    ) -> torch.Tensor:
        """`embed` of z [B, C, H, W] already in model units (a data source's batch["x"]); `channel_keep` [C]:
        the channels to use (None: all)."""
        lead = None
        if self.task == "forecast":
            hours = self.default_lead_hours() if lead_hours is None else float(lead_hours)
            lead = torch.full((z.shape[0],), hours, device=self.device)
        z, _ = self.model.standardised(z.to(self.device), None, channel_keep)  # model.visible_norm: all pixels
        with torch.no_grad():
            tokens = self.model.encode(self.model.patch_tokens(z, lead, channel_keep))  # [B, L, D]
        return tokens.mean(dim=1) if pool == "mean" else tokens

    def for_channels(
        self, channels: list[str], stats: dict | None = None, channel_specs: list | None = None
    ) -> "TrainedModel":
        """This wavelength / hypernetwork model rebuilt for other channels (another sensor's bands named by
        wavelength like b865.0, or `channel_specs`), same weights (`dchag.train.other_channels`). `stats`:
        normalisation statistics of the new channels ({"channels": {name: {"mean", "std"}}}), needed for
        file-trained runs unless the run's own cover them."""
        from dchag.train.other_channels import model_for_channels

        channels = list(channels)
        cfg, model = model_for_channels(self.config, self.model, channels, channel_specs)
        stats = stats if stats is not None else self.stats
        if stats is not None:
            missing = [c for c in channels if c not in stats.get("channels", {})]
            if missing:
                raise DataError(
                    f"no normalisation statistics for channels {missing[:5]}; pass stats={{'channels': "
                    "{name: {'mean': ..., 'std': ...}}} for the new channels (e.g. from their training data)"
                )
        return TrainedModel.of(cfg, model, stats, self.source, self.step)  # cfg.channels: `channels`


def _short_list(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f", ... {len(names)} in all" if len(names) > 6 else "")


def wavelengths_of(cfg: Config, channels: list[str]) -> list[float] | None:
    """Central wavelengths (nm) of spectral channels named like b664.6; None for weather variables."""
    if cfg.data.kind in SPECTRAL_KINDS and all(BAND_RE.match(c) for c in channels):
        return [band_wavelength(c) for c in channels]
    return None


def load(path, checkpoint=None, device="cpu") -> TrainedModel:
    """A run folder (config.yaml + checkpoints/step-*; `checkpoint`: a checkpoint folder or step number,
    default the newest) or an export folder (model.safetensors + config.yaml) as a `TrainedModel` on
    `device`."""
    return load_trained(path, checkpoint, device)


def load_trained(path, checkpoint=None, device="cpu", *, option: str = "path", data_path=None) -> TrainedModel:
    """`load`, with errors naming the value as `option` (the command-line option that gave it);
    `data_path` points the config at another file holding the same variables."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(
            f"{option} {str(path)!r} does not exist; give a run folder (dchag train --out) or an export folder"
        )
    if is_export_folder(path):
        if checkpoint is not None:
            raise ConfigError(f"{option} {str(path)!r} is an export folder (one set of weights); leave checkpoint out")
        loaded = load_export_folder(path, data_path=data_path)
    else:
        loaded = load_run_weights(path, checkpoint, data_path=data_path, option=option)
    return TrainedModel.of(loaded.config, loaded.model.to(device), loaded.stats, path, loaded.step)
