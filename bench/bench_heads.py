"""Cost of the ML-Decoder head against a GAP head and a full transformer-decoder head.

Three heads read the same backbone output, a ``(B, C, H, W)`` feature map:

* ``gap``: global average pooling + one linear layer, ``l = W z`` (paper §2.1).
* ``ml-decoder``: :class:`mlcore.models.ml_decoder.MLDecoder` with ``K = min(100, N)`` fixed group
  queries, cross-attention only (Eq. 4).
* ``full-decoder``: the transformer-decoder head of Eq. 2 (as in Query2Label): ``N`` learnable
  queries, one ``nn.TransformerDecoderLayer`` (self-attention over the ``N`` queries, then
  cross-attention and feed-forward) with the same ``D``/FF widths, then a per-class linear
  token-pool. Its cost grows with ``N²``; ML-Decoder's attention cost does not depend on ``N``.

Part 1 times the heads alone on a fixed feature map (the shape ResNet-50 gives at the chosen
resolution) for N = 80, 1,000 and 9,600. Part 2 is the headline: a randomly initialised timm
ResNet-50 with ML-Decoder (K=100) against the same ResNet-50 with the GAP head at N = 9,600.
The paper (Table 2, TResNet-M at 224) reports 6.3 vs 5.8 GFLOPs, i.e. ~1.09×; the target here
is ≤ 1.2×. Resolution matters: the query-side cost is fixed while the backbone shrinks with the
image, so lower resolutions inflate the ratio.

Measurement:

* time: "fwd" is ``eval()`` + ``torch.inference_mode()``; "fwd+bwd" is ``train()``, forward, and
  backward of ``logits.mean()`` (parameter gradients included). After one warm-up run, up to
  ``--repeats`` timed runs, as many as fit in ``--budget-s`` (at least one); the minimum is
  reported, the usual estimator when other processes share the cores (noise only adds time).
  ``--threads`` defaults to 1: on shared cores multi-threaded CPU timings swing by several
  times, and the ratios are what this script is for.
* memory: peak bytes of tensors allocated during one pass above what was allocated before it.
  On CUDA this is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU,
  where PyTorch keeps no such counter, the warm-up pass runs under ``torch.profiler`` with
  ``profile_memory=True`` and the peak is the maximum of the running allocated total the
  profiler attaches to every CPU allocation event. Both count tensor storage only (no allocator
  caching, no library workspaces outside the PyTorch allocator, no code/weights resident before
  the pass).

PyTorch's CPU attention materialises the ``(B, h, N, N)`` score tensor, so the full decoder is
not run where one such tensor exceeds ``--max-attn-gib`` (22 GiB at B=8, N=9,600), and a pass that
fails to allocate is reported as ``OOM``. Run ``python bench/bench_heads.py --help`` for the
flags. On CPU the profiler prints a few
``USDT``/``gpuGetDeviceCount`` lines on stderr; they are harmless.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import timm
import torch
from torch import nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from mlcore.models.ml_decoder import MLDecoder

HEADS = ("gap", "ml-decoder", "full-decoder")
MIB = 2.0**20


class GAPHead(nn.Module):
    """Global average pooling followed by a linear layer: ``(B, C, H, W) → (B, N)``."""

    def __init__(self, num_classes: int, in_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean(dim=(2, 3)))  # (B, N)


class FullDecoderHead(nn.Module):
    """Transformer-decoder head with one learnable query per class (Eq. 2).

    Same token projection, widths and dropout as :class:`MLDecoder`; the only differences are the
    ``N`` queries, the self-attention block over them and the per-class token-pool.

    Args:
        num_classes: Number of classes ``N`` (= number of queries).
        in_features: Channel width ``C`` of the feature map.
        embed_dim: Decoder width ``D``.
        ff_dim: Hidden width of the feed-forward block.
        num_heads: Attention heads.
        dropout: Dropout inside the decoder layer.
    """

    def __init__(
        self,
        num_classes: int,
        in_features: int,
        embed_dim: int = 768,
        ff_dim: int = 2048,
        num_heads: int = 8,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.token_proj = nn.Linear(in_features, embed_dim)
        self.queries = nn.Parameter(torch.randn(num_classes, embed_dim))
        layer = nn.TransformerDecoderLayer(embed_dim, num_heads, ff_dim, dropout, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, num_layers=1)
        # Token-pool: class n's logit is a dot product of its decoded query with its own vector.
        self.pool_weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        self.pool_bias = nn.Parameter(torch.zeros(num_classes))
        nn.init.xavier_normal_(self.pool_weight)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        memory = torch.relu(self.token_proj(features.flatten(2).transpose(1, 2)))  # (B, L, D)
        queries = self.queries.unsqueeze(0).expand(memory.shape[0], -1, -1)  # (B, N, D)
        decoded = self.decoder(queries, memory)  # (B, N, D)
        return torch.einsum("bnd,nd->bn", decoded, self.pool_weight) + self.pool_bias  # (B, N)


def build_head(kind: str, num_classes: int, in_features: int) -> nn.Module:
    """Build one of :data:`HEADS` with the paper's default widths."""
    if kind == "gap":
        return GAPHead(num_classes, in_features)
    if kind == "ml-decoder":
        return MLDecoder(num_classes, in_features, num_groups=100)
    if kind == "full-decoder":
        return FullDecoderHead(num_classes, in_features)
    raise ValueError(f"unknown head {kind!r}")


@dataclass(frozen=True)
class Cost:
    """Fastest wall time and peak tensor memory of one kind of pass."""

    ms: float
    mib: float
    runs: int


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _profiled_peak_bytes(step: Callable[[], None]) -> int:
    """Run ``step`` under the CPU memory profiler; return its peak extra allocated bytes."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    allocations = []
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            allocations.append((node.start_time_ns, node.extra_fields))
    if not allocations:
        return 0
    allocations.sort(key=lambda pair: pair[0])
    first = allocations[0][1]
    # The running total also counts earlier profiled allocations still alive; subtract them.
    baseline = first.total_allocated - first.alloc_size
    return max(fields.total_allocated for _, fields in allocations) - baseline


def _warmup_and_peak_mib(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Run ``step`` once; return its wall time (s) and peak extra allocated MiB."""
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        seconds = time.perf_counter() - start
        return seconds, (torch.cuda.max_memory_allocated(device) - before) / MIB
    start = time.perf_counter()
    peak = _profiled_peak_bytes(step)
    return time.perf_counter() - start, peak / MIB


def _is_out_of_memory(err: RuntimeError) -> bool:
    # The CPU allocator raises a plain RuntimeError; CUDA raises torch.OutOfMemoryError.
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def measure(
    step: Callable[[], None], device: torch.device, repeats: int, budget_s: float
) -> Cost | None:
    """Warm up (measuring memory on the way), then time ``step``.

    Args:
        step: One pass; must leave no tensors alive between calls.
        device: Where the pass runs.
        repeats: Most timed runs after the warm-up.
        budget_s: Seconds the timed runs may take, judged from the warm-up; at least one runs.

    Returns:
        Fastest timed run and the warm-up's peak memory, or ``None`` when the pass ran out of
        memory.
    """
    try:
        warmup_s, mib = _warmup_and_peak_mib(step, device)
    except RuntimeError as err:
        if not _is_out_of_memory(err):
            raise
        return None
    runs = max(1, min(repeats, int(budget_s / warmup_s)))
    times = []
    for _ in range(runs):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return Cost(ms=1e3 * min(times), mib=mib, runs=runs)


def measure_model(
    model: nn.Module, inputs: torch.Tensor, repeats: int, budget_s: float
) -> tuple[Cost | None, Cost | None]:
    """Cost of an inference forward and of a training forward+backward of ``model(inputs)``."""

    def forward() -> None:
        with torch.inference_mode():
            model(inputs)

    def forward_backward() -> None:
        # Gradients are freed first so each pass allocates (and is charged for) them.
        model.zero_grad(set_to_none=True)
        model(inputs).mean().backward()

    model.eval()
    fwd = measure(forward, inputs.device, repeats, budget_s)
    model.train()
    train = measure(forward_backward, inputs.device, repeats, budget_s)
    model.zero_grad(set_to_none=True)
    return fwd, train


HEADER = (
    f"{'model':<22}{'N':>6}{'queries':>9}{'fwd ms':>11}{'fwd+bwd ms':>13}"
    f"{'fwd MiB':>10}{'fwd+bwd MiB':>13}{'runs':>6}"
)


def _row(name: str, n: int, queries: str, fwd: Cost | None, train: Cost | None) -> str:
    def cells(cost: Cost | None, width: int) -> tuple[str, str]:
        if cost is None:
            return f"{'OOM':>{width}}", f"{'OOM':>10}"
        return f"{cost.ms:>{width}.1f}", f"{cost.mib:>10.1f}"

    fwd_ms, fwd_mib = cells(fwd, 11)
    train_ms, train_mib = cells(train, 13)
    runs = f"{fwd.runs if fwd else '-'}/{train.runs if train else '-'}"
    return f"{name:<22}{n:>6}{queries:>9}{fwd_ms}{train_ms}{fwd_mib}{train_mib:>13}{runs:>6}"


def _ratio(num: Cost | None, den: Cost | None, field: str) -> str:
    if num is None or den is None:
        return "  n/a"
    return f"{getattr(num, field) / getattr(den, field):6.3g}x"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the ResNet-50 runs")
    parser.add_argument(
        "--head-batch", type=int, default=8, help="batch size of the head-only feature map"
    )
    parser.add_argument("--resolution", type=int, default=224, help="input image side")
    parser.add_argument("--in-features", type=int, default=2048, help="feature-map channels C")
    parser.add_argument(
        "--num-classes", type=int, nargs="+", default=[80, 1000, 9600], help="values of N"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    parser.add_argument(
        "--budget-s", type=float, default=15.0, help="seconds of timed runs per measurement"
    )
    parser.add_argument(
        "--max-attn-gib",
        type=float,
        default=1.0,
        help="skip the full decoder where one (B, h, N, N) attention-score tensor exceeds this",
    )
    parser.add_argument("--skip-backbone", action="store_true", help="head-only table only")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op CPU threads; 1 keeps timings stable when the cores are shared",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    side = args.resolution // 32  # ResNet-50's output stride
    memory_method = (
        "torch.cuda.max_memory_allocated"
        if device.type == "cuda"
        else "torch.profiler CPU allocation events"
    )
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"timm={timm.__version__}; memory = peak tensor bytes allocated during one pass "
        f"({memory_method}); time = fastest of the timed fwd/fwd+bwd runs"
    )

    print(
        f"\n[1] heads alone on a fixed ({args.head_batch}, {args.in_features}, {side}, {side}) "
        f"feature map (ResNet-50 at {args.resolution}px)"
    )
    print(HEADER)
    features = torch.randn(args.head_batch, args.in_features, side, side, device=device)
    head_costs: dict[tuple[str, int], tuple[Cost | None, Cost | None]] = {}
    for n in args.num_classes:
        for kind in HEADS:
            queries = {"gap": "-", "ml-decoder": str(min(100, n)), "full-decoder": str(n)}[kind]
            if kind == "full-decoder":
                # nn.MultiheadAttention on CPU materialises the (B, h, N, N) scores; a single one
                # of them past the budget would swap or OOM-kill a shared machine.
                scores_gib = args.head_batch * 8 * n * n * features.element_size() / 2**30
                if scores_gib > args.max_attn_gib:
                    print(
                        f"{kind:<22}{n:>6}{queries:>9}  not run: one (B, h, N, N) score tensor "
                        f"is {scores_gib:.1f} GiB > --max-attn-gib {args.max_attn_gib:g}"
                    )
                    continue
            head = build_head(kind, n, args.in_features).to(device)
            head_costs[kind, n] = measure_model(head, features, args.repeats, args.budget_s)
            print(_row(kind, n, queries, *head_costs[kind, n]), flush=True)
            del head

    print("\nfull-decoder / ml-decoder (heads alone):")
    for n in args.num_classes:
        full_f, full_t = head_costs.get(("full-decoder", n), (None, None))
        mld_f, mld_t = head_costs["ml-decoder", n]
        print(
            f"  N={n:<5} fwd {_ratio(full_f, mld_f, 'ms')}  fwd+bwd {_ratio(full_t, mld_t, 'ms')}"
            f"  fwd+bwd memory {_ratio(full_t, mld_t, 'mib')}"
        )

    if args.skip_backbone:
        return
    n = max(args.num_classes)
    print(
        f"\n[2] timm resnet50 (random init) + head, input ({args.batch}, 3, "
        f"{args.resolution}, {args.resolution}), N={n}"
    )
    print(HEADER)
    backbone = timm.create_model("resnet50", pretrained=False, num_classes=0, global_pool="")
    backbone = backbone.to(device)
    images = torch.randn(args.batch, 3, args.resolution, args.resolution, device=device)
    network_costs = {}
    for kind in ("gap", "ml-decoder"):
        network = nn.Sequential(backbone, build_head(kind, n, backbone.num_features).to(device))
        network_costs[kind] = measure_model(network, images, args.repeats, args.budget_s)
        queries = "-" if kind == "gap" else str(min(100, n))
        print(_row(f"resnet50+{kind}", n, queries, *network_costs[kind]), flush=True)
        del network

    (gap_f, gap_t), (mld_f, mld_t) = network_costs["gap"], network_costs["ml-decoder"]
    verdict = ""
    if gap_f is not None and mld_f is not None:
        verdict = " (meets" if mld_f.ms <= 1.2 * gap_f.ms else " (misses"
        verdict += " the <= 1.2x target)"
    print(
        f"\nheadline: resnet50+ml-decoder(K=100) / resnet50+gap at N={n}, {args.resolution}px:"
        f"\n  fwd {_ratio(mld_f, gap_f, 'ms')}{verdict}, fwd+bwd {_ratio(mld_t, gap_t, 'ms')}, "
        f"fwd+bwd memory {_ratio(mld_t, gap_t, 'mib')}"
    )


if __name__ == "__main__":
    sys.exit(main())
