"""Check, in a real browser, that a printed MLflow link lines the runs up by role.

    python tools/check_mlflow_ui.py LINK [--roles teacher ensemble student baseline]
        [--metrics best_val_mAP test_mAP] [--require-model student baseline]
        [--require-dataset student baseline] [--viewport 1920x1080 1600x1000] [--out DIR]

``LINK`` is the deep link a pipeline or ``cpsd train`` prints (a runs page, ideally with a
``viewStateShareKey`` from ``workflows.tracking.share_runs_view``). Headless Chromium (Debian's
``chromium`` package, driven by Playwright; no browser download) opens it in a fresh profile, at
each ``--viewport``, and does what a first-time reader would, counting every click and every
scroll as an action:

1. open the link;
2. close the MLflow Assistant panel if it opened beside the runs table (MLflow 3.17 opens it on
   a profile's first visit, and it takes a third of the width);
3. if the table is not grouped by ``cpsd.role``: open "Group by" and pick ``cpsd.role``;
4. for each column to read (the ``--metrics``, then Models and Dataset where required): if it
   is not in the table, open "Columns", type its name in the search box and pick it (three
   actions); while it is not on screen, scroll the table by one screen towards it; while a
   run's row is above or below the table's visible rows, scroll to it.

Only what is on screen counts: a cell that exists but is scrolled away or covered is not read.
A viewport passes when that takes at most ``--max-actions`` (default 3), every role has a group
whose runs all show a number in every metric column, and the runs of the ``--require-*`` roles
show a logged model / a dataset. Screenshots of every step go to ``--out/<viewport>/``.
Exit status 0 when every viewport passes, 1 otherwise (each failure printed).

Needs ``pip install playwright`` and ``apt-get install chromium``; not part of CI
(tests/test_check_mlflow_ui.py runs it where both are installed).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from playwright.sync_api import Locator, Page, sync_playwright

GROUP_ROW = re.compile(r"Group:\s*(.+?)\s*\n\s*(\d+)\s*$", re.S)
ROLE_TAG = "cpsd.role"
NUMBER = re.compile(r"-?\d+(\.\d+)?(e-?\d+)?")
ASSISTANT_TITLE = "MLflow Assistant"
MAX_SCROLLS = 10  # per search; a table this many screens wide or tall fails anyway


@dataclass
class Reader:
    """A person at one viewport: every click and scroll is an action, with a screenshot."""

    page: Page
    out: Path
    actions: int = 0
    log: list[str] = field(default_factory=list)
    group_sizes: dict[str, int] = field(default_factory=dict)  # runs per group, as stated

    def act(self, what: str) -> None:
        self.actions += 1
        self.page.wait_for_timeout(1000)
        self.page.screenshot(path=str(self.out / f"{self.actions:02d}-{what}.png"))
        self.log.append(f"action {self.actions}: {what}")


@dataclass(frozen=True)
class Column:
    """A column to read: its id in the grid and its name in the Columns menu."""

    col_id: str
    label: str


def on_screen(page: Page, locator: Locator) -> bool:
    """Rendered, inside the viewport, and topmost at its centre and near both ends.

    The three points catch a cell scrolled under the pinned Run Name column, clipped by the
    table's edge or covered by a side panel, which ``is_visible`` reports as visible.
    """
    if not locator.count() or not locator.first.is_visible():
        return False
    box = locator.first.bounding_box()
    size = page.viewport_size
    if box is None or box["x"] < 0 or box["y"] < 0:
        return False
    if box["x"] + box["width"] > size["width"] or box["y"] + box["height"] > size["height"]:
        return False
    y = box["y"] + box["height"] / 2
    inset = min(4.0, box["width"] / 4)
    points = [{"x": x, "y": y} for x in (box["x"] + inset, box["x"] + box["width"] - inset)]
    points.append({"x": box["x"] + box["width"] / 2, "y": y})
    return locator.first.evaluate(
        "(el, ps) => ps.every(p => el.contains(document.elementFromPoint(p.x, p.y)))", points
    )


def header(page: Page, column: Column) -> Locator:
    return page.locator(f'.ag-header-cell[col-id="{column.col_id}"]')


def run_rows(page: Page, sizes: dict[str, int]) -> list[tuple[str, str | None, Locator]]:
    """``(row index, group, Run Name cell)`` of every rendered run row (not group rows).

    ``sizes`` gets the run count each rendered group row states.
    """
    rows, group = [], None
    pinned = page.locator('.ag-pinned-left-cols-container [role="row"]').all()
    for row in sorted(pinned, key=lambda r: int(r.get_attribute("row-index"))):
        cell = row.locator('[col-id="attributes.`Run Name`"]')
        if not cell.count():
            continue
        text = cell.inner_text().strip()
        match = GROUP_ROW.search(text)
        if match or text.startswith("Additional runs"):
            group = match.group(1) if match else None
            if match:
                sizes[group] = int(match.group(2))
            continue
        rows.append((row.get_attribute("row-index"), group, cell))
    return rows


def cell(page: Page, index: str, column: Column) -> Locator:
    return page.locator(
        f'.ag-center-cols-container [role="row"][row-index="{index}"] [col-id="{column.col_id}"]'
    )


SCROLL_STATE = """() => {
    const h = document.querySelector('.ag-center-cols-viewport');
    const rows = document.querySelector('.ag-center-cols-container');
    return {left: h.scrollLeft, maxLeft: h.scrollWidth - h.clientWidth,
            top: rows.getBoundingClientRect().top};
}"""


def visible_rows(page: Page) -> tuple[float, float]:
    """The top and bottom of the table's visible rows, in viewport pixels.

    The rows scroll under the table's header (in the grid or with the page), so they start
    below it and end at the grid's or the screen's bottom, whichever comes first.
    """
    header_box = page.locator(".ag-header").first.bounding_box()
    body = page.locator(".ag-body-viewport").first.bounding_box()
    top = max(header_box["y"] + header_box["height"], 0)
    return top, min(body["y"] + body["height"], page.viewport_size["height"])


def scroll_table(reader: Reader, dx: float, dy: float, what: str) -> bool:
    """One scroll of the runs table (mouse wheel over it); False when it did not move."""
    page = reader.page
    box = page.locator(".ag-center-cols-viewport").first.bounding_box()
    top, bottom = visible_rows(page)
    before = page.evaluate(SCROLL_STATE)
    page.mouse.move(box["x"] + box["width"] / 2, (top + bottom) / 2)
    page.mouse.wheel(dx, dy)
    reader.act(what)
    return page.evaluate(SCROLL_STATE) != before


def close_assistant(reader: Reader) -> None:
    """Close the MLflow Assistant panel if it is open (one click)."""
    title = reader.page.get_by_text(ASSISTANT_TITLE)  # not exact: the title holds an icon
    if not title.count() or not title.first.is_visible():
        return
    panel = title.first.locator("xpath=ancestor::div[.//button[@aria-label='Close']][1]")
    panel.get_by_role("button", name="Close").first.click()
    reader.act("close-assistant")


def group_by_role(reader: Reader) -> None:
    page = reader.page
    if page.get_by_role("button", name=re.compile(rf"Group by: {re.escape(ROLE_TAG)}")).count():
        return
    page.get_by_role("button", name=re.compile("^Group by")).click()
    reader.act("open-group-by")
    page.get_by_text(ROLE_TAG, exact=True).first.click()
    page.keyboard.press("Escape")
    reader.act("group-by-role")


def reveal(reader: Reader, column: Column) -> bool:
    """Bring ``column``'s header on screen: add it, then scroll by one screen at a time."""
    page = reader.page
    if not header(page, column).count() and not scroll_until(reader, column):
        page.get_by_role("button", name=re.compile("^Columns")).click()
        reader.act("open-columns")
        # The menu renders only the entries near its top (209 with a pipeline's params): search.
        page.get_by_placeholder("Search columns").fill(column.label)
        reader.act(f"search-{column.label}")
        # The entry whose whole text is the name (the search bolds it inside longer names too).
        entry = re.compile(rf"^\s*{re.escape(column.label)}\s*$")
        page.locator('[role="dialog"] span').filter(has_text=entry).first.click()
        page.keyboard.press("Escape")
        reader.act(f"show-{column.label}")
    return on_screen(page, header(page, column)) or scroll_until(reader, column)


def scroll_until(reader: Reader, column: Column) -> bool:
    """Scroll sideways towards ``column`` until its header is on screen (False: never)."""
    page = reader.page
    table = page.locator(".ag-center-cols-viewport").first.bounding_box()
    for _ in range(MAX_SCROLLS):
        found = header(page, column)
        if on_screen(page, found):
            return True
        box = found.first.bounding_box() if found.count() else None
        if box is None:  # the grid renders only columns near the screen: look right first
            state = page.evaluate(SCROLL_STATE)
            if state["maxLeft"] <= 0:
                return False  # nothing to scroll to: the column is not in the table
            direction = 1 if state["left"] < state["maxLeft"] else -1
        else:
            direction = 1 if box["x"] + box["width"] > table["x"] + table["width"] else -1
        step = 0.8 * table["width"] * direction
        if not scroll_table(reader, step, 0, f"scroll-to-{column.label}"):
            return on_screen(page, header(page, column))
    return False


Table = dict[tuple[str | None, str], dict[str, str]]  # (group, run) -> column -> text


def read_rows(reader: Reader, columns: list[Column], roles: list[str], table: Table) -> None:
    """Add to ``table`` every on-screen cell of ``columns`` (each run gets a row, even empty).

    Runs of ``roles`` still missing a value above or below the table's visible rows are
    scrolled to, one screen at a time.
    """
    page = reader.page
    for _ in range(MAX_SCROLLS):
        top, fold = visible_rows(page)
        direction = 0
        for index, group, name in run_rows(page, reader.group_sizes):
            cells = table.setdefault((group, name.inner_text().strip()), {})
            if on_screen(page, name):
                for column in columns:
                    target = cell(page, index, column)
                    if on_screen(page, target):
                        cells[column.label] = target.inner_text().strip()
            box = name.bounding_box()
            if group not in roles or box is None or all(c.label in cells for c in columns):
                continue
            if box["y"] + box["height"] > fold:
                direction = 1
            elif box["y"] < top and direction == 0:
                direction = -1
        if direction == 0:
            return
        what = "scroll-" + ("down" if direction > 0 else "up")
        if not scroll_table(reader, 0, 0.8 * (fold - top) * direction, what):
            return


def check_viewport(
    page: Page, args: argparse.Namespace, width: int, height: int
) -> tuple[list[str], Reader]:
    out = Path(args.out) / f"{width}x{height}"
    out.mkdir(parents=True, exist_ok=True)
    reader = Reader(page, out)
    page.on("pageerror", lambda err: reader.log.append(f"page error: {err}"))
    page.goto(args.link)
    page.get_by_text(re.compile(r"\d+ matching runs?")).wait_for(timeout=60_000)
    reader.act("open-link")
    close_assistant(reader)
    group_by_role(reader)

    failures: list[str] = []
    metrics = [Column(f"metrics.`{m}`", m) for m in args.metrics]
    required = [
        *[(Column("attributes.`Models`", "Models"), r) for r in args.require_model],
        *[(Column("attributes.`Dataset`", "Dataset"), r) for r in args.require_dataset],
    ]
    table: Table = {}
    columns = list(dict.fromkeys([*metrics, *(c for c, _ in required)]))
    for column in columns:
        runs = [cells for (group, _), cells in table.items() if group in args.roles]
        if runs and all(column.label in cells for cells in runs):
            continue  # read already, beside an earlier column
        if not reveal(reader, column):
            failures.append(f"the {column.label} column is not on screen")
            continue
        shown = [c for c in columns if on_screen(page, header(page, c))]
        read_rows(reader, shown, args.roles, table)
    page.screenshot(path=str(out / "final.png"), full_page=True)

    if reader.actions > args.max_actions:
        failures.append(f"took {reader.actions} actions (at most {args.max_actions} allowed)")
    for role in args.roles:
        runs = [key for key in table if key[0] == role]
        if not runs:
            failures.append(f"no group for role {role!r} on screen")
        elif len(runs) < reader.group_sizes.get(role, 0):
            failures.append(
                f"{role}: {len(runs)} of the group's {reader.group_sizes[role]} runs were shown"
            )
        for key in runs:
            for column in metrics:
                text = table[key].get(column.label)
                if text is None or not NUMBER.fullmatch(text):
                    failures.append(f"{role} run {key[1]!r} shows no {column.label} on screen")
    for column, role in required:
        for key in (k for k in table if k[0] == role):
            if table[key].get(column.label) in (None, "", "-"):
                failures.append(f"{role} run {key[1]!r} shows no {column.label} on screen")

    labels = [c.label for c in columns]
    reader.log.append("")
    reader.log.append(f"{'role':<10} {'run':<16} " + " ".join(f"{x:<14}" for x in labels))
    for (group, name), cells in table.items():
        values = [(cells.get(x) or "(off screen)")[:14] for x in labels]
        reader.log.append(f"{group or '-':<10} {name:<16} " + " ".join(f"{v:<14}" for v in values))
    reader.log.append(f"{reader.actions} action(s); screenshots in {out}")
    return failures, reader


def check(args: argparse.Namespace) -> list[str]:
    """Every viewport in a fresh browser profile; failures prefixed with the viewport."""
    failures: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=args.chromium, headless=True, args=["--no-sandbox"]
        )
        for viewport in args.viewport:
            width, height = (int(v) for v in viewport.split("x"))
            context = browser.new_context(viewport={"width": width, "height": height})
            found, reader = check_viewport(context.new_page(), args, width, height)
            context.close()
            print(f"== {viewport}")
            print("\n".join(reader.log))
            for failure in found:
                print(f"FAIL ({viewport}): {failure}")
            print("OK" if not found else f"{len(found)} check(s) failed", end="\n\n")
            failures += [f"{viewport}: {f}" for f in found]
        browser.close()
    return failures


def viewport_size(text: str) -> str:
    if not re.fullmatch(r"\d+x\d+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1600x1000")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("link", help="the printed MLflow runs-page link")
    parser.add_argument(
        "--roles", nargs="+", default=["teacher", "ensemble", "student", "baseline"]
    )
    parser.add_argument("--metrics", nargs="+", default=["best_val_mAP", "test_mAP"])
    parser.add_argument("--require-model", nargs="*", default=[], metavar="ROLE")
    parser.add_argument("--require-dataset", nargs="*", default=[], metavar="ROLE")
    parser.add_argument("--max-actions", type=int, default=3)
    parser.add_argument(
        "--viewport", nargs="+", type=viewport_size, default=["1920x1080", "1600x1000"]
    )
    parser.add_argument("--out", default="mlflow-ui-check", help="screenshot directory")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    failures = check(parser.parse_args(argv))
    print("OK" if not failures else f"{len(failures)} check(s) failed in all")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
