"""Where a model trains: in the stage's own Ray task, or on a Ray Train worker group (DDP).

``ray.train_workers`` (``ray.student_train_workers`` for the student and the baseline) chooses.
With 1, a training stage calls its ``run`` in the Ray task it already is. With W > 1 the task
holds no resources itself and starts a ``TorchTrainer`` with W workers, each holding what the
task would have held (``ray.teacher_cpus`` / ``teacher_gpus``, ``student_*``; a Tune trial's
``tune.resources_per_trial``), and every worker runs the same ``run`` with its own
:class:`GroupPlacement`:

* DDP over the process group Ray Train set up (nccl on GPUs, gloo on CPUs), with the ranks'
  gradients *summed* (see ``mlcore.train.Placement``) and BatchNorm statistics taken over the
  global batch (torch's ``SyncBatchNorm`` on GPUs, :class:`CrossRankBatchNorm` on CPUs);
* each rank draws its share of the same global sample order (``mlcore.data.loading.build_loaders``);
* every rank runs the whole loop (EMA, validation, model selection give identical results on
  every rank, in parallel), but only rank 0's files count: they are the epoch checkpoint
  reported to Ray Train, and only rank 0 logs to the stage's MLflow run (tag
  ``ray.world_size``); the other ranks write to a scratch directory;
* ``FailureConfig(max_failures=ray.max_retries)``: when a worker dies the group restarts and
  every rank resumes from the last epoch checkpoint, logging to the same MLflow run. A retried
  stage task resumes the same way (same Ray Train run name and storage).

After ``fit`` the last checkpoint (``last.pt``, ``best.pt``, ``val_scores.npz``) is copied
into the stage's directory: the stage's outputs, key and layout are those of a one-process run.
Ray Train's own run directory lives under ``<stage>/ray_train`` while the stage runs and is
removed once it is done.

Tune over Train deadlocks when the trial itself holds a CPU that the workers need (trial 1 CPU
+ 2 workers x 1 CPU on 2 CPUs: the group never starts; ``../shared/notes/ray-mlflow-findings.md``
§3). A trial that trains on a group therefore holds :data:`TRIAL_RESOURCES`: no CPU at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import timm.layers
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from mlcore.bundle import BUNDLE_FILE
from mlcore.train import BEST, LAST, LocalPlacement, MetricsCallback, Placement, TrainResult
from workflows.config import Config
from workflows.storage import Storage
from workflows.tracking import NullRunLogger, RunLogger

Role = Literal["teacher", "student", "baseline"]
# What a Tune trial holds while its worker group trains. Tune refuses an empty request, and even
# 0.01 CPU breaks whole-CPU packing (0.01 + two 1-CPU workers do not fit in 2 CPUs); one byte
# of Ray's ``memory`` resource holds nothing a worker needs.
TRIAL_RESOURCES = {"CPU": 0, "memory": 1}
RESULT_FILES = (LAST, BEST, "val_scores.npz", BUNDLE_FILE)  # the bundle: what users load
# Ray Train checks its workers every 2 s by default; every checkpointed report waits for one
# check (findings §3: 20 reports took 54 s, 23 s at 0.2 s).
HEALTH_CHECK_INTERVAL_S = "0.2"


class TrainingRun(Protocol):
    """What a stage trains: ``run(out_dir, on_epoch=, on_step=, placement=, log=)``."""

    def __call__(
        self,
        out_dir: Path,
        *,
        on_epoch: MetricsCallback | None,
        on_step: MetricsCallback | None,
        placement: Placement,
        log: Callable[[str], None],
    ) -> TrainResult: ...


# ---------------------------------------------------------------------------------------------
# Resources


def train_workers(cfg: Config, role: Role) -> int:
    if role == "student" and cfg.ray.student_train_workers is not None:
        return cfg.ray.student_train_workers
    return cfg.ray.train_workers


def model_resources(cfg: Config, role: Role) -> dict[str, float]:
    """Ray resources one copy of the model trains with (``num_cpus``/``num_gpus``).

    GPUs left unset mean one GPU when the cluster has any, else none.
    """
    import ray

    r = cfg.ray
    gpus = r.teacher_gpus if role == "teacher" or r.student_gpus is None else r.student_gpus
    cpus = r.teacher_cpus if role == "teacher" else r.student_cpus
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"num_cpus": cpus, "num_gpus": gpus}


def task_options(cfg: Config, role: Role) -> dict[str, float]:
    """Resources of a training stage's Ray task: the model's, or none when a group trains it."""
    if train_workers(cfg, role) == 1:
        return model_resources(cfg, role)
    return {"num_cpus": 0, "num_gpus": 0}


def task_placement() -> LocalPlacement:
    """This Ray task's CPUs (for ``data.num_workers: auto``); the machine's outside Ray."""
    import ray

    if not ray.is_initialized():
        return LocalPlacement()
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return LocalPlacement(cpus=cpus)


# ---------------------------------------------------------------------------------------------
# One rank of a worker group


def _sum_gradients(state, bucket):
    """DDP communication hook: all-reduce SUM (DDP's own hook divides by the world size)."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover every rank's share of the batch.

    What torch's ``SyncBatchNorm`` does, for CPU tensors (which it refuses): per channel, the
    ranks' sums of x and x² and their counts are all-reduced (differentiably, so the backward
    pass sums the gradients of the statistics over ranks as well), giving the mean and the
    biased variance of the global batch::

        mean = Σx / n,  var = Σx² / n − mean²,  y = (x − mean) / sqrt(var + eps) · w + b

    The sums are taken in float64 (Σx² − n·mean² cancels badly in float32). Running statistics
    are updated as ``nn.BatchNorm`` does (unbiased variance); evaluation uses them unchanged.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.double()
        local = torch.cat(
            [x.sum(dims), (x * x).sum(dims), x.new_tensor([input.numel() / channels])]
        )
        total = dist_nn.all_reduce(local)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels : 2 * channels] / count - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                unbiased = var * count / (count - 1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        shape = (1, channels) + (1,) * (input.dim() - 2)
        scale = torch.rsqrt(var + self.eps).to(input.dtype).view(shape)
        out = (input - mean.to(input.dtype).view(shape)) * scale
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


def _cross_rank_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with its plain BatchNorm layers replaced by :class:`CrossRankBatchNorm`
    (same parameter and buffer tensors). timm's norm+activation layers are left alone."""
    out = module
    if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        out = CrossRankBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _cross_rank_batchnorm(child))
    return out


@dataclass(frozen=True)
class GroupPlacement:
    """:class:`mlcore.train.Placement` of one rank of a Ray Train worker group."""

    rank: int
    world_size: int
    cpus: float | None

    def wrap(self, model: nn.Module) -> nn.Module:
        # Batch statistics over the global batch, as one process computes them. The layers are
        # replaced inside ``model``, whose parameters stay the same tensors.
        device = next(model.parameters()).device
        if device.type == "cuda":
            model = timm.layers.convert_sync_batchnorm(model)
        else:
            model = _cross_rank_batchnorm(model)
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
        ddp.register_comm_hook(None, _sum_gradients)
        return ddp

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        value = value.contiguous()
        parts = [torch.empty_like(value) for _ in range(self.world_size)]
        dist.all_gather(parts, value)
        return torch.cat(parts)


@dataclass(frozen=True)
class GroupJob:
    """What every worker of a group gets (pickled once by Ray Train)."""

    run: TrainingRun
    logger: RunLogger | NullRunLogger
    cpus_per_worker: float
    use_gpu: bool


def _worker_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: one rank of the group, start to end."""
    import ray.train
    import ray.train.torch

    job: GroupJob = config["job"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    placement = GroupPlacement(rank, context.get_world_size(), job.cpus_per_worker)
    if job.use_gpu:
        # ``torch.device("cuda")`` (train.device auto) then means this worker's GPU.
        torch.cuda.set_device(ray.train.torch.get_device())
    else:
        # A group that requested no GPU trains on CPUs, never on a GPU it would share
        # silently (``workflows.runtime.device_for_task`` does the same for a task).
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    logger = job.logger if rank == 0 else NullRunLogger()
    out = Path(tempfile.mkdtemp(prefix=f"cpsd-rank{rank}-"))
    try:
        restored = ray.train.get_checkpoint()
        if restored is not None:
            restored.to_directory(out)  # every rank resumes from the same epoch

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            logger.metrics(metrics, step=epoch)
            report = {**metrics, "epoch": epoch}
            if rank != 0:
                ray.train.report(report, checkpoint=None)
                return
            with tempfile.TemporaryDirectory(prefix="cpsd-report-") as tmp:
                for name in RESULT_FILES:
                    if (out / name).is_file():
                        shutil.copy2(out / name, tmp)
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))

        def on_step(step: int, stats: dict[str, float]) -> None:
            logger.metrics(stats, step=step)

        job.run(
            out,
            on_epoch=on_epoch,
            on_step=on_step,
            placement=placement,
            log=lambda line: print(f"[rank {rank}] {line}", flush=True),
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Running a group


def fit_group(
    run: TrainingRun,
    out_dir: Path,
    *,
    workers: int,
    resources: dict[str, float],
    max_failures: int,
    logger: RunLogger | NullRunLogger,
    storage: Storage,
    rel: str,
    callbacks: Sequence[object] = (),
) -> TrainResult:
    """Train ``run`` on ``workers`` Ray Train workers; the result lands in ``out_dir``.

    Args:
        run: The training, called on every rank.
        out_dir: Where rank 0's final files are copied.
        workers: World size.
        resources: Ray resources of one worker (``num_cpus``, ``num_gpus``, or Tune-style
            ``CPU``/``GPU`` keys).
        max_failures: Worker-group restarts before ``fit`` gives up.
        logger: The MLflow run rank 0 logs to.
        storage: Where Ray Train keeps its checkpoints (every node must reach it).
        rel: Ray Train's run directory under ``storage``; the same ``rel`` resumes a run. It is
            removed once the run has finished.
        callbacks: Extra ``RunConfig`` callbacks (Tune's ``TuneReportCallback``).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cpus = resources.get("num_cpus", resources.get("CPU", 1.0))
    gpus = resources.get("num_gpus", resources.get("GPU", 0.0))
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    logger.tags({"ray.world_size": workers})
    parent, name = storage.path(rel).rsplit("/", 1)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"job": GroupJob(run, logger, cpus, gpus > 0)},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpus > 0,
            resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=parent,
            storage_filesystem=storage.fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=list(callbacks),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {storage.uri_of(rel)} ended without a checkpoint")
    out_dir.mkdir(parents=True, exist_ok=True)
    result.checkpoint.to_directory(out_dir)
    # Finished: the outputs are in ``out_dir``, the Ray Train run is no longer needed.
    with contextlib.suppress(OSError):
        storage.fs.delete_dir(storage.path(rel))
    return TrainResult.from_dir(out_dir)


def train_stage(
    cfg: Config,
    role: Role,
    run: TrainingRun,
    out_dir: Path,
    *,
    storage: Storage,
    rel: str,
    on_epoch: MetricsCallback,
    logger: RunLogger | NullRunLogger,
    log: Callable[[str], None],
) -> TrainResult:
    """Train one pipeline stage in this task, or on a worker group (``ray.train_workers``).

    ``rel`` is the stage's directory under ``storage``; a group keeps its Ray Train run in
    ``<rel>/ray_train`` until it has finished.
    """
    workers = train_workers(cfg, role)
    if workers == 1:
        logger.tags({"ray.world_size": 1})
        return run(out_dir, on_epoch=on_epoch, on_step=None, placement=task_placement(), log=log)
    log(f"{rel}: training on {workers} Ray Train workers")
    result = fit_group(
        run,
        out_dir,
        workers=workers,
        resources=model_resources(cfg, role),
        max_failures=cfg.ray.max_retries,
        logger=logger,
        storage=storage,
        rel=f"{rel}/ray_train",
    )
    # A remote stage's local working copy may hold an earlier attempt's run; it is uploaded
    # after this.
    shutil.rmtree(out_dir / "ray_train", ignore_errors=True)
    return result
