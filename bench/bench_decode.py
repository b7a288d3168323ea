"""JPEG decode + resize throughput per core: PIL vs torchvision.io vs simplejpeg.

Each decoder turns encoded JPEG bytes into the (3, S, S) uint8 tensor the training transform
starts from (``mlcore.data.dataset.DECODERS``, then the same antialiased resize), at S = 224 and
448, on one thread. The sources are the two photographs scikit-learn ships
(``china.jpg``, ``flower.jpg``, 640 x 427), re-encoded at quality 90 at the sizes datasets
serve: 640 px on the long side (COCO) for 224, 1024 px (Open Images' resized release) for 448.

Two variants that are not in ``DECODERS`` decode at a reduced size in the DCT domain, which
changes the pixels: ``simplejpeg-dct`` (libjpeg-turbo's M/8 scaling to the smallest size with
both sides >= S) and ``pil-draft`` (PIL's ``draft``: 1/2, 1/4 or 1/8).

Outputs are compared with the PIL path (full decode) as mean |difference| in 0..255 levels,
next to the *resize tolerance*: how much two standard antialiased resizes of the same pixels
(PIL bilinear vs PIL bicubic) already disagree. A decoder qualifies as the default when its
difference stays within that tolerance.

    python bench/bench_decode.py [--seconds 5] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
import simplejpeg
import sklearn.datasets
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from mlcore.data.dataset import DECODERS

SOURCES = ("china.jpg", "flower.jpg")
SETTINGS = ((224, 640), (448, 1024))  # (model input side, long side of the stored JPEG)


def source_jpegs(long_side: int) -> list[bytes]:
    folder = Path(sklearn.datasets.__file__).parent / "images"
    out = []
    for name in SOURCES:
        image = Image.open(folder / name).convert("RGB")
        scale = long_side / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        buffer = io.BytesIO()
        image.resize(size, Image.Resampling.BICUBIC).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def simplejpeg_dct(data: bytes, side: int) -> torch.Tensor:
    array = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side)
    return torch.from_numpy(array).permute(2, 0, 1)


def pil_draft(data: bytes, side: int) -> torch.Tensor:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (side, side))
    return pil_to_tensor(image.convert("RGB"))


CANDIDATES = {
    **{name: (lambda blob, side, fn=fn: fn(blob)) for name, fn in DECODERS.items()},
    "simplejpeg-dct": simplejpeg_dct,
    "pil-draft": pil_draft,
}


def decode_and_resize(decoder: str, blob: bytes, side: int) -> torch.Tensor:
    resize = v2.Resize((side, side), antialias=True)
    return resize(CANDIDATES[decoder](blob, side))


def pil_resize(blob: bytes, side: int, method: Image.Resampling) -> np.ndarray:
    image = Image.open(io.BytesIO(blob)).convert("RGB").resize((side, side), method)
    return np.asarray(image, dtype=np.float32).transpose(2, 0, 1)


def throughput(decoder: str, blobs: list[bytes], side: int, seconds: float) -> float:
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for blob in blobs:
            decode_and_resize(decoder, blob, side)
        count += len(blobs)
    return count / (time.perf_counter() - started)


def median_rates(blobs: list[bytes], side: int, seconds: float, rounds: int) -> dict[str, float]:
    """Images/s of every candidate: the median of ``rounds`` interleaved timings.

    Interleaving spreads the load of other processes on a shared machine over all candidates.
    """
    for decoder in CANDIDATES:  # warm-up
        for blob in blobs:
            decode_and_resize(decoder, blob, side)
    samples: dict[str, list[float]] = {decoder: [] for decoder in CANDIDATES}
    for _ in range(rounds):
        for decoder in CANDIDATES:
            samples[decoder].append(throughput(decoder, blobs, side, seconds / rounds))
    return {decoder: float(np.median(rates)) for decoder, rates in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="timing per decoder and size")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"1 thread; torch {torch.__version__}; {os.cpu_count()} CPUs on this machine")
    for side, long_side in SETTINGS:
        blobs = source_jpegs(long_side)
        tolerance = max(
            float(
                np.abs(
                    pil_resize(b, side, Image.Resampling.BILINEAR)
                    - pil_resize(b, side, Image.Resampling.BICUBIC)
                ).mean()
            )
            for b in blobs
        )
        print(
            f"\n{side} px from {long_side} px JPEGs (q90); resize tolerance "
            f"(PIL bilinear vs bicubic): mean |d| {tolerance:.2f} levels"
        )
        reference = [decode_and_resize("pil", b, side).float() for b in blobs]
        rates = median_rates(blobs, side, args.seconds, args.rounds)
        for decoder, rate in rates.items():
            diff = max(
                float((decode_and_resize(decoder, b, side).float() - ref).abs().mean())
                for b, ref in zip(blobs, reference, strict=True)
            )
            verdict = "within" if diff <= tolerance else "OUTSIDE"
            print(
                f"  {decoder:<16} {rate:8.1f} images/s/core  {rate / rates['pil']:5.2f}x PIL   "
                f"mean |d| vs PIL {diff:5.2f} ({verdict} tolerance)"
            )


if __name__ == "__main__":
    main()
