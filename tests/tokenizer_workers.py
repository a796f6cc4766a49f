"""Code that runs inside the spawned ranks of tests/test_tp_training_settings.py for the wavelength /
hypernetwork tokenizers (importable by the children): their parity cases, the counter-check that a
missing sum of the shared weights' partial gradients is caught, and the rank-by-rank build."""

from __future__ import annotations

import dist_workers as W
import torch

from dchag.checks import parity
from dchag.model import build_model
from dchag.parallel import ParallelDims, build_mesh
from dchag.parallel.construct import build_parallel_model
from dchag.parallel.state import logical_state_dict

# MAE on 11 synthetic bands in 5 uneven groups; two bands read as SAR channels (no wavelength, rows by
# name), one of them with a bandwidth, and a vocabulary with an unused named row (kept on TP rank 0)
SPECS = "[400, {name: vv}, {wavelength: 500, bandwidth: 30}, 550, 600, 650, {name: vh}, 750, 800, 850, 900]"
BANDS = [f"b{400 + 50 * i:.1f}" for i in range(11)]
WAVELENGTH = [
    "train.task=mae",
    "data.kind=synthetic-hyperspectral",
    *W.SPLITS["uneven"],
    f"model.channel_specs={SPECS}",
    f"model.vocabulary=[{', '.join(BANDS[:5])}, sar_hh, {', '.join(BANDS[5:])}]",
]
C, L = W.KINDS["C"], W.KINDS["L"]


def parity_cases() -> dict:
    """{name: (overrides, fault[, reference_materializing])} for `dist_workers.parity_matrix`."""
    wave, hyper = [*WAVELENGTH, "model.tokenizer=wavelength"], [*WAVELENGTH, "model.tokenizer=hypernetwork"]
    return {
        "tokenizer/tp4/wavelength/C/dropout": ([C, *wave, "parallel.tp=4", "model.drop_rate=0.3"], "none"),
        "tokenizer/tp4/hypernetwork/L/bf16": ([L, *hyper, "parallel.tp=4", "train.bf16=true"], "none"),
        "tokenizer/tp4/hypernetwork/C/fused-vs-materializing": ([C, *hyper, "parallel.tp=4"], "none", True),
        "tokenizer/fsdp2x2/wavelength/L": ([L, *wave, "parallel.tp=2", "parallel.dp_shard=2"], "none"),
        "tokenizer/tp4/wavelength/C/replicated": ([C, *wave, "parallel.tp=4", "parallel.mode=replicated"], "none"),
        "tokenizer/tp4/hypernetwork/C/naive": ([C, *hyper, "parallel.tp=4", "parallel.mode=naive"], "none"),
        "fault/tokenizer/grad-scale": ([C, *wave, "parallel.tp=4"], "grad-scale"),
    }


def unsummed_shared_gradients() -> dict:
    """Counter-check: the parity of a wavelength model whose shared tokenizer and output weights are not
    marked partial (each rank keeps its own channels' part of their gradient): must fail."""
    original = parity.parallelize

    def forgetting(model, cfg, mesh):
        plan = original(model, cfg, mesh)
        for spec in plan.specs.values():
            if spec.logical_name.startswith(("front_end.tokenizer.", "head.pred.")) and spec.dim is None:
                spec.partial_grad = False
        return plan

    parity.parallelize = forgetting
    try:
        report = parity.run_parity(W.config(C, *WAVELENGTH, "model.tokenizer=hypernetwork", "parallel.tp=4"))
    finally:
        parity.parallelize = original
    return {"worst": report.worst, "grads": report.worst_grads(3)}


def built_rank_by_rank() -> dict:
    """A hypernetwork model built shard by shard on each rank (parameters on meta, initial values copied
    in per logical tensor): its logical weights equal build_model's, spare named row included."""
    cfg = W.config(C, *WAVELENGTH, "model.tokenizer=hypernetwork", "parallel.tp=4")
    plan = build_parallel_model(cfg, build_mesh(ParallelDims.from_config(cfg.parallel)), torch.device("cpu"))
    got, expected = logical_state_dict(plan), build_model(cfg).state_dict()
    differ = sorted(k for k in expected if not torch.equal(got[k], expected[k]))
    return {"differ": differ, "names": sorted(got) == sorted(expected)}
