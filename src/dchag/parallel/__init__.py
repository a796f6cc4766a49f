"""Everything distributed, applied from outside to a finished single-device model (torchtitan style).

`parallelize(model, cfg, mesh)` returns a `ParallelPlan`; no module constructor takes a process group.
"""

from dchag import require_torch

require_torch()  # FSDP2's reduction controls: a clear ImportError instead of an AttributeError mid-run

from dchag.parallel.mesh import ParallelDims, build_mesh  # noqa: E402
from dchag.parallel.parallelize import ParallelPlan, parallelize  # noqa: E402

__all__ = ["ParallelDims", "build_mesh", "ParallelPlan", "parallelize"]
