"""A source's rows [start, stop) of every image: what a context-parallel rank trains on.

Under context parallelism (`parallel.cp`) each rank holds a strip of patch rows. `RowStrip` wraps the
rank's source (already limited to its own channels under tensor parallelism): its batches hold only
those rows of every image-shaped tensor (inputs, targets, validity masks, forcings) and its latitude
weights only those rows. The wrapped source reads or generates whole images of its channels; the cut
happens in the data-loader worker, so the training process never holds the other rows.
"""

from __future__ import annotations

import torch


class RowStrip:
    """`source` with every image cut to pixel rows `rows`; everything else is the source's own."""

    def __init__(self, source, rows: slice, image_size: tuple[int, int]):
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "image_size", tuple(image_size))

    def cut(self, value):
        """A tensor whose last two dimensions are the image's [..., H, W] -> [..., H_strip, W]."""
        if torch.is_tensor(value) and value.dim() >= 3 and tuple(value.shape[-2:]) == self.image_size:
            return value[..., self.rows, :].contiguous()
        return value

    def batch(self, indices) -> dict:
        return {k: self.cut(v) for k, v in self.source.batch(indices).items()}

    def lat_weights(self) -> torch.Tensor:
        """The strip's rows of the whole image's weights (normalised over the whole image)."""
        return self.source.lat_weights()[self.rows]

    def __getattr__(self, name: str):
        if name == "source":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def __setattr__(self, name: str, value) -> None:  # e.g. `stats`, set by the training loop
        setattr(self.source, name, value)
