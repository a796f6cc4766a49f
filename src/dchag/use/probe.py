"""`dchag probe`: how much of a labelled task a frozen encoder's features make linearly separable.

Per-patch features, a linear classifier (scikit-learn's LogisticRegression on standardised features,
its C chosen by cross-validation over the training tiles, fitted on the training tiles' patches) and its
accuracy and macro-F1 on the test tiles' patches, for three feature sets on the same patches, each
through exactly the same protocol:

- `encoder`: the run's encoder tokens of each patch at `encoder.layers` (the patch's own token, so a
  label and its feature cover the same pixels; `final` is `TrainedModel.embed(x, pool="none")`);
- `random_encoder`: the same architecture at its initial weights (`build_model` with the run's
  train.seed: the weights the run started from), through the same `embed`;
- `mean_spectrum`: the raw per-patch mean of each input band (physical units, C numbers per patch).

The task and its split are `dchag.data.landsat_qa`'s; the probe config `dchag.use.probe_config`'s.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings

import numpy as np
import torch
from einops import rearrange, reduce

from dchag.config import ConfigError
from dchag.data.errors import DataError
from dchag.data.landsat_qa import Crops, load_landsat_qa
from dchag.model import build_model
from dchag.use.probe_config import ProbeConfig, layer_block
from dchag.use.trained import TrainedModel, load

FEATURES = ("encoder", "random_encoder", "mean_spectrum")
LABELS = {
    "encoder": "pretrained encoder",
    "random_encoder": "random encoder",
    "mean_spectrum": "mean spectrum",
    "majority": "majority class",
}


def select_patches(crops: Crops, n_classes: int, limit: int, seed: int) -> np.ndarray:
    """[N, gh, gw] bool: the labelled patches, or a seeded class-stratified subset of `limit` of them."""
    keep = crops.labels >= 0
    if keep.sum() <= limit:
        return keep
    from sklearn.model_selection import train_test_split

    flat = np.flatnonzero(keep)
    chosen, _ = train_test_split(flat, train_size=limit, stratify=crops.labels.ravel()[flat], random_state=seed)
    out = np.zeros(keep.size, dtype=bool)
    out[chosen] = True
    return out.reshape(keep.shape)


def resolve_layers(layers: list[str], depth: int) -> list[int]:
    """encoder.layers as `layer_block` numbers for a model of `depth` ViT blocks (`blocks` expanded to
    1..depth); a block past `depth`, or a layer named twice, is one ConfigError line."""
    out = []
    for name in layers:
        k = layer_block(name)
        if k > depth:
            some = f"block1 to block{depth}" if depth > 1 else "block1"
            raise ConfigError(
                f"encoder.layers: {name!r} is past the run's {depth} ViT block(s) (model.depth={depth}); "
                f"use tokens, blocks, {some}, or final"
            )
        out += list(range(1, depth + 1)) if k == -2 else [k]
    if len(set(out)) != len(out):
        raise ConfigError(f"encoder.layers={layers} names a layer twice for a model of {depth} block(s)")
    return out


def layer_tokens(model: TrainedModel, x: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """[B, L, D * len(layers)]: the tokens at each of `layers` (`resolve_layers` numbers) for x [B, C, H, W]
    (physical units), read by hooks during one `embed` (so `final`, -1, is exactly `embed`'s output),
    concatenated in the listed order."""
    blocks = model.model.blocks
    seen = {}
    hooks = [blocks[0].register_forward_pre_hook(lambda _, args: seen.__setitem__(0, args[0]))]
    for k, block in enumerate(blocks, start=1):
        hooks.append(block.register_forward_hook(lambda _, __, out, k=k: seen.__setitem__(k, out)))
    try:
        seen[-1] = model.embed(x, pool="none")  # [B, L, D]
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([seen[k] for k in layers], dim=-1)


def encoder_features(
    model: TrainedModel, crops: Crops, keep: np.ndarray, batch_size: int, layers: list[int] = (-1,)
) -> np.ndarray:
    """[n, D * len(layers)]: the encoder tokens of every kept patch at `layers` (`resolve_layers` numbers;
    default the final tokens), crop by crop in row-major patch order."""
    gh = keep.shape[1]
    used = np.flatnonzero(keep.any(axis=(1, 2)))  # crops with at least one kept patch
    out = []
    for start in range(0, len(used), batch_size):
        index = used[start : start + batch_size]
        tokens = layer_tokens(model, torch.from_numpy(crops.x[index]), list(layers))  # [B, L, D']
        tokens = rearrange(tokens.float().cpu().numpy(), "b (gh gw) d -> b gh gw d", gh=gh)
        out.append(tokens[keep[index]])  # [n_b, D']
    return np.concatenate(out)


def mean_spectrum_features(crops: Crops, keep: np.ndarray, patch: int) -> np.ndarray:
    """[n, C]: each kept patch's mean value of every band (physical units)."""
    means = reduce(crops.x, "b c (gh p1) (gw p2) -> b gh gw c", "mean", p1=patch, p2=patch)
    return means[keep]


def _classifier(C: float, cfg: ProbeConfig):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    c = cfg.classifier
    weight = None if c.class_weight == "none" else c.class_weight
    return make_pipeline(
        StandardScaler(), LogisticRegression(C=C, max_iter=c.max_iter, class_weight=weight, random_state=cfg.seed)
    )


def choose_C(train_x, train_y, tiles: np.ndarray, n_classes: int, cfg: ProbeConfig) -> tuple[float, list | None]:
    """(C, cross-validated macro-F1 of each candidate): the candidate of best mean macro-F1 over
    classifier.cv_folds folds of whole training tiles (class-stratified; neighbouring patches of a tile
    never sit on both sides), the smallest C on a tie. One candidate: it, without cross-validation."""
    candidates = cfg.classifier.C
    if len(candidates) == 1:
        return candidates[0], None
    from sklearn.metrics import f1_score
    from sklearn.model_selection import StratifiedGroupKFold

    folds = StratifiedGroupKFold(n_splits=cfg.classifier.cv_folds, shuffle=True, random_state=cfg.seed)
    splits = list(folds.split(train_x, train_y, tiles))
    labels = list(range(n_classes))
    means = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a fold's convergence warnings: the refit reports its own
        for C in candidates:
            f1 = [
                f1_score(
                    train_y[held],
                    _classifier(C, cfg).fit(train_x[fit], train_y[fit]).predict(train_x[held]),
                    labels=labels,
                    average="macro",
                    zero_division=0,
                )
                for fit, held in splits
            ]
            means.append(float(np.mean(f1)))
    best = min((C for C, m in zip(candidates, means) if m == max(means)))
    return best, means


def fit_and_score(train_x, train_y, test_x, test_y, classes: list[str], cfg: ProbeConfig, train_tiles=None) -> dict:
    """A logistic regression on standardised features, its C chosen on the training tiles (`choose_C`,
    `train_tiles` [n_train]: the tile of each training patch): test accuracy, macro-F1, per-class F1,
    confusion."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score

    if train_tiles is None:
        train_tiles = np.arange(len(train_y))
    C, cv = choose_C(train_x, train_y, train_tiles, len(classes), cfg)
    model = _classifier(C, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(train_x, train_y)
    pred = model.predict(test_x)
    return scores(test_y, pred, classes) | {
        "train_accuracy": float(accuracy_score(train_y, model.predict(train_x))),
        "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        "dim": int(train_x.shape[1]),
        "C": C,
        "cv_macro_f1": cv,  # per candidate of classifier.C (None: one candidate, no cross-validation)
        "predictions": pred,  # [n_test] (dropped from the JSON): the paired bootstrap resamples them
    }


def paired_intervals(truth, preds: dict, tiles: np.ndarray, resamples: int, seed: int, n_classes: int) -> dict:
    """The encoder's accuracy and macro-F1 minus each baseline's, with 95 % intervals from resampling the
    test tiles with replacement (patches of one tile move together: neighbouring patches are correlated).
    Macro-F1 averages over all `n_classes` classes, as `scores` does, also in a resample that lacks one."""
    from sklearn.metrics import accuracy_score, f1_score

    labels = list(range(n_classes))
    metric = {
        "accuracy": lambda t, p: accuracy_score(t, p),
        "macro_f1": lambda t, p: f1_score(t, p, labels=labels, average="macro", zero_division=0),
    }
    ids, members = np.unique(tiles, return_inverse=True)
    by_tile = [np.flatnonzero(members == k) for k in range(len(ids))]
    g = np.random.default_rng([seed, 17])
    draws = [np.concatenate([by_tile[k] for k in g.integers(len(ids), size=len(ids))]) for _ in range(resamples)]
    out = {}
    for other in ("random_encoder", "mean_spectrum"):
        diff = {}
        for name, f in metric.items():
            spread = [f(truth[d], preds["encoder"][d]) - f(truth[d], preds[other][d]) for d in draws]
            interval = [float(np.percentile(spread, 2.5)), float(np.percentile(spread, 97.5))] if draws else None
            diff[name] = {"difference": f(truth, preds["encoder"]) - f(truth, preds[other]), "interval95": interval}
        out[f"encoder_minus_{other}"] = diff
    return out | {"resamples": resamples, "test_tiles": int(len(ids))}


def scores(truth: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    labels = list(range(len(classes)))
    per_class = f1_score(truth, pred, labels=labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(truth, pred)),
        "macro_f1": float(f1_score(truth, pred, labels=labels, average="macro", zero_division=0)),
        "per_class_f1": {name: float(v) for name, v in zip(classes, per_class)},
        "confusion": confusion_matrix(truth, pred, labels=labels).tolist(),  # rows: true class, columns: predicted
    }


def random_encoder(trained: TrainedModel, seed: int | None = None) -> TrainedModel:
    """`trained` with its model at the initial weights of its run (`build_model` seeds them from the run's
    train.seed, or from `seed`): the same architecture, channels and statistics, nothing learned."""
    cfg = trained.config
    if seed is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
    return dataclasses.replace(trained, config=cfg, model=build_model(cfg).to(trained.device).eval())


def _check_counts(counts: dict, classes: list[str], cfg: ProbeConfig) -> None:
    need = cfg.labels.min_patches
    for part, where in (("train", "training (train and val) tiles"), ("test", "test tiles")):
        for name, n in zip(classes, counts[part]):
            if n < need:
                raise DataError(
                    f"class {name!r} has {n} labelled patch(es) in the {where}, fewer than labels.min_patches="
                    f"{need}; leave it out of labels.classes, or lower labels.purity or labels.min_patches"
                )


def probe(run, cfg: ProbeConfig, *, checkpoint=None, progress: bool = True) -> dict:
    """The probe of `run` (a run or export folder) on `cfg`'s task: metrics of its encoder and of the two
    baselines, with the counts, split and seeds that produced them."""
    start = time.perf_counter()
    say = (lambda text: print(f"probe: {text}", file=sys.stderr)) if progress else (lambda text: None)
    trained = load(run, checkpoint)
    rc = trained.config
    layers = resolve_layers(cfg.encoder.layers, rc.model.depth)
    stats = trained.stats or {}
    means = [stats["channels"][c]["mean"] for c in trained.channels] if "channels" in stats else None
    classes, patch = list(cfg.labels.classes), rc.model.patch_size
    task = load_landsat_qa(
        path=cfg.data.path,
        qa_path=cfg.data.qa_path,
        layout=cfg.data.qa_layout,
        classes=classes,
        purity=cfg.labels.purity,
        channels=trained.channels,
        means=means,
        img_size=tuple(rc.model.img_size),
        patch=patch,
        split=rc.data.split,
        seed=rc.data.seed,
        nodata=rc.data.nodata,
        nan=rc.data.nan,
    )
    labelled = {part: getattr(task, part).patch_count(len(classes)) for part in ("train", "test")}
    _check_counts(labelled, classes, cfg)
    keep = {
        "train": select_patches(task.train, len(classes), cfg.classifier.max_train_patches, cfg.seed),
        "test": select_patches(task.test, len(classes), cfg.classifier.max_test_patches, cfg.seed + 1),
    }
    y = {part: getattr(task, part).labels[keep[part]] for part in keep}
    say(f"{len(y['train'])} training and {len(y['test'])} test patches of {', '.join(classes)}")
    random_model = random_encoder(trained, cfg.random_encoder_seed)
    extract = {
        "encoder": lambda crops, k: encoder_features(trained, crops, k, cfg.batch_size, layers),
        "random_encoder": lambda crops, k: encoder_features(random_model, crops, k, cfg.batch_size, layers),
        "mean_spectrum": lambda crops, k: mean_spectrum_features(crops, k, patch),
    }
    train_tiles = np.nonzero(keep["train"])[0]  # the training crop (one per tile) of each training patch
    results = {}
    for name, features in extract.items():
        x = {part: features(getattr(task, part), keep[part]) for part in keep}
        results[name] = fit_and_score(x["train"], y["train"], x["test"], y["test"], classes, cfg, train_tiles)
        m = results[name]
        say(f"{LABELS[name]}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f} (C {m['C']:g})")
    majority = int(np.bincount(y["train"], minlength=len(classes)).argmax())
    preds = {name: results[name].pop("predictions") for name in results}
    tiles = np.nonzero(keep["test"])[0]  # the test crop (one per tile) of each scored patch
    paired = paired_intervals(y["test"], preds, tiles, cfg.bootstrap, cfg.seed, len(classes))
    import sklearn

    from dchag.bench.report import source_commit

    return {
        "task": cfg.task,
        "run": str(trained.source),
        "step": trained.step,
        "classes": classes,
        "encoder_layers": ["tokens" if k == 0 else "final" if k == -1 else f"block{k}" for k in layers],
        "metrics": results["encoder"],
        "baselines": {
            "mean_spectrum": results["mean_spectrum"],
            "random_encoder": results["random_encoder"],
            "majority_class": scores(y["test"], np.full_like(y["test"], majority), classes),
        },
        "paired": paired,
        "class_counts": {part: dict(zip(classes, np.bincount(y[part], minlength=len(classes)).tolist())) for part in y},
        "labelled_patches": {part: dict(zip(classes, labelled[part])) for part in labelled},
        "split": {
            "tiles": task.tiles,  # the classifier fits on the train and val tiles' patches
            "patches": {part: int(len(y[part])) for part in y},
            "crop": list(rc.model.img_size),
            "patch_size": patch,
            "fractions": rc.data.split,
            "scene": list(task.scene_size),
        },
        "seeds": {"split": rc.data.seed, "probe": cfg.seed, "random_encoder_init": random_model.config.train.seed},
        "config": dataclasses.asdict(cfg),
        "versions": {"torch": torch.__version__, "scikit_learn": sklearn.__version__},
        "code": source_commit(),  # the checkout's HEAD and whether tracked files differed from it
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 1),
    }


def format_probe_table(result: dict) -> str:
    """The probe's numbers as a Markdown table: one row per feature set, F1 per class."""
    classes = result["classes"]
    split = result["split"]
    head = (
        f"probe {result['task']}: {result['run']} (step {result['step']}); {split['patches']['train']} training "
        f"patches ({split['tiles'].get('train', 0) + split['tiles'].get('val', 0)} tiles), {split['patches']['test']} "
        f"test patches ({split['tiles']['test']} tiles) of {split['patch_size']} x {split['patch_size']} pixels"
    )
    head += f"; encoder layers {', '.join(result.get('encoder_layers', ['final']))}"
    cols = ["features", "dim", "C", "accuracy", "macro-F1", *(f"F1 {c}" for c in classes)]
    rows = [
        ("encoder", result["metrics"]),
        ("random_encoder", result["baselines"]["random_encoder"]),
        ("mean_spectrum", result["baselines"]["mean_spectrum"]),
        ("majority", result["baselines"]["majority_class"]),
    ]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in rows:
        C = f"{m['C']:g}" if "C" in m else "-"
        cells = [LABELS[name], str(m.get("dim", "-")), C, f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}"]
        cells += [f"{m['per_class_f1'][c]:.4f}" for c in classes]
        lines.append("| " + " | ".join(cells) + " |")
    paired = result["paired"]
    lines.append("")
    for other in ("random_encoder", "mean_spectrum"):
        d = paired[f"encoder_minus_{other}"]["macro_f1"]
        interval = d["interval95"]
        spread = f" (95 % interval {interval[0]:+.4f} to {interval[1]:+.4f}" if interval else " (no interval"
        lines.append(
            f"encoder - {LABELS[other]}: macro-F1 {d['difference']:+.4f}{spread}, {paired['resamples']} resamples "
            f"of the {paired['test_tiles']} test tiles)"
        )
    return "\n".join(lines)
