"""Check, in a real browser, that a printed MLflow link lines the runs up by role.

    python tools/check_mlflow_ui.py LINK [--roles teacher ensemble student baseline]
        [--metric best_val_mAP] [--require-model student baseline]
        [--require-dataset student baseline] [--out DIR]

``LINK`` is the deep link a pipeline or ``cpsd train`` prints (a runs page, ideally with a
``viewStateShareKey`` from ``workflows.tracking.share_runs_view``). Headless Chromium (Debian's
``chromium`` package, driven by Playwright; no browser download) opens it and counts the user
actions needed until every expected role's runs show ``--metric`` side by side:

1. open the link;
2. if the table is not grouped by ``cpsd.role``: open "Group by" and pick ``cpsd.role``;
3. if the metric column is not shown: open "Columns" and pick the metric.

It passes when that takes at most ``--max-actions`` (default 3), every role has a group whose
runs all show a number, the metric header is on screen and not covered, and the runs of the
``--require-*`` roles show a logged model / a dataset. Screenshots of every step go to ``--out``.
Exit status 0 on success, 1 on a failed check (each failure printed).

Needs ``pip install playwright`` and ``apt-get install chromium``; not part of CI.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

GROUP_ROW = re.compile(r"Group:\s*(.+?)\s*\n\s*\d+\s*$", re.S)
ROLE_TAG = "cpsd.role"


@dataclass
class Row:
    name: str
    group: str | None
    cells: dict[str, str] = field(default_factory=dict)


def read_table(page: Page) -> list[Row]:
    """Run rows (not group rows) with their group and their cells, keyed by column id."""
    names = {}
    for row in page.locator('.ag-pinned-left-cols-container [role="row"]').all():
        cell = row.locator('[col-id="attributes.`Run Name`"]')
        if cell.count():
            names[row.get_attribute("row-index")] = cell.inner_text().strip()
    cells = {}
    for row in page.locator('.ag-center-cols-container [role="row"]').all():
        cells[row.get_attribute("row-index")] = {
            c.get_attribute("col-id"): c.inner_text().strip()
            for c in row.locator('[role="gridcell"]').all()
        }
    rows, group = [], None
    for index in sorted(names, key=int):
        match = GROUP_ROW.search(names[index])
        if match or names[index].startswith("Additional runs"):
            group = match.group(1) if match else None
            continue
        rows.append(Row(names[index], group, cells.get(index, {})))
    return rows


def header(page: Page, metric: str):
    return page.locator(f'.ag-header-cell[col-id="metrics.`{metric}`"]')


def on_screen(page: Page, locator) -> bool:
    """Visible, inside the viewport, and the topmost element at its centre."""
    if not locator.count() or not locator.first.is_visible():
        return False
    box = locator.first.bounding_box()
    width = page.viewport_size["width"]
    if box is None or box["x"] < 0 or box["x"] + box["width"] > width:
        return False
    return locator.first.evaluate(
        "(el, p) => el.contains(document.elementFromPoint(p.x, p.y))",
        {"x": box["x"] + box["width"] / 2, "y": box["y"] + box["height"] / 2},
    )


def grouped_by_role(page: Page) -> bool:
    return page.get_by_role("button", name=re.compile(rf"Group by: {re.escape(ROLE_TAG)}")).count()


def check(args: argparse.Namespace) -> list[str]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failures: list[str] = []
    actions = 0
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=args.chromium, headless=True, args=["--no-sandbox"]
        )
        page = browser.new_page(viewport={"width": args.width, "height": args.height})

        def step(name: str) -> None:
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / f"{actions:02d}-{name}.png"))
            print(f"action {actions}: {name}")

        page.goto(args.link)
        actions += 1
        page.get_by_text(re.compile(r"\d+ matching runs?")).wait_for(timeout=60_000)
        step("open-link")
        if not grouped_by_role(page):
            page.get_by_role("button", name=re.compile("^Group by")).click()
            actions += 1
            page.get_by_text(ROLE_TAG, exact=True).first.click()
            actions += 1
            page.keyboard.press("Escape")
            step("group-by-role")
        if not header(page, args.metric).count():
            page.get_by_role("button", name=re.compile("^Columns")).click()
            actions += 1
            page.get_by_text(args.metric, exact=True).first.click()
            actions += 1
            page.keyboard.press("Escape")
            step("show-metric")
        page.screenshot(path=str(out / "final.png"), full_page=True)

        if actions > args.max_actions:
            failures.append(f"took {actions} actions (at most {args.max_actions} allowed)")
        if not on_screen(page, header(page, args.metric)):
            failures.append(f"the {args.metric} column is not on screen")
        rows = read_table(page)
        column = f"metrics.`{args.metric}`"
        print(f"\n{'role':<10} {'run':<28} {args.metric}")
        for row in rows:
            print(f"{row.group or '-':<10} {row.name:<28} {row.cells.get(column, '?')}")
        for role in args.roles:
            runs = [r for r in rows if r.group == role]
            if not runs:
                failures.append(f"no group for role {role!r}")
            for run in runs:
                if not re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", run.cells.get(column, "")):
                    failures.append(f"{role} run {run.name!r} shows no {args.metric}")
        for role, col, what in [
            *[(r, "attributes.`Models`", "logged model") for r in args.require_model],
            *[(r, "attributes.`Dataset`", "dataset") for r in args.require_dataset],
        ]:
            for run in (r for r in rows if r.group == role):
                if run.cells.get(col, "-") in ("", "-"):
                    failures.append(f"{role} run {run.name!r} shows no {what}")
        browser.close()
    print(f"\n{actions} action(s); screenshots in {out}")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("link", help="the printed MLflow runs-page link")
    parser.add_argument(
        "--roles", nargs="+", default=["teacher", "ensemble", "student", "baseline"]
    )
    parser.add_argument("--metric", default="best_val_mAP")
    parser.add_argument("--require-model", nargs="*", default=[], metavar="ROLE")
    parser.add_argument("--require-dataset", nargs="*", default=[], metavar="ROLE")
    parser.add_argument("--max-actions", type=int, default=3)
    parser.add_argument("--out", default="mlflow-ui-check", help="screenshot directory")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    failures = check(parser.parse_args(argv))
    for failure in failures:
        print(f"FAIL: {failure}")
    print("OK" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
