"""A torch Dataset over a manifest split, with the papers' train/val transforms.

``MultiLabelDataset[i]`` is ``(image, labels)``: a normalised float tensor (3, S, S) and the
row's class positions (int64, over the dataset's classes or over ``class_subset`` in that
order: the CPSD teachers train on label subsets). ``return_index=True`` appends the row's
position in the split, which the cached-teacher distillation uses to look up stored logits.

Labels stay sparse: the dataset holds them as CSR arrays (offsets, positions), so it costs
O(N + number of labels), never O(N x C). :class:`MultiHotCollate` (the dataset's
``collate_fn``) builds the dense multi-hot rows one batch at a time: every loader over this
dataset must use it.

Random augmentation is seeded per sample: a training loader's sampler is wrapped in
:class:`SeededSampler`, which hands the dataset ``(index, seed)`` with the seed a function of
(base seed, epoch, position in the epoch's global order). An image's augmentation therefore does
not depend on which DataLoader worker or data-parallel rank loads it, so ``num_workers`` and the
number of ranks change nothing about what is trained on.

Images are read from the manifest's embedded bytes or from files under its image root (a local
directory or an object-store URI, see :class:`ImageFiles`) and decoded by one of
:data:`DECODERS` into a uint8 tensor (3, H, W); the transform takes it from there. With
``encoded=True`` the dataset hands out the encoded bytes instead and :class:`DeviceDecodedLoader`
decodes and transforms whole batches on the training device (nvjpeg on a GPU).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import simplejpeg
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from mlcore.config import DataConfig
from mlcore.data.manifest import Manifest, ManifestError, filesystem, is_uri

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(
    size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> v2.Compose:
    """Image (PIL or uint8 tensor) -> normalised float tensor (3, size, size): what validation
    and inference see.

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
    if cfg.augment == "randaug":
        ops += [v2.ToPILImage(), _TimmRandAugment(size), v2.ToImage()]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if cfg.cutout > 0:
        # One erased square of fixed relative side, as the ASL/CPSD pipelines' CutoutPIL.
        area = cfg.cutout**2
        ops.append(v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0.0))
    if cfg.augment == "randaug":
        ops.append(_TimmCutout())
    return v2.Compose(ops)


class _PythonRandomFromTorch:
    """Runs a transform that draws from Python's and NumPy's global RNGs (timm's) with both
    seeded from torch's RNG, which :func:`seeded` sets per sample; their states are restored
    after, so nothing else's random stream moves."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.transform(image)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class _TimmRandAugment(_PythonRandomFromTorch):
    """timm's RandAugment on a PIL image: 2 ops at magnitude 9 with std 0.5 (``rand-m9-mstd0.5``,
    the ASL/CPSD training recipe), translations relative to ``size`` as timm's ImageNet recipe
    (0.45 of the side), fill with the ImageNet mean."""

    def __init__(self, size: int):
        hparams = {
            "translate_const": int(size * 0.45),
            "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN),
        }
        super().__init__(rand_augment_transform("rand-m9-mstd0.5", hparams))


class _TimmCutout(_PythonRandomFromTorch):
    """One square of half the image side (a quarter of its area) filled with a random colour,
    as the authors' ``CutoutPIL(cutout_factor=0.5)``, through timm's RandomErasing on the
    normalised tensor."""

    def __init__(self):
        super().__init__(
            RandomErasing(
                probability=1.0, min_area=0.25, max_area=0.25, min_aspect=1.0, mode="rand",
                max_count=1, device="cpu",
            )
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Decoders: encoded bytes -> uint8 tensor (3, H, W) at the stored resolution. All three give
# the same pixels for a JPEG (libjpeg-turbo underneath, default settings); they differ in speed
# (bench/bench_decode.py, docs/benchmarks.md): simplejpeg, the default, is the fastest per core.
# torchvision's decoders are deprecated upstream since 0.29 (TorchCodec replaces them).


def decode_pil(data: bytes) -> torch.Tensor:
    """PIL (any format PIL reads)."""
    return pil_to_tensor(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_torchvision(data: bytes) -> torch.Tensor:
    """``torchvision.io.decode_image`` (JPEG, PNG, WebP, GIF); other formats through PIL."""
    try:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
    except RuntimeError:
        return decode_pil(data)


def decode_simplejpeg(data: bytes) -> torch.Tensor:
    """simplejpeg for JPEGs; other formats (the generated PNGs), and JPEGs it cannot convert to
    RGB (CMYK), through PIL."""
    if simplejpeg.is_jpeg(data):
        try:
            return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB")).permute(2, 0, 1)
        except ValueError:
            pass
    return decode_pil(data)


DECODERS: dict[str, Callable[[bytes], torch.Tensor]] = {
    "pil": decode_pil,
    "torchvision": decode_torchvision,
    "simplejpeg": decode_simplejpeg,
}


# ---------------------------------------------------------------------------------------------
# Image files


class ImageFiles:
    """Reads image files under a root: a local directory or an object-store URI.

    With ``cache_dir``, a remote file is copied there on first read (atomically, so concurrent
    readers on one node never see half a file) and read locally from then on; the cache is
    keyed by the root URI. The pyarrow filesystem is opened lazily in each process: S3 clients
    must not cross a fork into DataLoader workers.
    """

    def __init__(self, root: str, cache_dir: str | os.PathLike | None = None):
        self.root = root
        self.remote = is_uri(root)
        self.cache = None
        if self.remote and cache_dir is not None:
            key = hashlib.sha256(root.encode()).hexdigest()[:16]
            self.cache = Path(cache_dir).expanduser() / "remote-images" / key
        self._fs: tuple[int, pafs.FileSystem, str] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None}

    def _filesystem(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None or self._fs[0] != os.getpid():
            self._fs = (os.getpid(), *filesystem(self.root))
        return self._fs[1], self._fs[2]

    def read(self, rel: str) -> bytes:
        if not self.remote:
            return (Path(self.root) / rel).read_bytes()
        if self.cache is not None:
            local = self.cache / rel
            if local.is_file():
                return local.read_bytes()
        fs, base = self._filesystem()
        with fs.open_input_stream(f"{base}/{rel}") as f:
            data = f.read()
        if self.cache is not None:
            local.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, local)
        return data


# ---------------------------------------------------------------------------------------------
# Labels and batches


def label_csr(
    labels: pa.ListArray | pa.ChunkedArray, class_subset: Sequence[int] | None, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-row label positions as CSR ``(offsets (N + 1,) int64, positions int32)``.

    With ``class_subset``, labels outside it are dropped and the rest become positions in it.
    """
    if isinstance(labels, pa.ChunkedArray):
        labels = labels.combine_chunks()
    lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False).astype(np.int64)
    values = labels.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    if class_subset is not None:
        position = np.full(num_classes, -1, dtype=np.int32)
        position[np.asarray(class_subset, dtype=np.int64)] = np.arange(
            len(class_subset), dtype=np.int32
        )
        mapped = position[values]
        keep = mapped >= 0
        row_of_value = np.repeat(np.arange(lengths.size), lengths)
        lengths = np.bincount(row_of_value[keep], minlength=lengths.size).astype(np.int64)
        values = mapped[keep]
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, values


class MultiHotCollate:
    """Batches ``(image, labels[, index])`` items into ``[images, multi-hot targets[, indices]]``.

    The only place a dense (B, C) target exists: one batch at a time. With ``encoded``, items
    are ``(encoded bytes, labels, seed[, index])`` and batches ``[list of encoded images,
    targets, seeds[, indices]]`` (for :class:`DeviceDecodedLoader`).
    """

    def __init__(self, num_classes: int, *, encoded: bool = False):
        self.num_classes = num_classes
        self.encoded = encoded

    def __call__(self, items: list[tuple]) -> list:
        labels = [item[1] for item in items]
        rows = torch.repeat_interleave(
            torch.arange(len(items)), torch.tensor([len(x) for x in labels], dtype=torch.long)
        )
        targets = torch.zeros(len(items), self.num_classes)
        targets[rows, torch.cat(labels)] = 1.0
        images = [item[0] for item in items]
        out = [images if self.encoded else torch.stack(images), targets]
        extra = 3 if self.encoded else 2  # seed, then index
        if self.encoded:
            out.append(torch.tensor([item[2] for item in items], dtype=torch.long))
        if len(items[0]) > extra:
            out.append(torch.tensor([item[extra] for item in items], dtype=torch.long))
        return out


def seeded(transform: Callable, image: torch.Tensor, seed: int | None) -> torch.Tensor:
    """``transform(image)``, its random draws from ``seed``'s stream when given.

    The transforms draw from torch's global (CPU) RNG, also for images on a GPU; forking it
    leaves the training process's stream (dropout, shuffling) undisturbed.
    """
    if seed is None:
        return transform(image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def _is_jpeg(encoded: torch.Tensor) -> bool:
    return encoded.numel() > 2 and encoded[0] == 0xFF and encoded[1] == 0xD8


def decode_batch(
    encoded: Sequence[torch.Tensor], device: torch.device, decoder: str
) -> list[torch.Tensor]:
    """Decode a batch onto ``device``: JPEGs with nvjpeg when it is a GPU (one batched call);
    the rest, and everything for a CPU device, with ``decoder`` on the CPU."""
    images: list[torch.Tensor | None] = [None] * len(encoded)
    on_gpu = [k for k, e in enumerate(encoded) if device.type == "cuda" and _is_jpeg(e)]
    if on_gpu:
        decoded = decode_jpeg([encoded[k] for k in on_gpu], mode=ImageReadMode.RGB, device=device)
        for k, image in zip(on_gpu, decoded, strict=True):
            images[k] = image
    for k, e in enumerate(encoded):
        if images[k] is None:
            images[k] = DECODERS[decoder](e.numpy().tobytes()).to(device)
    return images  # type: ignore[return-value]


class DeviceDecodedLoader:
    """A loader of encoded images whose batches are decoded and transformed on ``device``.

    Quacks like the wrapped ``DataLoader`` for the training loop (``len``, ``sampler``,
    iteration yielding ``[images, targets[, indices]]``). Each image keeps its augmentation
    seed, so the result equals the CPU path's up to the decoder and the resize running on the
    device.
    """

    def __init__(self, loader: DataLoader, transform: Callable, device: torch.device, decoder: str):
        self.loader = loader
        self.transform = transform
        self.device = device
        self.decoder = decoder

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def dataset(self):
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for encoded, targets, seeds, *rest in self.loader:
            images = decode_batch(encoded, self.device, self.decoder)
            batch = torch.stack(
                [
                    seeded(self.transform, image, None if seed < 0 else seed)
                    for image, seed in zip(images, seeds.tolist(), strict=True)
                ]
            )
            yield [batch, targets, *rest]


class SeededSampler(Sampler[tuple[int, int]]):
    """Pairs each index of a (rank's) sampler with its sample's augmentation seed.

    The k-th index of rank ``rank`` sits at position ``rank + k * world_size`` of the epoch's
    global order (how ``DistributedSampler`` and ``ClassAwareSampler`` shard), and its seed is a
    function of (``seed``, epoch, that position) only.
    """

    def __init__(self, sampler: Sampler[int], seed: int, *, rank: int = 0, world_size: int = 1):
        self.sampler = sampler
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)  # type: ignore[attr-defined]

    def __iter__(self):
        base = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0]
        for k, index in enumerate(self.sampler):
            position = self.rank + k * self.world_size
            yield index, int((int(base) + position) % 2**63)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


class MultiLabelDataset(Dataset):
    """Images and sparse labels of one split of a manifest.

    Args:
        manifest: The loaded dataset.
        split: Split name (``train``, ``val``, ...).
        transform: Callable on a uint8 image tensor (3, H, W) returning a tensor.
        class_subset: Class indices the labels cover, in this order (None: all classes).
        return_index: Also return the position of the item within the split.
        decoder: Name in :data:`DECODERS`.
        encoded: Items are ``(encoded bytes as uint8 tensor, labels, seed[, index])``, not
            decoded (``transform`` is then not applied; seed -1: none).
        cache_dir: Local cache for images under a remote image root (None: no cache).
        require_label: Keep only images with at least one label among the target classes.

    Raises:
        ManifestError: The split is empty (before or after ``require_label``), a subset index
            is out of range or the decoder is unknown.
    """

    def __init__(
        self,
        manifest: Manifest,
        split: str,
        transform=None,
        *,
        class_subset: Sequence[int] | None = None,
        return_index: bool = False,
        decoder: str = "simplejpeg",
        cache_dir: str | os.PathLike | None = None,
        encoded: bool = False,
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
        if decoder not in DECODERS:
            raise ManifestError(f"unknown decoder {decoder!r}; choose from {sorted(DECODERS)}")
        if require_label:
            labels = manifest.table.column("labels").take(pa.array(rows))
            offsets, _ = label_csr(labels, class_subset, num_classes)
            rows = rows[np.diff(offsets) > 0]
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
        self.decode = DECODERS[decoder]
        self.files = ImageFiles(str(manifest.image_root), cache_dir)
        # Arrow columns, not Python lists: compact, and DataLoader workers forked from this
        # process share them without copy-on-access.
        table = manifest.table.take(pa.array(rows))
        self.ids = table.column("image_id").combine_chunks()
        self.paths = table.column("path").combine_chunks()
        self.blobs = (
            table.column("image_bytes").combine_chunks()
            if "image_bytes" in table.column_names
            else None
        )
        self.class_subset = None if class_subset is None else list(class_subset)
        self.num_classes = num_classes if class_subset is None else len(class_subset)
        self.label_csr = label_csr(table.column("labels"), class_subset, num_classes)
        self.encoded = encoded
        self.collate_fn = MultiHotCollate(self.num_classes, encoded=encoded)

    @property
    def image_ids(self) -> list[str]:
        return self.ids.to_pylist()

    def __len__(self) -> int:
        return len(self.rows)

    def labels(self, i: int) -> torch.Tensor:
        offsets, values = self.label_csr
        return torch.from_numpy(values[offsets[i] : offsets[i + 1]].astype(np.int64))

    def load_bytes(self, i: int) -> bytes:
        blob = None if self.blobs is None else self.blobs[i].as_py()
        return blob if blob is not None else self.files.read(self.paths[i].as_py())

    def load_image(self, i: int) -> torch.Tensor:
        path = self.paths[i].as_py()
        try:
            return self.decode(self.load_bytes(i))
        except (OSError, ValueError, RuntimeError) as err:
            where = path if path is not None else "embedded bytes"
            raise ManifestError(
                f"{self.split} row {i} (image_id={self.ids[i].as_py()!r}): cannot read image "
                f"{where}: {err}"
            ) from err

    def __getitem__(self, key: int | tuple[int, int]):
        """Item ``key``: an index, or ``(index, augmentation seed)`` from :class:`SeededSampler`."""
        i, seed = key if isinstance(key, tuple) else (key, None)
        if self.encoded:
            data = torch.frombuffer(bytearray(self.load_bytes(i)), dtype=torch.uint8)
            item = (data, self.labels(i), -1 if seed is None else seed)
        else:
            image = self.load_image(i)
            if self.transform is not None:
                image = seeded(self.transform, image, seed)
            item = (image, self.labels(i))
        return (*item, i) if self.return_index else item
