"""The `accuracy-cpu` sweep: does the hierarchy cost accuracy? (The paper: D-CHAG-L's loss curve
coincides with the baseline's.)

Trains the same config with each hierarchy variant and several seeds (the seed sets the initial
weights and dropout; the data stay the same), one process each, with one set of hyperparameters for every
variant and a fixed thread count (CPU results depend on it: the reduction order changes), and records the
final training loss and the validation loss on held-out data (`dchag.eval.validation`), and two
diagnostics of why a hierarchy trails flat: each cross-attention level's attention entropy and each
part's gradient norm before clipping (`train.log_grad_norms`: tokenizer, every level, blocks, head).

The comparison is paired by seed: for each seed, variant / flat of the validation loss; the summary gives
the geometric mean of those ratios with a 95% t-interval over seeds (computed on their logarithms). With
`max_seeds` above the initial seeds, the sweep adds seeds (every variant, paired) until each variant's
interval is at most `target_half_width` wide on either side, or `max_seeds` is reached; the JSON records
how many seeds each interval rests on.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dchag.configure import load_config

BASELINE = "flat"


@dataclass
class AccuracySize:
    """What the `accuracy-cpu` sweep trains (override with `dchag bench --set key=value`)."""

    config: str = "configs/tiny-weather.yaml"
    steps: int = 0  # training steps of every run (0: the config's own train.steps)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_seeds: int = 0  # > len(seeds): add seeds until every interval is narrow enough (0: the seeds only)
    target_half_width: float = 0.015  # of the ratio's 95% interval, relative
    variants: tuple[str, ...] = ("flat", "dchag-L", "dchag-C")
    val_samples: int = 64
    threads: int = 1  # torch.set_num_threads for every run: results depend on it
    workers: int = 1  # runs at once, one process each with `threads` threads (results do not depend on it)
    overrides: tuple[str, ...] = ()  # config overrides for every variant alike, e.g. ["data.workers=0"]
    split: str = "val"  # file-backed data: the held-out split scored (val or test; synthetic: one held-out set)


def _one_run(size: AccuracySize, variant: str, seed: int) -> dict:
    import torch

    from dchag.bench.fused_sweep import log
    from dchag.eval.attention import run_attention_entropy
    from dchag.eval.validation import validation_loss
    from dchag.train.loop import train
    from dchag.train.metrics import read_metrics

    torch.set_num_threads(size.threads)
    variant_seed = [f"model.hierarchy.preset={variant}", f"train.seed={seed}"]
    if size.steps:
        variant_seed.append(f"train.steps={size.steps}")
    # the gradient norm per part: reads the gradients, changes no number of the run
    cfg = load_config(size.config, ["train.log_grad_norms=true", *size.overrides, *variant_seed])
    with tempfile.TemporaryDirectory(prefix="dchag-accuracy-") as run:
        summary = train(cfg, run, progress=False)
        val = validation_loss(run, size.val_samples, split=size.split)
        val_initial = validation_loss(run, size.val_samples, initial=True, split=size.split)
        entropy = run_attention_entropy(run)
        grad_norms = grad_norm_summary(read_metrics(Path(run) / "metrics.jsonl"))
    log(f"accuracy-cpu: {variant} seed {seed}: train {summary['final_loss']:.5f} val {val:.5f}")
    return {
        "config": size.config,
        "dataset": Path(size.config).stem,
        "variant": variant,
        "seed": seed,
        "steps": cfg.train.steps,
        "threads": size.threads,
        "split": size.split,
        "final_train_loss": summary["final_loss"],
        "val_loss": val,
        "initial_val_loss": val_initial,
        "train_time_s": summary["elapsed_s"],
        "attention_entropy": entropy,  # per cross-attention level: 1.0 = attention never left uniform
        **({"grad_norms": grad_norms} if grad_norms else {}),  # per part: {mean, first, last} over logged steps
    }


def grad_norm_summary(metrics: list[dict]) -> dict[str, dict[str, float]]:
    """{part: {mean, first, last}} of the gradient norms (before clipping) that `train.log_grad_norms`
    logged in `metrics` (a run's metrics.jsonl records): the mean over the logged steps, the first and
    the last logged step's value. {} when none were logged."""
    logged = [r["grad_norms"] for r in metrics if "grad_norms" in r]
    parts = list(dict.fromkeys(p for norms in logged for p in norms))
    out = {}
    for part in parts:
        values = [norms[part] for norms in logged if part in norms]
        out[part] = {"mean": statistics.fmean(values), "first": values[0], "last": values[-1]}
    return out


def accuracy_cpu(size: AccuracySize) -> list[dict]:
    if BASELINE not in size.variants:
        from dchag.config import ConfigError

        raise ConfigError(f"accuracy-cpu compares with {BASELINE!r}: add it to variants={list(size.variants)}")
    if size.workers < 1:
        from dchag.config import ConfigError

        raise ConfigError(f"accuracy-cpu workers={size.workers} must be at least 1")
    records = _run_all(size, [(variant, seed) for seed in size.seeds for variant in size.variants])
    seed = max(size.seeds, default=-1)
    while len({r["seed"] for r in records}) < size.max_seeds and not _narrow_enough(records, size):
        # one more seed per round, or as many as keep every worker busy
        more = max(1, min(size.workers // len(size.variants), size.max_seeds - len({r["seed"] for r in records})))
        new_seeds = range(seed + 1, seed + 1 + more)
        records += _run_all(size, [(variant, s) for s in new_seeds for variant in size.variants])
        seed += more
    return records


def _run_all(size: AccuracySize, jobs: list[tuple[str, int]]) -> list[dict]:
    """The runs of `jobs` (variant, seed) in order, `size.workers` at a time in spawned processes (each
    sets its own thread count, so a record is the same whichever process ran it)."""
    if size.workers == 1 or len(jobs) == 1:
        return [_one_run(size, variant, seed) for variant, seed in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(size.workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_one_run, size, variant, seed) for variant, seed in jobs]
        return [f.result() for f in futures]


def _narrow_enough(records: list[dict], size: AccuracySize) -> bool:
    rows = [s for s in accuracy_summary(records) if s["variant"] != BASELINE]
    return all(s["ci_high"] is not None and s["half_width"] <= size.target_half_width for s in rows)


def paired_ratio(variant: dict[int, float], base: dict[int, float]) -> dict:
    """Geometric mean of variant/base over the seeds both have, with a 95% t-interval on the log ratios:
    {ratio, ci_low, ci_high, half_width (the larger side, relative), seeds}. No interval from one seed."""
    from scipy import stats

    seeds = sorted(set(variant) & set(base))
    logs = [math.log(variant[s] / base[s]) for s in seeds]
    if not logs:
        return {"ratio": None, "ci_low": None, "ci_high": None, "half_width": None, "seeds": 0}
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return {"ratio": math.exp(mean), "ci_low": None, "ci_high": None, "half_width": None, "seeds": 1}
    half = stats.t.ppf(0.975, len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    low, high = math.exp(mean - half), math.exp(mean + half)
    ratio = math.exp(mean)
    return {
        "ratio": ratio,
        "ci_low": low,
        "ci_high": high,
        "half_width": max(high / ratio - 1, 1 - low / ratio),
        "seeds": len(logs),
    }


def accuracy_summary(records: list[dict]) -> list[dict]:
    """[{dataset, variant, ratio, ci_low, ci_high, half_width, seeds}] of the validation loss against flat,
    paired by seed, one row per dataset and variant (flat itself included, at ratio 1)."""
    loss: dict[tuple[str, str], dict[int, float]] = {}
    for r in records:
        loss.setdefault((r.get("dataset", Path(r["config"]).stem), r["variant"]), {})[r["seed"]] = r["val_loss"]
    out = []
    for (dataset, variant), by_seed in loss.items():
        base = loss.get((dataset, BASELINE), {})
        out.append({"dataset": dataset, "variant": variant, **paired_ratio(by_seed, base)})
    return out


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def accuracy_table(records: list[dict]) -> str:
    summary = {(s["dataset"], s["variant"]): s for s in accuracy_summary(records)}
    by_variant: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        by_variant.setdefault((r.get("dataset", Path(r["config"]).stem), r["variant"]), []).append(r)
    lines = [
        "| dataset | variant | seeds | final train loss (mean) | validation loss (mean ± sd) | val / flat "
        "(paired, 95% CI) | val / initial val |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, rs in by_variant.items():
        vals = [r["val_loss"] for r in rs]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        s = summary[key]
        lines.append(
            f"| {key[0]} | {key[1]} | {len(rs)} | {statistics.mean(r['final_train_loss'] for r in rs):.5f} | "
            f"{statistics.mean(vals):.5f} ± {sd:.5f} | {_fmt(s['ratio'])} [{_fmt(s['ci_low'])}, "
            f"{_fmt(s['ci_high'])}] | "
            f"{statistics.mean(r['val_loss'] / r['initial_val_loss'] for r in rs if 'initial_val_loss' in r):.3f} |"
        )
    return "\n".join(lines + diagnostics_table(by_variant))


def diagnostics_table(by_variant: dict[tuple[str, str], list[dict]]) -> list[str]:
    """The lines of a second table, when the records hold the diagnostics (older ones have none):
    per dataset and variant, each part's gradient norm (before clipping, the mean over the logged steps,
    then over seeds; level i+1 is the hierarchy's levels.i) and each cross-attention level's attention
    entropy (the range over seeds; 1.000 = uniform)."""
    parts = list(dict.fromkeys(p for rs in by_variant.values() for r in rs for p in r.get("grad_norms", {})))
    if not parts:
        return []
    lines = [
        "",
        "| dataset | variant | " + " | ".join(f"grad norm {p}" for p in parts) + " | attention entropy per level |",
        "|---|---|" + "---|" * (len(parts) + 1),
    ]
    for (dataset, variant), rs in by_variant.items():
        cells = []
        for part in parts:
            means = [r["grad_norms"][part]["mean"] for r in rs if part in r.get("grad_norms", {})]
            cells.append(f"{statistics.fmean(means):.3g}" if means else "-")
        levels: dict[int, list[float]] = {}
        for r in rs:
            for row in r.get("attention_entropy", []):
                levels.setdefault(row["level"], []).append(row["entropy"])
        entropy = ", ".join(
            f"{min(v):.3f}" if min(v) == max(v) else f"{min(v):.3f}-{max(v):.3f}" for _, v in sorted(levels.items())
        )
        lines.append(f"| {dataset} | {variant} | " + " | ".join(cells) + f" | {entropy or '-'} |")
    return lines
