"""The planner against measurements: every point of a `paper-cpu` or `cp-cpu` result, predicted and
compared.

Each worst-rank record of the sweep (the largest whole-step peak over its ranks) is rebuilt from the
sweep's recorded size, traced for the CPU (`trace_rank(target="cpu")`: the kernels this machine ran)
and its predicted peak set beside the measured one. `cp-cpu` points check the context-parallel part of
the trace: a strip of patch rows per rank and the keys and values gathered for attention.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dchag.config import ConfigError
from dchag.planning.jobs import run_jobs


def _load(path: str | Path) -> tuple[dict, list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"--validate {str(path)!r} does not exist; give the JSON `dchag bench --sweep paper-cpu` (or cp-cpu) wrote"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"--validate {str(path)!r} is not a JSON file") from None
    if not isinstance(data, dict) or data.get("meta", {}).get("sweep") not in VALIDATED_SWEEPS:
        raise ConfigError(
            f"--validate {str(path)!r} is not a paper-cpu or cp-cpu result (meta.sweep not in {VALIDATED_SWEEPS})"
        )
    return data["meta"], data["records"]


VALIDATED_SWEEPS = ("paper-cpu", "cp-cpu")


def validate_result(path: str | Path, *, progress: bool = True, workers: int = 1) -> list[dict]:
    """`validate_paper_cpu` or `validate_cp_cpu`, by the sweep that wrote `path`."""
    meta, _ = _load(path)
    run = validate_cp_cpu if meta["sweep"] == "cp-cpu" else validate_paper_cpu
    return run(path, progress=progress, workers=workers)


def _sweep_size(cls, meta: dict):
    fields = set(cls.__dataclass_fields__)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["size"].items() if k in fields})


def _reporter(progress: bool, total: int):
    def report(done: int, _) -> None:
        if progress:
            print(f"[plan] validate {done}/{total}", file=sys.stderr, flush=True)

    return report


def validate_cp_cpu(path: str | Path, *, progress: bool = True, workers: int = 1) -> list[dict]:
    """One record per measured (image, cp) point: the worst rank's measured whole-step peak beside the
    trace of one rank of that layout."""
    from dchag.bench.cp_sweep import CPSize, worst_ranks

    meta, measured = _load(path)
    size = _sweep_size(CPSize, meta).resolved()
    points = sorted(worst_ranks(measured).values(), key=lambda r: (r["height"], r["cp"]))
    jobs = [(size, r["height"], r["cp"]) for r in points]
    predicted = run_jobs(predict_cp_point, jobs, workers, _reporter(progress, len(jobs)))
    return [
        {
            "sweep": "cp-cpu",
            "height": r["height"],
            "width": r["width"],
            "cp": r["cp"],
            "measured_peak_mem_bytes": r["peak_mem_bytes"],
            "predicted_peak_mem_bytes": p,
            "error": p / r["peak_mem_bytes"] - 1,
        }
        for r, p in zip(points, predicted)
    ]


def predict_cp_point(size, height: int, cp: int) -> int:
    """The planner's whole-step peak for one cp-cpu point."""
    from dchag.bench.cp_sweep import cp_config
    from dchag.planning.trace import trace_rank

    return trace_rank(cp_config(size, height, cp), size.batch, 0, target="cpu").peak_mem_bytes


def validate_paper_cpu(path: str | Path, *, progress: bool = True, workers: int = 1) -> list[dict]:
    """One record per measured point: measured and predicted whole-step peak, relative error."""
    from dchag.bench.paper_sweep import PaperSize, worst_ranks

    meta, measured = _load(path)
    size = _sweep_size(PaperSize, meta).resolved()
    points = sorted(worst_ranks(measured).values(), key=lambda r: (r["tp"], r["channels"], r["variant"], r["fused"]))
    jobs = [(size, r["variant"], r["fused"], r["channels"], r["tp"], r.get("tokenizer", "per_channel")) for r in points]
    predicted = run_jobs(predict_point, jobs, workers, _reporter(progress, len(jobs)))
    return [
        {
            "variant": r["variant"],
            "fused": r["fused"],
            "channels": r["channels"],
            "tp": r["tp"],
            "measured_peak_mem_bytes": r["peak_mem_bytes"],
            "predicted_peak_mem_bytes": p,
            "error": p / r["peak_mem_bytes"] - 1,
        }
        for r, p in zip(points, predicted)
    ]


def predict_point(size, variant: str, fused: bool, channels: int, tp: int, tokenizer: str = "per_channel") -> int:
    """The planner's whole-step peak for one paper-cpu point (the widest of its traced ranks)."""
    from dchag.bench.paper_sweep import paper_config
    from dchag.planning.trace import ranks_to_trace, trace_rank

    cfg = paper_config(size, variant, fused, channels, tp, tokenizer)
    return max(trace_rank(cfg, size.batch, r, target="cpu").peak_mem_bytes for r in ranks_to_trace(cfg))


def validation_table(records: list[dict], tolerance: float) -> str:
    if records and records[0].get("sweep") == "cp-cpu":
        return _cp_validation_table(records, tolerance)
    lines = [
        "| channels | tp | variant | fused | measured peak | predicted peak | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        flag = "" if abs(r["error"]) <= tolerance else " **over tolerance**"
        lines.append(
            f"| {r['channels']} | {r['tp']} | {r['variant']} | {'yes' if r['fused'] else 'no'} | "
            f"{r['measured_peak_mem_bytes'] / 2**20:,.2f} MiB | {r['predicted_peak_mem_bytes'] / 2**20:,.2f} MiB | "
            f"{100 * r['error']:+.3f}%{flag} |"
        )
    worst = max(records, key=lambda r: abs(r["error"]))
    lines.append("")
    lines.append(
        f"{len(records)} points; largest error {100 * worst['error']:+.3f}% ({worst['variant']}, "
        f"{'fused, ' if worst['fused'] else ''}{worst['channels']} channels, tp {worst['tp']}); tolerance "
        f"{100 * tolerance:.0f}%."
    )
    return "\n".join(lines)


def _cp_validation_table(records: list[dict], tolerance: float) -> str:
    lines = ["| image | cp | measured peak | predicted peak | error |", "|---|---|---|---|---|"]
    for r in records:
        flag = "" if abs(r["error"]) <= tolerance else " **over tolerance**"
        lines.append(
            f"| {r['height']} x {r['width']} | {r['cp']} | {r['measured_peak_mem_bytes'] / 2**20:,.2f} MiB | "
            f"{r['predicted_peak_mem_bytes'] / 2**20:,.2f} MiB | {100 * r['error']:+.3f}%{flag} |"
        )
    worst = max(records, key=lambda r: abs(r["error"]))
    lines.append("")
    lines.append(
        f"{len(records)} points; largest error {100 * worst['error']:+.3f}% ({worst['height']} x {worst['width']}, "
        f"cp {worst['cp']}); tolerance {100 * tolerance:.0f}%."
    )
    return "\n".join(lines)
