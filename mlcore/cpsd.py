"""CPSD (paper §3) as stages: statistics → partitions → teachers → logits → student → report.

Each stage is a plain function of the config and of paths, so the sequential reference run
(:func:`run_local`) and the Ray pipeline (``workflows.pipeline``) call exactly the same code;
the pipeline only decides where each call runs.

Ablation modes (``cpsd.mode``; paper Table 3 and Fig. 3) choose the teacher ensembles:

========  ==========================================  =====================================
mode      teachers                                    student loss
========  ==========================================  =====================================
baseline  none                                        classification loss only
sd        one teacher on all classes                  + ½·MSE to its logits
cgpd      k teachers on the CGP partition             + ½·MSE to ŷ⁺
dgpd      k teachers on the DGP partition             + ½·MSE to ŷ⁻
cpsd      k CGP + k DGP teachers                      + α/2·MSE(ŷ⁺) + (½ − α/2)·MSE(ŷ⁻)
random    k teachers on a random partition            + ½·MSE to their merged logits
========  ==========================================  =====================================

A teacher for subset C_t has the student's architecture with |C_t| outputs and trains on *all*
training images with targets restricted to C_t (an image without any C_t label is an
all-negative sample, as in the authors' code).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from mlcore.config import ExperimentConfig
from mlcore.data.manifest import Manifest, read_info
from mlcore.distill import (
    LOGIT_STORE,
    CachedTeachers,
    DistillationLoss,
    DistillationObjective,
    Ensemble,
    OnlineTeachers,
    iter_logits,
    load_cached_ensemble,
    merge_logits,
    write_logits,
)
from mlcore.experiment import (
    load_manifest,
    loader_workers,
    resolve_dataset,
    split_dataset,
    train_classifier,
)
from mlcore.metrics import multilabel_report
from mlcore.models import build_model_from_config
from mlcore.partition.affinity import affinity
from mlcore.partition.cooccurrence import cooccurrence_from_manifest
from mlcore.partition.random_partition import random_partition
from mlcore.partition.report import label_stats_hash, partition_report, plot_affinity_heatmap
from mlcore.partition.spectral import normalized_cut, spectral_partition
from mlcore.train import (
    LOCAL,
    MetricsCallback,
    Placement,
    TrainResult,
    load_checkpoint,
    predict,
    resolve_device,
)

# Teacher ensembles per mode, in (first, second) slot order of the distillation loss.
ENSEMBLES: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "sd": ("full",),
    "cgpd": ("cgp",),
    "dgpd": ("dgp",),
    "cpsd": ("cgp", "dgp"),
    "random": ("random",),
}


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
class TeacherSpec:
    """What one teacher learns: ensemble ``kind``, index in it, and its class subset."""

    kind: str
    index: int
    subset: tuple[int, ...]

    @property
    def name(self) -> str:
        return f"teacher-{self.kind}-{self.index}"


# ---------------------------------------------------------------------------------------------
# Stage 1-2: statistics and partitions


def make_partition(
    kind: str,
    pair_counts,
    class_counts: np.ndarray,
    class_names: Sequence[str],
    *,
    k: int,
    tau: float,
    seed: int,
    json_path: str | os.PathLike | None = None,
    png_path: str | os.PathLike | None = None,
) -> Partition:
    """One partition of the label statistics: ``cgp``, ``dgp``, ``random`` or ``full`` (k = 1).

    Writes its JSON report to ``json_path`` and the affinity heatmap to ``png_path`` when given.
    """
    m = len(class_names)
    graph = affinity(pair_counts, class_counts, tau=tau, kind="dgp" if kind == "dgp" else "cgp")
    if kind == "full":
        assignment, k = np.zeros(m, dtype=np.int64), 1
    elif kind == "random":
        assignment = random_partition(m, k, seed=seed)
    else:
        assignment = spectral_partition(graph, k, seed=seed)
    ncut = normalized_cut(graph, assignment)
    report = partition_report(
        assignment,
        class_names,
        k=k,
        tau=tau,
        kind=kind,
        seed=seed,
        ncut=ncut,
        stats_hash=label_stats_hash(pair_counts, class_counts),
    )
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1))
    if png_path is not None:
        plot_affinity_heatmap(
            graph,
            assignment,
            class_names,
            png_path,
            title=f"{kind.upper()} affinity, k={k}, τ={tau:g}, Ncut={ncut:.4f}",
        )
    return Partition(kind, tuple(int(a) for a in assignment), report)


def compute_partitions(
    cfg: ExperimentConfig, root: str | os.PathLike, out_dir: str | os.PathLike | None = None
) -> dict[str, Partition]:
    """The partitions the mode needs, keyed by kind; JSON + heatmap PNG written to out_dir.

    Raises:
        ValueError: ``cpsd.k`` exceeds the number of classes.
    """
    kinds = ENSEMBLES[cfg.cpsd.mode]
    if not kinds:
        return {}
    names = read_info(root).class_names
    c = cfg.cpsd
    if any(kind != "full" for kind in kinds) and c.k > len(names):
        raise ValueError(f"cpsd.k = {c.k} is larger than the number of classes ({len(names)})")
    pair_counts, class_counts = cooccurrence_from_manifest(root, cfg.data.train_split)
    out = Path(out_dir) if out_dir is not None else None
    return {
        kind: make_partition(
            kind,
            pair_counts,
            class_counts,
            names,
            k=c.k,
            tau=c.tau,
            seed=c.partition_seed,
            json_path=None if out is None else out / f"partition_{kind}.json",
            png_path=None if out is None or kind == "full" else out / f"partition_{kind}.png",
        )
        for kind in kinds
    }


def plan_teachers(partitions: dict[str, Partition]) -> list[TeacherSpec]:
    """One teacher per subset of every partition, in a fixed order."""
    return [
        TeacherSpec(kind, t, subset)
        for kind, partition in partitions.items()
        for t, subset in enumerate(partition.subsets)
    ]


# ---------------------------------------------------------------------------------------------
# Stage 3-4: teachers and their logits


def train_teacher(
    cfg: ExperimentConfig,
    spec: TeacherSpec,
    out_dir: str | os.PathLike,
    *,
    on_epoch: MetricsCallback | None = None,
    on_step: MetricsCallback | None = None,
    placement: Placement = LOCAL,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train one teacher on all training images with targets restricted to its subset."""
    return train_classifier(
        cfg,
        out_dir,
        class_subset=list(spec.subset),
        epochs=cfg.cpsd.teacher_epochs or cfg.train.epochs,
        on_epoch=on_epoch,
        on_step=on_step,
        placement=placement,
        log=lambda line: log(f"[{spec.name}] {line}"),
    )


def load_trained(cfg: ExperimentConfig, num_outputs: int, checkpoint: str | os.PathLike):
    """The selected (best) weights of a trained model, in eval mode on CPU."""
    model = build_model_from_config(cfg.model, num_outputs)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    return model.eval()


def _eval_loader(cfg: ExperimentConfig, manifest: Manifest, split: str) -> DataLoader:
    dataset = split_dataset(manifest, cfg.data, split, train=False)
    return DataLoader(
        dataset,
        batch_size=cfg.train.eval_batch_size or 2 * cfg.train.batch_size,
        collate_fn=dataset.collate_fn,
        num_workers=loader_workers(cfg.data, None),
    )


def cache_teacher_logits(
    cfg: ExperimentConfig,
    spec: TeacherSpec,
    checkpoint: str | os.PathLike,
    out_path: str | os.PathLike,
) -> Path:
    """Logits of one teacher on every training image (eval transform) -> a logit store,
    written batch by batch in ``cpsd.logits_dtype``."""
    manifest = load_manifest(cfg.data)
    loader = _eval_loader(cfg, manifest, cfg.data.train_split)
    model = load_trained(cfg, len(spec.subset), checkpoint)
    logits = iter_logits(model, loader, resolve_device(cfg.train.device))
    return write_logits(
        out_path, loader.dataset.ids, logits, spec.subset, dtype=cfg.cpsd.logits_dtype
    )


# ---------------------------------------------------------------------------------------------
# Stage 5: the student


def _ensembles(
    specs: Sequence[TeacherSpec], per_teacher: Sequence[object]
) -> list[tuple[tuple[tuple[int, ...], ...], list[object]]]:
    """Group per-teacher items by ensemble kind, in ENSEMBLES slot order."""
    grouped: dict[str, tuple[list, list]] = {}
    for spec, item in zip(specs, per_teacher, strict=True):
        subsets, items = grouped.setdefault(spec.kind, ([], []))
        subsets.append(spec.subset)
        items.append(item)
    return [(tuple(s), i) for s, i in grouped.values()]


def train_student(
    cfg: ExperimentConfig,
    specs: Sequence[TeacherSpec],
    teacher_checkpoints: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    teacher_logits: Sequence[str | os.PathLike] | None = None,
    on_epoch: MetricsCallback | None = None,
    on_step: MetricsCallback | None = None,
    placement: Placement = LOCAL,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Distil the teacher ensembles into a student on all classes (Eq. 7).

    ``cpsd.teacher_mode: cached`` reads ``teacher_logits`` (one logit store per teacher, in
    ``specs`` order) a batch at a time; ``online`` loads every teacher checkpoint and runs them
    on each batch. With no teachers (mode ``baseline``) this is plain training.
    """
    if not specs:
        return train_classifier(
            cfg, out_dir, on_epoch=on_epoch, on_step=on_step, placement=placement, log=log
        )
    manifest = load_manifest(cfg.data, with_bytes=False)
    num_classes = manifest.num_classes
    cached = cfg.cpsd.teacher_mode == "cached"
    if cached:
        if teacher_logits is None or len(teacher_logits) != len(specs):
            raise ValueError("cached teacher mode needs one logit store per teacher")
        image_ids = manifest.table.column("image_id").take(
            pa.array(manifest.split_rows(cfg.data.train_split))
        )
        stores = [
            load_cached_ensemble(paths, image_ids, num_classes)
            for _, paths in _ensembles(specs, teacher_logits)
        ]
        teachers: OnlineTeachers | CachedTeachers = CachedTeachers(
            *stores, *[None] * (2 - len(stores))
        )
    else:
        ensembles = [
            Ensemble(
                subsets,
                tuple(load_trained(cfg, len(s), ck) for s, ck in zip(subsets, cks, strict=True)),
            )
            for subsets, cks in _ensembles(specs, teacher_checkpoints)
        ]
        teachers = OnlineTeachers(
            *ensembles, *[None] * (2 - len(ensembles)), num_classes=num_classes
        )

    def make_objective(loss: torch.nn.Module) -> DistillationObjective:
        kd = DistillationLoss(loss, cls_weight=cfg.cpsd.cls_weight, alpha=cfg.cpsd.kd_alpha)
        return DistillationObjective(kd, teachers)

    return train_classifier(
        cfg,
        out_dir,
        make_objective=make_objective,
        return_index=cached,
        on_epoch=on_epoch,
        on_step=on_step,
        placement=placement,
        log=log,
    )


# ---------------------------------------------------------------------------------------------
# Stage 6: evaluation and summary


def ensemble_report(
    specs: Sequence[TeacherSpec], teacher_dirs: Sequence[str | os.PathLike], num_classes: int
) -> dict[str, dict[str, float]]:
    """Validation report of each merged teacher ensemble (from the teachers' saved scores)."""
    reports = {}
    for kind in dict.fromkeys(s.kind for s in specs):
        members = [(s, d) for s, d in zip(specs, teacher_dirs, strict=True) if s.kind == kind]
        saved = [np.load(Path(d) / "val_scores.npz") for _, d in members]
        scores = merge_logits(
            [torch.from_numpy(z["scores"]) for z in saved],
            [s.subset for s, _ in members],
            num_classes,
        )
        targets = merge_logits(
            [torch.from_numpy(z["targets"]) for z in saved],
            [s.subset for s, _ in members],
            num_classes,
        )
        reports[kind] = multilabel_report(scores.numpy(), targets.numpy())
    return reports


def evaluate_split(
    cfg: ExperimentConfig, checkpoint: str | os.PathLike, split: str
) -> dict[str, float] | None:
    """Report of a full-label model on another split (e.g. ``test_shift``); None if absent."""
    manifest = load_manifest(cfg.data)
    if split not in manifest.splits():
        return None
    model = load_trained(cfg, manifest.num_classes, checkpoint)
    device = resolve_device(cfg.train.device)
    scores, targets = predict(model.to(device), _eval_loader(cfg, manifest, split), device)
    return multilabel_report(scores, targets)


SUMMARY_METRICS = ("mAP", "CF1", "OF1")
SUMMARY_COLUMNS = ("name", "role", "classes", *SUMMARY_METRICS, "shift_mAP")


def summary_row(name: str, role: str, classes: int, report: dict[str, float], **extra) -> dict:
    row = {"name": name, "role": role, "classes": classes}
    row.update({m: report[m] for m in SUMMARY_METRICS})
    row.update(extra)
    return row


@dataclass
class RunSummary:
    """The rows of the final table (teachers, ensembles, student, baseline)."""

    rows: list[dict]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
        for row in self.rows:
            cells = []
            for col in SUMMARY_COLUMNS:
                value = row.get(col)
                cells.append(
                    ""
                    if value is None
                    else f"{100 * value:.2f}"
                    if isinstance(value, float)
                    else str(value)
                )
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(self.rows, indent=1)


def build_summary(
    specs: Sequence[TeacherSpec],
    teacher_metrics: Sequence[dict[str, float]],
    teacher_dirs: Sequence[str | os.PathLike],
    num_classes: int,
    models: Sequence[tuple[str, dict[str, float], dict[str, float] | None]],
) -> RunSummary:
    """Rows for every teacher, every merged ensemble, then the full-label ``models``.

    Args:
        specs: The teachers, in plan order.
        teacher_metrics: Each teacher's best-epoch metrics (training-loop names).
        teacher_dirs: Each teacher's directory holding ``val_scores.npz``.
        num_classes: Classes of the full task.
        models: (name, best-epoch metrics, ``test_shift`` report or None) of the student and
            the baseline.
    """
    rows = [
        summary_row(spec.name, "teacher", len(spec.subset), _val(metrics))
        for spec, metrics in zip(specs, teacher_metrics, strict=True)
    ]
    for kind, report in ensemble_report(specs, teacher_dirs, num_classes).items():
        rows.append(summary_row(f"ensemble-{kind}", "ensemble", num_classes, report))
    for name, metrics, shift in models:
        rows.append(
            summary_row(name, name, num_classes, _val(metrics), shift_mAP=shift and shift["mAP"])
        )
    return RunSummary(rows)


def run_local(
    cfg: ExperimentConfig, out_dir: str | os.PathLike, *, log: Callable[[str], None] = print
) -> RunSummary:
    """The whole algorithm in this process, sequentially: the reference the pipeline matches."""
    out = Path(out_dir)
    root = resolve_dataset(cfg.data)
    num_classes = load_manifest(cfg.data, with_bytes=False).num_classes
    log(f"mode {cfg.cpsd.mode}: label statistics and partitions")
    partitions = compute_partitions(cfg, root, out / "partitions")
    specs = plan_teachers(partitions)
    teacher_dirs, teacher_metrics, checkpoints, logits = [], [], [], []
    for spec in specs:
        teacher_dir = out / "teachers" / spec.name
        result = train_teacher(cfg, spec, teacher_dir, log=log)
        teacher_dirs.append(teacher_dir)
        teacher_metrics.append(result.best_metrics)
        checkpoints.append(result.best_checkpoint)
        if cfg.cpsd.teacher_mode == "cached":
            path = teacher_dir / LOGIT_STORE
            logits.append(cache_teacher_logits(cfg, spec, result.best_checkpoint, path))
    name = "student" if specs else "baseline"
    log(f"{name}: training on all {num_classes} classes")
    student = train_student(
        cfg, specs, checkpoints, out / name, teacher_logits=logits or None, log=log
    )
    models = [
        (name, student.best_metrics, evaluate_split(cfg, student.best_checkpoint, "test_shift"))
    ]
    if specs and cfg.cpsd.train_baseline:
        log(f"baseline: training on all {num_classes} classes")
        baseline = train_classifier(cfg, out / "baseline", log=log)
        shift = evaluate_split(cfg, baseline.best_checkpoint, "test_shift")
        models.append(("baseline", baseline.best_metrics, shift))
    summary = build_summary(specs, teacher_metrics, teacher_dirs, num_classes, models)
    (out / "summary.json").write_text(summary.to_json())
    (out / "summary.md").write_text(summary.markdown() + "\n")
    return summary


def _val(metrics: dict[str, float]) -> dict[str, float]:
    """Strip the ``val_`` prefix of the training loop's metric names."""
    return {k.removeprefix("val_"): v for k, v in metrics.items() if k.startswith("val_")}
