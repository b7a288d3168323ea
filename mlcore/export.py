"""Export a model bundle to ONNX or TorchScript, with a parity check against eager PyTorch.

The exported graph maps normalised images ``images`` (B, 3, S, S) float32 to ``logits`` (B, C);
probabilities are ``sigmoid(logits)``. The batch axis is dynamic. The class names and the
preprocessing travel inside the file (ONNX ``metadata_props``, TorchScript ``_extra_files``
``cpsd.json``), so a consumer needs nothing else.

Parity: the exported model and the eager model run on the same seeded random input at batch
sizes other than the one traced with (so a batch size baked into the graph is caught); the
maximum absolute difference of the logits must be within ``atol`` (default 1e-4), otherwise
:class:`ParityError`.

Heads: what gets traced is the ``export`` adapter of the bundle's model family
(``mlcore.models.family``) applied to its model, a module from images to per-class logits.
``gap``, ``ml_decoder`` (fixed or word queries) and ``rnn`` already are such modules in eval mode:
the orderless RNN's decoder always runs ``max_steps + 1`` greedy steps, so tracing unrolls it
into one static graph whose argmax feedback is part of the graph, and its per-class scores
(``mlcore.models.orderless_rnn``) are the output. A head whose forward is data-dependent in
Python registers an adapter with its family; a family without one (``export=None``) is refused
with a clear error rather than producing a wrong graph.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mlcore.bundle import ModelBundle
from mlcore.models import FAMILIES, family_of

TRACE_BATCH = 2
PARITY_BATCHES = (1, 3)
DEFAULT_ATOL = 1e-4
ONNX_OPSET = 18


class ExportError(RuntimeError):
    """The model cannot be exported in the requested format (the message says why)."""


class ParityError(ExportError):
    """The exported model's outputs differ from eager PyTorch by more than the tolerance."""


def exportable_module(bundle: ModelBundle) -> nn.Module:
    """The bundle's model wrapped for export, in eval mode.

    Raises:
        ExportError: The model's family has no export adapter.
    """
    adapter = family_of(bundle.model.head).export
    if adapter is None:
        exportable = sorted(name for name, f in FAMILIES.items() if f.export is not None)
        raise ExportError(
            f"export of head {bundle.model.head!r} is not supported yet "
            f"(supported: {', '.join(exportable)}); see ModelFamily.export in "
            "mlcore.models.family"
        )
    return adapter(bundle.build_model()).eval()


def _random_images(bundle: ModelBundle, batch: int, seed: int) -> torch.Tensor:
    size = bundle.preprocessing.image_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator)


def _description(bundle: ModelBundle) -> dict[str, str]:
    return {
        "cpsd.format": "images (B, 3, S, S) float32, normalised -> logits (B, C); "
        "probabilities = sigmoid(logits)",
        "cpsd.class_names": json.dumps(list(bundle.class_names)),
        "cpsd.preprocessing": json.dumps(
            {
                "image_size": bundle.preprocessing.image_size,
                "mean": list(bundle.preprocessing.mean),
                "std": list(bundle.preprocessing.std),
                "resize": "square, bilinear, antialiased; RGB scaled to [0, 1] then normalised",
            }
        ),
        "cpsd.model": json.dumps(bundle.header()["model"]),
        "cpsd.version": bundle.cpsd_version,
    }


# ---------------------------------------------------------------------------------------------
# Formats


def export_onnx(module: nn.Module, bundle: ModelBundle, path: Path) -> Callable:
    """ONNX (opset 18, dynamo exporter, weights inside the file); returns a runner."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(
            "ONNX export needs the 'export' extra: pip install 'cpsd[export]' "
            "(onnx, onnxruntime, onnxscript)"
        ) from err
    example = _random_images(bundle, TRACE_BATCH, seed=0)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            opset_version=ONNX_OPSET,
            verbose=False,
        )
    except Exception as err:  # the exporter raises many internal types; all mean "cannot export"
        raise ExportError(f"torch.onnx.export failed: {type(err).__name__}: {err}") from err
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, _description(bundle))
    onnx.save(proto, str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(["logits"], {"images": images.numpy()})[0]


def export_torchscript(module: nn.Module, bundle: ModelBundle, path: Path) -> Callable:
    """TorchScript by tracing; returns a runner of the saved file."""
    example = _random_images(bundle, TRACE_BATCH, seed=0)
    with warnings.catch_warnings():
        # torch 2.9+ marks torch.jit as deprecated; TorchScript is still what many serving
        # stacks (TorchServe, LibTorch) load, so this format stays until they move.
        warnings.simplefilter("ignore", FutureWarning)
        try:
            traced = torch.jit.trace(module, example)
        except Exception as err:  # tracing raises many internal types; all mean the same
            raise ExportError(f"torch.jit.trace failed: {type(err).__name__}: {err}") from err
        extra = {"cpsd.json": json.dumps(_description(bundle))}
        torch.jit.save(traced, str(path), _extra_files=extra)
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return loaded(images).numpy()

    return run


FORMATS: dict[str, Callable[[nn.Module, ModelBundle, Path], Callable]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
}
"""Format name -> exporter writing the file and returning a function images -> logits."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    atol: float


def export_bundle(
    bundle: ModelBundle, fmt: str, path: str | os.PathLike, *, atol: float = DEFAULT_ATOL
) -> ExportResult:
    """Export, then compare with eager PyTorch on random input at several batch sizes.

    Raises:
        ExportError: Unknown format, unsupported head or a failing exporter.
        ParityError: max |exported - eager| > ``atol`` (the file is kept for inspection).
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {sorted(FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = exportable_module(bundle)
    run = FORMATS[fmt](module, bundle, path)
    worst = 0.0
    for i, batch in enumerate(PARITY_BATCHES):
        images = _random_images(bundle, batch, seed=1 + i)
        with torch.no_grad():
            eager = module(images).numpy()
        exported = run(images)
        if exported.shape != eager.shape:
            raise ParityError(
                f"{fmt} output shape {exported.shape} != eager {eager.shape} at batch {batch}"
            )
        worst = max(worst, float(np.abs(exported - eager).max()))
    result = ExportResult(path, fmt, worst, PARITY_BATCHES, atol)
    if not worst <= atol:  # also catches NaN
        raise ParityError(
            f"{fmt} parity check failed: max |exported - eager| = {worst:.3g} > {atol:g} "
            f"(batches {PARITY_BATCHES}); the file is kept at {path}"
        )
    return result
