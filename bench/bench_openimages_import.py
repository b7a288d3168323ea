"""Peak memory of the Open Images importer against the size of its labels CSV.

The importer (``mlcore.data.importers.openimages``) streams: it keeps one image's labels and
one batch of output rows in memory, so its peak resident memory should not grow with the
number of CSV rows. This script checks that on generated files of the distributed shape:

* ``oidv6-class-descriptions.csv`` (header ``LabelName,DisplayName``) with ``--classes`` MIDs
  plus 10% untrainable ones, and the trainable list (``--classes`` MIDs);
* a human-verified labels CSV (``ImageID,Source,LabelName,Confidence``) sorted by ImageID,
  ``1 + Poisson(--labels-per-image - 1)`` rows per image, 70% positives, 2% of rows naming an
  untrainable class.

Each size is imported in a fresh Python process (labels only, ``check_images=False``: no image
files exist), which reports ``ru_maxrss`` (peak resident set) and its resident memory after the
imports but before the import (the interpreter, numpy and pyarrow), so the import's own peak is
the difference. Wall time is printed too; it is indicative only on a shared machine.

    python bench/bench_openimages_import.py --rows 100000 400000 1700000

Run ``python bench/bench_openimages_import.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import json, resource, sys, time
from mlcore.data.importers import import_openimages

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

root, out = sys.argv[1], sys.argv[2]
before = rss_mib()
start = time.perf_counter()
result = import_openimages(
    [(f"{root}/labels.csv", "train", f"{root}/images")],
    out,
    class_descriptions=f"{root}/oidv6-class-descriptions.csv",
    trainable_classes=f"{root}/oidv6-classes-trainable.txt",
    check_images=False,
)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
print(json.dumps({"before_mib": before, "peak_mib": peak, "seconds": seconds,
                  "images": sum(result.rows_per_split.values())}))
"""


def write_inputs(root: Path, rows: int, classes: int, labels_per_image: float, seed: int) -> int:
    """Write the class files and a sorted labels CSV of ``rows`` rows; returns the images."""
    rng = np.random.default_rng(seed)
    untrainable = classes // 10
    mids = [f"/m/{i:07x}" for i in range(classes + untrainable)]
    with (root / "oidv6-class-descriptions.csv").open("w") as f:
        f.write("LabelName,DisplayName\n")
        f.writelines(f"{m},Class {i}\n" for i, m in enumerate(mids))
    (root / "oidv6-classes-trainable.txt").write_text("\n".join(mids[:classes]) + "\n")
    written = images = 0
    with (root / "labels.csv").open("w") as f:
        f.write("ImageID,Source,LabelName,Confidence\n")
        while written < rows:
            count = min(1 + rng.poisson(labels_per_image - 1), rows - written)
            trainable = rng.random(count) >= 0.02
            picks = np.where(
                trainable,
                rng.integers(0, classes, count),
                classes + rng.integers(0, max(1, untrainable), count),
            )
            labels = sorted(set(picks.tolist()))  # one row per (image, class), as distributed
            positive = rng.random(len(labels)) < 0.7
            image_id = f"{images:016x}"
            f.writelines(
                f"{image_id},verification,{mids[c]},{int(p)}\n"
                for c, p in zip(labels, positive, strict=True)
            )
            written += len(labels)
            images += 1
    return images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[100_000, 400_000, 1_700_000], help="CSV rows"
    )
    parser.add_argument("--classes", type=int, default=9_600, help="trainable classes")
    parser.add_argument("--labels-per-image", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    repo = Path(__file__).resolve().parents[1]
    print(
        f"{'csv rows':>10} {'images':>9} {'csv MiB':>8} {'before':>8} {'peak':>8} "
        f"{'import':>8} {'seconds':>8}"
    )
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="oi-bench-") as tmp:
            root = Path(tmp)
            (root / "images").mkdir()
            write_inputs(root, rows, args.classes, args.labels_per_image, args.seed)
            size = (root / "labels.csv").stat().st_size / 2**20
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(root), str(root / "out")],
                capture_output=True,
                text=True,
                cwd=repo,
                env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
            )
            if done.returncode != 0:
                sys.exit(f"import of {rows} rows failed:\n{done.stderr}")
            stats = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{rows:>10,} {stats['images']:>9,} {size:>8.1f} {stats['before_mib']:>8.1f} "
                f"{stats['peak_mib']:>8.1f} {stats['peak_mib'] - stats['before_mib']:>8.1f} "
                f"{stats['seconds']:>8.1f}",
                flush=True,
            )
    print(
        "MiB: 'before' = resident after the imports, 'peak' = ru_maxrss, 'import' = the "
        "difference (the importer's own peak)."
    )


if __name__ == "__main__":
    main()
