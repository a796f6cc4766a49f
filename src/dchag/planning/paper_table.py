"""The paper's per-GPU results, predicted by the planner (`dchag bench --sweep paper-plan`).

Two parts, both traced at the paper's settings (bf16, activation checkpointing on the ViT blocks,
dropout 0.1, batch 2 per TP group, flash attention, 64 GB GPUs):

1. `table`: the six (width, channels, tp) rows of the paper's full-model table (depth 32, 32 heads,
   128 x 256 images, patch 4: L = 2048, the forecasting model, TP only), for the TP-only baseline,
   D-CHAG-L and D-CHAG-C, each also with our fused front end. The paper's measured numbers stand
   beside them (its `max_memory_reserved` on rank 0 of MI250X GCDs; taken from PAPER.md); they are
   never an input to the planner.
2. `hyperspectral-7b`: the 7B hyperspectral MAE (width 4096, depth 32, 500 bands, 192 x 384 crops,
   patch 6) on 32 GPUs: every layout for the baseline and D-CHAG-L. The paper ran the baseline at
   TP 8 + FSDP 2 (x 2 replicas) and D-CHAG-L at TP 2 + FSDP 4 (x 4 replicas).
"""

from __future__ import annotations

from dataclasses import dataclass

# (width, channels, tp) -> measured per-GPU memory in GB: baseline, D-CHAG-L, D-CHAG-C (PAPER.md)
PAPER_ROWS = {
    (2048, 512, 2): (52.45, 32.42, 52.83),
    (2048, 1024, 8): (61.95, 13.96, 24.14),
    (4096, 256, 4): (62.65, 42.30, 56.33),
    (4096, 512, 16): (61.04, 18.28, 24.39),
    (6144, 256, 16): (62.80, 28.42, 35.49),
    (8192, 128, 16): (62.73, 43.94, 50.61),
}
PAPER_VARIANTS = ("replicated", "dchag-L", "dchag-C")
GPU_MEM_GIB = 64 * 1e9 / 2**30  # a 64 GB MI250X GCD


@dataclass
class PaperPlanSize:
    """What `paper-plan` traces (`dchag bench --sweep paper-plan --set parts=[table] workers=2`)."""

    parts: tuple[str, ...] = ("table", "hyperspectral-7b")
    rows: tuple[int, ...] = tuple(range(len(PAPER_ROWS)))  # indices into PAPER_ROWS
    depth: int = 32
    workers: int = 2
    quick: bool = False  # a test-sized run: first row at depth 1, no 7B part

    def resolved(self) -> "PaperPlanSize":
        import dataclasses

        return dataclasses.replace(self, parts=("table",), rows=(0,), depth=1, workers=1) if self.quick else self


def _common(depth: int) -> list[str]:
    return [
        f"model.depth={depth}",
        "model.num_heads=32",
        "model.drop_rate=0.1",
        "train.bf16=true",
        "parallel.activation_checkpointing=true",
    ]


def weather_config(width: int, channels: int, depth: int):
    """The paper's performance model: ClimaX-style forecasting on synthetic 128 x 256 inputs."""
    from dchag.configure import load_config

    return load_config(
        None,
        [
            *_common(depth),
            "model.img_size=[128, 256]",
            "model.patch_size=4",
            f"model.embed_dim={width}",
            "data.kind=synthetic-weather",
            f"data.channels={channels}",
            "train.task=forecast",
            "train.batch_size=2",
        ],
    )


def hyperspectral_config(depth: int):
    """The paper's 7B hyperspectral MAE: 500 bands over 400-900 nm, 192 x 384 crops, patch 6."""
    from dchag.configure import load_config

    return load_config(
        None,
        [
            *_common(depth),
            "model.img_size=[192, 384]",
            "model.patch_size=6",
            "model.embed_dim=4096",
            "model.decoder_dim=128",
            "model.decoder_depth=2",
            "model.decoder_heads=4",
            "data.kind=synthetic-hyperspectral",
            "data.channels=500",
            "train.task=mae",
            "train.batch_size=2",
        ],
    )


def paper_plan(size: PaperPlanSize) -> list[dict]:
    from dchag.bench.fused_sweep import log
    from dchag.config import to_dict
    from dchag.planning.jobs import run_jobs
    from dchag.planning.planner import Candidate, Machine, plan, plan_one

    size = size.resolved()
    records: list[dict] = []
    if "table" in size.parts:
        keys = [list(PAPER_ROWS)[i] for i in size.rows]
        jobs = []
        for width, channels, tp in keys:
            base = to_dict(weather_config(width, channels, size.depth))
            for variant in PAPER_VARIANTS:
                for fused in (False, True):
                    jobs.append((base, Candidate(variant, fused, tp, 1, 1), Machine(tp, GPU_MEM_GIB), "bf16", 2))
        log(f"paper-plan: {len(keys)} rows of the paper's table, {len(jobs)} traces")
        done = run_jobs(plan_one, jobs, size.workers, lambda n, _: log(f"[plan] {n}/{len(jobs)}"))
        for job, record in zip(jobs, done):
            width, channels = job[0]["model"]["embed_dim"], job[0]["data"]["channels"]
            measured = PAPER_ROWS[(width, channels, job[1].tp)][PAPER_VARIANTS.index(job[1].variant)]
            records.append({**record, "part": "table", "width": width, "channels": channels, "paper_mem_gb": measured})
    if "hyperspectral-7b" in size.parts:
        log("paper-plan: the 7B hyperspectral MAE on 32 GPUs, every layout, baseline and D-CHAG-L")
        found = plan(
            hyperspectral_config(size.depth),
            Machine(32, GPU_MEM_GIB),
            dtype="bf16",
            local_batch=2,
            variants=("replicated", "dchag-L"),
            cp_sizes=(1,),  # the paper's layouts: no context parallelism
            workers=size.workers,
        )
        records += [{**r, "part": "hyperspectral-7b"} for r in found]
    return records


def paper_plan_table(records: list[dict]) -> str:
    """The paper's rows, measured beside predicted (GB = 1e9 bytes, as the paper's table), and the 7B
    layouts that fit."""
    from dchag.planning.planner import Candidate

    lines = []
    table = [r for r in records if r.get("part") == "table"]
    if table:
        lines += [
            "| width / channels / tp | variant | paper (MI250X, measured) | planner | planner / paper | "
            "front end's share | planner, fused front end | fused vs unfused | fused front end's share |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        by_key = {
            (r["width"], r["channels"], r["tp"], r["variant"], r["fused"]): r for r in table if "invalid" not in r
        }
        for width, channels, tp in dict.fromkeys((r["width"], r["channels"], r["tp"]) for r in table):
            for variant in PAPER_VARIANTS:
                plain, fused = (
                    by_key.get((width, channels, tp, variant, False)),
                    by_key.get((width, channels, tp, variant, True)),
                )
                if plain is None:
                    continue
                gb = plain["predicted_peak_mem_bytes"] / 1e9
                fused_gb = fused["predicted_peak_mem_bytes"] / 1e9 if fused else float("nan")
                fused_share = fused["front_end_share"] if fused else float("nan")
                lines.append(
                    f"| {width} / {channels} / {tp} | {variant} | {plain['paper_mem_gb']:.2f} GB | {gb:.2f} GB | "
                    f"{gb / plain['paper_mem_gb']:.2f} | {plain['front_end_share']:.0%} | {fused_gb:.2f} GB | "
                    f"{100 * (fused_gb / gb - 1):+.0f}% | {fused_share:.0%} |"
                )
    seven = [r for r in records if r.get("part") == "hyperspectral-7b" and "invalid" not in r]
    if seven:
        lines += [
            "",
            "7B hyperspectral MAE, 32 GPUs of 64 GB, batch 2 per TP group: the layouts that fit (90% of 64 GB), "
            "per variant, smallest TP first",
            "",
            "| variant | fused | tp x dp_shard x dp_replicate | per-GPU peak | samples per step |",
            "|---|---|---|---|---|",
        ]
        for variant in ("replicated", "dchag-L"):
            for fused in (False, True):
                fits = sorted(
                    (r for r in seven if r["variant"] == variant and r["fused"] == fused and r["fits"]),
                    key=lambda r: (r["tp"], r["predicted_peak_mem_bytes"]),
                )
                for r in fits:
                    lines.append(
                        f"| {variant} | {'yes' if fused else 'no'} | "
                        f"{r['tp']} x {r['dp_shard']} x {r['dp_replicate']} | "
                        f"{r['predicted_peak_mem_bytes'] / 1e9:.2f} GB | {r['global_batch']} |"
                    )
                if not fits:
                    lines.append(f"| {variant} | {'yes' if fused else 'no'} | none fits | - | - |")
        for label, cand in (
            ("paper's baseline layout", Candidate("replicated", False, 8, 2, 2)),
            ("paper's D-CHAG-L layout", Candidate("dchag-L", False, 2, 4, 4)),
            ("baseline at D-CHAG-L's layout", Candidate("replicated", False, 2, 4, 4)),
        ):
            r = next((r for r in seven if all(r[k] == v for k, v in vars(cand).items())), None)
            if r is not None:
                lines.append(
                    f"\n{label} ({cand.label()}): {r['predicted_peak_mem_bytes'] / 1e9:.2f} GB per GPU, "
                    f"{'fits' if r['fits'] else 'does not fit'}"
                )
    return "\n".join(lines)
