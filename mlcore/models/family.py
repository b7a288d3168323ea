"""Model families: what differs between heads, in one registered spec per head.

A head's module registers a :class:`ModelFamily` with :func:`register_family`; everything that
builds, trains, scores or exports a model asks :func:`family_of` ``(model.head)`` instead of
testing the head's name or the model's class (the way torchtitan picks a ``TrainSpec`` by name).
The spec holds:

* ``build``: the model from its ``ModelConfig``, class count and (word queries) class
  embeddings; in eval mode it maps images (B, 3, H, W) to per-class logits (B, C);
* ``training``: the training forward and objective around the configured loss (and any check
  or initialisation the family needs before training starts);
* ``evaluate``: how it is scored on a split (sigmoid scores by default; decoded label sets for
  the orderless RNN), for model selection and held-out reports alike;
* ``export``: the module ONNX/TorchScript trace (None: the head cannot be exported);
* which losses it trains with, whether CPSD may distil it, whether it needs class embeddings.

Adding a head: its module (the ``nn.Module`` and a ``register_family(...)`` line), imported by
``mlcore.models``; its settings, if any, as a section of ``ModelConfig``.
tests/test_model_family.py registers a toy head in that one file and trains, evaluates and
exports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import nn

from mlcore.config import ExperimentConfig, ModelConfig
from mlcore.configlib import ConfigError
from mlcore.data.embeddings import ClassEmbeddings
from mlcore.data.manifest import Manifest
from mlcore.losses.registry import LOSSES
from mlcore.registry import Registry
from mlcore.train import Evaluator, Forward, Objective, evaluate_scores, forward_images


class TrainingParts(NamedTuple):
    """What a family trains with: the forward of a training batch and the objective."""

    forward: Forward
    objective: Objective


def plain_training(
    cfg: ExperimentConfig,
    manifest: Manifest,
    model: nn.Module,
    loss: nn.Module,
    objective: Objective,
) -> TrainingParts:
    """``model(images)`` scored by the objective as it is (most heads)."""
    return TrainingParts(forward_images, objective)


def as_is(model: nn.Module) -> nn.Module:
    """Export adapter of a model that already maps images to per-class logits in eval mode."""
    return model


def never(cfg: ModelConfig) -> bool:
    return False


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """Everything head-specific about building, training, scoring and exporting a model."""

    name: str
    """The ``model.head`` value that selects it."""
    build: Callable[[ModelConfig, int, ClassEmbeddings | None], nn.Module]
    """(model config, number of classes, class embeddings or None) -> the model."""
    training: Callable[..., TrainingParts] = plain_training
    """(config, manifest, built model, configured loss, objective around it) -> the training
    forward and objective; also where a family checks the data or initialises weights."""
    evaluate: Evaluator = evaluate_scores
    """Scores the model on a loader: model selection (``val_*``) and held-out reports."""
    export: Callable[[nn.Module], nn.Module] | None = as_is
    """Built model (eval mode) -> a module from images to logits that tracing can follow; None:
    export is refused."""
    losses: str | tuple[str, ...] = "classes"
    """The losses it trains with: those whose spec scores ``"classes"`` (per-class logits) or
    ``"sequences"`` (``mlcore.losses.registry.LossSpec.targets``), or a tuple of loss names."""
    distills: bool = True
    """Whether CPSD may train it on label subsets and distil it (per-class logits)."""
    class_embeddings: Callable[[ModelConfig], bool] = field(default=never)
    """Whether a model of this config needs the class embeddings (word queries)."""


FAMILIES: Registry[ModelFamily] = Registry("head", "model.head")
"""Head name -> its family; filled by the head modules ``mlcore.models`` imports."""


def register_family(family: ModelFamily) -> ModelFamily:
    """Make ``family`` selectable as ``model.head: <family.name>`` (ValueError: name taken)."""
    return FAMILIES.register(family)


def family_of(head: str) -> ModelFamily:
    """The family registered as ``head`` (ConfigError naming the registered ones if none)."""
    return FAMILIES.lookup(head)


def accepted_losses(family: ModelFamily) -> tuple[str, ...]:
    """The registered losses ``family`` trains with."""
    if isinstance(family.losses, tuple):
        return family.losses
    return tuple(name for name, spec in LOSSES.items() if spec.targets == family.losses)


def check_family(cfg: ExperimentConfig) -> None:
    """The config's head exists and goes with its loss and CPSD mode.

    Raises:
        ConfigError: Unknown head, a loss the head does not train with, or CPSD teachers for
            a head CPSD cannot distil.
    """
    family = family_of(cfg.model.head)
    accepted = accepted_losses(family)
    if cfg.loss.name not in accepted:
        raise ConfigError(
            f"model.head: {family.name} and loss.name: {'/'.join(accepted)} go together "
            f"(loss.name: {cfg.loss.name} does not train this head)"
        )
    if not family.distills and cfg.cpsd.mode != "baseline":
        raise ConfigError(
            f"model.head: {family.name} needs cpsd.mode: baseline (CPSD teachers distil "
            "per-class logits)"
        )
