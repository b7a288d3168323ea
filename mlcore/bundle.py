"""The model bundle: one self-describing file per trained model, and inference from it.

Training writes ``model.bundle.pt`` next to ``best.pt`` (:data:`BUNDLE_FILE`). It holds
everything needed to use the model without the training config or the dataset:

============  =============================================================================
key           content
============  =============================================================================
format        ``"cpsd.model_bundle"``
version       :data:`FORMAT_VERSION`; a reader refuses any other value
header        JSON text: ``cpsd_version`` (the writer), ``model`` (the ``model`` config section),
              ``class_names`` (output order), ``preprocessing`` (``image_size``, ``mean``,
              ``std``), ``thresholds`` (:class:`ValThresholds`, absent in bundles written
              before cpsd stored them) and ``metadata`` (best epoch, validation metrics,
              training positives per class, the dataset it was trained on)
state_dict    the selected (best) weights
embeddings    ``(C, E)`` float tensor of per-class embeddings (word queries), or absent
============  =============================================================================

The file is written with ``torch.save`` but only ever read with ``torch.load(weights_only=True)``:
tensors, strings and numbers only, so loading a bundle never runs pickled code. Everything that
is not a tensor travels as JSON text.

Class embeddings are generic: a model whose module exposes a ``class_embeddings`` tensor (e.g. a
word-query ML-Decoder's fixed embedding table) gets it saved, and :meth:`ModelBundle.build_model`
hands it back to the model factory with the class names (a ``ClassEmbeddings`` table), so such a
head can be rebuilt without the word-vector file it was trained from.

A bundle's :attr:`ModelBundle.digest` names what it computes (architecture, classes,
preprocessing, weights); a thresholds file records it, so thresholds fitted to one model's
scores are never applied to another's.

This module is what ``cpsd predict``, ``cpsd evaluate``, ``cpsd export`` and the MLflow pyfunc
all load models with: :class:`Classifier` turns images (paths or encoded bytes) into per-class
probabilities in batches, and :class:`Decision` turns probabilities into labels (one global
threshold, per-class thresholds from the bundle or ``cpsd evaluate``'s file, or the top k).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from pickle import UnpicklingError
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mlcore import configlib
from mlcore.config import ModelConfig
from mlcore.configlib import ConfigError
from mlcore.data.dataset import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from mlcore.data.embeddings import ClassEmbeddings
from mlcore.models import build_model_from_config, family_of
from mlcore.train import save_atomic

BUNDLE_FILE = "model.bundle.pt"
FORMAT = "cpsd.model_bundle"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


class BundleError(ValueError):
    """A model bundle is corrupt, not a bundle, or from another format version."""


class UnreadableImage(ValueError):
    """An input is not a decodable image; the message says which and why."""


def product_version() -> str:
    """Version of the installed ``cpsd`` package (``unknown`` when run from a bare checkout)."""
    try:
        return importlib_metadata.version("cpsd")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# The file


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """How an image becomes the model input: RGB, resized to a square, scaled, normalised."""

    image_size: int
    """Side of the square model input in pixels."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided by after subtracting the mean."""

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise BundleError(f"preprocessing.image_size must be >= 1, got {self.image_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise BundleError("preprocessing needs 3 means and 3 positive stds")

    def transform(self):
        """PIL image -> float tensor (3, S, S): the validation transform of training."""
        return eval_transform(self.image_size, self.mean, self.std)


@dataclass(frozen=True, kw_only=True)
class ValThresholds:
    """Label thresholds chosen on the validation split when training ended (maximum F1)."""

    per_class: tuple[float, ...]
    """Per class in ``class_names`` order, the threshold maximising that class's F1 on the split
    (``mlcore.evaluation.f1_optimal_thresholds``); a class without positives there gets
    ``single``."""
    single: float
    """The one global threshold maximising micro-F1 (OF1) on the split."""
    split: str = "val"
    """The split they were chosen on; metrics with them on that split are optimistic."""

    def __post_init__(self) -> None:
        values = np.array([*self.per_class, self.single], dtype=np.float64)
        if not np.isfinite(values).all():
            raise BundleError("bundle thresholds must be finite numbers")


@dataclass(frozen=True, kw_only=True)
class ModelBundle:
    """A trained model as data: architecture, weights, classes and preprocessing."""

    model: ModelConfig
    """The ``model`` config section it was trained with (backbone, head and head settings)."""
    class_names: tuple[str, ...]
    """Output order of the logits."""
    preprocessing: Preprocessing
    """Input transform."""
    state_dict: dict[str, torch.Tensor]
    """Weights of the selected epoch."""
    class_embeddings: torch.Tensor | None = None
    """``(C, E)`` per-class embeddings (word queries), in ``class_names`` order."""
    thresholds: ValThresholds | None = None
    """Thresholds chosen on val at the end of training (what ``cpsd predict`` uses by default);
    None in bundles written before cpsd stored them."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """JSON-able facts about the training run (best epoch, metrics, training positives)."""
    cpsd_version: str = field(default_factory=product_version)
    """Version of the product that wrote the bundle (reported in errors)."""

    def __post_init__(self) -> None:
        if not self.class_names:
            raise BundleError("a model bundle needs at least one class name")
        if len(set(self.class_names)) != len(self.class_names):
            raise BundleError("class names in a model bundle must be unique")
        emb = self.class_embeddings
        if emb is not None and (emb.ndim != 2 or emb.shape[0] != len(self.class_names)):
            raise BundleError(
                f"class_embeddings must be (num_classes={len(self.class_names)}, E), "
                f"got {tuple(emb.shape)}"
            )
        if self.thresholds is not None and len(self.thresholds.per_class) != self.num_classes:
            raise BundleError(
                f"the bundle has {len(self.thresholds.per_class)} per-class thresholds for "
                f"{self.num_classes} classes"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def default_decision(self) -> Decision:
        """The labelling rule without options: the val thresholds, else 0.5 for every class."""
        if self.thresholds is None:
            return Decision(0.5)
        return Decision(np.asarray(self.thresholds.per_class))

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of what the model computes: model config, class names, preprocessing,
        weights and class embeddings (not thresholds, metadata or the writer's version)."""
        h = hashlib.sha256()
        described = {
            "model": configlib.to_dict(self.model),
            "class_names": list(self.class_names),
            "preprocessing": dataclasses.asdict(self.preprocessing),
        }
        h.update(json.dumps(described, sort_keys=True).encode())
        tensors = dict(self.state_dict)
        if self.class_embeddings is not None:
            tensors["\0class_embeddings"] = self.class_embeddings
        for key in sorted(tensors):
            tensor = tensors[key].detach().cpu().contiguous()
            h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def header(self) -> dict[str, Any]:
        header = {
            "cpsd_version": self.cpsd_version,
            "model": configlib.to_dict(self.model),
            "class_names": list(self.class_names),
            "preprocessing": dataclasses.asdict(self.preprocessing),
            "metadata": self.metadata,
        }
        if self.thresholds is not None:
            header["thresholds"] = dataclasses.asdict(self.thresholds)
        return header

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a crash never leaves half a bundle); returns the path."""
        path = Path(path)
        payload = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            # allow_nan=False: NaN is not JSON; metrics that can be undefined must say so.
            "header": json.dumps(self.header(), sort_keys=True, allow_nan=False),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
        }
        if self.class_embeddings is not None:
            payload["embeddings"] = self.class_embeddings.detach().cpu()
        save_atomic(payload, path)
        return path

    def build_model(self) -> nn.Module:
        """The model with its weights, in eval mode on CPU; nothing is downloaded.

        Raises:
            BundleError: The weights do not fit the architecture the config describes.
        """
        # The weights are in the bundle: pretrained backbones must not be fetched again.
        cfg = dataclasses.replace(self.model, pretrained=False, pretrained_file=None)
        table = None
        if self.class_embeddings is not None:
            vectors = self.class_embeddings.detach().cpu().float().numpy()
            table = ClassEmbeddings(self.class_names, vectors)
        model = build_model_from_config(cfg, self.num_classes, class_embeddings=table)
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as err:
            raise BundleError(f"the bundle's weights do not fit its model config: {err}") from err
        return model.eval()


def class_embeddings_of(model: nn.Module) -> torch.Tensor | None:
    """The ``class_embeddings`` tensor of the first module that has one (word queries)."""
    for module in model.modules():
        found = getattr(module, "class_embeddings", None)
        if isinstance(found, torch.Tensor):
            return found
    return None


def load_bundle(path: str | os.PathLike) -> ModelBundle:
    """Read a bundle with ``weights_only=True`` and check its format.

    Raises:
        FileNotFoundError: No such file.
        BundleError: Not a bundle, corrupt, another format version, or a model config this
            version does not know; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no model bundle at {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, UnpicklingError, EOFError, zipfile.BadZipFile, OSError) as err:
        # torch's own text spans lines and suggests weights_only=False, which would run
        # whatever the file holds: the error names the kind of failure only.
        raise BundleError(
            f"{path} is not a readable model bundle: corrupt, truncated, or not a file cpsd "
            f"wrote ({type(err).__name__})"
        ) from err
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        hint = (
            " (a training checkpoint: use the model.bundle.pt next to it, or its directory)"
            if isinstance(raw, dict) and "model" in raw
            else ""
        )
        raise BundleError(f"{path} is not a cpsd model bundle{hint}")
    try:
        header = json.loads(raw["header"])
        written_by = header.get("cpsd_version", "unknown")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise BundleError(f"{path}: damaged bundle header: {err}") from err
    if raw.get("version") != FORMAT_VERSION:
        raise BundleError(
            f"{path} is model bundle format version {raw.get('version')!r} (written by cpsd "
            f"{written_by}); this cpsd {product_version()} reads version {FORMAT_VERSION}"
        )
    try:
        model = configlib.from_dict(ModelConfig, header["model"], prefix="model")
        family_of(model.head)  # a head this cpsd has no family for cannot be built
        bundle = ModelBundle(
            model=model,
            class_names=tuple(header["class_names"]),
            preprocessing=Preprocessing(
                image_size=int(header["preprocessing"]["image_size"]),
                mean=tuple(header["preprocessing"]["mean"]),
                std=tuple(header["preprocessing"]["std"]),
            ),
            state_dict=raw["state_dict"],
            class_embeddings=raw.get("embeddings"),
            thresholds=_thresholds_of(header),
            metadata=header.get("metadata", {}),
            cpsd_version=written_by,
        )
    except ConfigError as err:
        raise BundleError(
            f"{path} was written by cpsd {written_by} with a model config this cpsd "
            f"{product_version()} cannot build: {err}"
        ) from err
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, BundleError):
            raise BundleError(f"{path}: {err}") from err
        raise BundleError(f"{path}: damaged bundle header ({type(err).__name__}: {err})") from err
    return bundle


def _thresholds_of(header: dict[str, Any]) -> ValThresholds | None:
    found = header.get("thresholds")
    if found is None:
        return None
    return ValThresholds(
        per_class=tuple(float(t) for t in found["per_class"]),
        single=float(found["single"]),
        split=str(found["split"]),
    )


# ---------------------------------------------------------------------------------------------
# Inference


def best_device() -> torch.device:
    """CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


ImageSource = bytes | str | os.PathLike


def read_image(source: ImageSource) -> Image.Image:
    """Decode a path or encoded bytes to an RGB image.

    Raises:
        UnreadableImage: Missing file, not an image, truncated or otherwise undecodable; the
            message says which, without repeating the source.
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    except FileNotFoundError as err:
        raise UnreadableImage("no such file") from err
    except UnidentifiedImageError as err:
        raise UnreadableImage("not an image file (or a format Pillow cannot read)") from err
    # Image decoders raise many exception types for hostile or broken files (OSError,
    # SyntaxError from PNG chunks, DecompressionBombError, struct.error, ...); every one of them
    # means "this input is not a usable image", which callers report and skip.
    except Exception as err:
        raise UnreadableImage(f"cannot decode ({type(err).__name__}: {err})") from err


class _Sources(Dataset):
    """Decodes and preprocesses one source per item; failures travel as messages."""

    def __init__(self, sources: Sequence[ImageSource], transform):
        self.sources = sources
        self.transform = transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.transform(read_image(self.sources[i])), ""
        except UnreadableImage as err:
            return i, None, str(err)


class ScoredBatch(NamedTuple):
    """Scores of the readable images of one batch, and the unreadable ones."""

    indices: list[int]  # positions (in the input sequence) of the scored images
    scores: np.ndarray  # (len(indices), C) probabilities
    failures: list[tuple[int, str]]  # (position, reason) of the inputs that were skipped


def _collate(items: list[tuple[int, torch.Tensor | None, str]]):
    good = [(i, x) for i, x, _ in items if x is not None]
    failures = [(i, reason) for i, x, reason in items if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, failures


class Classifier:
    """A bundle's model ready for inference: images in, per-class probabilities out.

    Args:
        bundle: The loaded bundle.
        device: ``auto`` (CUDA, MPS, CPU) or a torch device name.
    """

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "auto"):
        self.bundle = bundle
        self.device = best_device() if device == "auto" else torch.device(device)
        self.model = bundle.build_model().to(self.device)
        self.transform = bundle.preprocessing.transform()

    @classmethod
    def from_file(cls, path: str | os.PathLike, device: str | torch.device = "auto"):
        return cls(load_bundle(path), device)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bundle.class_names

    @torch.no_grad()
    def scores(self, images: torch.Tensor) -> np.ndarray:
        """Probabilities ``(B, C)`` for preprocessed images ``(B, 3, S, S)``."""
        logits = self.model(images.to(self.device))
        return torch.sigmoid(logits.float()).cpu().numpy()

    def iter_scores(
        self, sources: Sequence[ImageSource], *, batch_size: int = 64, num_workers: int = 0
    ) -> Iterator[ScoredBatch]:
        """Score ``sources`` (paths or encoded bytes) in batches; unreadable ones are skipped.

        Every input appears exactly once, either in ``indices`` or in ``failures``.
        """
        loader = DataLoader(
            _Sources(sources, self.transform),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        for indices, images, failures in loader:
            scores = (
                self.scores(images)
                if images is not None
                else np.zeros((0, self.bundle.num_classes), np.float32)
            )
            yield ScoredBatch(indices, scores, failures)


# ---------------------------------------------------------------------------------------------
# From probabilities to labels


@dataclass(frozen=True)
class Decision:
    """Which classes an image is labelled with.

    Exactly one rule applies: ``top_k`` (the k highest scores), else ``thresholds`` (a scalar,
    or one value per class): a class is predicted when its probability is >= its threshold.
    """

    thresholds: float | np.ndarray = 0.5
    top_k: int | None = None

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        values = np.atleast_1d(np.asarray(self.thresholds, dtype=np.float64))
        if not np.isfinite(values).all():
            raise ValueError("thresholds must be finite")

    def select(self, scores: np.ndarray) -> list[np.ndarray]:
        """Per row of ``scores`` (N, C): the chosen class indices, highest score first."""
        order = np.argsort(-scores, axis=1, kind="stable")
        if self.top_k is not None:
            return list(order[:, : self.top_k])
        thresholds = np.broadcast_to(np.asarray(self.thresholds, np.float64), scores.shape[1:])
        chosen = scores >= thresholds
        return [row[chosen[i, row]] for i, row in enumerate(order)]
