"""Cost of the MLA / PLA label alignment against one training step of the orderless RNN.

Run from the repository root (``PYTHONPATH=.`` unless the package is installed)::

    PYTHONPATH=. python bench/bench_orderless.py [--device cpu|cuda] [--threads N]

The alignment (``mlcore.orderless.align_targets``, scipy's Hungarian per image) runs on the CPU
while the device waits for the targets, so what matters is its time per image next to the
forward + backward time per image of the model it trains. Two label regimes:

* ``synth``: the generated benchmark (20 classes, 1 + Poisson(1.5) labels, at most 6; the
  decoder runs 7 steps);
* ``coco``: MS-COCO's shape (80 classes, 2.9 labels on average, up to 18; 20 steps), the
  setting of the paper's Table 3 (alignment ~0.25–0.8 ms against 21.3 ms forward + backward
  per image on a GPU with ResNet-101).

Alignment inputs are step log-probabilities in two states: ``untrained`` (random logits: few
steps predict a ground-truth label, so PLA fixes little and solves nearly MLA's problem) and
``trained`` (80% of the first n steps predict a distinct ground-truth label, as late in
training). The loss column times ``OrderlessLoss.target_sequences`` per image: the one
device-to-host copy of the batch plus the alignments. The step column is forward + backward of
the configured model (``--backbone``, 64 px, decoder 64/128/64, the ``pla`` config's sizes) on
``--device`` with the frequent-first loss, which needs no alignment. Each figure is the median
of ``--repeats`` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from mlcore.config import RNNConfig
from mlcore.losses.orderless import OrderlessLoss, class_ranking
from mlcore.models import build_model
from mlcore.orderless import align_targets

REGIMES = {
    # name: (classes, max labels, mean extra labels over one)
    "synth": (20, 6, 1.5),
    "coco": (80, 18, 1.9),
}


def _label_sets(rng: np.random.Generator, count: int, classes: int, most: int, extra: float):
    sizes = np.minimum(1 + rng.poisson(extra, count), most)
    return [rng.choice(classes, n, replace=False) for n in sizes]


def _log_probs(rng, labels, classes: int, steps: int, trained: bool) -> np.ndarray:
    logits = rng.normal(size=(steps, classes + 1))
    if trained:
        hits = rng.permutation(labels)
        for t, label in enumerate(hits):
            if rng.random() < 0.8:
                logits[t, label] += 6.0
        logits[len(labels), classes] += 6.0  # then <end>
    return logits - np.log(np.exp(logits).sum(1, keepdims=True))


def _median_ms(fn, repeats: int, sync) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def bench_alignment(regime: str, images: int, repeats: int) -> dict[str, float]:
    classes, most, extra = REGIMES[regime]
    steps = most + 1
    rng = np.random.default_rng(0)
    sets = _label_sets(rng, images, classes, most, extra)
    out = {}
    for state in ("untrained", "trained"):
        inputs = [_log_probs(rng, s, classes, steps, state == "trained") for s in sets]
        for name, method, variant in (
            ("MLA", "mla", "paper"),
            ("PLA", "pla", "paper"),
            ("PLA code", "pla", "code"),
        ):

            def run(method=method, variant=variant, inputs=inputs):
                for lp, labels in zip(inputs, sets, strict=True):
                    align_targets(lp, labels, method, variant=variant)

            out[f"{state} {name}"] = _median_ms(run, repeats, lambda: None) / images
    return out


def bench_step(args, device: torch.device) -> dict[str, float]:
    classes, most, extra = REGIMES["synth"]
    rnn = RNNConfig(embed_dim=64, hidden_dim=128, attention_dim=64, max_steps=most)
    torch.manual_seed(0)
    model = build_model(args.backbone, classes, "rnn", rnn=rnn).to(device).train()
    rng = np.random.default_rng(0)
    targets = torch.zeros(args.batch_size, classes)
    for i, labels in enumerate(_label_sets(rng, args.batch_size, classes, most, extra)):
        targets[i, labels] = 1.0
    targets = targets.to(device)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    rank = class_ranking("frequent", np.arange(classes)[::-1].copy())
    fixed = OrderlessLoss(classes, "frequent", rank=rank)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        model.zero_grad(set_to_none=True)
        fixed(model(images), targets).backward()

    out = {"forward+backward": _median_ms(step, args.repeats, sync) / args.batch_size}
    with torch.no_grad():
        logits = model(images)
    for order in ("mla", "pla"):
        loss = OrderlessLoss(classes, order)
        out[f"{order.upper()} targets (copy + align)"] = (
            _median_ms(lambda loss=loss: loss.target_sequences(logits, targets), args.repeats, sync)
            / args.batch_size
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=512, help="images per alignment timing")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    step = bench_step(args, device)
    base = step["forward+backward"]
    print(
        f"orderless RNN ({args.backbone}, {args.image_size}px, batch {args.batch_size}, "
        f"{device.type}, {torch.get_num_threads()} threads): per image"
    )
    for name, ms in step.items():
        ratio = "" if name == "forward+backward" else f"  ({100 * ms / base:.1f}% of the step)"
        print(f"  {name:<32} {ms:8.3f} ms{ratio}")
    for regime in REGIMES:
        classes, most, _ = REGIMES[regime]
        print(f"alignment only, {regime} ({classes} classes, <= {most} labels): per image")
        for name, ms in bench_alignment(regime, args.images, args.repeats).items():
            print(f"  {name:<32} {ms:8.3f} ms  ({100 * ms / base:.1f}% of the step above)")


if __name__ == "__main__":
    main()
