"""Builders from config sections to the pieces ``mlcore.train.train`` needs.

``train_classifier`` is the one entry point that trains a model (a baseline, a CPSD teacher on a
label subset, or anything else) from config: dataset, loaders, model, loss, adaptive controller.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from mlcore.config import DataConfig, ExperimentConfig, LossConfig, TrainConfig
from mlcore.configlib import ConfigError
from mlcore.data.dataset import (
    DeviceDecodedLoader,
    MultiLabelDataset,
    SeededSampler,
    build_transform,
)
from mlcore.data.manifest import Manifest, is_uri
from mlcore.data.sampler import ClassAwareSampler
from mlcore.data.synth import ensure_generated
from mlcore.losses import build_asymmetry_controller, build_loss
from mlcore.models import build_model_from_config
from mlcore.train import (
    LOCAL,
    MetricsCallback,
    Objective,
    Placement,
    Supervised,
    TrainResult,
    resolve_device,
    train,
)

MAX_AUTO_WORKERS = 16


def resolve_dataset(cfg: DataConfig) -> str | Path:
    """The dataset directory (a path or a URI): ``data.root``, or the generated ``data.synth``."""
    if cfg.root is not None:
        return cfg.root if is_uri(cfg.root) else Path(cfg.root).expanduser()
    assert cfg.synth is not None  # DataConfig guarantees exactly one
    return ensure_generated(cfg.synth, cfg.cache_dir)


def load_manifest(cfg: DataConfig, *, with_bytes: bool = True) -> Manifest:
    """The configured dataset's manifest (a remote one through the local cache if enabled)."""
    return Manifest.load(resolve_dataset(cfg), with_bytes=with_bytes, cache_dir=_remote_cache(cfg))


def _remote_cache(cfg: DataConfig) -> str | None:
    return cfg.cache_dir if cfg.cache_remote else None


def loader_workers(data: DataConfig, cpus: float | None) -> int:
    """``data.num_workers`` with ``auto`` resolved: one less than ``cpus`` (None: this machine's
    CPUs), at most :data:`MAX_AUTO_WORKERS`; the training process itself needs one."""
    if data.num_workers != "auto":
        return data.num_workers
    available = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(0, min(MAX_AUTO_WORKERS, int(available) - 1))


def split_dataset(
    manifest: Manifest,
    data: DataConfig,
    split: str,
    *,
    train: bool,
    class_subset: Sequence[int] | None = None,
    return_index: bool = False,
    encoded: bool = False,
) -> MultiLabelDataset:
    """One split with the configured transform, decoder and image cache."""
    return MultiLabelDataset(
        manifest,
        split,
        build_transform(data, train=train),
        class_subset=class_subset,
        return_index=return_index,
        decoder=data.decoder,
        cache_dir=_remote_cache(data),
        encoded=encoded,
    )


def build_loaders(
    manifest: Manifest,
    data: DataConfig,
    train_cfg: TrainConfig,
    *,
    class_subset: Sequence[int] | None = None,
    return_index: bool = False,
    placement: Placement = LOCAL,
) -> tuple[DataLoader | DeviceDecodedLoader, DataLoader | DeviceDecodedLoader]:
    """Training and validation loaders over ``class_subset`` (None: all classes).

    The training loader yields this rank's share of each global batch of
    ``train_cfg.batch_size``: every rank draws the same global order for the epoch (a seeded
    permutation, or the class-aware sequence) and takes positions ``rank, rank + world, ...``.
    So one process, or ``world`` ranks together, see the same samples in the same global
    batches, with the same augmentation (seeded per sample, see ``SeededSampler``). Every rank
    validates on the whole validation split. With ``data.decode_on: device`` both loaders
    yield encoded images that :class:`DeviceDecodedLoader` decodes on the training device.

    Raises:
        ConfigError: ``train.batch_size`` is not a multiple of the number of ranks.
    """
    world, rank = placement.world_size, placement.rank
    if train_cfg.batch_size % world:
        raise ConfigError(
            f"train.batch_size = {train_cfg.batch_size} must be a multiple of the {world} "
            "data-parallel workers (each takes an equal share of every batch)"
        )
    on_device = data.decode_on == "device"
    train_set = split_dataset(
        manifest,
        data,
        data.train_split,
        train=True,
        class_subset=class_subset,
        return_index=return_index,
        encoded=on_device,
    )
    val_set = split_dataset(
        manifest, data, data.val_split, train=False, class_subset=class_subset, encoded=on_device
    )
    if data.class_aware_sampling:
        order: ClassAwareSampler | DistributedSampler = ClassAwareSampler(
            train_set.label_csr,
            train_set.num_classes,
            seed=train_cfg.seed,
            num_replicas=world,
            rank=rank,
        )
    else:
        order = DistributedSampler(
            train_set, num_replicas=world, rank=rank, shuffle=True, seed=train_cfg.seed
        )
    sampler = SeededSampler(order, train_cfg.seed, rank=rank, world_size=world)
    workers = loader_workers(data, placement.cpus)
    pin = torch.cuda.is_available()
    batch_size = train_cfg.batch_size // world
    train_loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=train_set.collate_fn,
        num_workers=workers,
        pin_memory=pin,
        drop_last=len(sampler) > batch_size,
        persistent_workers=workers > 0,
    )
    val_loader = DataLoader(
        val_set,
        batch_size=train_cfg.eval_batch_size or 2 * train_cfg.batch_size,
        shuffle=False,
        collate_fn=val_set.collate_fn,
        num_workers=workers,
        pin_memory=pin,
    )
    if on_device:
        device = resolve_device(train_cfg.device)
        return (
            DeviceDecodedLoader(train_loader, train_set.transform, device, data.decoder),
            DeviceDecodedLoader(val_loader, val_set.transform, device, data.decoder),
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
    placement: Placement = LOCAL,
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
        placement: This process's rank and CPUs (data-parallel training, loader workers).
        log: Progress lines.
    """
    train_cfg = cfg.train
    if epochs is not None and epochs != train_cfg.epochs:
        train_cfg = dataclasses.replace(train_cfg, epochs=epochs)
    manifest = load_manifest(cfg.data)
    train_loader, val_loader = build_loaders(
        manifest,
        cfg.data,
        train_cfg,
        class_subset=class_subset,
        return_index=return_index,
        placement=placement,
    )
    num_outputs = len(class_subset) if class_subset is not None else manifest.num_classes
    torch.manual_seed(train_cfg.seed)  # identical initial weights for identical configs
    model = build_model_from_config(cfg.model, num_outputs)
    loss = build_criterion(cfg.loss, manifest, cfg.data, class_subset)
    controller = build_asymmetry_controller(cfg.loss, loss)
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
        placement=placement,
        log=log,
    )
