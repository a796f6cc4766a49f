"""The README.md model card of an export folder, generated from the run: what the model is, what it
takes (channels with wavelengths or variable names and units, normalisation), what it was trained on
(and under which licence), and how it scored (the run's eval.json, when `dchag eval --json` wrote one).

Everything comes from the run's files; nothing is typed in by hand, so the card cannot drift from the
weights beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dchag.config import ConfigError
from dchag.data.channels import BAND_RE
from dchag.data.packaged import LICENCES
from dchag.train.run_weights import RunWeights

TASK_WORDS = {"forecast": "forecast", "mae": "masked-autoencoder pretraining"}


def model_card(run: Path, loaded: RunWeights) -> str:
    cfg, model = loaded.config, loaded.model
    parts = [
        f"# dchag model `{run.resolve().name}`",
        "",
        f"Exported by `dchag export` from the run folder `{run}` at training step {loaded.step} "
        f"(of train.steps = {cfg.train.steps}).",
        "",
        "```python",
        "import dchag",
        "",
        'model = dchag.load("path/to/this/folder")  # the single-device model, channels, statistics',
        "```",
        "",
        "## Model",
        "",
        *_architecture(cfg, sum(p.numel() for p in model.parameters())),
        "",
        "## Channels",
        "",
        *_channel_table(cfg, loaded.stats),
        "",
        "## Normalisation",
        "",
        _normalisation(cfg, loaded.stats),
        "",
        "## Training data",
        "",
        *_training_data(cfg),
        "",
        "## Training",
        "",
        *_training(run, cfg),
        "",
        "## Evaluation",
        "",
        *_evaluation(run),
    ]
    return "\n".join(parts) + "\n"


def _architecture(cfg, parameters: int) -> list[str]:
    m, t = cfg.model, cfg.train
    h = m.hierarchy
    levels = "; ".join(
        f"level {i + 1}: {level.kind}, {level.groups or '?'} group(s) x {level.tokens} token(s)"
        for i, level in enumerate(h.resolved_levels())
    )
    shape = f"preset `{h.preset}`, groups {h.groups}" if not h.levels else "levels given explicitly"
    task = TASK_WORDS.get(t.task, t.task)
    if t.task == "forecast":
        leads = cfg.data.lead_hours if cfg.data.kind == "era5" else [cfg.data.lead_step_hours, cfg.data.max_lead_hours]
        task += f" of {len(cfg.out_channels)} channel(s), lead times {leads[0]}-{leads[1]} h"
        task += " (residual: predicts the change from the input field)" if m.residual_forecast else ""
    else:
        task += f" (mask ratio {t.mask_ratio}, decoder width {m.decoder_dim}, depth {m.decoder_depth})"
    return [
        f"- Task: {task}",
        "- Architecture: ChannelViT (D-CHAG): per-channel patch embedding -> channel hierarchy -> ViT -> head",
        f"- Input: {len(cfg.channels)} channels, {m.img_size[0]} x {m.img_size[1]} pixels, patch {m.patch_size}",
        f"- ViT: width {m.embed_dim}, depth {m.depth}, {m.num_heads} heads, MLP ratio {m.mlp_ratio}",
        f"- Channel hierarchy: {shape} ({levels})",
        f"- Parameters: {parameters:,}",
    ]


def _describe(cfg, name: str) -> str:
    """A channel in words: its wavelength, or its weather variable (and pressure level)."""
    match = BAND_RE.match(name)
    if match and cfg.data.kind in ("spectral_cube", "synthetic-hyperspectral"):
        return f"{float(match.group(1)):g} nm"
    if cfg.data.kind == "synthetic-weather":
        return "synthetic field (named like ERA5's variables)"
    from dchag.data.era5 import ALIASES, LEVEL_RE

    if name in ALIASES:
        return ALIASES[name][-1]
    level = LEVEL_RE.match(name)
    if level and level["var"] in ALIASES:
        return f"{ALIASES[level['var']][-1]} at {level['level']} hPa"
    return ""


def _units(cfg, stats) -> dict[str, str]:
    """Units as the training files state them (ERA5); {} when the files cannot be read here."""
    if cfg.data.kind != "era5":
        return {}
    from dchag.data import build_source

    try:
        source = build_source(cfg, stats=stats)
        return {c: source.units(c) for c in cfg.channels}
    except (ConfigError, OSError):
        return {}


def _channel_table(cfg, stats) -> list[str]:
    units = _units(cfg, stats)
    spectral = cfg.data.kind in ("spectral_cube", "synthetic-hyperspectral")
    if spectral:
        unit = "reflectance (as the files store it)" if cfg.data.kind == "spectral_cube" else "reflectance"
        units = {c: unit for c in cfg.channels}
    rows = [
        f"| # | channel | {'wavelength' if spectral else 'variable'} | units | mean | std | forecast target |",
        "|---|---|---|---|---|---|---|",
    ]
    targets = set(cfg.out_channels) if cfg.train.task == "forecast" else set()
    for i, c in enumerate(cfg.channels):
        s = (stats or {}).get("channels", {}).get(c, {})
        mean, std = (f"{s['mean']:.6g}", f"{s['std']:.6g}") if s else ("", "")
        rows.append(
            f"| {i} | `{c}` | {_describe(cfg, c)} | {units.get(c, '')} | {mean} | {std} | "
            f"{'yes' if c in targets else ''} |"
        )
    return rows


def _normalisation(cfg, stats) -> str:
    if stats is not None:
        return (
            "Each channel is fed to the model as (x - mean) / std with the statistics of the training split in "
            "the table above (`stats.json`, streamed over the training data). `dchag.load(...).normalise` and "
            "`.denormalise` apply them; forecasts and reconstructions come back in physical units."
            + (
                " Then (`model.visible_norm`) the model standardises each sample's bands again by the mean and "
                "deviation of its visible pixels and scales its reconstruction back; `dchag.load` does this "
                "inside the model."
                if cfg.model.visible_norm
                else ""
            )
        )
    if cfg.data.kind == "synthetic-hyperspectral":
        from dchag.data.synthetic_hyperspectral import SyntheticHyperspectral

        offset, scale = SyntheticHyperspectral.standardisation
        return f"Synthetic reflectance standardised as (x - {offset}) / {scale} for every band; no stats.json."
    return "Synthetic fields are generated in model units; no statistics apply (no stats.json)."


def _training_data(cfg) -> list[str]:
    d = cfg.data
    lines = [f"- Kind: `{d.kind}`"]
    if d.path:
        lines.append(f"- Path: `{d.path}`")
    if d.path in LICENCES:
        what, licence = LICENCES[d.path]
        lines += [f"- Data: {what}", f"- Licence: {licence}"]
    elif d.kind.startswith("synthetic"):
        lines.append(f"- Data: generated by dchag (seed {d.seed}, {d.num_samples} training samples); no licence")
    else:
        lines.append("- Licence: that of the data provider of the files above (not recorded by dchag)")
    if not d.kind.startswith("synthetic"):
        by = d.split_by if d.kind != "era5" else "time"
        lines.append(f"- Split: {json.dumps(d.split, default=str)} (split by {by})")
    return lines


def _training(run: Path, cfg) -> list[str]:
    t = cfg.train
    lines = [f"- {t.steps} steps, global batch {t.batch_size}, AdamW lr {t.lr:g} (min {t.min_lr:g}), seed {t.seed}"]
    if t.init_from:  # config.yaml leaves these out (dchag.train.export.resolved_config_dict)
        frozen = f"; frozen parts: {', '.join(t.freeze)}" if t.freeze else ""
        lines.append(f"- Fine-tuned from `{t.init_from}` (train.init_from){frozen}")
    summary_file = run / "summary.yaml"
    if summary_file.is_file():
        summary = yaml.safe_load(summary_file.read_text()) or {}
        if "final_loss" in summary:
            lines.append(
                f"- Loss {summary['first_loss']:.4g} -> {summary['final_loss']:.4g} on {summary.get('ranks', '?')} "
                f"rank(s) in {summary.get('elapsed_s', '?')} s"
            )
    return lines


def _evaluation(run: Path) -> list[str]:
    file = run / "eval.json"
    if not file.is_file():
        return [f"No `eval.json` in the run folder: run `dchag eval --run {run} --json {file}` before exporting."]
    result = json.loads(file.read_text())
    if "metrics" in result:  # forecast: per variable and lead, physical units
        rows = [
            f"`dchag eval` on the {result.get('split', '?')} split (latitude-weighted RMSE in physical units):",
            "",
            "| variable | lead (h) | samples | RMSE | persistence RMSE | climatology RMSE | ACC |",
            "|---|---|---|---|---|---|---|",
        ]
        rows += [
            f"| {r['variable']} | {r['lead_hours']} | {r['samples']} | {r['rmse']:.4g} | "
            f"{r['persistence_rmse']:.4g} | {r['climatology_rmse']:.4g} | {r['acc']:.3f} |"
            for r in result["metrics"]
        ]
        return rows
    return [
        f"`dchag eval` on {result.get('samples', '?')} {result.get('split', '?')} crops, mask ratio "
        f"{result.get('mask_ratio', '?')}, masked patches:",
        "",
        "| | PSNR (dB) | SAM (deg) |",
        "|---|---|---|",
        f"| model | {result['psnr_db']:.2f} | {result['sam_deg']:.2f} |",
        f"| mean-spectrum baseline | {result['baseline_psnr_db']:.2f} | {result['baseline_sam_deg']:.2f} |",
    ]
