"""Run independent traces one after another or in parallel processes (each trace sets up its own fake
process group, which is global to a process, so parallel traces need processes, not threads)."""

from __future__ import annotations

from typing import Callable


def run_jobs(fn: Callable, jobs: list[tuple], workers: int = 1, on_done: Callable | None = None) -> list:
    """[fn(*job) for job in jobs], in job order; `workers` > 1 runs them in that many spawned processes.
    `on_done(count_done, result)` is called as each finishes (progress lines)."""
    results: list = [None] * len(jobs)
    if workers <= 1:
        for i, job in enumerate(jobs):
            results[i] = fn(*job)
            if on_done is not None:
                on_done(i + 1, results[i])
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        for done, future in enumerate(as_completed(futures), 1):
            results[futures[future]] = future.result()
            if on_done is not None:
                on_done(done, results[futures[future]])
    return results
