"""Compare two output trees of the same runs (before and after a refactor), value by value.

    python tools/compare_runs.py OLD_DIR NEW_DIR

Files must match byte for byte, except checkpoints, bundles and JSON files, which are compared
value by value with wall-clock fields (``epoch_time_s``, ``*_seconds``) left out, tensors with
``torch.equal``, NaN equal to NaN, and each tree's parent folder in a string read as the same
(runs under two folders record their own dataset cache paths). Prints one line per difference
and exits 1 if any.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

WALL_CLOCK = ("epoch_time_s", "_seconds", "elapsed", "duration")
VALUE_FILES = (".pt", ".json")


def _load(path: Path) -> Any:
    if path.suffix == ".pt":
        data = torch.load(path, map_location="cpu", weights_only=False)
    else:
        data = json.loads(path.read_text())
    if isinstance(data, dict) and isinstance(data.get("header"), str):  # a model bundle
        data = {**data, "header": json.loads(data["header"])}
    return data


def _differences(a: Any, b: Any, where: str = "", roots: tuple[str, str] = ("", "")) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in one" for k in sorted(set(a) ^ set(b), key=str)]
        for key in sorted(set(a) & set(b), key=str):
            if not any(mark in str(key) for mark in WALL_CLOCK):
                out += _differences(a[key], b[key], f"{where}.{key}", roots)
        return out
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{where}: {len(a)} against {len(b)} items"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _differences(x, y, f"{where}[{i}]", roots)
        ]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [f"{where}: tensors differ"]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    if isinstance(a, str) and isinstance(b, str) and all(roots):
        a, b = a.replace(roots[0], "<root>"), b.replace(roots[1], "<root>")
    return [] if a == b else [f"{where}: {str(a)[:60]!r} against {str(b)[:60]!r}"]


def compare(old: Path, new: Path) -> list[str]:
    """Every difference between the two trees, as lines."""
    old_files = {p.relative_to(old) for p in old.rglob("*") if p.is_file()}
    new_files = {p.relative_to(new) for p in new.rglob("*") if p.is_file()}
    lines = [f"{rel}: only in {old}" for rel in sorted(old_files - new_files)]
    lines += [f"{rel}: only in {new}" for rel in sorted(new_files - old_files)]
    for rel in sorted(old_files & new_files):
        a, b = old / rel, new / rel
        if a.read_bytes() == b.read_bytes():
            continue
        if rel.suffix not in VALUE_FILES:
            lines.append(f"{rel}: bytes differ")
            continue
        roots = (str(old.resolve().parent), str(new.resolve().parent))
        lines += [f"{rel}{d}" for d in _differences(_load(a), _load(b), roots=roots)]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    old, new = Path(argv[0]), Path(argv[1])
    lines = compare(old, new)
    for line in lines:
        print(line)
    files = sum(1 for p in old.rglob("*") if p.is_file())
    print(f"{files} files in {old}: {len(lines)} differences outside wall-clock fields")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
