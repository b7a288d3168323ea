"""Offline multi-label benchmark data with real co-occurrence structure.

No machine here can download COCO, so the embedded default is generated: each class is a
visually distinct object (one of 10 shapes in one of 8 colours, so up to 80 classes), and an
image holds several objects at random positions, scales and rotations, overlapping each other,
on a cluttered, noisy background. Which classes appear together is what matters for CPSD, so
label sets come from a model with co-occurrence:

* built-in: ``num_topics`` latent scenes; every class has a home scene, class frequencies are
  long-tailed (Zipf), and an image draws its objects mostly from one scene;
* ``labels_from=FILE.npz`` with a ``labels`` matrix (e.g. VOC-2012): label sets are sampled
  from its rows;
* ``labels_from=FILE.npz`` with ``class_counts`` and ``pair_counts`` (e.g. COCO-2014): the first
  class is drawn by frequency, each further one by its mean conditional co-occurrence
  P(j | already chosen) — an approximation that keeps the strong pairs of the real data.

The optional ``test`` split is drawn like ``val``: a held-out split to report on after choosing
settings on ``val``. The optional ``test_shift`` split draws every class independently with its
training frequency, so co-occurrence carries no information there: the drop from ``val`` to
``test_shift`` measures how much a model leans on context (CPSD paper, Fig. 1).

``compositional=True`` makes the data a zero-shot benchmark: every class is a (shape, colour)
combination, and ``class_embeddings.npz`` beside the manifest gives each class a vector built
from its attributes only: the 18-d attribute vector ``a_c`` (one-hot shape, one-hot colour)
through a fixed random projection ``P`` (``EMBEDDING_DIM × 18``, entries ``N(0, 1)``),
normalised, plus noise ``n_c ~ N(0, (EMBEDDING_NOISE² / EMBEDDING_DIM)·I)``::

    e_c = P a_c / ‖P a_c‖ + n_c

so a class held out of training (a red star) shares directions with the seen classes of its
shape (stars of other colours) and of its colour (other red shapes), as a word vector shares
meaning with related words; the noise keeps the vectors from being an exact code.

Everything is seeded per image, so the same config writes byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mlcore.config import SynthConfig
from mlcore.configlib import result_content
from mlcore.data.embeddings import DATASET_FILE, ClassEmbeddings
from mlcore.data.manifest import ManifestInfo, build_table, manifest_path, write_manifest

GENERATOR_VERSION = 1
EMBEDDING_DIM = 64
"""Width of the generated class embeddings (``compositional``)."""
EMBEDDING_NOISE = 0.3
"""Norm of the noise added to each unit-norm projected attribute vector (``compositional``)."""

SHAPES = (
    "circle", "square", "triangle", "diamond", "plus",
    "star", "ring", "hexagon", "cross", "bars",
)  # fmt: skip
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 210, 220),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
_COLOUR_NAMES = tuple(COLOURS)
SPLIT_CODES = {"train": 0, "val": 1, "test_shift": 2, "test": 3}


def class_appearance(c: int) -> tuple[str, str]:
    """(shape, colour) of class ``c``: unique for c < 80, and neighbours differ in both."""
    shape, block = c % len(SHAPES), c // len(SHAPES)
    return SHAPES[shape], _COLOUR_NAMES[(shape + block) % len(_COLOUR_NAMES)]


def default_class_names(num_classes: int, offset: int = 0) -> tuple[str, ...]:
    """``colour_shape`` names of classes ``offset .. offset + num_classes − 1``."""
    return tuple(
        "_".join(reversed(class_appearance(c))) for c in range(offset, offset + num_classes)
    )


def attribute_embeddings(num_classes: int, seed: int) -> ClassEmbeddings:
    """Class vectors from (shape, colour) attributes (module docstring: ``compositional``)."""
    rng = np.random.default_rng([seed, 77])
    projection = rng.normal(size=(EMBEDDING_DIM, len(SHAPES) + len(COLOURS)))
    attributes = np.zeros((num_classes, len(SHAPES) + len(COLOURS)))
    for c in range(num_classes):
        shape, colour = class_appearance(c)
        attributes[c, SHAPES.index(shape)] = 1.0
        attributes[c, len(SHAPES) + _COLOUR_NAMES.index(colour)] = 1.0
    signal = attributes @ projection.T  # (C, EMBEDDING_DIM)
    signal /= np.linalg.norm(signal, axis=1, keepdims=True)
    noise = rng.normal(scale=EMBEDDING_NOISE / np.sqrt(EMBEDDING_DIM), size=signal.shape)
    vectors = (signal + noise).astype(np.float32)
    return ClassEmbeddings(default_class_names(num_classes), vectors)


# ---------------------------------------------------------------------------------------------
# Label models


class _TopicLabelModel:
    """Latent scenes over long-tailed classes."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator):
        c = cfg.num_classes
        rank = rng.permutation(c)
        self.prior = 1.0 / (rank + 1.0) ** cfg.tail_exponent
        self.prior /= self.prior.sum()
        home = rng.permutation(np.arange(c) % cfg.num_topics)
        # Off-topic classes keep 5% of their weight: rare cross-scene pairs, never impossible.
        self.topic_weights = np.where(
            home[None, :] == np.arange(cfg.num_topics)[:, None], 1.0, 0.05
        )
        self.topic_weights = self.topic_weights * self.prior[None, :]
        self.topic_weights /= self.topic_weights.sum(1, keepdims=True)
        self.mean_objects = cfg.mean_objects
        self.num_classes = c

    def sample(self, rng: np.random.Generator) -> list[int]:
        topic = rng.integers(len(self.topic_weights))
        n = min(1 + rng.poisson(self.mean_objects - 1), 6, self.num_classes)
        return sorted(rng.choice(self.num_classes, n, replace=False, p=self.topic_weights[topic]))


class _MatrixLabelModel:
    """Label sets sampled from the rows of a real label matrix."""

    def __init__(self, labels: np.ndarray):
        rows = [np.flatnonzero(r).tolist() for r in labels]
        self.rows = [r for r in rows if r]
        self.num_classes = labels.shape[1]

    def sample(self, rng: np.random.Generator) -> list[int]:
        return self.rows[rng.integers(len(self.rows))]


class _PairLabelModel:
    """Label sets grown from class counts and pair counts (see module docstring)."""

    def __init__(self, class_counts: np.ndarray, pair_counts: np.ndarray, mean_objects: float):
        counts = np.maximum(class_counts.astype(np.float64), 1.0)
        self.prior = counts / counts.sum()
        self.conditional = pair_counts.astype(np.float64) / counts[:, None]  # P(j | i)
        np.fill_diagonal(self.conditional, 0.0)
        self.mean_objects = mean_objects
        self.num_classes = len(counts)

    def sample(self, rng: np.random.Generator) -> list[int]:
        n = min(1 + rng.poisson(self.mean_objects - 1), 6, self.num_classes)
        chosen = [int(rng.choice(self.num_classes, p=self.prior))]
        while len(chosen) < n:
            weights = self.conditional[chosen].mean(0)
            weights[chosen] = 0.0
            if weights.sum() <= 0:
                break
            chosen.append(int(rng.choice(self.num_classes, p=weights / weights.sum())))
        return sorted(chosen)


def _label_model(cfg: SynthConfig, rng: np.random.Generator):
    if cfg.labels_from is None:
        return _TopicLabelModel(cfg, rng), default_class_names(cfg.num_classes, cfg.class_offset)
    stats = np.load(cfg.labels_from)
    if "labels" in stats:
        model = _MatrixLabelModel(np.asarray(stats["labels"]))
    elif "class_counts" in stats and "pair_counts" in stats:
        model = _PairLabelModel(stats["class_counts"], stats["pair_counts"], cfg.mean_objects)
    else:
        raise ValueError(
            f"{cfg.labels_from}: needs a 'labels' matrix or 'class_counts' + 'pair_counts'"
        )
    if model.num_classes > 80:
        raise ValueError(f"{cfg.labels_from}: {model.num_classes} classes, at most 80 drawable")
    names = (
        tuple(str(n) for n in stats["class_names"])
        if "class_names" in stats
        else default_class_names(model.num_classes)
    )
    return model, names


# ---------------------------------------------------------------------------------------------
# Rendering


def _polygon(cx: float, cy: float, r: float, n: int, rot: float, inner: float = 1.0):
    pts = []
    for i in range(n * (2 if inner != 1.0 else 1)):
        rr = r if (inner == 1.0 or i % 2 == 0) else r * inner
        a = rot + math.pi * 2 * i / (n * (2 if inner != 1.0 else 1))
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, rot, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        w = max(2, int(r * 0.35))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=w)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, rot + math.pi / 4), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, rot), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, rot), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r * 1.1, 6, rot), fill=fill)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, r * 1.25, 5, rot, inner=0.45), fill=fill)
    elif shape in ("plus", "cross"):
        base = rot + (math.pi / 4 if shape == "cross" else 0.0)
        w = r * 0.32
        for a in (base, base + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            draw.polygon(
                [
                    (cx - dx * r + px, cy - dy * r + py),
                    (cx + dx * r + px, cy + dy * r + py),
                    (cx + dx * r - px, cy + dy * r - py),
                    (cx - dx * r - px, cy - dy * r - py),
                ],
                fill=fill,
            )
    elif shape == "bars":
        dx, dy = math.cos(rot), math.sin(rot)
        for off in (-0.5, 0.5):
            ox, oy = -dy * r * off, dx * r * off
            w = r * 0.2
            draw.polygon(
                [
                    (cx + ox - dx * r - dy * w, cy + oy - dy * r + dx * w),
                    (cx + ox + dx * r - dy * w, cy + oy + dy * r + dx * w),
                    (cx + ox + dx * r + dy * w, cy + oy + dy * r - dx * w),
                    (cx + ox - dx * r + dy * w, cy + oy - dy * r - dx * w),
                ],
                fill=fill,
            )
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def render_image(
    labels: list[int], size: int, rng: np.random.Generator, offset: int = 0
) -> Image.Image:
    """Draw the objects of ``labels`` (appearances ``offset + label``) on a cluttered
    background."""
    # Background: a random two-colour gradient in muted tones, so colour alone is never free.
    a, b = rng.uniform(40, 140, 3), rng.uniform(40, 140, 3)
    t = np.linspace(0, 1, size)[None, :, None]
    if rng.random() < 0.5:
        t = t.transpose(1, 0, 2)
    bg = (a * (1 - t) + b * t) * np.ones((size, size, 1))
    img = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    # Clutter: grey strokes and blobs that share shapes with the classes but not their colours.
    for _ in range(rng.integers(2, 6)):
        grey = int(rng.uniform(60, 190))
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line((x0, y0, x1, y1), fill=(grey, grey, grey), width=int(rng.integers(1, 3)))
    for _ in range(rng.integers(0, 3)):
        grey = int(rng.uniform(60, 190))
        _draw_shape(
            draw,
            SHAPES[rng.integers(len(SHAPES))],
            *rng.uniform(0, size, 2),
            size * rng.uniform(0.06, 0.12),
            rng.uniform(0, 2 * math.pi),
            (grey, grey, grey),
        )
    # Objects in random order, so later ones partly occlude earlier ones.
    for c in rng.permutation(labels):
        shape, colour = class_appearance(offset + int(c))
        jitter = rng.uniform(0.8, 1.1, 3)
        fill = tuple(int(min(255, v * j)) for v, j in zip(COLOURS[colour], jitter, strict=True))
        r = size * rng.uniform(0.1, 0.2)
        cx, cy = rng.uniform(r * 0.5, size - r * 0.5, 2)
        _draw_shape(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), fill)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 0.8))))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------------------------------
# Dataset generation


def generate(cfg: SynthConfig, out_dir: str | os.PathLike) -> Path:
    """Write a dataset directory (images + manifest) for ``cfg``; returns ``out_dir``."""
    out = Path(out_dir)
    model, class_names = _label_model(cfg, np.random.default_rng([cfg.seed, 99]))
    num_classes = len(class_names)
    ids, labels, splits, paths = [], [], [], []
    split_sizes = {
        "train": cfg.num_train,
        "val": cfg.num_val,
        "test": cfg.num_test,
        "test_shift": cfg.num_test_shift,
    }
    train_freq = None
    for split, n in split_sizes.items():
        if n == 0:
            continue
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([cfg.seed, SPLIT_CODES[split], i])
            if split == "test_shift":
                row: list[int] = []
                while not row:  # independent classes, training frequencies, at least one
                    row = np.flatnonzero(rng.random(num_classes) < train_freq).tolist()
            else:
                row = [int(c) for c in model.sample(rng)]
            image_id = f"{split}_{i:06d}"
            rel = f"images/{split}/{image_id}.png"
            render_image(row, cfg.image_size, rng, cfg.class_offset).save(
                out / rel, compress_level=6
            )
            ids.append(image_id)
            labels.append(row)
            splits.append(split)
            paths.append(rel)
        if split == "train":
            train_freq = np.zeros(num_classes)
            for row in labels:
                train_freq[row] += 1
            train_freq /= len(labels)
    info = ManifestInfo(
        class_names=class_names,
        name="synth",
        source={"generator": "mlcore.data.synth", "version": GENERATOR_VERSION, **_content(cfg)},
    )
    write_manifest(out, build_table(ids, labels, splits, paths=paths), info)
    if cfg.compositional:
        attribute_embeddings(num_classes, cfg.seed).save(out / DATASET_FILE)
    return out


def _content(cfg: SynthConfig) -> dict:
    # Fields added later count only when set, so existing datasets keep their bytes and hash.
    return result_content(cfg)


def config_hash(cfg: SynthConfig) -> str:
    """Content hash of a synth config (a ``labels_from`` file counts by its bytes)."""
    payload = {"version": GENERATOR_VERSION, **_content(cfg)}
    if cfg.labels_from is not None:
        payload["labels_from"] = hashlib.sha256(Path(cfg.labels_from).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def ensure_generated(cfg: SynthConfig, cache_dir: str | os.PathLike) -> Path:
    """Return the cached dataset for ``cfg``, generating it on first use.

    Generation writes to a temporary sibling and renames it into place, so concurrent callers
    (two Ray workers on one node) never see a half-written dataset.
    """
    cache = Path(cache_dir).expanduser().resolve()
    target = cache / f"synth-{config_hash(cfg)}"
    if manifest_path(target).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".synth-tmp-"))
    try:
        generate(cfg, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not manifest_path(target).is_file():  # lost a race to a complete copy: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
