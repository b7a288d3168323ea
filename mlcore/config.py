"""Config sections of the ML core: data, model, loss, training and the CPSD algorithm.

Each section is a frozen, keyword-only dataclass; every field is documented where it is
defined and checked in ``__post_init__``. ``workflows.config.Config`` composes these with the
Ray, Tune and MLflow sections into the one schema every command reads.
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mlcore import configlib
from mlcore.configlib import FILE, KEYED_WHEN_SET, NOT_RESULT, ConfigError, check


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Generated benchmark data (see ``mlcore.data.synth``)."""

    num_classes: int = 20
    """Number of object classes (at most 80: 10 shapes x 8 colours)."""
    num_train: int = 1600
    """Training images."""
    num_val: int = 400
    """Validation images (model selection)."""
    num_test: int = 400
    """Images of the held-out ``test`` split, drawn like train and val; the split results are
    reported on (0: none)."""
    num_test_shift: int = 0
    """Images of the extra ``test_shift`` split whose labels ignore co-occurrence (0: none)."""
    image_size: int = 64
    """Side of the square images in pixels."""
    num_topics: int = 5
    """Latent scenes of the built-in label model; each makes a group of classes co-occur."""
    mean_objects: float = 2.5
    """Mean number of objects per image (at least one)."""
    tail_exponent: float = 0.8
    """Class frequencies of the built-in label model fall like 1/rank^s: 0.8 is a mild tail
    (the demo: 135 to 647 training images per class); about 2 gives a COCO-LT-like long tail
    with classes of a handful of images (the DB loss study)."""
    labels_from: str | None = None
    """Optional ``.npz`` with real label statistics: a ``labels`` matrix (sampled per image) or
    ``class_counts`` + ``pair_counts`` (sampled pairwise); class names from ``class_names``."""
    class_offset: int = field(default=0, metadata=KEYED_WHEN_SET)
    """Draw the objects of classes ``class_offset .. class_offset + num_classes − 1`` of the 80
    shape × colour combinations (names follow): an upstream task whose classes are disjoint
    from a downstream one's (``pretrain.synth``: 60 classes from 20 on, beside 20 downstream)."""
    compositional: bool = False
    """Zero-shot benchmark: also write ``class_embeddings.npz``, each class's (shape, colour)
    attribute vector through a fixed random projection plus noise (``mlcore.data.synth``)."""
    seed: int = 0
    """Seed: the same config gives a byte-identical manifest."""

    def __post_init__(self) -> None:
        check(1 <= self.num_classes <= 80, "data.synth.num_classes must be in [1, 80]")
        check(
            self.class_offset >= 0 and self.class_offset + self.num_classes <= 80,
            "data.synth: class_offset + num_classes must be at most 80 (10 shapes x 8 colours)",
        )
        check(
            self.class_offset == 0 or (self.labels_from is None and not self.compositional),
            "data.synth.class_offset draws the built-in classes; it cannot use labels_from or "
            "compositional",
        )
        check(self.num_train > 0 and self.num_val > 0, "data.synth needs train and val images")
        check(self.num_test >= 0, "data.synth.num_test must be >= 0")
        check(self.num_test_shift >= 0, "data.synth.num_test_shift must be >= 0")
        check(
            not (self.compositional and self.labels_from is not None),
            "data.synth.compositional draws its own classes; it cannot use labels_from",
        )
        check(16 <= self.image_size <= 512, "data.synth.image_size must be in [16, 512]")
        check(self.num_topics >= 1, "data.synth.num_topics must be >= 1")
        check(self.mean_objects >= 1, "data.synth.mean_objects must be >= 1")
        check(self.tail_exponent >= 0, "data.synth.tail_exponent must be >= 0")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the images and labels come from and how they are fed to the model."""

    root: str | None = field(default=None, metadata=NOT_RESULT)
    """Dataset directory holding ``manifest.parquet`` (see ``mlcore.data.manifest``): a local
    path or an object-store URI (``s3://bucket/prefix``, ``gs://...``). Where the data lives is
    not part of a result's identity: stage keys hash the content of the splits a stage reads
    (``mlcore.fingerprint``)."""
    synth: SynthConfig | None = field(default=None, metadata=NOT_RESULT)
    """Generate the dataset instead (cached under ``cache_dir`` by content hash); with neither
    ``root`` nor ``synth`` set, the default generated dataset is used. Like ``root``, keyed by
    the content of the splits read, so adding a split leaves training keys unchanged."""
    cache_dir: str = field(default=".cache/cpsd", metadata=NOT_RESULT)
    """Where generated datasets (and copies of remote ones) are cached; relative paths are
    resolved against the cwd."""
    cache_remote: bool = field(default=True, metadata=NOT_RESULT)
    """Copy a remote dataset's manifest and images into ``cache_dir`` on first read (per node),
    so later epochs and stages read local files."""
    train_split: str = "train"
    """Split used for training and label statistics."""
    val_split: str = "val"
    """Split used for validation and model selection."""
    test_split: str = "test"
    """Held-out split the selected weights are reported on (skipped when the dataset lacks it);
    never used to choose anything."""
    shift_split: str = "test_shift"
    """Optional context-shift split, reported like ``test_split`` (skipped when absent)."""
    image_size: int = 64
    """Model input side in pixels (images are resized to a square)."""
    random_crop: bool = True
    """Random crop (padding 1/8 of the side) at training time."""
    hflip: bool = True
    """Random horizontal flip at training time."""
    randaugment: bool = False
    """RandAugment (torchvision, 2 ops, magnitude 9) at training time, as the ASL pipeline."""
    cutout: float = 0.0
    """Cutout: side of the erased square as a fraction of the image side (0 disables)."""
    augment: Literal["basic", "randaug"] = field(default="basic", metadata=KEYED_WHEN_SET)
    """Training augmentation preset on top of ``random_crop``/``hflip``. ``basic``: nothing
    more (or ``randaugment``/``cutout`` as set); ``randaug``: the CPSD/ASL authors' recipe with
    timm's transforms, RandAugment (2 ops, magnitude 9 ± 0.5) and a Cutout of half the image
    side filled with a random colour (``mlcore.data.dataset.build_transform``). Seeded per
    sample like every augmentation."""
    class_aware_sampling: bool = False
    """Draw training images with the DB paper's class-aware re-sampling."""
    num_workers: int | Literal["auto"] = field(default="auto", metadata=NOT_RESULT)
    """DataLoader worker processes (0 decodes in the training process). ``auto``: one less than
    the CPUs the training process holds (its Ray task's ``ray.teacher_cpus`` /
    ``ray.student_cpus``, or this machine's CPUs outside Ray), at most 16. Results do not depend
    on it: each sample's augmentation is seeded by its position in the epoch."""
    decoder: Literal["pil", "torchvision", "simplejpeg"] = field(
        default="simplejpeg", metadata=NOT_RESULT
    )
    """Image decoder (``mlcore.data.dataset.DECODERS``); all give the same pixels (tested), see
    ``docs/benchmarks.md`` for their speed."""
    decode_on: Literal["loader", "device"] = field(default="loader", metadata=NOT_RESULT)
    """Where images are decoded and transformed: ``loader`` (DataLoader workers, on CPUs) or
    ``device`` (the training device, a batch at a time: JPEGs through nvjpeg on a GPU; on a CPU
    device, or for other formats, with ``decoder`` on the CPU)."""
    class_embeddings: str | None = field(default=None, metadata=FILE)
    """Class embedding file for word queries (``model.ml_decoder.queries: word``): GloVe,
    fastText or word2vec text (``.txt``/``.vec``) or ``.npz``/``.npy`` with a names array (see
    ``mlcore.data.embeddings``). None: the dataset's own ``class_embeddings.npz`` (written by
    ``cpsd data synth --compositional``). Keyed by content, like ``model.pretrained_file``."""

    def __post_init__(self) -> None:
        check(
            self.root is None or self.synth is None,
            "data: set only one of data.root (a dataset directory) or data.synth",
        )
        if self.root is None and self.synth is None:
            object.__setattr__(self, "synth", SynthConfig())
        check(self.image_size >= 16, "data.image_size must be >= 16")
        check(0.0 <= self.cutout < 1.0, "data.cutout must be in [0, 1)")
        check(
            self.augment == "basic" or (not self.randaugment and self.cutout == 0),
            "data.augment: randaug brings its own RandAugment and Cutout; leave "
            "data.randaugment and data.cutout unset",
        )
        check(
            self.num_workers == "auto" or self.num_workers >= 0,
            "data.num_workers must be >= 0 or 'auto'",
        )


@dataclass(frozen=True, kw_only=True)
class MLDecoderConfig:
    """ML-Decoder head settings (paper defaults)."""

    num_groups: int | None = None
    """Group queries K; None means min(100, num_classes)."""
    embed_dim: int = 768
    """Decoder width D."""
    num_layers: int = 1
    """Decoder layers (cross-attention + feed-forward, no self-attention)."""
    ff_dim: int = 2048
    """Feed-forward hidden width."""
    num_heads: int = 8
    """Cross-attention heads."""
    dropout: float = 0.1
    """Dropout in the decoder layer."""
    queries: Literal["learned", "fixed", "word"] = "fixed"
    """``fixed``: random group queries kept fixed (the paper's choice, §2.3.2 (3));
    ``learned``: trained group queries; ``word``: one query per class from its class embedding
    (``data.class_embeddings``) through a shared Linear + ReLU, scored by a group FC shared by
    all queries, so the head scores any set of classes, unseen ones included (§2.3.3)."""
    query_noise: float = 0.1
    """Word queries, training only: size of the Gaussian noise added each batch to the
    unit-norm class embeddings (per-coordinate std ``query_noise / sqrt(E)``, so the noise
    vector's norm is about ``query_noise``); the paper's query-noise augmentation, the value is
    ours (the paper's is in an appendix we do not have)."""
    random_queries: int = 4
    """Word queries, training only: random unit vectors added as extra queries each batch,
    every image labelled positive for them (the paper's random-query augmentation; the count
    is ours)."""

    def __post_init__(self) -> None:
        check(
            self.num_groups is None or self.num_groups >= 1,
            "model.ml_decoder.num_groups must be >= 1",
        )
        check(
            self.queries != "word" or self.num_groups is None,
            "model.ml_decoder.queries: word decodes one query per class; leave num_groups unset",
        )
        check(self.query_noise >= 0, "model.ml_decoder.query_noise must be >= 0")
        check(self.random_queries >= 0, "model.ml_decoder.random_queries must be >= 0")


@dataclass(frozen=True, kw_only=True)
class RNNConfig:
    """The orderless CNN-RNN decoder (PLA paper §3.1 and the authors' ``model.py``).

    Defaults are the paper's sizes; the decoder runs ``max_steps + 1`` steps so that the
    ``<end>`` token always fits after the longest label set.
    """

    embed_dim: int = 256
    """Size of the label embeddings fed back as the next step's input (paper: 256)."""
    hidden_dim: int = 512
    """LSTM hidden and cell size (paper: 512); h0 and c0 are linear maps of the pooled vector."""
    attention_dim: int = 512
    """Width of the additive soft attention over the spatial map (paper: 512)."""
    dropout: float = 0.0
    """Dropout on the fed-back label embeddings and on the LSTM output before the classifier
    (the authors' ``-dropout``, default 0)."""
    attention_dropout: float = 0.5
    """Dropout on the spatial features inside the attention, redrawn every step (authors: 0.5)."""
    max_steps: int = 19
    """Most labels one image may have (the authors run 20 steps for at most 18 COCO labels). A
    dataset image with more is an error, raised before training starts."""

    def __post_init__(self) -> None:
        for name in ("embed_dim", "hidden_dim", "attention_dim", "max_steps"):
            check(getattr(self, name) >= 1, f"model.rnn.{name} must be >= 1")
        for name in ("dropout", "attention_dropout"):
            check(0.0 <= getattr(self, name) < 1.0, f"model.rnn.{name} must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Backbone and classification head."""

    backbone: str = "resnet50"
    """Any timm model name (resnet18/50/101, tresnet_m, convnext_tiny, ...)."""
    backbone_args: dict[str, Any] = field(default_factory=dict)
    """Extra ``timm.create_model`` keyword arguments, e.g. ``{output_stride: 8}`` for a finer
    ResNet feature map (more tokens for ML-Decoder at low resolution) or ``{img_size: 64}``
    for a ViT."""
    head: str = "gap"
    """A registered model family (``mlcore.models.family``; ``workflows.config.Config`` checks
    the name): ``gap``: global average pooling + linear; ``ml_decoder``: the ML-Decoder head;
    ``rnn``: the orderless LSTM decoder with attention (PLA), trained with
    ``loss.name: orderless``."""
    pretrained: bool = False
    """Load timm's pretrained weights (needs the hub or a local cache)."""
    pretrained_file: str | None = field(default=None, metadata=FILE)
    """Local weights file for the backbone (for machines without internet); keyed by its
    content, so replaced weights at the same path are never silently reused."""
    drop_rate: float = 0.0
    """Dropout before the classifier (GAP head)."""
    ml_decoder: MLDecoderConfig = field(default_factory=MLDecoderConfig)
    """Used when ``head: ml_decoder``."""
    rnn: RNNConfig = field(default_factory=RNNConfig)
    """Used when ``head: rnn``."""
    encoder_checkpoint: str | None = field(default=None, metadata=FILE)
    """``head: rnn``: initialise the encoder from this checkpoint of a ``head: gap`` model of
    the same backbone (the PLA paper's stage 1, a BCE-trained classifier; its classifier is
    dropped). Read when training starts only: a trained model is rebuilt from this config, the
    number of classes and its own weights."""

    def __post_init__(self) -> None:
        check(
            self.encoder_checkpoint is None or self.head == "rnn",
            "model.encoder_checkpoint needs model.head: rnn",
        )


@dataclass(frozen=True, kw_only=True)
class LossConfig:
    """Classification loss (teachers and student): one registered loss and its own settings.

    In YAML the section names the loss and holds its settings under the same name::

        loss:
          name: asl                 # bce, focal, asl, db, orderless (mlcore.losses)
          asl: {gamma_neg: 4, clip: 0.05, adaptive: {enabled: true}}

    Each loss's settings are its module's dataclass (``ASLSettings``, ``FocalSettings``,
    ``DBSettings``, ``OrderlessSettings`` in ``mlcore.losses``); the parsed config carries only
    the selected one's. A section for another loss is not used, and a line says so when it
    differs from that loss's defaults (a base config tuned for one loss stays usable as
    ``--set loss.name=...`` for another). The layout before losses were registered (ASL, focal
    and orderless settings at the top of the section, ``loss.gamma_neg``) is still read, with
    one deprecation line.
    """

    name: str = "asl"
    """Which loss; ``orderless`` is the label-sequence cross-entropy of ``model.head: rnn``."""
    settings: Any = None
    """The selected loss's settings dataclass (None: its defaults); YAML ``loss.<name>``."""
    source: str | None = field(default=None, metadata=NOT_RESULT)
    """Where these settings came from (e.g. a sweep's MLflow run id); recorded, not used."""

    def __post_init__(self) -> None:
        # The registry imports the loss modules (torch); a config is parsed only to run them.
        from mlcore.losses.registry import loss_spec

        spec = loss_spec(self.name)
        if self.settings is None:
            object.__setattr__(self, "settings", spec.settings())
        check(
            isinstance(self.settings, spec.settings),
            f"loss.settings of loss {self.name!r} must be {spec.settings.__name__}, got "
            f"{type(self.settings).__name__}",
        )

    @classmethod
    def from_plain(cls, data: Mapping[str, Any], key: str = "") -> LossConfig:
        """Parse the YAML section (new or old layout; see the class docstring)."""
        from mlcore.losses.registry import LOSSES, loss_spec

        key = key or "loss"
        data = dict(data)
        name = data.pop("name", "asl")
        source = data.pop("source", None)
        check(isinstance(name, str), f"{key}.name: expected a string, got {name!r}")
        check(source is None or isinstance(source, str), f"{key}.source: expected a string")
        try:
            spec = loss_spec(name)
        except ConfigError as err:  # named by where the section sits (a study's variant)
            raise ConfigError(f"{key}.{str(err).removeprefix('loss.')}") from None
        flat = {
            f.name: other.name
            for other in LOSSES.values()
            if other.legacy_path == ""
            for f in dataclasses.fields(other.settings)
        }
        sections: dict[str, Any] = {n: data.pop(n) for n in list(data) if n in LOSSES}
        moved = []
        for old, value in data.items():
            if old not in flat:
                known = ["name", "source", *LOSSES, *flat]
                close = difflib.get_close_matches(old, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key '{key}.{old}'{hint}")
            owner = flat[old]
            section = dict(sections.get(owner) or {})
            section[old] = _merged(section.get(old), value)
            sections[owner] = section
            moved.append(f"{key}.{old} -> {key}.{owner}.{old}")
        parsed = {
            n: configlib.from_dict(LOSSES[n].settings, section or {}, prefix=f"{key}.{n}")
            for n, section in sections.items()
        }
        unused = [n for n, s in parsed.items() if n != name and s != LOSSES[n].settings()]
        notes = []
        if moved:
            notes.append(f"deprecated loss layout, read as {', '.join(moved)}")
        if unused:
            names = ", ".join(f"{key}.{n}" for n in unused)
            notes.append(f"{names} not used: {key}.name is {name}")
        if notes:
            warnings.warn(f"config: {'; '.join(notes)}", configlib.ConfigWarning, stacklevel=2)
        return cls(name=name, settings=parsed.get(name, spec.settings()), source=source)

    def to_plain(self) -> dict[str, Any]:
        """``{"name": ..., <name>: settings, "source": ...}`` (a loss without settings: none)."""
        out: dict[str, Any] = {"name": self.name}
        if dataclasses.fields(self.settings):
            out[self.name] = configlib.to_dict(self.settings)
        out["source"] = self.source
        return out

    def key_content(self, content: Callable[[Any], Any]) -> dict[str, Any]:
        """The section as stage keys hash it: the layout of the one loss section keys were
        first published with, so a finished stage keeps its key.

        Every loss with a ``legacy_path`` contributes its settings there (the selected loss its
        own, the others their defaults, as that section held them); a loss added since
        contributes only when selected, under its name. ``content`` turns settings into their
        result fields (``configlib.result_content``).
        """
        from mlcore.losses.registry import LOSSES

        out: dict[str, Any] = {"name": self.name}
        for spec in LOSSES.values():
            selected = spec.name == self.name
            if spec.legacy_path is None and not selected:
                continue
            fields = content(self.settings if selected else spec.settings())
            if spec.legacy_path == "":
                out.update(fields)
            else:
                out[spec.legacy_path or spec.name] = fields
        return out


def _merged(base: Any, update: Any) -> Any:
    """``update`` over ``base``, mappings merged key by key."""
    if isinstance(base, Mapping) and isinstance(update, Mapping):
        return {**base, **{k: _merged(base.get(k), v) for k, v in update.items()}}
    return update


@dataclass(frozen=True, kw_only=True)
class SWAConfig:
    """Stochastic weight averaging (Izmailov et al., 2018), as the PLA authors train stage 2."""

    enabled: bool = False
    """Keep a running mean of the weights; validation also scores it (BN statistics
    recomputed on the training data) and keeps the best of plain, EMA and SWA weights."""
    start_epoch: int = 0
    """First epoch (0-based) whose weights enter the average."""
    every_steps: int = 4
    """Average after every this many optimiser steps (the authors: every 4 iterations, at the
    low point of their cyclical learning rate; here the loop's own schedule runs unchanged)."""

    def __post_init__(self) -> None:
        check(self.start_epoch >= 0, "train.swa.start_epoch must be >= 0")
        check(self.every_steps >= 1, "train.swa.every_steps must be >= 1")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training loop (``mlcore.train.train``)."""

    epochs: int = 20
    """Passes over the training data."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 1e-4
    """Peak learning rate of the OneCycle schedule."""
    weight_decay: float = 1e-4
    """Adam weight decay (not applied to biases and norm layers)."""
    pct_start: float = 0.2
    """Fraction of the schedule spent warming up (OneCycle)."""
    ema: bool = True
    """Keep an EMA of the weights; validation keeps the better of EMA and plain weights."""
    ema_decay: float = 0.9997
    """EMA decay (with timm's warm-up, so short runs still move)."""
    swa: SWAConfig = field(default_factory=SWAConfig)
    """Stochastic weight averaging."""
    select_metric: Literal["mAP", "CF1", "OF1"] = "mAP"
    """Validation metric that keeps the best epoch (``best.pt``) and picks between plain,
    EMA and SWA weights."""
    amp: bool = True
    """bf16 autocast when running on a GPU (ignored on CPU)."""
    channels_last: bool = True
    """channels_last memory format on GPU."""
    grad_clip: float | None = None
    """Clip the gradient norm to this value (None: no clipping)."""
    seed: int = 0
    """Seed for initialisation, shuffling and augmentation."""
    num_threads: int | None = field(default=None, metadata=NOT_RESULT)
    """torch CPU threads (None: leave as set by the environment)."""
    device: str = field(default="auto", metadata=NOT_RESULT)
    """``auto`` (CUDA if present), ``cpu``, ``cuda`` or ``cuda:N``."""
    eval_batch_size: int | None = field(default=None, metadata=NOT_RESULT)
    """Validation batch size (None: 2 x batch_size)."""

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "train.epochs must be >= 1")
        check(self.batch_size >= 1, "train.batch_size must be >= 1")
        check(self.lr > 0, "train.lr must be > 0")
        check(0 < self.pct_start < 1, "train.pct_start must be in (0, 1)")
        check(0 < self.ema_decay < 1, "train.ema_decay must be in (0, 1)")
        check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip must be > 0")


@dataclass(frozen=True, kw_only=True)
class CPSDConfig:
    """The CPSD algorithm (paper §3) and its ablation modes (Table 3, Fig. 3)."""

    mode: Literal["baseline", "sd", "cgpd", "dgpd", "cpsd", "random"] = "cpsd"
    """``baseline``: no teachers; ``sd``: one full-label teacher; ``cgpd``/``dgpd``: k CGP/DGP
    teachers; ``cpsd``: both (2k teachers); ``random``: k teachers on a random partition."""
    k: int = 5
    """Label subsets per partition (the paper's choice: 5)."""
    tau: float = 3.0
    """τ-th root smoothing of the co-occurrence probabilities (paper: 3; authors' script: 2)."""
    partition_seed: int = 0
    """Seed of the spectral k-means restarts and of the random partition."""
    teacher_mode: Literal["online", "cached"] = "cached"
    """``online``: teachers run on every student batch; ``cached``: their logits are computed
    once per training image (eval transform) and read back by index."""
    teacher_epochs: int | None = None
    """Teacher training epochs (None: train.epochs). The paper's text says 20 for teachers and
    80 for the student; the authors' scripts train both for 80 (``train_B_part.py`` hard-codes
    ``Epochs = 80``)."""
    teacher_seeds: Literal["independent", "shared"] = "independent"
    """``independent``: each teacher's ``train.seed`` is derived from its stage (ensemble kind
    and index; see ``mlcore.cpsd.teacher_seed``), so teachers differ in initial weights and batch
    order, as the authors' separately launched teacher runs do; ``shared``: every teacher and
    the student use ``train.seed`` itself."""
    student_epochs: int | None = None
    """Student training epochs (None: train.epochs; authors' script: 80, as their teachers;
    the paper's text: 80 against 20 for teachers). The baseline always trains
    ``train.epochs``."""
    student_lr_scale: float = 1.0
    """Student peak lr = ``student_lr_scale · train.lr`` (authors' script: 0.1, i.e. 1e-5
    against their teachers' 1e-4, starting from ImageNet weights)."""
    kd_reduction: Literal["sum", "mean"] = "sum"
    """Reduction of *both* student terms, classification and distillation: ``sum`` over batch
    and classes (the authors' ASL and MSE) or ``mean`` over them. One convention for both, so
    their ratio does not depend on the loss, the batch size or the number of classes."""
    student_init: Literal["scratch", "pretrained", "baseline"] | None = None
    """Student's initial weights. ``scratch``: random; ``pretrained``: the backbone weights of
    ``model.pretrained``/``model.pretrained_file`` (the authors: ImageNet); ``baseline``: the
    trained baseline's selected weights (our extension, not in the paper; needs
    ``train_baseline``). None: like every model, pretrained when ``model`` says so, else random."""
    logits_dtype: Literal["float32", "float16"] = "float32"
    """Storage type of cached teacher logits (``teacher_mode: cached``); float16 halves their
    disk and I/O at a precision of about 1e-3 relative."""
    cls_weight: float = 0.5
    """Weight of the student's classification loss (authors' code: 0.5)."""
    kd_alpha: float = 0.5
    """α splitting the distillation weight: α/2 on the CGP MSE, (1 − α)/2 on the DGP MSE."""
    train_baseline: bool = False
    """Also train the plain baseline (same model and loss, no teachers) for comparison."""
    control_ensemble: int = 0
    """Train this many more plain models beside the baseline, each with its own seed
    (``mlcore.cpsd.control_seed``), and report ``ensemble-baseline``: the mean logits of the
    baseline and them, a plain ensemble to set against the teachers' (2k − 1 matches the 2k
    teachers of ``cpsd``). Implies training the baseline. Their stages are keyed like any
    plain model, so variants that share a baseline share them."""

    def __post_init__(self) -> None:
        check(self.k >= 1, "cpsd.k must be >= 1")
        check(self.tau > 0, "cpsd.tau must be > 0")
        check(0.0 <= self.kd_alpha <= 1.0, "cpsd.kd_alpha must be in [0, 1]")
        check(self.cls_weight >= 0, "cpsd.cls_weight must be >= 0")
        check(self.teacher_epochs is None or self.teacher_epochs >= 1, "cpsd.teacher_epochs >= 1")
        check(self.student_epochs is None or self.student_epochs >= 1, "cpsd.student_epochs >= 1")
        check(self.student_lr_scale > 0, "cpsd.student_lr_scale must be > 0")
        check(self.control_ensemble >= 0, "cpsd.control_ensemble must be >= 0")


def _upstream_synth() -> SynthConfig:
    return SynthConfig(num_classes=60, class_offset=20, num_train=8000, num_val=1000, num_test=0)


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """An upstream task whose backbone initialises every model: our offline stand-in for the
    ImageNet weights the CPSD paper fine-tunes (``pretrain`` stage, ``mlcore.pretrain``).

    One plain model (``model.backbone`` with a GAP head, the default ASL loss, ``train``'s
    batch size and schedule) trains on generated images of classes disjoint from the
    downstream ones; its selected backbone weights become ``model.pretrained_file`` of every
    teacher, student and baseline, so their stage keys follow the weights' bytes. It does not
    depend on the downstream seed: every seed and variant of a study shares one stage.
    """

    enabled: bool = False
    """Train the upstream task and start every model from its backbone."""
    synth: SynthConfig = field(default_factory=_upstream_synth)
    """The upstream data: by default 60 of the 80 shape × colour classes (20 on, disjoint from
    a downstream task of up to 20 default classes), 8,000 training and 1,000 val images."""
    epochs: int = 15
    """Upstream training epochs."""
    lr: float | None = None
    """Upstream peak lr (None: ``train.lr``)."""
    seed: int = 0
    """Upstream ``train.seed`` (initial weights, batch order, augmentation)."""

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "pretrain.epochs must be >= 1")
        check(self.lr is None or self.lr > 0, "pretrain.lr must be > 0")


UNSEEN_FROM_MANIFEST = "manifest"
"""``zsl.unseen_classes`` value that reads the zero-shot split an importer recorded."""


@dataclass(frozen=True, kw_only=True)
class ZSLConfig:
    """The zero-shot protocol (``mlcore.zsl``): train on seen classes, score unseen ones."""

    unseen_classes: tuple[str, ...] | str = ()
    """Classes held out of training: a list of class names, a text file with one name per
    line, or ``manifest`` for the split an importer recorded (``source.zsl.unseen``). Empty:
    no zero-shot protocol. The ZSL and GZSL evaluation runs on ``data.test_split``."""
    chance_draws: int = 5
    """Random-score draws averaged into ``zsl_mAP_chance`` and ``gzsl_mAP_chance``."""

    def __post_init__(self) -> None:
        check(self.unseen_classes != "", "zsl.unseen_classes: give names, a file or 'manifest'")
        check(self.chance_draws >= 1, "zsl.chance_draws must be >= 1")

    @property
    def enabled(self) -> bool:
        """True when some classes are held out."""
        return bool(self.unseen_classes)


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """The ML sections every command shares (``workflows`` adds Ray, Tune and MLflow)."""

    name: str = "experiment"
    """Run name: MLflow parent run name and the folder under ``storage_path``."""
    storage_path: str = "runs"
    """Artifacts root every node can reach: a local directory, or ``s3://``/``gs://``."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone and head."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Classification loss (teachers and student)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    cpsd: CPSDConfig = field(default_factory=CPSDConfig)
    """CPSD algorithm."""
    zsl: ZSLConfig = field(default_factory=ZSLConfig)
    """Zero-shot protocol (``cpsd train`` with word queries)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """Upstream pretraining on generated data (the pipeline's ``pretrain`` stage)."""

    def __post_init__(self) -> None:
        init = self.cpsd.student_init
        check(
            init != "pretrained"
            or self.model.pretrained
            or self.model.pretrained_file
            or self.pretrain.enabled,
            "cpsd.student_init: pretrained needs model.pretrained, model.pretrained_file or "
            "pretrain.enabled",
        )
        check(
            not self.pretrain.enabled
            or (not self.model.pretrained and self.model.pretrained_file is None),
            "pretrain.enabled fills model.pretrained_file itself; unset model.pretrained and "
            "model.pretrained_file",
        )
        check(
            not self.pretrain.enabled or "://" not in self.storage_path,
            "pretrain.enabled needs a local storage_path (every model reads the upstream "
            "weights as a local model.pretrained_file)",
        )
        check(
            init != "baseline" or (self.cpsd.train_baseline and self.cpsd.mode != "baseline"),
            "cpsd.student_init: baseline needs cpsd.train_baseline: true and a mode with teachers",
        )
        # Whether the head goes with the loss and the CPSD mode is its family's to say
        # (mlcore.models.family.check_family, called by workflows.config.Config).
        decoder = self.model.ml_decoder
        word = self.model.head == "ml_decoder" and decoder.queries == "word"
        check(
            not self.zsl.enabled or word,
            "zsl.unseen_classes needs model.head: ml_decoder with model.ml_decoder.queries: word",
        )
        check(
            not self.zsl.enabled
            or self.data.test_split not in (self.data.train_split, self.data.val_split),
            f"zero-shot evaluation needs a held-out data.test_split, not the train or val split "
            f"({self.data.test_split!r})",
        )
        # The random-query logits have no column in the targets the DB statistics and the
        # adaptive controller are computed over.
        adaptive = getattr(self.loss.settings, "adaptive", None)
        check(
            not (word and decoder.random_queries > 0)
            or (self.loss.name != "db" and not (adaptive and adaptive.enabled)),
            "model.ml_decoder.random_queries > 0 works with loss bce/focal/asl without "
            "loss.asl.adaptive; set model.ml_decoder.random_queries=0",
        )
