"""Partition kinds: how a teacher ensemble splits the classes, one registered spec per kind.

CPSD (§3.2–3.3) splits the m classes into k subsets, one teacher per subset:

* ``cgp``: spectral clustering of the co-occurrence affinity P⁺ (classes that appear together
  share a teacher);
* ``dgp``: the same on the dis-occurrence affinity P⁻ (classes that rarely appear together
  share one);
* ``random``: a random split of the same sizes (the paper's control, Fig. 3);
* ``full``: one subset holding every class (the ``sd`` mode's single teacher).

Every caller (the ``cpsd partition`` command, the pipeline's partition stage, ``run-local``)
goes through :func:`label_statistics` then :func:`label_partition`, which checks k against the
classes (:func:`check_k`, also the preflight's check), assigns, and writes the JSON report and
the affinity heatmap.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mlcore.configlib import ConfigError
from mlcore.partition.affinity import affinity
from mlcore.partition.cooccurrence import cooccurrence_from_manifest
from mlcore.partition.random_partition import random_partition
from mlcore.partition.report import label_stats_hash, partition_report, plot_affinity_heatmap
from mlcore.partition.spectral import normalized_cut, spectral_partition
from mlcore.registry import Registry


@dataclass(frozen=True, kw_only=True)
class PartitionKind:
    """One way of splitting the classes."""

    name: str
    """``cpsd partition --kind`` and the ``partition-<name>`` stage."""
    graph: Literal["cgp", "dgp"]
    """The affinity (P⁺ or P⁻) it is computed from, or its Ncut is reported on."""
    assign: Callable[[Any, int, int], np.ndarray]
    """(affinity, k, seed) -> subset id in 0..k−1 per class, shape (m,)."""
    splits: bool = True
    """False for ``full``: one subset whatever k says (k = 1, no heatmap)."""


PARTITION_KINDS: Registry[PartitionKind] = Registry("partition kind", "partition kind")
"""Kind name -> spec."""


def register_partition_kind(kind: PartitionKind) -> PartitionKind:
    """Make ``kind`` available by name (ValueError: name taken)."""
    return PARTITION_KINDS.register(kind)


def partition_kind(name: str) -> PartitionKind:
    """The kind registered as ``name`` (ConfigError naming the registered ones if none)."""
    return PARTITION_KINDS.lookup(name)


def check_k(k: int, num_classes: int, *, key: str = "cpsd.k") -> None:
    """The one check of k against the classes (``key`` names the setting in the message).

    Raises:
        ConfigError: k < 1, or more subsets than classes.
    """
    if k < 1:
        raise ConfigError(f"{key} = {k} must be >= 1")
    if k > num_classes:
        raise ConfigError(f"{key} = {k} is larger than the number of classes ({num_classes})")


def _spectral(graph: Any, k: int, seed: int) -> np.ndarray:
    return spectral_partition(graph, k, seed=seed)


def _random(graph: Any, k: int, seed: int) -> np.ndarray:
    return random_partition(graph.shape[0], k, seed=seed)


def _one_subset(graph: Any, k: int, seed: int) -> np.ndarray:
    return np.zeros(graph.shape[0], dtype=np.int64)


register_partition_kind(PartitionKind(name="cgp", graph="cgp", assign=_spectral))
register_partition_kind(PartitionKind(name="dgp", graph="dgp", assign=_spectral))
register_partition_kind(PartitionKind(name="random", graph="cgp", assign=_random))
register_partition_kind(PartitionKind(name="full", graph="cgp", assign=_one_subset, splits=False))


@dataclass(frozen=True)
class Partition:
    """One label partition: subset id per class, plus its JSON report."""

    kind: str
    assignment: tuple[int, ...]
    report: dict

    @property
    def subsets(self) -> tuple[tuple[int, ...], ...]:
        k = max(self.assignment) + 1
        return tuple(tuple(c for c, t in enumerate(self.assignment) if t == s) for s in range(k))


@dataclass(frozen=True)
class LabelStatistics:
    """What every partition is computed from: one split's class and pair counts."""

    pair_counts: Any
    """(m, m) images per class pair (dense or sparse)."""
    class_counts: np.ndarray
    """(m,) images per class."""
    class_names: Sequence[str]
    """The m class names."""


def label_statistics(
    root: str | os.PathLike, split: str, class_names: Sequence[str]
) -> LabelStatistics:
    """Class and pair counts of ``split`` of the dataset at ``root`` (one pass over it); the
    caller has the class names already (an open dataset's, or ``read_info``)."""
    pair_counts, class_counts = cooccurrence_from_manifest(root, split)
    return LabelStatistics(pair_counts, class_counts, class_names)


def label_partition(
    kind: str,
    stats: LabelStatistics,
    *,
    k: int,
    tau: float,
    seed: int,
    json_path: str | os.PathLike | None = None,
    png_path: str | os.PathLike | None = None,
    k_key: str = "cpsd.k",
) -> Partition:
    """Partition of ``kind`` with k subsets; writes the JSON report to ``json_path`` and, for a
    kind that splits, the affinity heatmap to ``png_path``, when given.

    Raises:
        ConfigError: Unknown kind, or k out of range for the classes (``k_key`` names it).
    """
    spec = partition_kind(kind)
    names = stats.class_names
    if spec.splits:
        check_k(k, len(names), key=k_key)
    else:
        k = 1
    graph = affinity(stats.pair_counts, stats.class_counts, tau=tau, kind=spec.graph)
    assignment = spec.assign(graph, k, seed)
    ncut = normalized_cut(graph, assignment)
    report = partition_report(
        assignment,
        names,
        k=k,
        tau=tau,
        kind=kind,
        seed=seed,
        ncut=ncut,
        stats_hash=label_stats_hash(stats.pair_counts, stats.class_counts),
    )
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1))
    if png_path is not None and spec.splits:
        plot_affinity_heatmap(
            graph,
            assignment,
            names,
            png_path,
            title=f"{kind.upper()} affinity, k={k}, τ={tau:g}, Ncut={ncut:.4f}",
        )
    return Partition(kind, tuple(int(a) for a in assignment), report)
