"""Benchmark forward + backward of ASL and the DB loss relative to plain BCE.

Run from the repository root (``PYTHONPATH=.`` unless the package is installed)::

    PYTHONPATH=. python bench/bench_losses.py [--repeats 30] [--warmup 5] [--threads N]

For batches of 256 x 80 (COCO) and 256 x 9,600 (Open Images scale) float32 logits it times one
forward and backward pass of ``F.binary_cross_entropy_with_logits``, ``AsymmetricLoss`` (authors'
defaults: γ- = 4, γ+ = 0, m = 0.05, detached focal weight) and ``DistributionBalancedLoss``
(COCO-MLT defaults, synthetic long-tailed class frequencies), on CPU and, when present, CUDA.
Each figure is the median of ``--repeats`` runs after ``--warmup`` untimed runs, the losses
taking turns run by run; ratios are relative to BCE on the same device and size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mlcore.losses.asl import AsymmetricLoss
from mlcore.losses.db import DistributionBalancedLoss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TRAIN_SIZE = 100_000


def _make_case(
    batch: int, classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Logits, ~3 positives per image, and a long-tailed frequency table for the DB loss."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, classes, generator=g) * 3
    prevalence = 3.0 / classes
    targets = (torch.rand(batch, classes, generator=g) < prevalence).float()
    # Zipf-like counts: class i appears in ~N / (i + 2) / 4 images, at least once.
    class_freq = np.maximum(TRAIN_SIZE // (4 * (np.arange(classes) + 2)), 1)
    return logits.to(device), targets.to(device), class_freq


def _time_once(fn: LossFn, logits: torch.Tensor, targets: torch.Tensor) -> float:
    x = logits.detach().requires_grad_(True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(x, targets).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _bench(device: torch.device, batch: int, classes: int, repeats: int, warmup: int) -> None:
    logits, targets, class_freq = _make_case(batch, classes, device)
    losses: dict[str, LossFn] = {
        "BCE": lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="sum"),
        "ASL": AsymmetricLoss().to(device),
        "DB": DistributionBalancedLoss(class_freq, TRAIN_SIZE).to(device),
    }
    times: dict[str, list[float]] = {name: [] for name in losses}
    # Round-robin over the losses so that load from other processes hits all of them alike.
    for i in range(warmup + repeats):
        for name, fn in losses.items():
            elapsed = _time_once(fn, logits, targets)
            if i >= warmup:
                times[name].append(elapsed)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    cells = "  ".join(f"{name} {t:8.3f} ms ({t / ms['BCE']:4.2f}x)" for name, t in ms.items())
    print(f"{device.type:<5} {batch:>4} x {classes:<6,} {cells}")


def main() -> None:
    """Parse arguments and print one row per device and size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, float32, "
        f"median of {args.repeats} forward+backward runs; (ratio to BCE)"
    )
    for device in devices:
        for classes in (80, 9_600):
            _bench(device, 256, classes, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
