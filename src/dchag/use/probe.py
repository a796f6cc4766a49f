"""`dchag probe`: how much of a labelled task a frozen encoder's features make linearly separable.

Per-patch features, a linear classifier (scikit-learn's LogisticRegression on standardised features,
fitted on the training tiles' patches) and its accuracy and macro-F1 on the test tiles' patches, for
three feature sets on the same patches:

- `encoder`: the run's encoder token of each patch (`TrainedModel.embed(x, pool="none")`, [B, L, D]:
  the patch's own token, so a label and its feature cover the same pixels);
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

from dchag.data.errors import DataError
from dchag.data.landsat_qa import Crops, load_landsat_qa
from dchag.model import build_model
from dchag.use.probe_config import ProbeConfig
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


def encoder_features(model: TrainedModel, crops: Crops, keep: np.ndarray, batch_size: int) -> np.ndarray:
    """[n, D]: the encoder token of every kept patch, crop by crop in row-major patch order."""
    gh = keep.shape[1]
    used = np.flatnonzero(keep.any(axis=(1, 2)))  # crops with at least one kept patch
    out = []
    for start in range(0, len(used), batch_size):
        index = used[start : start + batch_size]
        tokens = model.embed(torch.from_numpy(crops.x[index]), pool="none")  # [B, L, D]
        tokens = rearrange(tokens.float().cpu().numpy(), "b (gh gw) d -> b gh gw d", gh=gh)
        out.append(tokens[keep[index]])  # [n_b, D]
    return np.concatenate(out)


def mean_spectrum_features(crops: Crops, keep: np.ndarray, patch: int) -> np.ndarray:
    """[n, C]: each kept patch's mean value of every band (physical units)."""
    means = reduce(crops.x, "b c (gh p1) (gw p2) -> b gh gw c", "mean", p1=patch, p2=patch)
    return means[keep]


def fit_and_score(train_x, train_y, test_x, test_y, classes: list[str], cfg: ProbeConfig) -> dict:
    """A logistic regression on standardised features: test accuracy, macro-F1, per-class F1, confusion."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    c = cfg.classifier
    weight = None if c.class_weight == "none" else c.class_weight
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=c.C, max_iter=c.max_iter, class_weight=weight, random_state=cfg.seed)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(train_x, train_y)
    pred = model.predict(test_x)
    return scores(test_y, pred, classes) | {
        "train_accuracy": float(accuracy_score(train_y, model.predict(train_x))),
        "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
        "dim": int(train_x.shape[1]),
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


def random_encoder(trained: TrainedModel) -> TrainedModel:
    """`trained` with its model at the initial weights of its run (`build_model` seeds them from the run's
    train.seed): the same architecture, channels and statistics, nothing learned."""
    return dataclasses.replace(trained, model=build_model(trained.config).to(trained.device).eval())


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
    random_model = random_encoder(trained)
    extract = {
        "encoder": lambda crops, k: encoder_features(trained, crops, k, cfg.batch_size),
        "random_encoder": lambda crops, k: encoder_features(random_model, crops, k, cfg.batch_size),
        "mean_spectrum": lambda crops, k: mean_spectrum_features(crops, k, patch),
    }
    results = {}
    for name, features in extract.items():
        x = {part: features(getattr(task, part), keep[part]) for part in keep}
        results[name] = fit_and_score(x["train"], y["train"], x["test"], y["test"], classes, cfg)
        say(f"{LABELS[name]}: accuracy {results[name]['accuracy']:.4f}, macro-F1 {results[name]['macro_f1']:.4f}")
    majority = int(np.bincount(y["train"], minlength=len(classes)).argmax())
    preds = {name: results[name].pop("predictions") for name in results}
    tiles = np.nonzero(keep["test"])[0]  # the test crop (one per tile) of each scored patch
    paired = paired_intervals(y["test"], preds, tiles, cfg.bootstrap, cfg.seed, len(classes))
    import sklearn

    return {
        "task": cfg.task,
        "run": str(trained.source),
        "step": trained.step,
        "classes": classes,
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
        "seeds": {"split": rc.data.seed, "probe": cfg.seed, "random_encoder_init": rc.train.seed},
        "config": dataclasses.asdict(cfg),
        "versions": {"torch": torch.__version__, "scikit_learn": sklearn.__version__},
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
    cols = ["features", "dim", "accuracy", "macro-F1", *(f"F1 {c}" for c in classes)]
    rows = [
        ("encoder", result["metrics"]),
        ("random_encoder", result["baselines"]["random_encoder"]),
        ("mean_spectrum", result["baselines"]["mean_spectrum"]),
        ("majority", result["baselines"]["majority_class"]),
    ]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in rows:
        cells = [LABELS[name], str(m.get("dim", "-")), f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}"]
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
