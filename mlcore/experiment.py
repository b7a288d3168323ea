"""Builders from config sections to the pieces ``mlcore.train.train`` needs.

``train_classifier`` is the one entry point that trains a model (a baseline, a CPSD teacher on a
label subset, an orderless RNN, or anything else) from config: dataset, loaders, model, loss,
adaptive controller, and for ``model.head: rnn`` its forward and evaluator.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from mlcore.config import DataConfig, ExperimentConfig, LossConfig, TrainConfig
from mlcore.data.dataset import MultiLabelDataset, build_transform
from mlcore.data.manifest import Manifest
from mlcore.data.sampler import ClassAwareSampler
from mlcore.data.synth import ensure_generated
from mlcore.losses import build_asymmetry_controller, build_loss
from mlcore.losses.orderless import TeacherForcing
from mlcore.models import OrderlessRNN, build_model_from_config
from mlcore.orderless import check_label_counts, evaluate_sequences
from mlcore.train import (
    Evaluator,
    Forward,
    MetricsCallback,
    Objective,
    Supervised,
    TrainResult,
    evaluate_scores,
    forward_images,
    train,
)


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
) -> tuple[DataLoader, DataLoader]:
    """Training and validation loaders over ``class_subset`` (None: all classes)."""
    train_set = MultiLabelDataset(
        manifest,
        data.train_split,
        build_transform(data, train=True),
        class_subset=class_subset,
        return_index=return_index,
    )
    val_set = MultiLabelDataset(
        manifest, data.val_split, build_transform(data, train=False), class_subset=class_subset
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
    """Loss module (DB and orderless get the training frequencies of the classes they see)."""
    class_freq = train_size = class_names = None
    if loss_cfg.name in ("db", "orderless"):
        class_freq = manifest.positives_per_class(data.train_split)
        if class_subset is not None:
            class_freq = class_freq[list(class_subset)]
        train_size = int(manifest.split_rows(data.train_split).size)
        class_names = manifest.class_names
    return build_loss(
        loss_cfg, class_freq=class_freq, train_size=train_size, class_names=class_names
    )


def sequence_training(
    cfg: ExperimentConfig, manifest: Manifest, model: OrderlessRNN, loss: torch.nn.Module
) -> tuple[Forward, Evaluator]:
    """Prepare the orderless RNN (PLA): label counts checked, stage-1 encoder loaded; returns
    its training forward and its validation (decoded label sets, sequence metrics).

    Raises:
        ManifestError: An image has more labels than ``model.rnn.max_steps``.
    """
    check_label_counts(manifest, [cfg.data.train_split, cfg.data.val_split], model.max_steps)
    if cfg.model.encoder_checkpoint is not None:
        model.load_encoder(cfg.model.encoder_checkpoint)
    forward = TeacherForcing(loss) if cfg.loss.teacher_forcing else forward_images
    return forward, evaluate_sequences


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
    manifest = Manifest.load(resolve_dataset(cfg.data), with_bytes=True)
    train_loader, val_loader = build_loaders(
        manifest, cfg.data, train_cfg, class_subset=class_subset, return_index=return_index
    )
    num_outputs = len(class_subset) if class_subset is not None else manifest.num_classes
    torch.manual_seed(train_cfg.seed)  # identical initial weights for identical configs
    model = build_model_from_config(cfg.model, num_outputs)
    loss = build_criterion(cfg.loss, manifest, cfg.data, class_subset)
    controller = build_asymmetry_controller(cfg.loss, loss)
    forward: Forward = forward_images
    evaluate: Evaluator = evaluate_scores
    if isinstance(model, OrderlessRNN):
        if class_subset is not None or make_objective is not None:
            raise ValueError("the orderless RNN trains on all classes, without CPSD teachers")
        forward, evaluate = sequence_training(cfg, manifest, model, loss)
    return train(
        model,
        train_loader,
        val_loader,
        make_objective(loss) if make_objective is not None else Supervised(loss),
        train_cfg,
        out_dir,
        observer=controller,
        observe_every=cfg.loss.adaptive.log_every,
        on_epoch=on_epoch,
        on_step=on_step,
        forward=forward,
        evaluate=evaluate,
        log=log,
    )
