"""`dchag eval` for masked-autoencoder runs: reconstruction quality in the spectral imaging field's terms.

On crops the run never trained on, with fixed masks: for spectral cubes, crops of the chosen split
(`--split`, default test), which lie inside that split's tiles (or files) and share no pixel with a
training crop (docs/data.md, "Splits"); for synthetic cubes, sample indices from `data.num_samples` on.
In the data's physical units, over the masked patches and over the whole image:

- `psnr_db`: mean over bands of 10 log10(peak_b^2 / MSE_b), peak_b the band's largest absolute true value
  and MSE_b over all scored pixels of all crops (`dchag.tasks.metrics.ReconstructionScores`);
- `sam_deg`: the spectral angle between reconstructed and true spectra, mean over all pixels, degrees;
- `band_rmse`: RMSE per band;
- `baseline_psnr_db`, `baseline_sam_deg`: the same for the mean-spectrum baseline, which predicts every
  masked pixel as the mean spectrum of the crop's visible pixels (computed on the same pixels).

`channels` (`dchag eval --channels`): the model sees only these bands, the others left out as in
`train.channel_subset`; the scores still cover every band, and `left_out_bands` scores the bands it did
not see over the whole image (spectral inpainting). The baseline is given what the model is given: the
visible pixels of those bands; a band left out it predicts as that band's normalisation mean (the
training split's mean; synthetic cubes: the generator's standardisation offset). `baseline` says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from einops import repeat

from dchag.config import ConfigError
from dchag.data import build_source
from dchag.data.held_out import HeldOut
from dchag.eval.forecast import load_run
from dchag.tasks import mask_noise_for_step
from dchag.tasks.channel_subset import keep_of_names
from dchag.tasks.metrics import ReconstructionScores


def evaluate_mae(
    run: str | Path,
    *,
    split: str = "test",
    samples: int = 64,
    batch_size: int = 8,
    plots=None,
    progress: bool = True,
    channels: list[str] | None = None,
    data_config: str | Path | None = None,
) -> dict:
    """Metrics of an MAE run on `samples` crops of `split` (spectral cubes; synthetic runs: held-out indices);
    `channels`: the bands the model is given (default all)."""
    cfg, model, stats = load_run(run)
    if cfg.train.task != "mae":
        raise ConfigError(f"--run {str(run)!r} trained task {cfg.train.task!r}; this evaluation is for MAE runs")
    if data_config is not None:  # another sensor's data: a wavelength model rebuilt for its channels
        cfg, model, stats = on_other_data(cfg, model, data_config)
    if cfg.data.kind == "spectral_cube":
        source = build_source(cfg, split=split, stats=stats)
    else:  # synthetic: the generator's samples past the training range
        source, split = HeldOut(build_source(cfg, stats=stats), cfg.data.num_samples, samples), "held-out"
    names = source.channels
    keep = None if channels is None else keep_of_names(names, list(channels), "--channels")
    left_out = [c for c in names if channels is not None and c not in channels]
    kept = None if keep is None else keep.numpy()  # [C]: the bands the model (and the baseline) is given
    if stats is not None:
        mean = np.array([stats["channels"][c]["mean"] for c in names])[:, None, None]
        std = np.array([stats["channels"][c]["std"] for c in names])[:, None, None]
    else:  # synthetic cubes are standardised with one (mean, scale); undo it to get reflectance
        offset, scale = getattr(source.source, "standardisation", (0.0, 1.0))
        mean, std = np.full((len(names), 1, 1), offset), np.full((len(names), 1, 1), scale)
    parts = {k: ReconstructionScores(len(names)) for k in ("masked", "whole", "baseline_masked")}
    if left_out:
        parts["left_out"] = ReconstructionScores(len(left_out))
    patch = cfg.model.patch_size
    grid_w = cfg.model.img_size[1] // patch
    shown = None
    for start in range(0, samples, batch_size):
        indices = list(range(start, min(start + batch_size, samples)))
        batch = source.batch(indices)
        noise = mask_noise_for_step(cfg, 10_000 + start, len(indices), model.num_patches)
        with torch.no_grad():
            out = model(batch["x"], mask_noise=noise, channel_keep=keep)
        pixel_mask = repeat(out.mask, "b (h w) -> b (h p1) (w p2)", w=grid_w, p1=patch, p2=patch).bool().numpy()
        # data.nan=mask: only pixels valid in every band are scored (a spectrum needs all its bands)
        scored = batch["x_valid"].all(dim=1).numpy() if "x_valid" in batch else np.ones_like(pixel_mask)
        for b in range(len(indices)):
            truth = batch["x"][b].double().numpy() * std + mean  # [C, H, W] physical
            pred = out.pred[b].double().numpy() * std + mean
            m = pixel_mask[b] & scored[b]
            visible = ~pixel_mask[b] & scored[b]
            visible_mean = mean_spectrum_baseline(truth, visible if visible.any() else scored[b], kept, mean[:, 0])
            parts["masked"].add(pred[:, m], truth[:, m])
            parts["whole"].add(pred[:, scored[b]], truth[:, scored[b]])
            parts["baseline_masked"].add(np.repeat(visible_mean, m.sum(), axis=1), truth[:, m])
            if left_out:
                out_rows = ~keep.numpy()
                parts["left_out"].add(pred[out_rows][:, scored[b]], truth[out_rows][:, scored[b]])
            if shown is None:
                shown = (truth, truth * ~m[None], pred)
        if progress:
            print(f"eval: {min(start + batch_size, samples)}/{samples} crops", file=sys.stderr)
    masked, base = parts["masked"].result(names), parts["baseline_masked"].result(names)
    result = {
        "run": str(run),
        "split": split,
        "samples": samples,
        "mask_ratio": cfg.train.mask_ratio,
        **masked,
        "baseline_psnr_db": base["psnr_db"],
        "baseline_sam_deg": base["sam_deg"],
        "baseline": BASELINE if keep is None else BASELINE + BASELINE_LEFT_OUT,
        "whole_image": parts["whole"].result(names),
    }
    if channels is not None:
        result["channels"] = list(channels)
    if data_config is not None:
        result["data_config"] = str(data_config)
    if left_out:
        result["left_out_bands"] = parts["left_out"].result(left_out)
    if plots is not None and shown is not None:
        from dchag.viz.spectra import reconstruction_figures

        wavelengths = [float(c[1:]) for c in names]
        result["plots"] = [str(p) for p in reconstruction_figures(*shown, wavelengths, Path(plots))]
    return result


BASELINE = "mean spectrum of each crop's visible pixels"
BASELINE_LEFT_OUT = " in the bands the model is given; a left-out band: its normalisation mean (training split)"


def mean_spectrum_baseline(
    truth: np.ndarray, visible: np.ndarray, kept: np.ndarray | None, band_mean: np.ndarray
) -> np.ndarray:
    """The baseline's spectrum [C, 1] of one crop: truth [C, H, W] averaged over the `visible` pixels
    [H, W] in the bands `kept` [C] (None: all), and `band_mean` [C, 1] (the normalisation mean, in the
    same units) for the others: it sees what the model sees, never a band the model was not given."""
    spectrum = truth[:, visible].mean(axis=1, keepdims=True)  # [C, 1]
    return spectrum if kept is None else np.where(kept[:, None], spectrum, band_mean)


def on_other_data(cfg, model, data_config: str | Path):
    """(config, model, statistics) of a wavelength model applied to the data of another config file (its
    `data` section: e.g. another sensor's scene, split and no-data value), with that data's own
    normalisation statistics from its training split, as a run on it would compute them."""
    from dchag.configure import load_config
    from dchag.train.other_channels import model_for_channels

    other = load_config(data_config)
    cfg, model = model_for_channels(cfg, model, other.channels, other.model.channel_specs, data=other.data)
    source = build_source(cfg)
    return cfg, model, (source.compute_stats() if hasattr(source, "compute_stats") else None)


def format_mae_table(result: dict) -> str:
    w = result["whole_image"]
    return "\n".join(
        [
            f"{result['run']}: {result['samples']} {result['split']} crops, mask ratio {result['mask_ratio']}"
            + (f", data of {result['data_config']}" if "data_config" in result else ""),
            f"{'':<28} {'PSNR (dB)':>10} {'SAM (deg)':>10}",
            f"{'model, masked patches':<28} {result['psnr_db']:>10.2f} {result['sam_deg']:>10.2f}",
            f"{'mean-spectrum baseline':<28} {result['baseline_psnr_db']:>10.2f} {result['baseline_sam_deg']:>10.2f}",
            f"{'model, whole image':<28} {w['psnr_db']:>10.2f} {w['sam_deg']:>10.2f}",
        ]
        + (
            [
                f"{'model, left-out bands':<28} {result['left_out_bands']['psnr_db']:>10.2f} "
                f"{result['left_out_bands']['sam_deg']:>10.2f}  (input: {len(result['channels'])} bands)"
            ]
            if "left_out_bands" in result
            else []
        )
    )
