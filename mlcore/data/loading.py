"""Opening a dataset once per stage: where it is, its manifest, its splits and their loaders.

:func:`open_dataset` resolves ``cfg.data`` (``data.root``, or the generated ``data.synth``), reads
the manifest's metadata and rows (a remote manifest through the local cache when
``data.cache_remote``) and returns an :class:`OpenDataset`. Everything downstream (training,
teachers, the student, held-out scoring, fingerprints, zero-shot evaluation) takes that handle
and never goes back to ``cfg.data`` to find the dataset again. ``split_dataset``,
``build_loaders`` and ``eval_loader`` turn a split of it into the torch datasets and loaders
training and evaluation read.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from mlcore.config import DataConfig, TrainConfig
from mlcore.configlib import ConfigError
from mlcore.data.dataset import (
    DeviceDecodedLoader,
    MultiLabelDataset,
    SeededSampler,
    build_transform,
)
from mlcore.data.manifest import Manifest, ManifestInfo, is_uri
from mlcore.data.sampler import ClassAwareSampler
from mlcore.data.synth import ensure_generated
from mlcore.train import LOCAL, Placement, resolve_device

MAX_AUTO_WORKERS = 16


def resolve_dataset(cfg: DataConfig) -> str | Path:
    """The dataset directory (a path or a URI): ``data.root``, or the generated ``data.synth``."""
    if cfg.root is not None:
        return cfg.root if is_uri(cfg.root) else Path(cfg.root).expanduser()
    assert cfg.synth is not None  # DataConfig guarantees exactly one
    return ensure_generated(cfg.synth, cfg.cache_dir)


def remote_cache(data: DataConfig) -> str | None:
    """Where remote manifests and images are cached locally (None: read them in place)."""
    return data.cache_dir if data.cache_remote else None


@dataclass(frozen=True)
class OpenDataset:
    """A dataset opened for one stage: its location, metadata and rows, read once.

    Built by :func:`open_dataset`. It crosses to another process (a Ray Train worker) by opening
    the dataset again there, never by shipping its rows.

    Attributes:
        data: The config section it was opened from: splits, transforms, decoder and caches.
        root: The dataset directory, a local path or a URI (for ``data.synth``: the generated
            one).
        manifest: Its rows and metadata; without the embedded image bytes unless
            ``with_bytes``.
        with_bytes: Whether ``manifest`` holds the image bytes, which the loaders need.
    """

    data: DataConfig
    root: str | Path
    manifest: Manifest
    with_bytes: bool = True

    @property
    def info(self) -> ManifestInfo:
        return self.manifest.info

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.manifest.class_names

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    def __reduce__(self):
        return (open_dataset, (self.data, self.with_bytes))


def open_dataset(data: DataConfig, with_bytes: bool = True) -> OpenDataset:
    """Resolve ``data`` (generating ``data.synth`` on first use) and read its manifest.

    ``with_bytes=False`` leaves the embedded image bytes out: enough for fingerprints, label
    statistics and split names, and much smaller for a dataset that embeds its images.

    Raises:
        ManifestError: The directory holds no readable manifest.
    """
    root = resolve_dataset(data)
    manifest = Manifest.load(root, with_bytes=with_bytes, cache_dir=remote_cache(data))
    return OpenDataset(data, root, manifest, with_bytes)


def loader_workers(data: DataConfig, cpus: float | None) -> int:
    """``data.num_workers`` with ``auto`` resolved: one less than ``cpus`` (None: this machine's
    CPUs), at most :data:`MAX_AUTO_WORKERS`; the training process itself needs one."""
    if data.num_workers != "auto":
        return data.num_workers
    available = cpus if cpus is not None else (os.cpu_count() or 1)
    return max(0, min(MAX_AUTO_WORKERS, int(available) - 1))


def split_dataset(
    dataset: OpenDataset,
    split: str,
    *,
    train: bool,
    class_subset: Sequence[int] | None = None,
    return_index: bool = False,
    encoded: bool = False,
    require_label: bool = False,
) -> MultiLabelDataset:
    """One split with the configured transform, decoder and image cache.

    Raises:
        ValueError: ``dataset`` was opened without its image bytes.
    """
    if not dataset.with_bytes:
        raise ValueError(f"{dataset.root} was opened without image bytes: it cannot be loaded")
    data = dataset.data
    return MultiLabelDataset(
        dataset.manifest,
        split,
        build_transform(data, train=train),
        class_subset=class_subset,
        return_index=return_index,
        decoder=data.decoder,
        cache_dir=remote_cache(data),
        encoded=encoded,
        require_label=require_label,
    )


def build_loaders(
    dataset: OpenDataset,
    train_cfg: TrainConfig,
    *,
    class_subset: Sequence[int] | None = None,
    return_index: bool = False,
    placement: Placement = LOCAL,
    require_label: bool = False,
) -> tuple[DataLoader | DeviceDecodedLoader, DataLoader | DeviceDecodedLoader]:
    """Training and validation loaders over ``class_subset`` (None: all classes).

    ``require_label`` leaves out images without a label among those classes (zero-shot
    training and model selection on the seen classes).

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
    data = dataset.data
    world, rank = placement.world_size, placement.rank
    if train_cfg.batch_size % world:
        raise ConfigError(
            f"train.batch_size = {train_cfg.batch_size} must be a multiple of the {world} "
            "data-parallel workers (each takes an equal share of every batch)"
        )
    on_device = data.decode_on == "device"
    train_set = split_dataset(
        dataset,
        data.train_split,
        train=True,
        class_subset=class_subset,
        return_index=return_index,
        encoded=on_device,
        require_label=require_label,
    )
    val_set = split_dataset(
        dataset,
        data.val_split,
        train=False,
        class_subset=class_subset,
        encoded=on_device,
        require_label=require_label,
    )
    if data.class_aware_sampling:
        # Balanced over the classes this model learns: a teacher's labels are its subset's, so
        # every draw is an image holding at least one of them (the DB weights use the same
        # subset frequencies).
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


def eval_loader(
    dataset: OpenDataset,
    train_cfg: TrainConfig,
    split: str,
    class_subset: Sequence[int] | None = None,
) -> DataLoader:
    """One split in file order with the evaluation transform (held-out scoring, cached teacher
    logits, zero-shot evaluation)."""
    split_set = split_dataset(dataset, split, train=False, class_subset=class_subset)
    return DataLoader(
        split_set,
        batch_size=train_cfg.eval_batch_size or 2 * train_cfg.batch_size,
        collate_fn=split_set.collate_fn,
        num_workers=loader_workers(dataset.data, None),
    )
