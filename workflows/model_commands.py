"""``cpsd predict`` and ``cpsd evaluate``: inputs, progress bars and output files.

``workflows.cli`` resolves ``--model`` (``workflows.mlflow_model.open_bundle``) and calls
:func:`run_predict` / :func:`run_evaluate` with a ``mlcore.bundle.Classifier``; the ML itself
lives in ``mlcore.bundle`` and ``mlcore.evaluation``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np
from tqdm import tqdm

from mlcore.bundle import IMAGE_SUFFIXES, Classifier, Decision, ImageSource, ModelBundle
from mlcore.data.dataset import MultiLabelDataset
from mlcore.data.manifest import Manifest, ManifestError, is_uri
from mlcore.evaluation import (
    EvaluationFiles,
    ModelIdentity,
    ThresholdsError,
    name_difference,
    read_thresholds,
    write_evaluation,
)
from mlcore.train import predict as predict_loader

# ---------------------------------------------------------------------------------------------
# predict: inputs


@dataclass
class Inputs:
    """What to label: display names and sources, plus the inputs already known to be bad."""

    names: list[str] = field(default_factory=list)
    sources: list[ImageSource] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def add(self, name: str, source: ImageSource) -> None:
        self.names.append(name)
        self.sources.append(source)


def collect_images(arguments: Iterable[str], stdin: TextIO | None = None) -> Inputs:
    """Files as given, directories searched recursively for image files, ``-``: paths on stdin.

    A file named explicitly is taken whatever its suffix (it is reported if it does not
    decode); inside directories only files with an image suffix are taken. A path that does not
    exist is recorded in ``missing``.
    """
    inputs = Inputs()
    for argument in arguments:
        if argument == "-":
            for line in stdin or sys.stdin:
                if line.strip():
                    _add_path(inputs, line.strip())
        else:
            _add_path(inputs, argument)
    return inputs


def _add_path(inputs: Inputs, text: str) -> None:
    path = Path(text).expanduser()
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not found:
            inputs.missing.append((text, "directory holds no image files"))
        for p in found:
            inputs.add(str(p), str(p))
    elif path.is_file():
        inputs.add(text, str(path))
    else:
        inputs.missing.append((text, "no such file or directory"))


def manifest_inputs(root: str | os.PathLike, split: str) -> Inputs:
    """Every image of one split of a dataset, named by image id."""
    manifest = Manifest.load(root, with_bytes=True)
    rows = manifest.split_rows(split)
    if rows.size == 0:
        raise ManifestError(f"{root}: split {split!r} has no rows (splits: {manifest.splits()})")
    table = manifest.table.take(rows)
    inputs = Inputs()
    for image_id, path, blob in zip(
        table.column("image_id").to_pylist(),
        table.column("path").to_pylist(),
        table.column("image_bytes").to_pylist(),
        strict=True,
    ):
        inputs.add(image_id, blob if blob is not None else str(manifest.image_root / path))
    return inputs


# ---------------------------------------------------------------------------------------------
# predict: outputs


OUTPUT_SUFFIXES = (".jsonl", ".csv")


class _Writer:
    """One row per labelled image, JSONL or CSV by the file's suffix."""

    def __init__(self, path: Path):
        suffix = path.suffix.lower()
        if suffix not in OUTPUT_SUFFIXES:
            raise ValueError(f"output must end in .jsonl or .csv, got {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="")  # noqa: SIM115 (closed in close())
        self.csv = csv.writer(self.file) if suffix == ".csv" else None
        if self.csv is not None:
            self.csv.writerow(["image", "labels", "scores"])

    def write(self, image: str, labels: list[str], scores: list[float]) -> None:
        if self.csv is not None:
            self.csv.writerow([image, ";".join(labels), ";".join(f"{s:.6f}" for s in scores)])
        else:
            row = {"image": image, "labels": labels, "scores": [round(s, 6) for s in scores]}
            self.file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.file.close()


@dataclass
class PredictSummary:
    labelled: int
    skipped: list[tuple[str, str]]  # (image, reason)
    out: Path

    def line(self) -> str:
        text = f"labelled {self.labelled} images -> {self.out}"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} missing or unreadable (listed above)"
        return text


def run_predict(
    classifier: Classifier,
    inputs: Inputs,
    out: str | os.PathLike,
    decision: Decision,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    report=print,
) -> PredictSummary:
    """Label ``inputs`` in batches, write one row per readable image, report every skip."""
    writer = _Writer(Path(out))
    names = classifier.class_names
    skipped = list(inputs.missing)
    for name, reason in inputs.missing:
        report(f"skipped {name}: {reason}")
    labelled = 0
    bar = tqdm(
        total=len(inputs.sources), unit="img", disable=not progress, file=sys.stderr, leave=False
    )
    try:
        batches = classifier.iter_scores(
            inputs.sources, batch_size=batch_size, num_workers=num_workers
        )
        for batch in batches:
            chosen = decision.select(batch.scores)
            for index, row_scores, classes in zip(batch.indices, batch.scores, chosen, strict=True):
                writer.write(
                    inputs.names[index],
                    [names[c] for c in classes],
                    [float(row_scores[c]) for c in classes],
                )
            for index, reason in batch.failures:
                skipped.append((inputs.names[index], reason))
                tqdm.write(f"skipped {inputs.names[index]}: {reason}", file=sys.stderr)
            labelled += len(batch.indices)
            bar.update(len(batch.indices) + len(batch.failures))
    finally:
        bar.close()
        writer.close()
    return PredictSummary(labelled, skipped, Path(out))


def model_identity(bundle: ModelBundle) -> ModelIdentity:
    """What a thresholds file must name to be used with ``bundle``."""
    return ModelIdentity(bundle.digest, bundle.class_names)


@dataclass(frozen=True)
class LabelRule:
    """How ``cpsd predict`` picks labels, and the line that tells the user."""

    decision: Decision
    description: str


def label_rule(
    bundle: ModelBundle, threshold: float | None, thresholds_file: str | None, top_k: int | None
) -> LabelRule:
    """The first of ``--top-k``, ``--thresholds``, ``--threshold`` given, else the bundle's
    validation thresholds (else 0.5, for bundles written before they were stored)."""
    if top_k is not None:
        return LabelRule(Decision(top_k=top_k), f"labels: the top {top_k} classes per image")
    if thresholds_file is not None:
        chosen = read_thresholds(thresholds_file, model_identity(bundle))
        return LabelRule(
            Decision(chosen.values),
            f"labels: per-class thresholds from {thresholds_file} "
            f"(chosen on {chosen.chosen_on_split})",
        )
    if threshold is not None:
        return LabelRule(Decision(threshold), f"labels: one threshold, {threshold:g}")
    stored = bundle.thresholds
    if stored is None:
        return LabelRule(
            bundle.default_decision(),
            "labels: one threshold, 0.5 (this bundle holds no validation thresholds: written "
            "before cpsd stored them, or its validation split had no positives)",
        )
    return LabelRule(
        bundle.default_decision(),
        f"labels: the model's per-class thresholds, chosen on {stored.split} when training ended "
        f"(max F1 per class; best single threshold {stored.single:.2f}); --threshold, "
        "--thresholds FILE or --top-k override them",
    )


# ---------------------------------------------------------------------------------------------
# evaluate


def _dataset_of(bundle: ModelBundle, manifest_dir: str | None) -> Path:
    if manifest_dir is not None:
        return Path(manifest_dir)
    recorded = bundle.metadata.get("dataset", {}).get("root")
    if recorded is None:
        raise ManifestError("the model does not record its dataset; pass --manifest DIR")
    if not Path(recorded).is_dir():
        raise ManifestError(
            f"the model's training dataset {recorded} is not here; pass --manifest DIR"
        )
    return Path(recorded)


class ClassMatch(NamedTuple):
    """Which classes an evaluation covers: the same classes, as positions in each side."""

    model: list[int]  # model outputs evaluated, in the model's order
    dataset: list[int]  # the dataset's column of each
    note: str | None  # what was left out, to tell the user; None when nothing was


def _trained_on_subset_of(bundle: ModelBundle, manifest: Manifest) -> bool:
    """The model was trained on these classes of this very dataset (a CPSD teacher)."""
    recorded = bundle.metadata.get("dataset", {})
    indices, root = recorded.get("class_indices"), recorded.get("root")
    names = manifest.class_names
    here = manifest.root if is_uri(manifest.root) else Path(manifest.root).resolve()
    return (
        root is not None
        and str(root) == str(here)
        and isinstance(indices, list)
        and all(isinstance(i, int) and 0 <= i < len(names) for i in indices)
        and tuple(names[i] for i in indices) == bundle.class_names
    )


def match_classes(bundle: ModelBundle, manifest: Manifest, mode: str = "exact") -> ClassMatch:
    """Match the model's classes to the dataset's by name.

    Args:
        mode: ``exact``: the class sets must agree (or the model must be a class subset that
            it was trained as, like a CPSD teacher); ``intersect``: evaluate the shared ones.

    Raises:
        ManifestError: The sets differ (``exact``), or share no class.
    """
    position = {name: i for i, name in enumerate(manifest.class_names)}
    difference = name_difference(
        "the model", bundle.class_names, "the dataset", manifest.class_names
    )
    shared = [j for j, name in enumerate(bundle.class_names) if name in position]
    match = ClassMatch(shared, [position[bundle.class_names[j]] for j in shared], None)
    if not difference:
        return match
    model_complete = len(shared) == bundle.num_classes
    if model_complete and _trained_on_subset_of(bundle, manifest):
        return match  # a teacher on its own dataset: its classes are the ones it learnt
    if mode != "intersect":
        raise ManifestError(
            f"{manifest.root} has other classes than the model ({difference}); evaluate on a "
            "dataset with the model's classes, or pass --classes intersect to evaluate the "
            "shared ones"
        )
    if not shared:
        raise ManifestError(f"{manifest.root} shares no class with the model ({difference})")
    return match._replace(
        note=f"evaluating the {len(shared)} classes in both (--classes intersect; {difference})"
    )


def _batches(loader, progress: bool) -> Iterator:
    yield from tqdm(loader, unit="batch", disable=not progress, file=sys.stderr, leave=False)


@dataclass
class Evaluation:
    """What :func:`run_evaluate` wrote and what to tell the user about it."""

    files: EvaluationFiles
    classes: int  # classes evaluated
    notes: list[str]  # class matching and thresholds, one line each
    fixed_from: str | None  # where the per-class thresholds of the report came from


def run_evaluate(
    classifier: Classifier,
    out_dir: str | os.PathLike,
    *,
    manifest_dir: str | None,
    split: str,
    threshold: float = 0.5,
    thresholds_file: str | None = None,
    classes: str = "exact",
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> Evaluation:
    """Score a split and write the report, table, plots and thresholds (see mlcore.evaluation).

    The report adds the figures at per-class thresholds: ``thresholds_file``'s, else the
    bundle's own when they were chosen on another split.

    Raises:
        ManifestError: No such split, or the dataset's classes differ (see
            :func:`match_classes`).
        ThresholdsError: ``thresholds_file`` was chosen on ``split`` itself, or for another
            model.
    """
    from torch.utils.data import DataLoader

    bundle = classifier.bundle
    manifest = Manifest.load(_dataset_of(bundle, manifest_dir), with_bytes=True)
    match = match_classes(bundle, manifest, classes)
    notes = [match.note] if match.note else []
    fixed, fixed_from = None, None
    if thresholds_file is not None:
        chosen = read_thresholds(thresholds_file, model_identity(bundle))
        if chosen.chosen_on_split == split:
            raise ThresholdsError(
                f"{thresholds_file} was chosen on {split!r}: metrics with it on the same split "
                "are optimistic; evaluate another split (e.g. test) with it"
            )
        fixed, fixed_from = chosen.values, f"{thresholds_file} (chosen on {chosen.chosen_on_split})"
    elif bundle.thresholds is not None and bundle.thresholds.split != split:
        fixed = np.asarray(bundle.thresholds.per_class)
        fixed_from = f"the model's own (chosen on {bundle.thresholds.split})"
    dataset = MultiLabelDataset(manifest, split, classifier.transform, class_subset=match.dataset)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=dataset.collate_fn
    )
    scores, targets = predict_loader(
        classifier.model, _batches(loader, progress), classifier.device
    )
    scores = scores[:, match.model]
    train_counts = bundle.metadata.get("train_positives")
    if train_counts is None:
        train_split = bundle.metadata.get("dataset", {}).get("train_split", "train")
        train_counts = manifest.positives_per_class(train_split)[match.dataset].tolist()
    else:
        train_counts = [train_counts[j] for j in match.model]
    complete = len(match.model) == bundle.num_classes
    if not complete:
        notes.append("no thresholds.json: thresholds are written for all of the model's classes")
    files = write_evaluation(
        out_dir,
        scores,
        targets,
        [bundle.class_names[j] for j in match.model],
        split=split,
        train_counts=train_counts,
        threshold=threshold,
        fixed_thresholds=None if fixed is None else fixed[match.model],
        fixed_thresholds_from=fixed_from,
        model=model_identity(bundle) if complete else None,
    )
    return Evaluation(files, len(match.model), notes, fixed_from)


def format_report(report: Mapping[str, float]) -> str:
    """One indented line per figure, in percent (the top-k P and R are in report.json)."""
    keys = [k for k in report if not k.startswith(("P@", "R@"))]
    return "\n".join(f"  {k:<11} {100 * report[k]:6.2f}" for k in keys)
