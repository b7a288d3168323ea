"""The training loop: one plain function, read top to bottom.

``train`` takes a built model, loaders and an objective, and runs Adam (no weight decay on
biases and norms) with a OneCycle schedule, averaged weights (``mlcore.averaging``: an EMA, as
the ASL/CPSD code keeps, and stochastic weight averaging; validation keeps the best of the plain
and averaged weights each epoch), bf16 autocast and channels_last on GPU,
optional gradient clipping, and an optional adaptive-asymmetry controller. Model families whose
training forward or validation differ from "logits (B, C), sigmoid scores" (the orderless RNN)
bring a ``Forward`` and an ``Evaluator``. It reports through callbacks, so ``workflows`` can
send the numbers to MLflow or Ray without this module knowing either.

Data-parallel training (``workflows.distributed`` runs it under Ray Train) comes in as one more
argument, a :class:`Placement`: every rank runs this same loop on its share of each global
batch, the wrapped model sums the ranks' gradients, and the adaptive controller sees the whole
global batch. The default, :data:`LOCAL`, is one process and every hook is the identity.

Every epoch ends with an atomic checkpoint (``last.pt``: everything needed to resume) and, when
the epoch is the best so far, ``best.pt`` (the selected weights) with ``val_scores.npz``. Resuming
from ``last.pt`` gives the same final weights as an uninterrupted run on CPU, for any number of
DataLoader workers: every epoch re-seeds all RNGs from (seed, epoch), and each sample's
augmentation is seeded by its position in the epoch (``mlcore.data.dataset.SeededSampler``).

A run resumes only from a checkpoint carrying the same ``fingerprint`` (``mlcore.fingerprint``:
the config fields and data its result depends on); anything else is a
:class:`ResumeMismatchError`, never a silent continuation of another run. ``train.epochs`` is part
of the fingerprint on purpose: OneCycle spans the whole run, so a longer run is a new run.

``best.pt`` always holds the epoch that ``last.pt``'s record names as best. A new best is first
written as ``best.pt.next`` (and ``val_scores.npz.next``), then ``last.pt`` records it, then the
two are renamed into place; a crash in between is completed or rolled back on the next start by
:func:`settle_best`.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import DataLoader

from mlcore.averaging import WeightAverages
from mlcore.config import TrainConfig
from mlcore.errors import ResumeMismatchError
from mlcore.metrics import multilabel_report

LAST = "last.pt"
BEST = "best.pt"
SCORES = "val_scores.npz"
PENDING = ".next"  # suffix of a best checkpoint staged but not yet recorded (settle_best)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the epoch, step and last good checkpoint."""


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, H, W)
    targets: torch.Tensor  # (B, C) multi-hot float
    indices: torch.Tensor | None  # (B,) positions in the split, when the dataset returns them


class Forward(Protocol):
    """Runs the model on a training batch; its output is what the objective scores."""

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor: ...


def forward_images(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The default :class:`Forward`: ``model(images)``."""
    return model(batch.images)


class Objective(Protocol):
    """Maps the model's training output (logits (B, C) by default) and the batch to a loss."""

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor: ...


class Supervised:
    """Objective of a plain ``loss(logits, targets)`` module."""

    def __init__(self, loss: nn.Module):
        self.loss = loss

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.loss(logits, batch.targets)


class StepObserver(Protocol):
    """Updated after every optimiser step (e.g. the adaptive-asymmetry controller)."""

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


MetricsCallback = Callable[[int, dict[str, float]], None]


class Placement(Protocol):
    """Where this training process runs: its rank among data-parallel workers, and its CPUs.

    Every rank trains on a disjoint share of each global batch (the loaders are built per rank).
    The global objective is the *sum* of the ranks' objectives: with a loss summed over the
    batch (ASL, the distillation MSE) that is exactly the single-process loss of the global
    batch, so ``wrap`` must sum the ranks' gradients, not average them. A loss that averages
    over the batch (DB) then gets ``world_size`` times its single-process gradient, which Adam's
    per-parameter normalisation cancels except for the L2 weight-decay term and ``grad_clip``.
    """

    rank: int
    world_size: int
    cpus: float | None
    """CPUs this process holds (a Ray task's or worker's share); None: the whole machine."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to run forward/backward through (e.g. DDP around ``model``)."""
        ...

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over all ranks (every rank gets the result)."""
        ...

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Every rank's ``value`` concatenated along dim 0, in rank order."""
        ...


@dataclass(frozen=True)
class LocalPlacement:
    """One training process (no data parallelism): every hook is the identity."""

    cpus: float | None = None
    rank: int = 0
    world_size: int = 1

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        return value


LOCAL = LocalPlacement()


@dataclass
class Evaluation:
    """One pass of a model over a loader: what model selection and the reports read."""

    scores: np.ndarray  # (N, C) per-class scores in [0, 1]
    targets: np.ndarray  # (N, C) multi-hot
    metrics: dict[str, float]  # unprefixed names; ``mAP`` is the selection metric


class Evaluator(Protocol):
    """Scores a model on a loader (the default: sigmoid scores and ``multilabel_report``).

    Model families whose outputs are not per-class logits (the orderless RNN decoder) or that
    report extra numbers bring their own.
    """

    def __call__(
        self, model: nn.Module, loader: DataLoader, device: torch.device, amp: bool
    ) -> Evaluation: ...


@dataclass
class TrainResult:
    """What a finished run leaves behind."""

    out_dir: Path
    best_epoch: int  # counted from 1, like the history's "epoch"
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    val_scores: np.ndarray | None = None  # (N_val, C) probabilities of the selected weights
    val_targets: np.ndarray | None = None

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / BEST

    @classmethod
    def from_dir(cls, out_dir: str | os.PathLike) -> TrainResult:
        """The result of a finished run, read back from its ``last.pt`` and saved scores."""
        out = Path(out_dir)
        state = load_checkpoint(out / LAST)
        scores, targets = _saved_scores(out)
        best = state["best"]
        return cls(out, best["epoch"] + 1, best["metrics"], state["history"], scores, targets)

    @property
    def last_checkpoint(self) -> Path:
        return self.out_dir / LAST


def _saved_scores(out: Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    path = out / SCORES
    if not path.is_file():
        return None, None
    with np.load(path) as saved:
        return saved["scores"], saved["targets"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 10_007 + epoch


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def _save_scores_atomic(path: Path, scores: np.ndarray, targets: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, scores=scores, targets=targets)
    os.replace(tmp, path)


def check_resumable(out_dir: str | os.PathLike, fingerprint: str | None) -> None:
    """Raise :class:`ResumeMismatchError` when ``out_dir`` holds another run's checkpoint."""
    last = Path(out_dir) / LAST
    if not last.is_file():
        return
    state = load_checkpoint(last)
    if state.get("fingerprint") != fingerprint:
        raise ResumeMismatchError(
            f"{out_dir} holds the checkpoint of another run (fingerprint "
            f"{state.get('fingerprint')}, this config {fingerprint}; it stopped after epoch "
            f"{state['epoch'] + 1}). Resuming would report a result this config did not "
            "produce, and a longer run is a new run (OneCycle spans all epochs). Use another "
            "output directory, or delete that one to start over."
        )


def settle_best(out_dir: str | os.PathLike) -> None:
    """Finish or undo a best-checkpoint update that a crash interrupted.

    A pending ``best.pt.next`` whose epoch ``last.pt`` names as best is moved into place (the
    crash came after the record was written); any other pending file is from an epoch the record
    never accepted and is deleted.
    """
    out = Path(out_dir)
    pending = out / (BEST + PENDING)
    pending_scores = out / (SCORES + PENDING)
    if not pending.is_file():
        pending_scores.unlink(missing_ok=True)
        return
    recorded = load_checkpoint(out / LAST)["best"]["epoch"] if (out / LAST).is_file() else None
    if recorded is not None and load_checkpoint(pending)["epoch"] == recorded:
        if pending_scores.is_file():
            os.replace(pending_scores, out / SCORES)
        os.replace(pending, out / BEST)
    else:
        pending.unlink()
        pending_scores.unlink(missing_ok=True)


def unpack(batch, device: torch.device, channels_last: bool) -> Batch:
    images, targets, *rest = batch
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    indices = rest[0].to(device) if rest else None
    return Batch(images, targets.to(device, non_blocking=True).float(), indices)


@torch.no_grad()
def predict(
    model: nn.Module, loader: DataLoader, device: torch.device, *, amp: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores and targets over a loader, both (N, C) float32 numpy arrays."""
    model.eval()
    scores, targets = [], []
    for raw in loader:
        batch = unpack(raw, device, channels_last=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(batch.images)
        scores.append(torch.sigmoid(logits.float()).cpu())
        targets.append(batch.targets.cpu())
    return torch.cat(scores).numpy(), torch.cat(targets).numpy()


def evaluate_scores(
    model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = False
) -> Evaluation:
    """The default :class:`Evaluator`: sigmoid of the logits, then ``multilabel_report``."""
    scores, targets = predict(model, loader, device, amp=amp)
    return Evaluation(scores, targets, multilabel_report(scores, targets))


def _place(model: nn.Module, cfg: TrainConfig) -> tuple[torch.device, bool, bool]:
    """Seed, move ``model`` to the training device; returns the device and whether bf16
    autocast and channels_last apply (GPU only)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    on_gpu = device.type == "cuda"
    channels_last = cfg.channels_last and on_gpu
    seed_everything(cfg.seed)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return device, cfg.amp and on_gpu, channels_last


def _schedule(
    model: nn.Module, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam without weight decay on biases and norms, under a OneCycle schedule of the run."""
    optimizer = torch.optim.Adam(param_groups_weight_decay(model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=cfg.lr,
        total_steps=cfg.epochs * steps_per_epoch,
        pct_start=cfg.pct_start,
    )
    return optimizer, scheduler


def _epoch_batches(loader: DataLoader, seed: int, epoch: int):
    """An iterator over the epoch's batches, with every RNG seeded from (seed, epoch)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    # Starting the loader's iterator may draw a worker seed from the global RNG, and with
    # persistent workers only the first epoch of a process does: seeding after it keeps
    # a resumed run's randomness (dropout, random label orders) that of an unbroken one.
    batches = iter(loader)
    seed_everything(_epoch_seed(seed, epoch))
    return batches


def _check_finite(loss: torch.Tensor, epoch: int, step: int, out: Path) -> None:
    if not torch.isfinite(loss):
        last = out / LAST if (out / LAST).is_file() else "none (first epoch)"
        raise NonFiniteLossError(
            f"loss is {loss.item()} at epoch {epoch + 1} step {step + 1}; last good "
            f"checkpoint: {last}"
        )


def _optimizer_step(
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    grad_clip: float | None,
) -> None:
    """Backward (through the DDP wrapper when there is one), clip, step, schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()


def _select(
    candidates: dict[str, nn.Module],
    evaluate: Evaluator,
    val_loader: DataLoader,
    device: torch.device,
    amp: bool,
    select: str,
) -> tuple[str, Evaluation, dict[str, float]]:
    """Score every candidate; the best by ``select``, its evaluation, and its ``val_*`` metrics
    with each candidate's selection metric (``val_{select}_{name}``)."""
    evaluations = {name: evaluate(m, val_loader, device, amp) for name, m in candidates.items()}
    metrics = {f"val_{select}_{name}": e.metrics[select] for name, e in evaluations.items()}
    # max keeps the first of equals, so averaged weights must beat the plain ones strictly.
    selected = max(evaluations, key=lambda name: evaluations[name].metrics[select])
    chosen = evaluations[selected]
    metrics.update({f"val_{k}": v for k, v in chosen.metrics.items()})
    return selected, chosen, metrics


def _resume(
    out: Path,
    fingerprint: str | None,
    device: torch.device,
    parts: dict[str, Any],
    averages: WeightAverages,
) -> tuple[int, list[dict[str, float]], dict[str, Any]]:
    """Load ``last.pt`` into ``parts`` (name -> object with ``load_state_dict``, None for an
    absent one) and ``averages``; returns (next epoch, history, best)."""
    check_resumable(out, fingerprint)
    state = load_checkpoint(out / LAST, map_location=device)
    for name, part in parts.items():
        if part is not None and state.get(name) is not None:
            part.load_state_dict(state[name])
    averages.load_state_dict(state)
    return state["epoch"] + 1, state["history"], state["best"]


def _stage_best(out: Path, epoch: int, metrics: dict, weights: nn.Module, chosen: Evaluation):
    """A new best, staged as ``best.pt.next`` and ``val_scores.npz.next`` (:func:`settle_best`)."""
    _save_scores_atomic(out / (SCORES + PENDING), chosen.scores, chosen.targets)
    state = {"model": weights.state_dict(), "epoch": epoch, "metrics": metrics}
    save_atomic(state, out / (BEST + PENDING))


def _last_state(
    epoch: int,
    fingerprint: str | None,
    parts: dict[str, Any],
    averages: WeightAverages,
    history: list[dict[str, float]],
    best: dict[str, Any],
) -> dict[str, Any]:
    """``last.pt``: everything a resumed run needs (keys in the order checkpoints always had)."""
    state = {name: part.state_dict() if part is not None else None for name, part in parts.items()}
    return {
        "epoch": epoch,
        "fingerprint": fingerprint,
        "model": state["model"],
        **averages.state_dict(),
        "optimizer": state["optimizer"],
        "scheduler": state["scheduler"],
        "observer": state["observer"],
        "history": history,
        "best": best,
    }


def train(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    objective: Objective,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    observer: StepObserver | None = None,
    observe_every: int = 10,
    on_epoch: MetricsCallback | None = None,
    on_step: MetricsCallback | None = None,
    forward: Forward = forward_images,
    evaluate: Evaluator = evaluate_scores,
    fingerprint: str | None = None,
    resume: bool = True,
    placement: Placement = LOCAL,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train ``model`` and keep the best weights by validation ``cfg.select_metric``.

    Args:
        model: In eval mode, logits (B, C) for images (B, 3, H, W) (what the default
            ``evaluate`` reads); in training, whatever ``forward`` makes of it for ``objective``.
        train_loader: Yields ``(images, targets)`` or ``(images, targets, indices)``.
        val_loader: Same, over the validation split (targets over the same C classes).
        objective: Loss of (forward's output, batch).
        cfg: Loop settings.
        out_dir: Where ``last.pt`` and ``best.pt`` go.
        observer: Updated with (logits, targets) after each step; what it returns goes to
            ``on_step`` every ``observe_every`` steps, as (global_step, metrics).
        on_epoch: Called with (epoch counted from 1, metrics) after every epoch: ``train_loss``,
            ``lr``, ``epoch_time_s``, the selected weights' ``val_*`` (all that ``evaluate``
            reports) and each candidate's selection metric (``val_mAP_plain``, ``_ema``, ``_swa``).
        forward: Runs the model (DDP-wrapped on a worker group) on a training batch.
        evaluate: Scores the plain and averaged weights on ``val_loader`` each epoch.
        fingerprint: Identity of this run's config and data; stored in ``last.pt`` and
            required to match when resuming from it (``resume``).
        placement: Data-parallel hooks; ``train_loader`` must then yield this rank's share of
            every global batch. Each rank keeps its own ``out_dir`` (rank 0's is the result).

    Raises:
        NonFiniteLossError: The loss became NaN or inf (the last good checkpoint is kept).
        ResumeMismatchError: ``out_dir`` holds a checkpoint with another fingerprint.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device, amp, channels_last = _place(model, cfg)
    net = placement.wrap(model)  # forward/backward; averages, validation and checkpoints: model
    steps_per_epoch = len(train_loader)
    optimizer, scheduler = _schedule(model, cfg, steps_per_epoch)
    averages = WeightAverages.from_config(model, cfg)
    parts = dict(model=model, optimizer=optimizer, scheduler=scheduler, observer=observer)
    select = cfg.select_metric
    start_epoch, history = 0, []
    best: dict[str, Any] = {"epoch": -1, "metrics": {f"val_{select}": -math.inf}}
    settle_best(out)
    if resume and (out / LAST).is_file():
        start_epoch, history, best = _resume(out, fingerprint, device, parts, averages)
        log(f"resumed from {out / LAST} after epoch {start_epoch}/{cfg.epochs}")

    global_step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        batches = _epoch_batches(train_loader, cfg.seed, epoch)
        model.train()
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for step, raw in enumerate(batches):
            batch = unpack(raw, device, channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = forward(net, batch)
            # Losses run in float32 even under autocast: log(1 - p) near p = 1 needs it.
            logits = logits.float()
            loss = objective(logits, batch)
            _check_finite(loss, epoch, step, out)
            _optimizer_step(loss, model, optimizer, scheduler, cfg.grad_clip)
            global_step += 1
            averages.update(model, epoch, global_step)
            loss_sum += loss.detach()
            if observer is not None:
                # The whole global batch, so every rank's controller takes the same step.
                stats = observer.update(
                    placement.gather(logits.detach()), placement.gather(batch.targets)
                )
                if on_step is not None and global_step % observe_every == 0:
                    on_step(global_step, {"train_loss_step": loss.item(), **stats})

        # -- validate the plain and averaged weights, keep the best ------------------------------
        train_loss = (placement.sum(loss_sum) / steps_per_epoch).item()
        candidates = {"plain": model, **averages.candidates(train_loader, device)}
        selected, chosen, metrics = _select(candidates, evaluate, val_loader, device, amp, select)
        elapsed = time.perf_counter() - started
        metrics.update(train_loss=train_loss, lr=scheduler.get_last_lr()[0], epoch_time_s=elapsed)
        history.append({"epoch": epoch + 1, **metrics})  # records count epochs from 1

        # -- checkpoint ----------------------------------------------------------------------------
        improved = metrics[f"val_{select}"] > best["metrics"][f"val_{select}"]
        if improved:
            best = {"epoch": epoch, "metrics": metrics, "weights": selected}
            _stage_best(out, epoch, metrics, candidates[selected], chosen)
        save_atomic(_last_state(epoch, fingerprint, parts, averages, history, best), out / LAST)
        if improved:
            settle_best(out)
        log(
            f"epoch {epoch + 1}/{cfg.epochs}  loss {train_loss:.4f}  val {select} "
            f"{metrics[f'val_{select}']:.4f} ({selected})  {metrics['epoch_time_s']:.1f}s"
        )
        if on_epoch is not None:
            on_epoch(epoch + 1, metrics)

    scores, targets = _saved_scores(out)
    return TrainResult(out, best["epoch"] + 1, best["metrics"], history, scores, targets)
