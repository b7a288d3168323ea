"""Loss registry: each loss registers a :class:`LossSpec` in its own module.

A spec names the loss (the ``loss.name`` that selects it), its settings dataclass (the
``loss.<name>`` section of a config, ``mlcore.config.LossConfig``) and how to build the
``nn.Module`` from those settings and the training data. Importing any module of
``mlcore.losses`` imports the package, which imports every built-in loss, so the registry is
full by the time a config asks it for a name (as ``mlcore.models`` fills the head registry).

Adding a loss: its module with the settings dataclass, the loss and one ``register_loss(...)``
line, imported by ``mlcore/losses/__init__.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from mlcore.registry import Registry


class LossInputs(NamedTuple):
    """What a loss may need from the training data besides its settings."""

    class_freq: np.ndarray | None = None
    """Positive training images per class (C,), in the order the model outputs them."""
    train_size: int | None = None
    """Training images."""
    class_names: Sequence[str] | None = None
    """Class names, in the model's output order."""


class SelectedLoss(Protocol):
    """A loss section: which loss, and that loss's settings (``mlcore.config.LossConfig``)."""

    name: str
    settings: Any


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """Everything the config and the training code need to know about one loss."""

    name: str
    """The ``loss.name`` value that selects it."""
    settings: type
    """Its settings: a frozen dataclass of the ``configlib`` kind, the ``loss.<name>``
    section."""
    build: Callable[[Any, LossInputs], Any]
    """(settings, data inputs) -> the loss ``nn.Module``."""
    targets: Literal["classes", "sequences"] = "classes"
    """What it scores: per-class logits (B, C) against multi-hot targets, or label sequences
    (the orderless RNN); a model family accepts the losses that score what it outputs."""
    class_statistics: bool = False
    """Whether it needs ``LossInputs`` (class frequencies, training size, class names)."""
    observer: Callable[..., Any] | None = None
    """Optional (settings, loss, batch_size=, lr_warmup_steps=) -> a step observer or None:
    something the loop updates after every step (ASL's adaptive asymmetry)."""
    observe_every: Callable[[Any], int] | None = None
    """Steps between the observer's reports, from the settings."""
    legacy_path: str | None = None
    """Where its settings sat in the single loss section of configs before losses were
    registered: ``""`` at the top of that section (ASL, focal, orderless), ``"db"`` in a
    subsection. Stage keys still hash that layout and old YAML is read through it
    (``mlcore.config.LossConfig``), so finished stages keep their keys. None for a loss added
    since."""


LOSSES: Registry[LossSpec] = Registry("loss", "loss.name", plural="losses")
"""Loss name -> its spec; filled by the loss modules ``mlcore.losses`` imports."""


def register_loss(spec: LossSpec) -> LossSpec:
    """Make ``spec`` selectable as ``loss.name: <spec.name>``.

    Raises:
        ValueError: Another loss holds the name, or its settings are not a dataclass.
    """
    if not dataclasses.is_dataclass(spec.settings):
        raise ValueError(f"loss {spec.name!r}: settings must be a dataclass")
    return LOSSES.register(spec)


def loss_spec(name: str) -> LossSpec:
    """The loss registered as ``name`` (ConfigError naming the registered ones if none)."""
    return LOSSES.lookup(name)


def build_loss(cfg: SelectedLoss, inputs: LossInputs | None = None) -> Any:
    """The loss module ``cfg`` selects, built from its settings.

    Raises:
        ValueError: The loss needs class statistics that ``inputs`` lacks.
    """
    spec = loss_spec(cfg.name)
    inputs = inputs or LossInputs()
    if spec.class_statistics and inputs.class_freq is None:
        raise ValueError(f"loss {cfg.name!r} needs the training set's class frequencies")
    return spec.build(cfg.settings, inputs)


def build_observer(
    cfg: SelectedLoss, loss: Any, *, batch_size: int, lr_warmup_steps: int = 0
) -> tuple[Any, int]:
    """(step observer or None, steps between its reports) of the loss ``cfg`` selects."""
    spec = loss_spec(cfg.name)
    if spec.observer is None:
        return None, 1
    observer = spec.observer(
        cfg.settings, loss, batch_size=batch_size, lr_warmup_steps=lr_warmup_steps
    )
    every = spec.observe_every(cfg.settings) if spec.observe_every is not None else 1
    return observer, every
