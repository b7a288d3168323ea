"""Builders from config sections to the pieces ``mlcore.train.train`` needs.

``train_classifier`` is the one entry point that trains a model (a baseline, a CPSD teacher on a
label subset, or anything else) from config: dataset, loaders, model, loss, adaptive controller.
With ``zsl.unseen_classes`` set it trains on the seen classes only, whatever the caller asks
(``mlcore.zsl`` describes the protocol).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mlcore.config import DataConfig, ExperimentConfig, LossConfig, TrainConfig
from mlcore.configlib import ConfigError
from mlcore.data.dataset import MultiLabelDataset, build_transform
from mlcore.data.embeddings import dataset_class_embeddings
from mlcore.data.manifest import Manifest, ManifestError
from mlcore.data.sampler import ClassAwareSampler
from mlcore.data.synth import ensure_generated
from mlcore.losses import build_asymmetry_controller, build_loss
from mlcore.models import build_model_from_config
from mlcore.train import MetricsCallback, Objective, Supervised, TrainResult, train
from mlcore.zsl import RandomQueryTargets, zero_shot_split


def resolve_dataset(cfg: DataConfig) -> Path:
    """The dataset directory: ``data.root``, or the generated ``data.synth`` (cached)."""
    if cfg.root is not None:
        return Path(cfg.root).expanduser()
    assert cfg.synth is not None  # DataConfig guarantees exactly one
    return ensure_generated(cfg.synth, cfg.cache_dir)


def build_loaders(
    manifest: Manifest,
    data: DataConfig,
    train_cfg: TrainConfig,
    *,
    class_subset: Sequence[int] | None = None,
    return_index: bool = False,
    require_label: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders over ``class_subset`` (None: all classes).

    ``require_label`` leaves out images without a label among those classes (zero-shot
    training on the seen classes).
    """
    train_set = MultiLabelDataset(
        manifest,
        data.train_split,
        build_transform(data, train=True),
        class_subset=class_subset,
        return_index=return_index,
        require_label=require_label,
    )
    val_set = MultiLabelDataset(
        manifest,
        data.val_split,
        build_transform(data, train=False),
        class_subset=class_subset,
        require_label=require_label,
    )
    sampler = None
    if data.class_aware_sampling:
        sampler = ClassAwareSampler(
            train_set.label_lists, manifest.num_classes, seed=train_cfg.seed
        )
    pin = torch.cuda.is_available()
    train_loader = DataLoader(
        train_set,
        batch_size=train_cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=data.num_workers,
        pin_memory=pin,
        drop_last=len(train_set) > train_cfg.batch_size,
        persistent_workers=data.num_workers > 0,
    )
    val_loader = DataLoader(
        val_set,
        batch_size=train_cfg.eval_batch_size or 2 * train_cfg.batch_size,
        shuffle=False,
        num_workers=data.num_workers,
        pin_memory=pin,
    )
    return train_loader, val_loader


def build_criterion(loss_cfg: LossConfig, manifest: Manifest, data: DataConfig, class_subset):
    """Loss module (DB gets the training frequencies of the classes it sees)."""
    class_freq = train_size = None
    if loss_cfg.name == "db":
        class_freq = manifest.positives_per_class(data.train_split)
        if class_subset is not None:
            class_freq = class_freq[list(class_subset)]
        train_size = int(manifest.split_rows(data.train_split).size)
    return build_loss(loss_cfg, class_freq=class_freq, train_size=train_size)


def train_classifier(
    cfg: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    class_subset: Sequence[int] | None = None,
    epochs: int | None = None,
    make_objective: Callable[[torch.nn.Module], Objective] | None = None,
    return_index: bool = False,
    on_epoch: MetricsCallback | None = None,
    on_step: MetricsCallback | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train one model from config, on all classes or on ``class_subset``.

    Args:
        cfg: Data, model, loss and training sections.
        out_dir: Checkpoint directory (resumes from ``last.pt`` there).
        class_subset: Class indices the model outputs, in this order (CPSD teachers).
        epochs: Overrides ``cfg.train.epochs`` (teachers use ``cpsd.teacher_epochs``).
        make_objective: Wraps the configured loss into another objective (the CPSD student's
            distillation); the adaptive controller still drives that loss.
        return_index: Training batches carry the row index (cached-teacher lookup).
        on_epoch: Per-epoch metrics callback.
        on_step: Step metrics callback (adaptive asymmetry).
        log: Progress lines.
    """
    train_cfg = cfg.train
    if epochs is not None and epochs != train_cfg.epochs:
        train_cfg = dataclasses.replace(train_cfg, epochs=epochs)
    dataset_dir = resolve_dataset(cfg.data)
    manifest = Manifest.load(dataset_dir, with_bytes=True)
    if cfg.zsl.enabled:
        class_subset = _seen_subset(cfg, manifest, class_subset)
    train_loader, val_loader = build_loaders(
        manifest,
        cfg.data,
        train_cfg,
        class_subset=class_subset,
        return_index=return_index,
        require_label=cfg.zsl.enabled,
    )
    classes = list(class_subset) if class_subset is not None else range(manifest.num_classes)
    embeddings = None
    decoder = cfg.model.ml_decoder
    word_queries = cfg.model.head == "ml_decoder" and decoder.queries == "word"
    if word_queries:
        names = [manifest.class_names[c] for c in classes]
        embeddings = dataset_class_embeddings(cfg.data, dataset_dir, names)
    torch.manual_seed(train_cfg.seed)  # identical initial weights for identical configs
    model = build_model_from_config(cfg.model, len(classes), embeddings)
    loss = build_criterion(cfg.loss, manifest, cfg.data, class_subset)
    controller = build_asymmetry_controller(cfg.loss, loss)
    objective = make_objective(loss) if make_objective is not None else Supervised(loss)
    if word_queries and decoder.random_queries > 0:
        objective = RandomQueryTargets(objective)
    return train(
        model,
        train_loader,
        val_loader,
        objective,
        train_cfg,
        out_dir,
        observer=controller,
        observe_every=cfg.loss.adaptive.log_every,
        on_epoch=on_epoch,
        on_step=on_step,
        log=log,
    )


def _seen_subset(
    cfg: ExperimentConfig, manifest: Manifest, class_subset: Sequence[int] | None
) -> list[int]:
    """The classes a zero-shot run may train on: the seen ones (or the caller's, if all seen)."""
    split = zero_shot_split(cfg.zsl, manifest.info)
    if manifest.split_rows(cfg.zsl.eval_split).size == 0:
        raise ManifestError(
            f"{manifest.root}: zsl.eval_split {cfg.zsl.eval_split!r} has no rows "
            f"(splits: {manifest.splits()})"
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
