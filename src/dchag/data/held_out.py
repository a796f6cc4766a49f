"""Data a run never trains on, as one source for validation during training, `dchag eval` and the
accuracy sweep.

File-backed sources read the `val` split (or `test` when data.split gives `val` no part): ERA5 its time
steps, spectral cubes the crops inside the split's tiles or files. Synthetic sources generate every sample
anew from its index; training draws indices below `data.num_samples`, so indices from there on are new.
"""

from __future__ import annotations

from dchag.data.sources import build_source

FILE_BACKED = ("era5", "spectral_cube")  # sources normalised by statistics of their training split


class HeldOut:
    """Synthetic samples [offset, offset + count): never used in training (it draws indices < offset)."""

    def __init__(self, source, offset: int, count: int):
        self.source, self.offset, self.num_samples = source, offset, count
        self.channels, self.out_channels = source.channels, getattr(source, "out_channels", [])

    def batch(self, indices):
        return self.source.batch([self.offset + i for i in indices])

    def lat_weights(self):
        return self.source.lat_weights()


def held_out_split(cfg) -> str:
    """The split validation reads: `val`, or `test` when data.split gives `val` no part."""
    return "val" if cfg.data.split.get("val") else "test"


def held_out_source(cfg, stats: dict | None, samples: int, channels: list[str] | None = None, split: str | None = None):
    """(source, number of samples to read) of the validation data (file-backed: `split`, default
    `held_out_split`); `channels`: only these (a TP rank's). Synthetic data have one held-out set.
    A rollout-trained run (train.rollout_steps K > 1) is validated on its training loss: K-step targets."""
    steps = cfg.train.rollout_steps
    if cfg.data.kind in FILE_BACKED:
        source = build_source(
            cfg, split=split or held_out_split(cfg), stats=stats, channels=channels, rollout_steps=steps
        )
        count = min(samples, source.num_samples) if cfg.data.kind == "era5" else samples  # a cube has crops to spare
        return source, count
    source = build_source(cfg, stats=stats, channels=channels, rollout_steps=steps)
    return HeldOut(source, cfg.data.num_samples, samples), samples
