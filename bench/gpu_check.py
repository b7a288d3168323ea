"""The GPU path, measured in one run (about 8 minutes on one GPU).

(1) Teacher training images/s through the real loop (``mlcore.train.train``: loaders from
    ``build_loaders`` decoding JPEGs, bf16 autocast, channels_last, EMA) against a pure
    forward + backward + Adam step of the same backbone on device-resident tensors. Goal: the
    input pipeline keeps >= 90% of the pure rate. Measured for both ``data.decode_on`` settings
    (``loader``: DataLoader workers on the CPUs; ``device``: nvjpeg on the GPU).
(2) Two teachers sharing one GPU (two Ray tasks at ``teacher_gpus=0.5``) against the same two
    one at a time (``teacher_gpus=1``).
(3) A two-worker Ray Train run on one GPU (``ray.train_workers=2``, nccl, 0.5 GPU per worker),
    or the reason it cannot run.
(4) The peak GPU memory of each of the above.

Without a GPU (or with ``--cpu-smoke``) the same code runs at toy sizes on the CPU, gloo
instead of nccl and a logical Ray GPU for (2): a check that the script works, not a
measurement. ``--json FILE`` also writes the results.

    python bench/gpu_check.py [--cpu-smoke] [--json results.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mlcore import configlib
from mlcore.data.loading import build_loaders, open_dataset
from mlcore.data.manifest import ManifestInfo, build_table, write_manifest
from mlcore.experiment import train_classifier
from mlcore.losses import build_loss
from mlcore.models import build_model_from_config
from mlcore.train import LocalPlacement, Supervised, resolve_device, train
from workflows.config import Config


@dataclasses.dataclass(frozen=True)
class Sizes:
    device: str
    backbone: str
    image_size: int
    source_side: int
    images: int
    batch: int
    classes: int
    pure_steps: int


GPU = Sizes("cuda", "resnet50", 224, 640, 8192, 128, 80, 30)
SMOKE = Sizes("cpu", "test_resnet", 32, 64, 96, 16, 10, 3)


def on_gpu(cfg: Config) -> bool:
    return cfg.train.device.startswith("cuda")


def reset_peak(cfg: Config) -> None:
    if on_gpu(cfg):
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mib(cfg: Config) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if on_gpu(cfg) else None


def make_dataset(root: Path, sizes: Sizes) -> Path:
    """JPEGs of ``source_side`` px (a pool of 256, each referenced many times), random labels."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pool = min(256, sizes.images)
    (root / "images").mkdir(parents=True, exist_ok=True)
    base = np.linspace(0, 255, sizes.source_side, dtype=np.float32)
    for j in range(pool):
        # Smooth gradients plus noise: decodes like a photograph, not like flat colour.
        pixels = (base[None, :, None] + base[:, None, None] * 0.5 + j) % 255
        pixels = pixels + rng.normal(0, 20, (sizes.source_side, sizes.source_side, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        (root / "images" / f"{j}.jpg").write_bytes(buffer.getvalue())
    rows = sizes.images + sizes.batch
    labels = [rng.choice(sizes.classes, size=3, replace=False) for _ in range(rows)]
    table = build_table(
        [f"i{k}" for k in range(rows)],
        labels,
        ["train"] * sizes.images + ["val"] * sizes.batch,
        paths=[f"images/{k % pool}.jpg" for k in range(rows)],
    )
    info = ManifestInfo(class_names=tuple(f"c{c}" for c in range(sizes.classes)))
    write_manifest(root, table, info)
    return root


def config(root: Path, sizes: Sizes, *overrides: str) -> Config:
    return configlib.load(
        Config,
        None,
        [
            f"data.root={root}",
            f"train.device={sizes.device}",
            f"data.image_size={sizes.image_size}",
            f"model.backbone={sizes.backbone}",
            f"train.batch_size={sizes.batch}",
            "train.epochs=1",
            "loss.name=asl",
            *overrides,
        ],
    )


class TimedLoader:
    """Times the training loop from its second batch to its last (first-batch start-up and
    validation excluded)."""

    def __init__(self, loader):
        self.loader = loader
        self.sampler = getattr(loader, "sampler", None)
        self.seconds = self.images = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        started = None
        for batch in self.loader:
            if started is None:
                _sync()
                started = time.perf_counter()
            else:
                self.images += len(batch[0])
            yield batch
        _sync()
        self.seconds = time.perf_counter() - started


def _sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def loop_rate(cfg: Config, cpus: float | None) -> tuple[float, float | None]:
    """Training images/s of one epoch of the real loop, and its peak GPU memory."""
    dataset = open_dataset(cfg.data)
    train_loader, val_loader = build_loaders(dataset, cfg.train, placement=LocalPlacement(cpus))
    timed = TimedLoader(train_loader)
    model = build_model_from_config(cfg.model, dataset.num_classes)
    reset_peak(cfg)
    with tempfile.TemporaryDirectory() as out:
        train(model, timed, val_loader, Supervised(build_loss(cfg.loss)), cfg.train, out,
              log=lambda _: None)  # fmt: skip
    return timed.images / timed.seconds, peak_gpu_mib(cfg)


def pure_rate(cfg: Config, sizes: Sizes) -> tuple[float, float | None]:
    """Forward + backward + Adam step on device-resident tensors, same model and precision."""
    device = resolve_device(cfg.train.device)
    gpu = on_gpu(cfg)
    model = build_model_from_config(cfg.model, sizes.classes).to(device)
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = build_loss(cfg.loss)
    images = torch.randn(sizes.batch, 3, sizes.image_size, sizes.image_size, device=device)
    if gpu:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(sizes.batch, sizes.classes, device=device) < 0.05).float()
    reset_peak(cfg)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            logits = model(images)
        loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    _sync()
    started = time.perf_counter()
    for _ in range(sizes.pure_steps):
        step()
    _sync()
    return sizes.pure_steps * sizes.batch / (time.perf_counter() - started), peak_gpu_mib(cfg)


def check_loop(root: Path, sizes: Sizes) -> dict:
    cpus = os.cpu_count()
    cfg = config(root, sizes)
    pure, pure_mem = pure_rate(cfg, sizes)
    out = {"pure_images_s": pure, "pure_peak_gpu_mib": pure_mem, "cpus": cpus}
    for decode_on in ("loader", "device"):
        rate, mem = loop_rate(config(root, sizes, f"data.decode_on={decode_on}"), cpus)
        out[decode_on] = {"images_s": rate, "ratio": rate / pure, "peak_gpu_mib": mem}
    return out


def _teacher_task(cfg: Config, subset: list[int]) -> dict:
    import ray

    reset_peak(cfg)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        train_classifier(cfg, open_dataset(cfg.data), out, class_subset=subset,
                         placement=LocalPlacement(cpus), log=lambda _: None)  # fmt: skip
    return {"seconds": time.perf_counter() - started, "peak_gpu_mib": peak_gpu_mib(cfg)}


def check_sharing(root: Path, sizes: Sizes) -> dict:
    import ray

    cfg = config(root, sizes)
    half = sizes.classes // 2
    subsets = [list(range(half)), list(range(half, sizes.classes))]
    cpus = max(1, (os.cpu_count() or 2) // 2)
    task = ray.remote(_teacher_task)
    out = {}
    for name, gpus in (("one_at_a_time", 1.0), ("shared", 0.5)):
        started = time.perf_counter()
        refs = [task.options(num_gpus=gpus, num_cpus=cpus).remote(cfg, s) for s in subsets]
        results = ray.get(refs)
        out[name] = {
            "wall_s": time.perf_counter() - started,
            "teachers": results,
        }
    out["speedup"] = out["one_at_a_time"]["wall_s"] / out["shared"]["wall_s"]
    return out


def check_group(root: Path, sizes: Sizes) -> dict:
    """Two Ray Train workers sharing one GPU (nccl), or why not."""
    from workflows.distributed import fit_group
    from workflows.storage import Storage
    from workflows.tracking import NullRunLogger

    cfg = config(root, sizes)
    gpu = on_gpu(cfg)
    resources = {"num_cpus": 1, "num_gpus": 0.5 if gpu else 0.0}
    peaks = Path(tempfile.mkdtemp(prefix="gpu-check-peaks-"))  # one machine: a shared folder

    def run(out, **hooks):
        reset_peak(cfg)
        result = train_classifier(cfg, open_dataset(cfg.data), out, **hooks)
        rank = hooks["placement"].rank
        (peaks / f"rank{rank}.json").write_text(json.dumps(peak_gpu_mib(cfg)))
        return result

    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = fit_group(
                run,
                Path(tmp) / "out",
                workers=2,
                resources=resources,
                max_failures=0,
                logger=NullRunLogger(),
                storage=Storage(tmp),
                rel="ray_train/gpu-check",
            )
    except Exception as err:  # the reason is the result here
        return {"ran": False, "backend": "nccl" if gpu else "gloo", "reason": repr(err)[:2000]}
    return {
        "ran": True,
        "backend": "nccl" if gpu else "gloo",
        "wall_s": time.perf_counter() - started,
        "val_mAP": result.best_metrics["val_mAP"],
        "peak_gpu_mib": [json.loads(p.read_text()) for p in sorted(peaks.glob("rank*.json"))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    import ray

    gpu = torch.cuda.is_available() and not args.cpu_smoke
    sizes = GPU if gpu else SMOKE
    device = torch.cuda.get_device_name() if gpu else "CPU (smoke run: not a measurement)"
    print(f"gpu_check: {device}; torch {torch.__version__}; {os.cpu_count()} CPUs; {sizes}")
    results: dict = {"device": device, "sizes": dataclasses.asdict(sizes)}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = make_dataset(Path(tmp) / "data", sizes)

        loop = results["loop"] = check_loop(root, sizes)
        print(f"(1) pure fwd+bwd+step {loop['pure_images_s']:.0f} images/s "
              f"(peak {loop['pure_peak_gpu_mib']} MiB)")  # fmt: skip
        for decode_on in ("loader", "device"):
            r = loop[decode_on]
            print(f"    training loop, decode_on={decode_on}: {r['images_s']:.0f} images/s = "
                  f"{100 * r['ratio']:.0f}% of pure (goal >= 90%), "
                  f"peak {r['peak_gpu_mib']} MiB")  # fmt: skip

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # One GPU (a logical one on a CPU machine: (2) then tests placement, not speed).
        ray.init(address="local", num_gpus=1, include_dashboard=False, log_to_driver=False)
        try:
            share = results["sharing"] = check_sharing(root, sizes)
            for name in ("one_at_a_time", "shared"):
                r = share[name]
                peaks = [t["peak_gpu_mib"] for t in r["teachers"]]
                print(f"(2) two teachers {name}: {r['wall_s']:.1f} s wall, peak {peaks} MiB")
            print(f"    sharing one GPU at 0.5 each: {share['speedup']:.2f}x faster")

            group = results["group"] = check_group(root, sizes)
            if group["ran"]:
                print(f"(3) two Ray Train workers on one device ({group['backend']}): "
                      f"{group['wall_s']:.1f} s, val mAP {group['val_mAP']:.4f}, "
                      f"peak per rank {group['peak_gpu_mib']} MiB")  # fmt: skip
            else:
                print(f"(3) two Ray Train workers on one device ({group['backend']}): "
                      f"did not run: {group['reason'][:500]}")  # fmt: skip
        finally:
            ray.shutdown()
    print("(4) peak GPU memory: listed with each result above (None: not on a GPU)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
