"""The layers import downwards only: config <- model, data <- parallel <- train <- checks, eval, bench, planning.
Each check imports one module in a fresh interpreter and lists which dchag layers it pulled in."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import importlib, json, sys
importlib.import_module({module!r})
print(json.dumps(sorted({{".".join(m.split(".")[:2]) for m in sys.modules if m.startswith("dchag.")}})))
"""


def layers_imported_by(module: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module)], capture_output=True, text=True, check=True
    )
    return set(json.loads(out.stdout))


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("dchag.config", {"dchag.data", "dchag.model", "dchag.parallel", "dchag.train", "dchag.tasks"}),
        ("dchag.model", {"dchag.data", "dchag.parallel", "dchag.train", "dchag.checks"}),
        ("dchag.parallel.parallelize", {"dchag.train", "dchag.checks", "dchag.data", "dchag.tasks"}),
        ("dchag.tasks", {"dchag.train", "dchag.parallel", "dchag.data"}),
        ("dchag.train.loop", {"dchag.checks", "dchag.eval", "dchag.bench", "dchag.planning"}),
        ("dchag.planning.planner", {"dchag.checks", "dchag.eval", "dchag.data"}),
    ],
)
def test_a_layer_does_not_import_the_layers_above_it(module, forbidden):
    assert not layers_imported_by(module) & forbidden
