"""The batch pipeline every layout uses: a `torch.utils.data` DataLoader over training steps.

Item k of `StepBatches` is the batch this data-parallel rank trains on at step `start + k`: the sample
indices come from `batch_indices` (seeded epoch permutations, disjoint slices per data-parallel rank),
and the DataLoader hands steps to its workers in turn (worker w builds steps w, w + W, ...) and returns
them in order. So across ranks and workers every sample of an epoch is delivered exactly once, the
order does not depend on the number of workers, and a resumed run continues where it stopped.
Sources are read (or generated) in the worker processes, off the training loop's hot path.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from dchag.data.sources import batch_indices


class StepBatches(Dataset):
    """Steps [start, stop) of one data-parallel rank: item k -> the batch dict of step start + k, with the
    sample indices (`index` [B]) and the worker that built it (`worker`, -1 in the main process)."""

    def __init__(self, source, batch_size: int, seed: int, rank: int, world: int, start: int, stop: int):
        self.source, self.batch_size, self.seed = source, batch_size, seed
        self.rank, self.world, self.start, self.stop = rank, world, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        indices = batch_indices(
            self.source.num_samples, self.batch_size, self.start + k, self.seed, rank=self.rank, world=self.world
        )
        batch = self.source.batch(indices)
        info = get_worker_info()
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        batch["worker"] = torch.tensor(info.id if info is not None else -1)
        return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers share the cores with the training process
    with contextlib.suppress(ImportError):  # dask serves multi-file netCDF: no thread pool inside a worker
        import dask

        dask.config.set(scheduler="synchronous")


class TimedBatches:
    """Iterates the batches of steps [start, stop) and measures how long the loop waited for each one
    (`last_wait_s`, `total_wait_s`)."""

    def __init__(self, dataset: StepBatches, workers: int, prefetch: int):
        self.dataset = dataset
        if workers > 0 and len(dataset) > 0:
            self.loader = DataLoader(
                dataset,
                batch_size=None,
                shuffle=False,
                num_workers=workers,
                prefetch_factor=prefetch,
                worker_init_fn=_worker_init,
                multiprocessing_context="fork",
            )
        else:
            self.loader = (dataset[k] for k in range(len(dataset)))
        self.last_wait_s = 0.0
        self.total_wait_s = 0.0

    def __iter__(self):
        iterator = iter(self.loader)
        while True:
            begin = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.last_wait_s = time.perf_counter() - begin
            self.total_wait_s += self.last_wait_s
            yield batch


def step_batches(source, data_cfg, batch_size: int, rank: int, world: int, start: int, stop: int) -> TimedBatches:
    """The batches of steps [start, stop) for data-parallel rank `rank` of `world`, through
    `data.workers` worker processes with `data.prefetch` batches each in flight."""
    dataset = StepBatches(source, batch_size, data_cfg.seed, rank, world, start, stop)
    return TimedBatches(dataset, data_cfg.workers, data_cfg.prefetch)
