"""Trained models in MLflow: one logged model with a PyTorch flavour and an image pyfunc.

A model bundle (``mlcore.bundle``) is logged as an MLflow 3 *logged model* with two flavours:

* ``pytorch``: the network exported with ``torch.export`` (MLflow's safe ``pt2`` format,
  nothing pickled); ``mlflow.pytorch.load_model(uri)`` returns a module mapping normalised
  images (B, 3, S, S) float32 to logits (B, C).
* ``python_function``: loaded by this module (``_load_pyfunc``) from the bundle file inside the
  model; ``predict`` takes a DataFrame with an ``image`` column (encoded image bytes; base64 in
  JSON requests) and returns a DataFrame with ``labels`` and ``scores`` (the predicted classes,
  highest first) and ``error`` (empty, or why the row's image could not be read). Parameters
  ``threshold`` (default: the bundle's per-class thresholds chosen on val, else 0.5) and
  ``top_k`` (0: off) choose the labels. ``cpsd serve`` (or ``mlflow models serve --env-manager
  local``) serves it: the environment must have this package installed, because the pyfunc
  code is imported from it rather than copied into every model.

  A ``path`` column (files on the serving host) is refused unless the model is loaded with an
  allowed image root: ``model_config`` key :data:`IMAGE_ROOT_KEY` (logged empty, so off; set
  it with ``mlflow.pyfunc.load_model(uri, model_config=...)``, or for a server with MLflow's
  ``MLFLOW_PYFUNC_INFERENCE_CONFIG`` JSON, which ``cpsd serve --image-root`` sets). Then only
  files under that root are read. A path outside the root and a missing file give the same
  error, so answers never tell which files exist.

The model signature and input example describe the pyfunc (what serving sees); the PyTorch
flavour's tensor interface is recorded in the model metadata.

:func:`log_model` links the model to its run at the best epoch, so that MLflow attaches the
run's metrics of that step (the best epoch's ``val_*`` and the final keys) to the model. The
model is named after its stage (``student``, ``teacher-cgp-0``, ``baseline``; ``train`` for
``cpsd train``), which is the name in the Models tab and in ``runs:/<run_id>/<stage>``.
:func:`register_model` adds a version to the Model Registry with tags and an alias, and
:func:`open_bundle` resolves every form of ``--model`` (bundle file, training directory,
``runs:/``, ``models:/``) to a bundle file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from PIL import Image

from mlcore.bundle import BUNDLE_FILE, Classifier, Decision, ModelBundle, load_bundle
from mlcore.fingerprint import file_digest
from workflows.model_ref import TrackingStore, check_model_ref, model_uri

PYTORCH_DATA = "pytorch"  # subdirectory of the model holding the torch.export program
IMAGE_ROOT_KEY = "image_root"
"""``model_config`` key: the directory whose files the ``path`` column may name (empty: none)."""
INFERENCE_CONFIG_ENV = "MLFLOW_PYFUNC_INFERENCE_CONFIG"
"""MLflow's environment variable overriding ``model_config`` keys at load time (JSON)."""
PATH_OFF = (
    "the 'path' column is off: send the encoded image in 'image' (a server reads its own files "
    f"only when loaded with an allowed image root: cpsd serve --image-root, or model_config "
    f"{IMAGE_ROOT_KEY})"
)
PATH_REFUSED = "no such file under the allowed image root"

IMAGE_SIGNATURE = ModelSignature(
    inputs=Schema(
        [ColSpec("binary", "image", required=False), ColSpec("string", "path", required=False)]
    ),
    outputs=Schema(
        [
            ColSpec(Array("string"), "labels"),
            ColSpec(Array("double"), "scores"),
            ColSpec("string", "error", required=False),
        ]
    ),
    # threshold None: the bundle's own (cpsd predict's default).
    params=ParamSchema([ParamSpec("threshold", "double", None), ParamSpec("top_k", "long", 0)]),
)


# ---------------------------------------------------------------------------------------------
# The pyfunc flavour


class BundlePyfunc:
    """What ``mlflow.pyfunc.load_model`` wraps: images in, labels out.

    Args:
        bundle_path: The bundle file inside the MLflow model.
        image_root: The directory whose files the ``path`` column may name (None: no paths).

    Raises:
        NotADirectoryError: ``image_root`` is not a directory.
    """

    def __init__(self, bundle_path: str | os.PathLike, image_root: str | None = None):
        self.classifier = Classifier.from_file(bundle_path)
        self.image_root = None
        if image_root:
            if not Path(image_root).is_dir():
                raise NotADirectoryError(f"the allowed image root {image_root} is not a directory")
            self.image_root = Path(os.path.realpath(image_root))

    def _allowed(self, text: str) -> str | None:
        """The real path of a file under the image root that ``text`` names, else None.

        Paths are checked as text before the file system is touched, and again after symbolic
        links are resolved; every refusal is the same, whatever exists.
        """
        if self.image_root is None:
            return None
        named = Path(os.path.normpath(self.image_root / text))  # an absolute text replaces root
        if not named.is_relative_to(self.image_root):
            return None
        real = Path(os.path.realpath(named))
        if not real.is_relative_to(self.image_root) or not real.is_file():
            return None
        return str(real)

    def predict(
        self, model_input: pd.DataFrame, params: Mapping[str, Any] | None = None
    ) -> pd.DataFrame:
        """One output row per input row: ``labels``, ``scores`` and ``error``."""
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        params = dict(params or {})
        top_k = int(params.get("top_k") or 0)
        threshold = params.get("threshold")
        if top_k:
            decision = Decision(top_k=top_k)
        elif threshold is not None:
            decision = Decision(float(threshold))
        else:
            decision = self.classifier.bundle.default_decision()
        names = self.classifier.class_names
        labels: list[list[str]] = [[] for _ in range(len(frame))]
        scores: list[list[float]] = [[] for _ in range(len(frame))]
        errors = [""] * len(frame)
        sources, positions = [], []
        for i, row in enumerate(frame.to_dict("records")):
            source, errors[i] = self._row_source(row)
            if source is not None:
                sources.append(source)
                positions.append(i)
        for batch in self.classifier.iter_scores(sources):
            chosen_rows = decision.select(batch.scores)
            for index, row_scores, chosen in zip(
                batch.indices, batch.scores, chosen_rows, strict=True
            ):
                labels[positions[index]] = [names[c] for c in chosen]
                scores[positions[index]] = [float(row_scores[c]) for c in chosen]
            for index, reason in batch.failures:
                errors[positions[index]] = reason
        return pd.DataFrame({"labels": labels, "scores": scores, "error": errors})

    def _row_source(self, row: Mapping[str, Any]) -> tuple[bytes | str | None, str]:
        """The row's image bytes or allowed file, or None and why not."""
        image, path = row.get("image"), row.get("path")
        if isinstance(image, bytes | bytearray) and image:
            return bytes(image), ""
        if isinstance(path, str) and path:
            if self.image_root is None:
                return None, PATH_OFF
            allowed = self._allowed(path)
            return allowed, "" if allowed is not None else PATH_REFUSED
        return None, "row has no 'image' (encoded image bytes)"


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> BundlePyfunc:
    """MLflow's loader hook (``loader_module`` of the python_function flavour)."""
    return BundlePyfunc(data_path, (model_config or {}).get(IMAGE_ROOT_KEY))


def _requirements() -> list[str]:
    """Pinned versions of what the model needs at load time (without this package itself)."""
    import PIL
    import timm
    import torchvision

    def pin(name: str, version: str) -> str:
        return f"{name}=={version.split('+')[0]}"  # local tags (+cu130) are not on PyPI

    return [
        pin("mlflow", mlflow.__version__),
        pin("torch", torch.__version__),
        pin("torchvision", torchvision.__version__),
        pin("timm", timm.__version__),
        pin("pillow", PIL.__version__),
        pin("pandas", pd.__version__),
        pin("numpy", np.__version__),
    ]


def _example_image(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (127, 127, 127)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_model(
    path: str | os.PathLike, mlflow_model: Model | None = None, *, bundle: str | os.PathLike
) -> None:
    """Write the MLflow model directory of a bundle (the ``flavor`` hook of ``Model.log``).

    The python_function flavour carries the bundle file itself; the pytorch flavour is
    ``mlflow.pytorch``'s own ``pt2`` export, saved to a scratch directory and moved in.
    """
    path = Path(path)
    loaded = load_bundle(bundle)
    mlflow_model = mlflow_model or Model()
    size = loaded.preprocessing.image_size
    requirements = _requirements()
    with tempfile.TemporaryDirectory(prefix="cpsd-torch-model-") as scratch:
        torch_dir = Path(scratch) / "torch"
        # Batch 2 in the example: torch.export treats a size-1 dimension as static.
        example = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
        mlflow.pytorch.save_model(
            loaded.build_model(),
            str(torch_dir),
            signature=ModelSignature(
                inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size))]),
                outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, loaded.num_classes))]),
            ),
            input_example=example,
            serialization_format="pt2",
            pip_requirements=requirements,
        )
        torch_flavour = dict(Model.load(str(torch_dir)).flavors["pytorch"])
        mlflow.pyfunc.save_model(
            str(path),
            loader_module=__name__,
            data_path=str(bundle),
            mlflow_model=mlflow_model,
            signature=IMAGE_SIGNATURE,
            input_example=pd.DataFrame({"image": [_example_image(size)]}),
            pip_requirements=requirements,
            # Logged so that a load may override it: MLflow only lets logged keys be set.
            model_config={IMAGE_ROOT_KEY: ""},
        )
        shutil.copytree(torch_dir / torch_flavour["model_data"], path / PYTORCH_DATA)
    torch_flavour["model_data"] = PYTORCH_DATA
    mlflow_model.add_flavor("pytorch", **torch_flavour)
    mlflow_model.metadata = {
        **(mlflow_model.metadata or {}),
        "cpsd.pytorch_input": f"float32 (batch, 3, {size}, {size}), RGB scaled to [0, 1] and "
        f"normalised with mean {list(loaded.preprocessing.mean)}, std "
        f"{list(loaded.preprocessing.std)}",
        "cpsd.pytorch_output": f"logits (batch, {loaded.num_classes}); sigmoid for probabilities",
        "cpsd.class_names": list(loaded.class_names),
    }
    mlflow_model.save(str(path / "MLmodel"))


# ---------------------------------------------------------------------------------------------
# Logging and registering


@contextlib.contextmanager
def _global_tracking(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at ``uri`` for APIs that read only that."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def log_model(
    tracking_uri: str,
    run_id: str,
    bundle: str | os.PathLike,
    *,
    name: str,
    step: int,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log a bundle as the run's MLflow model ``name``; returns the logged model's id.

    Log the run's final metrics at ``step`` (the best epoch) first: MLflow links every
    metric of the run at that step to the model, which fills the Models tab's metric columns.
    """
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    # Created here rather than by Model.log, which would file the model under MLflow's
    # process-wide active experiment instead of the run's.
    logged = client.create_logged_model(
        experiment_id=run.info.experiment_id,
        name=name,
        source_run_id=run_id,
        params=dict(run.data.params),
        tags=dict(tags or {}),
        model_type="multi-label image classifier",
    )
    with _global_tracking(tracking_uri):
        info = Model.log(
            artifact_path=None,  # deprecated in MLflow 3 in favour of name, yet still positional
            name=name,
            flavor=sys.modules[__name__],
            run_id=run_id,
            step=step,
            model_id=logged.model_id,
            bundle=str(bundle),
        )
    return info.model_id


def register_model(
    tracking_uri: str,
    model_id: str,
    name: str,
    *,
    alias: str | None = None,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
):
    """Add the logged model as a new version of registered model ``name``.

    Args:
        tracking_uri: Tracking (and registry) store.
        model_id: From :func:`log_model`.
        name: Registered model name (config ``mlflow.registered_model``).
        alias: Pointed at the new version (e.g. the run's role: ``student``), so
            ``models:/<name>@<alias>`` always loads the latest such run.
        tags: Version tags, e.g. ``{"test_mAP": 0.81, "cpsd.role": "student"}``.
        description: The version's description (Markdown in the registry UI).

    Returns:
        The ``ModelVersion``.
    """
    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    with contextlib.suppress(MlflowException):  # it exists already: add a version to it
        client.create_registered_model(name)
    logged = client.get_logged_model(model_id)
    # The registry resolves a models:/<id> source through the process-wide tracking URI.
    with _global_tracking(tracking_uri):
        version = client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=logged.source_run_id,
            tags={k: str(v) for k, v in (tags or {}).items()},
            model_id=model_id,
            description=description,
        )
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version


# ---------------------------------------------------------------------------------------------
# Resolving --model


def find_bundle(path: str | os.PathLike) -> Path:
    """The bundle file of a path: the file itself, or inside a training or MLflow model dir.

    Raises:
        FileNotFoundError: Nothing there, or no bundle inside the directory.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in (path / BUNDLE_FILE, path / "data" / BUNDLE_FILE):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(
            f"no {BUNDLE_FILE} in {path}: expected a training output directory (cpsd train "
            "--out, a pipeline stage), a downloaded MLflow model, or the bundle file itself"
        )
    raise FileNotFoundError(f"--model {path}: no such file or directory")


@contextlib.contextmanager
def open_bundle(ref: str, tracking_uri: str | None = None) -> Iterator[Path]:
    """A local bundle path for any ``--model`` form; downloads are removed on exit.

    Args:
        ref: Bundle file, training output directory, ``runs:/<run_id>/<stage>`` or
            ``models:/<name>/<version | alias>`` (also ``models:/<name>@<alias>``).
        tracking_uri: Store that ``runs:/`` and ``models:/`` refer to (None:
            ``MLFLOW_TRACKING_URI``, else ``./mlflow.db``).

    Raises:
        FileNotFoundError: The path, run, model, version or alias does not exist, or the
            tracking store does not (it is never created); the message names the store.
    """
    store = TrackingStore.of(tracking_uri)
    check_model_ref(ref, store)
    if not ref.startswith(("runs:/", "models:/")):
        yield find_bundle(ref)
        return
    with tempfile.TemporaryDirectory(prefix="cpsd-model-") as scratch:
        try:
            # runs:/ URIs find the run's logged model through the process-wide tracking URI.
            with _global_tracking(store.uri):
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=model_uri(ref),
                    dst_path=scratch,
                    tracking_uri=store.uri,
                    registry_uri=store.uri,
                )
        except MlflowException as err:
            message = err.message.splitlines()[0] if err.message else type(err).__name__
            raise FileNotFoundError(f"--model {ref}: {message}, in the {store.where()}") from err
        yield find_bundle(local)


# ---------------------------------------------------------------------------------------------
# Serving


def serve_cache() -> Path:
    """Where ``cpsd serve`` keeps the MLflow models it writes for local bundles (per user)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cpsd" / "serve"


def servable_model(ref: str) -> str:
    """What ``mlflow models serve -m`` takes for a ``--model``.

    ``runs:/`` and ``models:/`` references and MLflow model directories are served as they
    are; a bundle file or training directory is written once as an MLflow model under
    :func:`serve_cache`, named by the bundle file's content.
    """
    if ref.startswith(("runs:/", "models:/")):
        return model_uri(ref)
    if (Path(ref) / "MLmodel").is_file():
        return str(Path(ref).resolve())
    bundle = find_bundle(ref)
    target = serve_cache() / file_digest(bundle)
    if not (target / "MLmodel").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            save_model(Path(scratch) / "model", bundle=bundle)
            with contextlib.suppress(OSError):  # a concurrent serve wrote it first
                os.replace(Path(scratch) / "model", target)
    return str(target)


def serve_process(
    model: str, tracking_uri: str, *, host: str, port: int, image_root: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow models serve`` command line and environment for :func:`servable_model`.

    MLflow starts ``uvicorn`` by name, which fails ("uvicorn: not found") when the venv's
    ``mlflow`` is run by full path without the venv on ``PATH``: the interpreter's directory
    goes first on ``PATH``. The server imports this package's pyfunc loader, so it gets the
    directory this package was imported from first on ``PYTHONPATH`` (the same code).
    """
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
    here = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    if image_root is not None:
        env[INFERENCE_CONFIG_ENV] = json.dumps({IMAGE_ROOT_KEY: str(Path(image_root).resolve())})
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model]
    argv += ["--env-manager", "local", "--host", host, "--port", str(port)]
    return argv, env


def read_logged_bundle(ref: str, tracking_uri: str | None = None) -> ModelBundle:
    """The bundle behind any ``--model`` form, read into memory."""
    with open_bundle(ref, tracking_uri) as path:
        return load_bundle(path)
