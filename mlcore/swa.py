"""Stochastic weight averaging (Izmailov et al., UAI 2018) for the training loop.

The averaged weights are the running mean of snapshots taken every ``every_steps`` optimiser
steps from epoch ``start_epoch`` on::

    w̄_k = w̄_{k−1} + (w_k − w̄_{k−1}) / k

Batch-norm statistics are not averaged: before the averaged model is scored they are recomputed
with one pass over the training data (``torch.optim.swa_utils.update_bn``), because running
statistics of the individual snapshots do not describe the averaged weights. The PLA authors
train their stage 2 this way (averaging every 4 iterations).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn
from torch.utils.data import DataLoader


class WeightAveraging:
    """The loop's SWA: ``update`` after every step, ``refreshed`` before validation.

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

    def state_dict(self) -> dict[str, Any]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)
