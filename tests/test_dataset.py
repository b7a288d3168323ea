"""The data path: sparse labels with per-batch multi-hot rows, per-sample augmentation seeds,
the image decoders, and ``num_workers: auto``."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import sklearn.datasets
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler
from torchvision.transforms import v2

from mlcore.data.dataset import DECODERS, MultiLabelDataset, SeededSampler, build_transform
from mlcore.data.loading import build_loaders, loader_workers, open_dataset, resolve_dataset
from mlcore.data.manifest import Manifest
from mlcore.train import LocalPlacement

PHOTOS = Path(sklearn.datasets.__file__).parent / "images"


def test_sparse_labels_give_the_dense_multi_hot_rows_per_batch(tiny_config):
    manifest = Manifest.load(resolve_dataset(tiny_config.data))
    subset = [7, 2, 5]
    dataset = MultiLabelDataset(manifest, "train", class_subset=subset, return_index=True)
    dense = manifest.multi_hot(manifest.split_rows("train"))[:, subset].astype(np.float32)
    offsets, positions = dataset.label_csr
    assert offsets[-1] == positions.size == int(dense.sum())  # O(labels), no (N, C) array
    loader = DataLoader(dataset, batch_size=50, collate_fn=dataset.collate_fn)
    seen = 0
    for images, targets, indices in loader:
        assert images.shape[1:] == (3, 32, 32) and targets.dtype == torch.float32
        np.testing.assert_array_equal(targets.numpy(), dense[indices.numpy()])
        seen += len(indices)
    assert seen == len(dataset)


@pytest.mark.parametrize(
    "augment",
    [{"randaugment": True, "cutout": 0.25}, {"augment": "randaug"}],
    ids=["torchvision", "timm-randaug"],
)
def test_augmentation_does_not_depend_on_workers_or_ranks(augment, tiny_config):
    manifest = Manifest.load(resolve_dataset(tiny_config.data))
    data = dataclasses.replace(tiny_config.data, **augment)
    dataset = MultiLabelDataset(manifest, "train", build_transform(data, train=True))

    def batches(world: int, rank: int, workers: int) -> list[torch.Tensor]:
        order = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=3)
        sampler = SeededSampler(order, 3, rank=rank, world_size=world)
        sampler.set_epoch(2)
        loader = DataLoader(
            dataset,
            batch_size=16 // world,
            sampler=sampler,
            collate_fn=dataset.collate_fn,
            num_workers=workers,
        )
        return [images for images, _ in loader]

    single = batches(1, 0, workers=0)
    assert torch.equal(torch.cat(batches(1, 0, workers=1)), torch.cat(single))
    rank0, rank1 = batches(2, 0, workers=0), batches(2, 1, workers=0)
    for whole, a, b in zip(single, rank0, rank1, strict=True):
        # Global batch k = rank 0's and rank 1's k-th batches, interleaved by position.
        interleaved = torch.stack([x for pair in zip(a, b, strict=True) for x in pair])
        assert torch.equal(interleaved, whole)
    other_epoch = SeededSampler(DistributedSampler(dataset, 1, 0, seed=3), 3)
    other_epoch.set_epoch(3)
    first = next(iter(DataLoader(dataset, 16, sampler=other_epoch, collate_fn=dataset.collate_fn)))
    assert not torch.equal(first[0], single[0])


def test_timm_randaug_is_seeded_per_sample_and_leaves_global_rngs_alone(tiny_config):
    import random

    manifest = Manifest.load(resolve_dataset(tiny_config.data))
    randaug = dataclasses.replace(tiny_config.data, augment="randaug")
    dataset = MultiLabelDataset(manifest, "train", build_transform(randaug, train=True))
    basic = MultiLabelDataset(manifest, "train", build_transform(tiny_config.data, train=True))
    random.seed(5)
    np.random.seed(5)
    expected = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    first = dataset[(3, 123)][0]
    assert (random.random(), np.random.rand()) == expected  # timm's draws were restored
    random.random()
    assert torch.equal(dataset[(3, 123)][0], first)  # whatever the global streams hold
    assert not torch.equal(dataset[(3, 124)][0], first)
    assert not torch.equal(basic[(3, 123)][0], first)
    # Cutout: a square of half the side is one random colour in every pixel.
    erased = [
        ((image[:, 1:, 1:] == image[:, :-1, :-1]).all(0).float().mean() > 0.2)
        for image in (dataset[(i, i)][0] for i in range(8))
    ]
    assert all(erased)


def _jpeg(name: str, long_side: int) -> bytes:
    image = Image.open(PHOTOS / name).convert("RGB")
    scale = long_side / max(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(("side", "long_side"), [(224, 640), (448, 1024)])
def test_decoders_match_pil_within_the_resize_tolerance(side, long_side):
    """Every decoder's resized output is PIL's within the *resize tolerance*: the mean
    disagreement of two standard antialiased resizes (PIL bilinear vs bicubic) of one image."""
    resize = v2.Resize((side, side), antialias=True)
    for name in ("china.jpg", "flower.jpg"):
        blob = _jpeg(name, long_side)
        full = Image.open(io.BytesIO(blob)).convert("RGB")
        tolerance = np.abs(
            np.asarray(full.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)
            - np.asarray(full.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
        ).mean()
        assert tolerance > 0.1  # the yardstick itself is not degenerate
        reference = resize(DECODERS["pil"](blob)).float()
        for decoder, decode in DECODERS.items():
            out = resize(decode(blob)).float()
            assert out.shape == (3, side, side)
            assert (out - reference).abs().mean() <= tolerance, decoder


def test_decoders_read_png_and_grayscale():
    rng = np.random.default_rng(0)
    for mode, array in (
        ("RGB", rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)),
        ("L", rng.integers(0, 255, (20, 30), dtype=np.uint8)),
    ):
        for fmt in ("PNG", "JPEG"):
            buffer = io.BytesIO()
            Image.fromarray(array, mode).save(buffer, fmt)
            expected = DECODERS["pil"](buffer.getvalue())
            for decoder, decode in DECODERS.items():
                out = decode(buffer.getvalue())
                assert out.shape == (3, 20, 30) and out.dtype == torch.uint8, (decoder, fmt)
                assert (out.float() - expected.float()).abs().mean() < 1.0, (decoder, fmt)


def test_device_decoding_gives_the_loader_path_batches(tiny_config):
    """``decode_on: device`` on this CPU runs the same batched code path a GPU runs (nvjpeg is
    then used for JPEGs); on a CPU device it must reproduce the loader path exactly."""
    data = dataclasses.replace(tiny_config.data, randaugment=True)
    dataset = open_dataset(data)
    on_device = dataclasses.replace(dataset, data=dataclasses.replace(data, decode_on="device"))
    loaders = build_loaders(dataset, tiny_config.train, return_index=True)
    device_loaders = build_loaders(on_device, tiny_config.train, return_index=True)
    for loader, device_loader in zip(loaders, device_loaders, strict=True):
        assert len(device_loader) == len(loader)
        for batch, device_batch in zip(loader, device_loader, strict=True):
            for a, b in zip(batch, device_batch, strict=True):
                assert torch.equal(a, b)


def test_num_workers_auto_follows_the_cpus_held(tiny_config):
    auto = dataclasses.replace(tiny_config.data, num_workers="auto")
    assert loader_workers(auto, 1.0) == 0  # the training process needs its CPU
    assert loader_workers(auto, 4.0) == 3
    assert loader_workers(auto, 64.0) == 16
    assert loader_workers(dataclasses.replace(auto, num_workers=2), 64.0) == 2
    dataset = open_dataset(auto)
    train, val = build_loaders(dataset, tiny_config.train, placement=LocalPlacement(3.0))
    assert train.num_workers == val.num_workers == 2


def test_an_open_dataset_travels_as_its_config_and_reopens(tiny_config):
    """A Ray Train worker gets the handle by pickle: it opens the dataset there, no rows sent."""
    dataset = open_dataset(tiny_config.data)
    blob = pickle.dumps(dataset)
    assert len(blob) < 10_000, len(blob)  # the config, not the 448 rows
    again = pickle.loads(blob)
    assert again.root == dataset.root and again.data == dataset.data
    assert again.manifest.table.equals(dataset.manifest.table)
    labels_only = open_dataset(tiny_config.data, with_bytes=False)
    assert labels_only.class_names == dataset.class_names
    with pytest.raises(ValueError, match="without image bytes"):
        build_loaders(labels_only, tiny_config.train)
