"""The three answers of docs/study.md, from the per-seed rows of ``study_cpsd_pretrained``.

    python bench/cpsd_answers.py runs/study_cpsd_pretrained/study/study.csv

Reads ``study.csv`` (one row per variant × seed, written by ``cpsd study``) and prints markdown:

(a) the student's target (``ensemble-target``: the α-mix of the merged CGP and DGP teachers)
    against the plain baseline and against a plain ensemble of as many models
    (``ensemble-baseline``: the baseline and 2k − 1 more seeds);
(b) the share of the target's gain over the baseline that each student keeps, for every
    ``cls_weight`` and for twice the student epochs against a baseline trained as long;
(c) the pretrained regime against training from scratch, on the same data and seeds.

Every Δ is paired by seed, with a 95% t-interval (``mlcore.stats``). Settings are chosen on
``val`` (the ``cls_weight`` row marked "chosen on val"); ``test`` is only reported.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from mlcore.stats import Interval, mean_interval, paired_interval

PRETRAINED_BASELINE = "mode=baseline"
SCRATCH_BASELINE = "mode=baseline,student_init=scratch,enabled=False,control_ensemble=0"
SCRATCH_CPSD = (
    "mode=cpsd,cls_weight=0.5,student_lr_scale=1.0,student_init=scratch,enabled=False,"
    "control_ensemble=0"
)
OURS_PRETRAINED_CPSD = "mode=cpsd,cls_weight=0.5,student_lr_scale=1.0"
LONG_BASELINE = "mode=baseline,epochs=24,control_ensemble=0"
LONG_STUDENT = "mode=cpsd,cls_weight=5,student_epochs=24"
CLS_WEIGHTS = ("0.5", "1", "2", "5", "10", "50")


def load(path: Path) -> dict[str, dict[int, dict[str, float | None]]]:
    """variant -> seed -> row, numbers parsed (empty cells None)."""
    out: dict[str, dict[int, dict[str, float | None]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value) if value != "" else None
                except ValueError:
                    parsed[key] = None
            out.setdefault(row["variant"], {})[int(row["seed"])] = parsed
    return out


def _pairs(a: dict[int, dict], a_key: str, b: dict[int, dict], b_key: str):
    seeds = sorted(s for s in a if s in b and a[s].get(a_key) is not None)
    seeds = [s for s in seeds if b[s].get(b_key) is not None]
    return [a[s][a_key] for s in seeds], [b[s][b_key] for s in seeds]


def delta(a, a_key, b, b_key) -> Interval:
    x, y = _pairs(a, a_key, b, b_key)
    return paired_interval(x, y)


def mean(rows: dict[int, dict], key: str) -> Interval:
    return mean_interval([r[key] for r in rows.values() if r.get(key) is not None])


def share(student_delta: Interval, target_delta: Interval) -> str:
    """Mean Δ student / mean Δ target (both against the same baseline, paired by seed): the
    fraction of the target's gain the student keeps. A ratio of means, not a mean of per-seed
    ratios (those explode on seeds where the target barely beats the baseline); its
    uncertainty is that of the two Δ columns beside it. Undefined unless the target gains."""
    if target_delta.mean <= 0:
        return "— (no gain to keep)"
    return f"{100 * student_delta.mean / target_delta.mean:.0f} %"


def fmt(interval: Interval, scale: float = 100.0, signed: bool = True) -> str:
    if interval.n == 0 or math.isnan(interval.mean):
        return "—"
    text = interval.format(scale)
    return "+" + text if signed and interval.mean >= 0 else text


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def answer_a(v) -> str:
    header = ["model", "val mAP", "test mAP", "Δ test vs baseline", "Δ test vs control ensemble"]
    rows = []
    for regime, variant in (("pretrained", "mode=cpsd,cls_weight=0.5"), ("scratch", SCRATCH_CPSD)):
        run = v.get(variant)
        if run is None:
            continue
        for label, key in (
            ("baseline (1 plain model)", "baseline_test_mAP"),
            ("ensemble-baseline (6 plain models: the control)", "ensemble_baseline_test_mAP"),
            ("ensemble-cgp (3 CGP teachers, merged)", "ensemble_cgp_test_mAP"),
            ("ensemble-dgp (3 DGP teachers, merged)", "ensemble_dgp_test_mAP"),
            ("ensemble-target (what the student regresses to)", "ensemble_target_test_mAP"),
        ):
            if not any(r.get(key) is not None for r in run.values()):
                continue
            vs_base = key != "baseline_test_mAP"
            vs_control = vs_base and key != "ensemble_baseline_test_mAP"
            rows.append(
                [
                    f"{regime}: {label}",
                    fmt(mean(run, key.replace("test_mAP", "val_mAP")), signed=False),
                    fmt(mean(run, key), signed=False),
                    fmt(delta(run, key, run, "baseline_test_mAP")) if vs_base else "—",
                    fmt(delta(run, key, run, "ensemble_baseline_test_mAP")) if vs_control else "—",
                ]
            )
    return table(header, rows)


def _student_row(label: str, student, base, base_prefix: str) -> list[str]:
    """Δ of a student and of its target against a baseline (``base_prefix`` "baseline_" for
    the run's own baseline columns, "" for another variant's final model)."""
    test = delta(student, "test_mAP", base, f"{base_prefix}test_mAP")
    target = delta(student, "ensemble_target_test_mAP", base, f"{base_prefix}test_mAP")
    return [
        label,
        fmt(delta(student, "val_mAP", base, f"{base_prefix}val_mAP")),
        fmt(test),
        fmt(target),
        share(test, target),
    ]


def answer_b(v) -> str:
    weights = [w for w in CLS_WEIGHTS if f"mode=cpsd,cls_weight={w}" in v]
    chosen = max(weights, key=lambda w: mean(v[f"mode=cpsd,cls_weight={w}"], "val_mAP").mean)
    rows = []
    for weight in weights:
        student = v[f"mode=cpsd,cls_weight={weight}"]
        label = f"cls_weight {weight}, 12 epochs" + (" (chosen on val)" * (weight == chosen))
        rows.append(_student_row(label, student, student, "baseline_"))
    if LONG_STUDENT in v and LONG_BASELINE in v:
        label = "cls_weight 5, 24 epochs, against a 24-epoch baseline"
        rows.append(_student_row(label, v[LONG_STUDENT], v[LONG_BASELINE], ""))
    if OURS_PRETRAINED_CPSD in v:
        label = "cls_weight 0.5, our student lr (× 1, not the authors' × 0.1)"
        student = v[OURS_PRETRAINED_CPSD]
        rows.append(_student_row(label, student, student, "baseline_"))
    if SCRATCH_CPSD in v:
        label = "from scratch: cls_weight 0.5, our student lr, 12 epochs"
        rows.append(_student_row(label, v[SCRATCH_CPSD], v[SCRATCH_CPSD], "baseline_"))
    header = [
        "CPSD student (pretrained unless said)",
        "Δ val vs baseline",
        "Δ test vs baseline",
        "target's Δ test",
        "share of the target's gain kept (test)",
    ]
    return table(header, rows)


def answer_modes(v) -> str:
    rows = []
    for mode in ("sd", "cgpd", "dgpd", "cpsd"):
        for weight in ("0.5", "5", "50"):
            rows_w = v.get(f"mode={mode},cls_weight={weight}")
            if rows_w is None:
                continue
            rows.append(
                [
                    f"{mode}, cls_weight {weight}",
                    fmt(mean(rows_w, "test_mAP"), signed=False),
                    fmt(delta(rows_w, "val_mAP", rows_w, "baseline_val_mAP")),
                    fmt(delta(rows_w, "test_mAP", rows_w, "baseline_test_mAP")),
                    fmt(delta(rows_w, "shift_mAP", rows_w, "baseline_shift_mAP")),
                ]
            )
    return table(
        ["student", "test mAP", "Δ val vs baseline", "Δ test vs baseline", "Δ shift vs baseline"],
        rows,
    )


def answer_c(v) -> str:
    pre_b, scr_b = v[PRETRAINED_BASELINE], v[SCRATCH_BASELINE]
    rows = [
        [
            "baseline: pretrained − from scratch",
            fmt(delta(pre_b, "val_mAP", scr_b, "val_mAP")),
            fmt(delta(pre_b, "test_mAP", scr_b, "test_mAP")),
            fmt(delta(pre_b, "shift_mAP", scr_b, "shift_mAP")),
        ]
    ]
    if SCRATCH_CPSD in v:
        scr = v[SCRATCH_CPSD]
        rows.append(
            [
                "from scratch: CPSD student − baseline",
                fmt(delta(scr, "val_mAP", scr, "baseline_val_mAP")),
                fmt(delta(scr, "test_mAP", scr, "baseline_test_mAP")),
                fmt(delta(scr, "shift_mAP", scr, "baseline_shift_mAP")),
            ]
        )
        rows.append(
            [
                "from scratch: target − baseline",
                fmt(delta(scr, "ensemble_target_val_mAP", scr, "baseline_val_mAP")),
                fmt(delta(scr, "ensemble_target_test_mAP", scr, "baseline_test_mAP")),
                fmt(delta(scr, "ensemble_target_shift_mAP", scr, "baseline_shift_mAP")),
            ]
        )
    for label, variant in (
        ("pretrained: CPSD student (our lr) − baseline", OURS_PRETRAINED_CPSD),
        ("pretrained: CPSD student (authors' lr × 0.1) − baseline", "mode=cpsd,cls_weight=0.5"),
    ):
        if variant in v:
            rows_w = v[variant]
            rows.append(
                [
                    label,
                    fmt(delta(rows_w, "val_mAP", rows_w, "baseline_val_mAP")),
                    fmt(delta(rows_w, "test_mAP", rows_w, "baseline_test_mAP")),
                    fmt(delta(rows_w, "shift_mAP", rows_w, "baseline_shift_mAP")),
                ]
            )
    cpsd = v["mode=cpsd,cls_weight=0.5"]
    rows.append(
        [
            "pretrained: target − baseline",
            fmt(delta(cpsd, "ensemble_target_val_mAP", cpsd, "baseline_val_mAP")),
            fmt(delta(cpsd, "ensemble_target_test_mAP", cpsd, "baseline_test_mAP")),
            fmt(delta(cpsd, "ensemble_target_shift_mAP", cpsd, "baseline_shift_mAP")),
        ]
    )
    return table(
        ["comparison (same data, paired by seed)", "Δ val mAP", "Δ test mAP", "Δ shift mAP"], rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_csv", type=Path, help="study.csv of study_cpsd_pretrained")
    args = parser.parse_args(argv)
    v = load(args.study_csv)
    seeds = sorted({s for rows in v.values() for s in rows})
    print(f"{len(v)} variants, seeds {seeds}; mAP points, mean [95% interval], Δ paired by seed\n")
    for title, fn in (
        ("(a) The target, the baseline and a plain ensemble of the same size", answer_a),
        ("(b) What the student keeps of the target's gain", answer_b),
        ("(b) Every mode and weight", answer_modes),
        ("(c) Pretrained against from scratch", answer_c),
    ):
        print(f"### {title}\n\n{fn(v)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
