"""`train.log_grad_norms`: the gradient norm per part of the model (tokenizer, each aggregation level,
blocks, head, other), before clipping, in metrics.jsonl and in the accuracy sweep's records.

One process here; the distributed `ParallelPlan.part_grad_norms` is compared with the single-device
model's in every parity case (`checks/parity.py`: `ParityReport.part_norm_rel`, in `worst`) and in the
torchrun run of test_distributed_cli.py."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_, small_config

from dchag.bench.accuracy_sweep import accuracy_table, grad_norm_summary
from dchag.model import build_model
from dchag.model.parts import grad_norm_parts, in_part
from dchag.train.loop import Layout, train
from dchag.train.metrics import read_metrics


def _model_with_grads(*overrides: str):
    cfg = small_config("model.hierarchy.preset=dchag-C", *overrides)
    model = randomize_(build_model(cfg))
    torch.manual_seed(0)
    x = torch.randn(2, len(cfg.channels), *cfg.model.img_size)  # [B, C, H, W]
    out = model(x, lead_hours=torch.full((2,), 6.0))
    out.pred.square().mean().backward()
    return cfg, model


def test_parts_cover_every_parameter_once_and_their_squares_sum_to_the_global_norm():
    cfg, model = _model_with_grads()
    levels = len(cfg.model.hierarchy.resolved_levels())
    parts = grad_norm_parts(levels)
    assert list(parts) == ["tokenizer", *(f"level{i + 1}" for i in range(levels)), "blocks", "head", "other"]
    assert levels >= 2  # D-CHAG-C: more than one aggregation level
    for name, _ in model.named_parameters():
        assert sum(in_part(name, prefixes) for prefixes in parts.values()) == 1, name
    layout = Layout(model)
    norms = layout.part_grad_norms(parts)  # [P]
    assert norms.shape == (len(parts),) and norms.dtype == torch.float64
    assert (norms > 0).all()
    torch.testing.assert_close(norms.square().sum().sqrt(), layout.grad_norm().double(), rtol=1e-6, atol=0)


def test_a_parts_norm_is_torchs_norm_of_that_parts_gradients():
    _, model = _model_with_grads()
    grads = dict((n, p.grad) for n, p in model.named_parameters())
    parts = {"level2": "front_end.hierarchy.levels.1", "blocks": ("blocks",), "all": ("",), "embeds": ("pos_embed",)}
    norms = Layout(model).part_grad_norms(parts)
    for (part, prefixes), norm in zip(parts.items(), norms):
        prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
        mine = [g.flatten() for n, g in grads.items() if in_part(n, prefixes)]
        assert mine, part
        expected = torch.linalg.vector_norm(torch.cat(mine).double())
        torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)


def test_prefixes_match_whole_name_components():
    assert in_part("front_end.hierarchy.levels.1.aggregator.wq", ("front_end.hierarchy.levels.1",))
    assert not in_part("front_end.hierarchy.levels.10.aggregator.wq", ("front_end.hierarchy.levels.1",))
    assert not in_part("normal.weight", ("norm",)) and in_part("norm.weight", ("norm",))
    assert in_part("anything.at.all", ("",))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 5-step runs, logged every 2 steps, with clipping engaged: the flag on and off."""
    root = tmp_path_factory.mktemp("grad-norms")
    common = ["train.steps=5", "train.log_every=2", "train.grad_clip=1e-4", "data.workers=0"]
    common += ["model.hierarchy.preset=dchag-C", "train.warmup_steps=0"]
    train(small_config(*common, "train.log_grad_norms=true"), root / "on", progress=False)
    train(small_config(*common), root / "off", progress=False)
    return root


def test_metrics_hold_the_norms_before_clipping_at_the_logging_steps(runs):
    on, off = read_metrics(runs / "on/metrics.jsonl"), read_metrics(runs / "off/metrics.jsonl")
    assert [r["step"] for r in on] == [0, 2, 4]
    assert all("grad_norms" in r for r in on) and not any("grad_norms" in r for r in off)
    # reading the gradients changes nothing: the same losses and norms with the flag off
    assert [r["loss"] for r in on] == [r["loss"] for r in off]
    assert [r["grad_norm"] for r in on] == [r["grad_norm"] for r in off]
    for r in on:
        assert list(r["grad_norms"]) == ["tokenizer", "level1", "level2", "blocks", "head", "other"]
        total = math.sqrt(sum(v * v for v in r["grad_norms"].values()))
        assert r["grad_norm"] > 1e-3  # far above train.grad_clip: the clipped norm would be 1e-4
        assert total == pytest.approx(r["grad_norm"], rel=1e-5)


def test_the_sweep_summarises_the_logged_norms_and_reads_older_records(runs):
    summary = grad_norm_summary(read_metrics(runs / "on/metrics.jsonl"))
    logged = [r["grad_norms"] for r in read_metrics(runs / "on/metrics.jsonl")]
    assert summary["blocks"]["first"] == logged[0]["blocks"] and summary["blocks"]["last"] == logged[-1]["blocks"]
    assert summary["head"]["mean"] == pytest.approx(sum(n["head"] for n in logged) / 3)
    assert grad_norm_summary(read_metrics(runs / "off/metrics.jsonl")) == {}

    old = [  # records of an older sweep: no grad_norms, no attention entropy
        {"config": "c.yaml", "variant": v, "seed": 0, "val_loss": 0.5, "final_train_loss": 0.4, "initial_val_loss": 1.0}
        for v in ("flat", "dchag-C")
    ]
    assert "grad norm" not in accuracy_table(old)
    new = [dict(r) for r in old]
    new[0]["grad_norms"] = {"tokenizer": {"mean": 0.25, "first": 1.0, "last": 0.1}, "level1": {"mean": 2.0}}
    new[1]["grad_norms"] = {"level2": {"mean": 3.0}}
    new[1]["attention_entropy"] = [{"level": 0, "entropy": 0.999}, {"level": 1, "entropy": 1.0}]
    table = accuracy_table(new)
    assert "| grad norm tokenizer | grad norm level1 | grad norm level2 |" in table
    assert "| c | flat | 0.25 | 2 | - | - |" in table
    assert "| c | dchag-C | - | - | 3 | 0.999, 1.000 |" in table
