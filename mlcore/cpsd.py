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

Every model is selected on the ``val`` split (best epoch, EMA or plain weights) and then
reported on the held-out ``test`` split and the optional ``test_shift`` split
(:func:`evaluate_model`), which nothing is chosen on. Each trained model has a fingerprint
(``mlcore.fingerprint``): a teacher's covers its config, data and subset; the student's adds its
distillation settings and its teachers' fingerprints; the baseline's is the plain training one,
so every mode and distillation setting shares one baseline per seed.

Beside the merged teacher ensembles, two logit combinations (:class:`Combination`) are scored
like models: ``ensemble-target``, the logits the student regresses to (each ensemble weighted by
``mlcore.distill.ensemble_weights``), and with ``cpsd.control_ensemble: N`` the plain ensemble
``ensemble-baseline``, the mean logits of the baseline and N plain models with other seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from mlcore.config import ExperimentConfig
from mlcore.data.loading import OpenDataset, eval_loader, open_dataset
from mlcore.distill import (
    LOGIT_STORE,
    CachedTeachers,
    DistillationLoss,
    DistillationObjective,
    Ensemble,
    OnlineTeachers,
    ensemble_weights,
    iter_logits,
    load_cached_ensemble,
    merge_logits,
    write_logits,
)
from mlcore.experiment import train_classifier, training_fingerprint
from mlcore.fingerprint import split_digest
from mlcore.metrics import bucket_map, frequency_buckets, multilabel_report
from mlcore.models import build_model_from_config, family_of, word_query_table
from mlcore.partition.kinds import Partition, label_partition, label_statistics
from mlcore.pretrain import BACKBONE_FILE, export_backbone, pretrain_config, with_pretrained
from mlcore.train import (
    LOCAL,
    SCORES,
    MetricsCallback,
    Placement,
    TrainResult,
    load_checkpoint,
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


def compute_partitions(
    cfg: ExperimentConfig, dataset: OpenDataset, out_dir: str | os.PathLike | None = None
) -> dict[str, Partition]:
    """The partitions the mode needs, keyed by kind; JSON + heatmap PNG written to out_dir.

    Raises:
        ConfigError: ``cpsd.k`` exceeds the number of classes.
    """
    kinds = ENSEMBLES[cfg.cpsd.mode]
    if not kinds:
        return {}
    c = cfg.cpsd
    stats = label_statistics(dataset.root, cfg.data.train_split, dataset.class_names)
    out = Path(out_dir) if out_dir is not None else None
    return {
        kind: label_partition(
            kind,
            stats,
            k=c.k,
            tau=c.tau,
            seed=c.partition_seed,
            json_path=None if out is None else out / f"partition_{kind}.json",
            png_path=None if out is None else out / f"partition_{kind}.png",
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


def teacher_seed(seed: int, spec: TeacherSpec) -> int:
    """``train.seed`` of one teacher under ``cpsd.teacher_seeds: independent``.

    A hash of (seed, ensemble kind, index in it), 31 bits: each teacher gets its own initial
    weights and batch order, as the authors' separately launched teacher runs do, and the
    same teacher in two runs (CGP teacher 0 of ``cgpd`` and of ``cpsd``) gets the same seed.
    """
    digest = hashlib.sha256(f"{seed}:{spec.kind}:{spec.index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def teacher_config(cfg: ExperimentConfig, spec: TeacherSpec) -> ExperimentConfig:
    """``cfg`` with the teacher's epochs and seed in ``train``."""
    c = cfg.cpsd
    seed = teacher_seed(cfg.train.seed, spec) if c.teacher_seeds == "independent" else None
    train = dataclasses.replace(
        cfg.train,
        epochs=c.teacher_epochs or cfg.train.epochs,
        seed=cfg.train.seed if seed is None else seed,
    )
    return dataclasses.replace(cfg, train=train)


def teacher_fingerprint(cfg: ExperimentConfig, dataset: OpenDataset, spec: TeacherSpec) -> str:
    return training_fingerprint(teacher_config(cfg, spec), dataset, class_subset=spec.subset)


def train_teacher(
    cfg: ExperimentConfig,
    dataset: OpenDataset,
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
        teacher_config(cfg, spec),
        dataset,
        out_dir,
        class_subset=list(spec.subset),
        on_epoch=on_epoch,
        on_step=on_step,
        placement=placement,
        log=lambda line: log(f"[{spec.name}] {line}"),
    )


def load_trained(
    cfg: ExperimentConfig, num_outputs: int, checkpoint: str | os.PathLike
) -> torch.nn.Module:
    """The selected (best) weights of a trained model, in eval mode on CPU."""
    state = load_checkpoint(checkpoint)["model"]
    # A word-query head carries its class embeddings in its state.
    model = build_model_from_config(cfg.model, num_outputs, word_query_table(state))
    model.load_state_dict(state)
    return model.eval()


def cache_teacher_logits(
    cfg: ExperimentConfig,
    dataset: OpenDataset,
    spec: TeacherSpec,
    checkpoint: str | os.PathLike,
    out_path: str | os.PathLike,
) -> Path:
    """Logits of one teacher on every training image (eval transform) -> a logit store,
    written batch by batch in ``cpsd.logits_dtype``."""
    loader = eval_loader(dataset, cfg.train, cfg.data.train_split)
    model = load_trained(cfg, len(spec.subset), checkpoint)
    logits = iter_logits(model, loader, resolve_device(cfg.train.device))
    return write_logits(
        out_path, loader.dataset.ids, logits, spec.subset, dtype=cfg.cpsd.logits_dtype
    )


# ---------------------------------------------------------------------------------------------
# Stage 5: the student


def student_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the student's epochs, lr and initialisation (``cpsd.student_*``)."""
    c = cfg.cpsd
    train = dataclasses.replace(
        cfg.train,
        epochs=c.student_epochs or cfg.train.epochs,
        lr=cfg.train.lr * c.student_lr_scale,
    )
    model = cfg.model
    if c.student_init in ("scratch", "baseline"):
        # From random weights, or about to be overwritten by the baseline's.
        model = dataclasses.replace(model, pretrained=False, pretrained_file=None)
    return dataclasses.replace(cfg, train=train, model=model)


def baseline_fingerprint(cfg: ExperimentConfig, dataset: OpenDataset) -> str:
    return training_fingerprint(cfg, dataset)


def control_seed(seed: int, index: int) -> int:
    """``train.seed`` of control model ``index`` (``cpsd.control_ensemble``): a hash of (seed,
    index), 31 bits, so that no control model is another seed's baseline."""
    digest = hashlib.sha256(f"{seed}:control:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def control_config(cfg: ExperimentConfig, index: int) -> ExperimentConfig:
    """The baseline's config with the seed of control model ``index``: keyed by
    :func:`baseline_fingerprint` like any plain model, so variants that share the baseline share
    its control models."""
    train = dataclasses.replace(cfg.train, seed=control_seed(cfg.train.seed, index))
    return dataclasses.replace(cfg, train=train)


def trains_baseline(cfg: ExperimentConfig) -> bool:
    """Whether a run trains the plain baseline: mode ``baseline``, ``train_baseline``, or a
    control ensemble (whose first member it is)."""
    c = cfg.cpsd
    return not ENSEMBLES[c.mode] or c.train_baseline or c.control_ensemble > 0


def student_fingerprint(
    cfg: ExperimentConfig, dataset: OpenDataset, specs: Sequence[TeacherSpec]
) -> str:
    """What the student depends on: its config, distillation settings, and every teacher."""
    if not specs:
        return baseline_fingerprint(cfg, dataset)
    c = cfg.cpsd
    extra = [
        "student",
        c.mode,
        c.teacher_mode,
        c.logits_dtype if c.teacher_mode == "cached" else None,
        c.cls_weight,
        c.kd_alpha,
        c.kd_reduction,
        c.student_init,
        [teacher_fingerprint(cfg, dataset, s) for s in specs],
        baseline_fingerprint(cfg, dataset) if c.student_init == "baseline" else None,
    ]
    return training_fingerprint(student_config(cfg), dataset, extra=extra)


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
    dataset: OpenDataset,
    specs: Sequence[TeacherSpec],
    out_dir: str | os.PathLike,
    *,
    teacher_checkpoints: Sequence[str | os.PathLike] = (),
    teacher_logits: Sequence[str | os.PathLike] | None = None,
    baseline_checkpoint: str | os.PathLike | None = None,
    on_epoch: MetricsCallback | None = None,
    on_step: MetricsCallback | None = None,
    placement: Placement = LOCAL,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Distil the teacher ensembles into a student on all classes (Eq. 7).

    ``cpsd.teacher_mode: cached`` reads ``teacher_logits`` (one logit store per teacher, in
    ``specs`` order) a batch at a time; ``online`` loads every teacher checkpoint and runs them
    on each batch. ``cpsd.student_init: baseline`` starts from ``baseline_checkpoint``. With no
    teachers (mode ``baseline``) this is plain training.
    """
    if not specs:
        return train_classifier(
            cfg, dataset, out_dir, on_epoch=on_epoch, on_step=on_step, placement=placement, log=log
        )
    c = cfg.cpsd
    if c.student_init == "baseline" and baseline_checkpoint is None:
        raise ValueError("cpsd.student_init: baseline needs the baseline's checkpoint")
    teachers = student_teachers(cfg, dataset, specs, teacher_checkpoints, teacher_logits)
    student = student_config(cfg)
    return train_classifier(
        student,
        dataset,
        out_dir,
        make_objective=student_objective(cfg, teachers),
        init_weights=baseline_checkpoint if c.student_init == "baseline" else None,
        fingerprint_extra=[student_fingerprint(cfg, dataset, specs)],
        return_index=c.teacher_mode == "cached",
        on_epoch=on_epoch,
        on_step=on_step,
        placement=placement,
        log=log,
    )


def student_teachers(
    cfg: ExperimentConfig,
    dataset: OpenDataset,
    specs: Sequence[TeacherSpec],
    teacher_checkpoints: Sequence[str | os.PathLike] = (),
    teacher_logits: Sequence[str | os.PathLike] | None = None,
) -> OnlineTeachers | CachedTeachers:
    """The student's source of merged teacher logits per batch (``cpsd.teacher_mode``)."""
    c = cfg.cpsd
    manifest = dataset.manifest
    num_classes = manifest.num_classes
    if c.teacher_mode == "cached":
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
        if len(teacher_checkpoints) != len(specs):
            raise ValueError("online teacher mode needs one checkpoint per teacher")
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
    return teachers


def student_objective(
    cfg: ExperimentConfig, teachers: OnlineTeachers | CachedTeachers
) -> Callable[[torch.nn.Module], DistillationObjective]:
    """Eq. 7 around a classification loss, with ``cpsd``'s weights and reduction."""
    c = cfg.cpsd

    def make_objective(loss: torch.nn.Module) -> DistillationObjective:
        kd = DistillationLoss(
            loss, cls_weight=c.cls_weight, alpha=c.kd_alpha, reduction=c.kd_reduction
        )
        return DistillationObjective(kd, teachers)

    return make_objective


# ---------------------------------------------------------------------------------------------
# Stage 6: held-out evaluation and the summary


def held_out_splits(dataset: OpenDataset) -> tuple[dict[str, str], str]:
    """The held-out splits the dataset has (``{"test": name, "shift": name}``, absent ones
    left out) and the digest of their content."""
    data = dataset.data
    splits = dataset.manifest.splits()
    wanted = {"test": data.test_split, "shift": data.shift_split}
    present = {r: s for r, s in wanted.items() if s in splits}
    digest = split_digest(dataset.root, list(present.values()), data.cache_dir) if present else ""
    return present, digest


def evaluate_model(
    cfg: ExperimentConfig,
    dataset: OpenDataset,
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    class_subset: Sequence[int] | None = None,
) -> dict[str, dict[str, float]]:
    """Score the selected weights on each held-out split the dataset has.

    Writes ``scores-<role>.npz`` (scores and targets, for merging teacher ensembles) and
    ``eval.json`` (reports and the splits' digest) into ``out_dir``, and reuses them while the
    splits are unchanged. Returns ``{role: report}`` for ``role`` in ``test``/``shift``.
    """
    out = Path(out_dir)
    present, digest = held_out_splits(dataset)
    record_path = out / "eval.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("digest") == digest:
            return record["reports"]
    manifest = dataset.manifest
    outputs = len(class_subset) if class_subset is not None else manifest.num_classes
    model = load_trained(cfg, outputs, checkpoint)
    device = resolve_device(cfg.train.device)
    counts = manifest.positives_per_class(cfg.data.train_split)
    buckets = frequency_buckets(counts if class_subset is None else counts[list(class_subset)])
    reports = {}
    for role, split in present.items():
        loader = eval_loader(dataset, cfg.train, split, class_subset)
        # The family's own validation: sets decoded by the orderless RNN, thresholded
        # scores otherwise; the same numbers as val_* of the training loop.
        evaluate = family_of(cfg.model.head).evaluate
        evaluated = evaluate(model.to(device), loader, device, False)
        scores, targets = evaluated.scores, evaluated.targets
        np.savez(out / f"scores-{role}.npz", scores=scores, targets=targets)
        reports[role] = dict(evaluated.metrics)
        # mAP of head / medium / tail classes by training frequency (the DB paper's buckets)
        for name, value in bucket_map(scores, targets, buckets).items():
            if value is not None:
                reports[role][f"mAP_{name}"] = value
    record_path.write_text(json.dumps({"digest": digest, "reports": reports}, indent=1))
    return reports


def _merged_report(
    members: Sequence[tuple[TeacherSpec, Path]], file: str, num_classes: int
) -> dict[str, float] | None:
    if not all((d / file).is_file() for _, d in members):
        return None
    saved = [np.load(d / file) for _, d in members]
    subsets = [s.subset for s, _ in members]
    scores = merge_logits([torch.from_numpy(z["scores"]) for z in saved], subsets, num_classes)
    targets = merge_logits([torch.from_numpy(z["targets"]) for z in saved], subsets, num_classes)
    return multilabel_report(scores.numpy(), targets.numpy())


def ensemble_reports(
    specs: Sequence[TeacherSpec], teacher_dirs: Sequence[str | os.PathLike], num_classes: int
) -> dict[str, dict[str, dict[str, float] | None]]:
    """``{kind: {"val"|"test"|"shift": report}}`` of each merged teacher ensemble.

    Merges the teachers' saved scores (``val_scores.npz`` and ``scores-<role>.npz``) into one
    full-label score matrix per split; a split some teacher lacks gives None.
    """
    reports = {}
    for kind in dict.fromkeys(s.kind for s in specs):
        members = [(s, Path(d)) for s, d in zip(specs, teacher_dirs, strict=True) if s.kind == kind]
        reports[kind] = {
            "val": _merged_report(members, SCORES, num_classes),
            "test": _merged_report(members, "scores-test.npz", num_classes),
            "shift": _merged_report(members, "scores-shift.npz", num_classes),
        }
    return reports


TARGET = "ensemble-target"
"""Summary row of the student's distillation target."""
CONTROL = "ensemble-baseline"
"""Summary row of the plain ensemble: the baseline and its ``cpsd.control_ensemble`` models."""


@dataclass(frozen=True)
class Combination:
    """Models whose logits are combined into one full-label model, scored like the others.

    ``groups[g]`` is a list of (checkpoint, class subset) whose subsets partition the classes
    (one merged ensemble, or one full-label model); the combined logits are
    ``Σ_g weights[g] · merged logits of group g``.
    """

    groups: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]
    weights: tuple[float, ...]


def target_combination(
    cfg: ExperimentConfig, specs: Sequence[TeacherSpec], checkpoints: Sequence[str | os.PathLike]
) -> Combination:
    """The logits the student regresses to: each ensemble's merged logits weighted by
    :func:`mlcore.distill.ensemble_weights` with ``cpsd.kd_alpha``, the shares its loss uses."""
    groups = tuple(
        tuple((str(ck), s) for s, ck in zip(subsets, cks, strict=True))
        for subsets, cks in _ensembles(specs, checkpoints)
    )
    return Combination(groups, ensemble_weights(len(groups), cfg.cpsd.kd_alpha))


def control_combination(checkpoints: Sequence[str | os.PathLike], num_classes: int) -> Combination:
    """The plain ensemble of the baseline and its control models: the mean of their logits."""
    everything = tuple(range(num_classes))
    groups = tuple(((str(ck), everything),) for ck in checkpoints)
    return Combination(groups, (1.0 / len(groups),) * len(groups))


def combined_logits(
    cfg: ExperimentConfig, dataset: OpenDataset, combination: Combination, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) float32 of a combination on ``split`` (eval transform, the one the cached
    teacher logits use) and its multi-hot targets (N, C)."""
    manifest = dataset.manifest
    num_classes = manifest.num_classes
    device = resolve_device(cfg.train.device)
    models = [[load_trained(cfg, len(s), ck).to(device) for ck, s in g] for g in combination.groups]
    outputs: list[list[list[torch.Tensor]]] = [[[] for _ in g] for g in models]
    # One pass over the split for all members: decoding costs more than these forward passes.
    with torch.inference_mode():
        for images, *_ in eval_loader(dataset, cfg.train, split):
            images = images.to(device)
            for group, out in zip(models, outputs, strict=True):
                for model, blocks in zip(group, out, strict=True):
                    blocks.append(model(images).float().cpu())
    merged = [
        merge_logits([torch.cat(b) for b in out], [s for _, s in group], num_classes)
        for group, out in zip(combination.groups, outputs, strict=True)
    ]
    logits = combination.weights[0] * merged[0]
    for weight, more in zip(combination.weights[1:], merged[1:], strict=True):
        logits = logits + weight * more
    targets = manifest.multi_hot(manifest.split_rows(split)).astype(np.float32)
    return logits.numpy().astype(np.float32), targets


def evaluate_combination(
    cfg: ExperimentConfig,
    dataset: OpenDataset,
    combination: Combination,
    out_dir: str | os.PathLike,
) -> dict[str, dict[str, float] | None]:
    """``{"val"|"test"|"shift": report}`` of a combination (absent splits: None); writes
    ``logits-<role>.npz`` (logits and targets) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    present, _ = held_out_splits(dataset)
    reports: dict[str, dict[str, float] | None] = {"val": None, "test": None, "shift": None}
    for role, split in {"val": cfg.data.val_split, **present}.items():
        logits, targets = combined_logits(cfg, dataset, combination, split)
        np.savez(out / f"logits-{role}.npz", logits=logits, targets=targets)
        scores = torch.sigmoid(torch.from_numpy(logits)).numpy()
        reports[role] = multilabel_report(scores, targets)
    return reports


SUMMARY_METRICS = ("mAP", "CF1", "OF1")
SUMMARY_COLUMNS = (
    "name",
    "role",
    "classes",
    "best_epoch",
    *(f"val_{m}" for m in SUMMARY_METRICS),
    *(f"test_{m}" for m in SUMMARY_METRICS),
    "shift_mAP",
)


def summary_row(
    name: str,
    role: str,
    classes: int,
    val: dict[str, float],
    held_out: dict[str, dict[str, float] | None],
    best_epoch: int | None = None,
) -> dict:
    """One table row: val metrics of the selected weights, then the held-out splits."""
    row: dict = {"name": name, "role": role, "classes": classes, "best_epoch": best_epoch}
    row.update({f"val_{m}": val[m] for m in SUMMARY_METRICS})
    test = held_out.get("test")
    row.update({f"test_{m}": None if test is None else test[m] for m in SUMMARY_METRICS})
    shift = held_out.get("shift")
    row["shift_mAP"] = None if shift is None else shift["mAP"]
    return row


@dataclass
class RunSummary:
    """The rows of the final table (teachers, ensembles, student, baseline)."""

    rows: list[dict]

    def markdown(self) -> str:
        """The table; a row whose model was reused from other code (its ``stale`` reason,
        set by the workflows) is marked ``(stale)`` and explained below the table."""
        lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
        notes = []
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
            if row.get("stale"):
                cells[0] += " (stale)"
                notes.append(f"(stale) {row['name']}: {row['stale']}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines + (["", *notes] if notes else []))

    def to_json(self) -> str:
        return json.dumps(self.rows, indent=1)


@dataclass(frozen=True)
class TrainedModel:
    """What the summary needs of one trained model (teacher, student or baseline)."""

    name: str
    role: str
    classes: int
    best_epoch: int
    best_metrics: dict[str, float]  # training-loop names (``val_mAP`` ...)
    held_out: dict[str, dict[str, float]]  # ``evaluate_model`` output
    directory: Path  # holds ``val_scores.npz`` and ``scores-<role>.npz``


def build_summary(
    specs: Sequence[TeacherSpec],
    teachers: Sequence[TrainedModel],
    finals: Sequence[TrainedModel],
    num_classes: int,
    combinations: Sequence[tuple[str, dict[str, dict[str, float] | None]]] = (),
) -> RunSummary:
    """Rows for every teacher, every merged ensemble, the combinations (``ensemble-target``,
    ``ensemble-baseline``: name and :func:`evaluate_combination` reports), then the
    full-label models."""
    rows = [
        summary_row(t.name, "teacher", t.classes, _val(t.best_metrics), t.held_out, t.best_epoch)
        for t in teachers
    ]
    merged = ensemble_reports(specs, [t.directory for t in teachers], num_classes)
    for kind, reports in merged.items():
        val = reports.pop("val")
        rows.append(summary_row(f"ensemble-{kind}", "ensemble", num_classes, val, reports))
    for name, reports in combinations:
        rows.append(summary_row(name, "ensemble", num_classes, reports["val"], reports))
    for m in finals:
        rows.append(
            summary_row(m.name, m.role, m.classes, _val(m.best_metrics), m.held_out, m.best_epoch)
        )
    return RunSummary(rows)


def _trained(name: str, role: str, classes: int, result: TrainResult, held_out) -> TrainedModel:
    return TrainedModel(
        name, role, classes, result.best_epoch, result.best_metrics, held_out, result.out_dir
    )


def run_local(
    cfg: ExperimentConfig,
    out_dir: str | os.PathLike,
    *,
    dataset: OpenDataset | None = None,
    log: Callable[[str], None] = print,
) -> RunSummary:
    """The whole algorithm in this process, sequentially: the reference the pipeline matches.

    ``dataset`` is ``cfg.data`` already opened by the caller (None: opened here).
    """
    out = Path(out_dir)
    dataset = dataset or open_dataset(cfg.data)
    if cfg.pretrain.enabled:
        log(f"pretrain: {cfg.pretrain.synth.num_classes} upstream classes")
        upstream_cfg = pretrain_config(cfg)
        upstream_data = open_dataset(upstream_cfg.data)
        upstream = train_classifier(upstream_cfg, upstream_data, out / "pretrain", log=log)
        backbone = export_backbone(cfg, upstream.best_checkpoint, out / "pretrain" / BACKBONE_FILE)
        cfg = with_pretrained(cfg, backbone)
    num_classes = dataset.num_classes
    log(f"mode {cfg.cpsd.mode}: label statistics and partitions")
    partitions = compute_partitions(cfg, dataset, out / "partitions")
    specs = plan_teachers(partitions)
    teachers, checkpoints, logits = [], [], []
    for spec in specs:
        teacher_dir = out / "teachers" / spec.name
        result = train_teacher(cfg, dataset, spec, teacher_dir, log=log)
        held_out = evaluate_model(
            teacher_config(cfg, spec),
            dataset,
            result.best_checkpoint,
            teacher_dir,
            class_subset=spec.subset,
        )
        teachers.append(_trained(spec.name, "teacher", len(spec.subset), result, held_out))
        checkpoints.append(result.best_checkpoint)
        if cfg.cpsd.teacher_mode == "cached":
            path = teacher_dir / LOGIT_STORE
            logits.append(cache_teacher_logits(cfg, dataset, spec, result.best_checkpoint, path))
    finals = []
    combinations = []
    if specs:
        target = target_combination(cfg, specs, checkpoints)
        combinations.append(
            (TARGET, evaluate_combination(cfg, dataset, target, out / "combinations" / TARGET))
        )
    baseline_checkpoint = None
    if trains_baseline(cfg):
        log(f"baseline: training on all {num_classes} classes")
        baseline = train_classifier(cfg, dataset, out / "baseline", log=log)
        held_out = evaluate_model(cfg, dataset, baseline.best_checkpoint, out / "baseline")
        finals.append(_trained("baseline", "baseline", num_classes, baseline, held_out))
        baseline_checkpoint = baseline.best_checkpoint
        controls = [baseline.best_checkpoint]
        for i in range(cfg.cpsd.control_ensemble):
            log(f"control-{i}: a plain model with another seed")
            controls.append(
                train_classifier(
                    control_config(cfg, i), dataset, out / f"control-{i}", log=log
                ).best_checkpoint
            )
        if len(controls) > 1:
            plain = control_combination(controls, num_classes)
            combinations.append(
                (CONTROL, evaluate_combination(cfg, dataset, plain, out / "combinations" / CONTROL))
            )
    if specs:
        log(f"student: training on all {num_classes} classes")
        student = train_student(
            cfg,
            dataset,
            specs,
            out / "student",
            teacher_checkpoints=checkpoints,
            teacher_logits=logits or None,
            baseline_checkpoint=baseline_checkpoint,
            log=log,
        )
        held_out = evaluate_model(
            student_config(cfg), dataset, student.best_checkpoint, out / "student"
        )
        finals.insert(0, _trained("student", "student", num_classes, student, held_out))
    summary = build_summary(specs, teachers, finals, num_classes, combinations)
    (out / "summary.json").write_text(summary.to_json())
    (out / "summary.md").write_text(summary.markdown() + "\n")
    return summary


def _val(metrics: dict[str, float]) -> dict[str, float]:
    """Strip the ``val_`` prefix of the training loop's metric names."""
    return {k.removeprefix("val_"): v for k, v in metrics.items() if k.startswith("val_")}
