"""One process against a Ray Train group of W gloo workers on the same config: per-epoch metrics,
the relative distance of the final weights, and the wall time of each.

    python bench/bench_data_parallel.py [--config tiny] [--workers 2] [--set train.epochs=3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from mlcore.data.loading import open_dataset
from mlcore.experiment import train_classifier
from mlcore.train import LAST, load_checkpoint
from workflows.config import config_path, load_config
from workflows.distributed import fit_group
from workflows.storage import Storage
from workflows.tracking import NullRunLogger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(config_path(args.config), ["mlflow.enabled=false", *args.overrides])
    work = Path(tempfile.mkdtemp(prefix="bench-dp-"))

    started = time.perf_counter()
    single = train_classifier(cfg, open_dataset(cfg.data), work / "single", log=lambda _: None)
    single_s = time.perf_counter() - started

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False)
    try:
        started = time.perf_counter()
        group = fit_group(
            lambda out, **hooks: train_classifier(cfg, open_dataset(cfg.data), out, **hooks),
            work / "group",
            workers=args.workers,
            resources={"num_cpus": 1},
            max_failures=0,
            logger=NullRunLogger(),
            storage=Storage(str(work / "storage")),
            rel="ray_train/bench",
        )
        group_s = time.perf_counter() - started
    finally:
        ray.shutdown()

    a = load_checkpoint(work / "single" / LAST)["model"]
    b = load_checkpoint(work / "group" / LAST)["model"]
    ref = torch.cat([a[k].double().flatten() for k in a])
    ours = torch.cat([b[k].double().flatten() for k in a])
    print(f"{args.config} {args.overrides}: 1 process vs {args.workers} gloo workers")
    print("epoch  val mAP 1 process  val mAP group  train loss 1 process  train loss group")
    for x, y in zip(single.history, group.history, strict=True):
        print(
            f"{x['epoch']:>5}  {x['val_mAP']:>17.6f}  {y['val_mAP']:>12.6f}  "
            f"{x['train_loss']:>20.6f}  {y['train_loss']:>16.6f}"
        )
    print(f"final weights, relative L2 distance: {((ours - ref).norm() / ref.norm()).item():.2e}")
    print(f"wall time: 1 process {single_s:.1f} s, group {group_s:.1f} s")


if __name__ == "__main__":
    main()
