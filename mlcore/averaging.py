"""Averaged weights for the training loop: an EMA and stochastic weight averaging (SWA).

Both keep a copy of the model that follows the trained weights; the loop treats them alike
through :class:`WeightAverages`: ``update`` after every optimiser step, ``candidates`` before
validation (each average that has weights to score, scored beside the plain weights), and
``state_dict``/``load_state_dict`` with the checkpoint.

* **EMA** (timm's ``ModelEmaV3`` with its decay warm-up, so short runs still move), as the ASL
  and CPSD code keep one.
* **SWA** (Izmailov et al., UAI 2018): the running mean of snapshots taken every
  ``every_steps`` optimiser steps from epoch ``start_epoch`` on::

      w̄_k = w̄_{k−1} + (w_k − w̄_{k−1}) / k

  Batch-norm statistics are not averaged: before the averaged model is scored they are
  recomputed with one pass over the training data (``torch.optim.swa_utils.update_bn``),
  because running statistics of the individual snapshots do not describe the averaged weights.
  The PLA authors train their stage 2 this way (averaging every 4 iterations).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader

from mlcore.config import TrainConfig


class Average(Protocol):
    """One kind of averaged weights."""

    def update(self, model: nn.Module, epoch: int, global_step: int) -> None:
        """Called after every optimiser step (``global_step`` counts from 1)."""
        ...

    def candidate(self, loader: DataLoader, device: torch.device) -> nn.Module | None:
        """The averaged model to validate, or None while it holds nothing yet."""
        ...

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ExponentialAverage:
    """EMA of the weights, updated after every step."""

    def __init__(self, model: nn.Module, *, decay: float):
        self.ema = ModelEmaV3(model, decay=decay, use_warmup=True)

    def update(self, model: nn.Module, epoch: int, global_step: int) -> None:
        self.ema.update(model, step=global_step)

    def candidate(self, loader: DataLoader, device: torch.device) -> nn.Module | None:
        return self.ema.module

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state)


class StochasticAverage:
    """SWA: ``update`` after every step, ``refreshed`` (BN recomputed) before validation.

    Args:
        model: The model being trained (copied once; the copy holds the average).
        start_epoch: First epoch (0-based) whose weights are averaged.
        every_steps: Average after every this many optimiser steps (global step count).
    """

    def __init__(self, model: nn.Module, *, start_epoch: int = 0, every_steps: int = 1):
        self.averaged = AveragedModel(model)
        self.start_epoch = start_epoch
        self.every_steps = every_steps

    @property
    def count(self) -> int:
        """Snapshots averaged so far."""
        return int(self.averaged.n_averaged.item())

    def update(self, model: nn.Module, epoch: int, global_step: int) -> None:
        """Add the current weights when the step is due."""
        if epoch >= self.start_epoch and global_step % self.every_steps == 0:
            self.averaged.update_parameters(model)

    def refreshed(self, loader: DataLoader, device: torch.device) -> nn.Module | None:
        """The averaged model with BN statistics recomputed on ``loader``; None before the
        first snapshot."""
        if self.count == 0:
            return None
        update_bn(loader, self.averaged.module, device)
        return self.averaged.module

    candidate = refreshed

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


KINDS = ("ema", "swa")
"""Every kind of average, in the order they are validated; checkpoints hold one entry each
(None when the kind is off)."""


class WeightAverages:
    """The averages ``train`` keeps (:data:`KINDS` by name, those ``cfg`` turns on)."""

    def __init__(self, averages: dict[str, Average]):
        self.averages = averages

    @classmethod
    def from_config(cls, model: nn.Module, cfg: TrainConfig) -> WeightAverages:
        averages: dict[str, Average] = {}
        if cfg.ema:
            averages["ema"] = ExponentialAverage(model, decay=cfg.ema_decay)
        if cfg.swa.enabled:
            averages["swa"] = StochasticAverage(
                model, start_epoch=cfg.swa.start_epoch, every_steps=cfg.swa.every_steps
            )
        return cls(averages)

    def update(self, model: nn.Module, epoch: int, global_step: int) -> None:
        for average in self.averages.values():
            average.update(model, epoch, global_step)

    def candidates(self, loader: DataLoader, device: torch.device) -> dict[str, nn.Module]:
        """Name -> averaged model, for each average that holds weights to validate."""
        found = {name: a.candidate(loader, device) for name, a in self.averages.items()}
        return {name: model for name, model in found.items() if model is not None}

    def state_dict(self) -> dict[str, Any]:
        """One entry per kind of :data:`KINDS` (None when off), stored at a checkpoint's top
        level as before averages were one object, so older checkpoints resume."""
        return {k: self.averages[k].state_dict() if k in self.averages else None for k in KINDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, average in self.averages.items():
            if state.get(name) is not None:
                average.load_state_dict(state[name])
