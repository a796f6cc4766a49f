"""Benchmark output: the JSON records and a readable table with reference/fused ratios."""

from __future__ import annotations

import json
from pathlib import Path


def write_json(records: list[dict], path: str | Path, meta: dict, **top) -> None:
    """{"meta", "records"} plus any `top`-level fields (a sweep's summary, the commit)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, **top, "records": records}, indent=2))


def source_commit() -> dict:
    """{"commit": the checkout's HEAD, "dirty": whether tracked files differ from it}: the code a result
    came from ("unknown" outside a git checkout)."""
    import subprocess

    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _gflop(n: float) -> str:
    return f"{n / 1e9:,.2f} GFLOP"


def fused_table(records: list[dict]) -> str:
    """One row per (scale, variant): reference value, fused value, reference/fused ratio, per metric."""
    metrics = [
        ("front_end_peak_mem_bytes", "front-end peak memory (total)", _mib),
        ("front_end_peak_added_bytes", "front-end peak memory above params + input", _mib),
        ("front_end_saved_activation_bytes", "front-end saved activations", _mib),
        ("front_end_flops", "front-end FLOPs (fwd+bwd)", _gflop),
        ("peak_mem_bytes", "training-step peak memory", _mib),
        ("step_time_s", "training-step time (median)", lambda v: f"{v:.3f} s"),
    ]
    lines = ["| scale | variant | metric | reference | fused | reference / fused |", "|---|---|---|---|---|---|"]
    pairs: dict[tuple, dict] = {}
    for r in records:
        pairs.setdefault((r["scale"], r["variant"]), {})[r["fused"]] = r
    for (scale, variant), pair in pairs.items():
        if False not in pair or True not in pair:
            continue
        ref, fused = pair[False], pair[True]
        for key, label, fmt in metrics:
            if key in ref and key in fused:
                ratio = ref[key] / fused[key] if fused[key] else float("inf")
                lines.append(f"| {scale} | {variant} | {label} | {fmt(ref[key])} | {fmt(fused[key])} | {ratio:.1f}x |")
    return "\n".join(lines)
