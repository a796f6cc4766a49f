"""The channel aggregators start where they can learn: width-aware projections, and a diagnostic that says
whether a level's attention ever leaves uniform (its normalised entropy)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import small_config

from dchag.eval.attention import attention_entropy
from dchag.model import build_model


def _front_end_signal(preset: str, dim: int) -> float:
    """The image-dependent part of the untrained front end's output: std over images, mean over the rest."""
    cfg = small_config(f"model.hierarchy.preset={preset}", f"model.embed_dim={dim}", "data.channels=16")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = torch.randn(8, 16, *cfg.model.img_size)
    with torch.no_grad():
        return float(model.front_end(x).std(dim=0).mean())


@pytest.mark.parametrize("dim", [32, 128])
def test_a_deeper_hierarchy_starts_with_a_signal_comparable_to_flat_at_any_width(dim):
    # N(0, 0.02) projections shrank each matrix's output by 0.02 sqrt(D): D-CHAG-C, which chains twice as
    # many, started 26x weaker than flat at D = 96; gain-1 value and output projections start them at one
    # scale (measured 0.93 at D = 32, 0.98 at D = 128; gain 1/sqrt(2) everywhere gave about 0.5)
    ratio = _front_end_signal("dchag-C", dim) / _front_end_signal("flat", dim)
    assert 0.8 < ratio < 1.25, ratio


def test_aggregator_projections_have_the_width_aware_std():
    model = build_model(small_config("model.embed_dim=64")).requires_grad_(False)
    gains = {"wq": 0.5, "wk": 0.5, "wv": 1.0, "proj_weight": 1.0}  # scores: xavier; value path: gain 1
    seen = 0
    for name, p in model.named_parameters():
        kind = name.rsplit(".", 1)[-1]
        if ".aggregator." in name and kind in gains:
            assert float(p.std()) == pytest.approx(math.sqrt(gains[kind] / 64), rel=0.05), name
            seen += 1
    assert seen >= 4
    # counter-check: the ViT's own linear layers keep the ViT convention
    assert float(model.blocks[0].attn.wq.weight.std()) == pytest.approx(0.02, rel=0.05)


def test_untrained_attention_is_uniform_and_a_trained_query_is_seen():
    cfg = small_config("model.hierarchy.preset=dchag-C", "data.channels=12", "model.hierarchy.groups=3")
    model = build_model(cfg).eval()
    x = torch.randn(4, 12, *cfg.model.img_size)
    rows = attention_entropy(model, x)
    assert [r["level"] for r in rows] == [0, 1] and [r["groups"] for r in rows] == [3, 1]
    for r in rows:  # zero queries: every score is 0, so the attention is exactly uniform
        assert r["entropy"] == pytest.approx(1.0, abs=1e-6)
        assert r["max_weight"] == pytest.approx(r["uniform_max_weight"], abs=1e-6)
    # counter-check: a query aligned with one channel's keys makes the first level pick channels
    level = model.front_end.hierarchy.levels[0].aggregator
    with torch.no_grad():
        level.query.copy_(torch.randn_like(level.query) * 50)
    sharp = attention_entropy(model, x)[0]
    assert sharp["entropy"] < 0.8 and sharp["max_weight"] > 2 * sharp["uniform_max_weight"]


def test_the_diagnostic_reads_the_attention_forward_uses():
    cfg = small_config("model.hierarchy.preset=flat", "data.channels=6")
    model = build_model(cfg).eval()
    agg = model.front_end.hierarchy.levels[0]
    with torch.no_grad():
        agg.aggregator.query.normal_()
    tokens = model.front_end.tokenizer(torch.randn(2, 6, *cfg.model.img_size), None)
    grouped = agg.group(tokens)
    attn = agg.aggregator.attention(grouped, agg.valid)  # [B, G, L, H, k, n]
    values = torch.einsum("bgnld,ged->bgnle", grouped, agg.aggregator.wv)
    values = values.unflatten(-1, (agg.aggregator.heads, -1))  # [B, G, n, L, H, e]
    by_hand = agg.aggregator.finish(torch.einsum("bglhkn,bgnlhe->bgklhe", attn, values))
    torch.testing.assert_close(by_hand, agg.aggregator(grouped, agg.valid))


def test_eval_reports_each_levels_attention_entropy(tmp_path):
    import json

    from dchag.cli import main

    cfg_args = ["--config", "configs/tiny-weather.yaml", "--set", "train.steps=2", "model.depth=1", "data.workers=0"]
    cfg_args.append("model.hierarchy.preset=dchag-C")  # two cross-attention levels (the preset is D-CHAG-L)
    assert main(["train", *cfg_args, "--out", str(tmp_path), "--no-progress"]) == 0
    assert main(["eval", "--run", str(tmp_path), "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["attention_entropy"]
    assert [r["level"] for r in rows] == [0, 1]
    assert all(0.0 <= r["entropy"] <= 1.0 + 1e-9 for r in rows)
