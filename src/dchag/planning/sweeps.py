"""Every sweep `dchag bench --sweep NAME` runs: bench's measurement sweeps and the planner's
`paper-plan`. It is added here rather than in `dchag.bench.sweeps` because the planner is built on
bench's measurement tools, so bench never imports the planner."""

from __future__ import annotations

from typing import Callable

from dchag.bench.sweeps import SWEEPS as MEASUREMENT_SWEEPS
from dchag.planning.paper_table import PaperPlanSize, paper_plan, paper_plan_table

# name -> (size dataclass, run(size) -> records, table(records) -> Markdown)
SWEEPS: dict[str, tuple[type, Callable, Callable]] = {
    **MEASUREMENT_SWEEPS,
    "paper-plan": (PaperPlanSize, paper_plan, paper_plan_table),
}
