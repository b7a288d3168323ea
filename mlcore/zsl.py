"""The zero-shot multi-label protocol: train on seen classes, score unseen ones by their words.

ML-Decoder with word queries (§2.3.3; ``mlcore.models.ml_decoder``) scores a class from its
embedding alone, so a model trained on the *seen* classes can rank classes it never saw. The
protocol, as in the NUS-WIDE benchmark of the paper's Table 6 (925 seen tags, 81 unseen
concepts), with model selection fixed:

* ``zsl.unseen_classes`` names the held-out classes; the rest are seen.
* Training (``mlcore.experiment.train_classifier``): targets are the seen classes only, and
  images without a seen label are left out. Model selection uses the seen classes on the
  ``val`` split (images with a seen label), never an unseen class: the authors' script selects
  on the unseen test set, which makes the reported number a best-of-epochs on test.
* Evaluation (:func:`evaluate_zero_shot`) on ``data.test_split`` with the selected weights, all
  classes' embeddings handed to the head at once (the logit of a class does not depend on the
  other classes scored with it):

  - **ZSL**: the unseen columns, on images with at least one unseen label;
  - **GZSL**: all columns, on images with at least one label.

  Each reports mAP (``mlcore.metrics``: mean AP over classes with a positive) and F1@3, F1@5
  (``mlcore.metrics.f1_at_k``: each image's top-k classes, overall precision ``TP/(k·images)``
  and recall ``TP/positives``, as LESA/BiAM/ML-Decoder report them). ``zsl_mAP_chance`` and
  ``gzsl_mAP_chance`` are the mAP of uniform random scores on the same matrices, averaged over
  ``zsl.chance_draws`` seeded draws: how far above chance the model is.

Metric names: ``zsl_mAP``, ``zsl_F1@3``, ``zsl_F1@5``, ``gzsl_mAP``, ``gzsl_F1@3``,
``gzsl_F1@5``, ``zsl_mAP_chance``, ``gzsl_mAP_chance``, plus the evaluation sizes
``zsl_images``, ``gzsl_images``, ``num_seen`` and ``num_unseen``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mlcore.config import UNSEEN_FROM_MANIFEST, ExperimentConfig, ModelConfig, ZSLConfig
from mlcore.configlib import ConfigError
from mlcore.data.embeddings import ClassEmbeddings, dataset_class_embeddings
from mlcore.data.loading import OpenDataset, eval_loader
from mlcore.data.manifest import ManifestInfo
from mlcore.metrics import f1_at_k, mean_average_precision
from mlcore.models import build_model_from_config, word_query_table
from mlcore.train import load_checkpoint, resolve_device

__all__ = [
    "TOP_K",
    "ZeroShotSplit",
    "evaluate_zero_shot",
    "load_word_query_model",
    "score_classes",
    "zero_shot_metrics",
    "zero_shot_split",
]

TOP_K = (3, 5)
"""The k of the reported F1@k (the literature's)."""


@dataclass(frozen=True)
class ZeroShotSplit:
    """Seen and unseen class indices into the dataset's class list.

    Attributes:
        class_names: All classes, dataset order.
        seen: Indices of the seen classes, ascending.
        unseen: Indices of the unseen classes, ascending.
    """

    class_names: tuple[str, ...]
    seen: tuple[int, ...]
    unseen: tuple[int, ...]


def _unseen_names(cfg: ZSLConfig, info: ManifestInfo) -> list[str]:
    value = cfg.unseen_classes
    if isinstance(value, tuple):
        return list(value)
    if value == UNSEEN_FROM_MANIFEST:
        recorded = info.source.get("zsl", {}).get("unseen")
        if not recorded:
            raise ConfigError(
                f"zsl.unseen_classes: manifest, but dataset {info.name!r} records no zero-shot "
                "split (source.zsl.unseen); list the unseen classes or give a file"
            )
        return list(recorded)
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"zsl.unseen_classes: {value!r} is neither 'manifest' nor a file; give a list of "
            "names, a file with one name per line, or 'manifest'"
        )
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def zero_shot_split(cfg: ZSLConfig, info: ManifestInfo) -> ZeroShotSplit:
    """Resolve ``zsl.unseen_classes`` against the dataset's classes.

    Raises:
        ConfigError: Unknown or repeated names (all listed), or no seen class left.
    """
    names = _unseen_names(cfg, info)
    index = {n: i for i, n in enumerate(info.class_names)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise ConfigError(
            f"zsl.unseen_classes: {len(unknown)} names are not classes of dataset "
            f"{info.name!r}: {unknown[:20]}"
        )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"zsl.unseen_classes: names listed twice: {repeated}")
    unseen = sorted(index[n] for n in names)
    seen = sorted(set(range(info.num_classes)) - set(unseen))
    if not seen:
        raise ConfigError("zsl.unseen_classes holds every class: nothing left to train on")
    return ZeroShotSplit(info.class_names, tuple(seen), tuple(unseen))


def _report(scores: np.ndarray, targets: np.ndarray, prefix: str) -> dict[str, float]:
    out = {f"{prefix}_mAP": mean_average_precision(scores, targets)}
    for k in TOP_K:
        if k <= scores.shape[1]:  # F1@5 needs five classes to rank
            out[f"{prefix}_F1@{k}"] = f1_at_k(scores, targets, k)["f1"]
    return out


def _chance_map(targets: np.ndarray, draws: int, rng: np.random.Generator) -> float:
    draws_map = [mean_average_precision(rng.random(targets.shape), targets) for _ in range(draws)]
    return float(np.mean(draws_map))


def zero_shot_metrics(
    scores: np.ndarray,
    targets: np.ndarray,
    split: ZeroShotSplit,
    *,
    chance_draws: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """ZSL and GZSL metrics of scores over all classes (see the module docstring).

    Args:
        scores: ``(N, C)`` scores of every class, dataset order.
        targets: ``(N, C)`` multi-hot ground truth.
        split: Seen and unseen classes.
        chance_draws: Random-score draws averaged into the chance mAPs.
        seed: Seed of those draws.

    Returns:
        The metrics named in the module docstring.

    Raises:
        ValueError: No image with an unseen label (ZSL is undefined), or shape mismatch.
    """
    if scores.shape != targets.shape or scores.shape[1] != len(split.class_names):
        raise ValueError(
            f"scores {scores.shape} and targets {targets.shape} must cover "
            f"{len(split.class_names)} classes"
        )
    unseen = list(split.unseen)
    zsl_rows = targets[:, unseen].any(axis=1)
    if not zsl_rows.any():
        raise ValueError("no evaluation image has an unseen label: ZSL is undefined")
    gzsl_rows = targets.any(axis=1)
    zsl_scores, zsl_targets = scores[zsl_rows][:, unseen], targets[zsl_rows][:, unseen]
    rng = np.random.default_rng(seed)
    return {
        **_report(zsl_scores, zsl_targets, "zsl"),
        **_report(scores[gzsl_rows], targets[gzsl_rows], "gzsl"),
        "zsl_mAP_chance": _chance_map(zsl_targets, chance_draws, rng),
        "gzsl_mAP_chance": _chance_map(targets[gzsl_rows], chance_draws, rng),
        "zsl_images": float(zsl_rows.sum()),
        "gzsl_images": float(gzsl_rows.sum()),
        "num_seen": float(len(split.seen)),
        "num_unseen": float(len(unseen)),
    }


def load_word_query_model(cfg: ModelConfig, checkpoint: str | os.PathLike) -> nn.Module:
    """A word-query model from a checkpoint alone: its classes' names and vectors are in it."""
    state = load_checkpoint(checkpoint)["model"]
    table = word_query_table(state)
    if table is None:
        raise ValueError(f"{checkpoint} holds no word-query model")
    model = build_model_from_config(cfg, len(table.names), table)
    model.load_state_dict(state)
    return model.eval()


@torch.inference_mode()
def score_classes(
    model: nn.Module, classes: ClassEmbeddings, loader: DataLoader, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Logits ``(N, M)`` of ``classes`` (any names, seen or not) on the loader's images, and the
    loader's targets (the classes its dataset covers).

    Ranking metrics read logits rather than sigmoid probabilities: float32 probabilities of
    logits beyond about 17 all round to 1.0, and the ties would blur the ranking.
    """
    model.head.set_class_embeddings(classes.names, torch.from_numpy(classes.vectors))
    model.eval().to(device)
    logits, targets = [], []
    for images, batch_targets, *_ in loader:
        logits.append(model(images.to(device)).float().cpu())
        targets.append(batch_targets)
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


def evaluate_zero_shot(
    cfg: ExperimentConfig,
    dataset: OpenDataset,
    checkpoint: str | os.PathLike,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """ZSL and GZSL metrics of a checkpoint trained under the protocol, on ``data.test_split``."""
    split = zero_shot_split(cfg.zsl, dataset.info)
    classes = dataset_class_embeddings(cfg.data, dataset.root, dataset.class_names)
    loader = eval_loader(dataset, cfg.train, cfg.data.test_split)
    model = load_word_query_model(cfg.model, checkpoint)
    scores, targets = score_classes(model, classes, loader, resolve_device(cfg.train.device))
    metrics = zero_shot_metrics(
        scores, targets, split, chance_draws=cfg.zsl.chance_draws, seed=cfg.train.seed
    )
    log(
        f"zero-shot on {cfg.data.test_split}: ZSL mAP {metrics['zsl_mAP']:.4f} (chance "
        f"{metrics['zsl_mAP_chance']:.4f}, {len(split.unseen)} unseen classes, "
        f"{int(metrics['zsl_images'])} images), GZSL mAP {metrics['gzsl_mAP']:.4f}"
    )
    return metrics
