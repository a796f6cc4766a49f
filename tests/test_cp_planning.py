"""`dchag plan` with context parallelism: a CP rank's traced step holds its strip of patch rows, the
keys and values of the whole sequence inside attention, and sends them over its CP group.

Single process, fake process group (one rank traced, as the planner does). The measured side (real gloo
ranks, `dchag bench --sweep cp-cpu`, then `dchag plan --validate`) is in tests/test_cp_bench.py.
"""

from pathlib import Path

import pytest

from dchag.cli import main
from dchag.config import to_dict
from dchag.configure import load_config
from dchag.planning.planner import Candidate, Machine, plan_one
from dchag.planning.trace import trace_rank

ROOT = Path(__file__).parents[1]
WEATHER = str(ROOT / "configs/tiny-weather.yaml")
SPECTRAL = str(ROOT / "configs/tiny-hyperspectral.yaml")


def config(path: str, *overrides: str):
    return load_config(path, ["model.depth=1", "model.drop_rate=0", *overrides])


@pytest.mark.parametrize(
    "path, layout, over",
    [
        (WEATHER, ["parallel.cp=2"], 0.02),
        # fake tensors count 7.5% more than real ones here (4.93 vs 4.59 MB, the FSDP2-over-CP x TP rank;
        # cause inside torch's fake dispatch not isolated, as for paper-cpu's tp 4 point): conservative
        (WEATHER, ["parallel.cp=2", "parallel.tp=2"], 0.10),
        (WEATHER, ["parallel.cp=2", "parallel.dp_shard=2"], 0.02),
        (SPECTRAL, ["parallel.cp=2"], 0.02),  # MAE: the padded visible tokens follow the (seeded) mask
    ],
    ids=["forecast-cp2", "forecast-cp2-tp2", "forecast-cp2-fsdp2", "mae-cp2"],
)
def test_fake_tensors_account_for_a_context_parallel_step_as_real_tensors_do(path, layout, over):
    """The same CP rank's step on real CPU tensors and on fake ones: the peak within 2% (or over by at
    most `over`), equal FLOPs and bytes per group."""
    cfg = config(path, *layout)
    real = trace_rank(cfg, 2, 0, target="cpu", fake=False)
    traced = trace_rank(cfg, 2, 0, target="cpu")
    error = traced.peak_mem_bytes / real.peak_mem_bytes - 1
    assert -0.02 <= error <= over, (error, traced, real)
    assert traced.flops == real.flops and traced.param_bytes == real.param_bytes
    assert (traced.tp_comm_bytes, traced.cp_comm_bytes, traced.dp_comm_bytes) == (
        real.tp_comm_bytes, real.cp_comm_bytes, real.dp_comm_bytes,
    )  # fmt: skip
    assert traced.cp_comm_bytes > 0


def test_a_cp_rank_holds_its_strip_and_sends_the_keys_and_values_of_its_strip():
    """Activation-dominated forecasting (16 x 32 patches, width 32, 3 blocks, one sample): the traced peak
    falls with cp, and the CP group carries at least the K/V exchange - per block one all-gather of
    [2, B, H, L, e] forward and one reduce-scatter of its gradient backward, each sending (cp - 1) / cp
    of it from a rank (the rest: a recompute's second gather, the weights' gradients or FSDP2's
    collectives over the CP ranks, the loss's sums); cp = 1 sends nothing on it."""
    extra = ["model.img_size=[64, 128]", "model.embed_dim=32", "model.depth=3"]
    peaks, comm = {}, {}
    for cp in (1, 2, 4):
        cfg = config(WEATHER, *extra, f"parallel.cp={cp}")
        t = trace_rank(cfg, 1, 0, target="cpu")
        peaks[cp], comm[cp] = t.peak_mem_bytes, t
    assert peaks[4] < peaks[2] < peaks[1] and peaks[4] < 0.6 * peaks[1], peaks
    assert comm[1].cp_comm_bytes == 0
    tokens, width, depth = 16 * 32, 32, 3
    for cp in (2, 4):
        kv = 2 * 1 * tokens * width * 4  # the gathered keys and values of one block, fp32 bytes
        exchange = depth * 2 * (cp - 1) / cp * kv  # forward all-gather + backward reduce-scatter
        assert comm[cp].cp_comm_bytes >= exchange, (cp, comm[cp].cp_comm_bytes, exchange)
    assert comm[4].cp_comm_bytes > comm[2].cp_comm_bytes  # (cp - 1) / cp of the same buffers


def test_the_trace_of_the_whole_image_on_a_cp_rank_does_not_run(monkeypatch):
    """Counter-check: a trace that fed every CP rank all image rows (the strip ignored) would overstate
    the rank's memory; the strip's model refuses such a batch, so it cannot pass unnoticed."""
    import dchag.planning.trace as trace

    monkeypatch.setattr(trace, "_rows", lambda cfg, plan: cfg.model.img_size[0])
    with pytest.raises(RuntimeError):
        trace_rank(config(WEATHER, "parallel.cp=2"), 1, 0, target="cpu")


def test_plan_offers_context_parallel_layouts_and_predicts_their_exchange(tmp_path, capsys):
    """2 GPUs, --cp 1 2: every layout with cp in {1, 2} is traced (4 layouts, fused and not), cp = 2
    layouts carry CP bytes (cp = 1 none, whatever was traced before in the process) that enter the
    predicted step time at --cp-gbs; the table has the cp column."""
    import json

    out = tmp_path / "plan.json"
    args = ["plan", "--config", WEATHER, "--set", "model.depth=1", "model.drop_rate=0", "--gpus", "2"]
    args += ["--gpu-mem", "80", "--variants", "dchag-L", "--cp", "1", "2", "--json", str(out), "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())["records"]
    assert len(records) == 8 and not any("invalid" in r for r in records)
    assert {r["cp"] for r in records} == {1, 2}
    assert all((r["cp_comm_bytes"] > 0) == (r["cp"] > 1) for r in records)
    assert "| tp | cp | dp_shard |" in printed and "CP GB / GPU" in printed
    cand = Candidate("dchag-L", True, 1, 1, 1, 2)
    base = to_dict(config(WEATHER))
    fast, slow = (plan_one(base, cand, Machine(2, 80, cp_gbs=gbs), None, None) for gbs in (100.0, 1e-3))
    assert slow["predicted_step_time_s"] - fast["predicted_step_time_s"] == pytest.approx(
        fast["cp_comm_bytes"] * (1 / 1e6 - 1 / 100e9), rel=1e-6
    )
    assert "cp=2" in cand.label()


def test_a_context_parallel_forecast_with_dropout_is_traced(monkeypatch):
    """A CP rank's token dropout seeds its masks from a number drawn on the host, which fake tensors
    lack: the trace draws plain masks of the same size instead. With dropout the rank holds more (the
    masks) than without; without that stand-in the trace cannot run (the check can fail)."""
    import contextlib

    import dchag.planning.trace as trace

    with_dropout = config(WEATHER, "parallel.cp=2", "model.drop_rate=0.1")
    peak = trace_rank(with_dropout, 2, 0).peak_mem_bytes
    assert peak > trace_rank(config(WEATHER, "parallel.cp=2"), 2, 0).peak_mem_bytes
    monkeypatch.setattr(trace, "_unseeded_strip_dropout", contextlib.nullcontext)
    with pytest.raises(Exception, match="DataDependent|local_scalar_dense"):
        trace_rank(with_dropout, 2, 0)


def test_a_layout_traced_after_another_counts_its_own_collectives(monkeypatch):
    """Traces share a process (`dchag plan` runs many): DTensor caches its sharding plans by device
    mesh, and meshes compare equal by ranks and names, not by process groups. Traced after a
    tp 4 x dp_shard 4 x dp_replicate 4 layout, tp 4 x dp_replicate 16 counts the TP bytes it counts
    when traced first; with the caches kept (the bug), part of its TP all-reduces run on the earlier
    layout's group names and go uncounted (the check can fail)."""
    import dchag.bench.fake_group as fake_group

    common = ["parallel.tp=4", "train.batch_size=16"]
    first = config(WEATHER, *common, "parallel.dp_replicate=16")
    other = config(WEATHER, *common, "parallel.dp_shard=4", "parallel.dp_replicate=4")
    alone = trace_rank(first, 1, 0).tp_comm_bytes
    trace_rank(other, 1, 0)
    assert trace_rank(first, 1, 0).tp_comm_bytes == alone > 0
    forget = fake_group._forget_meshes
    monkeypatch.setattr(fake_group, "_forget_meshes", lambda: None)
    forget()
    trace_rank(other, 1, 0)
    assert trace_rank(first, 1, 0).tp_comm_bytes < alone


def test_attention_flops_are_counted_on_cpu():
    """SDPA on CPU (and the planner's stand-in for GPU flash attention) runs torch's CPU flash kernels,
    for which FlopCounterMode has no formula: counted as torch counts GPU attention (4 B H L^2 e
    forward, 2.5x that backward). Plain FlopCounterMode counts 0 for them (the check can fail)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dchag.bench.measure import count_flops

    q = torch.randn(2, 4, 64, 16, requires_grad=True)  # [B, H, L, e]

    def step():
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()

    forward = 4 * 2 * 4 * 64 * 64 * 16
    assert count_flops(step) == forward + 5 * forward // 2
    with FlopCounterMode(display=False) as plain:
        step()
    assert plain.get_total_flops() == 0
