"""`dchag bench` writes comparable records and a ratio table; the measurement helpers measure."""

import json
import math
import statistics

import pytest
import torch

from dchag.bench.measure import count_flops, peak_tensor_memory, saved_activation_bytes
from dchag.cli import main

REQUIRED = {
    "variant",
    "fused",
    "channels",
    "tp",
    "front_end_peak_mem_bytes",
    "front_end_flops",
    "peak_mem_bytes",
    "step_time_s",
}


def test_fused_cpu_sweep_writes_records_for_every_variant_and_a_ratio_table(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "bench",
            "--sweep",
            "fused-cpu",
            "--json",
            str(out),
            "--set",
            "channels=24",
            "embed_dim=32",
            "heads=4",
            "img_size=[16, 16]",
            "depth=1",
            "repeats=1",
            "warmup=0",
            "paper_scale=false",
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    records = data["records"]
    assert {(r["variant"], r["fused"]) for r in records} == {
        (v, f) for v in ("flat", "dchag-L", "dchag-C") for f in (False, True)
    }
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["front_end_peak_mem_bytes"] > 0 and r["front_end_flops"] > 0 and r["step_time_s"] > 0
    assert data["meta"]["size"]["channels"] == 24 and "torch" in data["meta"]
    table = capsys.readouterr().out
    assert "reference / fused" in table and "front-end peak memory" in table


def test_unknown_bench_setting_is_named(capsys):
    assert main(["bench", "--sweep", "fused-cpu", "--json", "/dev/null", "--set", "chanels=8"]) == 2
    assert "chanels" in capsys.readouterr().err


def test_memory_flops_and_saved_activations_are_exact_for_a_matmul():
    a = torch.randn(64, 32, requires_grad=True)
    b = torch.randn(32, 16)
    assert count_flops(lambda: a @ b) == 2 * 64 * 32 * 16
    assert saved_activation_bytes(lambda: a @ b) == 32 * 16 * 4  # mm saves the other operand for a's grad
    peak = peak_tensor_memory(lambda: (a @ b).sum().backward(), a, b)
    assert peak >= (64 * 32 + 32 * 16 + 64 * 16) * 4


def test_grouped_convolution_backward_flops_equal_two_forwards():
    """One filter per channel (groups = C): the weight gradient costs what the forward costs."""
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    w = torch.randn(8, 1, 4, 4, requires_grad=True)
    forward = count_flops(lambda: torch.nn.functional.conv2d(x, w, stride=4, groups=8))
    assert forward == 2 * 2 * 8 * 16 * 16  # 2 FLOPs per input pixel: every pixel meets one filter tap
    total = count_flops(lambda: torch.nn.functional.conv2d(x, w, stride=4, groups=8).sum().backward())
    assert total == 3 * forward


def test_channel_parallel_sweep_measures_every_rank_and_shows_dchag_holds_less(tmp_path, capsys):
    out = tmp_path / "cp.json"
    rc = main(["bench", "--sweep", "channel-parallel-cpu", "--json", str(out), "--set", "channels=16", "embed_dim=32",
               "heads=4", "img_size=[16, 16]", "tp=[2]"])  # fmt: skip
    assert rc == 0
    records = json.loads(out.read_text())["records"]
    by = {(r["variant"], r["rank"]): r for r in records}
    assert {rank for _, rank in by} == {0, 1}
    for rank in (0, 1):
        base, dchag = by[("baseline", rank)], by[("dchag-L fused", rank)]
        assert dchag["rank_channels"] == 8 and base["rank_channels"] == 16  # each rank loads only its channels
        assert dchag["front_end_param_bytes"] < base["front_end_param_bytes"]
        assert dchag["front_end_peak_mem_bytes"] < base["front_end_peak_mem_bytes"]
    assert "baseline / this" in capsys.readouterr().out


@pytest.fixture(scope="module")
def paper_quick(tmp_path_factory):
    """`paper-cpu --set quick=true` on 2 real gloo ranks, with plots; (records, plot folder, table)."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("paper")
    out, plots, printed = folder / "paper.json", folder / "plots", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            main(["bench", "--sweep", "paper-cpu", "--json", str(out), "--plots", str(plots), "--set", "quick=true"])
            == 0
        )
    return json.loads(out.read_text())["records"], plots, printed.getvalue()


def test_paper_sweep_measures_the_whole_step_on_every_rank(paper_quick):
    """Every variant x fused on 2 ranks, the record fields the paper's comparisons need, and D-CHAG-L
    holding less than the TP-only baseline over the whole step."""
    records, plots, table = paper_quick
    assert sorted(p.name for p in plots.iterdir()) == ["memory_tp2.png", "throughput_tp2.png"]
    needed = {"variant", "fused", "channels", "tp", "dp", "peak_mem_bytes", "front_end_peak_mem_bytes",
              "flops_per_rank", "step_time_s", "samples_per_s", "comm_bytes", "device"}  # fmt: skip
    assert all(needed <= set(r) for r in records)
    assert {(r["variant"], r["fused"]) for r in records} == {
        ("replicated", False), ("replicated", True), ("naive", False),
        ("dchag-L", False), ("dchag-L", True), ("dchag-C", False), ("dchag-C", True),
    }  # fmt: skip
    assert {r["rank"] for r in records} == {0, 1}
    by = {(r["variant"], r["fused"], r["rank"]): r for r in records}
    for rank in (0, 1):
        assert by[("dchag-L", False, rank)]["peak_mem_bytes"] < by[("replicated", False, rank)]["peak_mem_bytes"]
        assert by[("naive", False, rank)]["comm_bytes"] > by[("dchag-L", False, rank)]["comm_bytes"]
    assert "x replicated fused" in table


@pytest.mark.parametrize("rank", [0, 1])
def test_a_simulated_rank_needs_the_memory_of_the_real_rank(paper_quick, rank, tmp_path):
    """`--set simulate_tp=2 simulate_rank=R` runs rank R alone (fake collectives): its whole-step peak
    is within 5% of what rank R measured in the real 2-rank run, for every variant, and so are its
    FLOPs and the bytes its collectives would move."""
    out = tmp_path / "sim.json"
    args = ["--set", "quick=true", "simulate_tp=2", f"simulate_rank={rank}"]
    assert main(["bench", "--sweep", "paper-cpu", "--json", str(out), *args]) == 0
    simulated = {(r["variant"], r["fused"]): r for r in json.loads(out.read_text())["records"]}
    real = {(r["variant"], r["fused"]): r for r in paper_quick[0] if r["rank"] == rank}
    assert simulated.keys() == real.keys()
    for key, r in real.items():
        s = simulated[key]
        assert s["rank"] == rank and s["simulated"] and "simulated rank" in s["device"]
        assert abs(s["peak_mem_bytes"] - r["peak_mem_bytes"]) <= 0.05 * r["peak_mem_bytes"], (key, s, r)
        assert s["flops_per_rank"] == r["flops_per_rank"] and s["comm_bytes"] == r["comm_bytes"], key


def test_the_planner_predicts_every_measured_quick_point_within_15_percent(paper_quick, tmp_path, capsys):
    """`dchag plan --validate` re-predicts each point of a paper-cpu result from a fake-tensor trace of
    one rank: within 15% of the worst rank's measured whole-step peak. A result whose measurements are
    a third larger is flagged and the command fails (the check can fail)."""
    records = paper_quick[0]
    meta = {"sweep": "paper-cpu", "size": {"quick": True}}
    good, bad = tmp_path / "measured.json", tmp_path / "doctored.json"
    good.write_text(json.dumps({"meta": meta, "records": records}))
    doctored = [{**r, "peak_mem_bytes": int(r["peak_mem_bytes"] * 4 / 3)} for r in records]
    bad.write_text(json.dumps({"meta": meta, "records": doctored}))
    out = tmp_path / "validation.json"
    assert main(["plan", "--validate", str(good), "--json", str(out), "--no-progress"]) == 0
    checked = json.loads(out.read_text())["records"]
    assert len(checked) == 7  # every (variant, fused) of the quick sweep, worst rank
    assert all(abs(r["error"]) <= 0.15 for r in checked), checked
    capsys.readouterr()
    assert main(["plan", "--validate", str(bad), "--no-progress"]) == 1
    assert "over tolerance" in capsys.readouterr().out


def test_accuracy_ratio_is_paired_by_seed_with_a_t_interval():
    from dchag.bench.accuracy_sweep import paired_ratio

    base = {0: 1.0, 1: 2.0, 2: 4.0}
    same_shift = paired_ratio({s: 1.02 * v for s, v in base.items()}, base)
    assert same_shift["ratio"] == pytest.approx(1.02) and same_shift["ci_high"] == pytest.approx(1.02)
    # log ratios ln(1.0), ln(1.1), ln(1.2): mean m, sd s, t(0.975, 2) = 4.302653 (tables)
    logs = [math.log(r) for r in (1.0, 1.1, 1.2)]
    m, s = sum(logs) / 3, statistics.stdev(logs)
    got = paired_ratio({0: 1.0, 1: 2.2, 2: 4.8}, base)
    assert got["ratio"] == pytest.approx(math.exp(m))
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(
        (math.exp(m - 4.302653 * s / math.sqrt(3)), math.exp(m + 4.302653 * s / math.sqrt(3)))
    )
    # counter-check: unpaired, the same values give a far wider interval (seed effects are not removed)
    shuffled = paired_ratio({0: 4.4, 1: 1.0, 2: 2.4}, base)
    assert shuffled["ci_high"] - shuffled["ci_low"] > 10 * (got["ci_high"] - got["ci_low"])
    assert paired_ratio({0: 1.0}, base)["ci_high"] is None  # no interval from one seed


def test_accuracy_sweep_adds_seeds_until_the_interval_is_narrow_and_records_the_commit(tmp_path):
    from dchag.cli import main

    out = tmp_path / "acc.json"
    size = [
        "config=configs/tiny-weather.yaml", "steps=2", "seeds=[0, 1]", "max_seeds=3", "target_half_width=1e-9",
        "variants=[flat, dchag-L]", "val_samples=2", "threads=1",
        "overrides=[data.workers=0, model.depth=1, model.embed_dim=32, 'model.img_size=[16, 32]', data.channels=6, "
        "train.warmup_steps=0, train.lr=0.01]",
    ]  # fmt: skip
    assert main(["bench", "--sweep", "accuracy-cpu", "--json", str(out), "--set", *size]) == 0
    doc = json.loads(out.read_text())
    assert sorted({r["seed"] for r in doc["records"]}) == [0, 1, 2]  # one seed added, then max_seeds
    assert {r["threads"] for r in doc["records"]} == {1} and doc["threads"] == 1
    assert len(doc["commit"]) == 40 and isinstance(doc["dirty"], bool)
    row = next(s for s in doc["summary"] if s["variant"] == "dchag-L")
    assert row["seeds"] == 3 and row["ci_low"] <= row["ratio"] <= row["ci_high"]


def test_accuracy_sweep_records_do_not_depend_on_how_many_runs_go_at_once():
    """workers=2 runs two trainings at once in spawned processes, each with the sweep's thread count: the
    records (losses to the last bit) equal one process's."""
    from dchag.bench.accuracy_sweep import AccuracySize, accuracy_cpu

    common = dict(
        config="configs/tiny-weather.yaml", steps=2, seeds=(0,), variants=("flat", "dchag-C"), val_samples=2,
        overrides=("data.workers=0", "model.depth=1", "model.embed_dim=32", "model.img_size=[16, 32]",
                   "data.channels=6", "model.hierarchy.groups=2", "train.warmup_steps=0"),
    )  # fmt: skip
    one = accuracy_cpu(AccuracySize(**common, workers=1))
    two = accuracy_cpu(AccuracySize(**common, workers=2))
    drop = ("train_time_s",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in two] == [
        {k: v for k, v in r.items() if k not in drop} for r in one
    ]
    assert [r["variant"] for r in two] == ["flat", "dchag-C"] and one[0]["steps"] == 2
