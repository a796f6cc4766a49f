"""`dchag bench --sweep cp-cpu`: per-rank memory, time and the K/V exchange of context-parallel training,
measured on real gloo ranks, and `dchag plan --validate` predicting those measurements.

One multi-process launch (the quick sweep: 2 ranks, one 16 x 32 image, one block).
"""

import json

import pytest

from dchag.cli import main


@pytest.fixture(scope="module")
def cp_quick(tmp_path_factory):
    """`cp-cpu --set quick=true` on 2 real gloo ranks: (records, printed table)."""
    import contextlib
    import io

    out, printed = tmp_path_factory.mktemp("cp") / "cp.json", io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["bench", "--sweep", "cp-cpu", "--json", str(out), "--set", "quick=true"]) == 0
    return json.loads(out.read_text())["records"], printed.getvalue()


def test_the_cp_sweep_measures_every_rank_and_its_key_value_exchange(cp_quick):
    """Both ranks report the whole step's peak, time and FLOPs; on the CP group each gathers, per block,
    the stacked keys and values [2, B, H, L, e] = 2 x 1 x 32 tokens x 32 wide x 4 bytes in one all-gather
    forward, and reduce-scatters their gradient in backward (FSDP2's collectives, where it shards over
    the CP ranks, share the group: backward reduce-scatters at least that)."""
    records, table = cp_quick
    assert {(r["rank"], r["cp"], r["height"], r["width"], r["tokens"]) for r in records} == {
        (0, 2, 16, 32, 32), (1, 2, 16, 32, 32),
    }  # fmt: skip
    needed = {"peak_mem_bytes", "step_time_s", "flops_per_rank", "comm_bytes", "param_bytes", "device"}
    assert all(needed <= set(r) and r["peak_mem_bytes"] > 0 for r in records)
    kv = 2 * 1 * 32 * 32 * 4
    for r in records:
        ops = r["comm_by_op"]
        assert ops["forward/allgather_"] == {"count": 1, "bytes": kv}, ops
        assert sum(v["bytes"] for k, v in ops.items() if k.startswith("backward/") and "reduce_scatter" in k) >= kv
    assert "CP all-gather MB fwd" in table and "| 16 x 32 | 32 | 2 |" in table


def test_the_planner_predicts_every_measured_cp_point_within_15_percent(cp_quick, tmp_path, capsys):
    """`dchag plan --validate` on a cp-cpu result traces one CP rank per point: within 15% of the worst
    rank's measured peak. Measurements a third larger are flagged and the command fails (the check can
    fail)."""
    records = cp_quick[0]
    meta = {"sweep": "cp-cpu", "size": {"quick": True}}
    good, bad = tmp_path / "measured.json", tmp_path / "doctored.json"
    good.write_text(json.dumps({"meta": meta, "records": records}))
    bad.write_text(json.dumps({"meta": meta, "records": [{**r, "peak_mem_bytes": r["peak_mem_bytes"] * 4 // 3}
                                                         for r in records]}))  # fmt: skip
    out = tmp_path / "validation.json"
    assert main(["plan", "--validate", str(good), "--json", str(out), "--no-progress"]) == 0
    checked = json.loads(out.read_text())["records"]
    assert [(r["height"], r["cp"]) for r in checked] == [(16, 2)]
    assert all(abs(r["error"]) <= 0.15 for r in checked), checked
    capsys.readouterr()
    assert main(["plan", "--validate", str(bad), "--no-progress"]) == 1
    assert "over tolerance" in capsys.readouterr().out
