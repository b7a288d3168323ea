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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from mlcore.bundle import IMAGE_SUFFIXES, Classifier, Decision, ImageSource, ModelBundle
from mlcore.data.dataset import MultiLabelDataset
from mlcore.data.manifest import Manifest, ManifestError
from mlcore.evaluation import read_thresholds, write_evaluation
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


def decision_from_args(
    bundle: ModelBundle, threshold: float, thresholds_file: str | None, top_k: int | None
) -> Decision:
    if top_k is not None:
        return Decision(top_k=top_k)
    if thresholds_file is not None:
        return Decision(read_thresholds(thresholds_file, bundle.class_names).values)
    return Decision(threshold)


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


def class_columns(bundle: ModelBundle, manifest: Manifest) -> list[int]:
    """The dataset's column of each of the model's classes (matched by name)."""
    position = {name: i for i, name in enumerate(manifest.class_names)}
    missing = [n for n in bundle.class_names if n not in position]
    if missing:
        raise ManifestError(
            f"{manifest.root} lacks {len(missing)} of the model's classes (e.g. {missing[:5]}); "
            "evaluate on a dataset with the same class names"
        )
    return [position[n] for n in bundle.class_names]


def _batches(loader, progress: bool) -> Iterator:
    yield from tqdm(loader, unit="batch", disable=not progress, file=sys.stderr, leave=False)


def run_evaluate(
    classifier: Classifier,
    out_dir: str | os.PathLike,
    *,
    manifest_dir: str | None,
    split: str,
    threshold: float = 0.5,
    thresholds_file: str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
):
    """Score a split and write the report, table, plots and thresholds (see mlcore.evaluation).

    Raises:
        ManifestError: No such split, or the dataset lacks a class of the model.
        ThresholdsError: ``thresholds_file`` was chosen on ``split`` itself.
    """
    from torch.utils.data import DataLoader

    from mlcore.evaluation import ThresholdsError

    bundle = classifier.bundle
    manifest = Manifest.load(_dataset_of(bundle, manifest_dir), with_bytes=True)
    columns = class_columns(bundle, manifest)
    fixed = None
    if thresholds_file is not None:
        fixed = read_thresholds(thresholds_file, bundle.class_names)
        if fixed.chosen_on_split == split:
            raise ThresholdsError(
                f"{thresholds_file} was chosen on {split!r}: metrics with it on the same split "
                "are optimistic; evaluate another split (e.g. test) with it"
            )
    dataset = MultiLabelDataset(manifest, split, classifier.transform, class_subset=columns)
    loader = DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=dataset.collate_fn
    )
    scores, targets = predict_loader(
        classifier.model, _batches(loader, progress), classifier.device
    )
    train_counts = bundle.metadata.get("train_positives")
    if train_counts is None:
        train_split = bundle.metadata.get("dataset", {}).get("train_split", "train")
        train_counts = manifest.positives_per_class(train_split)[columns].tolist()
    return write_evaluation(
        out_dir,
        scores,
        targets,
        bundle.class_names,
        split=split,
        train_counts=train_counts,
        threshold=threshold,
        fixed_thresholds=None if fixed is None else fixed.values,
        fixed_thresholds_from=None
        if fixed is None
        else f"{thresholds_file} (chosen on {fixed.chosen_on_split})",
    )


def format_report(report: dict[str, float]) -> str:
    keys = [k for k in report if not k.startswith(("P@", "R@"))]
    return "\n".join(f"  {k:<11} {100 * report[k]:6.2f}" for k in keys)
