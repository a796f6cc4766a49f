"""`dchag bench --set key=value` gives every sweep's size field a value of its type: a scalar where a
list of sizes is expected is a one-element list (`paper-cpu --set channels=512` once ended in
`TypeError: 'int' object is not iterable`), and a value of the wrong shape is refused naming the key."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from dchag.bench.sweeps import sweep_size as _sweep_size
from dchag.config import ConfigError
from dchag.planning.sweeps import SWEEPS  # every sweep `dchag bench` runs, paper-plan included


def sweep_size(name: str, overrides: list[str]):
    return _sweep_size(name, overrides, SWEEPS)


def _fields(kind: str):
    """(sweep, field, default) for every size field whose type is `tuple[T, ...]` (kind "open") or a
    fixed-length tuple (kind "fixed")."""
    out = []
    for name, (cls, _, _) in SWEEPS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            args = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is tuple else None
            if args is not None and (args[-1] is Ellipsis) == (kind == "open"):
                out.append((name, f.name, getattr(cls(), f.name)))
    return out


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


OPEN, FIXED = [f for f in _fields("open") if f[2]], _fields("fixed")  # a default to take a scalar from


def test_every_sweep_has_list_valued_size_fields_to_check():
    listed = {(s, k) for s, k, _ in OPEN}
    assert {("paper-cpu", "channels"), ("paper-cpu", "tp"), ("tp-comm-cpu", "tp"), ("paper-plan", "rows")} <= listed
    assert len(FIXED) >= 4  # img_size of the measuring sweeps


@pytest.mark.parametrize("sweep,key,default", OPEN, ids=[f"{s}.{k}" for s, k, _ in OPEN])
def test_a_scalar_for_a_list_of_sizes_is_a_one_element_list(sweep, key, default):
    first = default[0]
    assert getattr(sweep_size(sweep, [f"{key}={_yaml(first)}"]), key) == (first,)
    # a list still works, and stays a tuple (the sweeps iterate and hash it)
    assert getattr(sweep_size(sweep, [f"{key}=[{_yaml(first)}]"]), key) == (first,)


@pytest.mark.parametrize("sweep,key,default", FIXED, ids=[f"{s}.{k}" for s, k, _ in FIXED])
def test_a_scalar_for_a_fixed_length_size_is_refused_naming_the_key(sweep, key, default):
    with pytest.raises(ConfigError, match=f"bench setting '{key}=7' for sweep '{sweep}': expected a list of"):
        sweep_size(sweep, [f"{key}=7"])
    # counter-check: the right shape passes
    assert getattr(sweep_size(sweep, [f"{key}=[{default[0]}, {default[1]}]"]), key) == tuple(default)


@pytest.mark.parametrize(
    "setting,expected",
    [
        ("channels=[64, x]", "expected one int or a list of them"),  # an element of the wrong type
        ("channels=[]", "expected one int or a list of them"),  # no size at all
        ("quick=1", "expected one bool"),  # 1 is not true
        ("depth=[2]", "expected one int"),  # a list where one value is expected
        ("depth=", "expected one int"),  # no value
    ],
)
def test_a_bench_value_of_the_wrong_type_is_refused_naming_it(setting, expected):
    with pytest.raises(ConfigError) as error:
        sweep_size("paper-cpu", [setting])
    assert str(error.value).startswith(f"bench setting '{setting}' for sweep 'paper-cpu': {expected}")
