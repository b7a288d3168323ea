"""Logit merging and the CPSD student objective (paper §3.3, Eq. 5–7).

Each teacher t of an ensemble predicts logits for its label subset C_t. The merge ρ of Eq. 5
scatters them back to the original class positions; one partition covers every class exactly
once, so the CGP teachers give a full logit vector ŷ⁺ (B, C) and the DGP teachers ŷ⁻ (B, C).

The student, the same architecture with all C outputs, minimises (Eq. 6–7, with the weights of
the authors' code)::

    L = w_cls · ASL(s, y) + (α/2) · ‖s − ŷ⁺‖² + (½ − α/2) · ‖s − ŷ⁻‖²

with w_cls = 0.5 and α = 0.5 by default. With a single ensemble (modes ``sd``, ``cgpd``,
``dgpd``, ``random``) its MSE takes the whole distillation weight ½.

Reduction. Both terms use one convention (``cpsd.kd_reduction``): ``sum`` over batch and classes
(the authors' ASL and MSE, the default) or ``mean`` over the B·C entries. Mixing them makes the
balance depend on the loss: DB is a mean by default, so a summed MSE beside it outweighed the
labels about B·C = 2,560 times at B = 32, C = 80.

Teacher logits come from one of two sources with the same interface, ``(batch) -> (ŷ⁺, ŷ⁻)``:

* :class:`OnlineTeachers` runs every teacher on the student's (augmented) batch;
* :class:`CachedTeachers` looks the logits up by the batch's row indices in tables computed once
  per training image with the deterministic eval transform (:func:`predict_logits`), stored as
  Parquet next to the image ids (:func:`write_logits` / :func:`read_logits`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torch.utils.data import DataLoader

from mlcore.train import Batch


def subset_permutation(subsets: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """Concatenated subsets as one index vector; checks they partition ``range(num_classes)``.

    Raises:
        ValueError: A class is missing, repeated or out of range.
    """
    flat = [int(c) for subset in subsets for c in subset]
    if sorted(flat) != list(range(num_classes)):
        seen = np.bincount(np.asarray(flat, dtype=np.int64), minlength=num_classes)
        missing = np.flatnonzero(seen[:num_classes] == 0).tolist()
        repeated = np.flatnonzero(seen > 1).tolist()
        raise ValueError(
            f"subsets must cover classes 0..{num_classes - 1} exactly once "
            f"(missing {missing[:10]}, repeated {repeated[:10]}, "
            f"out of range {[c for c in flat if not 0 <= c < num_classes][:10]})"
        )
    return torch.as_tensor(flat, dtype=torch.long)


def merge_logits(
    per_teacher_logits: Sequence[torch.Tensor],
    subsets: Sequence[Sequence[int]],
    num_classes: int,
) -> torch.Tensor:
    """ρ of Eq. 5: place each teacher's logits (B, |C_t|) at its classes -> (B, num_classes).

    One scatter over the concatenation, no loop over classes.
    """
    if len(per_teacher_logits) != len(subsets):
        raise ValueError(f"{len(per_teacher_logits)} logit blocks for {len(subsets)} subsets")
    for t, (logits, subset) in enumerate(zip(per_teacher_logits, subsets, strict=True)):
        if logits.shape[-1] != len(subset):
            raise ValueError(
                f"teacher {t}: {logits.shape[-1]} logits for a subset of {len(subset)}"
            )
    index = subset_permutation(subsets, num_classes).to(per_teacher_logits[0].device)
    stacked = torch.cat(list(per_teacher_logits), dim=-1)  # (B, C) in subset order
    merged = torch.empty_like(stacked)
    merged[..., index] = stacked
    return merged


class DistillationLoss(nn.Module):
    """Eq. 6–7: weighted classification loss plus MSE to the merged teacher logits.

    Args:
        cls_loss: Classification loss of (logits, targets) with a ``reduction`` attribute (ASL,
            DB); it is set to ``reduction`` so both terms share one convention.
        cls_weight: w_cls.
        alpha: α; the CGP ensemble gets α/2, the DGP ensemble ½ − α/2.
        reduction: ``sum`` or ``mean`` over batch and classes, for both terms.

    Raises:
        ValueError: Unknown reduction, or a classification loss without a reduction setting.
    """

    def __init__(
        self,
        cls_loss: nn.Module,
        *,
        cls_weight: float = 0.5,
        alpha: float = 0.5,
        reduction: str = "sum",
    ):
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        if not hasattr(cls_loss, "reduction"):
            raise ValueError(f"{type(cls_loss).__name__} has no reduction setting to align")
        cls_loss.reduction = reduction
        self.cls_loss = cls_loss
        self.cls_weight = cls_weight
        self.alpha = alpha
        self.reduction = reduction

    def forward(
        self,
        student: torch.Tensor,
        targets: torch.Tensor,
        cgp: torch.Tensor | None,
        dgp: torch.Tensor | None,
    ) -> torch.Tensor:
        """student (B, C) logits, targets (B, C), cgp/dgp (B, C) merged teacher logits or None."""
        loss = self.cls_weight * self.cls_loss(student, targets)
        if cgp is not None and dgp is not None:
            weights = (self.alpha / 2, 0.5 - self.alpha / 2)
        else:
            weights = (0.5, 0.5)  # one ensemble takes the whole distillation weight
        for teacher, weight in zip((cgp, dgp), weights, strict=True):
            if teacher is not None:
                squared = (student - teacher.to(student.dtype)).pow(2)
                mse = squared.sum() if self.reduction == "sum" else squared.mean()
                loss = loss + weight * mse
        return loss


@dataclass(frozen=True)
class Ensemble:
    """Teachers of one partition: their models (or logits) and class subsets."""

    subsets: tuple[tuple[int, ...], ...]
    models: tuple[nn.Module, ...] = ()


class OnlineTeachers:
    """Runs all teachers (eval mode, no grad) on each student batch.

    The teachers run one after another on the same device-resident batch: with real backbones
    each forward fills the device, so stacking them (torch.func vmap) saves little and would
    need identical heads, which subsets of different sizes do not have.
    """

    def __init__(self, cgp: Ensemble | None, dgp: Ensemble | None, num_classes: int):
        self.ensembles = {"cgp": cgp, "dgp": dgp}
        self.num_classes = num_classes
        for ensemble in (cgp, dgp):
            if ensemble is not None:
                subset_permutation(ensemble.subsets, num_classes)
                for model in ensemble.models:
                    model.eval().requires_grad_(False)

    def to(self, device: torch.device) -> OnlineTeachers:
        for ensemble in self.ensembles.values():
            if ensemble is not None:
                for model in ensemble.models:
                    model.to(device)
        return self

    @torch.inference_mode()
    def _merged(self, ensemble: Ensemble, images: torch.Tensor) -> torch.Tensor:
        logits = [model(images).float() for model in ensemble.models]
        return merge_logits(logits, ensemble.subsets, self.num_classes)

    def __call__(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return tuple(  # type: ignore[return-value]
            None if ens is None else self._merged(ens, batch.images).clone()
            for ens in (self.ensembles["cgp"], self.ensembles["dgp"])
        )


class CachedTeachers:
    """Merged teacher logits of every training image, looked up by the batch's row indices."""

    def __init__(self, cgp: torch.Tensor | None, dgp: torch.Tensor | None):
        self.tables = (cgp, dgp)

    def to(self, device: torch.device) -> CachedTeachers:
        self.tables = tuple(None if t is None else t.to(device) for t in self.tables)
        return self

    def __call__(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if batch.indices is None:
            raise ValueError("cached teachers need batches with row indices (return_index=True)")
        return tuple(  # type: ignore[return-value]
            None if t is None else t.index_select(0, batch.indices.to(t.device))
            for t in self.tables
        )


class DistillationObjective:
    """The student's training objective: Eq. 7 with teacher logits from ``teachers``."""

    def __init__(self, loss: DistillationLoss, teachers: OnlineTeachers | CachedTeachers):
        self.loss = loss
        self.teachers = teachers
        self._device: torch.device | None = None

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self._device != logits.device:
            self.teachers.to(logits.device)
            self._device = logits.device
        cgp, dgp = self.teachers(batch)
        return self.loss(logits, batch.targets, cgp, dgp)


# ---------------------------------------------------------------------------------------------
# Cached logits on disk


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    """Raw logits (N, C) float32 over a loader in its order (use an eval transform)."""
    model.eval().to(device)
    out = []
    for images, *_ in loader:
        out.append(model(images.to(device)).float().cpu())
    return torch.cat(out).numpy()


def write_logits(
    path: str | os.PathLike,
    image_ids: Sequence[str],
    logits: np.ndarray,
    class_indices: Sequence[int],
) -> Path:
    """Store logits (N, |C_t|) with their image ids; the class indices go in the metadata."""
    path = Path(path)
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    if logits.shape != (len(image_ids), len(class_indices)):
        raise ValueError(f"logits {logits.shape} vs {len(image_ids)} ids x {len(class_indices)}")
    width = logits.shape[1]
    column = pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), width)
    table = pa.table({"image_id": pa.array(list(image_ids), pa.string()), "logits": column})
    table = table.replace_schema_metadata(
        {b"class_indices": json.dumps([int(c) for c in class_indices]).encode()}
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def read_logits(path: str | os.PathLike) -> tuple[list[str], np.ndarray, list[int]]:
    """(image_ids, logits (N, |C_t|) float32, class_indices) as written by write_logits."""
    table = pq.read_table(path)
    class_indices = json.loads(table.schema.metadata[b"class_indices"])
    column = table.column("logits").combine_chunks()
    # A writable copy: torch refuses to wrap Arrow's read-only buffers without a warning.
    logits = np.array(column.values.to_numpy(), copy=True).reshape(len(table), len(class_indices))
    return table.column("image_id").to_pylist(), logits, class_indices


def load_cached_ensemble(
    paths: Sequence[str | os.PathLike], image_ids: Sequence[str], num_classes: int
) -> torch.Tensor:
    """Merge per-teacher logit files into one (N, num_classes) table in ``image_ids`` order.

    Raises:
        ValueError: A file's image ids differ from the dataset's (stale cache).
    """
    blocks, subsets = [], []
    for path in paths:
        ids, logits, classes = read_logits(path)
        if list(ids) != list(image_ids):
            raise ValueError(f"{path}: cached image ids do not match the training split")
        blocks.append(torch.from_numpy(logits))
        subsets.append(classes)
    return merge_logits(blocks, subsets, num_classes)
