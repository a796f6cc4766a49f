"""`dchag info` builds the model on the meta device and runs one forward in training mode: it must work
for every shipped config with attention dropout on (the dropout RNG once asked for a `torch.meta` device
module and ended `dchag info --config configs/era5-84.yaml` in a traceback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import dchag.model.vit as vit
from dchag.cli import main

# configs/probe-*.yaml configure `dchag probe`, not a model
CONFIGS = sorted(p for p in Path(__file__).parents[1].glob("configs/*.yaml") if not p.name.startswith("probe-"))


@pytest.fixture
def dropout_seen(monkeypatch):
    """The largest attention-dropout probability `attend` was called with (a spy on the real function)."""
    seen = [0.0]
    real = vit.attend

    def spy(q, k, v, dropout, streams, strips=None):
        seen[0] = max(seen[0], dropout)
        return real(q, k, v, dropout, streams, strips)

    monkeypatch.setattr(vit, "attend", spy)
    return seen


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_info_reports_every_config_with_attention_dropout_on(path, dropout_seen, capsys):
    assert main(["info", "--config", str(path), "--set", "model.drop_rate=0.1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] > 0 and info["forward_flops"] > 0
    assert dropout_seen[0] == 0.1  # the dropout path ran (training mode), not the dropout-free shortcut


def test_info_spy_tells_dropout_on_from_off(dropout_seen, capsys):
    """Counter-check: the spy above is not vacuous - without dropout it records none."""
    assert main(["info", "--config", "configs/tiny-weather.yaml", "--set", "model.drop_rate=0.0", "--json"]) == 0
    assert dropout_seen[0] == 0.0


def test_meta_attention_dropout_needs_no_device_rng(monkeypatch):
    """Dropout on the meta device draws no masks: no device RNG module is asked for, and the shapes of
    the per-block path (two head blocks, as under tp = 2) come out."""
    q = torch.empty(2, 4, 8, 16, device="meta")  # [B, H, L, e]

    def no_module(device_type):
        raise RuntimeError(f"Device {device_type!r} does not have a corresponding module")

    monkeypatch.setattr(torch, "get_device_module", no_module)
    assert vit.attend(q, q, q, 0.1, (0, 2)).shape == (2, 4, 8, 16)
    # counter-check: the stub does fail a caller that asks for the meta device's module
    with pytest.raises(RuntimeError, match="meta"):
        torch.get_device_module("meta")
