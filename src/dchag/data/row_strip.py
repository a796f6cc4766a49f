"""A source's rows [start, stop) of every image: what a context-parallel rank trains on.

Under context parallelism (`parallel.cp`) each rank holds a strip of patch rows. `RowStrip` wraps the
rank's source (already limited to its own channels under tensor parallelism): its batches hold only
those rows of every image-shaped tensor (inputs, targets, validity masks, forcings) and its latitude
weights only those rows. A source kind that can read (or generate) only some rows says so with a `rows`
attribute (pixel rows its `batch` serves, None: all): the strip then works on a copy of it with `rows`
set, and the other rows are never read. Anything else is read whole and cut in the data-loader worker.
Statistics and latitude weights stay the whole image's either way (`rows` limits `batch` alone).
"""

from __future__ import annotations

import copy

import torch


def reading_rows(source, rows: slice):
    """A shallow copy of `source` whose `batch` reads only pixel rows `rows`; None when its kind cannot."""
    if source is None or not hasattr(type(source), "rows"):
        return None
    strip = copy.copy(source)
    strip.rows = rows
    return strip


def cut_rows(value, rows: slice, image_size: tuple[int, int]):
    """A tensor whose last two dimensions are the image's `image_size` [..., H, W] -> [..., H_strip, W]
    (pixel rows `rows`); anything else as it is."""
    if torch.is_tensor(value) and value.dim() >= 3 and tuple(value.shape[-2:]) == tuple(image_size):
        return value[..., rows, :].contiguous()
    return value


class RowStrip:
    """`source` with every image cut to pixel rows `rows`; everything else is the source's own."""

    def __init__(self, source, rows: slice, image_size: tuple[int, int]):
        reader = reading_rows(source, rows)
        object.__setattr__(self, "source", reader if reader is not None else source)
        object.__setattr__(self, "reads_rows", reader is not None)  # the source reads only the strip's rows
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "image_size", tuple(image_size))

    def batch(self, indices) -> dict:
        if self.reads_rows:
            return self.source.batch(indices)
        return {k: cut_rows(v, self.rows, self.image_size) for k, v in self.source.batch(indices).items()}

    def lat_weights(self) -> torch.Tensor:
        """The strip's rows of the whole image's weights (normalised over the whole image)."""
        return self.source.lat_weights()[self.rows]

    def __getattr__(self, name: str):
        if name == "source":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def __setattr__(self, name: str, value) -> None:  # e.g. `stats`, set by the training loop
        setattr(self.source, name, value)
