"""Builders from config sections to the pieces ``mlcore.train.train`` needs.

``train_classifier`` is the one entry point that trains a model (a baseline, a CPSD teacher on a
label subset, an orderless RNN, or anything else) from config: dataset, loaders, model, loss,
adaptive controller, and its head's family (``mlcore.models.family``) adds its training
forward, objective and evaluator. Every model it
trains leaves a model bundle (``mlcore.bundle``) next to its ``best.pt``. With
``zsl.unseen_classes`` set it trains on the seen classes only, whatever the caller asks
(``mlcore.zsl`` describes the protocol).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mlcore.bundle import (
    BUNDLE_FILE,
    ModelBundle,
    Preprocessing,
    ValThresholds,
    class_embeddings_of,
)
from mlcore.config import DataConfig, ExperimentConfig, LossConfig
from mlcore.configlib import ConfigError
from mlcore.data.embeddings import DATASET_FILE, dataset_class_embeddings
from mlcore.data.loading import OpenDataset, build_loaders
from mlcore.data.manifest import Manifest, ManifestError, is_uri
from mlcore.evaluation import choose_thresholds
from mlcore.fingerprint import config_content, file_digest, split_digest, stable_hash
from mlcore.losses import LossInputs, build_loss, build_observer, loss_spec
from mlcore.models import build_model_from_config, family_of
from mlcore.train import (
    LOCAL,
    MetricsCallback,
    Objective,
    Placement,
    Supervised,
    TrainResult,
    load_checkpoint,
    train,
)
from mlcore.zsl import zero_shot_split


def training_fingerprint(
    cfg: ExperimentConfig,
    dataset: OpenDataset,
    *,
    class_subset: Sequence[int] | None = None,
    extra: Sequence[object] = (),
) -> str:
    """Identity of what ``train_classifier(cfg, dataset, class_subset=...)`` computes.

    ``extra`` adds what the caller's objective depends on beyond the config sections (the
    student's distillation settings and its teachers' fingerprints). A zero-shot run adds its
    held-out classes: they change the classes and images it trains on. Word queries reading the
    dataset's own embedding file add that file's content (``data.class_embeddings`` counts by
    content already).
    """
    data, root = cfg.data, dataset.root
    if cfg.zsl.enabled:
        extra = [*extra, ["zero_shot", list(zero_shot_split(cfg.zsl, dataset.info).unseen)]]
    word = family_of(cfg.model.head).class_embeddings(cfg.model)
    if word and data.class_embeddings is None and not is_uri(root):
        own = Path(root) / DATASET_FILE
        if own.is_file():
            extra = [*extra, ["embeddings", file_digest(own, data.cache_dir)]]
    return stable_hash(
        "training",
        config_content(data, data.cache_dir),
        config_content(cfg.model, data.cache_dir),
        config_content(cfg.loss),
        config_content(cfg.train),
        split_digest(root, [data.train_split, data.val_split], data.cache_dir),
        None if class_subset is None else [int(c) for c in class_subset],
        list(extra),
    )


def build_criterion(loss_cfg: LossConfig, manifest: Manifest, data: DataConfig, class_subset):
    """Loss module; a loss that needs class statistics gets those of the classes it sees."""
    inputs = LossInputs()
    if loss_spec(loss_cfg.name).class_statistics:
        class_freq = manifest.positives_per_class(data.train_split)
        classes = list(class_subset) if class_subset is not None else list(range(len(class_freq)))
        inputs = LossInputs(
            class_freq=class_freq[classes],
            train_size=int(manifest.split_rows(data.train_split).size),
            class_names=[manifest.class_names[c] for c in classes],
        )
    return build_loss(loss_cfg, inputs)


def train_classifier(
    cfg: ExperimentConfig,
    dataset: OpenDataset,
    out_dir: str | os.PathLike,
    *,
    class_subset: Sequence[int] | None = None,
    make_objective: Callable[[torch.nn.Module], Objective] | None = None,
    init_weights: str | os.PathLike | None = None,
    fingerprint_extra: Sequence[object] = (),
    return_index: bool = False,
    on_epoch: MetricsCallback | None = None,
    on_step: MetricsCallback | None = None,
    placement: Placement = LOCAL,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train one model from config, on all classes or on ``class_subset``.

    Args:
        cfg: Data, model, loss and training sections (callers that train with other epochs,
            seed or lr, such as CPSD teachers and students, pass a config with ``train``
            replaced, so the fingerprint covers what actually ran).
        out_dir: Checkpoint directory; resumes from ``last.pt`` there when its fingerprint
            matches, and refuses a directory holding another run's checkpoint.
        class_subset: Class indices the model outputs, in this order (CPSD teachers).
        make_objective: Wraps the configured loss into another objective (the CPSD student's
            distillation); the adaptive controller still drives that loss.
        init_weights: A checkpoint whose ``model`` weights initialise the model (the CPSD
            student started from the baseline); part of the caller's ``fingerprint_extra``.
        fingerprint_extra: What the objective depends on beyond the config sections.
        return_index: Training batches carry the row index (cached-teacher lookup).
        on_epoch: Per-epoch metrics callback.
        on_step: Step metrics callback (adaptive asymmetry).
        placement: This process's rank and CPUs (data-parallel training, loader workers).
        log: Progress lines.

    Raises:
        ValueError: ``dataset`` was opened from another data section than ``cfg.data``.
    """
    if dataset.data != cfg.data:
        raise ValueError("train_classifier: the dataset was opened from another data section")
    train_cfg = cfg.train
    manifest = dataset.manifest
    fingerprint = training_fingerprint(
        cfg, dataset, class_subset=class_subset, extra=fingerprint_extra
    )
    if cfg.zsl.enabled:
        class_subset = seen_classes(cfg, manifest, class_subset)
    train_loader, val_loader = build_loaders(
        dataset,
        train_cfg,
        class_subset=class_subset,
        return_index=return_index,
        placement=placement,
        require_label=cfg.zsl.enabled,
    )
    classes = list(class_subset) if class_subset is not None else range(manifest.num_classes)
    family = family_of(cfg.model.head)
    if not family.distills and (class_subset is not None or make_objective is not None):
        raise ValueError(f"a {family.name} head trains on all classes, without CPSD teachers")
    embeddings = None
    if family.class_embeddings(cfg.model):
        names = [manifest.class_names[c] for c in classes]
        embeddings = dataset_class_embeddings(cfg.data, dataset.root, names)
    torch.manual_seed(train_cfg.seed)  # identical initial weights for identical configs
    model = build_model_from_config(cfg.model, len(classes), embeddings)
    if init_weights is not None:
        model.load_state_dict(load_checkpoint(init_weights)["model"])
    loss = build_criterion(cfg.loss, manifest, cfg.data, class_subset)
    observer, observe_every = build_observer(
        cfg.loss,
        loss,
        batch_size=train_cfg.batch_size,
        lr_warmup_steps=round(train_cfg.pct_start * train_cfg.epochs * len(train_loader)),
    )
    objective = make_objective(loss) if make_objective is not None else Supervised(loss)
    forward, objective = family.training(cfg, manifest, model, loss, objective)
    result = train(
        model,
        train_loader,
        val_loader,
        objective,
        train_cfg,
        out_dir,
        observer=observer,
        observe_every=observe_every,
        on_epoch=on_epoch,
        on_step=on_step,
        fingerprint=fingerprint,
        placement=placement,
        forward=forward,
        evaluate=family.evaluate,
        log=log,
    )
    if placement.rank == 0:  # every rank holds the same weights; one writes them
        write_training_bundle(cfg, manifest, model, result, class_subset, train_loader)
    return result


def write_training_bundle(
    cfg: ExperimentConfig,
    manifest: Manifest,
    model: torch.nn.Module,
    result: TrainResult,
    class_subset: Sequence[int] | None,
    train_loader: DataLoader,
) -> Path:
    """``model.bundle.pt`` beside ``best.pt``: the selected weights and all that describes them.

    The metadata records the training positives per output class, which ``cpsd evaluate``
    buckets into head/medium/tail, and the dataset, which it evaluates on by default. The
    thresholds are chosen on the selected weights' validation scores (``cpsd predict``'s
    default rule).
    """
    names = manifest.class_names
    subset = list(class_subset) if class_subset is not None else list(range(len(names)))
    train_set = train_loader.dataset
    positives = np.bincount(train_set.label_csr[1], minlength=train_set.num_classes).tolist()
    metadata = {
        "best_epoch": result.best_epoch,
        # JSON has no NaN: metrics that were undefined in an epoch are left out.
        "best_epoch_metrics": {
            k: float(v)
            for k, v in result.best_metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)
        },
        "train_positives": positives,
        "train_images": len(train_loader.dataset),
        "dataset": {
            "name": manifest.info.name,
            "root": manifest.root if is_uri(manifest.root) else str(Path(manifest.root).resolve()),
            "class_indices": subset,
            "train_split": cfg.data.train_split,
            "val_split": cfg.data.val_split,
        },
    }
    thresholds = None
    # Thresholds need validation scores, one column per output class, with a positive; a
    # head whose evaluator scores other columns gets none rather than a failed training.
    scores = result.val_scores
    if scores is not None and scores.shape[1] == len(subset) and result.val_targets.any():
        single, per_class = choose_thresholds(scores, result.val_targets)
        thresholds = ValThresholds(
            per_class=tuple(float(t) for t in per_class), single=single, split=cfg.data.val_split
        )
    bundle = ModelBundle(
        model=cfg.model,
        class_names=tuple(names[c] for c in subset),
        preprocessing=Preprocessing(image_size=cfg.data.image_size),
        state_dict=load_checkpoint(result.best_checkpoint)["model"],
        class_embeddings=class_embeddings_of(model),
        thresholds=thresholds,
        metadata=metadata,
    )
    return bundle.save(result.out_dir / BUNDLE_FILE)


def seen_classes(
    cfg: ExperimentConfig, manifest: Manifest, class_subset: Sequence[int] | None = None
) -> list[int]:
    """The classes a zero-shot run may train on: the seen ones (or the caller's, if all seen).

    Raises:
        ConfigError: ``class_subset`` holds an unseen class.
        ManifestError: The dataset has no ``data.test_split`` to evaluate on.
    """
    split = zero_shot_split(cfg.zsl, manifest.info)
    if manifest.split_rows(cfg.data.test_split).size == 0:
        raise ManifestError(
            f"{manifest.root}: zero-shot evaluation needs data.test_split "
            f"{cfg.data.test_split!r}, which has no rows (splits: {manifest.splits()})"
        )
    if class_subset is None:
        return list(split.seen)
    unseen = sorted(set(class_subset) & set(split.unseen))
    if unseen:
        raise ConfigError(
            "zero-shot training must not see unseen classes, but the class subset holds "
            f"{[manifest.class_names[c] for c in unseen]}"
        )
    return list(class_subset)
