"""``cpsd``: the command line.

Every command that trains reads one YAML config (``--config``) with ``--set dotted.key=value``
overrides, parsed once (``workflows.entry``): the command gets the loaded config. Expected
failures (bad config, bad data) print one clear line and exit 2; nothing prints a traceback for
user error. ``pipeline``, ``study`` and ``tune`` are also ``python -m workflows.<name>``, with
the same arguments.

This module imports neither torch nor MLflow at import time: the commands that use a trained
model check ``--model`` first (``workflows.model_ref``), so a mistyped one fails in a fraction
of a second instead of after seconds of imports.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from workflows.config import Config
from workflows.entry import (
    PIPELINE,
    STUDY,
    TUNE,
    Command,
    UsageError,
    add_config_args,
    add_job_args,
    run_command,
    with_config,
)
from workflows.model_ref import TrackingStore, check_model_ref

# ---------------------------------------------------------------------------------------------
# data


def cmd_data_synth(args: argparse.Namespace) -> None:
    from mlcore.config import SynthConfig
    from mlcore.data.synth import generate

    cfg = SynthConfig(
        num_classes=args.num_classes,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        num_test_shift=args.context_shift,
        image_size=args.image_size,
        num_topics=args.num_topics,
        mean_objects=args.mean_objects,
        labels_from=args.labels_from,
        compositional=args.compositional,
        seed=args.seed,
    )
    out = generate(cfg, args.out)
    total = cfg.num_train + cfg.num_val + cfg.num_test + cfg.num_test_shift
    extra = " and class_embeddings.npz" if cfg.compositional else ""
    print(f"wrote {total} images{extra} to {out}")


def cmd_data_import(args: argparse.Namespace) -> None:
    from mlcore.data import importers

    options = importers.ImportOptions(
        drop_empty=args.drop_empty,
        skip_missing=args.skip_missing,
        verify_decode=args.verify_decode,
        name=args.name,
        overwrite=args.overwrite,
    )
    if args.kind == "coco":
        if not args.ann:
            raise UsageError("coco needs at least one --ann ANN.json:SPLIT:IMAGE_DIR")
        entries = [importers.CocoEntry.parse(spec) for spec in args.ann]
        result = importers.import_coco(
            entries, args.out, class_order=args.class_order, options=options
        )
    elif args.kind == "voc":
        result = importers.import_voc(
            args.source,
            args.out,
            splits=importers.parse_split_map(args.split or ["train:train", "val:val"]),
            include_difficult=args.include_difficult,
            options=options,
        )
    elif args.kind == "openimages":
        if not args.labels or not args.class_descriptions:
            raise UsageError(
                "openimages needs --class-descriptions CSV and at least one "
                "--labels LABELS.csv:SPLIT:IMAGE_DIR"
            )
        result = importers.import_openimages(
            [importers.OpenImagesEntry.parse(spec) for spec in args.labels],
            args.out,
            class_descriptions=args.class_descriptions,
            trainable_classes=args.trainable_classes,
            check_images=args.check_images,
            options=options,
            progress=print,
        )
    elif args.kind == "nuswide1k":
        result = importers.import_nuswide1k(
            args.source,
            args.out,
            image_dir=args.image_dir,
            val_fraction=args.val_fraction,
            invalid_labels=args.invalid_labels,
            options=options,
        )
    elif args.kind == "nuswide":
        result = importers.import_nuswide(
            args.source,
            args.out,
            image_dir=args.image_dir,
            splits=importers.parse_split_map(args.split) if args.split else None,
            invalid_labels=args.invalid_labels,
            options=options,
        )
    else:
        result = importers.import_csv(
            args.source,
            args.out,
            image_dir=args.image_dir,
            classes_file=args.classes,
            num_classes=args.num_classes,
            label_format=args.label_format,
            label_delimiter=args.label_delimiter,
            csv_delimiter=args.csv_delimiter,
            default_split=args.default_split,
            options=options,
        )
    print(result.summary())


def cmd_data_check(args: argparse.Namespace) -> int:
    """Exit 0 (no errors), 1 (errors in the data, an unreadable manifest included) or 2 (the
    folder is not a dataset: no manifest.parquet)."""
    from mlcore.data.check import check_dataset, format_report
    from mlcore.data.manifest import ManifestError, manifest_path

    if not manifest_path(args.dir).is_file():
        raise UsageError(f"no manifest.parquet in {args.dir}: not a dataset directory")
    try:
        report = check_dataset(args.dir, verify_images=args.verify_images)
    except ManifestError as err:
        print(f"error: {err}")
        return 1
    print(format_report(report))
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------
# training


def cmd_train(cfg: Config, args: argparse.Namespace) -> None:
    from workflows.driver import preflight
    from workflows.train_one import train_one

    preflight(cfg, uses_stages=False)
    result = train_one(cfg, out_dir=args.out)
    metric = cfg.train.select_metric
    print(
        f"best val {metric} {result.best_metrics[f'val_{metric}']:.4f} at epoch {result.best_epoch}"
    )
    print(f"outputs in {result.out_dir}")


def cmd_partition(args: argparse.Namespace) -> None:
    from mlcore.data.manifest import read_info
    from mlcore.partition.kinds import label_partition, label_statistics

    names = read_info(args.data).class_names
    out = Path(args.out)
    png = out.with_suffix(".png")
    partition = label_partition(
        args.kind,
        label_statistics(args.data, args.split, names),
        k=args.k,
        tau=args.tau,
        seed=args.seed,
        json_path=out,
        png_path=png,
        k_key="--k",
    )
    for t, subset in enumerate(partition.report["subsets"]):
        print(f"subset {t} ({len(subset)}): " + ", ".join(c["name"] for c in subset))
    print(f"Ncut {partition.report['ncut']:.6f}; wrote {out} and {png}")


def cmd_run_local(cfg: Config, args: argparse.Namespace) -> None:
    from mlcore.cpsd import run_local
    from mlcore.data.loading import open_dataset
    from mlcore.experiment import training_fingerprint
    from mlcore.fingerprint import config_content, stable_hash
    from workflows.driver import preflight

    preflight(cfg)
    # Keyed by data and every ML setting: another config never resumes this one's checkpoints.
    dataset = open_dataset(cfg.data)
    key = stable_hash(training_fingerprint(cfg, dataset), config_content(cfg.cpsd))
    out = Path(args.out) if args.out else Path(cfg.storage_path) / cfg.name / f"local-{key}"
    summary = run_local(cfg, out, dataset=dataset)
    print(summary.markdown())
    print(f"outputs in {out}")


# The Ray jobs are imported when they run: ``cpsd --help`` does not load Ray.


def cmd_pipeline(cfg: Config, args: argparse.Namespace) -> None:
    from workflows import pipeline

    pipeline.command(cfg, args)


def cmd_tune(cfg: Config, args: argparse.Namespace) -> None:
    from workflows import tune

    tune.command(cfg, args)


def cmd_study(cfg: Config, args: argparse.Namespace) -> None:
    from workflows import study

    study.command(cfg, args)


def cmd_demo(args: argparse.Namespace) -> int | None:
    print("cpsd demo: generated benchmark data -> CPSD pipeline on a local Ray instance")
    return with_config(cmd_pipeline)(args)


# ---------------------------------------------------------------------------------------------
# using a trained model


@contextlib.contextmanager
def _model_errors() -> Iterator[None]:
    """Model, thresholds and export errors are the user's input: one line, exit 2."""
    from mlcore.bundle import BundleError
    from mlcore.evaluation import ThresholdsError
    from mlcore.export import ExportError

    try:
        yield
    except (BundleError, ThresholdsError, ExportError) as err:
        raise UsageError(str(err)) from err


def _load_model(args: argparse.Namespace):
    from mlcore.bundle import Classifier, load_bundle
    from workflows.mlflow_model import open_bundle

    with open_bundle(args.model, args.tracking_uri) as path:
        return Classifier(load_bundle(path), args.device)


def _checks_model(command: Command) -> Command:
    """Check ``--model`` before torch and MLflow are imported: a wrong one fails at once."""

    @functools.wraps(command)
    def checked(args: argparse.Namespace) -> int | None:
        check_model_ref(args.model, TrackingStore.of(args.tracking_uri))
        return command(args)

    return checked


@_checks_model
def cmd_predict(args: argparse.Namespace) -> int:
    from workflows.model_commands import (
        OUTPUT_SUFFIXES,
        collect_images,
        label_rule,
        manifest_inputs,
        run_predict,
    )

    if (args.manifest is None) == (not args.images):
        raise UsageError("give either --images PATH... ('-': paths on stdin) or --manifest DIR")
    if Path(args.out).suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"--out must end in .jsonl or .csv, got {args.out!r}")
    with _model_errors():
        classifier = _load_model(args)
        rule = label_rule(classifier.bundle, args.threshold, args.thresholds, args.top_k)
    print(rule.description, flush=True)
    if args.manifest is not None:
        inputs = manifest_inputs(args.manifest, args.split)
    else:
        inputs = collect_images(args.images)
    print(
        f"labelling {len(inputs.sources)} images ({len(classifier.class_names)} classes) on "
        f"{classifier.device}",
        file=sys.stderr,
    )
    summary = run_predict(
        classifier,
        inputs,
        args.out,
        rule.decision,
        batch_size=args.batch_size,
        num_workers=args.workers,
        report=lambda line: print(line, file=sys.stderr),
    )
    print(summary.line())
    # Exit 1 tells scripts that inputs were skipped; the output holds every other image.
    return 1 if summary.skipped else 0


@_checks_model
def cmd_evaluate(args: argparse.Namespace) -> int:
    from workflows.model_commands import format_report, run_evaluate

    with _model_errors():
        classifier = _load_model(args)
        done = run_evaluate(
            classifier,
            args.out,
            manifest_dir=args.manifest,
            split=args.split,
            threshold=args.threshold,
            thresholds_file=args.thresholds,
            classes=args.classes,
            batch_size=args.batch_size,
            num_workers=args.workers,
        )
    for note in done.notes:
        print(note)
    print(f"{args.split}, {done.classes} classes, threshold {args.threshold:g}:")
    print(format_report(done.files.report))
    if done.files.fixed_report is not None:
        print(f"{args.split}, per-class thresholds from {done.fixed_from}:")
        print(format_report(done.files.fixed_report))
    for path in done.files.paths():
        print(f"wrote {path}")
    if done.files.thresholds_json is not None:
        print(
            "thresholds.json: per-class F1-maximising thresholds fitted on this split, for this "
            "model only; use them on other splits (predict/evaluate --thresholds), never to "
            "report this one"
        )
    return 0


@_checks_model
def cmd_export(args: argparse.Namespace) -> int:
    from mlcore.export import export_bundle

    with _model_errors():
        bundle = _load_model(args).bundle
        result = export_bundle(bundle, args.format, args.out, atol=args.atol)
    print(
        f"wrote {result.path} ({result.format}, dynamic batch axis); parity with eager PyTorch "
        f"at batch sizes {list(result.batch_sizes)}: max abs diff {result.max_abs_diff:.3g} "
        f"<= {result.atol:g}"
    )
    return 0


@_checks_model
def cmd_serve(args: argparse.Namespace) -> int:
    """``mlflow models serve`` for any ``--model`` form, started so that it works from any shell."""
    from workflows.mlflow_model import servable_model, serve_process

    if args.image_root is not None and not Path(args.image_root).is_dir():
        raise UsageError(f"--image-root {args.image_root}: not a directory")
    store = TrackingStore.of(args.tracking_uri)
    with _model_errors():
        model = servable_model(args.model)
    argv, env = serve_process(
        model, store.uri, host=args.host, port=args.port, image_root=args.image_root
    )
    print(
        f"serving {args.model} at http://{args.host}:{args.port}/invocations "
        f"(mlflow models serve -m {model}; Ctrl-C stops it)",
        flush=True,
    )
    os.execve(argv[0], argv, env)  # the server replaces this process: signals reach it


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text}")
    return value


MODEL_HELP = (
    "a model bundle file, a training output directory (cpsd train --out, a pipeline stage), "
    "runs:/<run_id>/<stage> (train for cpsd train), or models:/<name>/<version or alias>"
)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument(
        "--tracking-uri",
        help="MLflow store for runs:/ and models:/ (default: MLFLOW_TRACKING_URI, else "
        "sqlite:///./mlflow.db)",
    )


def _add_inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--workers", type=int, default=0, help="image decoding processes")
    p.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cpu, cuda, cuda:N")


# ---------------------------------------------------------------------------------------------


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="generate, import and check datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    synth = data_sub.add_parser("synth", help="generate the offline benchmark dataset")
    synth.add_argument("--out", required=True, help="dataset directory to write")
    synth.add_argument("--num-classes", type=int, default=20)
    synth.add_argument("--num-train", type=int, default=1600)
    synth.add_argument("--num-val", type=int, default=400)
    synth.add_argument(
        "--num-test", type=int, default=400, help="held-out test images (0: no test split)"
    )
    synth.add_argument("--image-size", type=int, default=64)
    synth.add_argument("--num-topics", type=int, default=5)
    synth.add_argument("--mean-objects", type=float, default=2.5)
    synth.add_argument(
        "--labels-from",
        help=".npz with a 'labels' matrix or 'class_counts' + 'pair_counts' (real statistics)",
    )
    synth.add_argument(
        "--context-shift",
        type=int,
        nargs="?",
        const=400,
        default=0,
        metavar="N",
        help="also write a 'test_shift' split of N images (default 400) whose labels ignore "
        "co-occurrence",
    )
    synth.add_argument(
        "--compositional",
        action="store_true",
        help="zero-shot benchmark: also write class_embeddings.npz, each (shape, colour) "
        "class's attribute vector through a fixed random projection plus noise",
    )
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)

    _add_import_command(data_sub)

    check = data_sub.add_parser("check", help="validate a dataset directory")
    check.add_argument("dir")
    check.add_argument("--verify-images", choices=["exists", "decode", "none"], default="exists")
    check.set_defaults(func=cmd_data_check)


def _add_import_command(data_sub) -> None:
    imp = data_sub.add_parser(
        "import", help="import COCO, VOC, NUS-WIDE (81 or 1k tags), Open Images or CSV labels"
    )
    imp.add_argument("kind", choices=["coco", "voc", "nuswide", "nuswide1k", "openimages", "csv"])
    imp.add_argument(
        "source",
        nargs="?",
        help="VOC20XX dir, NUS-WIDE root or CSV file (not for coco/openimages)",
    )
    imp.add_argument("--out", required=True, help="dataset directory to write")
    imp.add_argument("--name", help="dataset name stored in the manifest")
    imp.add_argument(
        "--ann", action="append", metavar="ANN.json:SPLIT:IMAGE_DIR", help="coco (repeatable)"
    )
    imp.add_argument("--class-order", choices=["id", "name"], default="id", help="coco")
    imp.add_argument(
        "--split", action="append", metavar="SOURCE:SPLIT", help="voc/nuswide split mapping"
    )
    imp.add_argument("--include-difficult", action="store_true", help="voc")
    imp.add_argument(
        "--labels",
        action="append",
        metavar="LABELS.csv:SPLIT:IMAGE_DIR",
        help="openimages: a human-verified image-level labels CSV (repeatable)",
    )
    imp.add_argument("--class-descriptions", help="openimages: class descriptions CSV")
    imp.add_argument("--trainable-classes", help="openimages: trainable class ids, one a line")
    imp.add_argument(
        "--no-check-images",
        dest="check_images",
        action="store_false",
        help="openimages: import labels without looking for the image files",
    )
    imp.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="nuswide1k: fraction of training images moved to a 'val' split (by id hash)",
    )
    imp.add_argument("--image-dir", help="nuswide/nuswide1k/csv image directory")
    imp.add_argument("--invalid-labels", choices=["error", "negative"], default="error")
    imp.add_argument("--classes", help="csv: class names file, one per line")
    imp.add_argument("--num-classes", type=int, help="csv: number of classes (index labels)")
    imp.add_argument("--label-format", choices=["auto", "names", "indices"], default="auto")
    imp.add_argument("--label-delimiter", help="csv: separator inside the labels column")
    imp.add_argument("--csv-delimiter", default=",", help="csv: column separator")
    imp.add_argument("--default-split", default="train", help="csv without a split column")
    imp.add_argument("--drop-empty", action="store_true", help="leave out images without labels")
    imp.add_argument(
        "--skip-missing", action="store_true", help="skip (and count) missing/corrupt images"
    )
    imp.add_argument("--verify-decode", action="store_true", help="decode-check every image")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    imp.set_defaults(func=cmd_data_import)


def _add_training_commands(sub) -> None:
    train = sub.add_parser("train", help="train one model (the baseline) from a config")
    add_config_args(train, "tiny")
    train.add_argument(
        "--out", help="output directory (default: STORAGE/NAME/train-<config fingerprint>)"
    )
    train.set_defaults(func=with_config(cmd_train))

    part = sub.add_parser("partition", help="CGP/DGP/random label partition of a dataset")
    part.add_argument("--data", required=True, help="dataset directory")
    part.add_argument("--k", type=int, default=5, help="number of subsets")
    part.add_argument("--tau", type=float, default=3.0, help="τ-th root smoothing (paper: 3)")
    part.add_argument(
        "--kind",
        default="cgp",
        help="a registered kind (mlcore/partition/kinds.py): cgp, dgp, random",
    )
    part.add_argument("--seed", type=int, default=0)
    part.add_argument("--split", default="train", help="split the statistics come from")
    part.add_argument("--out", default="partition.json", help="JSON path (heatmap: same stem .png)")
    part.set_defaults(func=cmd_partition)

    local = sub.add_parser(
        "run-local", help="the whole CPSD algorithm in one process, no Ray (the reference run)"
    )
    add_config_args(local, "tiny")
    local.add_argument(
        "--out", help="output directory (default: STORAGE/NAME/local-<config fingerprint>)"
    )
    local.set_defaults(func=with_config(cmd_run_local))

    jobs = [
        (PIPELINE, cmd_pipeline, "the CPSD pipeline on Ray (= python -m workflows.pipeline)"),
        (TUNE, cmd_tune, "a Ray Tune loss sweep (= python -m workflows.tune)"),
        (STUDY, cmd_study, "an ablation grid over seeds on Ray (= python -m workflows.study)"),
    ]
    for job, command, help_text in jobs:
        parser = sub.add_parser(job.name, help=help_text)
        add_job_args(parser, job)
        parser.set_defaults(func=with_config(command))


def _add_labelling_commands(sub) -> None:
    pred = sub.add_parser("predict", help="label images with a trained model")
    _add_model_args(pred)
    pred.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="image files or directories (searched recursively); '-' reads paths from stdin",
    )
    pred.add_argument("--manifest", metavar="DIR", help="label a dataset split instead")
    pred.add_argument("--split", default="test", help="split of --manifest (default: test)")
    pred.add_argument("--out", required=True, help="output file: .jsonl or .csv")
    rule = pred.add_mutually_exclusive_group()
    rule.add_argument(
        "--threshold",
        type=_probability,
        help="one threshold for every class (default: the model's per-class thresholds chosen "
        "on val when training ended)",
    )
    rule.add_argument(
        "--thresholds", metavar="FILE", help="per-class thresholds of this model (cpsd evaluate)"
    )
    rule.add_argument("--top-k", type=_positive_int, help="the k most likely classes per image")
    _add_inference_args(pred)
    pred.set_defaults(func=cmd_predict)

    evaluate = sub.add_parser(
        "evaluate", help="report, per-class table, PR curves, threshold sweep, thresholds"
    )
    _add_model_args(evaluate)
    evaluate.add_argument(
        "--manifest", metavar="DIR", help="dataset (default: the one the model was trained on)"
    )
    evaluate.add_argument("--split", default="val", help="split to evaluate (default: val)")
    evaluate.add_argument("--out", required=True, help="output directory")
    evaluate.add_argument("--threshold", type=_probability, default=0.5, help="global threshold")
    evaluate.add_argument(
        "--thresholds",
        metavar="FILE",
        help="also report CP..OF1 with this model's per-class thresholds chosen on another "
        "split (default: the model's own, when chosen on another split than --split)",
    )
    evaluate.add_argument(
        "--classes",
        choices=["exact", "intersect"],
        default="exact",
        help="exact (default): the dataset must have the model's classes; intersect: "
        "evaluate the classes both have",
    )
    _add_inference_args(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)


def _add_deployment_commands(sub) -> None:
    export = sub.add_parser("export", help="ONNX or TorchScript, with a parity check")
    _add_model_args(export)
    export.add_argument("--format", choices=["onnx", "torchscript"], required=True)
    export.add_argument("--out", required=True, help="output file")
    export.add_argument(
        "--atol", type=float, default=1e-4, help="parity tolerance on the logits (default 1e-4)"
    )
    export.set_defaults(func=cmd_export, device="cpu")

    serve = sub.add_parser(
        "serve", help="an HTTP server answering images with labels (mlflow models serve)"
    )
    _add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=5001, help="port (default 5001)")
    serve.add_argument(
        "--image-root",
        metavar="DIR",
        help="let requests name image files under DIR in a 'path' column (default: only "
        "image bytes are accepted)",
    )
    serve.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpsd",
        description="Multi-label image classification with CPSD, ASL, DB loss and ML-Decoder.",
    )
    parser.set_defaults(label="cpsd", interrupted=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_data_commands(sub)
    _add_training_commands(sub)
    _add_labelling_commands(sub)
    _add_deployment_commands(sub)
    demo = sub.add_parser(
        "demo", help="generate the benchmark data and run the full CPSD pipeline (default job)"
    )
    add_job_args(demo, PIPELINE, default_config="demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def run(argv: Sequence[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
