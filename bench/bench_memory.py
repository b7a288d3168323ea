"""Peak memory of the student's data path at Open Images scale: sparse labels + logit stores
against the dense N x C code it replaced.

A generated manifest of N rows x C classes (Open-Images-like: Zipf class popularity, about 8
labels per image; tiny JPEGs referenced by path, since images are not what is measured) and one
cached ensemble of k teachers partitioning the C classes. Two measurements, each in a fresh
process, as the increase of the peak resident set (``ru_maxrss``) over the process after its
imports:

(a) building the training dataset (``MultiLabelDataset`` over the train split);
(b) one student epoch's data path with cached logits: ``build_loaders`` (return_index), then
    every batch of the epoch with its teachers' merged logits looked up (no model).

``new`` is this checkout (sparse labels, multi-hot per batch, logit stores read a batch of rows
at a time, float16); ``old`` is the code before it (dense (N, C) float32 targets, logits read
whole from Parquet into an (N, C) tensor), run from a copy of a git revision
(``--old-rev``, default ``main``) on the same generated data, with the logits it can read.

    python bench/bench_memory.py [--rows 200000] [--classes 9600] [--old-rows 12500 25000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGE_POOL = 64
BATCH = 64


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# Data (generated with the new code; the manifest format did not change)


def generate(root: Path, rows: int, classes: int, labels_per_image: float, seed: int) -> None:
    from PIL import Image

    from mlcore.data.manifest import ManifestInfo, build_table, write_manifest

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for j in range(IMAGE_POOL):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            buffer, "JPEG", quality=90
        )
        (root / "images" / f"p{j}.jpg").write_bytes(buffer.getvalue())
    popularity = 1.0 / np.arange(1, classes + 1) ** 0.8
    counts = 1 + rng.poisson(labels_per_image - 1, size=rows)
    flat = rng.choice(classes, size=int(counts.sum()), p=popularity / popularity.sum())
    labels = np.split(flat, np.cumsum(counts)[:-1])
    val = max(1, rows // 100)
    table = build_table(
        [f"img{i:08d}" for i in range(rows)],
        labels,
        ["val" if i < val else "train" for i in range(rows)],
        paths=[f"images/p{i % IMAGE_POOL}.jpg" for i in range(rows)],
    )
    info = ManifestInfo(class_names=tuple(f"c{c}" for c in range(classes)), name="oi-like")
    write_manifest(root, table, info)


def subsets(classes: int, teachers: int) -> list[list[int]]:
    order = np.random.default_rng(1).permutation(classes)
    return [part.tolist() for part in np.array_split(order, teachers)]


def write_stores(root: Path, out: Path, classes: int, teachers: int, code: str) -> None:
    """One ensemble's cached logits in the format ``code`` reads (random values)."""
    import pyarrow as pa

    from mlcore.data.manifest import Manifest
    from mlcore.distill import write_logits

    manifest = Manifest.load(root, with_bytes=False)
    ids = manifest.table.column("image_id").take(pa.array(manifest.split_rows("train")))
    rng = np.random.default_rng(2)
    for t, subset in enumerate(subsets(classes, teachers)):
        if code == "new":
            blocks = (
                rng.normal(size=(min(8192, len(ids) - s), len(subset))).astype(np.float32)
                for s in range(0, len(ids), 8192)
            )
            write_logits(out / f"t{t}", ids, blocks, subset, dtype="float16")
        else:  # the old writer takes the whole (N, |C_t|) array
            logits = rng.normal(size=(len(ids), len(subset))).astype(np.float32)
            write_logits(out / f"t{t}.parquet", ids.to_pylist(), logits, subset)


# ---------------------------------------------------------------------------------------------
# Measurements (run in a fresh process, with the new or the old code on sys.path)


def measure(what: str, root: Path, stores: Path, classes: int, teachers: int, code: str) -> dict:
    import pyarrow as pa
    import torch

    from mlcore.config import DataConfig, TrainConfig
    from mlcore.data.dataset import MultiLabelDataset, build_transform
    from mlcore.data.loading import OpenDataset, build_loaders
    from mlcore.data.manifest import Manifest
    from mlcore.distill import CachedTeachers, load_cached_ensemble
    from mlcore.train import Batch

    torch.set_num_threads(1)
    data = DataConfig(root=str(root), image_size=16, num_workers=0)
    before = peak_mib()
    started = time.perf_counter()
    manifest = Manifest.load(root)
    if what == "dataset":
        dataset = MultiLabelDataset(manifest, "train", build_transform(data, train=True))
        items = len(dataset)
    else:
        train_cfg = TrainConfig(batch_size=BATCH, device="cpu")
        opened = OpenDataset(data, root, manifest)
        loader, _ = build_loaders(opened, train_cfg, return_index=True)
        ids = manifest.table.column("image_id").take(pa.array(manifest.split_rows("train")))
        names = sorted(p.name for p in stores.iterdir())
        paths = [stores / name for name in names]
        ensemble = load_cached_ensemble(paths, ids if code == "new" else ids.to_pylist(), classes)
        cached = CachedTeachers(ensemble, None)
        items = checksum = 0
        for images, targets, indices in loader:
            merged, _ = cached(Batch(images, targets, indices))
            checksum += float(merged[:, 0].sum())
            items += len(indices)
    return {
        "increase_mib": peak_mib() - before,
        "baseline_mib": before,
        "seconds": time.perf_counter() - started,
        "items": items,
    }


# ---------------------------------------------------------------------------------------------
# Driver


def run_child(code_dir: Path, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    out = subprocess.run(
        [sys.executable, __file__, *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{args}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def old_checkout(rev: str, into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "mlcore"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _cell(cells: dict, code: str, what: str) -> str:
    return f"{cells[code][what]['increase_mib']:.0f}" if code in cells else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000], help="new code sizes")
    parser.add_argument(
        "--old-rows", type=int, nargs="*", default=[12_500, 25_000], help="old code sizes"
    )
    parser.add_argument("--classes", type=int, default=9_600)
    parser.add_argument("--teachers", type=int, default=5, help="teachers of the ensemble")
    parser.add_argument("--labels-per-image", type=float, default=8.0)
    parser.add_argument("--old-rev", default="main", help="git revision of the dense code")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    # Internal: one step in a child process.
    parser.add_argument("--child", choices=["gen", "stores", "dataset", "epoch"])
    parser.add_argument("--root")
    parser.add_argument("--stores")
    parser.add_argument("--code", choices=["new", "old"], default="new")
    args = parser.parse_args()

    if args.child:
        root, stores = Path(args.root), Path(args.stores or ".")
        if args.child == "gen":
            generate(root, int(args.rows[0]), args.classes, args.labels_per_image, seed=0)
            result = {}
        elif args.child == "stores":
            write_stores(root, stores, args.classes, args.teachers, args.code)
            result = {}
        else:
            result = measure(args.child, root, stores, args.classes, args.teachers, args.code)
        print(json.dumps(result))
        return

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-memory-"))
    old_code = old_checkout(args.old_rev, work / "old-code")
    sizes = sorted(set(args.rows) | set(args.old_rows))
    print(
        f"{args.classes:,} classes, ~{args.labels_per_image:g} labels per image, one ensemble "
        f"of {args.teachers} teachers; batch {BATCH}; peak RSS increase over the process "
        "after its imports (MiB)"
    )
    print(
        f"{'rows':>9}  {'N x C fp32':>10}  {'(a) dataset new':>15}  {'old':>8}  "
        f"{'(b) epoch new':>13}  {'old':>8}  {'epoch s new/old':>15}"
    )
    for rows in sizes:
        root, stores = work / f"data-{rows}", work / f"stores-{rows}"
        run_child(REPO, "--child", "gen", "--root", str(root), "--rows", str(rows),
                  "--classes", str(args.classes))  # fmt: skip
        cells = {}
        for code, code_dir in (("new", REPO), ("old", old_code)):
            wanted = args.rows if code == "new" else args.old_rows
            if rows not in wanted:
                continue
            shutil.rmtree(stores, ignore_errors=True)
            stores.mkdir()
            common = ["--root", str(root), "--stores", str(stores), "--code", code,
                      "--classes", str(args.classes), "--teachers", str(args.teachers)]  # fmt: skip
            run_child(code_dir, "--child", "stores", *common)
            cells[code] = {
                what: run_child(code_dir, "--child", what, *common) for what in ("dataset", "epoch")
            }
        shutil.rmtree(stores, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        dense = rows * args.classes * 4 / 2**20
        seconds = "/".join(
            f"{cells[c]['epoch']['seconds']:.0f}" if c in cells else "-" for c in ("new", "old")
        )
        print(
            f"{rows:>9,}  {dense:>10,.0f}  {_cell(cells, 'new', 'dataset'):>15}  "
            f"{_cell(cells, 'old', 'dataset'):>8}  {_cell(cells, 'new', 'epoch'):>13}  "
            f"{_cell(cells, 'old', 'epoch'):>8}  {seconds:>15}",
            flush=True,
        )
    shutil.rmtree(work / "old-code", ignore_errors=True)


if __name__ == "__main__":
    main()
