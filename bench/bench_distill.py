"""Student step cost with cached vs online teachers, relative to a plain student step.

A "step" is what the training loop does per batch: forward, objective, backward, Adam step.
The cached objective reads the batch's rows from the teachers' logit stores on disk (page
cache), merges them and adds two MSE terms;
the online one runs every teacher (eval mode, no grad) on the batch first. Expected:
cached ≈ 1×, online ≈ 1 + 2k·t_fwd / (t_fwd + t_bwd).

    python bench/bench_distill.py [--backbone test_resnet] [--k 3] [--size 64] [--batch 32]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mlcore.distill import (
    CachedTeachers,
    DistillationLoss,
    DistillationObjective,
    Ensemble,
    OnlineTeachers,
    load_cached_ensemble,
    write_logits,
)
from mlcore.losses.asl import AsymmetricLoss
from mlcore.models import build_model
from mlcore.train import Batch, Supervised


def _subsets(num_classes: int, k: int, offset: int) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(c for c in range(num_classes) if (c + offset) % k == t) for t in range(k))


def _time_steps(model, objective, batches, repeats: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 2):  # two warm-up steps
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        logits = model(batch.images)
        loss = objective(logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_forward(model, batches, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            start = time.perf_counter()
            model(batches[i % len(batches)].images)
            if i >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--k", type=int, default=3, help="subsets per partition (2k teachers)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=2000, help="rows of the logit stores")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    c = args.num_classes
    batches = [
        Batch(
            torch.randn(args.batch, 3, args.size, args.size),
            (torch.rand(args.batch, c) < 0.15).float(),
            torch.randint(0, args.train_size, (args.batch,)),
        )
        for _ in range(4)
    ]
    cgp, dgp = _subsets(c, args.k, 0), _subsets(c, args.k, 1)

    def teachers(subsets):
        return Ensemble(subsets, tuple(build_model(args.backbone, len(s)) for s in subsets))

    asl = AsymmetricLoss()
    kd = DistillationLoss(asl)
    online = OnlineTeachers(teachers(cgp), teachers(dgp), c)
    store_dir = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    ids = [str(i) for i in range(args.train_size)]

    def stores(subsets, seed):
        rng = np.random.default_rng(seed)
        paths = [
            write_logits(store_dir / f"{seed}-{t}", ids, [rng.normal(size=(len(ids), len(s)))], s)
            for t, s in enumerate(subsets)
        ]
        return load_cached_ensemble(paths, ids, c)

    cached = CachedTeachers(stores(cgp, 0), stores(dgp, 1))

    results = {}
    for name, objective in (
        ("plain", Supervised(asl)),
        ("cached", DistillationObjective(kd, cached)),
        ("online", DistillationObjective(kd, online)),
    ):
        torch.manual_seed(0)
        model = build_model(args.backbone, c)
        results[name] = _time_steps(model, objective, batches, args.repeats)
    fwd = _time_forward(build_model(args.backbone, c).eval(), batches, args.repeats)
    shutil.rmtree(store_dir)
    plain = results["plain"]
    expected_online = 1 + 2 * args.k * fwd / plain

    print(
        f"{args.backbone}, {args.num_classes} classes, k={args.k} ({2 * args.k} teachers), "
        f"batch {args.batch} x {args.size}px, {args.threads} thread(s), median of {args.repeats}"
    )
    print(f"  plain student step   {1000 * plain:8.1f} ms   1.00x")
    for name in ("cached", "online"):
        print(
            f"  {name:6s} teachers    {1000 * results[name]:8.1f} ms   {results[name] / plain:.2f}x"
        )
    print(
        f"  one eval forward     {1000 * fwd:8.1f} ms   -> expected online "
        f"1 + 2k*fwd/step = {expected_online:.2f}x; goal for cached <= 1.15x"
    )


if __name__ == "__main__":
    main()
