"""`dchag` command line: train | export | embed | forecast | eval | probe | info | bench | plan | check-parity."""

from __future__ import annotations

import argparse
import json
import sys

from dchag.config import ConfigError
from dchag.configure import load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config values, e.g. model.embed_dim=256"
    )


def _check_outputs(args, *, files: tuple[str, ...] = (), folders: tuple[str, ...] = ()) -> None:
    """Output paths are checked before the work, not after minutes of it: each can be created and written."""
    import os
    from pathlib import Path

    for name in (*files, *folders):
        value = getattr(args, name, None)
        if not value:
            continue
        path, option = Path(value), "--" + name.replace("_", "-")
        if name in files and path.is_dir():
            raise ConfigError(f"{option} {value!r} is a folder; give a file name")
        folder = path if name in folders else path.parent
        blocking = next((f for f in (folder, *folder.parents) if f.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise ConfigError(f"cannot write {option} {value!r}: {str(blocking)!r} is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".dchag-write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"cannot write {option} {value!r}: {err.strerror or err}") from None


def cmd_train(args) -> int:
    from dchag.train.entry import run_training

    cfg = load_config(args.config, args.set)
    return run_training(
        cfg,
        args.out,
        progress=not args.no_progress,
        resume=args.resume,
        overwrite=args.overwrite,
        resume_changed=args.resume_changed,
    )


def cmd_export(args) -> int:
    from pathlib import Path

    from dchag.train.export import export_folder, export_weights

    if args.out is not None and args.out.endswith(".safetensors"):  # the weights alone, as one file
        path = export_weights(args.run, args.out, checkpoint=args.checkpoint)
    else:
        out = args.out if args.out is not None else Path(args.run) / "export"
        path = export_folder(args.run, out, checkpoint=args.checkpoint, overwrite=args.overwrite)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_embed(args) -> int:
    from dchag.use.embed import check_out, embed_split

    check_out(args.out)
    _check_outputs(args, files=("out",) if args.out.endswith(".npz") else ())
    path = embed_split(
        args.run,
        args.out,
        split=args.split,
        data_path=args.data_path,
        pool=args.pool,
        max_samples=args.max_samples,
        checkpoint=args.checkpoint,
        progress=not args.no_progress,
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    if args.forecast is not None:
        return cmd_eval_forecast_file(args)
    if args.run is None:
        raise ConfigError("dchag eval needs --run RUN (a trained run) or --forecast FILE.zarr (a stored forecast)")
    from dchag.eval.forecast import load_run

    cfg, _, _ = load_run(args.run)
    check_eval_options(args, cfg.train.task, cfg.data.kind)
    _check_outputs(args, files=("json",), folders=("plots",))
    if cfg.train.task == "mae":
        from dchag.eval.mae import evaluate_mae, format_mae_table

        samples = 64 if args.samples is None else args.samples
        split = args.split or "test"
        result = evaluate_mae(
            args.run,
            split=split,
            samples=samples,
            plots=args.plots,
            progress=not args.no_progress,
            channels=args.channels,
            data_config=args.data_config,
        )
        table = format_mae_table(result)
    else:
        from dchag.eval.forecast import evaluate_forecast, format_table

        result = evaluate_forecast(
            args.run,
            split=args.split or "test",
            lead_hours=args.lead_hours,
            data_path=args.data_path,
            plots=args.plots,
            progress=not args.no_progress,
            channels=args.channels,
        )
        table = format_table(result)
    from dchag.eval.attention import entropy_line, run_attention_entropy

    result["attention_entropy"] = run_attention_entropy(args.run)  # per level: does the aggregation learn?
    print(table + "\n" + entropy_line(result["attention_entropy"]))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


# eval options that only one task uses: refused for the other, never silently ignored (--split serves both)
EVAL_OPTIONS = {"forecast": ("lead_hours", "data_path"), "mae": ("samples", "data_config")}


def check_eval_options(args, task: str, kind: str | None = None) -> None:
    if args.split is not None and kind is not None and kind.startswith("synthetic"):
        raise ConfigError(
            f"--split applies to runs on files (era5, spectral_cube); --run {args.run!r} is a {kind} run, "
            "evaluated on samples from data.num_samples on, which it never trained on; leave --split out"
        )
    for other, names in EVAL_OPTIONS.items():
        given = ["--" + n.replace("_", "-") for n in names if getattr(args, n) is not None]
        if other != task and given:
            raise ConfigError(
                f"{' '.join(given)} apply to {other} runs, and --run {args.run!r} is a {task} run; leave them out"
            )


def cmd_eval_forecast_file(args) -> int:
    """`dchag eval --forecast FILE.zarr`: a stored forecast (WeatherBench 2 layout) against the truth."""
    names = ("split", "samples", "plots", "channels", "data_config")
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) is not None]
    if given:
        raise ConfigError(
            f"{' '.join(given)} do not apply to --forecast (its initialisation times and leads are the file's; "
            "--lead-hours picks leads); leave them out"
        )
    _check_outputs(args, files=("json",))
    from dchag.eval.forecast import format_table
    from dchag.eval.stored_forecast import evaluate_stored_forecast

    result = evaluate_stored_forecast(
        args.forecast,
        data_path=args.data_path,
        run=args.run,
        lead_hours=args.lead_hours,
        progress=not args.no_progress,
    )
    print(format_table(result))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_forecast(args) -> int:
    from dchag.use.rollout import run_forecast

    if args.split is not None and args.init_times:
        raise ConfigError("give --split or --init-times, not both")
    summary = run_forecast(
        args.run,
        args.out,
        lead_hours=args.lead_hours,
        steps=args.steps,
        data_path=args.data_path,
        split=args.split,
        init_times=args.init_times,
        max_inits=args.max_inits,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    if summary:  # rank 0
        leads = ", ".join(f"{h:g}" for h in summary["lead_hours"])
        print(
            f"wrote {summary['out']}: {summary['init_times']} initialisation times x leads {leads} h of "
            f"{', '.join(summary['variables'])} on {summary['ranks']} rank(s)",
            file=sys.stderr,
        )
    return 0


def cmd_probe(args) -> int:
    from dchag.use.probe import format_probe_table, probe
    from dchag.use.probe_config import load_probe_config

    cfg = load_probe_config(args.config, args.set)
    _check_outputs(args, files=("json",))
    result = probe(args.run, cfg, checkpoint=args.checkpoint, progress=not args.no_progress)
    print(format_probe_table(result))
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)  # checked before the probe; made again if gone
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from dchag.bench.model_info import format_info, model_info

    cfg = load_config(args.config, args.set)
    info = model_info(cfg, args.batch_size)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def cmd_check_parity(args) -> int:
    from dchag.checks.parity import FAULTS, check_parity

    cfg = load_config(args.config, args.set)
    if args.fault not in FAULTS:
        raise ConfigError(f"--fault {args.fault!r} is unknown; use one of {FAULTS}")
    if args.tolerance is not None and not args.tolerance > 0:
        raise ConfigError(f"--tolerance {args.tolerance} must be > 0 (the largest allowed max|a-b|/max|b|)")
    passed, text = check_parity(cfg, args.nproc, args.tolerance, args.fault)
    print(text)
    return 0 if passed else 1


def cmd_bench(args) -> int:
    import datetime
    import os
    import platform

    import torch

    from dchag.bench.report import source_commit, write_json
    from dchag.bench.sweeps import SUMMARIES, sweep_size
    from dchag.planning.sweeps import SWEEPS  # bench's sweeps and the planner's paper-plan

    if args.sweep not in SWEEPS:
        raise ConfigError(f"--sweep {args.sweep!r} is unknown; use one of {sorted(SWEEPS)}")
    if args.plots and args.sweep != "paper-cpu":
        raise ConfigError(f"--plots is available for --sweep paper-cpu, not {args.sweep!r}")
    if args.simulate_tp is not None:
        if args.sweep != "paper-cpu":
            raise ConfigError(f"--simulate-tp is available for --sweep paper-cpu, not {args.sweep!r}")
        args.set = [*args.set, f"simulate_tp={args.simulate_tp}", f"simulate_rank={args.simulate_rank}"]
    _check_outputs(args, files=("json", "table"), folders=("plots",))
    size = sweep_size(args.sweep, args.set, SWEEPS)
    code = source_commit()  # the code the sweep starts from, before anything can change under it
    records = SWEEPS[args.sweep][1](size)
    meta = {
        "sweep": args.sweep,
        "size": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(size).items()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        "threads": torch.get_num_threads(),
    }
    top = {**code, "threads": meta["threads"]}
    if args.sweep in SUMMARIES:
        top["summary"] = SUMMARIES[args.sweep](records)
    write_json(records, args.json, meta, **top)
    table = SWEEPS[args.sweep][2](records)
    print(table)
    if args.table:
        from pathlib import Path

        Path(args.table).write_text(table + "\n")
    if args.plots:
        from dchag.bench.paper_sweep import worst_ranks
        from dchag.viz.scaling import paper_plots

        for path in paper_plots(worst_ranks(records), args.plots):
            print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {len(records)} records to {args.json}", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    from pathlib import Path

    from dchag.bench.report import write_json

    _check_outputs(args, files=("json", "table"))
    if args.validate:
        from dchag.planning.validate import validate_result, validation_table

        records = validate_result(args.validate, progress=not args.no_progress, workers=args.workers)
        table = validation_table(records, args.tolerance)
        ok = all(abs(r["error"]) <= args.tolerance for r in records)
        meta = {"validated": str(args.validate), "tolerance": args.tolerance}
    else:
        from dchag.planning.planner import Machine, plan, plan_table

        if args.gpus is None or args.gpu_mem is None:
            raise ConfigError("dchag plan needs --gpus N and --gpu-mem GiB (or --validate PAPER_CPU_JSON)")
        machine = Machine(
            args.gpus, args.gpu_mem, args.headroom, args.tflops, args.tp_gbs, args.dp_gbs, cp_gbs=args.cp_gbs
        )
        cfg = load_config(args.config, args.set)
        records = plan(
            cfg,
            machine,
            dtype=args.dtype,
            local_batch=args.local_batch,
            variants=tuple(args.variants),
            cp_sizes=tuple(args.cp) if args.cp else None,
            tp_sizes=tuple(args.tp) if args.tp else None,
            workers=args.workers,
            progress=not args.no_progress,
        )
        table, ok = plan_table(records, machine), True
        meta = {"config": args.config, "set": args.set, "machine": vars(machine), "dtype": args.dtype}
    print(table)
    if args.json:
        write_json(records, args.json, meta)
        print(f"wrote {len(records)} records to {args.json}", file=sys.stderr)
    if args.table:
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table).write_text(table + "\n")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dchag", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (
        _train_parser,
        _export_parser,
        _embed_parser,
        _probe_parser,
        _forecast_parser,
        _eval_parser,
        _info_parser,
        _bench_parser,
        _plan_parser,
        _parity_parser,
    ):
        add(sub)
    return parser


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model (single process, or under torchrun)")
    _add_config_args(p)
    p.add_argument(
        "--out", default="runs/latest", help="run folder: metrics.jsonl, config.yaml, summary.yaml, checkpoints/"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume",
        metavar="auto|DIR",
        help="continue from a checkpoint: auto = the newest complete one in --out (fresh start if none), "
        "or a checkpoint / run folder; any parallel layout",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--out holds an earlier run: remove its checkpoints, metrics and statistics and start afresh",
    )
    p.add_argument(
        "--resume-changed",
        action="store_true",
        help="resume even though settings that change the run's numbers differ (batch, data, model, schedule); "
        "the differences are logged and kept in summary.yaml",
    )
    p.set_defaults(func=cmd_train)


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a folder others can load (dchag.load): model.safetensors (no pickle), config.yaml, stats.json, "
        "README.md model card",
    )
    p.add_argument("--run", required=True, help="the run folder dchag train wrote")
    p.add_argument("--checkpoint", help="a checkpoint folder or step number (default: the run's newest)")
    p.add_argument(
        "--out", help="output folder (default: RUN/export); a name ending in .safetensors writes the weights alone"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    p.set_defaults(func=cmd_export)


def _embed_parser(sub) -> None:
    p = sub.add_parser(
        "embed", help="encoder features of a split's samples (ERA5 times, spectral-cube crops) to .npz or .zarr"
    )
    p.add_argument("--run", required=True, help="a run folder or dchag export folder")
    p.add_argument("--out", required=True, help="output file: FILE.npz (numpy) or FILE.zarr (xarray)")
    p.add_argument("--split", choices=["train", "val", "test"], help="the data.split part (default test)")
    p.add_argument("--data-path", help="embed samples of another file holding the same variables or bands")
    p.add_argument("--pool", choices=["none", "mean"], default="none", help="none: [N, L, D] tokens; mean: [N, D]")
    p.add_argument("--max-samples", type=int, help="at most this many samples (spectral cubes: default 64 crops)")
    p.add_argument("--checkpoint", help="a checkpoint folder or step number (default: the run's newest)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_embed)


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a trained run against its field's baselines on a split it never trained on (default test); "
        "synthetic runs: samples past data.num_samples",
    )
    p.add_argument(
        "--run",
        help="the run folder dchag train wrote (config.yaml, checkpoints/); with --forecast: score against this "
        "run's data and training-split climatology (synthetic runs: its held-out samples)",
    )
    p.add_argument(
        "--forecast",
        metavar="FILE.zarr",
        help="score a stored forecast in WeatherBench 2's layout (dchag forecast's, or another model's) against "
        "--data-path TRUTH (or --run's data)",
    )
    p.add_argument(
        "--split",
        choices=["train", "val", "test"],
        help="the data.split part to evaluate (default test): ERA5 time steps, spectral-cube tiles or files",
    )
    p.add_argument("--lead-hours", type=int, nargs="+", help="lead times (default: the trained range's ends)")
    p.add_argument("--data-path", help="evaluate on another file holding the same variables")
    p.add_argument("--json", help="also write the metrics here as JSON")
    p.add_argument("--plots", help="folder for PNGs: forecast maps, or MAE false-colour composites and spectra")
    p.add_argument("--samples", type=int, help="MAE: held-out crops to evaluate (default 64)")
    p.add_argument(
        "--data-config",
        metavar="CONFIG.yaml",
        help="MAE with model.tokenizer wavelength or hypernetwork: evaluate on the data of another config (e.g. "
        "another sensor's bands), normalised by that data's training split",
    )
    p.add_argument(
        "--channels",
        nargs="+",
        metavar="NAME",
        help="give the model only these of its channels (the others left out, as train.channel_subset does); "
        "the scores still cover every channel",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def _forecast_parser(sub) -> None:
    p = sub.add_parser(
        "forecast",
        help="autoregressive rollout of a forecast run written as a WeatherBench 2 Zarr store (one process, or the "
        "model split over torchrun's ranks)",
    )
    p.add_argument(
        "--run", required=True, help="the run folder dchag train wrote, or an export folder dchag export wrote"
    )
    p.add_argument("--out", required=True, metavar="FILE.zarr", help="the Zarr store to write (replaced if it exists)")
    p.add_argument("--lead-hours", type=float, required=True, help="the lead of one step, hours")
    p.add_argument("--steps", type=int, default=1, help="autoregressive steps (leads H, 2H, ..., N x H; default 1)")
    p.add_argument("--data-path", help="forecast from another file holding the same variables")
    p.add_argument(
        "--split",
        choices=["train", "val", "test"],
        help="initialise at every time step of this data.split part (default test)",
    )
    p.add_argument(
        "--init-times", nargs="+", metavar="T", help="initialise at these time steps (e.g. 2026-03-29T06:00)"
    )
    p.add_argument(
        "--max-inits",
        type=int,
        help="at most this many initialisation times (the first; synthetic runs: held-out samples, default 64)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="initialisation times per forward pass")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_forecast)


def _probe_parser(sub) -> None:
    p = sub.add_parser(
        "probe",
        help="frozen encoder features -> a linear classifier on a labelled task (configs/probe-*.yaml): test accuracy "
        "and macro-F1 beside a random encoder and the per-patch mean spectrum",
    )
    p.add_argument("--run", required=True, help="a run folder (dchag train --out) or an export folder")
    p.add_argument("--config", required=True, help="the probe config, e.g. configs/probe-landsat8-qa.yaml")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="override probe config values, e.g. seed=1"
    )
    p.add_argument("--checkpoint", help="a checkpoint folder or step number of the run (default: the newest)")
    p.add_argument("--json", help="also write the result here as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_probe)


def _info_parser(sub) -> None:
    p = sub.add_parser("info", help="parameter and FLOP summary of a config (computed on the meta device)")
    _add_config_args(p)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="run a benchmark sweep: JSON records and a table of ratios")
    p.add_argument(
        "--sweep",
        required=True,
        help="fused-cpu | channel-parallel-cpu | tp-comm-cpu | accuracy-cpu | paper-cpu | cp-cpu | paper-plan",
    )
    p.add_argument("--json", required=True, help="output JSON file")
    p.add_argument("--table", help="also write the Markdown table here")
    p.add_argument("--plots", help="paper-cpu: folder for PNGs of memory and throughput against channels")
    p.add_argument(
        "--simulate-tp",
        type=int,
        metavar="T",
        help="paper-cpu: run one rank of a T-way TP layout alone, peers faked (per-GPU memory and time on one device)",
    )
    p.add_argument(
        "--simulate-rank", type=int, default=0, metavar="R", help="which rank --simulate-tp runs (default 0)"
    )
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="sweep size, e.g. channels=128 repeats=5")
    p.set_defaults(func=cmd_bench)


def _plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="per-GPU memory and predicted throughput of every variant and layout of N GPUs (traced on fake tensors)",
    )
    _add_config_args(p)
    p.add_argument("--gpus", type=int, metavar="N", help="GPUs the job will use")
    p.add_argument("--gpu-mem", type=float, metavar="GiB", help="memory of one GPU, e.g. 64 (MI250X GCD) or 80 (H100)")
    p.add_argument("--dtype", help="bf16 (autocast + bf16 FSDP parameters) or fp32; default: as the config says")
    p.add_argument(
        "--local-batch", type=int, metavar="B", help="samples per data-parallel rank (default: train.batch_size / dp)"
    )
    p.add_argument(
        "--variants", nargs="+", default=["replicated", "naive", "dchag-L", "dchag-C"], help="variants to compare"
    )
    p.add_argument("--headroom", type=float, default=0.10, help="fraction of GPU memory kept free (default 0.10)")
    p.add_argument("--tflops", type=float, default=100.0, help="sustained TFLOP/s per GPU for the speed prediction")
    p.add_argument("--tp-gbs", type=float, default=100.0, help="GB/s per GPU within a TP group")
    p.add_argument("--dp-gbs", type=float, default=25.0, help="GB/s per GPU between data-parallel peers")
    p.add_argument("--cp-gbs", type=float, default=100.0, help="GB/s per GPU within a context-parallel group")
    p.add_argument(
        "--cp", type=int, nargs="+", metavar="N", help="context-parallel sizes to consider (default: every divisor)"
    )
    p.add_argument(
        "--tp", type=int, nargs="+", metavar="N", help="tensor-parallel sizes to consider (default: every divisor)"
    )
    p.add_argument("--workers", type=int, default=1, help="trace this many candidates at once (processes)")
    p.add_argument("--json", help="write the records here")
    p.add_argument("--table", help="also write the Markdown table here")
    p.add_argument(
        "--validate",
        metavar="SWEEP_JSON",
        help="instead: predict every point of a `dchag bench --sweep paper-cpu` (or cp-cpu) result, compare with "
        "its measurements",
    )
    p.add_argument("--tolerance", type=float, default=0.15, help="--validate: largest allowed relative error")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_plan)


def _parity_parser(sub) -> None:
    p = sub.add_parser(
        "check-parity",
        help="one step single-device vs distributed with the same weights and batch; non-zero exit above tolerance",
    )
    _add_config_args(p)
    p.add_argument("--nproc", type=int, required=True, help="local processes (gloo on CPU, NCCL with enough GPUs)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest allowed max|a-b|/max|b| per tensor (default: 1e-5 in fp32, 3.1e-2 = 8 bf16 roundoffs in bf16)",
    )
    p.add_argument(
        "--fault",
        default="none",
        help="inject a known bug to see the check fail: gather-reduce-scatter, gather-own-slice, grad-scale; with "
        "train.rollout_steps > 1 also rollout-data-fed, rollout-channel-map",
    )
    p.set_defaults(func=cmd_check_parity)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[1] == "--":  # `torchrun ... -m dchag forecast -- --run RUN`: the `--` keeps torchrun
        del argv[1]  # from taking --run for its own --run-path; dchag drops it
    args = build_parser().parse_args(argv)  # first: --help needs no torch
    import torch

    from dchag import torch_too_old

    too_old = torch_too_old(torch.__version__)
    if too_old:
        print(f"dchag: {too_old}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"dchag: {getattr(err, 'kind', 'config error')}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
