"""The model variants the paper compares, as config overrides (shared by `paper-cpu` and the planner).

- `replicated`: the TP-only baseline: every TP rank tokenizes and aggregates all channels (flat hierarchy);
- `naive`: the paper's ablation: channels split over TP ranks, raw channel tokens all-gathered;
- `dchag-L` / `dchag-C`: D-CHAG with linear / cross-attention level-1 aggregators, level-1 groups =
  tp x groups_per_rank (the paper's setting: one group per rank).
Each may use the fused front end, except `naive`, which gathers materialized tokens by definition.
"""

from __future__ import annotations

# name -> (hierarchy preset, parallel mode)
VARIANTS = {
    "replicated": ("flat", "replicated"),
    "naive": ("flat", "naive"),
    "dchag-L": ("dchag-L", "dchag"),
    "dchag-C": ("dchag-C", "dchag"),
}


def variant_overrides(variant: str, fused: bool, tp: int, groups_per_rank: int = 1) -> list[str]:
    """`key=value` overrides that turn any config into `variant` at TP size `tp`."""
    preset, mode = VARIANTS[variant]
    return [
        f"model.hierarchy.preset={preset}",
        "model.hierarchy.levels=[]",
        f"model.hierarchy.groups={max(1, tp * groups_per_rank)}",
        f"model.fused_front_end={str(fused).lower()}",
        f"parallel.tp={tp}",
        f"parallel.mode={mode}",
    ]


def variant_pairs(variants=tuple(VARIANTS), fused=(False, True)) -> list[tuple[str, bool]]:
    """(variant, fused) in report order, without the fused `naive` that does not exist."""
    return [(v, f) for v in variants for f in fused if not (v == "naive" and f)]
