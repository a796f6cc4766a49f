"""The `accuracy-cpu` sweep: does the hierarchy cost accuracy? (The paper: D-CHAG-L's loss curve
coincides with the baseline's.)

Trains the same config with each hierarchy variant and several seeds (the seed sets the initial
weights and dropout; the data stay the same), one process each, and records the final training loss and
the validation loss on data the run never saw (`dchag.eval.validation`). The table gives each variant's
mean and spread over seeds and its ratio to the flat (ClimaX/ORBIT) baseline.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass

from dchag.configure import load_config


@dataclass
class AccuracySize:
    """What the `accuracy-cpu` sweep trains (override with `dchag bench --set key=value`)."""

    config: str = "configs/tiny-weather.yaml"
    steps: int = 300
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = ("flat", "dchag-L", "dchag-C")
    val_samples: int = 64


def accuracy_cpu(size: AccuracySize) -> list[dict]:
    from dchag.bench.fused_sweep import log
    from dchag.eval.validation import validation_loss
    from dchag.train.loop import train

    records = []
    for variant in size.variants:
        for seed in size.seeds:
            overrides = [f"model.hierarchy.preset={variant}", f"train.seed={seed}", f"train.steps={size.steps}"]
            cfg = load_config(size.config, overrides)
            with tempfile.TemporaryDirectory(prefix="dchag-accuracy-") as run:
                summary = train(cfg, run, progress=False)
                val = validation_loss(run, size.val_samples)
                val_initial = validation_loss(run, size.val_samples, initial=True)
            log(f"accuracy-cpu: {variant} seed {seed}: train {summary['final_loss']:.5f} val {val:.5f}")
            records.append(
                {
                    "config": size.config,
                    "variant": variant,
                    "seed": seed,
                    "steps": size.steps,
                    "final_train_loss": summary["final_loss"],
                    "val_loss": val,
                    "initial_val_loss": val_initial,
                    "train_time_s": summary["elapsed_s"],
                }
            )
    return records


def accuracy_table(records: list[dict]) -> str:
    by_variant: dict[str, list[dict]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    base = statistics.mean(r["val_loss"] for r in by_variant.get("flat", records))
    lines = [
        "| variant | seeds | final train loss (mean) | validation loss (mean ± sd) | per seed | val / flat |"
        " val / initial val |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant, rs in by_variant.items():
        vals = [r["val_loss"] for r in rs]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        lines.append(
            f"| {variant} | {len(rs)} | {statistics.mean(r['final_train_loss'] for r in rs):.5f} | "
            f"{statistics.mean(vals):.5f} ± {sd:.5f} | {', '.join(f'{v:.5f}' for v in vals)} | "
            f"{statistics.mean(vals) / base:.3f} | "
            f"{statistics.mean(r['val_loss'] / r['initial_val_loss'] for r in rs if 'initial_val_loss' in r):.3f} |"
        )
    return "\n".join(lines)
