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
* :class:`CachedTeachers` looks the logits up by the batch's row indices in stores computed once
  per training image with the deterministic eval transform (:func:`iter_logits`,
  :func:`write_logits`).

A logit store is a directory: ``values.npy`` (N, |C_t|) in float32 or float16, one row per
training image in split order, and ``meta.json`` (the teacher's class indices and a digest of
the image ids, so a store from another dataset is refused). It is written block by block and
read a batch of rows at a time with positional reads, so neither side ever holds N x C in
memory (nor, as a memory map would, in its resident set): at Open Images scale (1.7 M images x
9,600 classes) one ensemble is 65 GB in float32, 33 GB in float16, on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
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
        present = [t for t in (cgp, dgp) if t is not None]
        # The distillation weight ½ split by the target's shares (ensemble_weights): α/2 and
        # ½ − α/2 with both ensembles, ½ with one.
        for teacher, share in zip(present, ensemble_weights(len(present), self.alpha), strict=True):
            squared = (student - teacher.to(student.dtype)).pow(2)
            mse = squared.sum() if self.reduction == "sum" else squared.mean()
            loss = loss + 0.5 * share * mse
        return loss


def ensemble_weights(count: int, alpha: float) -> tuple[float, ...]:
    """Share of each present teacher ensemble (CGP slot first) in the student's target.

    The two MSE terms of Eq. 7 are one squared distance up to a constant that does not depend
    on the student's logits s::

        (α/2)‖s − ŷ⁺‖² + (½ − α/2)‖s − ŷ⁻‖² = ½‖s − (α·ŷ⁺ + (1 − α)·ŷ⁻)‖² + const

    so the student regresses to α·ŷ⁺ + (1 − α)·ŷ⁻: shares α and 1 − α with two ensembles, 1
    with one (modes ``sd``, ``cgpd``, ``dgpd``, ``random``). :class:`DistillationLoss` weights
    its terms by half these shares, and the ``ensemble-target`` row combines the ensembles'
    logits with them (``mlcore.cpsd.target_combination``).

    Raises:
        ValueError: More than two ensembles.
    """
    if count == 2:
        return (alpha, 1.0 - alpha)
    if count == 1:
        return (1.0,)
    if count == 0:
        return ()
    raise ValueError(f"at most two teacher ensembles (CGP, DGP), got {count}")


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


class CachedEnsemble:
    """One ensemble's stores: ``lookup(rows)`` reads and merges their logits for a batch."""

    def __init__(self, stores: Sequence[LogitStore], num_classes: int):
        self.stores = list(stores)
        self.subsets = [store.class_indices for store in self.stores]
        self.num_classes = num_classes
        subset_permutation(self.subsets, num_classes)

    def lookup(self, rows: np.ndarray) -> torch.Tensor:
        """Merged logits (len(rows), num_classes) float32 of these split rows."""
        blocks = [torch.from_numpy(store.rows(rows)) for store in self.stores]
        return merge_logits(blocks, self.subsets, self.num_classes).float()


class CachedTeachers:
    """Merged teacher logits of the batch's rows, read from the ensembles' stores per batch."""

    def __init__(self, cgp: CachedEnsemble | None, dgp: CachedEnsemble | None):
        self.ensembles = (cgp, dgp)
        self.device = torch.device("cpu")

    def to(self, device: torch.device) -> CachedTeachers:
        self.device = device
        return self

    def __call__(self, batch: Batch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if batch.indices is None:
            raise ValueError("cached teachers need batches with row indices (return_index=True)")
        rows = batch.indices.cpu().numpy()
        return tuple(  # type: ignore[return-value]
            None if e is None else e.lookup(rows).to(self.device, non_blocking=True)
            for e in self.ensembles
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


LOGIT_STORE = "teacher_logits"  # the store's directory name beside a teacher's outputs
VALUES_FILE = "values.npy"
META_FILE = "meta.json"


def ids_digest(image_ids: pa.Array | Sequence[str]) -> str:
    """sha256 of the image ids in order, hashed in blocks (no giant string for 1.7 M ids)."""
    ids = image_ids if isinstance(image_ids, pa.Array | pa.ChunkedArray) else pa.array(image_ids)
    digest = hashlib.sha256()
    for start in range(0, len(ids), 65_536):
        digest.update("\n".join(ids[start : start + 65_536].to_pylist()).encode())
        digest.update(b"\n")
    return digest.hexdigest()


@torch.inference_mode()
def iter_logits(model: nn.Module, loader: DataLoader, device: torch.device) -> Iterator[np.ndarray]:
    """Raw logits (B, C) float32 of each batch of a loader, in its order (use an eval transform)."""
    model.eval().to(device)
    for images, *_ in loader:
        yield model(images.to(device)).float().cpu().numpy()


def write_logits(
    path: str | os.PathLike,
    image_ids: pa.Array | Sequence[str],
    blocks: Iterable[np.ndarray],
    class_indices: Sequence[int],
    *,
    dtype: str = "float32",
) -> Path:
    """Write a logit store from row blocks (B_i, |C_t|) that together cover ``image_ids``.

    The store appears atomically (a temporary sibling directory renamed into place).

    Raises:
        ValueError: A block has the wrong width, or the blocks do not add up to one row per id.
    """
    path = Path(path)
    num_rows, width = len(image_ids), len(class_indices)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (num_rows, width)}
        written = 0
        with open(tmp / VALUES_FILE, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            for block in blocks:
                if block.ndim != 2 or block.shape[1] != width:
                    raise ValueError(f"logit block {block.shape} for {width} classes")
                f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
                written += block.shape[0]
        if written != num_rows:
            raise ValueError(f"{written} logit rows for {num_rows} image ids")
        meta = {
            "class_indices": [int(c) for c in class_indices],
            "num_rows": num_rows,
            "dtype": np.dtype(dtype).name,
            "image_ids_sha256": ids_digest(image_ids),
        }
        (tmp / META_FILE).write_text(json.dumps(meta))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


class LogitStore:
    """Read access to a store written by :func:`write_logits`, a batch of rows at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta = json.loads((self.path / META_FILE).read_text())
        self.class_indices: list[int] = meta["class_indices"]
        self.ids_sha256: str = meta["image_ids_sha256"]
        with open(self.path / VALUES_FILE, "rb") as f:
            if np.lib.format.read_magic(f) != (1, 0):
                raise ValueError(f"{self.path / VALUES_FILE}: not written by write_logits")
            shape, _, self.dtype = np.lib.format.read_array_header_1_0(f)
            self._offset = f.tell()
        self.num_rows, self.width = shape
        self._row_bytes = self.width * self.dtype.itemsize
        self._fd: tuple[int, int] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def _file(self) -> int:
        # One descriptor per process; positional reads never share a file offset.
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path / VALUES_FILE, os.O_RDONLY))
        return self._fd[1]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """Logits (len(rows), width) float32 of these row positions."""
        fd = self._file()
        out = np.empty((len(rows), self.width), dtype=self.dtype)
        for k, row in enumerate(np.asarray(rows, dtype=np.int64)):
            if not 0 <= row < self.num_rows:
                raise IndexError(f"{self.path}: row {row} outside [0, {self.num_rows})")
            read = os.preadv(fd, [out[k]], self._offset + int(row) * self._row_bytes)
            if read != self._row_bytes:
                raise OSError(f"{self.path / VALUES_FILE}: short read at row {row}")
        return out.astype(np.float32, copy=False)


def load_cached_ensemble(
    paths: Sequence[str | os.PathLike], image_ids: pa.Array | Sequence[str], num_classes: int
) -> CachedEnsemble:
    """Open one ensemble's per-teacher stores for the split whose ids are ``image_ids``.

    Raises:
        ValueError: A store was computed on other images (stale cache), or the teachers'
            class subsets do not partition ``range(num_classes)``.
    """
    expected = ids_digest(image_ids)
    stores = [LogitStore(path) for path in paths]
    for store in stores:
        if store.num_rows != len(image_ids) or store.ids_sha256 != expected:
            raise ValueError(f"{store.path}: cached image ids do not match the training split")
    return CachedEnsemble(stores, num_classes)
