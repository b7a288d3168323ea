"""Zero-shot results and the query-augmentation ablation (ML-Decoder paper, Table 3's question).

Runs ``cpsd train --config CONFIG`` (default: the bundled ``zsl``) once per (variant, seed), each
in its own output directory (an interrupted sweep resumes: finished runs are read back, not
rerun), then reports, per variant, the mean and the 95% t-interval over seeds of the zero-shot
metrics in each run's ``metrics.json`` (selected on seen-class val mAP, scored on ``test``) and
of its seen-class mAPs, and the paired per-seed difference of each variant from the first one.
Variants:

* ``none``: no query augmentation (``query_noise=0``, ``random_queries=0``);
* ``noise``: query noise only; ``random``: random queries only;
* ``both``: the defaults of ``MLDecoderConfig`` (query noise and random queries).

Writes ``summary.md`` (the tables) and ``zsl_ablation.png`` (ZSL mAP per variant and chance)
into ``--out``. Example (the documented numbers, docs/zsl.md)::

    nice -n 10 python bench/zsl_ablation.py --seeds 0 1 2 --out runs/zsl-ablation
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from scipy import stats

VARIANTS = {
    "none": ["model.ml_decoder.query_noise=0", "model.ml_decoder.random_queries=0"],
    "noise": ["model.ml_decoder.random_queries=0"],
    "random": ["model.ml_decoder.query_noise=0"],
    "both": [],
}
METRICS = (
    "zsl_mAP",
    "zsl_F1@3",
    "zsl_F1@5",
    "gzsl_mAP",
    "gzsl_F1@3",
    "gzsl_F1@5",
    "zsl_mAP_chance",
    "gzsl_mAP_chance",
    "seen_val_mAP",
    "seen_test_mAP",
)
COMPARED = (*METRICS[:6], "seen_test_mAP")


def zero_shot_record(run_dir: Path) -> dict | None:
    """The zero-shot record of a finished run's ``metrics.json`` plus its seen-class numbers
    (``seen_val_mAP``: the selected epoch's val mAP; ``seen_test_mAP``: ``final.json``'s
    ``test_mAP``, the seen classes on the test split); None while the run is not finished."""
    path = run_dir / "metrics.json"
    if not path.is_file() or not (run_dir / "final.json").is_file():
        return None
    records = json.loads(path.read_text())
    if not records or records[-1].get("evaluation") != "zero_shot":
        return None
    final = json.loads((run_dir / "final.json").read_text())
    return {
        **records[-1],
        "seen_val_mAP": final["best_val_mAP"],
        "seen_test_mAP": final["test_mAP"],
    }


def interval(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of the 95% Student-t interval (0 for a single value)."""
    if len(values) < 2:
        return float(values.mean()), 0.0
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="zsl")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", default="runs/zsl-ablation")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = parser.parse_args(argv)
    out = Path(args.out)
    repo = Path(__file__).resolve().parents[1]

    results: dict[str, list[dict]] = {}
    for variant in args.variants:
        for seed in args.seeds:
            run_dir = out / f"{variant}-seed{seed}"
            if zero_shot_record(run_dir) is None:
                sets = [*VARIANTS[variant], f"train.seed={seed}", "mlflow.enabled=false"]
                command = [
                    sys.executable, "-m", "workflows.cli", "train", "--config", args.config,
                    "--out", str(run_dir),
                    *(a for s in [*sets, *args.overrides] for a in ("--set", s)),
                ]  # fmt: skip
                print(f"[{variant} seed {seed}] {' '.join(command[1:])}", flush=True)
                subprocess.run(command, check=True, cwd=repo)
            record = zero_shot_record(run_dir)
            assert record is not None, run_dir
            results.setdefault(variant, []).append(record)

    base = args.variants[0]
    lines = [
        f"config `{args.config}`, seeds {args.seeds}, overrides {args.overrides or 'none'}; "
        "mean ± half-width of the 95% t-interval over seeds",
        "",
        "| variant | " + " | ".join(METRICS) + " |",
        "|---" * (len(METRICS) + 1) + "|",
    ]
    for variant, records in results.items():
        cells = []
        for key in METRICS:
            mean, half = interval(np.array([r[key] for r in records]))
            cells.append(f"{mean:.3f} ± {half:.3f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    if len(results) > 1:
        lines += [
            "",
            f"Paired difference from `{base}` (same seeds), mean ± 95% t half-width:",
            "",
            "| variant | " + " | ".join(COMPARED) + " |",
            "|---" * (len(COMPARED) + 1) + "|",
        ]
        for variant in args.variants[1:]:
            cells = []
            for key in COMPARED:
                diff = np.array(
                    [a[key] - b[key] for a, b in zip(results[variant], results[base], strict=True)]
                )
                mean, half = interval(diff)
                cells.append(f"{mean:+.3f} ± {half:.3f}")
            lines.append(f"| {variant} − {base} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")
    plot(results, out / "zsl_ablation.png")


def plot(results: dict[str, list[dict]], path: Path) -> None:
    """ZSL and GZSL mAP per variant (mean, 95% interval, seeds as dots) and their chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=False)
    for ax, prefix in zip(axes, ("zsl", "gzsl"), strict=True):
        for x, records in enumerate(results.values()):
            values = np.array([r[f"{prefix}_mAP"] for r in records])
            mean, half = interval(values)
            ax.bar(x, mean, yerr=half, capsize=4, color="tab:blue", alpha=0.7)
            ax.plot([x] * len(values), values, "k.", ms=4)
        chance = np.mean([r[f"{prefix}_mAP_chance"] for rs in results.values() for r in rs])
        ax.axhline(chance, color="tab:red", ls="--", label=f"chance {chance:.3f}")
        ax.set_xticks(range(len(results)), list(results))
        ax.set_title(f"{prefix.upper()} mAP (test)")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
