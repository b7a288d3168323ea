"""The study's tables from given rows (no Ray): intervals and paired differences."""

from workflows.study import markdown_table, summarise_rows


def _row(variant, seed, base, **extra):
    return {"variant": variant, "seed": seed, "test_mAP": base, "baseline_test_mAP": base, **extra}


def test_ensembles_are_summarised_and_paired_even_when_the_first_variant_has_none():
    rows = [
        _row("mode=baseline", 0, 0.50),
        _row("mode=baseline", 1, 0.60),
        _row("mode=cpsd", 0, 0.50, ensemble_target_test_mAP=0.55, ensemble_baseline_test_mAP=0.52),
        _row("mode=cpsd", 1, 0.60, ensemble_target_test_mAP=0.70, ensemble_baseline_test_mAP=0.61),
    ]
    variants = ["mode=baseline", "mode=cpsd"]
    summary, paired = summarise_rows(rows, variants)
    by = {(r["variant"], r["metric"]): r for r in summary + paired}
    assert by[("mode=cpsd", "ensemble_target_test_mAP")]["mean"] == 0.625
    target = by[("mode=cpsd", "ensemble_target_test_mAP - baseline")]
    assert round(target["mean"], 9) == 0.075 and target["n"] == 2
    assert round(by[("mode=cpsd", "ensemble_baseline_test_mAP - baseline")]["mean"], 9) == 0.015
    assert ("mode=baseline", "ensemble_target_test_mAP - baseline") not in by
    table = markdown_table(summary, paired, variants)
    assert "| variant | ensemble_target | Δ ensemble_target | ensemble_baseline |" in table
    assert "| mode=cpsd | 62.50 [" in table
