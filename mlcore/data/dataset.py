"""A torch Dataset over a manifest split, with the papers' train/val transforms.

``MultiLabelDataset[i]`` is ``(image, target)``: a normalised float tensor (3, S, S) and a
multi-hot float vector over the dataset's classes, or over ``class_subset`` (in that order) —
the CPSD teachers train on label subsets. ``return_index=True`` appends the row's position in
the split, which the cached-teacher distillation uses to look up stored logits.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from mlcore.config import DataConfig
from mlcore.data.manifest import Manifest, ManifestError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(
    size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """PIL image -> normalised float tensor (3, size, size): what validation and inference see.

    Model bundles record ``size``, ``mean`` and ``std`` and rebuild their preprocessing with this
    function, so a deployed model sees exactly the validation transform.
    """
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def build_transform(cfg: DataConfig, *, train: bool) -> v2.Compose:
    """Resize to a square, then (training only) crop/flip/RandAugment/Cutout, then normalise."""
    size = cfg.image_size
    if not train:
        return eval_transform(size)
    ops: list[v2.Transform] = [v2.ToImage(), v2.Resize((size, size), antialias=True)]
    if cfg.random_crop:
        ops.append(v2.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"))
    if cfg.hflip:
        ops.append(v2.RandomHorizontalFlip())
    if cfg.randaugment:
        ops.append(v2.RandAugment(num_ops=2, magnitude=9))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if cfg.cutout > 0:
        # One erased square of fixed relative side, as the ASL/CPSD pipelines' CutoutPIL.
        area = cfg.cutout**2
        ops.append(v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0.0))
    return v2.Compose(ops)


class MultiLabelDataset(Dataset):
    """Images and multi-hot targets of one split of a manifest.

    Args:
        manifest: The loaded dataset.
        split: Split name (``train``, ``val``, ...).
        transform: Callable on a PIL image returning a tensor.
        class_subset: Class indices the target covers, in this order (None: all classes).
        return_index: Also return the position of the item within the split.
        require_label: Keep only images with at least one label among the target classes.

    Raises:
        ManifestError: The split is empty (before or after ``require_label``) or a subset
            index is out of range.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        transform=None,
        *,
        class_subset: Sequence[int] | None = None,
        return_index: bool = False,
        require_label: bool = False,
    ):
        rows = manifest.split_rows(split)
        if rows.size == 0:
            raise ManifestError(
                f"{manifest.root}: split {split!r} has no rows (splits: {manifest.splits()})"
            )
        num_classes = manifest.num_classes
        if class_subset is not None:
            bad = [c for c in class_subset if not 0 <= c < num_classes]
            if bad or len(set(class_subset)) != len(class_subset):
                raise ManifestError(f"class_subset {list(class_subset)} invalid for {num_classes}")
        full = manifest.multi_hot(rows).astype(np.float32)
        targets = full if class_subset is None else full[:, list(class_subset)]
        if require_label:
            labelled = targets.any(axis=1)
            rows, targets = rows[labelled], targets[labelled]
            if rows.size == 0:
                raise ManifestError(
                    f"{manifest.root}: no image of split {split!r} has a label among the "
                    "target classes"
                )
        self.manifest = manifest
        self.split = split
        self.rows = rows
        self.transform = transform
        self.return_index = return_index
        self.image_root = manifest.image_root
        table = manifest.table.take(rows)
        self.image_ids = table.column("image_id").to_pylist()
        self.paths = table.column("path").to_pylist()
        self.blobs = (
            table.column("image_bytes").to_pylist()
            if "image_bytes" in table.column_names
            else [None] * len(rows)
        )
        self.class_subset = None if class_subset is None else list(class_subset)
        self.targets = torch.from_numpy(targets)
        self.label_lists = manifest.label_lists(rows)
        if class_subset is None:
            self.subset_label_lists = self.label_lists
        else:
            position = {c: j for j, c in enumerate(class_subset)}
            self.subset_label_lists = [
                [position[c] for c in labels if c in position] for labels in self.label_lists
            ]

    @property
    def num_classes(self) -> int:
        return self.targets.shape[1]

    def __len__(self) -> int:
        return len(self.rows)

    def load_image(self, i: int) -> Image.Image:
        blob = self.blobs[i]
        try:
            if blob is not None:
                image = Image.open(io.BytesIO(blob))
            else:
                image = Image.open(self.image_root / self.paths[i])
            return image.convert("RGB")
        except (OSError, ValueError) as err:
            where = self.paths[i] if blob is None else "embedded bytes"
            raise ManifestError(
                f"{self.split} row {i} (image_id={self.image_ids[i]!r}): cannot read image "
                f"{where}: {err}"
            ) from err

    def __getitem__(self, key: int | tuple[int, int]):
        """``key`` is an index, or ``(index, seed)`` from ``SeededKeys``: the transform then
        draws from a private RNG seeded with ``seed``, so augmentation does not depend on the
        worker process or on what it decoded before (``data.num_workers`` changes nothing)."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        image = self.load_image(i)
        if self.transform is not None:
            if seed is None:
                image = self.transform(image)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    image = self.transform(image)
        if self.return_index:
            return image, self.targets[i], i
        return image, self.targets[i]
