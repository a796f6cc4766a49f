"""Everything distributed, applied from outside to a finished single-device model (torchtitan style).

`parallelize(model, cfg, mesh)` returns a `ParallelPlan`; no module constructor takes a process group.
"""

from dchag.parallel.mesh import ParallelDims, build_mesh
from dchag.parallel.parallelize import ParallelPlan, parallelize

__all__ = ["ParallelDims", "build_mesh", "ParallelPlan", "parallelize"]
