"""The PLA paper's label-order comparison (Tables 1–2) on generated data: docs/pla.md.

Run from the repository root (``PYTHONPATH=.`` unless the package is installed)::

    PYTHONPATH=. nice -n 10 python bench/pla_study.py --out runs/pla_study

For every seed: stage 1 trains the BCE encoder (the ``pla`` config with a GAP head and BCE);
stage 2 starts from that same checkpoint and trains, with the ``pla`` config's schedule, the
orderless RNN once per label order (frequent, rare, dictionary, random, MLA, PLA Eq. 5, PLA as
in the authors' code), once with frequent-first *teacher forcing* (a control), and the BCE
model once more with a fresh classifier (so that the RNNs' extra encoder epochs are not their
only edge over BCE). Every model is selected on ``val`` (BCE by mAP, the RNNs by the O-F1 of
their predicted label sets) and then scored once on ``--split`` (default ``test``, held out).
BCE is scored at threshold 0.5; the RNNs on their greedy-decoded label sets (cut at the first
``<end>``).

The table gives means over seeds with 95% t-intervals, and paired (by seed) differences of
the claims being checked. Finished runs are skipped when the script is rerun, so an interrupted
study continues where it stopped. Outputs in ``--out``: ``results.json`` (every run's numbers),
``table.md`` and ``pla_study.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch.utils.data import DataLoader

from mlcore import configlib
from mlcore.data.dataset import MultiLabelDataset, build_transform
from mlcore.data.loading import open_dataset, resolve_dataset
from mlcore.data.manifest import Manifest
from mlcore.experiment import train_classifier
from mlcore.models import build_model_from_config, family_of
from mlcore.train import load_checkpoint, resolve_device
from workflows.config import Config, config_path, load_config

BCE = "BCE"
BCE_SETTINGS = [
    "model.head=gap",
    "loss.name=bce",
    "train.select_metric=mAP",
    "train.swa.enabled=false",
]
# Stage-2 runs: overrides of the stage-2 config; {checkpoint} is the seed's stage-1 best.pt.
RNN_INIT = "model.encoder_checkpoint={checkpoint}"
METHODS = {
    "BCE, fine-tuned": [*BCE_SETTINGS, "model.pretrained_file={checkpoint}"],
    "frequent": ["loss.orderless.order=frequent", RNN_INIT],
    "rare": ["loss.orderless.order=rare", RNN_INIT],
    "dictionary": ["loss.orderless.order=dictionary", RNN_INIT],
    "random": ["loss.orderless.order=random", RNN_INIT],
    "MLA": ["loss.orderless.order=mla", RNN_INIT],
    "PLA": ["loss.orderless.order=pla", RNN_INIT],
    "PLA (code)": ["loss.orderless.order=pla", "loss.orderless.pla_variant=code", RNN_INIT],
    "frequent, teacher-forced": [
        "loss.orderless.order=frequent",
        "loss.orderless.teacher_forcing=true",
        RNN_INIT,
    ],
}
SET_METRICS = ("CP", "CR", "CF1", "OP", "OR", "OF1")
SEQUENCE_METRICS = ("duplicate_ratio", "order_rigidness", "pred_length", "true_length")
# Paired differences (by seed) that test the paper's claims, as (a, b): a − b.
CLAIMS = [
    ("PLA", "MLA"),
    ("MLA", "frequent"),
    ("PLA", "frequent"),
    ("PLA", "frequent, teacher-forced"),
    ("PLA", "PLA (code)"),
    ("PLA", "BCE, fine-tuned"),
]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def _loader(cfg: Config, split: str) -> DataLoader:
    manifest = Manifest.load(resolve_dataset(cfg.data))
    dataset = MultiLabelDataset(manifest, split, build_transform(cfg.data, train=False))
    return DataLoader(dataset, batch_size=cfg.train.eval_batch_size or 2 * cfg.train.batch_size)


def evaluate(cfg: Config, checkpoint: Path, split: str) -> dict[str, float]:
    """Scores of the selected weights on ``split``: label sets for the RNN, 0.5 for BCE."""
    loader = _loader(cfg, split)
    model = build_model_from_config(cfg.model, loader.dataset.num_classes)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    device = resolve_device(cfg.train.device)
    model.to(device)
    return family_of(cfg.model.head).evaluate(model, loader, device, False).metrics


def run_one(cfg: Config, out: Path, split: str, log) -> dict:
    """Train (unless done), then score ``out/best.pt`` on ``split``; kept in ``result.json``."""
    done = out / "result.json"
    record = json.loads(done.read_text()) if done.is_file() else None
    if record is None:
        started = time.perf_counter()
        result = train_classifier(cfg, open_dataset(cfg.data), out, log=log)
        record = {
            "best_epoch": result.best_epoch,
            "best_metrics": result.best_metrics,  # of the epoch kept, on val
            "train_time_s": time.perf_counter() - started,
        }
    if split not in record:
        record[split] = evaluate(cfg, out / "best.pt", split)
        done.write_text(json.dumps(record, indent=1))
    return record


def _prefixed(seed: int, name: str):
    return lambda line: print(f"  seed {seed} {name}: {line}", flush=True)


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (NaN values dropped)."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan
    half = stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


def _cell(values: list[float]) -> str:
    mean, half = interval(values)
    if math.isnan(mean):
        return "–"
    return f"{100 * mean:.2f}" + ("" if math.isnan(half) else f" ± {100 * half:.2f}")


def make_table(results: dict, split: str, seeds: list[int]) -> str:
    names = [n for n in [BCE, *METHODS] if n in results]

    def values(name: str, metric: str) -> list[float]:
        return [results[name][str(s)][split].get(metric, math.nan) for s in seeds]

    lines = [
        f"Means over seeds {seeds} on `{split}`, ± the half-width of the 95% t-interval; all "
        "numbers in %.",
        "",
        "| method | duplicates | order rigidness | pred. length | true length |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        if name.startswith(BCE):
            continue
        cells = [_cell(values(name, m)) for m in ("duplicate_ratio", "order_rigidness")]
        lengths = [interval(values(name, m))[0] for m in ("pred_length", "true_length")]
        lines.append(f"| {name} | {' | '.join(cells)} | {lengths[0]:.2f} | {lengths[1]:.2f} |")
    lines += [
        "",
        "| method | C-P | C-R | C-F1 | O-P | O-R | O-F1 | mAP (scores) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        cells = [_cell(values(name, m)) for m in (*SET_METRICS, "mAP")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += [
        "",
        "Paired differences (same seed, same stage-1 encoder), percentage points:",
        "",
        "| difference | C-F1 | O-F1 | duplicates |",
        "|---|---|---|---|",
    ]
    for a, b in CLAIMS:
        if a not in results or b not in results:
            continue
        cells = []
        for metric in ("CF1", "OF1", "duplicate_ratio"):
            diff = [x - y for x, y in zip(values(a, metric), values(b, metric), strict=True)]
            cells.append(_cell(diff))
        lines.append(f"| {a} − {b} | {' | '.join(cells)} |")
    return "\n".join(lines)


def plot(results: dict, split: str, seeds: list[int], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [n for n in [BCE, *METHODS] if n in results]
    panels = [
        ("duplicate_ratio", "images with a repeated label (%)"),
        ("order_rigidness", "order rigidness (%)"),
        ("CF1", "C-F1 (%)"),
        ("OF1", "O-F1 (%)"),
    ]
    fig = Figure(figsize=(13, 3.6))
    FigureCanvasAgg(fig)
    for i, (metric, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        shown = [n for n in names if metric in SET_METRICS or not n.startswith(BCE)]
        means, halves = [], []
        for name in shown:
            mean, half = interval(
                [results[name][str(s)][split].get(metric, math.nan) for s in seeds]
            )
            means.append(100 * mean)
            halves.append(0.0 if math.isnan(half) else 100 * half)
        # grey: BCE runs; orange: the alignments (MLA, PLA); blue: fixed orders and the control
        colours = [
            "#636363" if n.startswith(BCE) else "#e6550d" if n == "MLA" or "PLA" in n else "#3182bd"
            for n in shown
        ]
        ax.bar(range(len(shown)), means, yerr=halves, capsize=3, color=colours)
        ax.set_xticks(range(len(shown)), shown, rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        if metric in ("CF1", "OF1"):
            finite = [m for m in means if not math.isnan(m)]
            ax.set_ylim(max(0.0, min(finite) - 10), min(100.0, max(finite) + 5))
    fig.suptitle(f"Label orders of the orderless CNN-RNN ({split}, {len(seeds)} seeds, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="pla", help="stage-2 config (bundled name or file)")
    parser.add_argument("--out", required=True, help="study directory (reruns skip finished runs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", default="test", help="split scored after selection on val")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--stage1-epochs", type=int, default=15)
    parser.add_argument("--stage1-lr", type=float, default=3e-3)
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="override for both stages"
    )
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    results: dict[str, dict[str, dict]] = {}
    total = len(args.seeds) * (1 + len(args.methods))
    count, started = 0, time.perf_counter()

    def progress(name: str, seed: int, record: dict) -> None:
        nonlocal count
        count += 1
        scored = record[args.split]
        print(
            f"[{count}/{total} {time.perf_counter() - started:.0f}s] seed {seed} {name}: "
            f"{args.split} O-F1 {100 * scored['OF1']:.2f} C-F1 {100 * scored['CF1']:.2f}"
            + (
                f" duplicates {100 * scored['duplicate_ratio']:.1f}%"
                if "duplicate_ratio" in scored
                else ""
            ),
            flush=True,
        )

    for seed in args.seeds:
        base = load_config(
            config_path(args.config),
            [
                *args.overrides,
                f"train.seed={seed}",
                f"storage_path={out}",
                "mlflow.enabled=false",
            ],
        )
        stage1 = configlib.replace(
            base,
            [
                *BCE_SETTINGS,
                "train.ema=true",
                f"train.epochs={args.stage1_epochs}",
                f"train.lr={args.stage1_lr}",
            ],
        )
        stage1_dir = out / f"seed{seed}" / "bce"
        bce = run_one(stage1, stage1_dir, args.split, _prefixed(seed, BCE))
        results.setdefault(BCE, {})[str(seed)] = bce
        progress(BCE, seed, bce)
        checkpoint = stage1_dir / "best.pt"
        for name in args.methods:
            cfg = configlib.replace(base, [o.format(checkpoint=checkpoint) for o in METHODS[name]])
            record = run_one(
                cfg, out / f"seed{seed}" / _slug(name), args.split, _prefixed(seed, name)
            )
            results.setdefault(name, {})[str(seed)] = record
            progress(name, seed, record)

    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = make_table(results, args.split, args.seeds)
    (out / "table.md").write_text(table + "\n")
    plot(results, args.split, args.seeds, out / "pla_study.png")
    print("\n" + table)
    print(f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {out / 'pla_study.png'}")


if __name__ == "__main__":
    main()
